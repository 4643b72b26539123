"""``jaxcpt export-hf CKPT --out HF_DIR``: a jaxcpt checkpoint as an HF directory transformers loads.

CKPT is a run directory, its ``checkpoints`` directory (latest step) or one step
(``RUN/checkpoints/1200``). Multi-host safe: run it on every host; only process 0 writes.

A LoRA checkpoint (``model.lora``) exports ``--lora merged`` (default: adapters folded into their
projections, a plain HF directory), ``adapter`` (a PEFT directory; ``--base`` names the HF
directory it applies to, by default the run's ``init.path`` when it started from one) or
``base`` (the model without its adapters, for a base to give the adapter).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="run dir, RUN/checkpoints (latest) or RUN/checkpoints/STEP")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory to include (default: the run's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (the old export is removed only once the new one is complete)")
    parser.add_argument("--mesh", default=None, help="mesh as YAML, e.g. '{fsdp: -1}' (default: all devices on data)")
    parser.add_argument("--lora", default="merged", choices=["merged", "adapter", "base"],
                        help="a LoRA checkpoint as: merged (adapters folded in), adapter (PEFT directory) or base "
                             "(without adapters)")
    parser.add_argument("--base", default=None,
                        help="with --lora adapter: the HF directory the adapter applies to, written into "
                             "adapter_config.json (default: the run's init.path when it started from an HF directory)")


def run(args) -> int:
    import yaml

    from jaxcpt.errors import UserError
    from jaxcpt.hf.convert import save_hf
    from jaxcpt.model.persist import base_model, load_model
    from jaxcpt.sharding.distributed import DistributedConfig, initialize_distributed
    from jaxcpt.sharding.mesh import build_mesh

    initialize_distributed(DistributedConfig())  # auto: joins the other hosts of a pod / SLURM job
    base = _adapter_base(args) if args.lora == "adapter" else None  # checked before any weights are read
    model = load_model(args.checkpoint, mesh=build_mesh(yaml.safe_load(args.mesh) if args.mesh else None))
    if model.config.lora is None and args.lora != "merged":
        raise UserError(f"--lora {args.lora}: '{args.checkpoint}' has no LoRA adapters (its model.lora is null)")
    if args.lora == "adapter":
        from jaxcpt.hf.peft_export import save_peft_adapter

        out = save_peft_adapter(model, args.out, base_model_name_or_path=base,
                                trained=_trained_non_adapters(args.checkpoint), dtype=args.dtype,
                                overwrite=args.overwrite, tokenizer_dir=args.tokenizer)
    else:
        model = base_model(model) if args.lora == "base" else model  # save_hf folds the adapters of a merged one
        out = save_hf(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      tokenizer_dir=args.tokenizer, overwrite=args.overwrite)
    if out is not None:
        print(f"wrote {out} ({args.dtype})")
    return 0


def _checkpoint_meta(checkpoint: str) -> dict:
    from jaxcpt.checkpoint import read_meta, resolve_step_dir
    from jaxcpt.model.persist import resolve_run_checkpoints

    return read_meta(resolve_step_dir(resolve_run_checkpoints(checkpoint)))


def _adapter_base(args) -> str:
    """--base, else the run's init.path when it started from an HF directory; it must hold config.json."""
    import os

    from jaxcpt.errors import UserError

    base = args.base
    if base is None:
        init = (_checkpoint_meta(args.checkpoint).get("run_config") or {}).get("init") or {}
        if init.get("source") != "hf" or not init.get("path"):
            raise UserError(f"'{args.checkpoint}' did not start from an HF directory, so its adapter's base is not on "
                            f"disk: write it with 'jaxcpt export-hf {args.checkpoint} --lora base --out BASE' and pass "
                            "--base BASE")
        base = init["path"]
    if "://" in base:
        return base
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise UserError(f"the adapter's base '{base}' is not an HF directory (no config.json); pass --base, or write "
                        f"one with: jaxcpt export-hf {args.checkpoint} --lora base --out BASE")
    return os.path.abspath(base)


def _trained_non_adapters(checkpoint: str) -> tuple[str, ...]:
    """Parameters besides the adapters that the run trained (peft's modules_to_save)."""
    from jaxcpt.model.lora import is_adapter

    return tuple(k for k in _checkpoint_meta(checkpoint).get("trainable_keys") or [] if not is_adapter(k))
