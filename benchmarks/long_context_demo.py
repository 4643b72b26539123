"""The long-context worked example at demo scale: a base trained on 64-token rows, extended to 256.

    python benchmarks/long_context_demo.py [--out runs/long_context_demo] [--base-steps 400] [--steps 100]

1. Corpora from the Python standard library: ``long`` = whole modules (one file, 4-24 KB, is one
   document: thousands of tokens), ``general`` = docstrings (short; the replay). A 1024-id BPE
   tokenizer is trained on both (jaxcpt.demo_corpora).
2. The base: from scratch on both sources, rows of 64 tokens, RoPE theta 10,000 trained for 64
   positions (model.max_position_embeddings=64).
3. The extension, from the base's checkpoint: ``model.rope`` raises theta to 40,000 and the trained
   length to 256; ``data.stages`` keeps 16 rows x 64 tokens for the first steps, then trains
   4 rows x 256 tokens (the tokens per step kept); ``long`` keeps only documents of at least 256
   tokens (``min_doc_tokens``, ProLong-style) at weight 0.7, ``general`` is replay at 0.3.
   ``eval.position_buckets=[64, 128]`` measures positions 0-64, 64-128 and 128-256 of long held-out
   documents at every evaluation.
4. Prints the report's table (``jaxcpt report``) and writes benchmarks/results/long_context_demo.json
   with the numbers, the git commit and the machine. docs/long-context.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import CpuLoad, git_commit, machine_info  # noqa: E402  (benchmarks/ is a directory of scripts)

MODEL = ["model.vocab_size=1024", "model.hidden_size=64", "model.intermediate_size=192", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.dtype=float32", "model.max_position_embeddings=64",
         "model.rope_theta=10000", "model.bos_token_id=1", "model.eos_token_id=2", "model.pad_token_id=3"]


def build_long_corpus(out: Path, documents: int) -> Path:
    """Whole standard-library modules of 4-24 KB, one per document, in a stable order."""
    from jaxcpt.demo_corpora import _stable_order, _stdlib_files

    texts = []
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 4000 <= len(text) <= 24000 and text.isascii():
            texts.append(text)
    path = out / "long.jsonl"
    with open(path, "w") as f:
        for text in _stable_order(texts)[:documents]:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def sources(data: Path, long_weight: float, general_weight: float, min_doc_tokens: int) -> str:
    return ("data.sources=["
            f"{{name: long, paths: ['{data / 'long.jsonl'}'], weight: {long_weight}, eval_documents: 16, "
            f"min_doc_tokens: {min_doc_tokens}}}, "
            f"{{name: general, paths: ['{data / 'general.jsonl'}'], weight: {general_weight}, eval_documents: 100}}]")


def train(overrides: list[str]) -> float:
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train as run

    start = time.monotonic()
    run(load_train_config(None, overrides))
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/long_context_demo")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100, help="steps of the extension run")
    parser.add_argument("--switch", type=int, default=20, help="step at which rows become 256 tokens long")
    parser.add_argument("--json", default="benchmarks/results/long_context_demo.json")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    load = CpuLoad()
    load.start()
    if not (data / "tokenizer.model").is_file():
        from jaxcpt.demo_corpora import build_corpora, train_tokenizer

        files = build_corpora(data, 3000)
        files["long"] = build_long_corpus(data, 400)
        train_tokenizer(files, data, vocab_size=1024)
    common = [f"data.tokenizer={data / 'tokenizer.model'}", "data.shuffle_buffer=500", "data.eval_rows=16",
              "train.log_every=10", "train.loss_chunk_size=0", "mesh={data: 1}", "checkpoint.every_steps=1000",
              "checkpoint.keep_last=1", "export.final=false"]
    base, cpt = out / "base", out / "extend"
    seconds = {}
    if not (base / "summary.json").is_file():
        seconds["base"] = train([f"run_dir={base}", *MODEL, *common, sources(data, 0.5, 0.5, 0), "data.seq_len=64",
                                 "train.batch_size=16", f"train.steps={args.base_steps}", "eval.every=0",
                                 "optim.schedule.kind=warmup_cosine", "optim.schedule.peak_lr=3e-3",
                                 "optim.schedule.warmup_fraction=0.05"])
    if cpt.exists():
        import shutil

        shutil.rmtree(cpt)
    stage = f"data.stages=[{{step: {args.switch}, seq_len: 256, batch_size: 4}}]"
    seconds["extend"] = train([f"run_dir={cpt}", "init.source=checkpoint", f"init.path={base}", "model.dtype=float32",
                               "model.rope.theta=40000", "model.rope.max_position_embeddings=256", *common,
                               sources(data, 0.7, 0.3, 256), "data.seq_len=64", "train.batch_size=16", stage,
                               f"train.steps={args.steps}", "eval.every=20", "eval.position_buckets=[64, 128]",
                               "eval.position_rows=8", "optim.schedule.kind=rewarm", "optim.schedule.peak_lr=2e-3",
                               "optim.schedule.warmup_fraction=0.1"])
    from jaxcpt.report.forgetting import format_table, summarize
    from jaxcpt.report.positions import position_summary

    table = format_table(cpt)
    print(table)
    result = {"benchmark": "long_context_demo", "table": table, "positions": position_summary(cpt),
              "held_out": summarize(cpt), "seconds": seconds, "args": vars(args), "git_commit": git_commit(),
              "machine": machine_info(), "cpu_load": load.stop()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
