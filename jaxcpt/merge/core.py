"""``merge_models``: stream a base and CPT models tensor by tensor into one merged HF directory.

Per tensor: read it from every input (in HF layout), widen to float32, compute the
method's coefficients, combine, cast to the output dtype, append to the open shard.
Host memory holds the current tensor of every input and the result (plus, for a jaxcpt
checkpoint input, the one parameter it is reading; see inputs.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from jaxcpt.errors import UserError
from jaxcpt.merge.inputs import ModelInput, check_compatible, hf_tensors, output_dtype
from jaxcpt.merge.methods import Method, combine
from jaxcpt.merge.writer import ShardedWriter, atomic_directory

MERGE_INFO = "jaxcpt_merge.json"  # provenance written beside the weights


@dataclasses.dataclass(frozen=True)
class MergeResult:
    directory: Path
    dtype: str
    tensors: int
    linear_fallbacks: int  # SLERP only: tensors so nearly colinear that they were interpolated linearly
    files: list[str]
    notes: list[str]  # config settings in which the inputs differ (the merged config is the first CPT model's)
    seconds: float


def merge_models(base: ModelInput, models: list[ModelInput], method: Method, out: str | Path, *,
                 dtype: str | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False) -> MergeResult:
    """Merge ``models`` into ``base`` with ``method`` and write an HF directory at ``out``."""
    from jaxcpt.hf.convert import NUMPY_DTYPES, copy_companion_files, parse_size

    expected = {"linear": 1, "slerp": 1}.get(method.name)
    if expected is not None and len(models) != expected:
        raise UserError(f"{method.name} merges the base with exactly one model; got {len(models)} (task_arithmetic takes several)")
    if method.name == "task_arithmetic" and len(method.weights) != len(models):
        raise UserError(f"task_arithmetic got {len(method.weights)} weights for {len(models)} models; give one per --model")
    notes = check_compatible(base, models)
    inputs = [base, *models]
    tensors = hf_tensors(models[0].config)
    dtype = dtype or output_dtype(inputs, tensors)
    if dtype not in NUMPY_DTYPES:
        raise UserError(f"--dtype '{dtype}' is not one of {', '.join(NUMPY_DTYPES)}")
    np_dtype = NUMPY_DTYPES[dtype]
    start = time.monotonic()
    out = Path(out)
    fallbacks = 0
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, [(t.name, t.shape) for t in tensors], dtype, parse_size(max_shard_size))
        for tensor in tensors:
            values = [inp.read(tensor).astype(np.float32, copy=False) for inp in inputs]  # each [HF shape]
            coefficients, fell_back = method.coefficients(values)
            fallbacks += fell_back
            merged = combine(values, coefficients)
            del values
            writer.write(tensor.name, merged.astype(np_dtype, copy=False))
        files = writer.finish()
        (tmp / "config.json").write_text(json.dumps(models[0].hf_config(dtype), indent=2))
        companion = models[0].companion_dir()
        copied = copy_companion_files(companion, tmp) if companion else []
        if "generation_config.json" not in copied:
            from jaxcpt.hf.families import generation_config

            (tmp / "generation_config.json").write_text(json.dumps(generation_config(models[0].config), indent=2))
        info = {"method": method.name, **dataclasses.asdict(method), "dtype": dtype,
                "base": str(base.path), "models": [str(m.path) for m in models],
                "linear_fallbacks": fallbacks, "tensors": len(tensors), "config_notes": notes}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2))
    return MergeResult(out, dtype, len(tensors), fallbacks, files, notes, time.monotonic() - start)
