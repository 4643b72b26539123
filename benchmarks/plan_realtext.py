"""The planner on real text, end to end: a 23M-parameter model, man pages as general text, Vim's help as the domain.

    python benchmarks/plan_realtext.py [--tolerance 0.1] [--ratios 0,0.05,0.1,0.2,0.3,0.45,0.6] [--steps 40]

1. corpora from text this machine has offline (benchmarks/plan_realtext_data.py) and a sentencepiece
   tokenizer of 4,096 pieces;
2. a Llama-shaped base model (hidden 512, 6 layers, ffn 1536, 23M parameters) pretrained on man pages;
3. ``plan sweep``: CPT runs from it on Vim's help with man-page replay at each ratio;
4. ``plan fit`` with every law (CMR, D-CPT, the monotone interpolation baseline) and ``--law auto``:
   leave-one-out error, recommendation, prediction;
5. a run of each law's written config (distinct ratios only), measured against the prediction and its
   leave-one-out uncertainty; then ``plan check`` of the auto law's run, which adds it to the sweep.

Prints a table and writes benchmarks/results/plan_realtext.json with the machine, the other processes'
CPU load and the git commit. ``--sweep-only`` stops after step 3; a rerun reuses the base and every
finished run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import plan_realtext_data  # noqa: E402
from train_throughput import CpuLoad, machine_info  # noqa: E402

from jaxcpt.config import apply_overrides  # noqa: E402

MODEL = ["model.hidden_size=512", "model.intermediate_size=1536", "model.num_layers=6", "model.num_heads=8",
         "model.num_kv_heads=4", "model.dtype=float32", "model.bos_token_id=1", "model.eos_token_id=2",
         "model.pad_token_id=3"]


def common(data: Path, general_weight: float) -> list[str]:
    return [f"data.tokenizer={data / 'tokenizer.model'}", "data.seq_len=256", "data.eval_rows=32",
            "data.shuffle_buffer=2000", "train.batch_size=8", "train.log_every=20", "train.loss_chunk_size=0",
            "checkpoint.keep_last=1", "mesh={data: -1}", "export.final=false", "eval.dense_every=0",
            "data.sources=["
            f"{{name: domain, paths: ['{data / 'domain.jsonl'}'], weight: {1 - general_weight}, eval_documents: 100}}, "
            f"{{name: general, paths: ['{data / 'general.jsonl'}'], weight: {general_weight}, eval_documents: 100}}]"]


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("step") == steps


def pretrain(out: Path, data: Path, steps: int) -> Path:
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    base = out / "base"
    if finished(base, steps):
        print(f"base model: reusing {base}", flush=True)
        return base
    if base.exists():
        shutil.rmtree(base)
    print(f"pretraining the base model on man pages for {steps} steps ...", flush=True)
    train(load_train_config(None, [f"run_dir={base}", "init.source=scratch", "model.vocab_size=4096", *MODEL,
                                   *common(data, 1.0), f"train.steps={steps}", f"eval.every={steps}",
                                   f"checkpoint.every_steps={steps}", "optim.schedule.kind=warmup_cosine",
                                   "optim.schedule.peak_lr=2e-3", "optim.schedule.warmup_fraction=0.05"]))
    return base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/plan_realtext")
    parser.add_argument("--tolerance", default="0.1", help="allowed general-loss rise in nats (default: %(default)s)")
    parser.add_argument("--ratios", default="0,0.05,0.1,0.2,0.3,0.45,0.6")
    parser.add_argument("--steps", type=int, default=40, help="CPT steps of every run")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--documents", type=int, default=3000, help="documents per corpus (at most)")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "plan_realtext.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "plan_realtext_laws.png"))
    args = parser.parse_args()

    from jaxcpt.plan.sweep import SweepSpec, run_sweep

    out = Path(args.out)
    load = CpuLoad()
    load.start()
    timings = {}
    t0 = time.monotonic()
    files = plan_realtext_data.build(out / "data", args.documents, vocab_size=4096)
    base = pretrain(out, out / "data", args.pretrain_steps)
    timings["data_and_base_s"] = time.monotonic() - t0
    raw = apply_overrides({}, [f"run_dir={out / 'cpt'}", "init.source=checkpoint", f"init.path={base}",
                               *common(out / "data", 0.25), f"train.steps={args.steps}", "eval.every=0",
                               "checkpoint.every_steps=1000", "optim.schedule.kind=rewarm",
                               "optim.schedule.peak_lr=2e-3", "optim.schedule.warmup_fraction=0.1"])
    config = out / "sweep_config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.monotonic()
    run_sweep(SweepSpec(config=str(config), overrides=[], ratios=ratios, steps=[args.steps], sizes={"base": []}),
              out / "sweep")
    timings["sweep_s"] = time.monotonic() - t0
    if args.sweep_only:
        print(json.dumps({"timings_s": timings, "cpu_load": load.stop()}, indent=1))
        return 0
    from plan_compare import compare_laws  # noqa: E402  (benchmarks/plan_compare.py: shared with plan_demo.py)

    result = compare_laws(out, tolerance=args.tolerance, steps=args.steps, plot=Path(args.plot),
                          title="man pages (general) -> Vim help (domain), 23M parameters")
    timings.update(result.pop("timings_s"))
    result.update({"what": "plan sweep + fit with every law + runs at each recommendation, on real text "
                           "(man pages general, Vim help domain)",
                   "ratios": ratios, "cpt_steps": args.steps, "pretrain_steps": args.pretrain_steps,
                   "documents": {k: sum(1 for _ in open(v)) for k, v in files.items()},
                   "timings_s": timings, "machine": machine_info(), "cpu_load": load.stop()})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
