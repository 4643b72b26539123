"""Which code each results JSON measured: its git commit, and whether that commit is on main's own line.

    python benchmarks/results_provenance.py                       # print the table
    python benchmarks/results_provenance.py --update docs/results-provenance.md

A figure measured on a branch before a merge is not a figure of main: this lists, for every JSON in
benchmarks/results/, the commit it records (top level, or under ``machine``) and whether that commit
is on main's first-parent line ("main"), only on a merged branch ("branch"), or not recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- provenance -->", "<!-- /provenance -->"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def recorded_commit(payload: dict) -> str | None:
    for key in ("git_commit", "commit"):
        if isinstance(payload.get(key), str):
            return payload[key]
    machine = payload.get("machine")
    return machine.get("git_commit") if isinstance(machine, dict) else None


def rows() -> list[tuple[str, str, str]]:
    first_parent = set(_git("rev-list", "--first-parent", "HEAD").split())
    out = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        commit = recorded_commit(json.loads(path.read_text()))
        if not commit:
            out.append((path.name, "not recorded", "-"))
            continue
        full = _git("rev-parse", "--verify", "--quiet", commit.split("+")[0].split("-")[0] + "^{commit}")
        where = "main" if full in first_parent else "branch" if full else "unknown"
        out.append((path.name, commit[:12] + (" (dirty)" if "dirty" in commit else ""), where))
    return out


def table() -> str:
    lines = ["| results JSON | commit | on |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {commit} | {where} |" for name, commit, where in rows()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", default=None, help="a docs page whose provenance block to rewrite")
    args = parser.parse_args(argv)
    if args.update is None:
        print(table())
        return 0
    page = Path(args.update)
    text = page.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{page}: no '{BEGIN}' ... '{END}' block to fill")
    head, rest = text.split(BEGIN, 1)
    page.write_text(head + BEGIN + "\n" + table() + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
