"""``jaxcpt import-hf HF_DIR --out DIR``: an HF checkpoint as a jaxcpt checkpoint (DIR/checkpoints/0).

The result can start a run (``init.checkpoint=DIR``) or go back out with ``jaxcpt export-hf DIR``.
Tokenizer files, if the HF directory has them, are copied to DIR/tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from jaxcpt.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output directory (becomes a run-like directory)")
    parser.add_argument("--mesh", default=None, help="mesh as YAML, e.g. '{fsdp: -1}' (default: all devices on data)")


def run(args) -> int:
    import yaml

    from jaxcpt.sharding.distributed import DistributedConfig, initialize_distributed, is_writer

    from jaxcpt.adapt.metadata import read_adaptation
    from jaxcpt.checkpoint import CheckpointConfig, Checkpointer
    from jaxcpt.hf.convert import copy_companion_files, load_hf
    from jaxcpt.model.persist import model_meta, params_of
    from jaxcpt.open_model import locate_model
    from jaxcpt.sharding.mesh import build_mesh

    out = Path(args.out)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise UserError(f"'{out}/checkpoints' already holds checkpoints; choose an empty --out")
    initialize_distributed(DistributedConfig())  # auto: joins the other hosts of a pod / SLURM job
    mesh = build_mesh(yaml.safe_load(args.mesh) if args.mesh else None)
    print(f"reading {args.hf_dir} ...", flush=True)
    model = load_hf(args.hf_dir, mesh=mesh)
    cfg = model.config
    print(f"{cfg.family}: {cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.describe_params()}", flush=True)
    with Checkpointer(out / "checkpoints", CheckpointConfig(async_save=False)) as ckpt:
        meta = {**model_meta(model), "source": str(Path(args.hf_dir).resolve()),
                "adaptation": read_adaptation(args.hf_dir)}  # optim.trainable's [new] selectors read it
        ckpt.save(0, {"params": params_of(model)}, {}, meta, force=True)
    tokenizer_dir = locate_model(args.hf_dir).tokenizer_dir  # the one tokenizer rule (jaxcpt.open_model)
    if tokenizer_dir and is_writer():
        copy_companion_files(tokenizer_dir, out / "tokenizer")
    print(f"wrote {out}/checkpoints/0" + (f" and {out}/tokenizer" if tokenizer_dir else ""))
    return 0
