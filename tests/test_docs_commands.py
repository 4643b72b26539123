"""Every command the docs show can be run: configs that exist, override keys that exist, real subcommands.

Commands are taken from the code blocks and inline code of the documents below (README.md,
launch/README.md and every page in docs/) and from each launch script's ``--help``: every
``jaxcpt SUBCOMMAND ...``, every ``launch/SCRIPT ...`` (also inside quoted ``bash -c '...'`` strings
and after ``+ `` / ``env ...`` prefixes) and every ``python benchmarks/SCRIPT.py ...``. A jaxcpt
command's options must be options of its subcommand, a benchmark's must appear in its script.
Every repository file a page names (``configs/NAME.yaml``, ``benchmarks/results/X.json``,
``tests/test_x.py``, ...) must exist, and every relative link must reach a file and heading.
A failure names the file, the line and what is wrong, so new docs written by anyone are held to
the same rule.

Placeholders are fine where they are visibly placeholders: a ``--config`` path with an all-caps
part (``configs/NAME.yaml``, ``PATH``) is not looked up, nor one that an earlier command of the same
document writes (``--write-config F``, ``--out F``); ``[optional ...]`` groups are ignored, and
override values are never checked (``gs://BUCKET`` is fine); override keys always are.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib
import re
import shlex
import subprocess
import typing
from pathlib import Path

import pytest

from jaxcpt.cli import COMMANDS
from jaxcpt.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "launch/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# Pages whose commands the extraction must find (a page of prose only may join DOCUMENTS freely).
PAGES_WITH_COMMANDS = ["README.md", "launch/README.md", "docs/guide.md", "docs/evaluation.md", "docs/adaptation.md",
                       "docs/planning.md", "docs/merging.md", "docs/tpu-and-gpu.md", "docs/performance.md",
                       "docs/config-reference.md"]
# Top-level directories of this repository: a path under one of them that a page names must exist.
REPO_DIRS = ("configs", "benchmarks", "tests", "jaxcpt", "launch", "docs", ".ci")
SCRIPTS = ["launch/gpu.sh", "launch/slurm.sbatch", "launch/tpu_vm.sh"]
WRITES_FILE = ("--write-config", "--out")  # a later command of the same document may read what these wrote
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>&1"}


@dataclasses.dataclass
class Command:
    where: str  # "file:line"
    argv: list[str]
    written_before: frozenset[str] = frozenset()  # files earlier commands of the document write

    def __str__(self) -> str:
        return " ".join(self.argv)


def markdown_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every code-block line (continuations joined) and every inline code span."""
    snippets, in_block, pending, pending_line = [], False, "", 0
    prose = []  # (line number, line) outside code blocks; inline spans may wrap a line
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            prose.append((number, line))
            continue
        if not pending:
            pending_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        snippets.append((pending_line, pending + line))
        pending = ""
    joined = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    for span in re.finditer(r"`([^`]+)`", joined):
        index = next(i for i in range(len(prose)) if starts[i + 1] > span.start())
        snippets.append((prose[index][0], span.group(1).replace("\n", " ")))
    return snippets


def help_snippets(text: str) -> list[tuple[int, str]]:
    """--help output: command lines (continuations joined) and commands quoted in prose ('jaxcpt train ...')."""
    snippets, pending, pending_line = [], "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not pending:
            pending_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        first = re.sub(r"^\s*(Usage:|Example:)?\s*", "", line).split(" ", 1)[0]
        if first in ("jaxcpt", "sbatch", "bash", "env", "srun") or _is_script(first):
            snippets.append((pending_line, line))
        snippets += [(pending_line, quoted) for quoted in re.findall(r"'((?:jaxcpt|launch/)[^']*)'", line)]
    return snippets


def _words(snippet: str) -> list[str]:
    snippet = re.sub(r"(?:^|(?<=\s))\[[^\]]*\]", " ", snippet)  # [optional ...] groups of a usage line
    snippet = re.sub(r"^\s*[#+]\s*", "", snippet)  # "# + cmd" / "+ cmd": printed commands
    try:
        return shlex.split(snippet)
    except ValueError:  # an unbalanced quote in prose
        return snippet.split()


def _is_script(word: str) -> bool:
    return any(word == s or word.endswith("/" + s) or word == Path(s).name for s in SCRIPTS)


def commands_in(snippet: str, where: str) -> list[Command]:
    words = _words(snippet)
    found = []
    for i, word in enumerate(words):
        if " " in word and ("jaxcpt" in word or "launch/" in word):  # a quoted command string: bash -c '...'
            found += commands_in(word, where)
        elif word == "jaxcpt" or _is_script(word) or _is_benchmark(words, i):
            end = next((j for j in range(i + 1, len(words)) if words[j] in SHELL_OPERATORS), len(words))
            found.append(Command(where, words[i:end]))
    return found


def _is_benchmark(words: list[str], i: int) -> bool:
    """``python benchmarks/NAME.py``: the script path, run by a Python interpreter."""
    return (i > 0 and re.fullmatch(r"python[0-9.]*", words[i - 1]) is not None
            and re.fullmatch(r"benchmarks/[^/]+\.py", words[i]) is not None)


def markdown_commands(text: str, name: str) -> list[Command]:
    """The commands of one markdown document, in order, each knowing the files earlier ones write."""
    commands, written = [], set()
    for line, snippet in sorted(markdown_snippets(text), key=lambda s: s[0]):
        for command in commands_in(snippet, f"{name}:{line}"):
            command.written_before = frozenset(written)
            written.update(v for option in WRITES_FILE if (v := _option_value(command.argv, option)))
            commands.append(command)
    return commands


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCUMENTS:
        commands += markdown_commands((ROOT / doc).read_text(), doc)
    for script in SCRIPTS:
        result = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        for line, snippet in help_snippets(result.stdout):
            commands += commands_in(snippet, f"{script} --help, line {line}")
    return commands


def config_key_problem(key: str) -> str | None:
    """Why ``key`` (dotted) is not a TrainConfig key, with the closest valid one; None if it is one."""
    cls, parts = TrainConfig, key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(parts[:depth])
        if part not in fields:
            valid = [f"{prefix}.{name}" if prefix else name for name in fields]
            close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6) or difflib.get_close_matches(
                ".".join(parts[: depth + 1]), valid, n=1
            )
            return f"'{key}' is not a config key" + (f"; did you mean '{close[0]}'?" if close else "")
        tp = typing.get_type_hints(cls)[part]
        here = ".".join(parts[: depth + 1])
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if typing.get_origin(tp) is dict:  # mesh.fsdp, sharding_rules.embed: any name below
            return None if depth + 2 >= len(parts) else f"'{key}' goes below the mapping '{here}'"
        return None if depth + 1 == len(parts) else f"'{key}': '{here}' has no sub-keys"
    return f"'{key}' is a section, not a key"


def _all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        name = f"{prefix}{f.name}"
        keys += _all_keys(tp, name + ".") if dataclasses.is_dataclass(tp) else [name]
    return keys


def _is_placeholder_path(path: str) -> bool:
    return any(re.fullmatch(r"[A-Z][A-Z0-9_]*", Path(part).stem) for part in Path(path).parts)


def _option_value(argv: list[str], option: str) -> str | None:
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def problems_of(command: Command) -> list[str]:
    argv, problems = command.argv, []
    if argv[0].startswith("benchmarks/"):
        return benchmark_problems(argv)
    if argv[0] == "jaxcpt":
        if len(argv) < 2 or not re.fullmatch(r"[a-z][a-z0-9-]*", argv[1]):
            return []  # `jaxcpt --help`, or the name in prose ("jaxcpt merge: methods ...")
        if argv[1] not in COMMANDS:
            return [f"'jaxcpt {argv[1]}' is not a subcommand (jaxcpt/cli.py COMMANDS: {', '.join(COMMANDS)})"]
        problems += option_problems(argv)
        overrides = [w for w in argv[2:] if "=" in w and not w.startswith("-")]  # train, plan sweep ...
    else:
        overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    config = _option_value(argv, "--config")
    if (
        config is not None
        and not _is_placeholder_path(config)
        and config not in command.written_before
        and not (ROOT / config).is_file()
    ):
        problems.append(f"--config '{config}' does not exist (configs: {', '.join(sorted(_config_names()))})")
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*", key):
            continue  # a placeholder such as KEY=VALUE, or not an override
        problem = config_key_problem(key)
        if problem:
            problems.append(problem)
    return problems


@functools.cache
def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of ``jaxcpt NAME``, built the way jaxcpt/cli.py builds it."""
    parser = argparse.ArgumentParser(prog=f"jaxcpt {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser


def option_problems(argv: list[str]) -> list[str]:
    """Options of ``jaxcpt SUBCOMMAND ...`` that the subcommand (or its sub-subcommand) does not define."""
    parser, label = subcommand_parser(argv[1]), f"jaxcpt {argv[1]}"
    choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if choices is not None and len(argv) > 2 and argv[2] in choices:  # jaxcpt plan budget ...
        parser, label = choices[argv[2]], f"{label} {argv[2]}"
    known = {option for action in parser._actions for option in action.option_strings}
    problems = []
    for word in argv[2:]:
        option = word.split("=", 1)[0]
        if re.fullmatch(r"--[a-z][a-z0-9-]*", option) and option not in known:
            close = difflib.get_close_matches(option, sorted(known), n=1)
            problems.append(f"'{label}' has no option '{option}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    return problems


def benchmark_problems(argv: list[str]) -> list[str]:
    """``python benchmarks/NAME.py --opt ...``: the script exists and defines every option shown."""
    script = ROOT / argv[0]
    if not script.is_file():
        return [f"'{argv[0]}' does not exist (benchmarks: {', '.join(sorted(p.name for p in script.parent.glob('*.py')))})"]
    source = script.read_text()
    return [f"'{argv[0]}' has no option '{option}'" for word in argv[1:]
            if re.fullmatch(r"--[a-z][a-z0-9-]*", option := word.split("=", 1)[0])
            and f'"{option}"' not in source and f"'{option}'" not in source]


def _config_names() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")]


COMMANDS_FOUND = documented_commands()


def test_the_docs_show_commands_from_every_source():
    """Guards the extraction itself: a parser that found nothing would pass every check below."""
    sources = {c.where.split(":")[0].split(" --help")[0] for c in COMMANDS_FOUND}
    assert set(PAGES_WITH_COMMANDS) | set(SCRIPTS) <= sources <= set(DOCUMENTS) | set(SCRIPTS)
    assert any(c.argv[:2] == ["jaxcpt", "train"] and "--config" in c.argv for c in COMMANDS_FOUND)
    assert sum(_is_script(c.argv[0]) and "--" in c.argv for c in COMMANDS_FOUND) >= 3
    assert sum(c.argv[0].startswith("benchmarks/") for c in COMMANDS_FOUND) >= 3


def test_every_documented_command_names_a_real_subcommand_config_and_config_keys():
    problems = [f"{c.where}: {p}\n    in: {c}" for c in COMMANDS_FOUND for p in problems_of(c)]
    assert not problems, "documented commands that cannot run as written:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet, problem",
    [
        ("launch/gpu.sh --config configs/llama3_8b_cpt.yaml --run-dir r", "--config 'configs/llama3_8b_cpt.yaml' does"),
        ("launch/gpu.sh --config configs/tiny.yaml --run-dir r -- optim.peak_lr=3e-5",
         "'optim.peak_lr' is not a config key; did you mean 'optim.schedule.peak_lr'?"),
        ("jaxcpt trian --config configs/tiny.yaml", "'jaxcpt trian' is not a subcommand"),
        ("# + env X=1 bash -c 'exec jaxcpt train --config configs/tiny.yaml data.seqlen=8'",
         "'data.seqlen' is not a config key; did you mean 'data.seq_len'?"),
        ("jaxcpt train mesh.fsdp.x=2", "goes below the mapping 'mesh'"),
        ("jaxcpt plan sweep --config configs/tiny.yaml --out s data.seqlen=8", "'data.seqlen' is not a config key"),
    ],
)
def test_the_checker_names_each_kind_of_mistake(snippet, problem):
    (command,) = commands_in(snippet, "x.md:1")
    assert any(problem in p for p in problems_of(command)), problems_of(command)


def test_placeholders_and_valid_keys_pass_the_checker():
    for snippet in [
        "jaxcpt train --config configs/NAME.yaml [section.key=value ...]",
        "launch/tpu_vm.sh all --config configs/llama3.1-8b-v5p64.yaml --run-dir gs://BUCKET/r -- mesh.fsdp=8 "
        "checkpoint.directory=gs://BUCKET/c run_dir=x data.sources=[]",
        "jaxcpt report RUN_A RUN_B",
    ]:
        (command,) = commands_in(snippet, "x.md:1")
        assert problems_of(command) == [], snippet


def test_a_config_written_by_an_earlier_command_of_the_document_counts_as_existing():
    doc = "```bash\njaxcpt train --config planned.yaml\njaxcpt plan fit s --write-config planned.yaml\n" \
          "jaxcpt train --config planned.yaml\n```\n"
    first, _, last = markdown_commands(doc, "x.md")
    assert problems_of(first) and "'planned.yaml' does not exist" in problems_of(first)[0]  # not written yet
    assert problems_of(last) == []


# ----------------------------------------------------------------------------- files and links a page names
# Pages the README's index links to that other branches add; drop a name once its page is merged.
REPO_PATH = re.compile(r"(?<![\w/.-])(?:%s)/[\w./*-]*" % "|".join(re.escape(d) for d in REPO_DIRS))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def named_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) of every repository path a page names, in prose, code or links."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in REPO_PATH.finditer(line):
            path = match.group(0).rstrip(".,;:")
            if path.rstrip("/") not in REPO_DIRS:  # "jaxcpt/" alone, the layout's root
                found.append((number, path))
    return found


def path_problem(path: str) -> str | None:
    """Why a named repository path is not there; None when it is (or is visibly a placeholder)."""
    if _is_placeholder_path(path):
        return None
    if "*" in path:
        return None if list(ROOT.glob(path)) else f"'{path}' matches no file"
    if not (ROOT / path).exists():
        close = difflib.get_close_matches(path, [str(p.relative_to(ROOT)) for p in (ROOT / path.split("/")[0]).rglob("*")],
                                          n=1)
        return f"'{path}' does not exist" + (f"; did you mean '{close[0]}'?" if close else "")
    return None


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors, in_block = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and (m := re.match(r"#{1,6}\s+(.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def link_problems(text: str, name: str) -> list[str]:
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (ROOT / name).parent / file_part if file_part else ROOT / name
            relative = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)
            if not path.exists():
                problems.append(f"{name}:{number}: link '{target}': '{relative}' does not exist")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
                problems.append(f"{name}:{number}: link '{target}': '{relative}' has no heading '#{anchor}'")
    return problems


def test_every_file_a_page_names_exists():
    problems = [f"{doc}:{line}: {problem}" for doc in DOCUMENTS
                for line, path in named_paths((ROOT / doc).read_text()) if (problem := path_problem(path))]
    assert not problems, "pages name files that are not in the repository:\n" + "\n".join(problems)


def test_every_config_a_page_names_is_shipped():
    """The rule above, for configs/*.yaml by name: a renamed config must not leave a page behind."""
    named = {path for doc in DOCUMENTS for _, path in named_paths((ROOT / doc).read_text()) if path.startswith("configs/")}
    assert {"configs/tiny.yaml", "configs/llama3.2-1b-1gpu.yaml"} <= named  # the extraction sees them
    missing = sorted(p for p in named if not _is_placeholder_path(p) and not (ROOT / p).is_file())
    assert not missing, f"pages name configs that do not exist: {missing} (configs: {sorted(_config_names())})"


def test_every_relative_link_reaches_a_file_and_heading():
    problems = [p for doc in DOCUMENTS for p in link_problems((ROOT / doc).read_text(), doc)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    unlinked = sorted(page for page in pages if f"]({page}" not in readme)
    assert not unlinked, f"docs pages the README's index does not link: {unlinked}"


@pytest.mark.parametrize(
    "snippet, problem",
    [
        ("jaxcpt export-hf RUN --out DIR --loras merged", "'jaxcpt export-hf' has no option '--loras'; did you mean '--lora'?"),
        ("jaxcpt plan fit sweeps/cpt --law cmr --tolerence 0.05", "'jaxcpt plan fit' has no option '--tolerence'"),
        ("python benchmarks/train_throughput.py --vs-pytorch", "'benchmarks/train_throughput.py' has no option '--vs-pytorch'"),
        ("python benchmarks/train_speed.py --shape cpu-small", "'benchmarks/train_speed.py' does not exist"),
    ],
)
def test_the_checker_names_wrong_options_and_scripts(snippet, problem):
    (command,) = commands_in(snippet, "x.md:1")
    assert any(problem in p for p in problems_of(command)), problems_of(command)


def test_the_file_and_link_checkers_name_what_is_missing(tmp_path):
    text = ("See `configs/llama3_8b.yaml` and benchmarks/results/nope_*.json, [the guide](guide.md#no-such-heading),\n"
            "[gone](docs/gone.md); `configs/NAME.yaml` is a placeholder. [ok](guide.md#continuing-a-real-model)\n")
    problems = [path_problem(path) for _, path in named_paths(text)]
    assert "'configs/llama3_8b.yaml' does not exist" in problems[0] and "matches no file" in problems[1]
    assert "'docs/gone.md' does not exist" in problems[2] and problems[3:] == [None]  # the placeholder passes
    links = link_problems(text, "docs/x.md")
    assert len(links) == 2 and "has no heading '#no-such-heading'" in links[0] and "'docs/docs/gone.md'" in links[1]


def test_the_readme_lists_every_subcommand():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands")[1].split("\n## ")[0]
    missing = [name for name in COMMANDS if f"`jaxcpt {name}`" not in table]
    assert not missing, f"subcommands the README's command table leaves out: {missing}"
