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


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    print(markdown())
    return 0
