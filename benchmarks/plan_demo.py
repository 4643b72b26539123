"""The planner end to end on the built-in demo data: sweep, fit, train at the recommended ratio, compare.

    python benchmarks/plan_demo.py [--tolerance 0.15] [--ratios 0,0.1,0.2,0.35,0.5] [--steps 60]

1. the demo corpora (``jaxcpt demo --data-only``: runs/demo/data) and a small base model
   pretrained on 'general' (``jaxcpt.demo.pretrain_base``; reused when already there);
2. ``plan sweep``: short CPT runs from that base on 'domain' with 'general' replay at each ratio;
3. ``plan fit`` with every law (CMR, D-CPT, the monotone interpolation) and ``--law auto``: each
   one's leave-one-out error, recommendation and prediction, and a config with it;
4. a run of each distinct written config (the chosen mixture is what trains), whose measured
   general-loss rise is compared with each prediction and its uncertainty; ``plan check`` of the
   auto law's run (benchmarks/plan_compare.py).

Prints a table and writes benchmarks/results/plan_demo.json and docs/plan_demo_fit.png, with
the machine and the other processes' CPU load recorded (the runs' wall times depend on it).
Rerunning reuses the base and the finished sweep runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import CpuLoad, machine_info  # noqa: E402  (benchmarks/ is a directory of scripts)

from jaxcpt import demo  # noqa: E402
from jaxcpt.config import apply_overrides  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/plan_demo", help="working directory (default: %(default)s)")
    parser.add_argument("--tolerance", default="0.15", help="allowed general-loss rise (default: %(default)s nats)")
    parser.add_argument("--ratios", default="0,0.1,0.2,0.35,0.5", help="replay ratios swept")
    parser.add_argument("--steps", type=int, default=60, help="CPT steps of every run (default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="base model pretraining steps")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "plan_demo.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "plan_demo_fit.png"))
    args = parser.parse_args()

    from jaxcpt.plan.sweep import SweepSpec, run_sweep

    out = Path(args.out)
    load = CpuLoad()
    load.start()
    timings = {}
    t0 = time.monotonic()
    data_dir = demo.prepare_data(Path("runs/demo"), demo.SCALES["full"], fresh=False)  # as `jaxcpt demo --data-only`
    scale = dataclasses.replace(demo.SCALES["full"], pretrain_steps=args.pretrain_steps, cpt_steps=args.steps,
                                eval_every=args.steps)
    reused = {"base": (out / "base" / "summary.json").is_file()}
    base = demo.pretrain_base(out, data_dir, scale)
    timings["data_and_base_s"] = time.monotonic() - t0

    # The sweep's config: the demo's CPT run, evaluated only at step 0 and at the end.
    raw = apply_overrides({}, demo.cpt_overrides(out / "cpt", data_dir, base, 0.25, scale)
                          + ["eval.every=0", "eval.dense_every=0", "checkpoint.every_steps=1000"])
    config = out / "sweep_config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    ratios = [float(r) for r in args.ratios.split(",")]
    reused["sweep_runs"] = sum((out / "sweep" / "runs" / f"base-s{args.steps}-r{r:g}" / "summary.json").is_file()
                               for r in ratios)
    t0 = time.monotonic()
    run_sweep(SweepSpec(config=str(config), overrides=[], ratios=ratios, steps=[args.steps], sizes={"base": []}),
              out / "sweep")
    timings["sweep_s"] = time.monotonic() - t0

    from plan_compare import compare_laws  # noqa: E402  (benchmarks/plan_compare.py, shared with plan_realtext.py)

    result = compare_laws(out, tolerance=args.tolerance, steps=args.steps, plot=Path(args.plot),
                          title="the demo sweep (stdlib docstrings -> Python code)", bootstrap=args.bootstrap)
    timings.update(result.pop("timings_s"))
    load_info = load.stop()
    result.update({"what": "plan sweep + fit with every law (and --law auto) + a run at each recommended ratio, "
                           "on the demo corpora", "ratios": ratios, "cpt_steps": args.steps,
                   "pretrain_steps": args.pretrain_steps, "timings_s": timings,
                   "reused_from_an_earlier_invocation": reused, "machine": machine_info(), "cpu_load": load_info})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(f"other processes' CPU load: {load_info['other_processes_cores']:.2f} of {load_info['cores']} cores")
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
