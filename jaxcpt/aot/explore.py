"""``jaxcpt compile --explore``: the step compiled under every remat policy, memory against recomputation.

For each policy of ``jaxcpt.model.remat``: per-chip memory from the compiled program (device,
and host for the offloading one) and the forward work its backward pass reruns, counted from
the model's shapes (``remat.recompute_flops``; XLA's cost analysis counts a scanned body once
and a Pallas kernel not at all), as a share of the step's FLOPs without remat.
"""

from __future__ import annotations

import dataclasses

from jaxcpt.model import remat as remat_lib


@dataclasses.dataclass(frozen=True)
class RematRow:
    policy: str
    total_bytes: int  # device memory per chip (XLA's plan; the refusal's figure when the compiler refused)
    host_bytes: int  # pinned host memory per chip (offload)
    fits: bool
    refused: bool
    recompute_flops: float  # per step, all chips
    step_flops: float  # per step without recomputation, all chips
    pallas_kernel_calls: int
    compile_s: float

    @property
    def recompute_fraction(self) -> float:
        return self.recompute_flops / self.step_flops


def fused_attention(result) -> bool:
    """Whether the step's attention is one kernel whose backward reruns its whole forward (splash, cuDNN)."""
    return result.pallas_kernels > 0 or result.program.model_cfg.attention == "cudnn"


def row_of(policy: str, result) -> RematRow:
    program = result.program
    tokens = program.batch_size * program.seq_len
    m = result.memory
    return RematRow(policy, m.total, m.host_temporaries, m.fits, m.refused,
                    remat_lib.recompute_flops(program.model_cfg, policy, tokens, program.seq_len,
                                              fused_attention(result)),
                    remat_lib.step_flops(program.model_cfg, tokens, program.seq_len), result.pallas_kernels,
                    result.compile_s)


def explore_remat(load_config, resolve, topology, policies=remat_lib.POLICIES, on_row=None) -> list[RematRow]:
    """Compile the step for ``topology`` once per policy; ``load_config(overrides) -> TrainConfig``,
    ``resolve(cfg) -> ModelConfig``; ``on_row(row)`` sees each row as it is compiled."""
    from jaxcpt.aot.compiler import compile_train_step

    rows = []
    for policy in policies:
        cfg = load_config([f"model.remat={policy}"])
        row = row_of(policy, compile_train_step(cfg, resolve(cfg), topology))
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def format_table(rows: list[RematRow], hbm_bytes: int, markdown: bool = False) -> str:
    """The policies side by side: GiB per chip, whether it fits, and the recomputation."""
    header = ("policy", "device GiB/chip", "host GiB/chip", "fits", "recomputed TFLOP/step", "of the step")
    lines = []
    for r in rows:
        device = f"{r.total_bytes / 2**30:.2f}" + (" (refused)" if r.refused else "")
        lines.append((r.policy, device, f"{r.host_bytes / 2**30:.2f}" if r.host_bytes else "-",
                      "yes" if r.fits else "no", f"{r.recompute_flops / 1e12:,.1f}", f"{r.recompute_fraction:.1%}"))
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([f"remat policies (HBM {hbm_bytes / 2**30:.0f} GiB per chip):", fmt.format(*header)] +
                     [fmt.format(*line) for line in lines])
