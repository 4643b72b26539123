"""The training loop in four stages: set up, start, loop, finish.

    setup = set_up(cfg)      # jaxcpt.train.setup: everything resolved and checked, nothing written
    run = start(setup)       # restore the newest readable checkpoint, or initialise
    stopped = loop(run)      # train, evaluate, checkpoint, export; stop at an agreed step on a signal
    finish(run)              # unless stopped: the final checkpoint and export
    report(run, stopped)     # summary.json and the forgetting report

Everything here is orchestration around the pure ``train_step``: the only host work
between steps is feeding the next batch and reading the previous step's metrics (one
step late, so the device never waits for the host).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import yaml
from etils import epath

from jaxcpt import __version__
from jaxcpt.checkpoint import Checkpointer
from jaxcpt.config import to_dict
from jaxcpt.data import accounting as data_accounting
from jaxcpt.data.documents import sum_bad_input_reports
from jaxcpt.data.watch import InputWaitInterrupted
from jaxcpt.model import lora as lora_lib
from jaxcpt.sharding import failures
from jaxcpt.sharding.distributed import gather_json, initialize_distributed, is_writer
from jaxcpt.sharding.mesh import describe_mesh
from jaxcpt.train import balance
from jaxcpt.train import resume as resume_lib
from jaxcpt.train import rundir
from jaxcpt.train import state as train_state
from jaxcpt.train.config import TrainConfig, config_as_yaml_dict
from jaxcpt.train.evaluate import evaluate, global_batch
from jaxcpt.train.routing import routing_summary
from jaxcpt.train.metrics import (MetricsWriter, Progress, device_peak_flops, flops_per_token, set_aside_metrics,
                                  truncate_metrics)
from jaxcpt.train.setup import RunSetup, set_up
from jaxcpt.train.signals import StopRequests, any_host

log = logging.getLogger("jaxcpt.train")


class NonFiniteLossError(RuntimeError):
    exit_code = 3  # jaxcpt.exit_codes.EXIT_NONFINITE


def _say(message: str) -> None:
    if is_writer():
        print(message, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict."""
    initialize_distributed(cfg.distributed)  # first: every host must hear process 0's lease answer
    run_dir = epath.Path(cfg.run_dir)
    checkpoint_dir = epath.Path(cfg.checkpoint.directory) if cfg.checkpoint.directory else run_dir / "checkpoints"
    # Before anything is read or written: a second launch on a directory in use is refused, and
    # hosts that do not share the checkpoint directory stop before deciding resume-or-fresh apart.
    try:
        with rundir.RunDirectoryLock(rundir.lease_directories(run_dir, checkpoint_dir), cfg.lock, is_writer()) as lock:
            rundir.check_shared(checkpoint_dir)
            run = start(set_up(cfg))
            run.lock = lock
            try:
                # Traced under the mesh, so activation sharding constraints and shard_map'd kernels see it.
                with jax.set_mesh(run.setup.program.mesh):
                    stopped = loop(run)
                    if not stopped:
                        finish(run)
            finally:
                run.close()  # waits for the last checkpoint to be on disk
            return report(run, stopped)
    except BaseException as e:
        failures.announce(e)  # other hosts stop now, not after this host's cleanup (which may wait on them)
        raise


# -- start ------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """The mutable side of a run between start and finish."""

    setup: RunSetup
    ckpt: Checkpointer
    state: dict
    start_step: int
    writer: MetricsWriter | None
    stop: StopRequests
    files: dict  # the checkpoint's 'files' item: tokenizers
    export_tokenizer: str | None
    eval_history: list[dict]
    exports: list[str] = dataclasses.field(default_factory=list)
    step: int = 0
    harness: tuple | None = None  # (JaxcptLM, lm-eval TaskManager), made at the first downstream evaluation
    lock: rundir.RunDirectoryLock | None = None  # the run directory's lease (held by process 0)

    def to_global(self, local: dict) -> dict:
        shardings = self.setup.program.batch_shardings
        return global_batch(local, shardings["inputs"], shardings["source"])

    def close(self) -> None:
        """Close everything, each even when another's close raises (Grain workers must not linger);
        the first error is raised once all are closed."""
        closers = [self.ckpt.close, self.stop.uninstall]
        if self.setup.data_iter is not None:
            closers.append(self.setup.data_iter.close)
        if self.writer is not None:
            closers.append(self.writer.close)
        closers.append(self.setup.close)
        errors = []
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - close the rest, then raise the first
                log.error("closing the run: %s failed: %r", getattr(close, "__qualname__", close), e)
                errors.append(e)
        if errors:
            raise errors[0]


def start(setup: RunSetup) -> Run:
    """Create the run directory, then restore the newest readable checkpoint or initialise."""
    cfg, program, run_dir = setup.cfg, setup.program, setup.run_dir
    if is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_as_yaml_dict(cfg), sort_keys=False))
    ckpt = Checkpointer(setup.checkpoint_dir, cfg.checkpoint)
    if setup.resume_from is not None:
        restored = ckpt.restore_newest(program.abstract_state(), setup.resume_from)
        for step, why in restored.skipped:
            _say(f"checkpoint step {step} in {ckpt.directory} cannot be read ({why}); falling back to an older one")
        _say(f"resuming from {ckpt.directory / str(restored.step)}")
        state, history = restored.state, restored.meta.get("eval_history", [])
        hosts = restored.data.get("hosts", [])
        process_count = jax.process_count()
        setup.data_iter.set_state(hosts[jax.process_index()] if len(hosts) == process_count
                                  else (hosts[0] if hosts else restored.data))
        if is_writer():
            truncate_metrics(run_dir, restored.step)
            resume_lib.restore_eval_history(run_dir, history)
    else:
        _say(f"starting from {cfg.init.source}" + (f" {cfg.init.path}" if cfg.init.path else ""))
        params = train_state.initial_params(cfg, program.model_cfg, program.mesh, program.rules, setup.start)
        state = train_state.fresh_state(params, program.tx, program.state_shardings, program.trainable.keys,
                                        program.model_cfg)
        history = []
        if is_writer():  # records of an attempt that crashed before its first checkpoint, or of a run whose
            set_aside_metrics(run_dir, setup.checkpoint_dir)  # checkpoints this launch does not see: kept aside
    export_tokenizer = resume_lib.ship_export_tokenizer(setup.tokenizers, run_dir) if is_writer() else None
    stop = StopRequests(cfg.train.log_every)
    stop.install()
    if setup.data_iter is not None:
        stop.on_signal.append(setup.data_iter.interrupt_if_waiting)  # a stalled wait for data ends on a signal
    run = Run(setup, ckpt, state, int(state["step"]), MetricsWriter(run_dir) if is_writer() else None, stop,
              resume_lib.encode_tokenizers(setup.tokenizers), export_tokenizer, history)
    run.step = run.start_step
    m = program.model_cfg
    _say(f"{m.family}: {m.describe_params()} | mesh {describe_mesh(program.mesh)} | "
         f"batch {cfg.train.batch_size} x {program.seq_len} tokens | steps {run.start_step}->{cfg.train.steps} | "
         f"stop on signal: {stop.mechanism}")
    _say(program.layout)
    return run


# -- loop -------------------------------------------------------------------------------
def _record(run: Run, kind: str, step: int, values: dict) -> None:
    if run.writer is not None:
        run.writer.write({"kind": kind, "step": step, "time": time.time(), **values})


def run_eval(run: Run, step: int) -> None:
    """Held-out loss per source of the raw weights and, when kept, of their moving average."""
    setup = run.setup
    eval_step = setup.program.eval_step
    if balance.STATE_KEY in run.state:  # routed with the run's selection bias, as in training (positional:
        bias, jitted = run.state[balance.STATE_KEY], eval_step  # a jit with in_shardings takes no keywords)
        eval_step = lambda params, batch: jitted(params, batch, bias)  # noqa: E731
    results = evaluate(eval_step, run.state["params"], setup.eval_batches, run.to_global)
    if not results:
        return
    record = {"sources": results}
    if setup.position_eval is not None:  # eval.position_buckets: long-context gain and short-context forgetting
        record["positions"] = setup.position_eval.evaluate(run.state["params"], run.to_global)
    if "ema" in run.state:
        average = train_state.with_trainable(run.state["params"], run.state["ema"])
        record["ema"] = evaluate(eval_step, average, setup.eval_batches, run.to_global)
    run.eval_history.append({"kind": "eval", "step": step, **record})
    _record(run, "eval", step, record)
    _say(f"eval  step {step} | " + " | ".join(f"{n} loss {r['loss']:.4f} ppl {r['perplexity']:.2f}"
                                               for n, r in results.items()))
    if "ema" in record:
        _say(f"  ema step {step} | " + " | ".join(f"{n} loss {r['loss']:.4f}" for n, r in record["ema"].items()))
    for source, buckets in record.get("positions", {}).items():
        _say(f"  positions {source} | " + " | ".join(f"{name} {r['loss']:.4f}" for name, r in buckets.items()))


def run_downstream(run: Run, step: int) -> None:
    """lm-eval tasks (eval.downstream) on the raw weights and, when kept, their moving average.

    Every host runs them (the model spans all hosts); process 0 records one score per task and
    metric. The harness model and its compiled shapes are built once and reused.
    """
    from jaxcpt.eval.downstream import run_tasks, scores

    setup, cfg = run.setup, run.setup.cfg.eval.downstream
    if run.harness is None:
        from jaxcpt.eval.downstream import task_manager
        from jaxcpt.eval.harness import JaxcptLM
        from transformers import AutoTokenizer

        tokenizer_dir = resume_lib.hf_tokenizer_dir(setup.tokenizers)
        if tokenizer_dir is None:
            from jaxcpt.errors import UserError

            raise UserError("eval.downstream needs a tokenizer, and this run has none (pre-tokenized data without "
                            "one); set data.tokenizer")
        run.harness = (JaxcptLM(setup.program.graphdef, run.state["params"], setup.model_cfg,
                                AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
                                mesh=setup.program.mesh, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                max_gen_toks=cfg.max_gen_toks), task_manager(cfg.include_path))
    lm, manager = run.harness
    lm.params = run.state["params"]
    record = {"tasks": scores(run_tasks(lm, cfg, manager))}
    if "ema" in run.state:
        lm.params = train_state.with_trainable(run.state["params"], run.state["ema"])
        record["ema"] = scores(run_tasks(lm, cfg, manager))
    lm.params = None  # the next step donates these buffers
    run.eval_history.append({"kind": "downstream", "step": step, **record})
    _record(run, "downstream", step, record)
    _say(f"tasks step {step} | " + " | ".join(
        f"{task} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) for task, metrics in record["tasks"].items()))


def save(run: Run, step: int, force: bool = False) -> None:
    setup = run.setup
    if not force and not run.ckpt.should_save(step):
        return
    lost = any_host(run.lock is not None and run.lock.lost is not None)
    if lost:  # another launch took the run directory over while this one was paused: do not write into it
        why = (run.lock and run.lock.lost) or "process 0's lease on the run directory was taken over by another launch"
        raise rundir.RunDirectoryBusy(f"{why}; stopped before saving step {step}")
    meta = {"model_config": to_dict(setup.model_cfg), "jaxcpt_version": __version__, "run_config": config_as_yaml_dict(setup.cfg),
            "source_names": setup.source_names, "eval_history": run.eval_history, "adaptation": setup.adaptation,
            "trainable_keys": list(setup.program.trainable.keys)}
    data_state = {"hosts": gather_json(setup.data_iter.get_state())}
    run.ckpt.save(step, run.state, data_state, meta, files=run.files, force=True)
    # Per-source rows, tokens seen / trained on and epochs at this checkpoint, over all hosts (jaxcpt.data.accounting)
    _record(run, "data", step, {"sources": data_accounting.from_states(data_state["hosts"])})


def export(run: Run, step: int) -> None:
    from jaxcpt.hf.run_export import export_step

    setup, cfg = run.setup, run.setup.cfg
    weights = run.state["params"]
    if cfg.export.weights == "ema":  # the average of the trainable parameters; frozen ones are as they are
        weights = train_state.with_trainable(weights, run.state["ema"])
    model = train_state.model_of(setup.program.graphdef, weights)
    if balance.STATE_KEY in run.state:  # export.router_bias=drop (refuse stopped the run at set-up)
        balance.warn_dropped(run.state[balance.STATE_KEY])
    written = export_step(model, step, export_cfg=cfg.export, root=cfg.export.directory or str(setup.run_dir / "hf"),
                          tokenizer_dir=run.export_tokenizer, adaptation=setup.adaptation,
                          trained=tuple(setup.program.trainable.keys), init=to_dict(cfg.init))
    for target in written:
        run.exports.append(target)
        _say(f"exported {target}")


class _StepMetrics:
    """Reads each step's metrics one step late and stops the run after too many non-finite steps."""

    def __init__(self, run: Run):
        setup = run.setup
        self.run = run
        self.pending = None  # (step, metrics) of the step whose metrics are not read yet
        self.nonfinite_in_a_row = 0
        self.peak = device_peak_flops()
        trained = set(setup.program.trainable.keys)
        frozen = setup.model_cfg.lora is not None and not trained & {f"layers.{p}" for p in lora_lib.PROJECTIONS}
        self.flops_token = flops_per_token(setup.model_cfg, setup.program.seq_len, frozen_projections=frozen)
        self._flops_at = {setup.program.seq_len: self.flops_token}  # per row length (data.stages[].seq_len)
        self._frozen = frozen
        self.num_devices = setup.program.mesh.devices.size
        self.progress = Progress(setup.cfg.train.steps, run.start_step)
        # Step time = time between the completions of consecutive steps (reading a step's
        # metrics waits for it); reset after evaluation/saving so their time is not counted.
        self.last_done = time.monotonic()

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._consume(*pending)

    def restart_clock(self) -> None:
        self.last_done = time.monotonic()

    def _consume(self, step: int, metrics) -> None:
        run, cfg = self.run, self.run.setup.cfg
        m = jax.device_get(metrics)
        now = time.monotonic()
        seconds, self.last_done = now - self.last_done, now
        rows, seq_len = cfg.train.batch_size, run.setup.program.seq_len
        if run.setup.shapes is not None:  # the shape of this step's batch (data.stages may change it)
            shape = run.setup.shapes.at(step - 1)
            rows, seq_len = shape.rows, shape.seq_len
        if seq_len not in self._flops_at:
            self._flops_at[seq_len] = flops_per_token(run.setup.model_cfg, seq_len, frozen_projections=self._frozen)
        tokens_per_s = rows * seq_len / max(seconds, 1e-9)
        mfu = tokens_per_s * self._flops_at[seq_len] / (self.peak * self.num_devices) if self.peak else None
        names = run.setup.source_names
        per_source = {name: float(m["source_loss_sum"][i] / m["source_tokens"][i])
                      for i, name in enumerate(names) if m["source_tokens"][i] > 0}
        values = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                  "tokens": float(m["tokens"]), "tokens_per_s": tokens_per_s, "step_seconds": seconds,
                  "source_loss": per_source, "skipped": not bool(m["finite"])}
        if mfu is not None:
            values["mfu"] = mfu
        if "router_counts" in m and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            values["routing"] = dict(routing_summary(m["router_counts"]), aux_loss=float(m["router_aux_loss"]),
                                     z_loss=float(m["router_z_loss"]))
            if "router_bias" in m:
                values["routing"].update(balance.bias_summary(m["router_bias"]))
        bad_input = run.setup.data_iter.bad_input_report()  # this host's (process 0's) counts so far
        if bad_input:
            values["bad_input"] = bad_input
        _record(run, "train", step, values)
        if not bool(m["finite"]):
            self.nonfinite_in_a_row += 1
            _say(f"step {step}: non-finite loss or gradient ({values['loss']}); update skipped "
                 f"({self.nonfinite_in_a_row} in a row, limit {cfg.train.max_nonfinite_steps})")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row up to step {step}; stopping. The last good "
                    f"checkpoint is kept in {run.ckpt.directory}; lower the learning rate or check the data.")
        else:
            self.nonfinite_in_a_row = 0
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            _say(self.progress.line(step, values["loss"], values["lr"], tokens_per_s, mfu))


def loop(run: Run) -> bool:
    """Train from ``run.step`` to ``train.steps``; returns True when stopped by a signal (after saving)."""
    setup, cfg = run.setup, run.setup.cfg
    total_steps = cfg.train.steps
    metrics = _StepMetrics(run)
    # Running out of data must be agreed like a signal: only checked when a source is read once.
    may_run_out = jax.process_count() > 1 and any(not source.repeat for source in setup.data_cfg.sources)
    downstream = cfg.eval.downstream
    if run.step == 0:
        run_eval(run, 0)
        if downstream.due(0, total_steps):
            run_downstream(run, 0)
    while run.step < total_steps:
        if run.stop.should_stop(run.step):
            metrics.flush()
            save(run, run.step, force=True)
            run.ckpt.wait()
            _say(f"signal ({'this host' if run.stop.signal else 'preemption notice'}): saved checkpoint at step "
                 f"{run.step}; exiting")
            return True
        try:
            local, ran_out = next(setup.data_iter), False
        except StopIteration:
            local, ran_out = None, True
        except InputWaitInterrupted:
            continue  # a signal ended a stalled wait for data: should_stop saves this step and stops
        if may_run_out:
            ran_out = any_host(ran_out)
        if ran_out:
            _say(f"the data ran out at step {run.step} (sources with repeat=false are exhausted); stopping")
            break
        run.state, step_metrics = setup.program.train_step(run.state, run.to_global(local))
        run.step += 1
        metrics.push(run.step, step_metrics)
        if cfg.eval.due(run.step, total_steps):
            metrics.flush()  # read this step's metrics before evaluating
            run_eval(run, run.step)
            metrics.restart_clock()
        if downstream.due(run.step, total_steps):
            metrics.flush()
            run_downstream(run, run.step)
            metrics.restart_clock()
        if run.ckpt.should_save(run.step):  # log this step first and keep the save out of the next step's time:
            metrics.flush()  # on CPU a save waits for its write (jaxcpt/checkpoint.py)
            save(run, run.step, force=True)
            metrics.restart_clock()
        if cfg.export.hf_every and run.step % cfg.export.hf_every == 0 and run.step < total_steps:
            metrics.flush()
            export(run, run.step)
            metrics.restart_clock()
    metrics.flush()
    return False


# -- finish -----------------------------------------------------------------------------
def finish(run: Run) -> None:
    """The final checkpoint and HF export of a run that reached its end (or ran out of data)."""
    save(run, run.step, force=True)
    if run.setup.cfg.export.final:
        export(run, run.step)


def report(run: Run, stopped: bool) -> dict:
    """The summary, and for a run that ended (not one stopped by a signal) the forgetting report."""
    setup = run.setup
    summary = {"run_dir": str(setup.run_dir), "step": run.step, "exports": run.exports, "stopped_by_signal": stopped}
    summary["bad_input"] = sum_bad_input_reports(gather_json(setup.data_iter.bad_input_report()))  # all hosts
    for source, counts in summary["bad_input"].items():
        _say(f"bad input: source '{source}': " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "records")
             + f" of {counts['records']} records read (skipped; see the warnings for files and positions)")
    if is_writer() and not stopped:
        (setup.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if setup.eval_batches:  # the report compares held-out losses; without eval splits there is none
            from jaxcpt.report.forgetting import write_report

            print(write_report(setup.run_dir), flush=True)
    return summary
