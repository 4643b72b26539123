"""Run one merge and print how far it raised this process's resident memory (a child of test_merge_memory).

``python merge_peak_rss.py BASE MODEL OUT [--load-all]``: imports everything first, then resets the
kernel's high-water mark of resident memory (writing 5 to /proc/self/clear_refs, Linux),
merges, and prints {"baseline_bytes", "peak_bytes"} as JSON: the peak of VmHWM minus the
resident memory just before the merge is what the merge itself needed, imports excluded.
``--load-all`` reads every tensor of BASE and keeps them instead of merging: the control
that shows the measurement sees a whole model held in memory.
"""

import json
import sys
from pathlib import Path

import orbax.checkpoint  # noqa: F401  (imported before the baseline, like everything the merge uses)
import safetensors.numpy  # noqa: F401

import jaxcpt.hf.convert  # noqa: F401
from jaxcpt.merge.core import merge_models
from jaxcpt.merge.inputs import hf_tensors, open_input
from jaxcpt.merge.methods import Slerp


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    base_path, model_path, out = sys.argv[1:4]
    base, model = open_input(base_path), open_input(model_path)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    baseline = _status_kib("VmRSS") * 1024
    if "--load-all" in sys.argv:
        held = [base.read(t) for t in hf_tensors(base.config)]
        del held
    else:
        merge_models(base, [model], Slerp(t=0.5), out)
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": _status_kib("VmHWM") * 1024}))


if __name__ == "__main__":
    main()
