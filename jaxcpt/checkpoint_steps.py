"""One checkpoint step read without a manager: its items, the newest readable step, damage.

``find_resume_point`` is what a run's start-up reads (JSON only, before the model is built);
``resolve_step_dir`` / ``read_meta`` / ``restore_params`` / ``stored_export_tokenizer`` serve the
commands that open one checkpoint (export, evaluate, merge, a params-only warm start). A step
that cannot be read is moved aside by ``move_aside`` (see ``Checkpointer.restore_newest``).
All filesystem access goes through ``etils.epath`` (local paths and ``gs://`` alike).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxcpt import checkpoint_files as files_lib
from jaxcpt.checkpoint_files import UnsafeCheckpointError
from jaxcpt.errors import UserError

log = logging.getLogger("jaxcpt.checkpoint")

_EXPECTED = "a checkpoint directory (e.g. RUN/checkpoints) or one step inside it (e.g. RUN/checkpoints/1200)"


class CheckpointMismatchError(UserError, ValueError):
    """The tree asked for does not match the tree on disk; the message lists the first differences."""


def _key_name(path: tuple) -> str:
    """'opt_state.1.0.mu.w': the dotted name Orbax also uses for a leaf, whatever the container types."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):  # DictKey / GetAttrKey / SequenceKey
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    return {_key_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_tree(on_disk: Any, wanted: Any, where: str) -> None:
    """Raise CheckpointMismatchError naming the first leaves whose names or shapes differ.

    Orbax raises on a mismatch too, but its message prints whole metadata trees;
    this one names the first few differing leaves, before any array is read.
    """
    disk, want = _leaves_by_name(on_disk), _leaves_by_name(wanted)
    problems = [f"'{k}' is not in the checkpoint" for k in sorted(want.keys() - disk.keys())]
    problems += [f"'{k}' is in the checkpoint but not in the target" for k in sorted(disk.keys() - want.keys())]
    for k in sorted(want.keys() & disk.keys()):
        a, b = getattr(disk[k], "shape", None), getattr(want[k], "shape", None)
        if a is not None and b is not None and tuple(a) != tuple(b):
            problems.append(f"'{k}' has shape {tuple(a)} in the checkpoint but {tuple(b)} in the target")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the model/optimizer being restored: "
            + "; ".join(problems[:5]) + more
            + ". Check that the model and optimizer config match the run that wrote it."
        )


def move_aside(directory: epath.Path, step: int, reason: str) -> epath.Path | None:
    """Move step ``step`` to ``directory/damaged/STEP-REASON[-N]``; returns where (None if it could not).

    Kept, not deleted: a step that failed to read because of a passing I/O error is still there
    to inspect or move back. Orbax ignores the ``damaged`` directory (its name is not a step).
    """
    source = directory / str(step)
    target_root = directory / DAMAGED
    name = f"{step}-{reason}"
    target, n = target_root / name, 1
    try:
        target_root.mkdir(parents=True, exist_ok=True)
        note = target_root / "README.txt"
        if not note.exists():  # also makes the folder exist on GCS, where rename checks for it and mkdir is a no-op
            note.write_text("Checkpoint steps jaxcpt could not read, moved here so that training saves them again.\n"
                            "Each is named STEP-ITEM-ERROR. Inspect, move back, or delete them.\n")
        while target.exists():
            target, n = target_root / f"{name}-{n}", n + 1
        source.rename(target)
    except OSError as e:
        print(f"warning: cannot move the damaged checkpoint {source} aside ({e}); move or delete it yourself, "
              "or saving skips its step", flush=True)
        return None
    log.warning("moved damaged checkpoint step %d to %s", step, target)
    print(f"moved damaged checkpoint step {step} to {target}", flush=True)
    return target


DAMAGED = "damaged"  # CKPT/damaged/STEP-ITEM-ERROR: steps that could not be read, moved aside


@dataclasses.dataclass
class ResumePoint:
    """The newest step whose JSON items (data, meta, files) read on every host, found at start-up.

    Its state is read later (``Checkpointer.restore_newest(abstract, resume)``), once the model
    it describes is built; ``damaged`` lists the newer steps skipped, as (step, (short reason, message)).
    """

    step: int
    data: dict
    meta: dict
    files: dict
    damaged: list[tuple[int, tuple[str, str]]]


def find_resume_point(directory: str | epath.PathLike, required_meta: tuple[str, ...] = ()) -> ResumePoint | None:
    """The newest step whose JSON items all read, agreed across hosts; None when there is no step.

    Reads only small JSON (no arrays), so it runs before the model is built; nothing is written
    or moved (``restore_newest`` moves the skipped steps aside). ``required_meta``: keys the
    meta item must have for the step to count as readable.
    """
    from jaxcpt.sharding.distributed import gather_json

    directory = _absolute(directory)
    steps = sorted(ocp.step.checkpoint_steps(directory)) if directory.exists() else []
    damaged: list[tuple[int, tuple[str, str]]] = []
    for step in reversed(steps):
        try:
            data, meta, files = read_json_items(directory / str(step), required_meta)
            failure = None
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable: try the step before
            data = meta = files = None
            failure = _describe_failure(e)
        failures = [f for f in gather_json(failure) if f]
        if not failures:
            return ResumePoint(step, data, meta, files, damaged)
        damaged.append((step, tuple(failures[0])))
        log.warning("checkpoint step %d in %s cannot be read (%s); trying an older step", step, directory,
                    failures[0][1])
    if damaged:
        raise UserError(
            f"no checkpoint in '{directory}' reads: " + "; ".join(f"step {s}: {why}" for s, (_, why) in damaged)
            + ". Move the damaged step directories away to start afresh, or restore them from a copy.")
    return None


class _ItemError(Exception):
    """A read failure of one item of a step, naming the item."""

    def __init__(self, item: str, error: BaseException):
        super().__init__(f"{item} item: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        self.item, self.error = item, error


def _describe_failure(e: BaseException) -> list[str]:
    """[short reason for a directory name, message]: JSON, so every host can be told (gather_json)."""
    item, error = (e.item, e.error) if isinstance(e, _ItemError) else ("step", e)
    message = str(e) if isinstance(e, _ItemError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return [f"{item}-{type(error).__name__}", message[:500]]


def _read_json_item(step_dir: epath.Path, item: str, default: Any = None) -> Any:
    path = step_dir / item
    if default is not None and not path.exists():
        return default  # an item older checkpoints do not have
    try:
        value = ocp.JsonCheckpointHandler().restore(path)
    except Exception as e:  # noqa: BLE001 - truncated JSON, a missing file, an I/O error
        raise _ItemError(item, e) from e
    if not isinstance(value, dict):
        raise _ItemError(item, ValueError(f"holds a {type(value).__name__}, not a JSON object"))
    return value


def read_json_items(step_dir: epath.Path, required_meta: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """(data, meta, files) of one committed step; raises _ItemError naming the item that does not read."""
    if not ocp.step.is_path_finalized(step_dir):
        raise UserError(f"checkpoint '{step_dir}' is incomplete (its save was interrupted)")
    data = _read_json_item(step_dir, "data")
    meta = _read_json_item(step_dir, "meta")
    missing = [key for key in required_meta if key not in meta]
    if missing:
        raise _ItemError("meta", KeyError(f"no {', '.join(missing)}"))
    files = _read_json_item(step_dir, "files", default={})
    try:
        files = files_lib.check_files_item(files, str(step_dir))
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed
        raise _ItemError("files", e) from e
    return data, meta, files


def _absolute(path: str | epath.PathLike) -> epath.Path:
    """Orbax wants absolute paths; a relative local path is taken from the working directory."""
    p = epath.Path(path)
    return p if "://" in str(path) else epath.Path(os.path.abspath(str(p)))


# -- reading one checkpoint without a manager (export, params-only warm start) -------
def resolve_step_dir(path: str | epath.PathLike) -> epath.Path:
    """The step directory that ``path`` names: itself, or the latest complete step inside it."""
    p = _absolute(path)
    if not p.exists():
        raise UserError(f"checkpoint path '{p}' does not exist; expected {_EXPECTED}")
    if not p.is_dir():
        raise UserError(f"checkpoint path '{p}' is not a directory; expected {_EXPECTED}")
    is_step_dir = (p / "state").is_dir()
    if ocp.step.TMP_DIR_SUFFIX in p.name or (is_step_dir and not ocp.step.is_path_finalized(p)):
        raise UserError(f"checkpoint '{p}' is incomplete (its save was interrupted); use an earlier step")
    if is_step_dir:
        return p
    steps = ocp.step.checkpoint_steps(p)
    if not steps:
        raise UserError(f"'{p}' holds no complete checkpoint; expected {_EXPECTED}")
    return p / str(max(steps))


def restore_params(path: str | epath.PathLike, abstract_params: Any, item: str = "params") -> Any:
    """Restore only ``state[item]`` (the parameters, or e.g. their moving average 'ema') from a
    checkpoint root or step directory.

    The optimizer state on disk is never read, so its structure need not be known
    (Orbax ``PyTreeRestore(partial_restore=True)``). Leaves of ``abstract_params``
    are ``jax.ShapeDtypeStruct`` with the target sharding.
    """
    step_dir = resolve_step_dir(path)
    on_disk = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
    if not isinstance(on_disk, dict) or item not in on_disk:
        top = sorted(on_disk) if isinstance(on_disk, dict) else type(on_disk).__name__
        raise CheckpointMismatchError(f"checkpoint '{step_dir}' has no '{item}' in its state (top level: {top})")
    target = {item: abstract_params}
    _check_tree({item: on_disk[item]}, target, f"'{step_dir}'")
    # PyTreeRestore, not StandardRestore: only it accepts a target that omits subtrees
    # (opt_state, step) which are on disk.
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        return reader.restore(step_dir / "state", args=args)[item]
    finally:
        reader.close()


def stored_export_tokenizer(path: str | epath.PathLike) -> str | None:
    """The HF tokenizer directory a checkpoint stores (its ``files`` item), None for checkpoints
    without one. Lets a checkpoint whose run directory is gone still export and evaluate with its
    tokenizer: the stored bundle in place on a local disk, else a local copy removed at exit."""
    step_dir = resolve_step_dir(path)
    try:
        files = files_lib.check_files_item(_read_json_item(step_dir, "files", default={}), str(step_dir))
    except _ItemError as e:
        raise UserError(f"checkpoint '{step_dir}' cannot be read ({e}); pass an earlier step directory") from None
    stored = files.get("export_tokenizer")
    if not stored:
        return None
    if files.get("format") == files_lib.FILES_FORMAT:
        return str(files_lib.bundle_dir(step_dir.parent, stored))
    scratch = files_lib.EXIT_SCRATCH.make()
    return str(files_lib.decode_legacy(stored, scratch, only_tokenizer_files=True))


def read_meta(path: str | epath.PathLike) -> dict:
    """The ``meta`` JSON (run/model config, versions) of a checkpoint root or step directory."""
    step_dir = resolve_step_dir(path)
    try:
        return _read_json_item(step_dir, "meta")
    except _ItemError as e:
        raise UserError(f"checkpoint '{step_dir}' cannot be read ({e}); pass an earlier step directory") from None
