"""What trains, and when: ``optim.trainable`` phases over parameter paths and rows.

Language and domain adaptation rarely trains everything from the first step: after a
vocabulary extension the new embedding rows are trained alone first (so random-ish rows
do not push gradients through a good model), then everything; after a depth expansion
only the new blocks train; "all but the embeddings" is another common choice. A config
says it in one entry::

    optim:
      trainable:
        - {params: ["embedding[new]", "lm_head[new]"], steps: 500}   # phase 0: the new rows only
        - {params: ["*"]}                                             # phase 1: everything, to the end

Patterns are shell globs over dotted parameter paths (``embedding``, ``lm_head``,
``final_norm``, ``layers.q``, ``layers.mlp_norm`` ...; ``jaxcpt train --check`` lists
them); ``!pattern`` excludes. A ``[selector]`` suffix trains part of a tensor, along its
vocabulary axis (``embedding``, ``lm_head``) or its layer axis (``layers.*``):
``[new]`` = the rows or blocks an adaptation step added (read from the starting model's
``jaxcpt_adaptation.json``: ``new_token_ids``, ``inserted_layers``), ``[a:b]`` = an
explicit range.

How it is built (optax, with two small transforms optax lacks):

- Parameters no phase trains are not part of the optimizer at all: the trainer
  differentiates and updates only ``trainable_keys`` (a flat ``{path: array}`` view), so
  frozen parameters carry no optimizer state, no gradient and no accumulator.
- Parameters are grouped by the set of phases that train them; ``optax.multi_transform``
  gives each group its own Adam state behind a *phase gate*, which outside the group's
  phases passes zero updates and leaves the state untouched, so a group that starts
  training in a later phase starts with fresh moments and bias correction, like a new Adam.
- Row-level training (``[selector]``) multiplies both the gradients (before clipping, so
  frozen rows do not count in the norm) and the final updates (after weight decay, which
  would otherwise shrink frozen rows) by the phase's row mask. Frozen rows of a partly
  trained tensor stay bitwise unchanged; its optimizer state covers the whole tensor.
- The learning rate is applied after the gates, on the global step, so every group follows
  the run's schedule.

The phase is a function of the optimizer step, so a resume continues in the right phase
with the right optimizer state: nothing about phases is stored beyond the step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcpt.config import ConfigError, field


@dataclasses.dataclass(frozen=True)
class TrainablePhase:
    """One phase of ``optim.trainable``: which parameters train, and for how many steps."""

    params: list[str] = field(["*"], help="globs over parameter paths, '!glob' to exclude, optional [new] or [a:b] "
                                         "row/layer selector (e.g. 'embedding[new]', 'layers.*', '!embedding')")
    steps: int | None = field(None, help="length of the phase in optimizer steps; null = until the end of the run "
                                         "(last phase only)")


_PATTERN = re.compile(r"^(?P<neg>!?)(?P<glob>[^\[\]]+?)(?:\[(?P<sel>[^\]]*)\])?$")

# A tensor's axis that a selector picks along, by its logical axis name.
SELECTABLE_AXES = ("vocab", "layers")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    axes: tuple  # logical axis names, e.g. ('vocab', 'embed')
    dtype: str = "float32"  # as stored


@dataclasses.dataclass(frozen=True)
class Selection:
    """Part of one tensor: indices along one axis (``None`` indices = the whole tensor)."""

    axis: int | None = None
    indices: tuple[int, ...] | None = None

    @property
    def whole(self) -> bool:
        return self.indices is None

    def mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 0/1 mask broadcastable to ``shape``."""
        dims = [1] * len(shape)
        dims[self.axis] = shape[self.axis]
        mask = np.zeros(dims, np.float32)
        index = [slice(None)] * len(shape)
        index[self.axis] = list(self.indices)
        mask[tuple(index)] = 1.0
        return mask


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
    """The resolved phases: for each phase, {path: Selection} of what trains in it."""

    phases: tuple[dict[str, Selection], ...]
    starts: tuple[int, ...]  # first step of each phase
    params: dict[str, ParamInfo]

    @property
    def keys(self) -> tuple[str, ...]:
        """Paths some phase trains, in the parameters' order: the optimizer's flat view."""
        return tuple(p for p in self.params if any(p in phase for phase in self.phases))

    @property
    def trains_everything(self) -> bool:
        return len(self.phases) == 1 and len(self.phases[0]) == len(self.params) and all(
            s.whole for s in self.phases[0].values())

    def describe(self) -> str:
        if self.trains_everything:
            return "trainable    every parameter"
        lines = []
        for i, (phase, start) in enumerate(zip(self.phases, self.starts)):
            end = self.starts[i + 1] if i + 1 < len(self.starts) else None
            span = f"steps {start}-{end - 1}" if end is not None else f"steps {start}-end"
            parts = [p if s.whole else f"{p}[{_ranges(s.indices)}]" for p, s in phase.items()]
            frozen = [p for p in self.params if p not in phase]
            lines.append(f"trainable    phase {i} ({span}): {', '.join(parts) or 'nothing'}"
                         + (f"; frozen: {', '.join(frozen)}" if frozen else ""))
        return "\n".join(lines)


def _ranges(indices) -> str:
    out, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}:{prev + 1}")
            start = prev = i
    if start is not None:
        out.append(f"{start}:{prev + 1}")
    return ",".join(out)


# Parameters transformers keeps as buffers, loaded from the checkpoint and never trained: Gemma 4's per-layer
# ``layer_scalar``. A phase leaves them frozen, as training the reference model does, unless one of its
# patterns names them (``layers.layer_scalar``, ``*layer_scalar``).
BUFFER_NAMES = ("layer_scalar",)


def resolve_trainable(phases: list[TrainablePhase], params: dict[str, ParamInfo], adaptation: dict | None,
                      total_steps: int) -> TrainableSpec:
    """Match every phase's patterns against the parameter paths; errors name the pattern and the fix."""
    phases = list(phases) or [TrainablePhase()]
    for i, phase in enumerate(phases):
        if phase.steps is None and i != len(phases) - 1:
            raise ConfigError(f"optim.trainable[{i}]: only the last phase may leave steps unset (it runs to the end)")
        if phase.steps is not None and phase.steps < 1:
            raise ConfigError(f"optim.trainable[{i}].steps must be >= 1, got {phase.steps}")
    starts, step = [], 0
    for phase in phases:
        starts.append(step)
        step += phase.steps or 0
    if starts[-1] >= total_steps and len(phases) > 1:
        raise ConfigError(f"optim.trainable: phase {len(phases) - 1} starts at step {starts[-1]}, after the run's "
                          f"train.steps={total_steps}")
    resolved = tuple(_resolve_phase(i, phase, params, adaptation) for i, phase in enumerate(phases))
    if not any(resolved):
        raise ConfigError("optim.trainable selects no parameter in any phase")
    return TrainableSpec(resolved, tuple(starts), dict(params))


def _resolve_phase(index: int, phase: TrainablePhase, params: dict[str, ParamInfo], adaptation) -> dict[str, Selection]:
    where = f"optim.trainable[{index}]"
    includes, excludes = [], []
    for text in phase.params:
        match = _PATTERN.match(text.strip())
        if not match:
            raise ConfigError(f"{where}: pattern {text!r} is not 'glob', '!glob' or 'glob[selector]'")
        negative, glob, selector = bool(match["neg"]), match["glob"], match["sel"]
        matched = [p for p in params if fnmatch.fnmatchcase(p, glob)]
        if not matched:
            import difflib

            close = difflib.get_close_matches(glob, list(params), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; parameters are {', '.join(params)}"
            raise ConfigError(f"{where}: pattern {text!r} matches no parameter{hint}")
        if negative and selector is not None:
            raise ConfigError(f"{where}: '!{glob}' excludes whole parameters; a selector cannot be excluded")
        (excludes if negative else includes).append((matched, selector))
    if not includes:
        includes = [(list(params), None)]
    chosen: dict[str, Selection] = {}
    for matched, selector in includes:
        for path in matched:
            selection = Selection() if selector is None else _select(where, path, selector, params[path], adaptation)
            chosen[path] = _union(chosen.get(path), selection)
    excluded = {p for matched, _ in excludes for p in matched}
    # a buffer is named by a pattern that matches it with more than '*' for its last part ('layers.layer_scalar',
    # 'layers.*scalar'), not by '*' or 'layers.*', which mean "the parameters"
    named = {p for matched, _ in includes for p in matched}
    specific = [g for g in phase.params if not g.strip().startswith("!")
                and _PATTERN.match(g.strip())["glob"].rsplit(".", 1)[-1] != "*"]
    excluded |= {p for p in params if p.rsplit(".", 1)[-1] in BUFFER_NAMES
                 and not (p in named and any(fnmatch.fnmatchcase(p, _PATTERN.match(g.strip())["glob"]) for g in specific))}
    return {p: s for p, s in chosen.items() if p not in excluded and (s.whole or s.indices)}


def _select(where: str, path: str, selector: str, info: ParamInfo, adaptation) -> Selection:
    axis_name = next((a for a in SELECTABLE_AXES if a in info.axes), None)
    if axis_name is None:
        raise ConfigError(f"{where}: '{path}[{selector}]': only tensors with a vocabulary or layer axis can be "
                          "partly trained (embedding, lm_head, layers.*)")
    axis = info.axes.index(axis_name)
    size = info.shape[axis]
    if selector.strip() == "new":
        if adaptation is None:
            raise ConfigError(f"{where}: '{path}[new]' needs the starting model's jaxcpt_adaptation.json (written by "
                              "jaxcpt extend-vocab / expand-depth); this model has none. Give a range like [32000:]")
        if axis_name == "vocab":
            if not adaptation.get("new_token_ids"):
                raise ConfigError(f"{where}: '{path}[new]': the starting model's vocabulary was never extended")
            start, end = adaptation["new_token_ids"]
            indices = range(start, end)
        else:
            if not adaptation.get("inserted_layers"):
                raise ConfigError(f"{where}: '{path}[new]': the starting model has no inserted blocks")
            indices = adaptation["inserted_layers"]
    else:
        match = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", selector)
        if not match:
            raise ConfigError(f"{where}: selector [{selector}] of '{path}' is not 'new' or a range 'a:b'")
        start = int(match[1]) if match[1] else 0
        end = int(match[2]) if match[2] else size
        indices = range(*slice(start, end).indices(size))
    indices = tuple(sorted(set(int(i) for i in indices)))
    if any(not 0 <= i < size for i in indices):
        raise ConfigError(f"{where}: '{path}[{selector}]' selects indices outside its {axis_name} axis of size {size}")
    return Selection(axis, indices)


def _union(a: Selection | None, b: Selection) -> Selection:
    if a is None:
        return b
    if a.whole or b.whole:
        return Selection()
    return Selection(a.axis, tuple(sorted(set(a.indices) | set(b.indices))))


# -- the optimizer pieces -------------------------------------------------------------
class PhaseState(NamedTuple):
    count: jax.Array  # training steps seen, skipped ones included (optimizer.skip_update advances it)
    inner: Any = None


def phase_index(starts: tuple[int, ...], count: jax.Array) -> jax.Array:
    """Index of the phase that the update after ``count`` earlier updates belongs to."""
    return jnp.sum(count >= jnp.asarray(starts[1:], jnp.int32)).astype(jnp.int32) if len(starts) > 1 else jnp.int32(0)


def gated(inner: optax.GradientTransformation, active_phases: tuple[int, ...],
          starts: tuple[int, ...]) -> optax.GradientTransformation:
    """``inner`` during ``active_phases``; elsewhere zero updates and ``inner``'s state untouched.

    optax has masks over parameters but none over steps; this one keeps a group's Adam
    state fresh until the group first trains.
    """

    def init(params):
        return PhaseState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        phase = phase_index(starts, state.count)
        active = jnp.isin(phase, jnp.asarray(active_phases, jnp.int32))

        def on(_):
            return inner.update(updates, state.inner, params)

        def off(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        new_updates, new_inner = jax.lax.cond(active, on, off, None)
        return new_updates, PhaseState(state.count + 1, new_inner)

    return optax.GradientTransformation(init, update)


def row_masks(spec: TrainableSpec) -> optax.GradientTransformation:
    """Multiply partly trained tensors by their current phase's 0/1 row mask (identity elsewhere)."""
    masks: dict[str, list[np.ndarray]] = {}
    for path in spec.keys:
        shape = spec.params[path].shape
        per_phase = [phase.get(path) for phase in spec.phases]
        if all(s is not None and s.whole for s in per_phase):
            continue
        masks[path] = [np.zeros([1] * len(shape), np.float32) if s is None
                       else np.ones([1] * len(shape), np.float32) if s.whole else s.mask(shape) for s in per_phase]

    def init(params):
        del params
        return PhaseState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        phase = phase_index(spec.starts, state.count)
        out = dict(updates)
        for path, per_phase in masks.items():
            mask = jnp.asarray(per_phase[0])
            for i in range(1, len(per_phase)):
                mask = jnp.where(phase == i, jnp.asarray(per_phase[i]), mask)
            out[path] = updates[path] * mask.astype(updates[path].dtype)
        return out, PhaseState(state.count + 1)

    return optax.GradientTransformation(init, update)


def has_row_masks(spec: TrainableSpec) -> bool:
    return any(not (all(p.get(path) is not None and p.get(path).whole for p in spec.phases)) for path in spec.keys)


def group_labels(spec: TrainableSpec) -> dict[str, str]:
    """{path: label} of each trainable path's group: the phases that train it."""
    return {path: "phases_" + "_".join(str(i) for i, phase in enumerate(spec.phases) if path in phase)
            for path in spec.keys}


def label_phases(label: str) -> tuple[int, ...]:
    return tuple(int(i) for i in label.removeprefix("phases_").split("_"))
