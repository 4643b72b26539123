"""Setting a run up: everything that is decided before the first step, with nothing written.

``train()`` runs four stages: **set up** (this module: mesh, model config, optimizer,
tokenizer, data, checkpoint directory, the compiled step), **start** (restore the newest
readable checkpoint or initialise), **loop**, **finish** (final save, export, report).
``jaxcpt train --check`` runs the set-up stage, prints what it resolved and exits, and
``jaxcpt compile`` lowers the same ``TrainProgram`` for a TPU topology.

    setup = set_up(cfg)
    print(setup.describe())
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh, NamedSharding

from jaxcpt.checkpoint import DAMAGED, ResumePoint, find_resume_point
from jaxcpt.checkpoint_files import ScratchDirs
from jaxcpt.config import ConfigError
from jaxcpt.model import lora as lora_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.optim.optimizer import build_optimizer
from jaxcpt.optim.trainable import resolve_trainable
from jaxcpt.sharding.distributed import initialize_distributed
from jaxcpt.sharding.mesh import build_mesh, describe_mesh
from jaxcpt.model.rope_change import describe_rope
from jaxcpt.sharding.rules import check_rules, logical_to_spec, make_rules
from jaxcpt.open_model import ModelLocation
from jaxcpt.sharding import layout as layout_lib
from jaxcpt.train import balance
from jaxcpt.train import resume as resume_lib
from jaxcpt.train import state as train_state
from jaxcpt.train.config import TrainConfig
from jaxcpt.train.step import eval_step, train_step

log = logging.getLogger("jaxcpt.train")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                "loss_mask": jnp.float32, "source": jnp.int32}


@dataclasses.dataclass
class TrainProgram:
    """The jitted train and eval steps with every sharding they run under.

    The same object drives training and ``jaxcpt compile``: what compiles for a TPU
    topology is exactly the step a run executes.
    """

    mesh: Mesh
    rules: Any
    model_cfg: ModelConfig
    tx: Any
    schedule: Any
    graphdef: Any
    state_shardings: dict
    batch_shardings: dict
    batch_size: int  # global rows per optimizer step
    seq_len: int
    micro_batch: int  # rows per micro-batch (batch_size / grad_accum_steps)
    train_step: Any  # jitted (state, batch) -> (state, metrics)
    eval_step: Any  # jitted (params, eval batch) -> (loss_sum, tokens, bytes)
    layout: str
    trainable: Any  # jaxcpt.optim.trainable.TrainableSpec: what trains in which phase

    def abstract_state(self) -> dict:
        return train_state.abstract_state(self.tx, self.model_cfg, self.mesh, self.rules, keys=self.trainable.keys,
                                          ema="ema" in self.state_shardings)

    def lower_train_step(self):
        """The train step lowered for this program's mesh (``.compile()`` it for memory analysis)."""
        # The abstract arguments are built outside the mesh context: optax's init runs eagerly
        # there, and under a mesh of devices this host cannot run (a TPU topology) it would fail.
        state, batch = self.abstract_state(), self.abstract_batch()
        with jax.set_mesh(self.mesh):  # as in training: sharding constraints and shard_map see the mesh
            return self.train_step.lower(state, batch)

    def abstract_batch(self, rows: int | None = None) -> dict:
        rows = self.batch_size if rows is None else rows
        return {k: jax.ShapeDtypeStruct((rows,) if k == "source" else (rows, self.seq_len), dtype,
                                        sharding=self.batch_shardings[k]) for k, dtype in BATCH_DTYPES.items()}


def _source_loss_weights(cfg: TrainConfig, num_sources: int) -> tuple[float, ...] | None:
    """data.sources[].loss_weight for the objective; None (the unweighted program) when all are 1."""
    weights = tuple(float(s.loss_weight) for s in cfg.data.sources)
    return weights if len(weights) == num_sources and any(w != 1.0 for w in weights) else None


def build_program(cfg: TrainConfig, model_cfg: ModelConfig, mesh: Mesh, rules, num_sources: int,
                  adaptation: dict | None = None) -> TrainProgram:
    """Optimizer, shardings, layout checks and the jitted steps for ``model_cfg`` on ``mesh``.

    ``adaptation``: the starting model's ``jaxcpt_adaptation.json`` record (new token ids,
    inserted blocks), which ``optim.trainable`` selectors like ``embedding[new]`` read.
    """
    micro = layout_lib.check_batch_split(cfg.train.batch_size, cfg.optim.grad_accum_steps, mesh, rules,
                                         jax.process_count())
    infos = train_state.param_infos(model_cfg, rules)
    phases = cfg.optim.trainable or lora_lib.default_trainable(model_cfg.lora, infos)
    trainable = resolve_trainable(phases, infos, adaptation, cfg.train.steps)
    _check_trained_dtypes(model_cfg, trainable)
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps, trainable)
    shardings = train_state.train_state_shardings(tx, model_cfg, mesh, rules, keys=trainable.keys, ema=cfg.ema.enabled)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, dict(mesh.shape)))
    source_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules, dict(mesh.shape)))
    batch_shardings = {**{k: batch_sharding for k in BATCH_KEYS}, "source": source_sharding}
    graphdef = train_state.graphdef_of(model_cfg, rules)
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, num_sources=num_sources,
                          grad_accum_steps=cfg.optim.grad_accum_steps, chunk_size=cfg.train.loss_chunk_size,
                          z_loss_weight=cfg.optim.z_loss_weight, trainable_keys=trainable.keys, ema=cfg.ema,
                          source_loss_weights=_source_loss_weights(cfg, num_sources),
                          router_bias_rate=balance.bias_rate(model_cfg)),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_shardings = (shardings["params"], {**batch_shardings, "target_bytes": batch_sharding})
    if balance.STATE_KEY in shardings:  # evaluated with the selection bias: (params, batch, router_bias)
        eval_shardings += (shardings[balance.STATE_KEY],)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, chunk_size=cfg.train.loss_chunk_size),
                      in_shardings=eval_shardings)
    layout = layout_lib.format_layout(
        layout_lib.parameter_rows(model_cfg, mesh, rules),
        layout_lib.activation_rows(model_cfg, micro, cfg.data.seq_len, cfg.train.loss_chunk_size, mesh, rules))
    return TrainProgram(mesh, rules, model_cfg, tx, schedule, graphdef, shardings, batch_shardings,
                        cfg.train.batch_size, cfg.data.seq_len, micro, step_fn, eval_fn, layout, trainable)


def _check_trained_dtypes(model_cfg: ModelConfig, trainable) -> None:
    """Parameters that train must be float32; frozen ones may be stored in bfloat16 (they get no updates)."""
    low = [path for path in trainable.keys if trainable.params[path].dtype != "float32"]
    if not low:
        return
    shown = ", ".join(low[:6]) + (f" and {len(low) - 6} more" if len(low) > 6 else "")
    raise ConfigError(
        f"model.param_dtype={model_cfg.param_dtype} stores {shown} in {model_cfg.param_dtype}, and they train: Adam's "
        f"moments and every update would be {model_cfg.param_dtype}, where an update smaller than ~1/256 of a weight "
        "(most updates at CPT learning rates) rounds away. Train with model.param_dtype=float32 and "
        "model.dtype=bfloat16: the matmuls run in bf16 and the float32 weights are the master copy, at no extra "
        "memory. bfloat16 storage is for frozen parameters only, e.g. the base of a LoRA run (model.lora, whose "
        "adapters are float32) that trains nothing else.")


@dataclasses.dataclass
class RunSetup:
    """Everything the start, loop and finish stages need, resolved and checked."""

    cfg: TrainConfig
    run_dir: epath.Path
    checkpoint_dir: epath.Path
    resume_from: ResumePoint | None  # the newest step whose JSON items read (its state is read at start); None = fresh
    program: TrainProgram
    adaptation: dict | None  # the starting model's jaxcpt_adaptation.json, kept in every checkpoint
    tokenizers: resume_lib.TokenizerFiles
    data_cfg: Any
    source_names: list[str]
    data_iter: Any = None  # None after a --check
    eval_batches: dict | None = None
    start: ModelLocation | None = None  # a fresh run's init.path, located once (jaxcpt.open_model); None on resume
    shapes: Any = None  # jaxcpt.data.stage_shapes.ShapeSchedule: (seq_len, rows) per step
    position_eval: Any = None  # jaxcpt.eval.position_loss.PositionEval: held-out loss by position bucket

    @property
    def model_cfg(self) -> ModelConfig:
        return self.program.model_cfg

    def close(self) -> None:
        """Remove the temporary directories set-up made (tokenizer copies); the run's other resources
        are closed by ``Run.close``."""
        self.tokenizers.scratch.close()

    def describe(self) -> str:
        cfg, m = self.cfg, self.model_cfg
        if self.resume_from:
            start = f"resume from {self.checkpoint_dir / str(self.resume_from.step)} (model config from the checkpoint)"
            start += "".join(f"; step {step} cannot be read ({why}) and is moved to "
                             f"{self.checkpoint_dir / DAMAGED} when training starts"
                             for step, (_, why) in self.resume_from.damaged)
        else:
            start = f"{cfg.init.source}" + (f" {cfg.init.path}" if cfg.init.path else "")
        lines = [
            f"run dir      {self.run_dir}",
            f"checkpoints  {self.checkpoint_dir}",
            f"start        {start}",
            f"model        {m.family}: {m.num_layers} layers, width {m.hidden_size}, heads {m.num_heads}/"
            f"{m.num_kv_heads}, vocab {m.vocab_size}, {m.describe_params()}, compute {m.dtype}, "
            f"params {m.param_dtype}, remat {m.remat}, attention {m.attention}",
            f"rope         {describe_rope(m)}; rows train positions 0..{(max(self.shapes.seq_lens()) if self.shapes else cfg.data.seq_len) - 1}",
            f"special ids  bos {m.bos_token_id}, eos {m.eos_token_id}, pad {m.pad_token_id} (written on export)",
            f"tokenizer    {self.tokenizers.data or '(none: pre-tokenized sources)'}; exports ship "
            f"{self.tokenizers.export or ('a conversion of it' if self.tokenizers.data else 'no tokenizer')}",
            f"mesh         {describe_mesh(self.program.mesh)}",
            f"batch        {cfg.train.batch_size} rows x {cfg.data.seq_len} tokens, {cfg.optim.grad_accum_steps} "
            f"micro-batch(es) of {self.program.micro_batch} rows, {cfg.train.steps} steps",
        ]
        if self.data_cfg.sources:
            from jaxcpt.data.pipeline import resolved_special_tokens

            bos, eos = resolved_special_tokens(self.data_cfg)
            lines.append(f"documents    {'BOS ' + str(bos) if bos is not None else 'no BOS'} before, "
                         f"{'EOS ' + str(eos) if eos is not None else 'no EOS'} after each document")
        for source in self.data_cfg.sources:
            lines.append(f"source       {source.name}: weight {source.weight}, paths {source.paths}")
        if m.moe is not None:
            from jaxcpt.train.routing import describe_moe

            lines.append(describe_moe(m, cfg.train.batch_size * cfg.data.seq_len * cfg.train.steps,
                                      cfg.export.router_bias))
        if m.lora is not None:
            lines.append(f"lora         rank {m.lora.rank}, alpha {m.lora.alpha:g} (scale {m.lora.scale:g}) on "
                         f"{', '.join(m.lora.targets)}: {m.num_adapter_params() / 1e6:.2f}M adapter parameters "
                         f"(float32); exports {cfg.export.lora}")
        if self.shapes is not None and self.shapes.varies:  # data.stages that change the row shape
            lines += stage_lines(self.shapes, cfg.train.steps, m)
        if self.position_eval is not None:
            lines.append(f"positions    held-out loss by position {', '.join(self.position_eval.names)} at every evaluation, "
                         f"on {', '.join(f'{n} ({len(b)} batch(es))' for n, b in self.position_eval.batches.items())}")
        lines.append(self.program.trainable.describe())
        return "\n".join(lines + [self.program.layout])


def set_up(cfg: TrainConfig, *, check: bool = False) -> RunSetup:
    """Resolve and check everything a run needs, in the order that lets each error name its cause.

    Nothing is written; with ``check`` no data iterator is kept (its files are still resolved
    and read enough to find their documents and the tokenizer).
    """
    initialize_distributed(cfg.distributed)
    run_dir = epath.Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh)
    rules = make_rules(cfg.sharding_rules)
    check_rules(rules, mesh)
    from jaxcpt.model.context_parallel import CONTEXT_AXIS, check_sequence_split

    check_sequence_split(cfg.data.seq_len, dict(mesh.shape).get(CONTEXT_AXIS, 1))
    from jaxcpt.data import stage_shapes

    stage_shapes.check_context_split(cfg.data, dict(mesh.shape).get(CONTEXT_AXIS, 1))  # every stage's seq_len
    checkpoint_dir = epath.Path(cfg.checkpoint.directory) if cfg.checkpoint.directory else run_dir / "checkpoints"
    # Where everything comes from, decided once: the newest step whose data, meta and files read on
    # every host gives the model config, the tokenizer and the adaptation record; a fresh run takes
    # them from init.* and data.tokenizer.
    resume_from = find_resume_point(checkpoint_dir, required_meta=("model_config",))
    scratch, data_iter, start = ScratchDirs(), None, None
    try:
        if resume_from is not None:
            model_cfg = resume_lib.model_config_from_checkpoint(cfg, resume_from.meta)
            tokenizers = resume_lib.tokenizer_files_for_resume(cfg, resume_from.files, checkpoint_dir, scratch)
            adaptation = resume_from.meta.get("adaptation")
        else:
            start = train_state.locate_start(cfg)  # init.path read once: config, tokenizer, adaptation, step
            model_cfg = train_state.resolve_model_config(cfg, start)
            tokenizers = resume_lib.tokenizer_files_for_start(cfg, start.tokenizer_dir if start else None, scratch)
            adaptation = start.adaptation if start else None
        from jaxcpt.model.rope_change import check_trained_length

        for warning in check_trained_length(model_cfg, cfg.model.rope, stage_shapes.stage_seq_lens(cfg.data)):
            print(f"warning: {warning}", flush=True)
        data_cfg = dataclasses.replace(cfg.data, tokenizer=tokenizers.data)
        model_cfg = _agree_with_tokenizer(model_cfg, data_cfg,
                                          defaults_apply=cfg.init.source == "scratch" and not resume_from)
        source_names = [s.name for s in data_cfg.sources]
        # before any step: a bias the export could not hold is refused now, not at the end of the run
        balance.check_export(model_cfg, cfg.export.router_bias, exports=cfg.export.final or cfg.export.hf_every > 0)
        program = build_program(cfg, model_cfg, mesh, rules, len(source_names), adaptation)
        shapes = _stage_shapes(cfg, program)

        from jaxcpt.data.pipeline import build_eval_batches, build_train_iterator

        local_batch = cfg.train.batch_size // jax.process_count()
        run_data_cfg = dataclasses.replace(data_cfg, num_workers=0) if check else data_cfg
        data_iter = build_train_iterator(run_data_cfg, batch_size=local_batch, seq_len=cfg.data.seq_len,
                                         lr_schedule=program.schedule, total_steps=cfg.train.steps)
        if check:
            data_iter.close()
            data_iter = None
        eval_batches = build_eval_batches(data_cfg, batch_size=local_batch, seq_len=cfg.data.seq_len)
        from jaxcpt.eval.position_loss import build_position_eval

        position_eval = build_position_eval(cfg, program, data_cfg, shapes)  # None unless eval.position_buckets apply
    except BaseException:
        scratch.close()  # a tokenizer copied for this run must not outlive its failed set-up
        if data_iter is not None:
            data_iter.close()
        raise
    return RunSetup(cfg, run_dir, checkpoint_dir, resume_from, program, adaptation, tokenizers, data_cfg,
                    source_names, data_iter, eval_batches, start, shapes, position_eval)


def _stage_shapes(cfg: TrainConfig, program: TrainProgram):
    """The (seq_len, rows) schedule of data.stages, each stage's rows checked against the mesh like train.batch_size."""
    from jaxcpt.data.mixture import resolve_stage_steps
    from jaxcpt.data.stage_shapes import check_stage_batches, resolve_shapes

    starts = resolve_stage_steps(cfg.data, program.schedule, cfg.train.steps)
    shapes = resolve_shapes(cfg.data, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len, stage_starts=starts)
    accum = cfg.optim.grad_accum_steps

    def check(rows: int) -> None:
        if rows % accum:
            from jaxcpt.errors import UserError

            raise UserError(f"{rows} rows are not a multiple of optim.grad_accum_steps ({accum}); set the stage's "
                            f"batch_size to a multiple of {accum}")
        layout_lib.check_batch_split(rows, accum, program.mesh, program.rules, jax.process_count())

    check_stage_batches(shapes, check)
    return shapes


def stage_lines(shapes, total_steps: int, model_cfg: ModelConfig) -> list[str]:
    """One line per stretch of steps with one row shape: rows, seq_len, positions trained and the RoPE in force."""
    rope = describe_rope(model_cfg)
    lines = []
    for lo, hi, shape in shapes.segments(total_steps):
        beyond = (f" (past the RoPE's {model_cfg.max_position_embeddings} trained positions)"
                  if shape.seq_len > model_cfg.max_position_embeddings else "")
        lines.append(f"stage        steps {lo}..{hi - 1}: {shape.rows} rows x {shape.seq_len} tokens, positions "
                     f"0..{shape.seq_len - 1}{beyond}, {shape.rows * shape.seq_len * (hi - lo):,} row positions; rope {rope}")
    return lines


def _agree_with_tokenizer(model_cfg: ModelConfig, data_cfg, defaults_apply: bool) -> ModelConfig:
    """Check the tokenizer against the model; the special ids written on export follow the tokenizer.

    Every id the tokenizer can emit must be a row of the embedding: an id past the table is
    silently clamped or turns the loss into NaN. BOS/EOS/PAD: where the tokenizer defines one,
    the model's config takes it (a list of stop tokens that contains it stays). A different
    value is reported, unless it is ModelConfig's default on a model made from scratch
    (``defaults_apply``), where following the tokenizer is what the default means.
    """
    if not data_cfg.tokenizer:
        return model_cfg
    from jaxcpt.data.tokenize import check_tokenizer_fits_model

    facts = check_tokenizer_fits_model(data_cfg.tokenizer, model_cfg.vocab_size, data_cfg.tokenizer_min_vocab_fraction)
    updates = {}
    for key, token in (("bos_token_id", facts.bos_id), ("eos_token_id", facts.eos_id), ("pad_token_id", facts.pad_id)):
        current = getattr(model_cfg, key)
        if defaults_apply and current == getattr(ModelConfig(), key):
            updates[key] = token  # a default follows the tokenizer, also to None (a tokenizer without BOS)
            continue
        if token is None or current == token or (isinstance(current, list) and token in current):
            continue  # an HF config may name a BOS its tokenizer does not add (Qwen): keep it
        if current is not None:
            print(f"warning: model {key}={current} but the tokenizer's is {token}; exports will write {token}",
                  flush=True)
        updates[key] = token
    return dataclasses.replace(model_cfg, **updates) if updates else model_cfg
