"""The whole run's configuration: ``jaxcpt train --config C.yaml [section.key=value ...]``.

Each section's dataclass lives with the code that reads it (``model`` in
jaxcpt.model, ``data`` in jaxcpt.data, ``optim`` in jaxcpt.optim, ``checkpoint`` in
jaxcpt.checkpoint); this module composes them and adds the loop's own settings.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxcpt.checkpoint import CheckpointConfig
from jaxcpt.config import ConfigError, apply_overrides, field, from_dict, read_yaml, to_dict
from jaxcpt.data.config import DataConfig
from jaxcpt.eval.downstream import DownstreamConfig
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.moe import BALANCING_FIELDS
from jaxcpt.optim.config import OptimConfig
from jaxcpt.sharding.distributed import DistributedConfig
from jaxcpt.optim.ema import EMAConfig
from jaxcpt.train.rundir import LockConfig

# ModelConfig fields that say how to compute, not what the model is; these apply
# whatever the model's source (a HF checkpoint fixes the architecture, not the numerics).
NUMERICS_FIELDS = ("dtype", "param_dtype", "remat", "attention", "cudnn_documents_per_row", "linear_chunk_size")
# ModelConfig fields that add parameters to whatever model a run starts from: LoRA adapters are
# architecture (they are parameters), but no HF directory holds them, so the run's config sets them.
ADDED_FIELDS = ("lora",)
# ModelConfig fields that change the starting model's numbers: a RoPE change for context extension.
CHANGE_FIELDS = ("rope",)


@dataclasses.dataclass(frozen=True)
class InitConfig:
    source: Literal["scratch", "hf", "checkpoint"] = field(
        "scratch",
        help="where the weights come from when the run directory has no checkpoint yet: scratch (random, "
        "architecture from 'model'), hf (a Hugging Face directory; fresh optimizer, the usual CPT start), "
        "checkpoint (parameters only of a jaxcpt checkpoint; fresh optimizer). A run directory that already "
        "holds checkpoints always resumes fully (parameters, optimizer, step, data position) instead.",
    )
    path: str | None = field(None, help="HF directory (source=hf) or jaxcpt run/checkpoint directory (source=checkpoint)")
    seed: int = field(0, help="seed of the random initialisation (source=scratch)")

    def validate(self) -> None:
        if self.source != "scratch" and not self.path:
            raise ConfigError(f"init.source={self.source} needs init.path")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = field(1000, help="optimizer steps in the run (the schedule's length)")
    batch_size: int = field(32, help="global batch in rows of data.seq_len tokens (split over hosts and micro-batches)")
    log_every: int = field(10, help="print a progress line every N steps (metrics.jsonl gets every step)")
    loss_chunk_size: int = field(
        1024, help="positions per chunk of the output projection + loss; bounds logits memory to [batch, chunk, vocab] (0 = no chunking)"
    )
    max_nonfinite_steps: int = field(
        5, help="a NaN/inf loss or gradient skips that update; this many in a row stop the run (the last good checkpoint is kept)"
    )

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ConfigError("train.steps, train.batch_size and train.log_every must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = field(200, help="evaluate every N steps (and always at step 0, before any update, and at the end); 0 = only those")
    dense_every: int = field(0, help="early in the run, evaluate every N steps instead, to see the 'stability gap'; 0 = off")
    dense_until: int = field(0, help="the dense interval applies to steps below this")
    downstream: DownstreamConfig = field(DownstreamConfig(), help="lm-eval harness tasks run during training")
    position_buckets: list[int] = field(
        [4096, 16384, 32768, 65536],
        help="edges of the held-out loss by position (jaxcpt.eval.position_loss): at every evaluation, per source, "
        "the loss over positions [0, e1), [e1, e2), ... up to the longest row the run trains (over data.stages), of "
        "long held-out documents (one per row, not packed). On when an edge lies below that length (defaults: an "
        "8k -> 32k/64k extension); [] = off")
    position_rows: int = field(8, help="held-out documents per source for eval.position_buckets (the first long ones)")

    def validate(self) -> None:
        if self.position_rows < 1 or any(edge < 1 for edge in self.position_buckets):
            raise ConfigError(f"eval.position_rows ({self.position_rows}) and every eval.position_buckets edge "
                              f"({self.position_buckets}) must be >= 1")

    def due(self, step: int, last_step: int) -> bool:
        if step == 0 or step == last_step:
            return True
        if self.dense_every and step < self.dense_until and step % self.dense_every == 0:
            return True
        return bool(self.every) and step % self.every == 0


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    directory: str = field("", help="where exports go (STEP_N subdirectories): a local path or a gs:// URL; "
                                    "empty = RUN_DIR/hf")
    hf_every: int = field(0, help="also export an HF directory every N steps; 0 = only at the final step")
    keep_last: int = field(0, help="keep the newest N step exports in the export directory (step_N and step_N-adapter "
                                   "count as one; the newest is never removed); 0 = keep every export. Exports are "
                                   "results a user may still want, so nothing is deleted unless this is set")
    final: bool = field(True, help="export an HF directory at the end of the run (RUN/hf/step_N)")
    dtype: Literal["bfloat16", "float32", "float16"] = field("bfloat16", help="dtype of exported weights")
    max_shard_size: str = field("5GB", help="largest safetensors file of an export")
    weights: Literal["raw", "ema"] = field("raw", help="which weights exports hold: raw (the trained parameters) or ema "
                                                       "(their moving average; needs ema.decay > 0)")
    lora: Literal["merged", "adapter", "both"] = field(
        "both", help="a LoRA run (model.lora) exports merged (RUN/hf/step_N: a plain HF directory, each adapter folded "
        "into its projection), adapter (RUN/hf/step_N-adapter: a PEFT directory for PeftModel.from_pretrained on the "
        "base) or both. The adapter's base is init.path for an HF start, else RUN/hf/base (written once)")
    router_bias: Literal["refuse", "drop"] = field(
        "refuse", help="an MoE run with model.moe.router_bias_update_rate keeps a selection bias that no transformers "
        "MoE family holds: refuse (the run is refused at set-up unless it exports nothing) or drop (export without "
        "it, with a warning stating its size; the export then routes differently from the checkpoint)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = field("runs/default", help="local directory for metrics, TensorBoard events, reports, exports and (unless checkpoint.directory is set) checkpoints")
    init: InitConfig = field(InitConfig(), help="where the starting weights come from")
    model: ModelConfig = field(
        ModelConfig(dtype="bfloat16"),
        help="architecture (init.source=scratch only) and numerics (dtype, param_dtype, remat, attention: always)",
    )
    mesh: dict[str, int] = field({"data": -1, "fsdp": 1, "tensor": 1}, help="device mesh axes and sizes, major to minor; -1 = the remaining devices")
    sharding_rules: dict[str, str | list[str] | None] = field({}, help="overrides of the logical-axis -> mesh-axis rule table")
    data: DataConfig = field(DataConfig(), help="sources, tokenizer, packing, mixture")
    optim: OptimConfig = field(OptimConfig(), help="AdamW, clipping, accumulation and the learning-rate schedule")
    train: LoopConfig = field(LoopConfig(), help="length, batch, logging")
    eval: EvalConfig = field(EvalConfig(), help="held-out evaluation schedule")
    checkpoint: CheckpointConfig = field(CheckpointConfig(), help="when to save and what to keep")
    export: ExportConfig = field(ExportConfig(), help="Hugging Face exports")
    ema: EMAConfig = field(EMAConfig(), help="exponential moving average of the parameters")
    distributed: DistributedConfig = field(DistributedConfig(), help="multi-host initialisation")
    lock: LockConfig = field(LockConfig(), help="the lease that keeps a second launch off a run directory in use")

    def validate(self) -> None:
        if "://" in self.run_dir:
            raise ConfigError(
                f"run_dir '{self.run_dir}' must be a local path (metrics, reports and exports are written there by "
                "process 0); put checkpoints on shared storage with checkpoint.directory=gs://BUCKET/RUN/checkpoints"
            )
        if not self.data.sources:
            raise ConfigError("data.sources is empty; a run needs at least one source to train on")
        if self.export.keep_last < 0:
            raise ConfigError(f"export.keep_last must be >= 0 (0 keeps every export), got {self.export.keep_last}")
        if self.export.weights == "ema" and not self.ema.enabled:
            raise ConfigError("export.weights=ema needs a moving average: set ema.decay (e.g. 0.999)")
        lora = self.model.lora
        if lora is not None and (lora.train_embeddings or lora.train_norms or lora.train_router) and self.optim.trainable:
            raise ConfigError(
                "model.lora.train_embeddings / train_norms / train_router choose what trains only when "
                "optim.trainable is empty; "
                "with optim.trainable set, list everything there, e.g. optim.trainable=[{params: ['layers.*_lora_a', "
                "'layers.*_lora_b', 'embedding']}]")
        if self.train.batch_size % self.optim.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of optim.grad_accum_steps ({self.optim.grad_accum_steps})"
            )


def config_as_yaml_dict(cfg: TrainConfig) -> dict:
    """``cfg`` as the dict RUN/config.yaml holds, which ``load_train_config`` reads back to ``cfg``.

    With an HF or checkpoint init the architecture comes from that source, so the model
    section keeps only the numerics (load_train_config refuses architecture keys there).
    """
    data = to_dict(cfg)
    if cfg.init.source != "scratch":
        moe = data["model"]["moe"]
        data["model"] = {name: data["model"][name] for name in NUMERICS_FIELDS + ADDED_FIELDS + CHANGE_FIELDS}
        if moe is not None:  # the run's load-balancing choices for the source's experts
            data["model"]["moe"] = {name: moe[name] for name in BALANCING_FIELDS}
    return data


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML + dotted overrides into a ``TrainConfig``; every mistake is a ConfigError before any compilation."""
    raw = apply_overrides(read_yaml(path) if path else {}, overrides or [])
    source = (raw.get("init") or {}).get("source", "scratch")
    allowed = NUMERICS_FIELDS + ADDED_FIELDS + CHANGE_FIELDS
    model = dict(raw.get("model") or {})
    moe = model.pop("moe", None)
    architecture = sorted(set(model) - set(allowed))
    if source != "scratch" and isinstance(moe, dict):  # an MoE source's experts are fixed; its balancing is not
        architecture += sorted(f"moe.{key}" for key in set(moe) - set(BALANCING_FIELDS))
    elif source != "scratch" and moe is not None:
        architecture.append("moe")
    if source != "scratch" and architecture:
        raise ConfigError(
            f"model.{architecture[0]} is set, but with init.source={source} the architecture comes from the "
            f"checkpoint; only model.{{{', '.join(allowed)}}} and model.moe.{{{', '.join(BALANCING_FIELDS)}}} "
            "may be set"
        )
    return from_dict(TrainConfig, raw)
