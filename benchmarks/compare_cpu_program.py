"""Is the compiled CPU train step the same program in two checkouts? (Timing-free evidence for CPU speed.)

    python benchmarks/compare_cpu_program.py --before /path/to/other/checkout [--remat none,full]

Compiles the tiny config's train step on XLA:CPU in each checkout (a subprocess with that
checkout on PYTHONPATH), strips what only names source locations (metadata, file and frame
tables), and compares the optimized HLO text. Identical HLO runs at the same speed, so a
change meant to leave the CPU path alone (e.g. gating a platform trick off CPU) is checked on a
shared machine where step timings are noise. Writes benchmarks/results/compare_cpu_program.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DUMP = r"""
import re, sys, jax
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules
from jaxcpt.train.config import load_train_config
from jaxcpt.train.setup import build_program

cfg = load_train_config(sys.argv[1], [f"model.remat={sys.argv[2]}"])
program = build_program(cfg, cfg.model, build_mesh(cfg.mesh, devices=jax.devices()), make_rules(cfg.sharding_rules), 1)
text = program.lower_train_step().compile().as_text()
text = re.sub(r", metadata=\{[^}]*\}", "", text)
text = re.sub(r"^HloModule [^,]*", "HloModule", text, flags=re.M)
text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)*", "", text, flags=re.M)
sys.stdout.write(text)
"""


def optimized_hlo(checkout: Path, remat: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout), "JAX_PLATFORMS": "cpu"}
    config = str(checkout / "configs" / "tiny.yaml")
    return subprocess.run([sys.executable, "-c", DUMP, config, remat], env=env, cwd=checkout, check=True,
                          capture_output=True, text=True).stdout


def git_commit(checkout: Path) -> str | None:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the other checkout")
    parser.add_argument("--remat", default="none,full")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_cpu_program.json"))
    args = parser.parse_args(argv)
    before, after = Path(args.before).resolve(), ROOT
    rows = []
    print(f"{'remat':<8} {'before sha256':<18} {'after sha256':<18} identical")
    for remat in args.remat.split(","):
        texts = [optimized_hlo(path, remat) for path in (before, after)]
        digests = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]
        rows.append({"remat": remat, "before_sha256": digests[0], "after_sha256": digests[1],
                     "identical": texts[0] == texts[1], "hlo_chars": [len(t) for t in texts]})
        print(f"{remat:<8} {digests[0]:<18} {digests[1]:<18} {texts[0] == texts[1]}")
    payload = {"benchmark": "compare_cpu_program", "config": "configs/tiny.yaml",
               "before": {"path": str(before), "git_commit": git_commit(before)},
               "after": {"path": str(after), "git_commit": git_commit(after)}, "rows": rows,
               "loadavg": os.getloadavg()}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
