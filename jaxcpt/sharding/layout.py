"""The run's layout on the mesh, printed at start, and the batch split that must not silently replicate.

``logical_to_spec`` replicates a dimension whose size a mesh axis does not divide: right
for a weight (2 KV heads on tensor=4 are simply less sharded), wrong for the batch,
where it would compute the same rows on several devices without a word. So the batch is
checked here and a batch that cannot be split is an error naming the fix; everything
else is shown, with a note where a rule could not apply, so a user sees what each
device holds before the first step.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
from jax.sharding import Mesh

from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import abstract_model
from jaxcpt.sharding.rules import logical_to_spec


@dataclasses.dataclass(frozen=True)
class LayoutRow:
    name: str
    logical: tuple
    spec: tuple
    shape: tuple[int, ...]
    per_device: tuple[int, ...]
    note: str


def _row(name: str, logical, shape, mesh: Mesh, rules) -> LayoutRow:
    sizes = dict(mesh.shape)
    spec = tuple(logical_to_spec(logical, rules, sizes, shape))
    wanted = tuple(logical_to_spec(logical, rules, sizes))  # what the rules ask for, divisibility ignored
    spec = spec + (None,) * (len(shape) - len(spec))
    wanted = wanted + (None,) * (len(shape) - len(wanted))
    per_device, notes = [], []
    for dim, (axes, asked) in enumerate(zip(spec, wanted)):
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        asked_t = () if asked is None else (asked,) if isinstance(asked, str) else tuple(asked)
        per_device.append(shape[dim] // math.prod(sizes[a] for a in axes_t))
        dropped = [a for a in asked_t if a not in axes_t]
        if dropped:
            notes.append(f"{logical[dim]}={shape[dim]} not split over "
                         + "x".join(f"{a}={sizes[a]}" for a in dropped) + " (does not divide)")
    return LayoutRow(name, tuple(logical), spec, tuple(shape), tuple(per_device), "; ".join(notes))


def parameter_rows(model_cfg: ModelConfig, mesh: Mesh, rules) -> list[LayoutRow]:
    """One row per parameter: its logical axes, mesh axes and per-device shape."""
    state = nnx.state(abstract_model(model_cfg, rules), nnx.Param)
    rows = []
    for path, variable in state.flat_state():
        axes = variable.get_metadata().get("axes") or (None,) * len(variable.get_value().shape)
        rows.append(_row(".".join(str(p) for p in path), axes, variable.get_value().shape, mesh, rules))
    return rows


def activation_rows(model_cfg: ModelConfig, micro_batch: int, seq_len: int, loss_chunk: int, mesh: Mesh,
                    rules) -> list[LayoutRow]:
    """The main activations of one micro-batch, as the model constrains them."""
    c = model_cfg
    chunk = loss_chunk if 0 < loss_chunk < seq_len else seq_len
    width = c.head_size if c.mla is None else max(c.mla.qk_head_dim, c.mla.v_head_dim)  # MLA: the kernels' width
    return [
        _row("tokens", ("batch", "length"), (micro_batch, seq_len), mesh, rules),
        _row("hidden", ("batch", "length", "act_embed"), (micro_batch, seq_len, c.hidden_size), mesh, rules),
        _row("queries", ("batch", "length", "act_heads", None), (micro_batch, seq_len, c.num_heads, width),
             mesh, rules),
        _row("keys/values", ("batch", "length", "act_kv_heads", None),
             (micro_batch, seq_len, c.num_kv_heads, width), mesh, rules),
        _row("logits (loss chunk)", ("batch", "length", "act_vocab"), (micro_batch, chunk, c.padded_vocab_size), mesh, rules),
    ]


def format_layout(params: list[LayoutRow], activations: list[LayoutRow]) -> str:
    def spec_text(spec):
        return "(" + ", ".join("-" if a is None else a if isinstance(a, str) else "x".join(a) for a in spec) + ")"

    def block(title, rows):
        out = [title]
        width = max(len(r.name) for r in rows)
        for r in rows:
            logical = "(" + ", ".join(str(a) if a else "-" for a in r.logical) + ")"
            line = (f"  {r.name:<{width}}  {logical:<34} -> {spec_text(r.spec):<22} "
                    f"{str(list(r.shape)):<22} per device {list(r.per_device)}")
            out.append(line + (f"   [{r.note}]" if r.note else ""))
        return out

    return "\n".join(block("parameters: logical axes -> mesh axes, global shape, per-device shape", params)
                     + block("activations of one micro-batch:", activations))


def check_batch_split(batch_size: int, grad_accum_steps: int, mesh: Mesh, rules, process_count: int = 1) -> int:
    """Rows per micro-batch, or a UserError if they cannot be split over the batch's mesh axes.

    The batch's axes (rule 'batch', data x fsdp by default) must divide every micro-batch:
    otherwise the rows would be replicated over the axes that do not divide them.
    """
    if batch_size % process_count:
        raise UserError(f"train.batch_size ({batch_size}) must be a multiple of the host count ({process_count}): "
                        "each host feeds an equal share of every batch")
    micro = batch_size // grad_accum_steps
    table = dict(rules)
    axes = table.get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    sizes = dict(mesh.shape)
    axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
    ways = math.prod(sizes[a] for a in axes)
    if micro % ways:
        over = " x ".join(f"{a}={sizes[a]}" for a in axes)
        need = ways * grad_accum_steps
        raise UserError(
            f"train.batch_size={batch_size} with optim.grad_accum_steps={grad_accum_steps} gives micro-batches of "
            f"{micro} rows, which cannot be split over the batch axes {over} ({ways} devices); they would be "
            f"computed redundantly. Use a train.batch_size that is a multiple of {need}, fewer "
            f"optim.grad_accum_steps, or a mesh whose data/fsdp axes divide {micro}."
        )
    return micro
