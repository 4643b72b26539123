"""Two corpora built from the Python standard library installed on this machine, nothing downloaded.

- ``general``: English prose, the docstrings of the standard library's modules,
  classes and functions.
- ``domain``: Python code, the same library's function bodies with docstrings and
  comments stripped.

Prose and code share an alphabet but little else, so a model pretrained on the
first and continued on the second shows learning on the new domain and forgetting
of the old one within minutes on a CPU. The selection is deterministic: the same
Python version gives the same corpora.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import json
import sysconfig
from pathlib import Path


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def _docstring_and_code(path: Path) -> tuple[list[str], list[str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return [], []
    prose, code = [], []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 120 and doc.isascii():
            prose.append(inspect.cleandoc(doc))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if doc is not None else node.body
            if not body:
                continue
            stripped = copy.copy(node)  # the function without its docstring and decorators
            stripped.body, stripped.decorator_list = body, []
            try:
                text = ast.unparse(stripped)
            except Exception:  # noqa: BLE001 - an odd node the unparser rejects: skip it
                continue
            if 120 <= len(text) <= 4000 and text.isascii():
                code.append(text)
    return prose, code


def _stable_order(docs: list[str]) -> list[str]:
    unique = dict.fromkeys(docs)  # drop duplicates, keep first
    return sorted(unique, key=lambda d: hashlib.blake2b(d.encode(), digest_size=8).digest())


def build_corpora(out_dir: Path, max_documents: int) -> dict[str, Path]:
    """Write general.jsonl and domain.jsonl (up to ``max_documents`` each) into ``out_dir``."""
    prose, code = [], []
    for path in _stdlib_files():
        p, c = _docstring_and_code(path)
        prose += p
        code += c
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, docs in (("general", prose), ("domain", code)):
        docs = _stable_order(docs)[:max_documents]
        files[name] = out_dir / f"{name}.jsonl"
        with open(files[name], "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    return files


def train_tokenizer(files: dict[str, Path], out_dir: Path, vocab_size: int) -> Path:
    """A sentencepiece BPE model on both corpora (ids match the HF tokenizer the export ships)."""
    import sentencepiece as spm

    sample = out_dir / "tokenizer_corpus.txt"
    with open(sample, "w") as f:
        for path in files.values():
            for i, line in enumerate(open(path)):
                if i >= 3000:
                    break
                f.write(json.loads(line)["text"] + "\n")
    spm.SentencePieceTrainer.train(
        input=str(sample), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=3, character_coverage=1.0, minloglevel=2, num_threads=2,
    )  # fmt: skip
    sample.unlink()
    return out_dir / "tokenizer.model"
