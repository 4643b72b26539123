"""The shipped accelerator configs and the slice each must fit, with their recorded compile results.

One row per (config, topology). ``tests/test_aot_tpu.py`` compiles every row for its topology
and fails when the step does not fit or its memory per chip moved more than
``MEMORY_TOLERANCE`` from the JSON recorded in ``benchmarks/results/`` (written, with the git
commit, by ``benchmarks/compile_configs.py``, which also regenerates docs/accelerators.md).
GPU nodes are listed in ``SHIPPED_GPU`` and compiled by ``tests/test_aot_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

MEMORY_TOLERANCE = 0.10  # a change in the model, sharding or compiler that moves memory this much is re-recorded
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class ShippedCompile:
    name: str  # the results file is benchmarks/results/compile_<name>.json
    config: str  # relative to the repository root
    topology: str  # as `jaxcpt compile --topology` takes it
    overrides: tuple[str, ...] = ()
    why: str = ""  # what the row stands for, when it is not the config's own target
    checked_in_ci: bool = True  # False for a stand-in row recorded for the docs, whose own target has a row

    @property
    def results_path(self) -> Path:
        return RESULTS / f"compile_{self.name}.json"

    @property
    def remat_results_path(self) -> Path:
        return RESULTS / f"remat_{self.name}.json"

    def recorded(self) -> dict | None:
        """The recorded report of this row (the first topology of its JSON), or None when none is recorded."""
        if not self.results_path.is_file():
            return None
        payload = json.loads(self.results_path.read_text())
        return {**payload["reports"][0], "git_commit": payload.get("git_commit"), "jax": payload.get("jax"),
                "libtpu": payload.get("libtpu")}


SHIPPED = (
    ShippedCompile("llama3.1-8b-v5p64", "configs/llama3.1-8b-v5p64.yaml", "v5p-64"),
    # The 1-GPU config has no TPU slice of its own; on the smallest v5p slice with fsdp over its
    # 4 chips it is the 1B row of the remat table, and a check that splash and fsdp lower.
    ShippedCompile("llama3.2-1b_v5p-8", "configs/llama3.2-1b-1gpu.yaml", "v5p-8", ("mesh={data: 1, fsdp: -1}",),
                   why="the 1-GPU config on a v5p-8 (fsdp=4)", checked_in_ci=False),
    # The long-context worked example (docs/long-context.md): 32k-token rows, {fsdp: 2, context: 2}.
    ShippedCompile("llama3.2-1b-32k-v5p8", "configs/llama3.2-1b-32k-v5p8.yaml", "v5p-8"),
)

# The GPU configs on the node each is written for (config, topology, recorded JSON); tests/test_aot_gpu.py
# compiles each (jaxcpt.aot.gpu, needs the CUDA plugin) against the same 10% tolerance. The 1B config's own
# target is one H100, so its v5p-8 row above is only the remat table's 1B row and is not compiled in CI.
SHIPPED_GPU = (
    ("configs/qwen2.5-7b-8xh100.yaml", "h100-8", "benchmarks/results/compile_qwen2.5-7b-8xh100_h100-8.json"),
    ("configs/llama3.2-1b-1gpu.yaml", "h100-1", "benchmarks/results/compile_llama3.2-1b-1gpu_h100-1.json"),
)
NOT_FOR_ACCELERATORS = {"configs/tiny.yaml"}  # the CPU demo config


def memory_moved(total_bytes: int, recorded_bytes: int) -> float:
    """Relative change of per-chip memory from the recorded figure."""
    return abs(total_bytes - recorded_bytes) / recorded_bytes
