"""``jaxcpt config-reference``: every config key with its type, default and meaning, from the dataclasses.

``--update FILE`` (repeatable) refreshes the generated tables FILE holds: the config reference
(docs/config-reference.md) and the table of supported model families, generated from the family
modules (``jaxcpt.hf.families``; docs/models.md), so both stay current together.
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
    parser.add_argument("--update", metavar="FILE", action="append", default=[],
                        help="replace the tables between the config-reference and families markers in FILE "
                             "(docs/config-reference.md, docs/models.md); repeatable")


def _fill(text: str, begin: str, end: str, table: str) -> str:
    return text.split(begin)[0] + begin + "\n" + table + "\n" + end + text.split(end, 1)[1]


def run(args) -> int:
    if not args.update:
        print(markdown())
        return 0
    from pathlib import Path

    from jaxcpt.errors import UserError

    for name in args.update:
        path = Path(name)
        text = path.read_text() if path.is_file() else ""
        tables = [(begin, end, render) for begin, end, render in ((BEGIN, END, markdown),
                                                                   (FAMILIES_BEGIN, FAMILIES_END, families_markdown))
                  if begin in text and end in text]
        if not tables:
            raise UserError(f"'{path}' has neither {BEGIN} ... {END} nor {FAMILIES_BEGIN} ... {FAMILIES_END} "
                            "markers to fill (the tables live in docs/config-reference.md and docs/models.md)")
        for begin, end, render in tables:
            text = _fill(text, begin, end, render())
        path.write_text(text)
        print(f"updated the generated tables in {path}")
    return 0
