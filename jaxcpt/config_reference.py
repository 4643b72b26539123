"""``jaxcpt config-reference``: every config key with its type, default and meaning, from the dataclasses.

``--update FILE`` also refreshes FILE's table of supported model families, generated from
the family modules (``jaxcpt.hf.families``), so both generated tables stay current together.
"""

from __future__ import annotations


def markdown() -> str:
    from jaxcpt.config import describe
    from jaxcpt.train.config import TrainConfig

    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, help_text in describe(TrainConfig):
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{key}` | `{cell(type_name)}` | `{cell(default)}` | {cell(help_text)} |")
    return "\n".join(lines)


def families_markdown() -> str:
    from jaxcpt.hf.families import families_markdown as table

    return table()


BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
FAMILIES_BEGIN, FAMILIES_END = "<!-- families:begin -->", "<!-- families:end -->"


def add_arguments(parser) -> None:
    parser.add_argument("--update", metavar="FILE",
                        help="replace the tables between the config-reference (and families) markers in FILE (e.g. README.md)")


def _fill(text: str, begin: str, end: str, table: str) -> str:
    return text.split(begin)[0] + begin + "\n" + table + "\n" + end + text.split(end, 1)[1]


def run(args) -> int:
    if not args.update:
        print(markdown())
        return 0
    from pathlib import Path

    from jaxcpt.errors import UserError

    path = Path(args.update)
    text = path.read_text() if path.is_file() else ""
    if BEGIN not in text or END not in text:
        raise UserError(f"'{path}' has no {BEGIN} ... {END} markers to fill")
    text = _fill(text, BEGIN, END, markdown())
    if FAMILIES_BEGIN in text and FAMILIES_END in text:
        text = _fill(text, FAMILIES_BEGIN, FAMILIES_END, families_markdown())
    path.write_text(text)
    print(f"updated the config reference in {path}")
    return 0
