"""Compression of a tokenizer on configured data: tokens per UTF-8 byte, before and after an extension.

Each source is measured on its held-out documents when it has them (the text a run
evaluates on, and never seen by ``train-tokenizer``), else on its training documents,
up to a budget. Special tokens (BOS/EOS) are not counted.
"""

from __future__ import annotations

from jaxcpt.adapt.texts import Budget, measurement_split, source_texts
from jaxcpt.data.config import SourceConfig


def tokens_per_byte(tokenizer_dirs: dict[str, str], sources: list[SourceConfig], budget: Budget,
                    batch_size: int = 256) -> list[dict]:
    """One row per source: {source, split, documents, bytes, tokens: {label: count}, tokens_per_byte: {label: x}}."""
    from jaxcpt.data.tokenize import HFTokenizer

    tokenizers = {label: HFTokenizer(path) for label, path in tokenizer_dirs.items()}
    rows = []
    for src in sources:
        split = measurement_split(src)
        counts = dict.fromkeys(tokenizers, 0)
        documents = nbytes = 0
        batch: list[str] = []

        def flush() -> None:
            for label, tok in tokenizers.items():
                counts[label] += sum(len(ids) for ids in tok.encode_batch(batch))
            batch.clear()

        for text in source_texts(src, split=split, budget=budget, shuffle_files=False):
            documents += 1
            nbytes += len(text.encode("utf-8"))
            batch.append(text)
            if len(batch) == batch_size:
                flush()
        flush()
        rows.append({"source": src.name, "split": split, "documents": documents, "bytes": nbytes, "tokens": counts,
                     "tokens_per_byte": {k: (v / nbytes if nbytes else None) for k, v in counts.items()}})
    return rows


def format_table(rows: list[dict], before: str = "before", after: str = "after") -> str:
    lines = [f"{'source':16s} {'split':5s} {'documents':>9s} {'bytes':>12s} {'tok/byte ' + before:>16s} "
             f"{'tok/byte ' + after:>15s} {'change':>8s}"]
    for r in rows:
        a, b = r["tokens_per_byte"][before], r["tokens_per_byte"][after]
        change = f"{(b / a - 1) * 100:+.1f}%" if a and b is not None else "-"
        lines.append(f"{r['source']:16s} {r['split']:5s} {r['documents']:9d} {r['bytes']:12d} "
                     f"{a if a is not None else float('nan'):16.4f} {b if b is not None else float('nan'):15.4f} "
                     f"{change:>8s}")
    return "\n".join(lines)
