"""``jaxcpt expand-depth BASE --out DIR (--every N | --after I,J)``: insert identity-initialised block copies.

    jaxcpt expand-depth /models/Llama-3.2-1B --every 4 --out /models/llama-pro   # 16 -> 20 layers

Each inserted block is a copy of the block before it with its attention output projection
and MLP down projection zeroed (LLaMA-Pro), so DIR computes exactly what BASE computes until
it is trained; ``--init noise`` copies the block and perturbs it instead. DIR is an HF
directory with the new ``num_hidden_layers`` and a ``jaxcpt_adaptation.json`` listing the
inserted layers.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jaxcpt.adapt.depth import DEPTH_INITS
from jaxcpt.errors import UserError


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like 3,7, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="HF model directory, or a jaxcpt run/checkpoint directory")
    parser.add_argument("--out", required=True, help="HF directory to write")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--every", type=int, help="insert a copy after every N-th block (blocks N-1, 2N-1, ...)")
    where.add_argument("--after", type=_indices, help="insert a copy after each of these blocks (0-based), e.g. 3,7")
    parser.add_argument("--init", default="zero", choices=DEPTH_INITS,
                        help="zero: copy with o/down (and their biases) zeroed, the exact identity (default); "
                        "noise: copy plus Gaussian noise of --noise-std times each tensor's std")
    parser.add_argument("--noise-std", type=float, default=0.01, help="relative noise of --init noise (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to ship (default: BASE's own)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    from jaxcpt.adapt import metadata
    from jaxcpt.adapt.depth import expand_layers, expand_pattern, expanded_config, insertion_points
    from jaxcpt.adapt.model_io import check_out, load_source, save_model
    from jaxcpt.model import layer_groups

    check_out(args.out, args.overwrite)
    if args.noise_std < 0:
        raise UserError(f"--noise-std must be >= 0, got {args.noise_std}")
    source = load_source(args.base, args.tokenizer)
    cfg = source.config
    if layer_groups.grouped(cfg):
        raise UserError(f"expand-depth does not support {cfg.family} models whose layers differ in shape (Gemma 4's "
                        "KV-shared layers read the keys of the last earlier layer of their kind, which an inserted copy "
                        "would become, and the per-layer input table holds a slice per layer); continue training "
                        "without adding layers")
    after = insertion_points(cfg.num_layers, every=args.every, after=args.after)
    init = dict(init=args.init, noise_std=args.noise_std, seed=args.seed)
    if cfg.linear_layers:  # a hybrid grows by whole repeats of its layer pattern (jaxcpt.adapt.depth.expand_pattern)
        pattern = cfg.layer_pattern()
        layers, inserted = expand_pattern(source.params["layers"], pattern, after, **init)
        new_cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers + len(inserted),
                                      layer_types=pattern * ((cfg.num_layers + len(inserted)) // len(pattern)))
    else:
        layers, inserted = expand_layers(source.params["layers"], after, **init)
        new_cfg = expanded_config(cfg, after)  # per-layer patterns (layer_types, rope_layers) follow the copies
    out = save_model(new_cfg, {**source.params, "layers": layers}, args.out, dtype=args.dtype or source.dtype,
                     tokenizer_dir=source.tokenizer_dir, overwrite=args.overwrite)
    details = {"method": args.init, **({"noise_std": args.noise_std, "seed": args.seed} if args.init == "noise" else {})}
    record = metadata.record_depth_expansion(
        source.adaptation, source=str(Path(args.base).resolve()), vocab_size=cfg.vocab_size,
        old_num_layers=cfg.num_layers, new_num_layers=new_cfg.num_layers, inserted=inserted, copied_from=after,
        details=details)
    metadata.write_adaptation(out, record)
    print(f"wrote {out}: {cfg.num_layers} -> {new_cfg.num_layers} layers, copies of blocks {after} inserted at "
          f"{inserted} ({args.init})")
    return 0
