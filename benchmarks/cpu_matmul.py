"""The matmuls of a CPU training step, one at a time: XLA:CPU vs PyTorch on the same shapes and layouts.

    python benchmarks/cpu_matmul.py --shape cpu-small --seq-len 512 --batch 4

A Llama step's time is mostly its projections; the backward adds two products per forward
one: the input gradient dY @ W^T and the weight gradient X^T @ dY, which contracts over the
tokens. Each is timed as jax.lax.dot_general with the dimension numbers autodiff emits (so
XLA picks its own layout, as in the step) and as torch.matmul on transposed views, in float32
and bfloat16, interleaved, medians of --repeats; GFLOP/s = 2 M N K / time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import CpuLoad, add_shape_arguments, machine_info, model_config, use_cpu_off_accelerators  # noqa: E402


def products(cfg, tokens: int, chunk_tokens: int) -> dict[str, tuple[int, int, int, str]]:
    """name -> (M, K, N, kind): kind 'nn' = X[M,K] @ W[K,N], 'nt' = dY[M,K] @ W[N,K]^T, 'tn' = X[K,M]^T @ dY[K,N]."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    return {
        "mlp up, forward      x @ W": (tokens, e, f, "nn"),
        "mlp up, input grad   dY @ W^T": (tokens, f, e, "nt"),
        "mlp up, weight grad  X^T @ dY": (e, tokens, f, "tn"),
        "lm head, forward     x @ W": (chunk_tokens, e, v, "nn"),
        "lm head, input grad  dY @ W^T": (chunk_tokens, v, e, "nt"),
        "lm head, weight grad X^T @ dY": (e, chunk_tokens, v, "tn"),
    }


def jax_product(m, k, n, kind, dtype):
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    shapes = {"nn": ((m, k), (k, n), (((1,), (0,)), ((), ()))),
              "nt": ((m, k), (n, k), (((1,), (1,)), ((), ()))),
              "tn": ((k, m), (k, n), (((0,), (0,)), ((), ())))}[kind]
    a = jax.random.normal(key, shapes[0], dtype)
    b = jax.random.normal(key, shapes[1], dtype)
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, shapes[2], preferred_element_type=jnp.float32))
    jax.block_until_ready(fn(a, b))
    return lambda: jax.block_until_ready(fn(a, b))


def torch_product(m, k, n, kind, dtype):
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if kind == "nn":
        a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        return lambda: torch.matmul(a, b)
    if kind == "nt":
        a, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
        return lambda: torch.matmul(a, w.t())
    x, dy = torch.randn(k, m, dtype=dt), torch.randn(k, n, dtype=dt)
    return lambda: torch.matmul(x.t(), dy)


def main(argv=None) -> int:
    use_cpu_off_accelerators()  # before add_shape_arguments, whose config default imports jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_matmul.json"))
    args = parser.parse_args(argv)
    import jax
    import torch

    cfg = model_config(args.shape)
    runs = {}
    for name, (m, k, n, kind) in products(cfg, args.batch * args.seq_len, args.batch * args.loss_chunk).items():
        for dtype in ("float32", "bfloat16"):
            runs[(name, dtype, "xla")] = (jax_product(m, k, n, kind, dtype), 2 * m * n * k)
            runs[(name, dtype, "torch")] = (torch_product(m, k, n, kind, dtype), 2 * m * n * k)
    times = {key: [] for key in runs}
    load = CpuLoad()
    load.start()
    for _ in range(args.repeats):
        for key, (fn, _) in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    load_info = load.stop()
    rows = {f"{name} | {dtype} | {lib}": {"median_s": statistics.median(t), "gflops": runs[(name, dtype, lib)][1] /
                                          statistics.median(t) / 1e9} for (name, dtype, lib), t in times.items()}
    print(f"{'product':32s} {'dtype':9s} {'XLA GFLOP/s':>12s} {'torch GFLOP/s':>14s} {'XLA/torch':>10s}")
    for name in products(cfg, 1, 1):
        for dtype in ("float32", "bfloat16"):
            x, t = rows[f"{name} | {dtype} | xla"]["gflops"], rows[f"{name} | {dtype} | torch"]["gflops"]
            print(f"{name:32s} {dtype:9s} {x:12.1f} {t:14.1f} {x / t:10.2f}")
    print(f"other processes' CPU load: {load_info['other_processes_cores']:.2f} cores of {load_info['cores']} "
          f"(load average {' '.join(load_info['loadavg'])}); torch threads {torch.get_num_threads()}, jax {jax.__version__}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "cpu_matmul", "shape": args.shape, "tokens": args.batch * args.seq_len,
                                          "machine": machine_info(), "cpu_load": load_info, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
