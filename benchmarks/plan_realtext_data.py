"""Real text this machine has offline, for benchmarks/plan_realtext.py: man pages (general) and Vim's help (domain).

- general: English manual pages of sections 1, 5, 7, 8 (/usr/share/man/man*/, Debian's packages; not the
  Cloud SDK's thousands of gcloud pages), troff
  markup stripped to its text; a deterministic sample of ``documents`` pages, each cut to 6,000 chars.
- domain: Vim's reference manual (/usr/share/vim/vim*/doc/*.txt), cut at its section rules
  (lines of '=' ) into documents of at most 6,000 chars.

Both are technical English, so the domain shift is one of vocabulary and register (editor commands
and Vim script against Unix command-line tools), not of language: the kind of shift a CPT run on
a specialised corpus makes.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
from pathlib import Path

MAX_CHARS = 6000
_MACRO = re.compile(r"^\.(\w+)\s*(.*)$")
_ESCAPES = [(re.compile(r"\\f[BIRPC0-9]|\\f\(\w\w|\\f\[\w*\]"), ""), (re.compile(r"\\[-]"), "-"), (re.compile(r"\\&"), ""),
            (re.compile(r"\\\(aq"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\(em|\\\(en"), "-"),
            (re.compile(r"\\e"), lambda m: "\\"), (re.compile(r"\\\*\(\w\w|\\\*\w|\\s[-+]?\d"), ""), (re.compile(r"\\ "), " "),
            (re.compile(r"\\\|"), ""), (re.compile(r"\\c$"), "")]


def man_to_text(source: str) -> str:
    """Rough troff -> text: drop comments and formatting requests, keep headings and the text of text macros."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".\\}", "'")):
            continue
        match = _MACRO.match(line)
        if match:
            macro, rest = match.groups()
            if macro in ("SH", "SS"):
                out.append("\n" + rest.strip('"'))
            elif macro in ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "TP", "IP", "PP", "P", "LP") and rest:
                out.append(rest.replace('"', ""))
            continue
        if line.startswith("."):  # any other request (pod2man's preamble of string definitions, ..)
            continue
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text


def _stable(items, key=lambda x: x):
    return sorted(items, key=lambda x: hashlib.sha1(str(key(x)).encode()).hexdigest())


def general_documents(documents: int) -> list[str]:
    docs = []
    # The Google Cloud SDK installs ~15,000 near-identical gcloud pages; they would be most of a sample.
    pages = [p for p in [q for s in "1578" for q in glob.glob(f"/usr/share/man/man{s}/*.gz")] if not Path(p).name.startswith(("gcloud", "bq", "gsutil"))]
    for path in _stable(pages):
        try:
            text = man_to_text(gzip.open(path, "rt", errors="replace").read())
        except (OSError, EOFError):
            continue
        if len(text) > 500:
            docs.append(text[:MAX_CHARS])
        if len(docs) >= documents:
            break
    return docs


def domain_documents(documents: int) -> list[str]:
    docs = []
    for path in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")):
        text = open(path, errors="replace").read()
        for section in re.split(r"\n={20,}\n", text):
            for start in range(0, len(section), MAX_CHARS):
                piece = section[start:start + MAX_CHARS].strip()
                if len(piece) > 300:
                    docs.append(piece)
    return _stable(docs)[:documents]


def build(out_dir: Path, documents: int, vocab_size: int) -> dict[str, Path]:
    """general.jsonl, domain.jsonl and tokenizer.model in ``out_dir`` (reused when there)."""
    from jaxcpt.demo_corpora import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"general": out_dir / "general.jsonl", "domain": out_dir / "domain.jsonl"}
    if (out_dir / "tokenizer.model").is_file() and all(p.is_file() for p in files.values()):
        return files
    for name, docs in (("general", general_documents(documents)), ("domain", domain_documents(documents))):
        if len(docs) < 200:
            raise SystemExit(f"only {len(docs)} {name} documents on this machine; the benchmark needs man pages "
                             "(/usr/share/man/man1) and Vim's help (/usr/share/vim/vim*/doc)")
        with open(files[name], "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    train_tokenizer(files, out_dir, vocab_size=vocab_size)
    return files
