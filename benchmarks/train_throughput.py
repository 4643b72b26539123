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
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

SHAPES = {
    # hidden, layers, ffn, heads, kv heads, vocab
    "tiny": dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=512),
    "cpu-small": dict(hidden_size=512, num_layers=8, intermediate_size=1536, num_heads=8, num_kv_heads=8, vocab_size=32000),
}
# The public architectures, from their config.json (jaxcpt.aot.architectures)
NAMED_SHAPES = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3.1-8b": "Llama-3.1-8B", "qwen2.5-7b": "Qwen2.5-7B"}


def model_config(shape: str, **numerics):
    from jaxcpt.model.config import ModelConfig

    if shape in NAMED_SHAPES:
        from jaxcpt.aot.architectures import architecture

        return dataclasses.replace(architecture(NAMED_SHAPES[shape]), **numerics)
    return ModelConfig(**SHAPES[shape], **numerics)


def use_cpu_off_accelerators() -> None:
    """Call first in a benchmark's main, before anything imports jax: on a host with no GPU (or TPU)
    attached, ask for the CPU directly, as the jaxcpt commands do; otherwise an installed CUDA plugin
    prints a cuDNN traceback at start-up. JAX_PLATFORMS set by the caller wins; with a GPU attached
    nothing changes."""
    from jaxcpt.cli import _skip_tpu_runtime_off_tpu

    _skip_tpu_runtime_off_tpu()


def add_shape_arguments(parser) -> None:
    """The model shape and batch every CPU benchmark takes: --shape, --seq-len, --batch, --loss-chunk."""
    parser.add_argument("--shape", default="cpu-small", choices=sorted([*SHAPES, *NAMED_SHAPES]))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    from jaxcpt.train.config import LoopConfig

    # the training default (train.loss_chunk_size), so the benchmark measures the step a user's run takes
    parser.add_argument("--loss-chunk", type=int, default=LoopConfig().loss_chunk_size,
                        help="positions per loss chunk (default: train.loss_chunk_size's default, %(default)s)")


class CpuLoad:
    """Busy CPU time of the whole machine and of this benchmark, between start() and stop().

    The benchmark's own time includes its child processes while they still run (worker
    processes, MaxText's loop): getrusage counts children only once they are reaped, so
    without /proc their steps would be booked as other engineers' load.
    """

    @staticmethod
    def _machine_busy() -> float:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _live_descendants() -> float:
        """CPU seconds so far of this process's running descendants (with their reaped children)."""
        parent, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
            except OSError:  # exited meanwhile
                continue
            parent[int(entry)] = int(fields[1])
            cpu[int(entry)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        me, total = os.getpid(), 0
        for pid in cpu:
            ancestor = parent.get(pid)
            while ancestor not in (None, 0, 1, me):
                ancestor = parent.get(ancestor)
            if ancestor == me:
                total += cpu[pid]
        return total / os.sysconf("SC_CLK_TCK")

    @classmethod
    def _own(cls) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime + cls._live_descendants()

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


# The CPU features that decide matmul speed here: AMX (Intel Sapphire Rapids on) is what oneDNN uses for
# PyTorch's bf16; AVX-512 bf16/VNNI are what an AMD EPYC (Zen 4/5) offers instead. Machines of one name differ.
CPU_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it: model, vendor, family/model numbers, the matmul features, a one-line kind."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cpu": platform.processor() or "?", "cpu_kind": platform.processor() or "?"}
    flags = set(fields.get("flags", "").split())
    features = [f for f in CPU_FEATURES if f in flags]
    name = fields.get("model name", "?")
    kind = (f"{name} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}): {'AMX' if 'amx_bf16' in flags else 'no AMX'}, "
            f"{'AVX-512 bf16' if 'avx512_bf16' in flags else 'no AVX-512 bf16'}")
    return {"cpu": name, "cpu_kind": kind, "cpu_vendor": fields.get("vendor_id"), "cpu_family": fields.get("cpu family"),
            "cpu_model": fields.get("model"), "cpu_features": features}


@functools.lru_cache(maxsize=1)  # read once, when the benchmark starts: the code that was measured
def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' when the tree has changes), or None outside git."""
    import subprocess

    root = Path(__file__).parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def machine_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {"host": platform.node(), **cpu_info(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "jax": jax.__version__, "device_kind": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count(), "git_commit": git_commit()}


# ----------------------------------------------------------------------------- jaxcpt
def synthetic_batch(cfg, batch: int, seq_len: int) -> dict:
    """Random tokens as one packed document per row, on the default device."""
    import jax
    import numpy as np

    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(batch, seq_len + 1))
    shape = (batch, seq_len)
    return jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones(shape, np.int32),
                           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
                           "loss_mask": np.ones(shape, np.float32), "source": np.zeros((batch,), np.int32)})


def jax_training(cfg, args, mesh) -> tuple:
    """(state, graphdef, jitted train step) of jaxcpt's own train_step with AdamW, on ``mesh``."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxcpt.model.persist import params_of
    from jaxcpt.model.transformer import init_model
    from jaxcpt.train.state import trainable_view
    from jaxcpt.train.step import train_step

    model = init_model(cfg, mesh)
    graphdef = nnx.split(model)[0]
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    params = params_of(model)
    keys = tuple(".".join(str(getattr(k, "key", k)) for k in path)  # every parameter trains
                 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    state = {"params": params, "opt_state": jax.jit(tx.init)(trainable_view(params, keys)),
             "step": jnp.zeros((), jnp.int32)}
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-4, num_sources=1,
                                        grad_accum_steps=1, chunk_size=args.loss_chunk, z_loss_weight=0.0,
                                        trainable_keys=keys),
                      donate_argnums=0)
    return state, graphdef, step_fn


def build_jax(cfg, args):
    import jax

    from jaxcpt.sharding.mesh import build_mesh

    mesh = build_mesh(json.loads(args.mesh) if args.mesh else None)
    state, _, step_fn = jax_training(cfg, args, mesh)
    batch = synthetic_batch(cfg, args.batch, args.seq_len)
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
def build_torch(cfg, args, compiled: bool) -> tuple:
    """A transformers + PyTorch training step on the same shape: eager, or under torch.compile."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxcpt.hf.families import config_to_hf

    hf = config_to_hf(cfg, "float32")
    hf_config = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items()
                                                          if k not in ("architectures", "model_type", "dtype", "torch_dtype")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device)
    model.train()
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    use_bf16 = cfg.dtype == "bfloat16"  # autocast: bf16 matmuls (AMX on these CPUs, tensor cores on GPUs)
    notes = ["torch.compile" if compiled else "eager"]

    def forward_backward(m):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            logits = m(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        return loss

    run_model = torch.compile(model) if compiled else model

    def step():
        loss = forward_backward(run_model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step, {"device": device, "autocast_bf16": use_bf16, "attention": "sdpa", "notes": notes,
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "gradient_checkpointing": args.remat != "none"}


def peak_memory_jax() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def peak_memory_torch() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def main(argv=None) -> int:
    use_cpu_off_accelerators()  # first: add_shape_arguments reads a config default from jaxcpt, which imports jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on accelerators, f32 on CPU")
    parser.add_argument("--remat", default="none", choices=["none", "minimal", "save_dot_except_mlp", "save_attention",
                                                            "full"], help="model.remat (jaxcpt/model/remat.py)")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--mesh", default=None, help='JSON, e.g. \'{"fsdp": -1}\'; default all devices on data')
    parser.add_argument("--vs-torch", action="store_true", help="also transformers + PyTorch (see --torch-modes)")
    parser.add_argument("--torch-modes", default="eager,compile",
                        help="comma-separated PyTorch runners: eager, compile (torch.compile)")
    parser.add_argument("--vs-maxtext", default=None, metavar="PYTHON",
                        help="also MaxText's own train loop, run by this Python (a venv with maxtext installed)")
    parser.add_argument("--no-loss-memory", action="store_true",
                        help="skip compiling loss + gradient plain vs chunked for their planned memory (a short lease)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 unless JAX's default backend is a GPU")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_throughput_<shape>_<platform>.json)")
    args = parser.parse_args(argv)
    git_commit()
    modes = [m.strip() for m in args.torch_modes.split(",") if m.strip()]
    if any(m not in ("eager", "compile") for m in modes):
        parser.error(f"--torch-modes takes eager and/or compile, got {args.torch_modes!r}")

    import jax

    from jaxcpt.train.metrics import device_peak_flops, flops_per_token

    if args.require_gpu and jax.default_backend() != "gpu":
        print(f"train_throughput.py: --require-gpu, but JAX's backend is {jax.default_backend()} "
              f"({jax.devices()[0].device_kind}); run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = model_config(args.shape, dtype=dtype, remat=args.remat, attention=args.attention,
                       max_position_embeddings=max(4096, args.seq_len))
    tokens_per_step = args.batch * args.seq_len
    flops_step = flops_per_token(cfg, args.seq_len) * tokens_per_step
    peak = device_peak_flops()

    runners = {"jaxcpt": build_jax(cfg, args)[0]}
    info: dict[str, dict] = {"jaxcpt": {"attention": cfg.attention, "loss_chunk": args.loss_chunk,
                                        "xla_flags": os.environ.get("XLA_FLAGS", "")}}
    if args.vs_torch:
        for mode in modes:
            name = f"pytorch-{mode}"
            runners[name], info[name] = build_torch(cfg, args, compiled=mode == "compile")
    failed = {}

    def warm_up(names):
        for _ in range(args.warmup):
            for name in [n for n in names if n in runners]:
                try:
                    runners[name]()
                except Exception as e:  # noqa: BLE001 - one framework failing (e.g. torch.compile) is reported, not fatal
                    failed[name] = f"{type(e).__name__}: {str(e)[:300]}"
                    del runners[name]

    warm_up(list(runners))
    if args.vs_maxtext:  # started once the others are compiled, so no compilation overlaps another
        from maxtext_runner import MaxTextRunner

        maxtext = MaxTextRunner(args.vs_maxtext, cfg, args)
        runners["maxtext"], info["maxtext"] = maxtext.step, maxtext.info
        warm_up(["maxtext"])
    times = {name: [] for name in runners}
    losses = {name: [] for name in runners}
    load = CpuLoad()
    load.start()
    for _ in range(args.steps):
        for name, run in runners.items():  # interleaved: one step of each, in turn
            start = time.perf_counter()
            losses[name].append(run())
            times[name].append(time.perf_counter() - start)
    load_info = load.stop()
    if args.vs_maxtext:
        info["maxtext"].update(maxtext.close())

    results = {}
    for name in runners:
        # MaxText logs a step once the next is dispatched: its intervals pair up, so their mean is its step
        median = (statistics.mean if info[name].get("timing") == "mean" else statistics.median)(times[name])
        entry = {"median_step_s": median, "step_s": times[name], "tokens_per_s": tokens_per_step / median,
                 "spread": (max(times[name]) - min(times[name])) / median, "last_loss": losses[name][-1], **info[name]}
        if peak:
            entry["mfu"] = flops_step / median / (peak * jax.device_count())
        results[name] = entry
    if "jaxcpt" not in results:  # the step itself failed (e.g. out of device memory): say why, write no ratios
        print(f"jaxcpt: failed during warm-up: {failed.get('jaxcpt')}", file=sys.stderr)
        return 1
    results["jaxcpt"]["peak_device_bytes"] = peak_memory_jax()
    for name in results:
        if name.startswith("pytorch"):
            results[name]["peak_device_bytes"] = peak_memory_torch()  # process-wide: every torch runner's state
    memory = {} if args.no_loss_memory else loss_memory(cfg, args)

    report = {"benchmark": "train_throughput", "shape": args.shape, "model": dataclasses.asdict(cfg),
              "params": cfg.num_params(), "seq_len": args.seq_len, "batch": args.batch, "dtype": dtype,
              "tokens_per_step": tokens_per_step, "flops_per_step": flops_step, "peak_flops_per_device": peak,
              "git_commit": git_commit(), "machine": machine_info(), "cpu_load_during_timed_steps": load_info, "results": results,
              "failed": failed, "loss_grad_temp_bytes": memory,
              "flops_convention": "6*(params - input embedding) + 12*L*H*D*T per token (full square attention)"}
    for name in results:
        if name != "jaxcpt":
            report[f"jaxcpt_over_{name}_tokens_per_s"] = results["jaxcpt"]["tokens_per_s"] / results[name]["tokens_per_s"]

    machine = report["machine"]
    device = machine["cpu_kind"] if on_cpu else machine["device_kind"]
    print(f"\n{args.shape}: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch} x seq {args.seq_len}, {dtype}, "
          f"{device} x{jax.device_count()}, commit {machine['git_commit']}")
    print(f"{'':16s} {'step s (median)':>16s} {'spread':>7s} {'tokens/s':>10s} {'jaxcpt/x':>9s} {'MFU':>7s} {'peak mem':>10s}")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        mem = f"{r['peak_device_bytes'] / 2**30:.2f} GiB" if r.get("peak_device_bytes") else "n/a"
        ratio = report.get(f"jaxcpt_over_{name}_tokens_per_s", 1.0)
        print(f"{name:16s} {r['median_step_s']:>16.3f} {r['spread']:>6.0%} {r['tokens_per_s']:>10.0f} {ratio:>9.2f} "
              f"{mfu:>7s} {mem:>10s}")
    for name, why in failed.items():
        print(f"{name}: failed during warm-up, left out: {why}")
    if memory:
        print("loss+grad temporary memory (XLA plan): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items() if v))
    print(f"other processes' CPU load during timed steps: {load_info['other_processes_cores']:.2f} cores of "
          f"{load_info['cores']} (load average {' '.join(load_info['loadavg'])})")

    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput_{args.shape}_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
