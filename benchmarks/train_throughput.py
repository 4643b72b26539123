"""Training throughput of jaxcpt, optionally side by side with transformers + PyTorch on the same shape.

    python benchmarks/train_throughput.py --shape cpu-small --seq-len 512 --batch 4 --vs-torch

Reports the median step time over ``--steps`` timed steps (after ``--warmup`` untimed ones,
which include compilation), tokens/s, MFU where the device's peak is known, peak device
memory, and XLA's planned temporary memory of the loss+gradient with and without chunking.
With ``--vs-torch`` the two frameworks' steps are interleaved (one jaxcpt step, one PyTorch
step, ...) so that a change in machine load hits both alike; the other processes' CPU load
during the timed steps is recorded from /proc.

FLOPs per token: 6 x (parameters excluding the input embedding) + 12 x layers x heads x
head_dim x seq_len (attention scores and values, forward + backward, the full T x T square).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

SHAPES = {
    # hidden, layers, ffn, heads, kv heads, vocab, tied
    "tiny": dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=512),
    "cpu-small": dict(hidden_size=512, num_layers=8, intermediate_size=1536, num_heads=8, num_kv_heads=8, vocab_size=32000),
    "llama-3.2-1b": dict(hidden_size=2048, num_layers=16, intermediate_size=8192, num_heads=32, num_kv_heads=8,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, num_layers=32, intermediate_size=14336, num_heads=32, num_kv_heads=8,
                         vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-7b": dict(hidden_size=3584, num_layers=28, intermediate_size=18944, num_heads=28, num_kv_heads=4,
                       vocab_size=152064, qkv_bias=True, family="qwen2", rope_theta=1000000.0),
}


class CpuLoad:
    """Busy CPU time of the whole machine and of this process, between start() and stop()."""

    @staticmethod
    def _machine_busy() -> float:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime

    def start(self):
        self.t0, self.machine0, self.own0 = time.monotonic(), self._machine_busy(), self._own()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        machine = self._machine_busy() - self.machine0
        own = self._own() - self.own0
        cores = os.cpu_count() or 1
        return {"wall_s": wall, "machine_busy_cores": machine / wall, "this_process_cores": own / wall,
                "other_processes_cores": max(machine - own, 0.0) / wall, "cores": cores,
                "loadavg": open("/proc/loadavg").read().split()[:3]}


def machine_info() -> dict:
    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    device = jax.devices()[0]
    return {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "jax": jax.__version__, "device_kind": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count()}


# ----------------------------------------------------------------------------- jaxcpt
def build_jax(cfg, args):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jaxcpt.model.persist import params_of
    from jaxcpt.model.transformer import init_model
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.step import train_step

    mesh = build_mesh(json.loads(args.mesh) if args.mesh else None)
    model = init_model(cfg, mesh)
    graphdef = nnx.split(model)[0]
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    params = params_of(model)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.zeros((), jnp.int32)}
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, size=(args.batch, args.seq_len + 1))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
             "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), (args.batch, args.seq_len)).copy(),
             "loss_mask": np.ones((args.batch, args.seq_len), np.float32), "source": np.zeros((args.batch,), np.int32)}
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-4, num_sources=1,
                                        grad_accum_steps=1, chunk_size=args.loss_chunk, z_loss_weight=0.0),
                      donate_argnums=0)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
        return float(metrics["loss"])

    return step, mesh


def loss_memory(cfg, args) -> dict:
    """XLA's planned temporary bytes for loss + gradient, plain vs chunked (compiled, not run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxcpt.model.transformer import init_model
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.loss import model_loss

    model = init_model(cfg, build_mesh({"data": 1}, jax.devices()[:1]))
    graphdef, state = nnx.split(model)
    shape = (args.batch, args.seq_len)
    batch = {"inputs": jnp.zeros(shape, jnp.int32), "targets": jnp.zeros(shape, jnp.int32),
             "loss_mask": jnp.ones(shape, jnp.float32)}
    out = {}
    for label, chunk in (("plain", 0), (f"chunked_{args.loss_chunk}", args.loss_chunk)):
        fn = jax.jit(jax.grad(lambda s, b, c=chunk: model_loss(nnx.merge(graphdef, s), b, chunk_size=c)[0]))
        analysis = fn.lower(state, batch).compile().memory_analysis()
        out[label] = int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else None
    return out


# ----------------------------------------------------------------------------- PyTorch
def build_torch(cfg, args) -> tuple:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxcpt.hf.families import config_to_hf

    hf = config_to_hf(cfg, "float32")
    hf_config = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items()
                                                          if k not in ("architectures", "model_type", "dtype", "torch_dtype")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    use_bf16 = device == "cuda" and cfg.dtype == "bfloat16"
    notes = []

    def forward_backward(m):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            logits = m(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        return loss

    compiled = model
    if args.torch_compile:
        try:
            compiled = torch.compile(model)
            forward_backward(compiled)
            model.zero_grad(set_to_none=True)
            notes.append("torch.compile")
        except Exception as e:  # noqa: BLE001 - report and fall back, as the issue asks
            compiled = model
            notes.append(f"torch.compile failed, eager: {type(e).__name__}")
    else:
        notes.append("eager (torch.compile off)")

    def step():
        loss = forward_backward(compiled)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step, {"device": device, "autocast_bf16": use_bf16, "attention": "sdpa", "notes": notes,
                  "threads": torch.get_num_threads(), "torch": torch.__version__}


def peak_memory_jax() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def peak_memory_torch() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on accelerators, f32 on CPU")
    parser.add_argument("--remat", default="none", choices=["none", "minimal", "full"])
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--loss-chunk", type=int, default=128)
    parser.add_argument("--mesh", default=None, help='JSON, e.g. \'{"fsdp": -1}\'; default all devices on data')
    parser.add_argument("--vs-torch", action="store_true")
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_throughput_<shape>_<platform>.json)")
    args = parser.parse_args(argv)

    import jax

    from jaxcpt.model.config import ModelConfig
    from jaxcpt.train.metrics import device_peak_flops, flops_per_token

    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = ModelConfig(**SHAPES[args.shape], dtype=dtype, remat=args.remat, attention=args.attention,
                      max_position_embeddings=max(4096, args.seq_len))
    tokens_per_step = args.batch * args.seq_len
    flops_step = flops_per_token(cfg, args.seq_len) * tokens_per_step
    peak = device_peak_flops()

    runners = {"jaxcpt": build_jax(cfg, args)[0]}
    torch_info = None
    if args.vs_torch:
        runners["pytorch"], torch_info = build_torch(cfg, args)
    for _ in range(args.warmup):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    losses = {name: [] for name in runners}
    load = CpuLoad()
    load.start()
    for _ in range(args.steps):
        for name, run in runners.items():  # interleaved
            start = time.perf_counter()
            losses[name].append(run())
            times[name].append(time.perf_counter() - start)
    load_info = load.stop()

    results = {}
    for name in runners:
        median = statistics.median(times[name])
        entry = {"median_step_s": median, "step_s": times[name], "tokens_per_s": tokens_per_step / median,
                 "last_loss": losses[name][-1]}
        if peak:
            entry["mfu"] = flops_step / median / (peak * jax.device_count())
        results[name] = entry
    results["jaxcpt"]["peak_device_bytes"] = peak_memory_jax()
    if args.vs_torch:
        results["pytorch"]["peak_device_bytes"] = peak_memory_torch()
        results["pytorch"].update(torch_info)
    memory = loss_memory(cfg, args)

    report = {"benchmark": "train_throughput", "shape": args.shape, "model": dataclasses.asdict(cfg),
              "params": cfg.num_params(), "seq_len": args.seq_len, "batch": args.batch, "dtype": dtype,
              "tokens_per_step": tokens_per_step, "flops_per_step": flops_step, "peak_flops_per_device": peak,
              "machine": machine_info(), "cpu_load_during_timed_steps": load_info, "results": results,
              "loss_grad_temp_bytes": memory,
              "flops_convention": "6*(params - input embedding) + 12*L*H*D*T per token (full square attention)"}
    if args.vs_torch:
        report["jaxcpt_over_pytorch_tokens_per_s"] = results["jaxcpt"]["tokens_per_s"] / results["pytorch"]["tokens_per_s"]

    print(f"\n{args.shape}: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch} x seq {args.seq_len}, {dtype}, "
          f"{machine_info()['device_kind']} x{jax.device_count()}")
    print(f"{'':10s} {'step s (median)':>16s} {'tokens/s':>10s} {'MFU':>7s} {'peak mem':>10s}")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        mem = f"{r['peak_device_bytes'] / 2**30:.2f} GiB" if r.get("peak_device_bytes") else "n/a"
        print(f"{name:10s} {r['median_step_s']:>16.3f} {r['tokens_per_s']:>10.0f} {mfu:>7s} {mem:>10s}")
    if args.vs_torch:
        print(f"jaxcpt / pytorch tokens/s: {report['jaxcpt_over_pytorch_tokens_per_s']:.2f}  ({', '.join(torch_info['notes'])})")
    print("loss+grad temporary memory (XLA plan): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items() if v))
    print(f"other processes' CPU load during timed steps: {load_info['other_processes_cores']:.2f} cores of {load_info['cores']}")

    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput_{args.shape}_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
