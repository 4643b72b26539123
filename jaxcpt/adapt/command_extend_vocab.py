"""``jaxcpt extend-vocab BASE --tokens NEW --out DIR --init METHOD``: grow a model's vocabulary for a new domain.

    jaxcpt train-tokenizer --config run.yaml --source medical --base /models/Llama-3.2-1B --vocab-size 16000 --out tok
    jaxcpt extend-vocab /models/Llama-3.2-1B --tokens tok --out /models/llama-med --init subword-mean \\
        --measure-config run.yaml

BASE is an HF directory or a jaxcpt run/checkpoint directory. DIR is an HF directory
(weights in the source's dtype, the extended tokenizer, ``jaxcpt_adaptation.json``) that
``init.source: hf`` trains from and transformers loads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from jaxcpt.adapt.embeddings import INIT_METHODS
from jaxcpt.errors import UserError

INIT_HELP = """\
--init, for a new token whose string (in the tokenizer's alphabet) is s:
  subword-mean  input row and output column = the mean of the rows/columns of the pieces
                the OLD tokenizer splits s into (fast vocabulary transfer)
  weighted      sum over the old tokens u occurring in s as a substring (not special or
                byte-fallback tokens) of w(u) * row(u), with w = softmax(c / --temperature)
                over them and c(u) = len(u) / len(s), the share of s that u covers (lengths in
                characters of the alphabet: bytes for byte-level BPE); input rows and output
                columns alike; tokens with no such u get subword-mean. FOCUS/OFA's
                similarity-weighted combination, the similarity taken from string overlap
                instead of auxiliary embeddings
  mean          the mean of the rows/columns of every token of the old tokenizer
  random        independent N(0, initializer_range^2) entries
--noise-std adds N(0, noise_std^2) to every new entry, whatever the method.
Every old row and column, and every other tensor, is written bit-identical."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = INIT_HELP
    parser.add_argument("base", help="HF model directory, or a jaxcpt run/checkpoint directory")
    parser.add_argument("--tokens", required=True,
                        help="the new tokens: a tokenizer (HF directory, tokenizer.json or sentencepiece .model, in "
                        "its priority order) or a text file with one token per line (a leading space marks a word start)")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--init", required=True, choices=INIT_METHODS, help="how new rows start (see below)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="add at most this many tokens, intermediates included (default: all usable candidates)")
    parser.add_argument("--noise-std", type=float, default=0.0, help="std of Gaussian noise added to new rows (default 0)")
    parser.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of --init weighted")
    parser.add_argument("--seed", type=int, default=0, help="seed of random rows and noise")
    parser.add_argument("--tokenizer", default=None,
                        help="base tokenizer directory (default: BASE's own, or RUN/tokenizer of a checkpoint)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the source's, so old tensors stay bit-identical)")
    parser.add_argument("--measure-config", default=None,
                        help="a config whose data.sources to measure tokens per byte on, before and after")
    parser.add_argument("--measure-source", action="append", default=[],
                        help="only this source of --measure-config (repeatable)")
    parser.add_argument("--measure", nargs="*", default=[], help="text/JSONL files to measure tokens per byte on")
    parser.add_argument("--measure-documents", type=int, default=1000, help="documents measured per source")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    from jaxcpt.adapt import metadata
    from jaxcpt.adapt.embeddings import extend_params
    from jaxcpt.adapt.model_io import check_out, load_source, save_model
    from jaxcpt.adapt.vocab import plan_extension, write_tokenizer_files

    check_out(args.out, args.overwrite)
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    source = load_source(args.base, args.tokenizer)
    if source.tokenizer_dir is None:
        raise UserError(f"'{args.base}' has no tokenizer files; pass the base tokenizer with --tokenizer DIR")
    cfg = source.config
    print(f"base: {cfg.family}, vocabulary {cfg.vocab_size}, {cfg.num_layers} layers, stored as {source.dtype}")
    extension = plan_extension(source.tokenizer_dir, args.tokens, first_id=cfg.vocab_size,
                               max_new_tokens=args.max_new_tokens)
    report = extension.report
    print(f"new tokens: {report['added']} added ({report['from_source']} from {args.tokens}, "
          f"{report['intermediates']} intermediate) of {report['candidates']} candidates; "
          f"skipped {json.dumps(report['skipped'])}")
    if not extension.tokens:
        raise UserError(f"no token of '{args.tokens}' can be added to the base tokenizer (skipped: {report['skipped']})")
    if report["unreachable"]:
        print(f"warning: {report['unreachable']} new tokens are not produced from their own string")
    params, new_cfg = extend_params(source.params, cfg, extension, args.init, noise_std=args.noise_std,
                                    temperature=args.temperature, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="jaxcpt_tokenizer_") as staging:
        write_tokenizer_files(extension, source.tokenizer_dir, staging)
        out = save_model(new_cfg, params, args.out, dtype=args.dtype or source.dtype, tokenizer_dir=staging,
                         overwrite=args.overwrite)
        compression = _measure(args, source.tokenizer_dir, str(out))
    details = {"method": args.init, "tokens": args.tokens, "noise_std": args.noise_std, "seed": args.seed,
               **({"temperature": args.temperature} if args.init == "weighted" else {}),
               "tokenizer": report, "compression": compression}
    record = metadata.record_vocab_extension(
        source.adaptation, source=str(Path(args.base).resolve()), old_vocab_size=cfg.vocab_size,
        new_vocab_size=new_cfg.vocab_size, num_layers=cfg.num_layers, details=details)
    metadata.write_adaptation(out, record)
    print(f"wrote {out}: vocabulary {cfg.vocab_size} -> {new_cfg.vocab_size} "
          f"(new ids [{extension.first_id}, {extension.end_id})), init {args.init}")
    return 0


def _measure(args, before_dir: str, after_dir: str) -> list[dict]:
    if not args.measure_config and not args.measure:
        return []
    from jaxcpt.adapt.compression import format_table, tokens_per_byte
    from jaxcpt.adapt.texts import Budget, sources_from_args

    sources = sources_from_args(args.measure_config, args.measure_source, args.measure)
    rows = tokens_per_byte({"before": before_dir, "after": after_dir}, sources, Budget(documents=args.measure_documents))
    print(format_table(rows))
    return rows
