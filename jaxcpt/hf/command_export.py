"""``jaxcpt export-hf CKPT --out HF_DIR``: a jaxcpt checkpoint as an HF directory transformers loads.

CKPT is a run directory, its ``checkpoints`` directory (latest step) or one step
(``RUN/checkpoints/1200``). Multi-host safe: run it on every host; only process 0 writes.

A LoRA checkpoint (``model.lora``) exports ``--lora merged`` (default: adapters folded into their
projections, a plain HF directory), ``adapter`` (a PEFT directory; ``--base`` names the HF
directory it applies to, by default the one rule of ``jaxcpt.open_model.adapter_base``: the run's
``init.path`` while it holds config.json, else RUN/hf/base, written from the checkpoint) or
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
                             "adapter_config.json (default: the run's init.path while it exists, else RUN/hf/base, "
                             "written from the checkpoint's frozen weights when missing)")
    parser.add_argument("--router-bias", default="refuse", choices=["refuse", "drop"],
                        help="an MoE checkpoint trained with model.moe.router_bias_update_rate has a selection bias no "
                             "transformers family holds: refuse, or drop it (the export routes without it)")


def run(args) -> int:
    import yaml

    from jaxcpt.errors import UserError
    from jaxcpt.hf.convert import save_hf
    from jaxcpt.hf.run_export import adaptation_file, adapter_base_dir, write_adapter_base
    from jaxcpt.model.lora import is_adapter
    from jaxcpt.open_model import locate_model, open_model
    from jaxcpt.sharding.distributed import DistributedConfig, initialize_distributed
    from jaxcpt.sharding.mesh import build_mesh

    initialize_distributed(DistributedConfig())  # auto: joins the other hosts of a pod / SLURM job
    location = locate_model(args.checkpoint)
    from jaxcpt.train.balance import bias_rate, check_export

    check_export(location.config, args.router_bias, exports=True,
                 fix="Pass --router-bias drop to export without it")
    if bias_rate(location.config):
        print("warning: --router-bias drop: the export routes without the selection bias the checkpoint was trained "
              "with; its expert choices and loss can differ from the checkpoint's")
    if location.config.lora is None and args.lora != "merged":
        raise UserError(f"--lora {args.lora}: '{args.checkpoint}' has no LoRA adapters (its model.lora is null)")
    base, write_base = None, False
    if args.lora == "adapter":  # decided, and a given base checked, before any weights are read
        base, write_base = (args.base, False) if args.base else adapter_base_dir(location)
        base = base if write_base else _checked_base(base, args.checkpoint)
    mesh = build_mesh(yaml.safe_load(args.mesh) if args.mesh else None)
    # --lora base is the adapter's base; merged folds the adapters in (save_hf would too)
    opened = open_model(location, lora=args.lora, mesh=mesh)
    model, tokenizer = opened.model(), args.tokenizer or opened.tokenizer_dir
    if args.lora == "adapter":
        from jaxcpt.hf.peft_export import save_peft_adapter

        if write_base:  # the one rule (jaxcpt.open_model.adapter_base): RUN/hf/base, from the checkpoint's frozen weights
            write_adapter_base(model, base, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               tokenizer_dir=tokenizer, adaptation=location.adaptation)
            print(f"wrote the adapter's base {base} ({args.dtype}): the run's init.path is gone or it did not start "
                  "from an HF directory")
        trained = tuple(k for k in location.meta.get("trainable_keys") or [] if not is_adapter(k))  # modules_to_save
        out = save_peft_adapter(model, args.out, base_model_name_or_path=base,
                                trained=trained, dtype=args.dtype, overwrite=args.overwrite, tokenizer_dir=tokenizer)
    else:
        out = save_hf(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer_dir=tokenizer,
                      overwrite=args.overwrite, extra_files=adaptation_file(location.adaptation))
    if out is not None:
        print(f"wrote {out} ({args.dtype})")
    return 0


def _checked_base(base: str, checkpoint: str) -> str:
    """``base`` as adapter_config.json names it; a local one must be an HF directory."""
    import os

    from jaxcpt.errors import UserError

    if "://" in base:
        return base
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise UserError(f"the adapter's base '{base}' is not an HF directory (no config.json); pass --base, or write "
                        f"one with: jaxcpt export-hf {checkpoint} --lora base --out BASE")
    return os.path.abspath(base)
