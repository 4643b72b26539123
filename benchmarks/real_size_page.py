"""The tables of docs/real-size.md, rendered from the real-size results JSONs.

    python benchmarks/real_size_page.py --update docs/real-size.md     # after benchmarks/real_size.py runs

The page marks each generated block with the results it shows (file stems under benchmarks/results/):

    <!-- real-size phases real_size_qwen2.5-0.5b -->              one run, phase by phase
    <!-- real-size compare real_size_qwen2.5-0.5b real_size_qwen2.5-0.5b_0acb231 -->   two runs side by side
    ...
    <!-- real-size end -->

``tests/test_real_size.py`` checks that each block is what this renders from the JSONs today, and
tests/test_docs_generated.py that every figure in it is one of the JSON's values.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GiB, MiB = 2**30, 2**20
BLOCK = re.compile(r"(<!-- real-size (phases|compare) ([\w. -]+?) -->\n)(.*?)(<!-- real-size end -->)", re.S)
SHORT_PHASE_S = 0.5  # phases shorter than this (the gaps between marked phases) are shown only when they hold the peak


def _load(stem: str, results: Path) -> dict | None:
    path = results / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(stem: str) -> str:
    shape, *commit = stem.removeprefix("real_size_").split("_")
    code = f" --code WORKTREE_AT_{commit[0]}" if commit else ""
    return (f"Not measured yet: `python benchmarks/real_size.py --shape {shape}{code}` writes "
            f"`{stem}.json` into `benchmarks/results/`; then `python benchmarks/real_size_page.py --update docs/real-size.md`.")


def _about(result: dict, stem: str) -> str:
    machine = result["machine"]
    return (f"`benchmarks/results/{stem}.json`: commit {result['commit'][:12]}, {machine['cpu_model']} "
            f"({machine['cpu_count']} cores, load {machine['load_average'][0]:.1f} at the start); train state "
            f"{result['state_bytes'] / GiB:.2f} GiB (parameters {result['param_bytes'] / GiB:.2f} GiB), baseline "
            f"{result['baseline_rss'] / GiB:.2f} GiB, bound {result['rss_bound'] / GiB:.2f} GiB; "
            f"{result['total_seconds']:.1f} s in all.")


def phases_block(result: dict | None, stem: str) -> str:
    """One run: per process its phases (RSS at the start, peak, seconds), its peak; checkpoint and export bytes."""
    if result is None:
        return _missing(stem)
    rows = ["| process | phase | RSS at start GiB | peak RSS GiB | seconds |", "| --- | --- | ---: | ---: | ---: |"]
    for proc in result["processes"]:
        peak = proc["peak_rss"] or 0
        for ph in proc["phases"]:
            if ph["seconds"] >= SHORT_PHASE_S or ph["peak_rss"] == peak:
                rows.append(f"| {proc['process']} | {ph['phase']} | {ph['start_rss'] / GiB:.2f} | "
                            f"{ph['peak_rss'] / GiB:.2f} | {ph['seconds']:.1f} |")
        rows.append(f"| {proc['process']} | **process peak** (exit {proc['rc']}) | | **{peak / GiB:.2f}** | "
                    f"{proc['seconds']:.1f} |")
    items = ["| checkpoint item (step 2) | bytes | MiB |", "| --- | ---: | ---: |"]
    items += [f"| {name} | {size:,} | {size / MiB:.2f} |" for name, size in result.get("checkpoint_items", {}).items()]
    if result.get("export_bytes") is not None:
        items.append(f"| export (`jaxcpt export-hf`) | {result['export_bytes']:,} | {result['export_bytes'] / MiB:.2f} |")
    error = [f"**The run failed:** {result['error']}"] if result.get("error") else []
    return "\n".join([_about(result, stem), "", *rows, "", *items, *error])


def compare_block(results: list[dict | None], stems: list[str]) -> str:
    """Runs side by side: each process's peak RSS and seconds, checkpoint non-state bytes, total seconds."""
    missing = [_missing(stem) for result, stem in zip(results, stems) if result is None]
    if missing:
        return "\n".join(missing)
    names = [f"{r['commit'][:7]}" for r in results]
    head = "| | " + " | ".join(f"{n} peak RSS GiB" for n in names) + " | " + " | ".join(f"{n} seconds" for n in names) + " |"
    rows = [head, "| --- |" + " ---: |" * (2 * len(results))]
    for process in [p["process"] for p in results[0]["processes"]]:
        procs = [next((p for p in r["processes"] if p["process"] == process), None) for r in results]
        rows.append(f"| {process} | " + " | ".join(f"{p['peak_rss'] / GiB:.2f}" if p and p["peak_rss"] else "-" for p in procs)
                    + " | " + " | ".join(f"{p['seconds']:.1f}" if p else "-" for p in procs) + " |")
    rows.append("| all four processes | " + " | ".join(" " for _ in results) + " | "
                + " | ".join(f"{r['total_seconds']:.1f}" for r in results) + " |")
    sizes = ["| checkpoint items besides the state | MiB |", "| --- | ---: |"]
    sizes += [f"| {name} | {r['checkpoint_non_state_bytes'] / MiB:.2f} |" for name, r in zip(names, results)]
    sources = ", ".join(f"`benchmarks/results/{stem}.json`" for stem in stems)
    return "\n".join([f"From {sources}.", "", *rows, "", *sizes])


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every real-size block rendered afresh from the JSONs it names."""
    def fill(match: re.Match) -> str:
        kind, stems = match.group(2), match.group(3).split()
        loaded = [_load(stem, results) for stem in stems]
        body = phases_block(loaded[0], stems[0]) if kind == "phases" else compare_block(loaded, stems)
        return f"{match.group(1)}{body}\n{match.group(5)}"

    return BLOCK.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", required=True, help="the page whose real-size blocks to render (docs/real-size.md)")
    args = parser.parse_args()
    page = Path(args.update)
    text = page.read_text()
    if not BLOCK.search(text):
        print(f"'{page}' has no <!-- real-size phases|compare ... --> ... <!-- real-size end --> block", file=sys.stderr)
        return 2
    page.write_text(render(text))
    print(f"rendered the real-size blocks of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
