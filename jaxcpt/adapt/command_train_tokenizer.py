"""``jaxcpt train-tokenizer``: train a tokenizer on configured data sources, to extend a base model's vocabulary with.

    jaxcpt train-tokenizer --config run.yaml --source medical --base /models/Llama-2-7b --vocab-size 8000 --out tok
    jaxcpt train-tokenizer "data/*.jsonl.zst" --kind bpe --vocab-size 16000 --max-bytes 500000000 --out tok

Documents are read through jaxcpt's data readers (every input format), from the training
split only (held-out documents never shape the tokenizer), files in a seeded random order,
within the budget per source. The kind follows the base (``--base``): sentencepiece for
sentencepiece-based tokenizers, byte-level BPE (HF ``tokenizers``) for byte-level ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from jaxcpt.adapt.tokenizer_train import KINDS
from jaxcpt.errors import UserError

STATS_FILE = "jaxcpt_tokenizer_training.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="files, directories or glob patterns (or use --config)")
    parser.add_argument("--config", help="a YAML config whose data.sources to read")
    parser.add_argument("--source", action="append", default=[],
                        help="only this source of --config (repeatable; default: all sources)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the inputs")
    parser.add_argument("--text-split", default="per_file", choices=["per_file", "blank_line"])
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    parser.add_argument("--vocab-size", type=int, required=True, help="size of the new tokenizer's vocabulary")
    parser.add_argument("--base", help="the base model, tokenizer or jaxcpt run directory: its tokenizer's kind and "
                        "settings are copied")
    parser.add_argument("--kind", choices=KINDS, help="sentencepiece or bpe (byte-level); default: from --base")
    parser.add_argument("--max-documents", type=int, default=0, help="documents read per source (0 = all)")
    parser.add_argument("--max-bytes", type=int, default=0, help="UTF-8 bytes read per source (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file order")
    parser.add_argument("--threads", type=int, default=2, help="sentencepiece trainer threads")


def _tokenizer_dir(path: Path) -> Path:
    """The tokenizer files of an HF model or tokenizer directory, or of a jaxcpt run (RUN/tokenizer)."""
    for candidate in (path, path / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer.model").is_file():
            return candidate
    raise UserError(f"--base '{path}' holds no tokenizer.json or tokenizer.model (nor does {path / 'tokenizer'})")


def run(args) -> int:
    from tqdm import tqdm

    from jaxcpt.adapt.texts import Budget, source_texts, sources_from_args
    from jaxcpt.adapt.tokenizer_train import kind_of, train_bpe, train_sentencepiece

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"'{out}' exists and is not empty; choose another --out")
    if args.vocab_size < 2:
        raise UserError(f"--vocab-size must be >= 2, got {args.vocab_size}")
    base = _tokenizer_dir(Path(args.base)) if args.base else None
    kind = args.kind or (kind_of(base) if base is not None else None)
    if kind is None:
        raise UserError("give --base (the tokenizer to extend later) or --kind sentencepiece|bpe")
    if base is not None and kind != kind_of(base):
        print(f"note: --kind {kind} differs from the base's kind ({kind_of(base)}); the base's settings are not used")
        base = None
    sources = sources_from_args(args.config, args.source, args.inputs, text_field=args.text_field,
                                text_split=args.text_split)
    budget = Budget(documents=args.max_documents, bytes=args.max_bytes)
    stats = {src.name: {"documents": 0, "bytes": 0} for src in sources}
    bar = tqdm(desc="reading documents", unit=" doc")

    def documents():
        for src in sources:
            for text in source_texts(src, split="train", budget=budget, seed=args.seed):
                stats[src.name]["documents"] += 1
                stats[src.name]["bytes"] += len(text.encode("utf-8"))
                bar.update(1)
                bar.set_postfix(source=src.name, MB=f"{sum(s['bytes'] for s in stats.values()) / 1e6:.1f}",
                                refresh=False)
                yield text

    texts = documents()
    first = list(itertools.islice(texts, 1))
    if not first:
        raise UserError("the sources hold no training documents within the budget")
    texts = itertools.chain(first, texts)
    if kind == "sentencepiece":
        model = base / "tokenizer.model" if base is not None and (base / "tokenizer.model").is_file() else None
        train_sentencepiece(texts, out, args.vocab_size, base_model=model, num_threads=args.threads)
    else:
        train_bpe(texts, out, args.vocab_size, base_dir=base if base is not None and (base / "tokenizer.json").is_file()
                  else None)
    bar.close()
    from jaxcpt.data.tokenize import load_tokenizer

    size = load_tokenizer(str(out)).facts.num_ids  # BPE stops early when no pair is frequent enough
    summary = {"kind": kind, "vocab_size": size, "vocab_size_requested": args.vocab_size, "base": args.base,
               "sources": stats, "budget_per_source": {"documents": args.max_documents, "bytes": args.max_bytes}}
    (out / STATS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    total = sum(s["documents"] for s in stats.values())
    print(f"wrote {out}: {kind} tokenizer, vocabulary {size}" + (f" (of {args.vocab_size} asked)" if size != args.vocab_size
          else "") + f", trained on {total} documents ({sum(s['bytes'] for s in stats.values()) / 1e6:.1f} MB)")
    return 0
