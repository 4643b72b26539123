"""``jaxcpt export-hf CKPT --out HF_DIR``: a jaxcpt checkpoint as an HF directory transformers loads.

CKPT is a run directory, its ``checkpoints`` directory (latest step) or one step
(``RUN/checkpoints/1200``). Multi-host safe: run it on every host; only process 0 writes.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="run dir, RUN/checkpoints (latest) or RUN/checkpoints/STEP")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory to include (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--mesh", default=None, help="mesh as YAML, e.g. '{fsdp: -1}' (default: all devices on data)")


def run(args) -> int:
    import yaml

    from jaxcpt.sharding.distributed import DistributedConfig, initialize_distributed

    from jaxcpt.hf.convert import save_hf
    from jaxcpt.model.persist import load_model
    from jaxcpt.sharding.mesh import build_mesh

    initialize_distributed(DistributedConfig())  # auto: joins the other hosts of a pod / SLURM job
    model = load_model(args.checkpoint, mesh=build_mesh(yaml.safe_load(args.mesh) if args.mesh else None))
    out = save_hf(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  tokenizer_dir=args.tokenizer, overwrite=args.overwrite)
    if out is not None:
        print(f"wrote {out} ({args.dtype})")
    return 0
