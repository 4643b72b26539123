"""Terminal output of the planner: aligned tables and short numbers."""

from __future__ import annotations


def short(x: float | None, digits: int = 3) -> str:
    """1234567 -> '1.23M'; None -> '?'."""
    if x is None:
        return "?"
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= limit:
            return f"{x / limit:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def format_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Columns padded to their widest cell; columns in ``right`` (default: all but the first) right-aligned."""
    right = set(range(1, len(header))) if right is None else right
    cells = [header] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(r) for r in cells]
    lines.insert(1, "-" * max(len(x) for x in lines))
    return "\n".join(lines)
