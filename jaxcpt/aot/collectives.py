"""The collectives of a compiled program, read from its HLO text: what a sharding really moves.

``collectives(compiled.as_text())`` lists every all-gather, all-reduce, reduce-scatter, all-to-all
and collective-permute with its result shape and bytes, and the computation it sits in. A
collective inside a scanned layer stack's loop body is listed once (it runs once per layer);
async pairs (``all-gather-start`` / ``-done``) are counted by their start.
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape_text)
            if dtype in _DTYPE_BYTES]


def collectives(hlo_text: str) -> list[dict]:
    """[{kind, dtype, shape, bytes, computation}] for every collective of ``hlo_text`` (result shape: for an
    async start, its last tuple element, the output buffer)."""
    out, computation = [], None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            computation = head.group(1)
            continue
        match = _OP.match(line)
        if not match:
            continue
        arrays = _arrays(match.group(1))
        if not arrays:
            continue
        dtype, shape = arrays[-1]
        out.append({"kind": match.group(2), "dtype": dtype, "shape": list(shape),
                    "bytes": _DTYPE_BYTES[dtype] * math.prod(shape), "computation": computation})
    return out


def summarize(found: list[dict], top: int = 12) -> dict:
    """Counts and bytes per kind, and the ``top`` largest collectives with how often each (kind, shape) occurs."""
    kinds = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for c in found:
        kinds[c["kind"]]["count"] += 1
        kinds[c["kind"]]["bytes"] += c["bytes"]
    grouped = collections.Counter((c["kind"], c["dtype"], tuple(c["shape"]), c["bytes"]) for c in found)
    largest = sorted(grouped.items(), key=lambda item: -item[0][3])[:top]
    return {"by_kind": dict(kinds),
            "largest": [{"kind": k, "dtype": d, "shape": list(s), "bytes": b, "count": n}
                        for (k, d, s, b), n in largest]}


def format_summary(summary: dict) -> str:
    lines = ["collectives (each listed once; a loop body's run once per layer):"]
    for kind, v in sorted(summary["by_kind"].items()):
        lines.append(f"  {kind:<20} {v['count']:>5} ops  {v['bytes'] / 2**20:>10.1f} MiB")
    lines.append("  largest:")
    for c in summary["largest"]:
        lines.append(f"    {c['kind']:<20} {c['dtype']}{c['shape']}  {c['bytes'] / 2**20:.1f} MiB  x{c['count']}")
    return "\n".join(lines)
