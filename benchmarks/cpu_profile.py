"""Where XLA:CPU spends a jaxcpt step: its own profiler's per-thunk times, grouped by what each op is.

    python benchmarks/cpu_profile.py --shape cpu-small --seq-len 512 --batch 4

Traces the jitted loss (forward) and loss + gradients (forward + backward) with
``jax.profiler``, reads the trace back with jaxlib's own reader (no TensorBoard needed), takes
each XLA thunk's exclusive time on XLA's worker threads, and sorts the ops of the optimized HLO
into matmul fusions, other fusions (elementwise, reductions, broadcasts), plain dots and
transposes/copies. Prints each group's share and the slowest non-matmul ops with their shapes.

With ``--vs-torch`` it profiles transformers + PyTorch on the same shape and batch the same
way (``torch.profiler``, forward and forward + backward, eager or ``--torch-mode compile``) and
sorts its ops into the same kinds, so the two columns say where each framework's step goes:

    python benchmarks/cpu_profile.py --shape cpu-small --seq-len 512 --batch 4 --vs-torch

The units differ a little: XLA's figure is thunk time summed over its worker threads, PyTorch's
is each op's self time on the thread that runs it (its intra-op threads inside), so compare the
shares and each side's total against its wall time per call.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import (CpuLoad, add_shape_arguments, git_commit, jax_training, machine_info,  # noqa: E402
                              model_config, synthetic_batch, use_cpu_off_accelerators)

_INSTRUCTION = re.compile(r"%([\w.\-]+) = [^\n]*?\b(fusion|dot|copy|transpose)\([^\n]*")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)


def op_kinds(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (kind, its result shape and op), from the optimized module's text."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
    kinds = {}
    for m in _INSTRUCTION.finditer(hlo):
        name, op, line = m.group(1), m.group(2), m.group(0)
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = bodies.get(called.group(1), "") if called else ""
            kind = "matmul fusion" if " dot(" in body else "other fusion"
        else:
            kind = "dot (outside fusions)" if op == "dot" else "transpose/copy"
        kinds[name] = (kind, line.split(" = ", 1)[1][:80])
    return kinds


def exclusive_thunk_ns(trace_dir: str) -> dict[str, float]:
    """Thunk name -> exclusive nanoseconds on XLA's threads (time inside nested thunks subtracted)."""
    from jax._src.lib import _profile_data

    data = _profile_data.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    out: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name and "PjRtCpu" not in line.name:
                continue
            stack, events = [], []
            for start, duration, name in sorted((e.start_ns, e.duration_ns, e.name) for e in line.events):
                while stack and start >= stack[-1][0] + stack[-1][1]:
                    stack.pop()
                if stack:
                    stack[-1][3] -= duration
                stack.append([start, duration, name, duration])
                events.append(stack[-1])
            for _, _, name, exclusive in events:
                out[name.removeprefix("end: ")] += exclusive
    return out


# PyTorch op names -> the kinds above. Inductor's generated kernels (torch.compile) are fused loops.
_TORCH_KINDS = (
    (re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_mkldnn|mkldnn_)"), "matmul"),
    (re.compile(r"scaled_dot_product|flash_attention|_efficient_attention"), "attention (sdpa)"),
    (re.compile(r"^aten::(copy_|clone|contiguous|_to_copy|to|t|transpose|permute|view|reshape|_unsafe_view|expand|"
                r"as_strided|cat|index_select|embedding)"), "transpose/copy"),
    (re.compile(r"cpp_fused|triton_|graph_|Torch-Compiled|CompiledFunction|inductor"), "compiled (inductor) kernels"),
)


def torch_kind(name: str) -> str:
    for pattern, kind in _TORCH_KINDS:
        if pattern.search(name):
            return kind
    return "other (elementwise, reductions, autograd)"


def torch_profile(cfg, args) -> dict:
    """The same forward and forward+backward in transformers + PyTorch, self time per op kind (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxcpt.hf.families import config_to_hf

    hf = config_to_hf(cfg, "float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items()
                                                  if k not in ("architectures", "model_type", "dtype", "torch_dtype")}),
        attn_implementation="sdpa")
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    run = torch.compile(model) if args.torch_mode == "compile" else model

    def loss():
        logits = run(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def fwdbwd():
        loss().backward()
        model.zero_grad(set_to_none=True)

    report = {}
    for label, fn in (("forward", loss), ("forward+backward", fwdbwd)):
        for _ in range(2):  # compilation (torch.compile) and first-touch allocations stay out of the profile
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            wall = (time.perf_counter() - start) / args.calls
        groups: dict[str, float] = collections.defaultdict(float)
        per_op = []
        for event in prof.key_averages():
            seconds = event.self_cpu_time_total / 1e6 / args.calls
            if seconds > 0:
                groups[torch_kind(event.key)] += seconds
                per_op.append((seconds, event.key))
        report[label] = {"wall_s": wall, "self_s": dict(groups),
                         "slowest_ops": [{"op": n, "s": sec} for sec, n in sorted(per_op, reverse=True)[:6]]}
    return {"mode": args.torch_mode, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "results": report}


def main(argv=None) -> int:
    use_cpu_off_accelerators()  # before add_shape_arguments, whose config default imports jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--vs-torch", action="store_true", help="also profile transformers + PyTorch on the same step")
    parser.add_argument("--torch-mode", default="eager", choices=["eager", "compile"],
                        help="PyTorch eager (one profile row per aten op) or torch.compile (inductor's fused kernels)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_profile.json"))
    args = parser.parse_args(argv)
    git_commit()  # the commit measured, read before the run
    import jax

    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.step import _loss_sums

    cfg = model_config(args.shape, dtype="float32", max_position_embeddings=max(4096, args.seq_len))
    state, graphdef, _ = jax_training(cfg, args, build_mesh({"data": 1}, jax.devices()[:1]))
    params, batch = state["params"], synthetic_batch(cfg, args.batch, args.seq_len)
    loss = functools.partial(_loss_sums, graphdef=graphdef, num_sources=1, chunk_size=args.loss_chunk, z_loss_weight=0.0)
    functions = {"forward": jax.jit(lambda p, b: loss(p, b)[0][0]),
                 "forward+backward": jax.jit(jax.grad(lambda p, b: loss(p, b)[0][0]))}
    report, load = {}, CpuLoad()
    load.start()
    for label, fn in functions.items():
        kinds = op_kinds(fn.lower(params, batch).compile().as_text())
        for _ in range(2):
            jax.block_until_ready(fn(params, batch))
        trace_dir = tempfile.mkdtemp(prefix="jaxcpt-profile-")
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(args.calls):
            jax.block_until_ready(fn(params, batch))
        wall = (time.perf_counter() - start) / args.calls
        jax.profiler.stop_trace()
        groups: dict[str, float] = collections.defaultdict(float)
        per_op = {}
        for name, ns in exclusive_thunk_ns(trace_dir).items():
            if name in kinds:
                groups[kinds[name][0]] += ns / args.calls / 1e9
                per_op[name] = ns / args.calls / 1e9
        slowest = sorted(((s, n) for n, s in per_op.items() if kinds[n][0] != "matmul fusion"), reverse=True)[:6]
        report[label] = {"wall_s": wall, "thread_s": dict(groups),
                         "slowest_non_matmul": [{"op": n, "s": s, "hlo": kinds[n][1]} for s, n in slowest]}
        total = sum(groups.values())
        print(f"\n{label}: {wall:.2f} s per call, {total:.2f} s of XLA thread time")
        for kind, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:24s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
        for s, n in slowest:
            print(f"    {s:6.2f} s  {n:26s} {kinds[n][1]}")
    torch_report = torch_profile(cfg, args) if args.vs_torch else None
    if torch_report:
        for label, entry in torch_report["results"].items():
            total = sum(entry["self_s"].values())
            print(f"\nPyTorch ({torch_report['mode']}) {label}: {entry['wall_s']:.2f} s per call, {total:.2f} s of op "
                  f"self time; jaxcpt {report[label]['wall_s']:.2f} s per call")
            for kind, seconds in sorted(entry["self_s"].items(), key=lambda kv: -kv[1]):
                print(f"  {kind:42s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
            for op in entry["slowest_ops"][:4]:
                print(f"    {op['s']:6.2f} s  {op['op']}")
    load_info = load.stop()
    print(f"other processes' CPU load: {load_info['other_processes_cores']:.2f} cores of {load_info['cores']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "cpu_profile", "shape": args.shape, "batch": args.batch,
                                          "seq_len": args.seq_len, "dtype": "float32", "git_commit": git_commit(), "machine": machine_info(),
                                          "cpu_load": load_info, "results": report, "pytorch": torch_report},
                                         indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
