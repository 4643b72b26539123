"""The training loop: start or resume, train, evaluate, checkpoint, export, report.

Everything here is orchestration around the pure ``train_step``: the only work
on the host between steps is feeding the next batch and reading the previous
step's metrics (one step late, so the device never waits for the host).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding

from jaxcpt.checkpoint import Checkpointer
from jaxcpt.config import dump_yaml, to_dict
from jaxcpt.errors import UserError
from jaxcpt.model.persist import model_meta
from jaxcpt.optim.optimizer import build_optimizer
from jaxcpt.sharding.distributed import gather_json, initialize_distributed, is_writer
from jaxcpt.sharding.mesh import build_mesh, describe_mesh
from jaxcpt.sharding.rules import check_rules, logical_to_spec, make_rules
from jaxcpt.train import state as train_state
from jaxcpt.train.config import TrainConfig
from jaxcpt.train.metrics import MetricsWriter, Progress, device_peak_flops, flops_per_token, truncate_metrics
from jaxcpt.train.step import eval_step, train_step

log = logging.getLogger("jaxcpt.train")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class NonFiniteLossError(RuntimeError):
    pass


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves at the next step boundary and exits cleanly.

    A second signal restores the previous handlers and interrupts at once (a Ctrl-C
    during compilation or a hung collective must still work).
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.signal is not None:
            self.uninstall()
            raise KeyboardInterrupt(f"second signal {signum}: stopping without a checkpoint")
        self.signal = signum


def _say(message: str) -> None:
    if is_writer():
        print(message, flush=True)


def _copy_tokenizer(tokenizer_dir: str | None, data_tokenizer: str, run_dir: epath.Path) -> None:
    """Keep the tokenizer with the run (as an HF tokenizer directory), so every export ships it."""
    from jaxcpt.hf.convert import copy_companion_files
    from jaxcpt.hf.tokenizer import sentencepiece_to_hf

    target = run_dir / "tokenizer"
    if target.exists():
        return
    source = tokenizer_dir or (data_tokenizer if data_tokenizer and Path(data_tokenizer).is_dir() else None)
    if source is None:
        if data_tokenizer and Path(data_tokenizer).is_file():
            sentencepiece_to_hf(data_tokenizer, str(target))
        return
    copy_companion_files(source, str(target))


def _global_batch(local: dict, sharding: NamedSharding, source_sharding: NamedSharding) -> dict:
    """Per-host numpy rows -> global jax arrays sharded over the batch axes."""
    out = {}
    for key in BATCH_KEYS:
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local[key]))
    out["source"] = jax.make_array_from_process_local_data(source_sharding, np.asarray(local["source"], np.int32))
    return out


def evaluate(eval_fn, params, eval_batches: dict, to_global) -> dict[str, dict]:
    """Loss and perplexity per source over its fixed held-out rows."""
    results = {}
    for name, batches in eval_batches.items():
        loss_sum, tokens = 0.0, 0.0
        for batch in batches:
            l, t = eval_fn(params, to_global(batch))
            loss_sum, tokens = loss_sum + float(l), tokens + float(t)
        if tokens:
            loss = loss_sum / tokens
            results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    return results


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict."""
    initialize_distributed(cfg.distributed)
    run_dir = epath.Path(cfg.run_dir)
    mesh = build_mesh(cfg.mesh)
    rules = make_rules(cfg.sharding_rules)
    check_rules(rules, mesh)
    model_cfg = train_state.resolve_model_config(cfg)
    total_steps = cfg.train.steps
    tx, schedule = build_optimizer(cfg.optim, total_steps)
    shardings = train_state.state_shardings(tx, model_cfg, mesh, rules)

    process_count = jax.process_count()
    if cfg.train.batch_size % process_count:
        raise UserError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the host count ({process_count})")
    from jaxcpt.data.pipeline import build_eval_batches, build_train_iterator

    data_cfg = cfg.data
    if not data_cfg.tokenizer and cfg.init.source == "hf":
        import dataclasses

        data_cfg = dataclasses.replace(data_cfg, tokenizer=cfg.init.path)
    local_batch = cfg.train.batch_size // process_count
    seq_len = data_cfg.seq_len
    data_iter = build_train_iterator(data_cfg, batch_size=local_batch, seq_len=seq_len, lr_schedule=schedule,
                                     total_steps=total_steps)
    source_names = list(data_iter.source_names)
    # Only now, with the mesh, model source and data checked, does the run directory appear.
    if is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    ckpt = Checkpointer(cfg.checkpoint.directory or run_dir / "checkpoints", cfg.checkpoint)

    latest = ckpt.latest_step()
    if latest is not None:
        _say(f"resuming from {ckpt.directory / str(latest)}")
        abstract = train_state.abstract_state(tx, model_cfg, mesh, rules)
        state, data_state, _meta = ckpt.restore(latest, abstract)
        hosts = data_state.get("hosts", [])
        data_iter.set_state(hosts[jax.process_index()] if len(hosts) == process_count else (hosts[0] if hosts else data_state))
        if is_writer():
            truncate_metrics(run_dir, latest)
        tokenizer_dir = str(run_dir / "tokenizer") if (run_dir / "tokenizer").exists() else None
    else:
        _say(f"starting from {cfg.init.source}" + (f" {cfg.init.path}" if cfg.init.path else ""))
        params, tokenizer_dir = train_state.initial_params(cfg, model_cfg, mesh, rules)
        state = train_state.fresh_state(params, tx, shardings)
        if is_writer():
            truncate_metrics(run_dir, -1)  # records of an attempt that crashed before its first checkpoint
            _copy_tokenizer(tokenizer_dir, data_cfg.tokenizer, run_dir)
    start_step = int(state["step"])
    graphdef = train_state.graphdef_of(model_cfg, rules)
    _say(f"{model_cfg.family}: {model_cfg.num_params() / 1e6:.1f}M parameters | mesh {describe_mesh(mesh)} | "
         f"batch {cfg.train.batch_size} x {seq_len} tokens | steps {start_step}->{total_steps}")

    # Traced under the mesh, so activation sharding constraints and shard_map'd kernels see it.
    mesh_context = contextlib.ExitStack()
    mesh_context.enter_context(jax.set_mesh(mesh))
    batch_spec = logical_to_spec(("batch", "length"), rules, dict(mesh.shape))
    batch_sharding = NamedSharding(mesh, batch_spec)
    source_sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules, dict(mesh.shape)))
    to_global = functools.partial(_global_batch, sharding=batch_sharding, source_sharding=source_sharding)
    batch_shardings = {**{k: batch_sharding for k in BATCH_KEYS}, "source": source_sharding}
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, num_sources=len(source_names),
                          grad_accum_steps=cfg.optim.grad_accum_steps, chunk_size=cfg.train.loss_chunk_size,
                          z_loss_weight=cfg.optim.z_loss_weight),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, chunk_size=cfg.train.loss_chunk_size),
                      in_shardings=(shardings["params"], batch_shardings))
    eval_batches = build_eval_batches(data_cfg, batch_size=local_batch, seq_len=seq_len)

    writer = MetricsWriter(run_dir) if is_writer() else None
    meta = {**model_meta(train_state.model_of(graphdef, state["params"])), "run_config": to_dict(cfg),
            "source_names": source_names}
    peak = device_peak_flops()
    flops_token = flops_per_token(model_cfg, seq_len)
    num_devices = mesh.devices.size
    progress = Progress(total_steps, start_step)
    stop = _StopFlag()
    stop.install()
    exports: list[str] = []

    def record(kind: str, step: int, values: dict) -> None:
        if writer is not None:
            writer.write({"kind": kind, "step": step, "time": time.time(), **values})

    def run_eval(step: int) -> None:
        results = evaluate(eval_fn, state["params"], eval_batches, to_global)
        if results:
            record("eval", step, {"sources": results})
            _say("eval  step {} | ".format(step) + " | ".join(f"{n} loss {r['loss']:.4f} ppl {r['perplexity']:.2f}" for n, r in results.items()))

    def save(step: int, force: bool = False) -> None:
        data_state = {"hosts": gather_json(data_iter.get_state())}
        ckpt.save(step, state, data_state, meta, force=force)

    def export(step: int) -> None:
        from jaxcpt.hf.convert import save_hf

        target = run_dir / "hf" / f"step_{step}"
        tokenizer = str(run_dir / "tokenizer") if (run_dir / "tokenizer").exists() else None
        save_hf(train_state.model_of(graphdef, state["params"]), str(target), dtype=cfg.export.dtype,
                max_shard_size=cfg.export.max_shard_size, tokenizer_dir=tokenizer, overwrite=True)
        exports.append(str(target))
        _say(f"exported {target}")

    nonfinite_in_a_row = 0
    pending = None  # (step, metrics) of the step whose metrics are not read yet
    # Step time = time between the completions of consecutive steps (reading a step's
    # metrics waits for it); reset after evaluation/saving so their time is not counted.
    last_done = time.monotonic()
    stopped_by_signal = False

    def consume(pending_step: int, metrics) -> None:
        nonlocal nonfinite_in_a_row, last_done
        m = jax.device_get(metrics)
        now = time.monotonic()
        seconds, last_done = now - last_done, now
        tokens = float(m["tokens"])
        tokens_per_s = cfg.train.batch_size * seq_len / max(seconds, 1e-9)
        mfu = tokens_per_s * flops_token / (peak * num_devices) if peak else None
        per_source = {name: float(m["source_loss_sum"][i] / m["source_tokens"][i])
                      for i, name in enumerate(source_names) if m["source_tokens"][i] > 0}
        values = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                  "tokens": tokens, "tokens_per_s": tokens_per_s, "step_seconds": seconds, "source_loss": per_source,
                  "skipped": not bool(m["finite"])}
        if mfu is not None:
            values["mfu"] = mfu
        record("train", pending_step, values)
        if not bool(m["finite"]):
            nonfinite_in_a_row += 1
            _say(f"step {pending_step}: non-finite loss or gradient ({values['loss']}); update skipped "
                 f"({nonfinite_in_a_row} in a row, limit {cfg.train.max_nonfinite_steps})")
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} non-finite steps in a row up to step {pending_step}; stopping. The last good "
                    f"checkpoint is kept in {ckpt.directory}; lower the learning rate or check the data."
                )
        else:
            nonfinite_in_a_row = 0
        if pending_step % cfg.train.log_every == 0 or pending_step == total_steps:
            _say(progress.line(pending_step, values["loss"], values["lr"], tokens_per_s, mfu))

    # Hosts must agree on stopping (a signal, or data running out) before anyone makes a
    # collective call the others would not make. On several hosts that costs a small
    # allgather: for signals every log interval, for running out only when a source is
    # read once (repeat=false).
    several_hosts = jax.process_count() > 1
    may_run_out = any(not source.repeat for source in data_cfg.sources)
    step = start_step
    try:
        if start_step == 0:
            run_eval(0)
        while step < total_steps:
            signalled = stop.signal is not None
            if several_hosts and step % cfg.train.log_every == 0:
                signalled = _any_host(signalled)
            elif several_hosts:
                signalled = False  # acted on at the next agreed check
            if signalled:
                if pending is not None:
                    consume(*pending)
                    pending = None
                save(step, force=True)
                ckpt.wait()
                _say(f"signal {stop.signal or 'on another host'}: saved checkpoint at step {step}; exiting")
                stopped_by_signal = True
                break
            try:
                local, ran_out = next(data_iter), False
            except StopIteration:
                local, ran_out = None, True
            if several_hosts and may_run_out:
                ran_out = _any_host(ran_out)
            if ran_out:
                _say(f"the data ran out at step {step} (sources with repeat=false are exhausted); stopping")
                break
            state, metrics = step_fn(state, to_global(local))
            step += 1
            if pending is not None:
                consume(*pending)
            pending = (step, metrics)
            if cfg.eval.due(step, total_steps):
                consume(*pending)  # read this step's metrics before evaluating
                pending = None
                run_eval(step)
                last_done = time.monotonic()
            if ckpt.should_save(step):
                save(step)
            if cfg.export.hf_every and step % cfg.export.hf_every == 0 and step < total_steps:
                if pending is not None:
                    consume(*pending)
                    pending = None
                export(step)
                last_done = time.monotonic()
        if pending is not None:
            consume(*pending)
        if not stopped_by_signal:
            save(step, force=True)
            if cfg.export.final:
                export(step)
    finally:
        ckpt.close()
        data_iter.close()
        mesh_context.close()
        if writer is not None:
            writer.close()
        stop.uninstall()
    summary = {"run_dir": str(run_dir), "step": step, "exports": exports, "stopped_by_signal": stopped_by_signal}
    if is_writer() and not stopped_by_signal:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if eval_batches:  # the report compares held-out losses; without eval splits there is none
            from jaxcpt.train.report import write_report

            print(write_report(run_dir), flush=True)
    return summary


def _any_host(flag: bool) -> bool:
    """True on every host if ``flag`` is true on any host (a collective: all hosts must call it)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
