"""``jaxcpt config-reference``: every config key with its type, default and meaning, from the dataclasses."""

from __future__ import annotations


def markdown() -> str:
    from jaxcpt.config import describe
    from jaxcpt.train.config import TrainConfig

    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, help_text in describe(TrainConfig):
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{key}` | `{cell(type_name)}` | `{cell(default)}` | {cell(help_text)} |")
    return "\n".join(lines)


BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def add_arguments(parser) -> None:
    parser.add_argument("--update", metavar="FILE", help="replace the table between the config-reference markers in FILE (e.g. README.md)")


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
    path.write_text(text.split(BEGIN)[0] + BEGIN + "\n" + markdown() + "\n" + END + text.split(END, 1)[1])
    print(f"updated the config reference in {path}")
    return 0
