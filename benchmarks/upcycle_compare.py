"""Upcycled vs dense continual pretraining on the demo data: reported, not asserted.

    python benchmarks/upcycle_compare.py [--pretrain-steps 120] [--steps 40]

1. the demo corpora (``jaxcpt demo --data-only``: DEMO/data, reused when there) and a small dense
   Llama (the demo's width, 2 layers) briefly pretrained on 'general', exported to HF (float32);
2. ``jaxcpt upcycle`` of it (``jaxcpt.adapt.upcycle.upcycle``, what the command calls) into Mixtral
   models: 4 copies top-1 (the dense model's active parameters), the same with ``--noise``,
   granular (2 copies split in 2, top-2 halves = top-1 copy) and 4 copies top-2 (twice the MLP FLOPs);
3. the dense model and every upcycled one continued alike: same data (domain with 25% general
   replay), same seed, batches, schedule (re-warmed cosine) and steps; the MoE runs add a
   load-balancing loss (``model.moe.router_aux_loss_coef``);
4. a table of domain and general held-out loss at step 0, at equal tokens (the last step) and, for a
   run whose active FLOPs per token differ from the dense model's, at the dense run's total FLOPs
   (its eval curve interpolated linearly in FLOPs).

Writes benchmarks/results/upcycle_compare.json with the machine, the git commit and the other
processes' CPU load (the machine is shared; wall times depend on it). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import CpuLoad, machine_info  # noqa: E402  (benchmarks/ is a directory of scripts)

from jaxcpt import demo  # noqa: E402

# name -> upcycle options (None: the dense model itself)
VARIANTS = {
    "dense": None,
    "upcycled 4x top-1": dict(experts=4, top_k=1),
    "upcycled 4x top-1, noise 0.05": dict(experts=4, top_k=1, noise=0.05),
    "granular 2x2 top-2": dict(experts=2, top_k=1, split=2),
    "upcycled 4x top-2": dict(experts=4, top_k=2),
}
MODEL = ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.dtype=float32", "model.bos_token_id=1", "model.eos_token_id=2",
         "model.pad_token_id=3"]
AUX_LOSS_COEF = 0.01
REPLAY = 0.25


def common(data_dir: Path, steps: int, eval_every: int) -> list[str]:
    return [f"data.tokenizer={data_dir / 'tokenizer.model'}", "data.seq_len=128", "data.eval_rows=32",
            "data.shuffle_buffer=2000", "train.batch_size=16", f"train.log_every={steps}", "train.loss_chunk_size=0",
            f"train.steps={steps}", f"eval.every={eval_every}", "eval.dense_every=0", "checkpoint.every_steps=100000",
            "checkpoint.keep_last=1", "mesh={data: -1}"]


def pretrain(out: Path, data_dir: Path, steps: int) -> Path:
    """The dense base, pretrained on 'general' and exported to HF in float32 (reused when finished)."""
    run = out / "base"
    hf = run / "hf" / f"step_{steps}"
    if (hf / "config.json").is_file():
        print(f"base: reusing {hf}", flush=True)
        return hf
    if run.exists():
        shutil.rmtree(run)
    demo._train([f"run_dir={run}", "init.source=scratch", "model.vocab_size=1024", *MODEL,
                 *common(data_dir, steps, steps), demo._sources(data_dir, general_weight=1.0, domain_weight=0.0),
                 "optim.schedule.kind=warmup_cosine", "optim.schedule.peak_lr=3e-3",
                 "optim.schedule.warmup_fraction=0.05", "export.final=true", "export.dtype=float32"])
    return hf


def cpt(run: Path, data_dir: Path, init: Path, steps: int, eval_every: int, moe: bool, seed: int = 0) -> float:
    """One CPT run from the HF directory ``init``; returns its wall seconds."""
    if (run / "summary.json").is_file():
        print(f"{run}: reusing", flush=True)
        return float("nan")
    if run.exists():
        shutil.rmtree(run)
    t0 = time.monotonic()
    demo._train([f"run_dir={run}", "init.source=hf", f"init.path={init}", "model.dtype=float32",
                 *common(data_dir, steps, eval_every), demo._sources(data_dir, REPLAY, 1.0 - REPLAY),
                 "optim.schedule.kind=rewarm", "optim.schedule.peak_lr=3e-3", "optim.schedule.warmup_fraction=0.1",
                 "export.final=false", f"data.seed={seed}",
                 *([f"model.moe.router_aux_loss_coef={AUX_LOSS_COEF}"] if moe else [])])
    return time.monotonic() - t0


def eval_curve(run: Path) -> dict[int, dict[str, float]]:
    """{step: {source: held-out loss}} of a run's evaluations."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            out[record["step"]] = {name: r["loss"] for name, r in record["sources"].items()}
    return out


def at_flops(curve: dict, flops_per_step: float, budget: float) -> dict[str, float] | None:
    """The curve's losses at ``budget`` FLOPs, linear between the evaluations around it (None: beyond the run)."""
    points = sorted((step * flops_per_step, losses) for step, losses in curve.items())
    for (f0, a), (f1, b) in zip(points, points[1:]):
        if f0 <= budget <= f1:
            t = (budget - f0) / (f1 - f0)
            return {name: a[name] + t * (b[name] - a[name]) for name in a}
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/upcycle_compare", help="working directory (default: %(default)s)")
    parser.add_argument("--demo-dir", default="runs/demo", help="where the demo's corpora are (built when missing)")
    parser.add_argument("--pretrain-steps", type=int, default=120)
    parser.add_argument("--steps", type=int, default=40, help="CPT steps of every run (default: %(default)s)")
    parser.add_argument("--evals", type=int, default=4, help="evaluations after step 0 (for the FLOPs comparison)")
    parser.add_argument("--seeds", default="0,1", help="data seeds (batch order): every run is repeated per seed, "
                        "so the spread between seeds shows which differences are noise")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "upcycle_compare.json"))
    args = parser.parse_args()

    from jaxcpt.adapt.upcycle import upcycle
    from jaxcpt.hf.convert import read_hf_config
    from jaxcpt.train.metrics import flops_per_token

    out = Path(args.out)
    load = CpuLoad()
    load.start()
    timings = {}
    t0 = time.monotonic()
    data_dir = demo.prepare_data(Path(args.demo_dir), demo.SCALES["full"], fresh=False)
    base = pretrain(out, data_dir, args.pretrain_steps)
    timings["data_and_base_s"] = time.monotonic() - t0
    eval_every = max(1, args.steps // args.evals)
    tokens_per_step = 16 * 128
    rows = {}
    for name, options in VARIANTS.items():
        slug = name.replace(" ", "_").replace(",", "").replace(".", "")
        init = base
        if options is not None:
            init = out / "hf" / slug
            if not (init / "config.json").is_file():
                upcycle(base, init, seed=0, overwrite=True, **options)
        cfg = read_hf_config(str(init))
        print(f"[{name}] {cfg.family}: {cfg.describe_params()}", flush=True)
        seeds = {}
        for seed in [int(x) for x in args.seeds.split(",")]:
            run = out / "runs" / (slug if seed == 0 else f"{slug}_seed{seed}")
            seconds = cpt(run, data_dir, init, args.steps, eval_every, moe=options is not None, seed=seed)
            seeds[seed] = {"curve": eval_curve(run), "wall_s": seconds}
        rows[name] = {"upcycle": options, "family": cfg.family, "params_total": cfg.num_params(),
                      "params_active": cfg.num_active_params(), "flops_per_token": flops_per_token(cfg, 128),
                      "seeds": seeds}
    timings["total_s"] = time.monotonic() - t0

    dense = rows["dense"]
    budget = args.steps * tokens_per_step * dense["flops_per_token"]  # the dense run's total FLOPs
    for row in rows.values():
        row["flops_vs_dense"] = row["flops_per_token"] / dense["flops_per_token"]
        for one in row["seeds"].values():
            curve = one["curve"]
            one["step0"], one["last"] = curve[0], curve[args.steps]
            one["at_dense_flops"] = at_flops(curve, tokens_per_step * row["flops_per_token"], budget)
        for key in ("step0", "last", "at_dense_flops"):  # mean over seeds, and the seeds' range
            values = [one[key] for one in row["seeds"].values() if one[key] is not None]
            row[key] = {name: sum(v[name] for v in values) / len(values) for name in values[0]} if values else None
            row[key + "_range"] = ({name: [min(v[name] for v in values), max(v[name] for v in values)]
                                    for name in values[0]} if values else None)
        # paired with the dense run of the same data seed (the same batches): the seeds' spread cancels
        row["last_minus_dense"] = {seed: {name: one["last"][name] - dense["seeds"][seed]["last"][name]
                                          for name in one["last"]}
                                   for seed, one in row["seeds"].items() if seed in dense["seeds"]}
    load_info = load.stop()
    trained = [f"{name} seed {seed}" for name, row in rows.items() for seed, one in row["seeds"].items()
               if one["wall_s"] == one["wall_s"]]  # NaN: reused from an earlier invocation

    header = (f"{'run':<30} {'params total/active':>20} {'FLOPs':>6} {'domain':>23} {'general':>23} "
              f"{'at dense FLOPs (dom/gen)':>25}")
    print(f"\n{args.steps} CPT steps x {tokens_per_step} tokens ({int(REPLAY * 100)}% general replay); "
          f"loss: step 0 -> last step, mean over data seeds {args.seeds}")
    print(header)
    for name, row in rows.items():
        equal = row["at_dense_flops"]
        same = abs(row["flops_vs_dense"] - 1) < 0.02
        flops_cell = "(same FLOPs)" if same else (f"{equal['domain']:.3f} / {equal['general']:.3f}" if equal else "-")
        print(f"{name:<30} {row['params_total'] / 1e6:>9.2f}M/{row['params_active'] / 1e6:.2f}M "
              f"{row['flops_vs_dense']:>5.2f}x "
              f"{row['step0']['domain']:>10.3f} -> {row['last']['domain']:<8.3f} "
              f"{row['step0']['general']:>10.3f} -> {row['last']['general']:<8.3f} {flops_cell:>25}")
    print("last loss minus the dense run's, same data seed: " + "; ".join(
        f"{name}: " + ", ".join(f"seed {seed} domain {d['domain']:+.3f} general {d['general']:+.3f}"
                                for seed, d in r["last_minus_dense"].items())
        for name, r in rows.items() if name != "dense"))
    print("seeds' range of the last losses: " + "; ".join(
        f"{name}: domain {r['last_range']['domain'][0]:.3f}..{r['last_range']['domain'][1]:.3f}, general "
        f"{r['last_range']['general'][0]:.3f}..{r['last_range']['general'][1]:.3f}" for name, r in rows.items()))
    result = {"what": "dense vs upcycled (jaxcpt upcycle) continual pretraining on the demo corpora, trained alike",
              "variants": {k: v for k, v in VARIANTS.items()}, "pretrain_steps": args.pretrain_steps,
              "cpt_steps": args.steps, "data_seeds": args.seeds, "tokens_per_step": tokens_per_step, "replay": REPLAY,
              "aux_loss_coef": AUX_LOSS_COEF, "model": MODEL, "rows": rows, "timings_s": timings,
              "machine": machine_info(), "cpu_load": load_info}
    # Runs finished by an earlier invocation are reused, so each invocation's own measurement (CPU load, time,
    # the runs it trained) is kept in a list rather than overwritten
    previous = json.loads(Path(args.json).read_text()).get("invocations", []) if Path(args.json).is_file() else []
    result["invocations"] = previous + [{"trained": trained, "cpu_load": load_info, "timings_s": timings,
                                         "git_commit": result["machine"]["git_commit"]}]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(f"other processes' CPU load: {load_info['other_processes_cores']:.2f} of {load_info['cores']} cores; "
          f"wall {load_info['wall_s']:.0f} s")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
