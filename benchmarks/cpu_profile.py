"""Where XLA:CPU spends a jaxcpt step: its own profiler's per-thunk times, grouped by what each op is.

    python benchmarks/cpu_profile.py --shape cpu-small --seq-len 512 --batch 4

Traces the jitted loss (forward) and loss + gradients (forward + backward) with
``jax.profiler``, reads the trace back with jaxlib's own reader (no TensorBoard needed), takes
each XLA thunk's exclusive time on XLA's worker threads, and sorts the ops of the optimized HLO
into matmul fusions, other fusions (elementwise, reductions, broadcasts), plain dots and
transposes/copies. Prints each group's share and the slowest non-matmul ops with their shapes.
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
from train_throughput import CpuLoad, add_shape_arguments, jax_training, machine_info, model_config, synthetic_batch  # noqa: E402

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_profile.json"))
    args = parser.parse_args(argv)
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
    load_info = load.stop()
    print(f"other processes' CPU load: {load_info['other_processes_cores']:.2f} cores of {load_info['cores']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "cpu_profile", "shape": args.shape, "batch": args.batch,
                                          "seq_len": args.seq_len, "machine": machine_info(), "cpu_load": load_info,
                                          "results": report}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
