"""``jaxcpt evaluate RUN_OR_CHECKPOINT_OR_HF_DIR --tasks a,b``: lm-eval tasks on a jaxcpt model.

Any harness task works, including tasks of your own: a directory of YAML configs (and their
data files) passed with ``--include-path``. Writes the harness's results JSON and prints its
table. Multi-host safe: run it on every host; only process 0 writes.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a run directory, RUN/checkpoints (latest), RUN/checkpoints/STEP, or an HF directory")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    parser.add_argument("--include-path", default="", help="directory of your own task YAMLs, searched first")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (each shape compiles once)")
    parser.add_argument("--max-length", type=int, default=None, help="longest context (default: the model's)")
    parser.add_argument("--max-gen-toks", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw",
                        help="a checkpoint's trained weights, or the moving average it kept (ema.decay > 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--mesh", default=None, help="mesh as YAML, e.g. '{fsdp: -1}' (default: all devices on data)")
    parser.add_argument("--output", default=None, help="results JSON (default: MODEL/eval/results_TASKS.json for runs, "
                                                        "./results.json otherwise)")
    parser.add_argument("--log-samples", action="store_true", help="keep every request and answer in the JSON")
    parser.add_argument("--seed", type=int, default=1234, help="seed of few-shot sampling")


def run(args) -> int:
    import json
    from pathlib import Path

    import yaml

    from jaxcpt.eval.downstream import DownstreamConfig, check_tasks, require_harness, run_tasks, task_manager

    require_harness("jaxcpt evaluate")
    from jaxcpt.eval.harness import JaxcptLM
    from jaxcpt.sharding.distributed import DistributedConfig, initialize_distributed, is_writer
    from jaxcpt.sharding.mesh import build_mesh

    initialize_distributed(DistributedConfig())  # auto: joins the other hosts of a pod / SLURM job
    cfg = DownstreamConfig(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], include_path=args.include_path,
                           limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, seed=args.seed)
    cfg.validate()
    manager = task_manager(cfg.include_path)
    check_tasks(cfg, manager)  # before any weights are read
    mesh = build_mesh(yaml.safe_load(args.mesh) if args.mesh else None)
    lm = JaxcptLM.from_path(args.model, mesh=mesh, dtype=args.dtype, weights=args.weights, batch_size=args.batch_size,
                            max_length=args.max_length, max_gen_toks=args.max_gen_toks)
    results = run_tasks(lm, cfg, manager, log_samples=args.log_samples)
    if not is_writer():
        return 0
    from lm_eval.utils import handle_non_serializable, make_table

    out = Path(args.output) if args.output else _default_output(args.model, cfg.tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    print(make_table(results))
    print(f"wrote {out}")
    return 0


def _default_output(model: str, tasks: list[str]):
    from pathlib import Path

    root = Path(model)
    name = "results_" + "_".join(tasks)[:80] + ".json"
    if (root / "metrics.jsonl").is_file() or (root / "checkpoints").is_dir():
        return root / "eval" / name
    return Path(name)
