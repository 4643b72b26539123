"""cuDNN attention on an NVIDIA GPU: the memory its packed layout plans by document slots, and results equal
to XLA's attention (the check issue 21 item 6 asks for), as one short script for a GPU lease.

    python benchmarks/gpu_attention.py [--out DIR] [--parts attention,memory,losses] [--small]

- ``attention``: one attention call at the benchmark's shape (2 rows x 4096 tokens, 32 query and 8 KV heads
  of 64), rows of packed documents with padding, forward and gradients of q, k, v. cuDNN in its packed layout
  (slots for every document), cuDNN past its slots (the masked form a batch takes when a row has more
  documents than ``model.cudnn_documents_per_row``) and XLA's attention, all in bf16, each against the
  float32 reference (the einsum oracle), with and without a sliding window. Equal means: cuDNN's error
  against the float32 reference is within twice XLA's bf16 error.
- ``memory``: jaxcpt's train step for the Llama-3.2-1B shape (bf16, 2 x 4096 tokens, remat minimal) compiled
  on the GPU, XLA's temporaries by attention kernel and cuDNN document slots (4096 slots is what every
  release before model.cudnn_documents_per_row planned).
- ``losses``: three AdamW steps of that model on one packed batch under xla, cudnn and cudnn past its slots,
  from the same initial weights: the loss at each step.

Each part writes its result into ``DIR/gpu_attention.json`` as it finishes (a lease that ends early keeps
what was measured). Off a GPU only the non-cuDNN rows run (``--small`` shrinks the shapes), which is how the
script is checked on a CPU host before a lease.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def packed_segment_ids(rows: int, length: int, documents: tuple[int, ...], seed: int = 0):
    """[rows, length] int32: row r holds ``documents[r]`` documents of random lengths, then 5% padding (id 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.zeros((rows, length), np.int32)
    used = int(length * 0.95)
    for r, n in enumerate(documents):
        cuts = np.sort(rng.choice(np.arange(1, used), size=n - 1, replace=False)) if n > 1 else np.array([], int)
        bounds = [0, *cuts.tolist(), used]
        for d in range(n):
            out[r, bounds[d]:bounds[d + 1]] = d + 1
    return out


def attention_part(on_gpu: bool, small: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcpt.model.attention import attention_cudnn, attention_reference, attention_xla

    b, t, h, kv, d = (2, 512, 4, 2, 64) if small else (2, 4096, 32, 8, 64)
    many = 40  # documents in the first row: within 64 slots, past 8
    seg = jnp.asarray(packed_segment_ids(b, t, (many, 1)))
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, kv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, kv, d), jnp.float32)
    cotangent = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
    real = (np.asarray(seg) != 0)[:, :, None, None]  # padding rows' outputs are not compared (the loss masks them)

    def run(fn, dtype, window):
        def value(q, k, v):
            out = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, window)
            return (out.astype(jnp.float32) * cotangent * real).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    kernels = {"xla bf16": (attention_xla, jnp.bfloat16)}
    if on_gpu:
        kernels["cudnn bf16, 64 slots (packed)"] = (lambda *a: attention_cudnn(*a, documents_per_row=64), jnp.bfloat16)
        kernels["cudnn bf16, 8 slots (masked form)"] = (lambda *a: attention_cudnn(*a, documents_per_row=8), jnp.bfloat16)
    rows = []
    for window in (None, 512 if not small else 128):
        truth = run(attention_reference, jnp.float32, window)
        for name, (fn, dtype) in kernels.items():
            start = time.perf_counter()
            got = run(fn, dtype, window)
            errors = {}  # over real tokens; dK and dV over the padding too (their true gradient there is 0)
            for label, g, w in zip(("out", "dq", "dk", "dv"), got, truth):
                mask = np.broadcast_to(real, g.shape)
                scale = np.abs(w[mask]).max()
                errors[label] = float(np.abs(g - w)[mask].max() / scale)
                if label in ("dk", "dv"):
                    errors[f"{label}_padding"] = float(np.abs(g - w)[~mask].max() / scale)
            rows.append({"kernel": name, "sliding_window": window, "max_error_over_max_value": errors,
                         "seconds": round(time.perf_counter() - start, 2)})
            print(f"  {name:34s} window {window!s:>5s}: " + ", ".join(f"{k} {e:.2e}" for k, e in errors.items()))
    verdicts = []
    for window in {r["sliding_window"] for r in rows}:
        xla = next(r for r in rows if r["kernel"] == "xla bf16" and r["sliding_window"] == window)
        for r in rows:
            if r["kernel"].startswith("cudnn") and r["sliding_window"] == window:
                ok = all(r["max_error_over_max_value"][k] <= 2 * max(xla["max_error_over_max_value"][k], 1e-3)
                         for k in r["max_error_over_max_value"]) and all(
                    np.isfinite(e) for e in r["max_error_over_max_value"].values())
                verdicts.append({"kernel": r["kernel"], "sliding_window": window, "equal_to_xla_within_bf16": ok})
    return {"shape": {"batch": b, "seq_len": t, "heads": h, "kv_heads": kv, "head_dim": d,
                      "documents_per_row": [many, 1], "padding": "5% of each row at its end"},
            "truth": "attention_reference in float32", "rows": rows, "verdicts": verdicts}


def model_config(args, attention: str, slots: int):
    from train_throughput import model_config as shape_config

    cfg = shape_config("tiny" if args.small else "llama-3.2-1b", dtype="bfloat16", remat="minimal", attention=attention,
                       max_position_embeddings=4096)
    return dataclasses.replace(cfg, cudnn_documents_per_row=slots)


def step_inputs(args, cfg):
    """(state, jitted step, packed batch) for jaxcpt's train step with AdamW (train_throughput.jax_training)."""
    import jax
    import numpy as np

    from jaxcpt.sharding.mesh import build_mesh
    from train_throughput import jax_training

    seq = 256 if args.small else 4096
    mesh = build_mesh({"data": 1}, jax.devices()[:1])
    state, _, step_fn = jax_training(cfg, argparse.Namespace(loss_chunk=min(1024, seq)), mesh)
    segment_ids = packed_segment_ids(2, seq, (40, 3), seed=1)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, seq + 1))
    starts = np.concatenate([np.ones((2, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    positions = np.zeros_like(segment_ids)
    for r in range(2):
        pos = 0
        for i in range(seq):
            pos = 0 if starts[r, i] else pos + 1
            positions[r, i] = pos
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
                            "positions": positions, "loss_mask": (segment_ids != 0).astype(np.float32),
                            "source": np.zeros((2,), np.int32)})
    return state, step_fn, batch


def memory_part(args, on_gpu: bool) -> list[dict]:
    import jax

    specs = [("xla", 64)] + ([("cudnn", 4096), ("cudnn", 64)] if on_gpu else [])
    rows = []
    for attention, slots in specs:
        cfg = model_config(args, attention, slots)
        state, step_fn, batch = step_inputs(args, cfg)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        analysis = compiled.memory_analysis()
        text = compiled.as_text()
        row = {"attention": attention, "cudnn_documents_per_row": slots if attention == "cudnn" else None,
               "temp_gib": analysis.temp_size_in_bytes / 2**30, "arg_gib": analysis.argument_size_in_bytes / 2**30,
               "cudnn_fmha_calls": text.count("__cudnn$fmha"), "conditionals": text.count(" conditional("),
               "compile_s": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"  {attention:5s} slots {slots:>5d}: temporaries {row['temp_gib']:.2f} GiB, arguments "
              f"{row['arg_gib']:.2f} GiB, {row['cudnn_fmha_calls']} cuDNN calls ({row['compile_s']} s)")
        del state, compiled
        jax.clear_caches()
    return rows


def losses_part(args, on_gpu: bool) -> dict:
    import jax

    specs = [("xla", 64)] + ([("cudnn", 64), ("cudnn", 8)] if on_gpu else [])
    runs = {}
    for attention, slots in specs:
        cfg = model_config(args, attention, slots)
        state, step_fn, batch = step_inputs(args, cfg)  # init_model is seeded: the same weights for each kernel
        losses = []
        for _ in range(3):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        name = attention if attention == "xla" else f"cudnn, {slots} slots"
        runs[name] = losses
        print(f"  {name:16s} losses " + " ".join(f"{x:.6f}" for x in losses))
        del state
        jax.clear_caches()
    base = runs["xla"]
    relative = {name: max(abs(a - b) / abs(b) for a, b in zip(losses, base)) for name, losses in runs.items()}
    return {"batch": "2 rows x 4096 tokens: 40 and 3 packed documents, 5% padding", "steps": runs,
            "max_relative_difference_from_xla": relative}


def main(argv=None) -> int:
    from train_throughput import use_cpu_off_accelerators

    use_cpu_off_accelerators()  # before jax is imported
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="attention,memory,losses")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"attention", "memory", "losses"}
    if unknown:
        parser.error(f"--parts takes attention, memory and losses, got {sorted(unknown)}")

    import jax

    from train_throughput import git_commit, machine_info

    on_gpu = jax.default_backend() == "gpu"
    out = Path(args.out) / ("gpu_attention.json" if on_gpu else "gpu_attention_cpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "gpu_attention", "git_commit": git_commit(), "machine": machine_info(), "small": args.small}
    if on_gpu:
        report["plugin"] = jax.devices()[0].client.platform_version
    for part in parts:
        print(f"{part}:")
        start = time.perf_counter()
        if part == "attention":
            report["attention"] = attention_part(on_gpu, args.small)
        elif part == "memory":
            report["memory"] = memory_part(args, on_gpu)
        else:
            report["losses"] = losses_part(args, on_gpu)
        report.setdefault("seconds", {})[part] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
