"""Training checkpoints: a thin wrapper over an Orbax ``CheckpointManager``.

One checkpoint is one step directory holding four items::

    RUN/checkpoints/1200/state   pytree of jax.Arrays (params, opt_state, step ...), Orbax StandardSave
    RUN/checkpoints/1200/data    JSON: the data iterator's state, so a resume continues the stream
    RUN/checkpoints/1200/meta    JSON: run config, resolved model config, evaluation history, versions
    RUN/checkpoints/1200/files   JSON: digests of the run's tokenizer, kept once in RUN/checkpoints/tokenizers/
                                 (jaxcpt.checkpoint_files); older checkpoints hold the files base64-encoded

so the checkpoint directory alone is enough to resume: the run directory (a TPU worker's local
disk) and the model's source directory may both be gone. Damaged steps are moved aside to
``RUN/checkpoints/damaged/STEP-ITEM-ERROR`` (see ``restore_newest``).

Guarantees this module leans on Orbax for, and which tests/test_checkpoint.py checks:

* A step is only listed once it is complete. Orbax writes into
  ``1200.orbax-checkpoint-tmp`` and renames it when every item is written (on
  GCS, where there is no atomic rename, it writes ``commit_success.txt`` last
  instead), so a process killed mid-save leaves the previous step as the latest.
  A ``Checkpointer`` opened on that directory deletes leftover tmp directories
  in the background (its first save waits for that).
* Restoring re-shards: each leaf of ``abstract_state`` is a
  ``jax.ShapeDtypeStruct`` carrying the *new* sharding, and the mesh at save time
  does not matter.
* A damaged newest checkpoint (a truncated or missing file after a disk fault, in any of
  its items) is skipped: ``find_resume_point`` and ``restore_newest`` fall back to the
  previous complete one, say which and why, never hand back a partly read state, and move
  the damaged step aside so that the next due step is saved again. All hosts agree.

Multi-host: every process must call ``save``/``restore``/``should_save`` with the
same step; Orbax writes each process's array shards and only the primary process
(0) writes the JSON items and the step metadata. So ``data`` must be the same on
every process: a per-host iterator state has to be gathered into one dict (keyed
by process index) before saving, or host 0's position is what every host resumes.

Directories may be local paths or ``gs://`` URLs: all filesystem access goes
through ``etils.epath``, never ``pathlib``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_lib

from jaxcpt import checkpoint_files as files_lib
from jaxcpt.checkpoint_files import UnsafeCheckpointError
from jaxcpt.checkpoint_steps import (  # noqa: F401 - the public ones are re-exported: callers import them from here
    _EXPECTED, DAMAGED, CheckpointMismatchError, ResumePoint, _absolute, _check_tree, _describe_failure, _ItemError,
    _key_name, _read_json_item, find_resume_point, move_aside, read_json_items, read_meta, resolve_step_dir,
    restore_params, stored_export_tokenizer)
from jaxcpt.config import ConfigError, field
from jaxcpt.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and which checkpoints to keep.

    Keep policy: a checkpoint survives if it is among the newest ``keep_last``
    checkpoints in the directory *or* its step is a multiple of ``keep_every``.
    Kept-forever checkpoints count toward ``keep_last`` while they are among
    the newest (keep_last=3, keep_every=5, saving steps 1..12 leaves 5, 10, 11,
    12). This replaces Orbax's deprecated ``max_to_keep``/``keep_period``
    options with the ``LatestN`` + ``EveryNSteps`` preservation policies they
    map to.
    """

    directory: str = field("", help="where checkpoints go: a local path or a gs:// URL (shared by all hosts); empty = RUN_DIR/checkpoints")
    every_steps: int = field(1000, help="save when step % every_steps == 0; 0 = off")
    every_minutes: float = field(0.0, help="save when this many minutes passed since the last save; 0 = off "
                                           "(multi-host: costs one small blocking collective per should_save call)")
    keep_last: int = field(3, help="keep the newest N checkpoints (>= 1)")
    keep_every: int = field(0, help="also keep forever every checkpoint whose step is a multiple of this; 0 = none")
    async_save: bool = field(True, help="write in a background thread; training continues while it writes "
                                        "(TPU/GPU; on CPU a save waits for its write, which would otherwise "
                                        "hold a second copy of the state in host memory)")

    def validate(self) -> None:
        for name in ("every_steps", "every_minutes", "keep_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"checkpoint.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 so a run can resume, got {self.keep_last}")


def _on_host_memory(state: Any) -> bool:
    """Whether any array of ``state`` lives on a CPU device (its buffers are host memory)."""
    return any(device.platform == "cpu" for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)
               for device in leaf.devices())


def _return_freed_host_memory() -> None:
    """Give the pages of freed heap blocks back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Orbax's host copy of the state is freed once written, but glibc kept its pages (in the malloc
    arenas of the threads that made it), and XLA's next step did not reuse them: on the Qwen2.5-0.5B
    shape the step after a waited save peaked at 14.70 GiB against 10.2 GiB for the steps before it,
    the 5.1 GiB copy still resident (docs/real-size.md). ``malloc_trim(0)`` returns such pages.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only (not musl, not macOS)
    if trim is not None:
        trim(0)


def _check_json(value: Any, item: str) -> dict:
    """Fail now, in the caller's thread, rather than inside Orbax's background writer."""
    value = {} if value is None else value
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint item '{item}' must be JSON-serialisable: {e}") from None
    return value


class Checkpointer:
    """Saves and restores training checkpoints under one directory.

        ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
        if (step := ckpt.latest_step()) is not None:
            state, data_state, meta = ckpt.restore(step, abstract_state)
        for step in ...:
            ckpt.save(step, state, data_iter.get_state(), meta)  # no-op unless should_save(step)
        ckpt.close()                                             # waits for the last save
    """

    def __init__(self, directory: str | epath.PathLike, config: CheckpointConfig = CheckpointConfig()):
        self.directory = _absolute(directory)
        self.config = config
        keep = [keep_lib.LatestN(n=config.keep_last)]
        if config.keep_every:
            keep.append(keep_lib.EveryNSteps(interval_steps=config.keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep_lib.AnyPreservationPolicy(keep),
            enable_async_checkpointing=config.async_save,
            # Deletes tmp directories of saves killed mid-write (in the background; the
            # first save waits for it). Without it, only a leftover of the very step being
            # saved again is replaced; leftovers of other steps would linger forever.
            cleanup_tmp_directories=True,
            create=True,
        )
        # Handlers named up front (not inferred from the first save's args) so a fresh
        # manager can read item metadata and restore before it has saved anything.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(), "files": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # Time-based saving counts from construction, so a restarted job does not save at once.
        self._last_save_time = time.monotonic()
        self._bundles_kept: set[str] = set()  # digests of the stored files written (or found) by this process

    # -- deciding -----------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due: a multiple of every_steps, or every_minutes since the last save.

        Call it on every process with the same step. Clocks differ between hosts,
        so with several processes the time test is decided on process 0 and
        broadcast (one tiny collective that waits for queued device work); a
        multi-host run that cares about dispatch overlap should use every_steps only.
        """
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        cfg = self.config
        due = cfg.every_steps > 0 and step % cfg.every_steps == 0
        if cfg.every_minutes > 0:
            late = time.monotonic() - self._last_save_time >= cfg.every_minutes * 60
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                late = bool(multihost_utils.broadcast_one_to_all(np.asarray(late)))
            due = due or late
        return due

    # -- saving -------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict | None = None, meta: dict | None = None,
             *, files: dict | None = None, force: bool = False) -> bool:
        """Save if ``should_save(step)`` (or ``force``); returns whether a save started.

        ``files``: the run's ``checkpoint_files.FilesItem`` (its bundles are written once, before
        the first save that refers to them), or a plain JSON dict.

        Asynchronous by default on TPU and GPU: returns once arrays are copied off the devices,
        so ``state`` may be donated/overwritten by the next step. On CPU it returns once the
        step is written (see the comment below). A step that already exists is skipped (e.g.
        the final save right after a periodic one).
        """
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            log.info("checkpoint for step %d already exists in %s; not saving again", step, self.directory)
            return False
        if isinstance(files, files_lib.FilesItem):
            self._keep_bundles(files)
            files = files.item
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_check_json(data_state, "data")),
            meta=ocp.args.JsonSave(_check_json(meta, "meta")),
            files=ocp.args.JsonSave(_check_json(files, "files")),
        )
        self._manager.save(step, args=args, force=True)  # force: the decision above is ours
        if self.config.async_save and _on_host_memory(state):
            # CPU platform only: Orbax's asynchronous save first copies every array "off the device"
            # so that training may go on, but on CPU the device is host memory: the copy is a second
            # train state in the memory the next step's gradients and temporaries need (Qwen2.5-0.5B,
            # full training: 19.06 GiB with the step beside the write, 11.43 GiB waiting for it;
            # docs/real-size.md). No step can overlap the write without holding two states, so wait.
            # On TPU and GPU the copy goes from HBM to host RAM, which the step does not use: the
            # overlap costs no device memory and hides the write, so those saves stay asynchronous.
            self._manager.wait_until_finished()
            _return_freed_host_memory()
        self._last_save_time = time.monotonic()
        return True

    def _keep_bundles(self, files: files_lib.FilesItem) -> None:
        """Write the bundles ``files`` refers to (process 0, once per Checkpointer), and delete the
        bundles no step refers to any more (only when every step's files item reads)."""
        wanted = {b.digest for b in files.bundles}
        if wanted <= self._bundles_kept:
            return
        if jax.process_index() == 0:
            for bundle in files.bundles:
                files_lib.write_bundle(self.directory, bundle)
            keep = set(wanted)
            try:
                for step in self._manager.all_steps():
                    keep |= files_lib.referenced_bundles(_read_json_item(self.directory / str(step), "files", {}))
            except _ItemError:
                keep = None  # a step we cannot read may refer to any bundle: keep them all
            if keep is not None:
                removed = files_lib.remove_unreferenced_bundles(self.directory, keep)
                if removed:
                    log.info("removed stored tokenizer copies no checkpoint refers to: %s", ", ".join(removed))
        self._bundles_kept |= wanted

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (and their old steps pruned)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps present, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest complete step on disk, or None.

        Steps written by other processes or earlier runs count only once committed.
        In the process that is saving, a step counts from the moment ``save`` returns
        (Orbax tracks it eagerly); call ``wait()`` first if it must be on disk.
        """
        return self._manager.latest_step()

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore ``(state, data_state, meta)`` of ``step`` (None = latest).

        ``abstract_state`` has the trainer's structure with ``jax.ShapeDtypeStruct``
        leaves whose ``sharding`` says where each array goes, so a checkpoint saved
        on one mesh restores onto another.
        """
        self._manager.wait_until_finished()  # a step this process is still writing cannot be read yet
        if step is None:
            step = self.latest_step()
            if step is None:
                raise UserError(f"no complete checkpoint in '{self.directory}'; expected {_EXPECTED}")
        if step not in self._manager.all_steps():
            raise UserError(f"no checkpoint for step {step} in '{self.directory}'; steps there: {self.all_steps()}")
        return _restore_items(self.directory / str(step), abstract_state)[:3]

    def restore_newest(self, abstract_state: Any, resume: ResumePoint | None = None) -> Restored:
        """The newest checkpoint that reads completely, falling back past damaged ones.

        A step whose files cannot be read (truncated, missing, corrupt: in any item) is skipped
        with a warning naming it and the reason, and the next older complete step is tried.
        Every host tries the same step and all fall back together if any host failed, so no host
        trains from a state another host could not read. Skipped steps are then moved aside
        (``move_aside``), so that the latest step, ``should_save`` and the next save see the step
        actually restored. A tree that does not match the model being restored
        (``CheckpointMismatchError``) or a checkpoint naming unsafe files is an error, not damage,
        and is raised at once, with nothing moved.

        ``resume``: what ``find_resume_point`` read at start-up. Its step's JSON items are used
        as read there (not read again) and the steps it skipped are not tried again.
        """
        from jaxcpt.sharding.distributed import gather_json

        self._manager.wait_until_finished()
        skipped: list[tuple[int, str]] = []
        damaged: list[tuple[int, str]] = []  # (step, short reason) to move aside once a step restored
        known_bad = dict(resume.damaged) if resume is not None else {}
        for step in reversed(self.all_steps()):
            if step in known_bad:  # read and agreed on at start-up
                skipped.append((step, known_bad[step][1]))
                damaged.append((step, known_bad[step][0]))
                continue
            try:
                json_items = (resume.data, resume.meta, resume.files) if resume and step == resume.step else None
                state, data, meta, files = _restore_items(self.directory / str(step), abstract_state, json_items)
                failure = None
            except (CheckpointMismatchError, UnsafeCheckpointError):
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                state = data = meta = files = None
                failure = _describe_failure(e)
            failures = [f for f in gather_json(failure) if f]  # collective: every host reaches it
            if not failures:
                self._move_aside(damaged)
                return Restored(step, state, data, meta, files, skipped)
            del state  # a partly usable state must not survive by accident
            skipped.append((step, failures[0][1]))
            damaged.append((step, failures[0][0]))
            log.warning("checkpoint step %d in %s cannot be read (%s); falling back to the previous one",
                        step, self.directory, failures[0][1])
        raise UserError(
            f"no readable checkpoint in '{self.directory}': "
            + "; ".join(f"step {s}: {why}" for s, why in skipped)
            + ". Move the damaged step directories away to start afresh, or restore them from a copy."
        )

    def _move_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Move damaged steps to CKPT/damaged/ (process 0), then let every host's manager forget them."""
        if not damaged:
            return
        from jaxcpt.sharding.distributed import gather_json

        if jax.process_index() == 0:
            for step, reason in damaged:
                move_aside(self.directory, step, reason)
        gather_json(None)  # every host waits until process 0 has moved them
        self._manager.reload()  # the manager lists steps once; make it see they are gone


@dataclasses.dataclass
class Restored:
    """What ``restore_newest`` read: the step, its four items, and the damaged steps it skipped."""

    step: int
    state: Any
    data: dict
    meta: dict
    files: dict
    skipped: list[tuple[int, str]]


def _restore_items(step_dir: epath.Path, abstract_state: Any,
                   json_items: tuple[dict, dict, dict] | None = None) -> tuple[Any, dict, dict, dict]:
    """(state, data, meta, files) of one step directory, read with Orbax's handlers.

    The handlers, not ``CheckpointManager.restore``: the manager ends a restore with a
    barrier across hosts, which a host whose read failed would never reach, leaving the
    others waiting. Reading per host and agreeing afterwards (``restore_newest``) cannot hang.
    ``json_items``: (data, meta, files) already read (by ``find_resume_point``).
    """
    if not ocp.step.is_path_finalized(step_dir):
        raise UserError(f"checkpoint '{step_dir}' is incomplete (its save was interrupted)")
    data, meta, files = json_items if json_items is not None else read_json_items(step_dir)
    state_handler = ocp.StandardCheckpointHandler()
    try:
        on_disk = state_handler.metadata(step_dir / "state")
    except Exception as e:  # noqa: BLE001
        raise _ItemError("state", e) from e
    _check_tree(getattr(on_disk, "tree", on_disk), abstract_state, f"'{step_dir}'")
    try:
        state = state_handler.restore(step_dir / "state", args=ocp.args.StandardRestore(abstract_state))
        jax.block_until_ready(state)  # a read error surfaces here, inside the caller's try
    except Exception as e:  # noqa: BLE001
        raise _ItemError("state", e) from e
    return state, data, meta, files


