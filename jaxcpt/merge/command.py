"""``jaxcpt merge``: merge a base model with CPT models into an HF directory, or sweep the mixture coefficient."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxcpt.errors import UserError

DESCRIPTION = """\
Merge a base model with one or more continually pretrained (CPT) models of the same
architecture. Inputs are HF directories or jaxcpt checkpoints (run dir, RUN/checkpoints,
RUN/checkpoints/STEP). The result is an HF directory (sharded safetensors with an index
when large; config.json, tokenizer and generation config from the first CPT model),
written tensor by tensor into a temporary directory and renamed into place.

Methods, applied to each tensor separately (every layer's q_proj, ...; B = the base's
tensor, M_i = model i's), computed in float32 (SLERP's angle from float64 sums) and
written in the inputs' dtype (float32 when they differ; --dtype to choose):

  linear           (1 - t) * B + t * M                      (exactly one --model)
  slerp            u = B/|B|, v = M/|M|, theta = arccos(<u, v>)   (flattened tensors)
                   sin((1 - t) * theta) / sin(theta) * B + sin(t * theta) / sin(theta) * M
                   and linear (1 - t) * B + t * M where |cos(theta)| > 0.9995 (nearly
                   colinear) or a tensor is zero                (exactly one --model)
  task_arithmetic  B + sum_i w_i * (M_i - B), evaluated as (1 - sum_i w_i) * B + sum_i w_i * M_i
                   (one weight per --model)

Terms whose coefficient is exactly 0 are skipped, so t=0 gives the base and t=1 the
model bit for bit.

--sweep (linear or slerp) merges at each coefficient, evaluates each merged model on a
run's held-out sources (--run RUN, or --config C.yaml for the data), prints per source
the loss and its change against t=0 (the base), writes OUT/sweep.json and
OUT/sweep.png (domain gain against general forgetting), and recommends the t with the
largest drop of the --domain source's loss among those whose --general source's loss
rose by at most --tolerance nats over the base.
"""

EXAMPLES = """\
examples:
  jaxcpt merge --base runs/cpt/base_hf --model runs/cpt --t 0.5 --out merged
  jaxcpt merge --method slerp --base BASE --model CPT --t 0.3 --out merged
  jaxcpt merge --method task_arithmetic --base BASE --model CODE --model MATH --weights 0.7,0.5 --out merged
  jaxcpt merge --run runs/demo/cpt_no_replay --sweep 0,0.1,...,1 --tolerance 0.05
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--method", default="linear", choices=["linear", "slerp", "task_arithmetic"],
                        help="merge method (default: linear); formulas above")
    parser.add_argument("--base", default=None, help="the base model (t=0); default with --run: the run's init.path")
    parser.add_argument("--model", action="append", default=None, metavar="MODEL",
                        help="a CPT model (repeat for task_arithmetic); default with --run: the run's latest checkpoint")
    parser.add_argument("--t", type=float, default=None, help="linear/slerp: weight of the model, 0 = base, 1 = model")
    parser.add_argument("--weights", default=None, help="task_arithmetic: comma-separated w_i, one per --model (default 1 each)")
    parser.add_argument("--out", default=None, help="merged HF directory; with --sweep the results directory "
                                                    "(default: RUN/merge_sweep_METHOD)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the inputs' dtype; float32 when they differ)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", default=None, metavar="LIST", help="coefficients, e.g. 0,0.25,0.5,1 or 0,0.1,...,1 (0 is always added)")
    sweep.add_argument("--run", default=None, help="run directory: its config.yaml gives the held-out sources")
    sweep.add_argument("--config", default=None, help="training config YAML giving the held-out sources (instead of --run)")
    sweep.add_argument("--general", default="general", help="source whose loss must not rise (default: general)")
    sweep.add_argument("--domain", default="domain", help="source whose loss the CPT lowered (default: domain)")
    sweep.add_argument("--tolerance", type=float, default=0.05,
                       help="allowed rise of the general source's loss over the base, nats/token (default: 0.05)")
    sweep.add_argument("--keep", action="store_true", help="keep every merged model as OUT/t_COEF (default: deleted after evaluation)")
    sweep.add_argument("--batch-size", type=int, default=None, help="eval batch (default: the config's train.batch_size)")
    sweep.add_argument("--mesh", default=None, help="mesh as YAML, e.g. '{data: -1}' (default: all devices on data)")


def _weights(args) -> tuple[float, ...]:
    if args.weights is None:
        return tuple(1.0 for _ in args.model)
    try:
        return tuple(float(w) for w in args.weights.split(","))
    except ValueError:
        raise UserError(f"--weights '{args.weights}' is not a comma-separated list of numbers") from None


def _method(args):
    from jaxcpt.merge.methods import Linear, Slerp, TaskArithmetic

    if args.method == "task_arithmetic":
        if args.t is not None:
            raise UserError("task_arithmetic takes --weights (one per --model), not --t")
        return TaskArithmetic(weights=_weights(args))
    if args.weights is not None:
        raise UserError(f"{args.method} takes --t, not --weights")
    if args.t is None:
        raise UserError(f"{args.method} needs --t (0 = base, 1 = model) or --sweep")
    return (Linear if args.method == "linear" else Slerp)(t=args.t)


def _train_config(args):
    from jaxcpt.train.config import load_train_config

    if args.run and args.config:
        raise UserError("give --run or --config, not both")
    if args.run:
        config = Path(args.run) / "config.yaml"
        if not config.is_file():
            raise UserError(f"'{config}' does not exist; --run takes a jaxcpt run directory")
        return _resolved_run_config(config)
    if args.config:
        return load_train_config(args.config)
    return None


def _resolved_run_config(path: Path):
    """A run's own config.yaml. It is the resolved config, so it lists every model field; with a
    checkpoint or HF start only the numerics apply (the architecture came from the start)."""
    from jaxcpt.config import from_dict, read_yaml
    from jaxcpt.train.config import NUMERICS_FIELDS, TrainConfig

    raw = read_yaml(path)
    if (raw.get("init") or {}).get("source", "scratch") != "scratch":
        raw["model"] = {k: v for k, v in (raw.get("model") or {}).items() if k in NUMERICS_FIELDS}
    return from_dict(TrainConfig, raw)


def _default_inputs(args, cfg) -> None:
    """With --run: the base is where the run started, the model is where it ended."""
    if args.base is None:
        if cfg is None or not args.run:
            raise UserError("--base is required (or --run RUN, whose init.path is the base)")
        if cfg.init.source == "scratch":
            raise UserError(f"run '{args.run}' started from scratch, so it has no base model; pass --base")
        args.base = cfg.init.path
    if not args.model:
        if not args.run:
            raise UserError("--model is required (or --run RUN, whose latest checkpoint is the model)")
        args.model = [args.run]


def run(args) -> int:
    from jaxcpt.merge.core import merge_models
    from jaxcpt.merge.inputs import open_input

    cfg = _train_config(args) if args.sweep is not None else None
    if args.sweep is None and (args.run or args.config):
        raise UserError("--run/--config give the data for --sweep; without --sweep pass --base and --model")
    _default_inputs(args, cfg)
    base = open_input(args.base)
    models = [open_input(m) for m in args.model]
    if args.sweep is not None:
        return _sweep(args, cfg, base, models)
    if args.out is None:
        raise UserError("--out is required: the merged HF directory to write")
    result = merge_models(base, models, _method(args), args.out, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: the merged config.json is the first model's; inputs differ in {note}")
    fallback = f", {result.linear_fallbacks} nearly colinear tensors interpolated linearly" if args.method == "slerp" else ""
    print(f"wrote {result.directory} ({args.method}, {result.tensors} tensors in {len(result.files)} file(s), "
          f"{result.dtype}{fallback}) in {result.seconds:.1f} s")
    return 0


def _sweep(args, cfg, base, models) -> int:
    from jaxcpt.merge.sweep import HeldOutLoss, format_table, parse_coefficients, run_sweep

    if args.method == "task_arithmetic":
        raise UserError("--sweep interpolates between the base and one model: use --method linear or slerp")
    if args.t is not None or args.weights is not None:
        raise UserError("--sweep gives the coefficients; drop --t/--weights")
    if len(models) != 1:
        raise UserError(f"--sweep takes exactly one --model, got {len(models)}")
    if cfg is None:
        raise UserError("--sweep needs the held-out data: pass --run RUN or --config C.yaml")
    coefficients = parse_coefficients(args.sweep)
    if args.out is None and not args.run:
        raise UserError("--sweep with --config needs --out (the results directory)")
    out = Path(args.out) if args.out else Path(args.run) / f"merge_sweep_{args.method}"
    import yaml

    evaluator = HeldOutLoss(cfg, batch_size=args.batch_size, mesh_axes=yaml.safe_load(args.mesh) if args.mesh else None)
    extra = {"tasks": _downstream_evaluator(cfg, evaluator.mesh)} if cfg.eval.downstream.enabled else None
    result = run_sweep(base, models[0], args.method, coefficients, evaluator, out, general=args.general,
                       domain=args.domain, tolerance=args.tolerance, keep=args.keep, dtype=args.dtype, run_dir=args.run,
                       extra_evaluators=extra)
    print(format_table(result))
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


def _downstream_evaluator(cfg, mesh):
    """The run's eval.downstream tasks on each merged model: {task: {metric: value}} per coefficient."""
    from jaxcpt.eval.downstream import run_tasks, scores, task_manager
    from jaxcpt.eval.harness import JaxcptLM

    downstream = cfg.eval.downstream
    manager = task_manager(downstream.include_path)

    def evaluate(merged_dir):
        lm = JaxcptLM.from_path(str(merged_dir), mesh=mesh, dtype=cfg.model.dtype, batch_size=downstream.batch_size,
                                max_length=downstream.max_length, max_gen_toks=downstream.max_gen_toks)
        return scores(run_tasks(lm, downstream, manager))

    return evaluate
