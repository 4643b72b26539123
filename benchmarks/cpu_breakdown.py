"""Where a CPU training step's time goes: forward, backward and optimizer, jaxcpt (XLA:CPU) vs PyTorch.

    python benchmarks/cpu_breakdown.py --shape cpu-small --seq-len 512 --batch 4 --rounds 6

Each variant (a framework, a dtype, XLA flags) runs in its own worker process, built and
compiled once, which then runs one phase on request and waits otherwise. The main process
asks the workers in turn, round after round, so every variant's phases fall in the same
minutes of machine load; it records the other processes' CPU load and prints medians.
Phases: ``fwd`` (the loss), ``fwdbwd`` (loss and gradients), ``step`` (a whole train step
with AdamW). backward = fwdbwd - fwd, optimizer = step - fwdbwd. Each phase's wall time and
the worker's CPU time are recorded: on a shared machine the CPU time is the steadier one.

The variants ask: is XLA:CPU's backward slower than PyTorch's relative to its forward;
does bf16 help on CPUs with AMX (PyTorch's oneDNN uses it, XLA:CPU does not); do XLA:CPU's
thread settings matter (one Eigen thread instead of the pool); do the attention path
(jax.nn.dot_product_attention instead of the einsum reference) or a larger loss chunk help.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import (CpuLoad, add_shape_arguments, git_commit, jax_training, machine_info,  # noqa: E402
                              model_config, synthetic_batch, use_cpu_off_accelerators)

# name -> (framework, dtype, extra XLA flags, model/loss overrides)
VARIANTS = {
    "jaxcpt-f32": ("jax", "float32", "", {}),
    "jaxcpt-f32-1thread-eigen": ("jax", "float32", "--xla_cpu_multi_thread_eigen=false", {}),
    "jaxcpt-f32-attention-xla": ("jax", "float32", "", {"attention": "xla"}),
    "jaxcpt-f32-loss-chunk-512": ("jax", "float32", "", {"loss_chunk": 512}),
    "jaxcpt-bf16": ("jax", "bfloat16", "", {}),
    "pytorch-f32": ("torch", "float32", "", {}),
    "pytorch-bf16": ("torch", "bfloat16", "", {}),
}
PHASES = ("fwd", "fwdbwd", "step")


def jax_phases(cfg, args) -> dict:
    import functools

    import jax

    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.step import _loss_sums

    state, graphdef, step = jax_training(cfg, args, build_mesh({"data": 1}, jax.devices()[:1]))
    batch = synthetic_batch(cfg, args.batch, args.seq_len)
    loss = functools.partial(_loss_sums, graphdef=graphdef, num_sources=1, chunk_size=args.loss_chunk, z_loss_weight=0.0)
    fwd = jax.jit(lambda p, b: loss(p, b)[0][0])
    fwdbwd = jax.jit(jax.grad(lambda p, b: loss(p, b)[0][0]))
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return {"fwd": lambda: jax.block_until_ready(fwd(holder["state"]["params"], batch)),
            "fwdbwd": lambda: jax.block_until_ready(fwdbwd(holder["state"]["params"], batch)),
            "step": run_step}


def torch_phases(cfg, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from jaxcpt.hf.families import config_to_hf

    hf = config_to_hf(cfg, "float32")
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "dtype", "torch_dtype")}),
        attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logits = model(input_ids=inputs).logits
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def fwd():
        loss()  # with autograd recording, as in training

    def fwdbwd():
        loss().backward()
        model.zero_grad(set_to_none=True)

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"fwd": fwd, "fwdbwd": fwdbwd, "step": step}


def worker(args) -> int:
    framework, dtype, _, overrides = VARIANTS[args.worker]
    args.loss_chunk = overrides.get("loss_chunk", args.loss_chunk)
    cfg = model_config(args.shape, dtype=dtype, attention=overrides.get("attention", "auto"),
                       max_position_embeddings=max(4096, args.seq_len))
    phases = (jax_phases if framework == "jax" else torch_phases)(cfg, args)
    for run in phases.values():  # compile and warm up
        run()
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        start, cpu_start = time.perf_counter(), time.process_time()
        phases[line.strip()]()
        print(f"{time.perf_counter() - start:.6f} {time.process_time() - cpu_start:.6f}", flush=True)
    return 0


def main(argv=None) -> int:
    use_cpu_off_accelerators()  # before add_shape_arguments, whose config default imports jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH",
                        help="also time jaxcpt-f32 with the jaxcpt package found under PATH (a changed copy), as NAME")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_breakdown.json"))
    args = parser.parse_args(argv)
    git_commit()  # the commit measured, read before the run
    if args.worker:
        return worker(args)

    checkouts = dict(item.split("=", 1) for item in args.checkout)
    for name in checkouts:
        VARIANTS[name] = VARIANTS["jaxcpt-f32"]
    names = [v.strip() for v in args.variants.split(",") if v.strip()] + list(checkouts)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    workers = {}
    for name in names:  # one at a time: compilation of one does not slow another's
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANTS[name][2]).strip()
        if name in checkouts:
            env["PYTHONPATH"] = checkouts[name] + os.pathsep + env.get("PYTHONPATH", "")
        worker_name = "jaxcpt-f32" if name in checkouts else name
        cmd = [sys.executable, __file__, "--worker", worker_name, "--shape", args.shape, "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--loss-chunk", str(args.loss_chunk)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker {name} failed to start (exit {proc.wait()})")
        workers[name] = proc
        print(f"{name}: ready", flush=True)
    times = {name: {phase: [] for phase in PHASES} for name in workers}
    cpu_times = {name: {phase: [] for phase in PHASES} for name in workers}
    load = CpuLoad()
    load.start()
    for round_index in range(args.rounds):
        for name, proc in workers.items():
            for phase in PHASES:
                proc.stdin.write(phase + "\n")
                proc.stdin.flush()
                wall, cpu = proc.stdout.readline().split()
                times[name][phase].append(float(wall))
                cpu_times[name][phase].append(float(cpu))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    load_info = load.stop()
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()

    rows = {}
    for name, phases in times.items():
        med = {phase: statistics.median(values) for phase, values in phases.items()}
        cpu = {phase: statistics.median(values) for phase, values in cpu_times[name].items()}
        rows[name] = {**{f"{p}_s": med[p] for p in PHASES}, "backward_s": med["fwdbwd"] - med["fwd"],
                      "optimizer_s": med["step"] - med["fwdbwd"], "backward_over_forward": (med["fwdbwd"] - med["fwd"]) / med["fwd"],
                      **{f"{p}_cpu_s": cpu[p] for p in PHASES}, "backward_cpu_s": cpu["fwdbwd"] - cpu["fwd"],
                      "samples_s": phases, "samples_cpu_s": cpu_times[name]}
    print(f"\n{args.shape}, batch {args.batch} x seq {args.seq_len}; medians of {args.rounds} interleaved rounds")
    print("wall-clock seconds (CPU seconds of the worker process, less sensitive to other load)")
    print(f"{'variant':26s} {'fwd s':>14s} {'bwd s':>14s} {'opt s':>8s} {'step s':>14s} {'bwd/fwd':>8s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['fwd_s']:6.2f} ({r['fwd_cpu_s']:5.2f}) {r['backward_s']:6.2f} ({r['backward_cpu_s']:5.2f}) "
              f"{r['optimizer_s']:8.2f} {r['step_s']:6.2f} ({r['step_cpu_s']:5.2f}) {r['backward_over_forward']:8.2f}")
    print(f"other processes' CPU load: {load_info['other_processes_cores']:.2f} cores of {load_info['cores']} "
          f"(load average {' '.join(load_info['loadavg'])})")
    report = {"benchmark": "cpu_breakdown", "shape": args.shape, "seq_len": args.seq_len, "batch": args.batch,
              "loss_chunk": args.loss_chunk, "rounds": args.rounds, "variants": {n: VARIANTS[n] for n in workers},
              "git_commit": git_commit(), "machine": machine_info(), "cpu_load": load_info, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
