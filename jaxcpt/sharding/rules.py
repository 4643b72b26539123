"""The one table that maps logical axis names onto mesh axes.

Every parameter names its logical axes where it is created (``embed``, ``heads`` ...);
activations name theirs at sharding constraints (``batch``, ``length``, ``act_*``).
This table says which mesh axis each name is split over. Parameters and activations
use different names for the model width (``embed`` vs ``act_embed``) because FSDP
splits the weights' width but not the activations' (their batch is already split
over ``fsdp``).

Each logical name has exactly one rule. Where a rule cannot apply (the mesh axis is
already used by an earlier dimension of the same array, or its size does not divide
the dimension, e.g. 2 KV heads on a tensor axis of 4) that dimension is replicated
instead: correct, merely less sharded, and reported by ``describe_layout``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcpt.errors import UserError

MeshAxes = str | tuple[str, ...] | None
STANDARD_AXES = ("data", "fsdp", "tensor", "expert", "context")

# logical name -> mesh axis (or axes, major first), None = replicated.
DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    # the expert axis also splits the batch: outside the MoE MLPs its devices are data-parallel
    "batch": ("data", "fsdp", "expert"),
    "length": "context",  # context parallelism: each row's positions split over devices (model/context_parallel.py)
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "exp": "expert",  # the stacked experts of MoE layers (jaxcpt.model.moe): expert parallelism
    # Gated DeltaNet (hybrid models): value heads split like attention heads; the q|k|v conv channels stay
    # whole (a tensor split would cut across the seams where q, k and v are split apart); FSDP splits embed
    "linear_heads": "tensor",
    "linear_conv": None,
    "conv_width": None,
    # Gemma 4's per-layer inputs: the [vocab, L*P] table splits its rows like the embedding, its L*P axis like embed
    "per_layer": "fsdp",
    "latent": None,  # MLA's compressed query / key-value width (DeepSeek-V3's q_lora_rank, kv_lora_rank): small
    "lora_rank": None,  # LoRA adapters' rank axis: small, replicated; their other axes are their base weight's
}


def make_rules(overrides: Mapping[str, MeshAxes | list[str]] | None = None) -> tuple[tuple[str, MeshAxes], ...]:
    """The default table with user overrides applied, as a hashable tuple of pairs."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if name not in DEFAULT_RULES:
            import difflib

            close = difflib.get_close_matches(name, list(DEFAULT_RULES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known names: {', '.join(DEFAULT_RULES)}"
            raise UserError(f"sharding rule for unknown logical axis '{name}'{hint}")
        rules[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(rules.items())


def check_rules(rules: Sequence[tuple[str, MeshAxes]], mesh: Mesh) -> None:
    """Raise a clear error if a rule names a mesh axis that is neither in the mesh nor a standard one.

    A standard axis (data, fsdp, tensor) left out of the mesh counts as size 1, so
    ``mesh: {data: -1}`` works with the default rules; any other name is a typo.
    """
    for name, axes in rules:
        for axis in _as_tuple(axes):
            if axis not in mesh.axis_names and axis not in STANDARD_AXES:
                raise UserError(
                    f"sharding rule '{name}' -> '{axis}' names a mesh axis that does not exist; "
                    f"the mesh axes are {', '.join(mesh.axis_names)}. Fix the rule or add the axis to 'mesh'."
                )


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Sequence[tuple[str, MeshAxes]],
    mesh_shape: Mapping[str, int],
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry ``logical_axes``.

    ``mesh_shape`` maps mesh axis name -> size. With ``shape`` given, mesh axes
    whose size does not divide the dimension are dropped (that dimension is then
    less sharded, never wrongly sharded).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise UserError(f"logical axis '{name}' has no sharding rule; known names: {', '.join(table)}")
        chosen = []
        for axis in _as_tuple(table[name]):
            if axis in used or mesh_shape.get(axis, 1) == 1:
                continue
            chosen.append(axis)
        if shape is not None:
            while chosen and shape[dim] % math.prod(mesh_shape[a] for a in chosen) != 0:
                chosen.pop()
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, rules, logical_axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, dict(mesh.shape), shape))


def constrain(x, logical_axes: Sequence[str | None], rules):
    """Sharding constraint on an activation, when traced under a mesh (``jax.set_mesh``); else a no-op.

    A no-op outside a mesh keeps the model usable eagerly on one device and under plain jit.
    """
    import jax

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, dict(mesh.shape), x.shape)
    return jax.lax.with_sharding_constraint(x, spec)
