"""``jaxcpt demo``: continual pretraining end to end on a CPU in minutes, with nothing to download.

1. builds two corpora from the Python standard library (English docstrings = 'general',
   Python code = 'domain') and trains a sentencepiece tokenizer on them;
2. pretrains a small base model on the general corpus (reused if already built);
3. continues it on the domain twice, without replay and with 25% general replay,
   both with a re-warmed cosine schedule, each keeping a moving average (EMA) of its weights;
4. merges the base with the no-replay model at several coefficients (``jaxcpt merge --sweep``)
   and names the one within a forgetting tolerance;
5. prints the forgetting report side by side (replay, EMA and merge rows) and plots both runs;
6. exports the replay run to a Hugging Face directory, loads it with transformers
   and generates a few tokens.

Every run is an ordinary ``jaxcpt train`` run: each run directory holds the
config.yaml it was trained with, so any step can be repeated by hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxcpt.errors import UserError


@dataclasses.dataclass(frozen=True)
class DemoScale:
    documents: int  # per corpus
    pretrain_steps: int
    cpt_steps: int
    eval_every: int
    ema_decay: float  # an average over the last ~1 / (1 - decay) steps of the CPT runs
    merge_coefficients: str


SCALES = {
    "full": DemoScale(documents=8000, pretrain_steps=400, cpt_steps=200, eval_every=25, ema_decay=0.98,
                      merge_coefficients="0,0.1,...,1"),
    "fast": DemoScale(documents=3000, pretrain_steps=150, cpt_steps=60, eval_every=20, ema_decay=0.95,
                      merge_coefficients="0,0.25,0.5,0.75,1"),
}
REPLAY_WEIGHT = 0.25
MERGE_TOLERANCE = 0.15  # nats of general-loss rise the merge may cost


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--fast", action="store_true", help="fewer steps and documents (CI; about a third of the time)")
    parser.add_argument("--data-only", action="store_true", help="only build the corpora and tokenizer into OUT/data")
    parser.add_argument("--fresh", action="store_true", help="rebuild everything, even a base model that already exists")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the table, its numbers, each phase's wall time, the git commit and the machine "
                             "to PATH (the docs quote benchmarks/results/demo.json)")
    parser.add_argument("--update", metavar="FILE", action="append", default=[],
                        help="refresh the blocks generated from --json in FILE (README.md, docs/merging.md); repeatable")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: only refresh the --update files from an existing --json")


def _model_overrides(vocab_size: int) -> list[str]:
    return [f"model.vocab_size={vocab_size}", "model.hidden_size=128", "model.intermediate_size=384",
            "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2", "model.dtype=float32",
            "model.bos_token_id=1", "model.eos_token_id=2", "model.pad_token_id=3"]


def _common(data_dir: Path, eval_every: int) -> list[str]:
    return [f"data.tokenizer={data_dir / 'tokenizer.model'}", "data.seq_len=128", "data.eval_rows=32",
            "data.shuffle_buffer=2000", "train.batch_size=16", "train.log_every=25", "train.loss_chunk_size=0",
            f"eval.every={eval_every}", "eval.dense_every=5", "eval.dense_until=20", "checkpoint.every_steps=100",
            "checkpoint.keep_last=1", "mesh={data: -1}"]


def _sources(data_dir: Path, general_weight: float, domain_weight: float) -> str:
    return ("data.sources=["
            f"{{name: domain, paths: ['{data_dir / 'domain.jsonl'}'], weight: {domain_weight}, eval_documents: 100}}, "
            f"{{name: general, paths: ['{data_dir / 'general.jsonl'}'], weight: {general_weight}, eval_documents: 100}}]")


def prepare_data(out: Path, scale: DemoScale, fresh: bool, reused: dict | None = None) -> Path:
    from jaxcpt.demo_corpora import build_corpora, train_tokenizer

    data_dir = out / "data"
    if not fresh and (data_dir / "tokenizer.model").is_file():
        print(f"[1/6] corpora and tokenizer: reusing {data_dir}", flush=True)
        if reused is not None:
            reused["data"] = True
        return data_dir
    print("[1/6] building corpora from the Python standard library and training a tokenizer ...", flush=True)
    files = build_corpora(data_dir, scale.documents)
    train_tokenizer(files, data_dir, vocab_size=1024)
    for name, path in files.items():
        print(f"      {name:8s} {sum(1 for _ in open(path)):6d} documents  {path}", flush=True)
    return data_dir


def _train(overrides: list[str]) -> dict:
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    summary = train(load_train_config(None, overrides))
    if summary.get("stopped_by_signal"):  # SIGTERM / Ctrl-C: the run saved and returned; the demo stops too
        raise UserError(f"the demo was stopped by a signal at step {summary['step']} of {summary['run_dir']}; "
                        "run `jaxcpt demo` again to start it over (a finished base model is reused)")
    return summary


def _finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("step") == steps


def pretrain_base(out: Path, data_dir: Path, scale: DemoScale, reused: dict | None = None) -> Path:
    """OUT/base: the small model pretrained on 'general' only (reused when already finished)."""
    import shutil

    base = out / "base"
    if _finished(base, scale.pretrain_steps):
        print(f"[2/6] base model: reusing {base}", flush=True)
        if reused is not None:
            reused["base"] = True
        return base
    print(f"[2/6] pretraining the base model on 'general' for {scale.pretrain_steps} steps ...", flush=True)
    if base.exists():
        shutil.rmtree(base)
    _train([f"run_dir={base}", "init.source=scratch", *_model_overrides(vocab_size=1024),
            *_common(data_dir, scale.pretrain_steps), _sources(data_dir, general_weight=1.0, domain_weight=0.0),
            f"train.steps={scale.pretrain_steps}", "optim.schedule.kind=warmup_cosine", "optim.schedule.peak_lr=3e-3",
            "optim.schedule.warmup_fraction=0.05", "eval.dense_every=0", "export.final=false"])
    return base


def cpt_overrides(run_dir: Path, data_dir: Path, base: Path, general_weight: float, scale: DemoScale) -> list[str]:
    """A CPT run from the base: general replay at ``general_weight``, the rest domain, re-warmed cosine schedule."""
    # Re-warm to the base model's peak LR and decay again (cosine): the standard CPT recipe.
    return [f"run_dir={run_dir}", "init.source=checkpoint", f"init.path={base}", "model.dtype=float32",
            *_common(data_dir, scale.eval_every), _sources(data_dir, general_weight, 1.0 - general_weight),
            f"train.steps={scale.cpt_steps}", "optim.schedule.kind=rewarm", "optim.schedule.peak_lr=3e-3",
            "optim.schedule.warmup_fraction=0.1", f"ema.decay={scale.ema_decay}"]


def _update_docs(json_path: Path, files: list[str]) -> None:
    from jaxcpt.demo_record import BLOCKS, fill

    record = json.loads(json_path.read_text())
    for name in files:
        path = Path(name)
        text = path.read_text() if path.is_file() else ""
        if not any(begin in text and end in text for begin, end in BLOCKS.values()):
            raise UserError(f"'{path}' has none of the demo's markers ({', '.join(b for b, _ in BLOCKS.values())})")
        path.write_text(fill(text, record))
        print(f"updated the demo's figures in {path} from {json_path}", flush=True)


def run(args) -> int:
    import shutil
    import time

    if (args.update or args.render_only) and not args.json:
        raise UserError("--update and --render-only take the demo's figures from --json PATH; give it")
    if args.render_only:
        _update_docs(Path(args.json), args.update)
        return 0
    from jaxcpt.demo_record import CpuLoad

    load, timings, reused = CpuLoad(), {}, {"data": False, "base": False}
    clock = time.monotonic()

    def phase(name: str) -> None:  # wall seconds since the previous phase ended
        nonlocal clock
        timings[name], clock = round(time.monotonic() - clock, 1), time.monotonic()

    scale = SCALES["fast" if args.fast else "full"]
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    data_dir = prepare_data(out, scale, args.fresh, reused)
    phase("data")
    if args.data_only:
        return 0
    base = pretrain_base(out, data_dir, scale, reused)
    phase("pretrain")

    runs = {}
    for label, general_weight in (("no_replay", 0.0), ("replay", REPLAY_WEIGHT)):
        run_dir = out / f"cpt_{label}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        print(f"[3/6] continuing on 'domain' {'with ' + format(general_weight, '.0%') + ' general replay' if general_weight else 'without replay'} "
              f"for {scale.cpt_steps} steps ...", flush=True)
        _train([*cpt_overrides(run_dir, data_dir, base, general_weight, scale),
                "export.final=" + ("true" if general_weight else "false")])
        runs[label] = run_dir
        phase(f"cpt_{label}")

    print(f"[4/6] merging the base with the no-replay model at {scale.merge_coefficients} ...", flush=True)
    from jaxcpt.cli import main as jaxcpt_main

    if jaxcpt_main(["merge", "--run", str(runs["no_replay"]), "--sweep", scale.merge_coefficients,
                    "--tolerance", str(MERGE_TOLERANCE)]) != 0:
        raise UserError("the demo's merge sweep failed; see the message above")
    phase("merge_sweep")
    print("[5/6] forgetting report: without replay (A) vs with replay (B)", flush=True)
    from jaxcpt.report.forgetting import compare, plot

    table, removed = compare(runs["no_replay"], runs["replay"])
    print(table, flush=True)
    plot([runs["no_replay"], runs["replay"]], out / "forgetting.png")
    (out / "forgetting.txt").write_text(table + "\n")
    phase("report")
    export_dir = runs["replay"] / "hf" / f"step_{scale.cpt_steps}"
    sample = _generate(export_dir)
    phase("transformers")
    timings["total"] = round(sum(timings.values()), 1)
    (out / "demo_result.json").write_text(json.dumps({"forgetting_removed": removed, "export": str(export_dir),
                                                      "generated": sample, "timings_s": timings}, indent=2))
    print(f"\ndone in {timings['total']:.0f} s. {out}/ holds:", flush=True)
    for path, what in ((data_dir, "the two corpora and the tokenizer"), (base, "the base model run"),
                       (runs["no_replay"], "CPT without replay"), (runs["replay"], "CPT with 25% replay"),
                       (export_dir, "the replay run as a Hugging Face model"),
                       (runs["no_replay"] / "merge_sweep_linear", "the merge sweep: base + t x (CPT - base)"),
                       (out / "forgetting.png", "eval loss per source over steps, both runs"),
                       (out / "forgetting.txt", "the comparison table")):
        print(f"  {path}  -- {what}")
    if args.json:
        from jaxcpt.demo_record import build_record

        cpu_load = load.stop()  # the demo's own phases; the SLERP sweep below is for docs/merging.md only
        print(f"[json] the same sweep with SLERP, for {args.json} ...", flush=True)
        slerp_dir = out / "merge_sweep_slerp"  # outside the run, so its report stays what the demo printed
        if jaxcpt_main(["merge", "--run", str(runs["no_replay"]), "--method", "slerp", "--sweep",
                        scale.merge_coefficients, "--tolerance", str(MERGE_TOLERANCE), "--out", str(slerp_dir)]) != 0:
            raise UserError("the demo's SLERP sweep failed; see the message above")
        phase("merge_sweep_slerp")
        sweeps = {method: json.loads((path / "sweep.json").read_text()) for method, path in
                  (("linear", runs["no_replay"] / "merge_sweep_linear"), ("slerp", slerp_dir))}
        record = build_record(scale={**dataclasses.asdict(scale), "replay_weight": REPLAY_WEIGHT,
                                     "merge_tolerance": MERGE_TOLERANCE, "fast": bool(args.fast)},
                              table=table, runs=runs, sweeps=sweeps, timings=timings, load=cpu_load, reused=reused)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"  {args.json}  -- this table, each phase's wall time, the commit and the machine", flush=True)
        _update_docs(Path(args.json), args.update)
    return 0


def _generate(export_dir: Path) -> str:
    """[6/6] Load the export with transformers and generate a few tokens (proves the hand-off works)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise UserError(f"the demo's last step needs transformers and torch ({e}); pip install torch") from None
    print(f"[6/6] loading {export_dir} with transformers ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    prompt = "def __init__(self"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    print(f"\ntransformers loaded {export_dir} and generated (greedy):\n  {text!r}", flush=True)
    return text
