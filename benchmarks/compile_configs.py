"""Compile every shipped accelerator config for its topology; record the results and regenerate docs/accelerators.md.

    python benchmarks/compile_configs.py                 # each row of jaxcpt.aot.shipped.SHIPPED, its own policy
    python benchmarks/compile_configs.py --remat         # also every remat policy (the docs' table)
    python benchmarks/compile_configs.py --only llama3.1-8b-v5p64 --remat --policies full,offload
    python benchmarks/compile_configs.py --docs-only     # regenerate the docs tables from the JSONs

Writes benchmarks/results/compile_<row>.json (what tests/test_aot_tpu.py compares a fresh compile
with, 10% tolerance) and remat_<row>.json (one entry per policy, merged with the policies
already recorded), each with the git commit and the machine. Compile one row at a time: an 8B
compile takes several GiB of host memory and 1-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only; never start a local TPU runtime
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "accelerators.md"


def compile_row(row, overrides=(), show=True):
    from jaxcpt.aot.command import resolve_model
    from jaxcpt.aot.compiler import compile_train_step
    from jaxcpt.aot.topology import parse_topology
    from jaxcpt.train.config import load_train_config

    cfg = load_train_config(str(ROOT / row.config), [*row.overrides, *overrides])
    model_cfg, source = resolve_model(cfg, None, None)
    result = compile_train_step(cfg, model_cfg, parse_topology(row.topology))
    if show:
        print(result.describe())
        print(result.memory.format(), flush=True)
    return result, source


def record_config(row):
    """Compile ``row`` with its config's own policy and write its compile_<row>.json; the result."""
    from jaxcpt.aot.command import report_payload
    from jaxcpt.aot.topology import check_libtpu

    result, source = compile_row(row)
    payload = report_payload(row.config, list(row.overrides), source, {"libtpu": check_libtpu()}, [result.as_dict()])
    row.results_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {row.results_path.relative_to(ROOT)}")
    return result, source


def record_remat(row, policies, known=None) -> None:
    """Compile ``row`` under each policy (``known``: {policy: (result, source)} already compiled) into remat_<row>.json."""
    from jaxcpt.aot.command import git_commit, report_payload
    from jaxcpt.aot.explore import row_of
    from jaxcpt.aot.topology import check_libtpu

    path = row.remat_results_path
    payload = json.loads(path.read_text()) if path.is_file() else None
    entries = {e["policy"]: e for e in (payload or {}).get("policies", [])}
    for policy in policies:
        print(f"\n== {row.name}: model.remat={policy}", flush=True)
        start = time.perf_counter()
        result, source = (known or {}).get(policy) or compile_row(row, [f"model.remat={policy}"])
        entry = row_of(policy, result).__dict__ | {"git_commit": git_commit(), "wall_s": time.perf_counter() - start,
                                                   "loadavg": os.getloadavg()}
        entries[policy] = {**entry, "recompute_fraction": entry["recompute_flops"] / entry["step_flops"]}
        base = report_payload(row.config, list(row.overrides), source, {"libtpu": check_libtpu()}, [])
        base.pop("reports")
        payload = {**base, "benchmark": "compile_remat", "topology": row.topology,
                   "hbm_bytes": result.memory.hbm, "batch_size": result.program.batch_size,
                   "seq_len": result.program.seq_len, "micro_batch": result.program.micro_batch,
                   "policies": [entries[p] for p in _policy_order(entries)]}
        path.write_text(json.dumps(payload, indent=2) + "\n")  # after every policy: a long run keeps what it did
        print(f"wrote {path.relative_to(ROOT)}")


def _policy_order(entries):
    from jaxcpt.model.remat import POLICIES

    return [p for p in POLICIES if p in entries]


def docs_tables() -> dict[str, str]:
    """Markdown for each generated block of docs/accelerators.md, from the recorded JSONs."""
    from jaxcpt.aot.explore import RematRow, format_table
    from jaxcpt.aot.shipped import SHIPPED

    lines = ["| config | topology | remat | GiB per chip | of HBM | fits | compiled at (git) | jax / libtpu |",
             "|---|---|---|---|---|---|---|---|"]
    remat_blocks = []
    for row in SHIPPED:
        recorded = row.recorded()
        if recorded:
            m = recorded["memory"]
            lines.append(f"| `{row.config}`{' (' + row.why + ')' if row.why else ''} | {row.topology} | "
                         f"{recorded['remat']} | {m['total_bytes'] / 2**30:.2f} | {m['fraction_of_hbm']:.0%} | "
                         f"{'yes' if m['fits'] else 'NO'} | {(recorded['git_commit'] or '?')[:12]} | "
                         f"{recorded['jax']} / {recorded['libtpu']} |")
        if row.remat_results_path.is_file():
            payload = json.loads(row.remat_results_path.read_text())
            fields = RematRow.__dataclass_fields__
            rows = [RematRow(**{k: v for k, v in e.items() if k in fields}) for e in payload["policies"]]
            commits = sorted({(e.get("git_commit") or "?")[:12] for e in payload["policies"]})
            remat_blocks.append(
                f"**`{row.config}` on {row.topology}** ({payload['batch_size']} x {payload['seq_len']} tokens per "
                f"step, micro-batches of {payload['micro_batch']} rows; compiled at {', '.join(commits)}, jax "
                f"{payload['jax']}, libtpu {payload['libtpu']}; "
                f"`benchmarks/results/{row.remat_results_path.name}`)\n\n"
                + format_table(rows, payload["hbm_bytes"], markdown=True))
    return {"shipped": "\n".join(lines), "remat": "\n\n".join(remat_blocks)}


def write_docs() -> None:
    text = DOCS.read_text()
    for name, block in docs_tables().items():
        pattern = re.compile(rf"(<!-- generated:{name} .*?-->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOCS}: no '<!-- generated:{name} ... -->' block to fill")
        text = pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)
    DOCS.write_text(text)
    print(f"wrote {DOCS.relative_to(ROOT)}")


def main(argv=None) -> int:
    from jaxcpt.aot.shipped import SHIPPED
    from jaxcpt.model.remat import POLICIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated row names (default: every row)")
    parser.add_argument("--remat", action="store_true", help="also compile every remat policy")
    parser.add_argument("--policies", default=",".join(POLICIES), help="with --remat: which policies")
    parser.add_argument("--no-config", action="store_true", help="skip the config's own policy (with --remat)")
    parser.add_argument("--docs-only", action="store_true", help="only regenerate docs/accelerators.md")
    args = parser.parse_args(argv)
    rows = [r for r in SHIPPED if args.only is None or r.name in args.only.split(",")]
    if not args.docs_only:
        for row in rows:
            known = {}
            if not args.no_config:
                print(f"\n== {row.name}: {row.config} on {row.topology}", flush=True)
                result, source = record_config(row)
                known[result.program.model_cfg.remat] = (result, source)
            if args.remat:
                record_remat(row, [p for p in args.policies.split(",") if p], known)
    write_docs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
