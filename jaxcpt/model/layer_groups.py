"""Decoders whose layers differ in shape: each weight stacks over the layers that have it, scanned in segments.

Gemma 4's layers come in up to four shapes: sliding and full attention (the full layers with their own
head_dim and KV heads, ``global_head_dim`` / ``global_kv_heads``, and with ``attention_k_eq_v`` no v
projection), each either computing its keys and values or, in the last ``kv_shared_layers``, reusing
those of the last earlier layer of its kind (no k/v weights; with ``double_wide_mlp`` an MLP twice as
wide). A Qwen3.5 hybrid has two shapes: Gated DeltaNet and attention layers (``jaxcpt.model.hybrid``).

Both are stored alike: every ``LayerStack`` weight stacks over the layers that have it (``layers_of``),
so no layer holds weights it does not use, and a weight of another shape has a name of its own
(``full_q`` [L_full, E, H, D_full] beside ``q`` [L_sliding, E, H, D]; ``wide_gate`` beside ``gate``),
which ``base_name`` maps back to the block's name (``q``, ``gate``) when a layer's weights are sliced out.

The forward pass cuts the layers into segments, each a run of repeats of a short pattern of layer
signatures (a layer's kind and which weights it has; ``segments``): Gemma 4 E2B's 35 layers are 3 repeats
of [4 sliding, 1 full] computing their own K/V, then 4 repeats of the same pattern reusing them. Each
segment is one ``lax.scan`` over its repeats with the pattern unrolled inside a step (``scan_layers``), so
compile time grows with the pattern and the number of segments, not with depth. A model of one shape
(every dense family) never comes here: its one uniform stack scans as before, cond-free.

KV sharing in the scan: the carry holds, per attention kind, the keys and values the last layer of that
kind computed (training: [B, T, K, D] rotated keys and values; decoding: that layer's whole cache), and a
KV-shared layer attends to them, as transformers' ``shared_kv_states``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError
from jaxcpt.model import lora as lora_lib
from jaxcpt.model import moe_beside
from jaxcpt.model import per_layer_input
from jaxcpt.model import remat as remat_lib
from jaxcpt.model.config import LINEAR, MAX_PATTERN, ModelConfig

FULL, SLIDING = "full_attention", "sliding_attention"
FULL_PREFIX, WIDE_PREFIX = "full_", "wide_"  # weights of the full-attention layers / of the double-wide MLPs
QUERY = ("q", "o", "q_bias", "o_bias", "q_norm")  # every attention layer has these
KEY_VALUE = ("k", "v", "k_bias", "v_bias", "k_norm")  # only layers that compute their own keys and values
MLP = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
PER_LAYER_INPUT = per_layer_input.SCANNED_NAME  # each layer's [B, T, P] input, scanned beside the weights
GEMMA4_OPTIONS = ("global_head_dim", "global_kv_heads", "attention_k_eq_v", "kv_shared_layers", "double_wide_mlp",
                  "per_layer_input")


def grouped(cfg: ModelConfig) -> bool:
    """Whether the model's layers differ in shape (or take per-layer inputs, or have experts beside the MLP), so scan
    in segments here."""
    return any(bool(getattr(cfg, name)) for name in GEMMA4_OPTIONS) or (cfg.moe is not None and cfg.moe.beside_mlp)


def split_global(cfg: ModelConfig) -> bool:
    """Whether full-attention layers stack their attention weights apart (``full_*``): another shape."""
    return bool(cfg.global_head_dim or cfg.global_kv_heads)


def base_name(name: str) -> str:
    """The block's name for a stacked weight: ``full_q`` -> ``q``, ``wide_gate_lora_a`` -> ``gate_lora_a``."""
    for prefix in (FULL_PREFIX, WIDE_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def layers_of(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The layers (in order) whose weights the LayerStack parameter ``name`` stacks."""
    root = name.split("_lora_")[0]  # an adapter stacks like its projection
    base = base_name(root)
    kinds, every, shared = cfg.layer_kinds(), range(cfg.num_layers), set(cfg.kv_shared)
    if root.startswith("lin_"):
        return cfg.linear_layers
    if base in QUERY + KEY_VALUE:
        if split_global(cfg):
            full = root.startswith(FULL_PREFIX)
            pick = [i for i in every if kinds[i] != LINEAR and (kinds[i] == FULL) == full]
        else:
            pick = list(cfg.attention_layers)
        if base in KEY_VALUE:  # KV-shared layers attend to an earlier layer's keys and values
            pick = [i for i in pick if i not in shared]
        if base in ("v", "v_bias") and cfg.attention_k_eq_v:  # full layers use their keys as values
            pick = [i for i in pick if kinds[i] != FULL]
        return tuple(pick)
    if base in MLP and cfg.double_wide_mlp and shared:
        wide = root.startswith(WIDE_PREFIX)
        return tuple(i for i in every if (i in shared) == wide)
    return tuple(every)


def stack_names(cfg: ModelConfig) -> list[tuple[str, tuple, tuple, str]]:
    """(name, shape after [L], logical axes after 'layers', init) of every LayerStack weight of a grouped model."""
    e, h, f = cfg.hidden_size, cfg.num_heads, cfg.intermediate_size
    norm_init = "zeros" if cfg.norm_plus_one else "ones"
    out = []
    prefixes = ((SLIDING, ""), (FULL, FULL_PREFIX)) if split_global(cfg) else ((SLIDING, ""),)
    hq = 2 * h if cfg.attn_output_gate else h
    for kind, prefix in prefixes:
        d, k = cfg.kind_head_dim(kind), cfg.kind_kv_heads(kind)
        out += [(prefix + "q", (e, hq, d), ("embed", "heads", "head_dim"), "normal"),
                (prefix + "k", (e, k, d), ("embed", "kv_heads", "head_dim"), "normal"),
                (prefix + "v", (e, k, d), ("embed", "kv_heads", "head_dim"), "normal"),
                (prefix + "o", (h, d, e), ("heads", "head_dim", "embed"), "normal")]
        if cfg.qkv_bias:
            out += [(prefix + "q_bias", (h, d), ("heads", "head_dim"), "zeros"),
                    (prefix + "k_bias", (k, d), ("kv_heads", "head_dim"), "zeros"),
                    (prefix + "v_bias", (k, d), ("kv_heads", "head_dim"), "zeros")]
        if cfg.o_bias:
            out.append((prefix + "o_bias", (e,), ("embed",), "zeros"))
        if cfg.qk_norm:
            out += [(prefix + "q_norm", (d,), ("head_dim",), norm_init),
                    (prefix + "k_norm", (d,), ("head_dim",), norm_init)]
    widths = (("", f), (WIDE_PREFIX, 2 * f)) if cfg.double_wide_mlp and cfg.kv_shared_layers else (("", f),)
    for prefix, width in widths:
        out += [(prefix + "gate", (e, width), ("embed", "mlp"), "normal"),
                (prefix + "up", (e, width), ("embed", "mlp"), "normal"),
                (prefix + "down", (width, e), ("mlp", "embed"), "normal")]
        if cfg.mlp_bias:
            out += [(prefix + "gate_bias", (width,), ("mlp",), "zeros"), (prefix + "up_bias", (width,), ("mlp",), "zeros"),
                    (prefix + "down_bias", (e,), ("embed",), "zeros")]
    if cfg.pre_norms:
        out += [("attn_norm", (e,), ("norm",), norm_init), ("mlp_norm", (e,), ("norm",), norm_init)]
    if cfg.post_norms:
        out += [("post_attn_norm", (e,), ("norm",), norm_init), ("post_mlp_norm", (e,), ("norm",), norm_init)]
    if cfg.per_layer_input:
        p = cfg.per_layer_input
        out += [("ple_gate", (e, p), ("embed", "per_layer"), "normal"),  # per_layer_input_gate
                ("ple_proj", (p, e), ("per_layer", "embed"), "normal"),  # per_layer_projection
                ("ple_norm", (e,), ("norm",), norm_init)]  # post_per_layer_input_norm
    if cfg.layer_scalar:
        out.append(("layer_scalar", (), (), "ones"))
    if cfg.moe is not None:  # experts beside the MLP (Gemma 4; jaxcpt.model.moe_beside), on every layer
        out += moe_beside.stack_rows(cfg)
    return [row for row in out if layers_of(cfg, row[0])]  # e.g. no full_v with attention_k_eq_v


def create_params(stack, cfg: ModelConfig, p) -> list[str]:
    """Create a grouped model's weights on ``stack`` (each [L_name, ...]); returns their names.

    ``p(shape, axes, init)`` makes one parameter (``transformer._param``).
    """
    names = []
    for name, shape, axes, init in stack_names(cfg):
        setattr(stack, name, p((len(layers_of(cfg, name)), *shape), ("layers", *axes), init))
        names.append(name)
    if cfg.lora is not None:  # adapters beside every stack of a target: full_q_lora_a beside full_q, ...
        rngs = p.args[0]  # p is functools.partial(_param, rngs, cfg)
        for name in [n for n in names if base_name(n) in cfg.lora.targets]:
            a, b = lora_lib.adapter_params(rngs.params(), getattr(stack, name), base_name(name), cfg.lora.rank)
            for adapter, param in zip(lora_lib.adapter_names(name), (a, b)):
                setattr(stack, adapter, param)
                names.append(adapter)
    return names


def adapted_stacks(cfg: ModelConfig, target: str) -> list[str]:
    """The LayerStack weights a LoRA ``target`` adapts: the target itself in a model of one shape; in a grouped
    model every stack of that projection (``q`` and ``full_q``; ``gate`` and ``wide_gate``)."""
    if not grouped(cfg):
        return [target]
    return [name for name, _, _, _ in stack_names(cfg) if base_name(name) == target]


def num_adapter_params(cfg: ModelConfig) -> int:
    """LoRA parameters of a grouped model: rank x (inputs + outputs) of every adapted stack, per layer."""
    if cfg.lora is None:
        return 0
    total = 0
    for name, shape, _, _ in stack_names(cfg):
        target = base_name(name)
        if target in cfg.lora.targets:
            n_in = lora_lib.PROJECTIONS[target]
            total += len(layers_of(cfg, name)) * cfg.lora.rank * (math.prod(shape[:n_in]) + math.prod(shape[n_in:]))
    return total


def num_params(cfg: ModelConfig) -> int:
    """Parameters of a grouped model as stored (padded vocabulary rows included, tied embedding once)."""
    layers = sum(len(layers_of(cfg, name)) * math.prod(shape) for name, shape, _, _ in stack_names(cfg))
    vocab, e = cfg.padded_vocab_size, cfg.hidden_size
    total = vocab * e * (1 if cfg.tie_word_embeddings else 2) + layers + e
    if cfg.per_layer_input:
        width = cfg.num_layers * cfg.per_layer_input
        total += per_layer_input.padded_vocab(cfg) * width + e * width + cfg.per_layer_input
    return total + num_adapter_params(cfg)


def validate(cfg: ModelConfig) -> None:
    """The combinations a grouped model supports; each refusal names the option and the fix."""
    if cfg.rope_proportion != 1.0 and not 0 < cfg.rope_proportion <= 1:
        raise ConfigError(f"rope_proportion ({cfg.rope_proportion}) must be in (0, 1]")
    if cfg.per_layer_vocab_size is not None and not cfg.per_layer_input:
        raise ConfigError("per_layer_vocab_size is set but per_layer_input is null; set both or neither")
    if not grouped(cfg):
        return
    if cfg.global_head_dim is not None and cfg.global_head_dim % 2:
        raise ConfigError(f"global_head_dim ({cfg.global_head_dim}) must be even for RoPE")
    if cfg.global_kv_heads and cfg.num_heads % cfg.global_kv_heads:
        raise ConfigError(f"num_heads ({cfg.num_heads}) must be a multiple of global_kv_heads ({cfg.global_kv_heads})")
    if not 0 <= cfg.kv_shared_layers < cfg.num_layers:
        raise ConfigError(f"kv_shared_layers ({cfg.kv_shared_layers}) must be in [0, num_layers={cfg.num_layers}): "
                          "the first layer of each kind computes its own keys and values")
    kinds = cfg.layer_kinds()
    producers = {kinds[i] for i in range(cfg.num_layers - cfg.kv_shared_layers)}
    orphans = sorted({kinds[i] for i in cfg.kv_shared} - producers)
    if orphans:
        raise ConfigError(f"the kv-shared layers include {orphans} layers, but no earlier layer of that kind computes "
                          "keys and values to share; lower kv_shared_layers or change layer_types")
    unsupported = [(cfg.moe is not None and not cfg.moe.beside_mlp, "moe in place of the dense MLP (Gemma 4's "
                    "experts sit beside it: model.moe.beside_mlp)"),
                   (bool(cfg.linear_layers), "linear_attention layers"),
                   (cfg.rope_layers is not None, "rope_layers (NoPE layers)"),
                   (cfg.qk_norm_scope != "head", "qk_norm_scope=projection")]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"{what} cannot be combined with the Gemma 4 layer options "
                              f"({', '.join(n for n in GEMMA4_OPTIONS if getattr(cfg, n))})")


# --- segments: the scan plan ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first layer
    repeats: int  # scan steps
    kinds: tuple[str, ...]  # layer kind of each position of the pattern

    @property
    def stop(self) -> int:
        return self.start + self.repeats * len(self.kinds)


def segments(cfg: ModelConfig, sets: dict[str, tuple[int, ...]]) -> tuple[Segment, ...]:
    """Cut the layers into runs of a repeated pattern of signatures (kind, weights it has), patterns of at most
    MAX_PATTERN layers, so that the fewest layers are unrolled (what compile time grows with), then the fewest
    segments: a small dynamic program over where each segment starts."""
    members = {name: frozenset(layers) for name, layers in sets.items()}
    kinds, n = cfg.layer_kinds(), cfg.num_layers
    sig = [(kinds[i], frozenset(name for name, m in members.items() if i in m)) for i in range(n)]
    best: list[tuple[int, int, tuple[int, int]] | None] = [None] * n + [(0, 0, (0, 0))]  # (unrolled, segments, step)
    for start in range(n - 1, -1, -1):
        for period in range(1, min(MAX_PATTERN, n - start) + 1):
            reps = 0
            while start + (reps + 1) * period <= n and sig[start + reps * period: start + (reps + 1) * period] == \
                    sig[start: start + period]:
                reps += 1
                unrolled, count, _ = best[start + reps * period]
                option = (unrolled + period, count + 1, (reps, period))
                if best[start] is None or option[:2] < best[start][:2]:
                    best[start] = option
    out, start = [], 0
    while start < n:
        reps, period = best[start][2]
        out.append(Segment(start, reps, tuple(kinds[start: start + period])))
        start += reps * period
    return tuple(out)


def scan_layers(cfg: ModelConfig, arrays: dict, sets: dict, carry, layer_fn):
    """Run every layer in order over ``carry``; returns (carry, {name: [n_name, ...] per-layer outputs}).

    ``arrays``: name -> [n_name, ...] stacked over the layers ``sets[name]`` lists (weights, per-layer
    inputs, caches). ``layer_fn(kind, params, carry) -> (carry, outputs)`` runs one layer: ``params``
    holds that layer's slice of every array that has it, by ``base_name``; ``outputs`` ({base name: value})
    are stacked like the array of the same name (e.g. an updated cache).
    """
    collected: dict[str, list] = {}
    for seg in segments(cfg, sets):
        period = len(seg.kinds)
        positions = {name: [pos for pos in range(period) if seg.start + pos in sets[name]] for name in arrays}
        positions = {name: pos for name, pos in positions.items() if pos}
        xs = {}
        for name, pos in positions.items():  # [n_name, ...] -> this segment's [repeats, per repeat, ...]
            first = sets[name].index(seg.start + pos[0])
            count = seg.repeats * len(pos)
            xs[name] = arrays[name][first: first + count].reshape(seg.repeats, len(pos), *arrays[name].shape[1:])

        def body(carry, group, seg=seg, positions=positions):
            outs: dict[str, list] = {}
            for pos, kind in enumerate(seg.kinds):
                own = {name: group[name][p.index(pos)] for name, p in positions.items() if pos in p}
                carry, result = layer_fn(kind, {base_name(n): w for n, w in own.items()}, carry)
                full_names = {base_name(n): n for n in own}
                for key, value in result.items():
                    outs.setdefault(full_names[key], []).append(value)
            # [per repeat, ...]; an output may be a pytree (an MoE layer's RouterStats)
            return carry, {name: jax.tree.map(lambda *v: jnp.stack(v), *values) for name, values in outs.items()}

        carry, ys = jax.lax.scan(body, carry, xs)
        for name, y in ys.items():  # [repeats, per repeat, ...] -> the segment's run of [n_name, ...]
            collected.setdefault(name, []).append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), y))
    return carry, {name: jax.tree.map(lambda *p: jnp.concatenate(p), *parts) for name, parts in collected.items()}


def proportional_rope(cos, sin, proportion: float):
    """Gemma 4's 'proportional' RoPE from full-head tables cos/sin [B, T, D]: only the lowest
    int(proportion * D // 2) frequency pairs turn; the others have frequency 0 (cos 1, sin 0)."""
    d = cos.shape[-1]
    turning = (jnp.arange(d) % (d // 2)) < int(proportion * d // 2)  # [D]
    return jnp.where(turning, cos, 1.0), jnp.where(turning, sin, 0.0)


# --- the forward pass and decoding ----------------------------------------------------------------


def _arrays(model, per_layer) -> tuple[dict, dict]:
    cfg = model.config
    arrays = model.layers.arrays()
    sets = {name: layers_of(cfg, name) for name in arrays}
    if per_layer is not None:
        arrays[PER_LAYER_INPUT] = jnp.moveaxis(per_layer, 2, 0)  # [L, B, T, P]
        sets[PER_LAYER_INPUT] = tuple(range(cfg.num_layers))
    return arrays, sets


def _shared_init(cfg: ModelConfig, lead: tuple[int, ...]) -> dict:
    """Zero keys and values per attention kind, [*lead, K, D] each (only when layers share them)."""
    if not cfg.kv_shared_layers:
        return {}
    dt = jnp.dtype(cfg.dtype)
    kinds = sorted({k for k in cfg.layer_kinds() if k != LINEAR})
    return {kind: (jnp.zeros((*lead, cfg.kind_kv_heads(kind), cfg.kind_head_dim(kind)), dt),) * 2 for kind in kinds}


def forward(model, x, per_layer, ropes: dict, block, attend, scanned: dict | None = None):
    """Hidden states after every layer (before the final norm) and, with experts, each layer's routing statistics:
    x [B, T, E] -> ([B, T, E], ``moe.RouterStats`` [L, ...] or None).

    ``block`` is ``decoder_block`` with cfg, rules and valid bound; ``attend`` the packed-row attention;
    ``scanned``: more [L, ...] arrays every layer takes its slice of (the MoE selection bias).
    """
    cfg = model.config
    arrays, sets = _arrays(model, per_layer)
    for name, value in (scanned or {}).items():
        arrays[name], sets[name] = value, tuple(range(cfg.num_layers))
    moe = cfg.moe is not None

    def one_layer(p, h, shared_kv, kind):
        def attend_kv(q, k, v, kind_):
            if k is None:  # a KV-shared layer: the keys and values of the last layer of its kind
                k, v = shared_kv
            return attend(q, k, v, kind_)[0], (k, v)

        return block(p, h, None, {kind: ropes[kind]}, attend=attend_kv)

    one_layer = remat_lib.checkpointed(one_layer, cfg, static_argnums=(3,))

    def layer_fn(kind, p, carry):
        h, shared = carry
        h, aux = one_layer(p, h, shared.get(kind), kind)
        kv, stats = aux if moe else (aux, None)  # an MoE block adds its router stats
        if kind in shared:
            shared = {**shared, kind: kv}
        return (h, shared), ({"router": stats} if moe else {})

    (x, _), out = scan_layers(cfg, arrays, sets, (x, _shared_init(cfg, x.shape[:2])), layer_fn)
    return x, out.get("router")


def kv_stacks(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """The KV caches of a grouped model, one per k weight: {name: (layers, K, D)} (``k``; ``full_k`` when split)."""
    out = {"k": (len(layers_of(cfg, "k")), cfg.num_kv_heads, cfg.head_size)}
    if split_global(cfg):
        out[FULL_PREFIX + "k"] = (len(layers_of(cfg, FULL_PREFIX + "k")), cfg.kind_kv_heads(FULL), cfg.kind_head_dim(FULL))
    return {name: shape for name, shape in out.items() if shape[0]}


def init_caches(cfg: ModelConfig, batch: int, slots: int) -> dict:
    """{k weight name: zeros [layers, B, S, K, D]}: the caches of the layers that compute keys and values."""
    dt = jnp.dtype(cfg.dtype)
    return {name: jnp.zeros((n, batch, slots, k, d), dt) for name, (n, k, d) in kv_stacks(cfg).items()}


def decode(model, x, per_layer, ropes: dict, cache_k: dict, cache_v: dict, block, attend_cached):
    """Decoding through a grouped model: x [B, T, E] continues each row from the caches.

    ``attend_cached(q, k, v, kind, layer_k, layer_v) -> (out, (layer_k, layer_v))`` writes k/v into the
    layer's cache and attends over it; with k None (a KV-shared layer) it only attends. Returns
    (x, new cache_k, new cache_v).
    """
    cfg = model.config
    arrays, sets = _arrays(model, per_layer)
    for name in cache_k:  # cache_k / full_cache_k, stacked over the layers of the k weight they belong to
        prefix = name[: len(name) - 1]  # "" or "full_"
        for which, caches in (("cache_k", cache_k), ("cache_v", cache_v)):
            arrays[prefix + which] = caches[name]
            sets[prefix + which] = layers_of(cfg, name)
    batch, slots = next(iter(cache_k.values())).shape[1:3]

    def layer_fn(kind, p, carry):
        h, shared = carry
        own = "cache_k" in p
        layer_k, layer_v = (p.pop("cache_k"), p.pop("cache_v")) if own else shared[kind]

        def attend(q, k, v, kind_):
            return attend_cached(q, k, v, kind_, layer_k, layer_v)

        h, aux = block(p, h, None, {kind: ropes[kind]}, attend=attend)
        layer_k, layer_v = aux[0] if cfg.moe is not None else aux  # an MoE block adds its router stats
        if kind in shared:
            shared = {**shared, kind: (layer_k, layer_v)}
        return (h, shared), ({"cache_k": layer_k, "cache_v": layer_v} if own else {})

    (x, _), out = scan_layers(cfg, arrays, sets, (x, _shared_init(cfg, (batch, slots))), layer_fn)
    new_k = {name: out[name[: len(name) - 1] + "cache_k"] for name in cache_k}
    new_v = {name: out[name[: len(name) - 1] + "cache_v"] for name in cache_k}
    return x, new_k, new_v
