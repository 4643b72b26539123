"""Per-chip memory of a compiled train step: XLA's plan, the sharding's prediction, and what to change.

XLA's ``memory_analysis()`` of the compiled step gives, per device: arguments (the train
state and the batch), outputs (the new state; donated, so they alias the arguments),
temporaries (activations kept for the backward pass, gradients, collectives' buffers)
and the generated code. What the state needs per chip is also known without XLA: each
leaf's shard shape under its sharding times its dtype's size. The two must agree; the
report shows both.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from jaxcpt.aot.topology import GiB

NEAR_LIMIT = 0.94  # the TPU runtime keeps a few percent of HBM for itself
_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED.*?HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM", re.S)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA writes sizes in binary units


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ``ShapeDtypeStruct`` (or arrays)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def replicated_bytes(tree) -> int:
    """Bytes of the leaves that every device holds whole (they do not shrink with more sharding)."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree) if leaf.sharding.is_fully_replicated)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per chip. ``params``, ``opt_state`` and ``batch`` are predicted from shardings; the rest is XLA's."""

    hbm: int
    params: int
    opt_state: int
    batch: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    refused: bool = False  # the TPU compiler stopped at its own HBM check: only the temporaries it reported are known
    host_temporaries: int = 0  # activations a host-offload remat policy keeps in the host's pinned memory, per chip

    @classmethod
    def from_refusal(cls, message: str, abstract_state: dict, abstract_batch: dict, hbm: int) -> "MemoryReport | None":
        """The report of a compile the TPU compiler refused for lack of HBM, or None for any other error.

        XLA:TPU stops compiling when the temporaries alone exceed the chip's usable HBM and says
        how much they needed ("HLO temporaries (166.82G) exceeds available HBM (15.75G)").
        """
        match = _REFUSAL.search(message)
        if match is None:
            return None
        temporaries = int(float(match.group(1)) * _UNITS[match.group(2)])
        state = per_device_bytes(abstract_state)
        return cls(hbm=hbm, params=per_device_bytes(abstract_state["params"]), opt_state=state - per_device_bytes(
            abstract_state["params"]), batch=per_device_bytes(abstract_batch), arguments=state + per_device_bytes(
            abstract_batch), outputs=state, aliased=state, temporaries=temporaries, code=0, refused=True)

    @classmethod
    def from_compiled(cls, compiled, abstract_state: dict, abstract_batch: dict, hbm: int) -> "MemoryReport":
        stats = compiled.memory_analysis()
        return cls(hbm=hbm, params=per_device_bytes(abstract_state["params"]),
                   opt_state=per_device_bytes(abstract_state["opt_state"]) + per_device_bytes(abstract_state["step"]),
                   batch=per_device_bytes(abstract_batch), arguments=int(stats.argument_size_in_bytes),
                   outputs=int(stats.output_size_in_bytes), aliased=int(stats.alias_size_in_bytes),
                   temporaries=int(stats.temp_size_in_bytes), code=int(stats.generated_code_size_in_bytes),
                   host_temporaries=int(getattr(stats, "host_temp_size_in_bytes", 0)))

    @property
    def state(self) -> int:
        return self.params + self.opt_state

    @property
    def total(self) -> int:
        """Peak bytes the program needs: donated outputs reuse their arguments' buffers."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    @property
    def near_limit(self) -> bool:
        return self.fits and self.total > NEAR_LIMIT * self.hbm

    def rows(self) -> list[tuple[str, int, str]]:
        return [
            ("parameters", self.params, "from the shardings"),
            ("optimizer state", self.opt_state, "from the shardings"),
            ("batch", self.batch, "from the shardings"),
            ("arguments (XLA)", self.arguments, f"{self.arguments - self.state - self.batch:+,d} bytes against the "
                                                "shardings' prediction (small buffers round up)"),
            ("outputs not aliased", self.outputs - self.aliased, "new state written over the donated one"),
            ("temporaries (XLA)", self.temporaries, "activations saved for backward, gradients, buffers"),
            ("generated code", self.code, ""),
        ] + ([("host temporaries", self.host_temporaries, "offloaded activations, in the host's pinned memory "
                                                         "(not HBM)")] if self.host_temporaries else [])

    def format(self) -> str:
        if self.refused:
            lines = ["memory per chip: the TPU compiler refused the step, its temporaries alone exceed the chip's "
                     "usable HBM (the arguments are the shardings' prediction; code not counted):"]
        else:
            lines = ["memory per chip (XLA's plan for the compiled train step):"]
        for name, value, note in self.rows():
            lines.append(f"  {name:<20} {_gib(value):>11}   {note}".rstrip())
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if self.near_limit:
            verdict += f" (above {NEAR_LIMIT:.0%}: the runtime's own share may not be left)"
        lines.append(f"  {'total':<20} {_gib(self.total):>11}   of {_gib(self.hbm)} HBM "
                     f"({self.total / self.hbm:.0%}): {verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        refused = fields.pop("refused")
        return {**{f"{k}_bytes": v for k, v in fields.items()}, "state_bytes": self.state, "total_bytes": self.total,
                "fits": self.fits, "fraction_of_hbm": self.total / self.hbm, "compiler_refused": refused}


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if abs(value) >= GiB / 10 else f"{value / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Lever:
    """One change that lowers per-chip memory, as dotted overrides, with what it should save."""

    overrides: tuple[str, ...]
    why: str


def levers(report: MemoryReport, *, remat: str, grad_accum_steps: int, micro_batch: int, batch_ways: int,
           loss_chunk_size: int, seq_len: int, logits_chunk_bytes: int, mesh_shape: dict,
           sharded_state_bytes: int) -> list[Lever]:
    """What to change when the step does not fit, with the numbers behind each; the larger part first.

    Estimates, not promises: each lever's exact effect is one more ``jaxcpt compile`` with
    its overrides (``--explore`` runs them).
    """
    state_levers, activation_levers = [], []
    activations = max(report.temporaries - report.params, 0)  # the gradient buffer does not shrink with these
    data, fsdp = mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1)
    if data % 2 == 0:
        state_levers.append(Lever(
            (f"mesh.data={data // 2}", f"mesh.fsdp={fsdp * 2}"),
            f"parameters + optimizer state take {_gib(report.state)} per chip, {_gib(sharded_state_bytes)} of it "
            f"sharded: fsdp {fsdp} -> {fsdp * 2} saves ~{_gib(sharded_state_bytes / 2)}"))
    else:
        state_levers.append(Lever((), f"parameters + optimizer state take {_gib(report.state)} per chip and the "
                                      "data axis has no chips to give to fsdp: use a larger slice"))
    if micro_batch >= 2 * batch_ways and (micro_batch // 2) % batch_ways == 0:
        activation_levers.append(Lever(
            (f"optim.grad_accum_steps={grad_accum_steps * 2}",),
            f"micro-batches of {micro_batch} -> {micro_batch // 2} rows halve the activations, which are most of "
            f"the {_gib(activations)} of temporaries beyond the gradients (saves up to ~{_gib(activations / 2)}; "
            "same optimizer batch)"))
    # one step down the remat ladder (jaxcpt.model.remat): each keeps less, reruns more
    stronger = {"none": "minimal", "minimal": "save_dot_except_mlp", "save_dot_except_mlp": "save_attention",
                "save_attention": "full"}.get(remat)
    if stronger:
        activation_levers.append(Lever(
            (f"model.remat={stronger}",),
            f"remat {remat} -> {stronger} keeps fewer of each layer's activations for the backward pass (part of "
            f"the {_gib(activations)}; costs recomputation)"))
    chunk = loss_chunk_size if 0 < loss_chunk_size < seq_len else seq_len
    if chunk > 128 and logits_chunk_bytes > 0.02 * report.hbm:
        activation_levers.append(Lever(
            (f"train.loss_chunk_size={max(128, chunk // 2)}",),
            f"one loss chunk's float32 logits take {_gib(logits_chunk_bytes)} per chip (and as much again for "
            f"their gradient): chunk {chunk} -> {max(128, chunk // 2)} halves that"))
    state_first = report.state >= activations
    return state_levers + activation_levers if state_first else activation_levers + state_levers
