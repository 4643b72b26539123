"""Expert parallelism: each device of an expert group runs only its own experts, on all of the group's tokens.

With ``mesh: {expert: P, ...}`` the rule table splits the stacked experts ``[X, E, F]`` over the
``expert`` axis (``exp -> expert``) and the batch over ``(data, fsdp, expert)``. Left to XLA's SPMD
partitioner (GSPMD), the grouped matmul of ``jaxcpt.model.moe`` is not partitioned as expert
parallelism: every device receives the *whole batch's* token copies and their products are
all-reduced over all devices (4 GiB all-reduces per layer for Qwen3-30B-A3B on v5p-64), and the
experts' weights are gathered too (docs/moe.md, "Expert parallelism", has the HLO). This module
places the communication by hand under ``jax.shard_map`` instead, moving only the expert group's tokens:

1. **all-gather the tokens** ``[n, E]`` (and their routing, ``[n, k]``) over the expert group: each
   device now holds the group's ``N = P * n`` tokens;
2. each device runs **its X / P local experts** on the token copies routed to them (the same
   ``grouped_experts`` function, so routing and expert variants are shared with the one-device path;
   copies routed elsewhere get expert id ``X / P``, which the grouped matmul leaves outside every
   group, and weight 0);
3. **reduce-scatter the outputs** ``[N, E]`` over the group: each token's sum over its ``k`` experts
   ends on the device the token came from.

Why this rather than an all-to-all of token copies (MaxText's default, with ``ragged_all_to_all``):
it is dropless by construction and needs no capacity: every device sees every token of its group,
so every copy is computed by the owner of its expert whatever the routing. An all-to-all needs a
static receive buffer; the dropless size is ``P * n * min(k, X / P)`` rows, no smaller than the
``N * min(k, X / P)`` rows the local grouped matmul takes here, so the all-to-all saves memory only
with a capacity that may drop tokens. In bytes moved per device the all-gather sends ``(P-1) * n``
token rows and the all-to-all ``~n * k * (P-1)/P`` copies: the gather is the cheaper of the two while
``P <= k + 1`` (Qwen3-30B-A3B: k = 8, expert axis 8), and both are far below gathering the weights
(``3 * X * E * F`` per layer; 1.2 GB in bfloat16 for Qwen3-30B-A3B) whenever ``N * E`` is smaller.

**Other axes.** FSDP's split of the experts' ``embed`` dimension is gathered where the ``shard_map``
starts (as for a dense layer under FSDP; its gradient is reduce-scattered back). The ``mlp``
dimension stays split over ``tensor`` (Megatron style: gate and up are column-parallel, down is
row-parallel and its partial sums are added over ``tensor`` after the reduce-scatter), unless an
expert parameter has no ``mlp`` dimension (a down-projection bias), which would then be added once
per tensor shard: then ``mlp`` is gathered too. ``data``, ``fsdp`` and ``context`` split the tokens
into independent expert groups. When the batch does not divide over the expert axis (the rule table
then replicates the tokens over it) no gather is needed, and the outputs are summed over the group
instead of scattered.

Routing (``moe.route``) and the routing statistics stay outside, under GSPMD, on each device's own
tokens: they are per token, so nothing changes there.

Shapes: h [B, T, E]; experts/weights [B, T, k]; expert parameters [X, ...] (no layer axis);
per device n = local tokens, N = P * n, Xl = X / P.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcpt.sharding.rules import logical_to_spec

ExpertFn = Callable[[jax.Array, jax.Array, jax.Array, dict], jax.Array]


def _axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: Sequence[str]):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def expert_axes(rules, num_experts: int, mesh_shape: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """The mesh axes the stacked experts are split over (the ``exp`` rule as the rule table resolves it for
    ``num_experts``), major first; () when they are not split. Without ``mesh_shape``: the mesh being traced under."""
    if mesh_shape is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return ()
        mesh_shape = dict(mesh.shape)
    spec = logical_to_spec(("exp",), rules, mesh_shape, (num_experts,))
    return _axes(spec[0]) if len(spec) else ()


def is_active(rules, num_experts: int) -> bool:
    """True when the mesh being traced under splits the experts over more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    return math.prod(dict(mesh.shape)[a] for a in expert_axes(rules, num_experts, dict(mesh.shape))) > 1


def experts_over_mesh(h: jax.Array, experts: jax.Array, weights: jax.Array, params: dict[str, jax.Array],
                      param_axes: dict[str, tuple], expert_fn: ExpertFn, rules) -> jax.Array:
    """The experts' combined outputs [B, T, E] for h [B, T, E], each token's k experts computed where they live.

    ``experts``/``weights`` [B, T, k]: the routing (``moe.route``); ``params``: the layer's expert parameters,
    each [X, ...] with logical axes ``param_axes[name]`` (``exp`` first); ``expert_fn(x [N, E], experts [N, s],
    weights [N, s], params) -> [N, E]`` computes and combines the experts of ``params`` (``moe.grouped_experts``),
    on this device's X / P experts, ignoring copies whose expert id is X / P (past every group).
    """
    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape)
    num_experts = experts_count(params)
    group = expert_axes(rules, num_experts, shape)  # G: the expert group's mesh axes
    token_spec = logical_to_spec(("batch", "length", None), rules, shape, h.shape)
    token_axes = {a for entry in token_spec for a in _axes(entry)}
    gathered = tuple(a for a in group if a in token_axes)  # tokens differ along these: all-gather
    replicated = tuple(a for a in group if a not in token_axes)  # tokens equal along these: sum the outputs
    mlp = _mlp_axes(params, param_axes, rules, shape, num_experts, token_axes)

    def spec(axes):
        return PartitionSpec(*[_entry(group) if a == "exp" else _entry(mlp) if a == "mlp" else None for a in axes])

    param_specs = {name: spec(param_axes[name]) for name in params}
    route_spec = PartitionSpec(*tuple(token_spec)[:2])
    local = functools.partial(_local_experts, expert_fn=expert_fn, group=group, gathered=gathered,
                              summed=replicated + mlp, num_local=num_experts // math.prod(shape[a] for a in group))
    out_spec = PartitionSpec(*tuple(token_spec)[:2], None)
    # check_vma=False (as ring attention does): with jax 0.10.2's varying-axes checks on, the gradient of tokens
    # replicated over the expert axis came out wrong (tests/test_expert_parallel.py compares with one device)
    mapped = jax.shard_map(local, in_specs=(out_spec, route_spec, route_spec, param_specs), out_specs=out_spec,
                           check_vma=False)
    return mapped(h, experts, weights, params)


def experts_count(params: dict[str, jax.Array]) -> int:
    sizes = {w.shape[0] for w in params.values()}
    if len(sizes) != 1:
        raise ValueError(f"expert parameters disagree on the expert count: { {k: v.shape for k, v in params.items()} }")
    return sizes.pop()


def _mlp_axes(params, param_axes, rules, shape, num_experts, token_axes) -> tuple[str, ...]:
    """The mesh axes the experts' ``mlp`` dimension stays split over inside the shard_map (its partial sums are
    added after): the rule table's, less any that also split the tokens (different tokens cannot be summed);
    none when a parameter has no ``mlp`` dimension (its term would be added once per shard)."""
    # LoRA adapters (jaxcpt.model.expert_lora) are exempt: gate_up's A has no mlp axis but its product meets a B split
    # like gate/up, and down's update is linear in the split hidden, so its partial sums add up like down's
    if any("mlp" not in param_axes[name] for name in params if not name.endswith(("_lora_a", "_lora_b"))):
        return ()
    name = next(iter(params))
    axes = param_axes[name]
    spec = tuple(logical_to_spec(("exp", "mlp"), rules, shape, (num_experts, params[name].shape[axes.index("mlp")])))
    return tuple(a for a in _axes(spec[1] if len(spec) > 1 else None) if a not in token_axes)


def _local_experts(h, experts, weights, params, *, expert_fn, group, gathered, summed, num_local):
    """Per device: h [b, t, E], experts/weights [b, t, k] (this device's tokens), params [Xl, ...] -> [b, t, E]."""
    b, t, width = h.shape
    k = experts.shape[-1]
    x = h.reshape(b * t, width)  # [n, E]
    experts, weights = experts.reshape(b * t, k), weights.reshape(b * t, k)  # [n, k]
    if gathered:  # every token of the expert group, in the same order on each of its devices
        x, experts, weights = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (x, experts, weights))
    first = jax.lax.axis_index(group) * num_local  # this device's first expert
    local = (experts >= first) & (experts < first + num_local)  # [N, k]
    # A token's k experts are distinct, so at most min(k, Xl) of them are here: keep those slots (first, by a
    # stable sort on "not local") and the grouped matmul runs on N * min(k, Xl) rows instead of N * k.
    slots = min(k, num_local)
    if slots < k:
        keep = jnp.argsort((~local).astype(jnp.int32), axis=1, stable=True)[:, :slots]  # [N, s]
        experts, weights, local = (jnp.take_along_axis(a, keep, axis=1) for a in (experts, weights, local))
    # copies for other devices' experts: id Xl lies past every group of the grouped matmul (ragged_dot gives
    # zero rows outside the groups), and weight 0 keeps them out of the combined output either way
    ids = jnp.where(local, experts - first, num_local).astype(experts.dtype)  # [N, s]
    out = expert_fn(x, ids, jnp.where(local, weights, 0).astype(weights.dtype), params)  # [N, E] local experts' part
    if gathered:  # each token's sum over the group's devices, back on the device it came from
        out = jax.lax.psum_scatter(out, gathered, scatter_dimension=0, tiled=True)  # [n, E]
    if summed:  # tokens replicated over the group, or the mlp dimension split: partial sums
        out = jax.lax.psum(out, summed)
    return out.reshape(b, t, width)
