"""Initialising new vocabulary rows: bits per byte on held-out domain text, before and after a short training.

    python benchmarks/vocab_init.py            # prints a table, writes benchmarks/results/vocab_init.json

Builds everything on this machine (nothing downloaded), from the demo's corpora
(``jaxcpt.demo_corpora``: English docstrings = general, Python code = domain):

1. a sentencepiece BPE base tokenizer (1024 pieces) trained on general text only, and a
   1M-parameter base model pretrained on it from scratch (``jaxcpt.train.loop.train``);
2. a domain tokenizer trained with ``jaxcpt train-tokenizer --base`` on the training split
   of the Python code, merged into the base with ``jaxcpt extend-vocab`` four times, one per
   initialisation of the new rows: subword-mean, weighted, mean, random;
3. bits per byte on held-out Python code (documents never trained on, the first
   ``--eval-bytes`` bytes of each), before any training: sum of token losses in nats over
   the document's tokens (each predicted from BOS and the tokens before it) divided by
   ln 2 x its UTF-8 bytes, so models with different tokenizers compare fairly;
4. the same after one short continued-pretraining run per model on the domain (the same
   steps, batch and sequence length, so the same tokens; an extended tokenizer covers more
   text with them), all parameters training, started from each HF directory with
   ``init.source: hf``; the base model runs too, with its own tokenizer.

Expected before training: subword-mean and weighted below mean, mean below random. The
script reports whatever it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CpuLoad, machine_info  # noqa: E402 - a sibling benchmark script

METHODS = ("subword-mean", "weighted", "mean", "random")
MODEL = ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.dtype=float32", "model.bos_token_id=1", "model.eos_token_id=2",
         "model.pad_token_id=3"]


def _split_domain(data: Path, heldout: int) -> tuple[Path, Path]:
    """The first ``heldout`` domain documents (a fixed hash order) as the held-out file, the rest to train on."""
    lines = (data / "domain.jsonl").read_text().splitlines(keepends=True)
    (data / "domain_heldout.jsonl").write_text("".join(lines[:heldout]))
    (data / "domain_train.jsonl").write_text("".join(lines[heldout:]))
    return data / "domain_train.jsonl", data / "domain_heldout.jsonl"


def _train(overrides: list[str]) -> None:
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    train(load_train_config(None, overrides))


def _common(args, steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.batch_size={args.batch}", f"data.seq_len={args.seq_len}",
            "data.shuffle_buffer=2000", "train.log_every=50", "train.loss_chunk_size=0", "eval.every=0",
            "checkpoint.every_steps=0", "checkpoint.keep_last=1", "checkpoint.async_save=false", "mesh={data: -1}",
            "export.dtype=float32", "optim.schedule.warmup_fraction=0.1", f"optim.schedule.peak_lr={args.lr}"]


def pretrain_base(args, data: Path, out: Path) -> Path:
    """Base tokenizer (general text only) and base model; returns the base's HF directory."""
    from jaxcpt.demo_corpora import train_tokenizer

    train_tokenizer({"general": data / "general.jsonl"}, data, vocab_size=1024)
    run = out / "base_run"
    _train([f"run_dir={run}", "init.source=scratch", *MODEL, "model.vocab_size=1024",
            f"data.tokenizer={data / 'tokenizer.model'}",
            f"data.sources=[{{name: general, paths: ['{data / 'general.jsonl'}']}}]",
            *_common(args, args.pretrain_steps), "optim.schedule.kind=warmup_cosine"])
    return run / "hf" / f"step_{args.pretrain_steps}"


def extend(args, base: Path, domain_train: Path, heldout: Path, out: Path) -> dict[str, Path]:
    from jaxcpt.cli import main as jaxcpt

    tokens = out / "domain_tokenizer"
    assert jaxcpt(["train-tokenizer", str(domain_train), "--base", str(base), "--vocab-size", str(args.new_vocab),
                   "--out", str(tokens)]) == 0
    dirs = {}
    for method in METHODS:
        dirs[method] = out / f"extended_{method}"
        assert jaxcpt(["extend-vocab", str(base), "--tokens", str(tokens), "--out", str(dirs[method]), "--init",
                       method, "--measure", str(heldout)]) == 0
    return dirs


def heldout_texts(heldout: Path, count: int, max_bytes: int) -> list[str]:
    texts = [json.loads(line)["text"] for line in heldout.read_text().splitlines()[:count]]
    return [t.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore") for t in texts]


def bits_per_byte(model_dir: Path, texts: list[str], seq_len: int) -> dict:
    """Sum over documents of -log p(token | BOS, earlier tokens), in bits per UTF-8 byte (float32).

    Also split by target: bits from positions whose next token is an old token, and from those
    whose next token is a new one, and the mean probability the model puts on the new tokens
    where the next token is an old one (the mass new rows take from the old vocabulary)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxcpt.adapt.metadata import read_adaptation
    from jaxcpt.data.tokenize import HFTokenizer
    from jaxcpt.hf import load_hf

    tokenizer = HFTokenizer(str(model_dir))
    model = load_hf(model_dir)
    record = read_adaptation(model_dir)
    first_new = record["new_token_ids"][0] if record else model.config.vocab_size
    bos = [tokenizer.facts.bos_id] if tokenizer.facts.bos_id is not None else []
    rows = [bos + ids for ids in tokenizer.encode_batch(texts)]
    if max(map(len, rows)) > seq_len + 1:
        raise SystemExit(f"a held-out document has {max(map(len, rows))} tokens; lower --eval-bytes")

    @nnx.jit
    def score(model, inputs, targets):  # [B, T] -> nats [B, T], probability of the new tokens [B, T]
        logp = jax.nn.log_softmax(model(inputs), axis=-1)  # [B, T, V]
        nats = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return nats, jnp.exp(jax.nn.logsumexp(logp[..., first_new:], axis=-1))

    totals = {"old": 0.0, "new": 0.0, "old_tokens": 0, "new_tokens": 0, "new_mass_at_old": 0.0}
    for start in range(0, len(rows), 16):
        batch = rows[start : start + 16]
        ids = np.zeros((16, seq_len + 1), np.int32)
        mask = np.zeros((16, seq_len), bool)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
            mask[i, : len(row) - 1] = True
        nats, new_mass = (np.asarray(x, np.float64) for x in score(model, jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])))
        is_new = ids[:, 1:] >= first_new
        totals["old"] += float(nats[mask & ~is_new].sum())
        totals["new"] += float(nats[mask & is_new].sum())
        totals["old_tokens"] += int((mask & ~is_new).sum())
        totals["new_tokens"] += int((mask & is_new).sum())
        totals["new_mass_at_old"] += float(new_mass[mask & ~is_new].sum())
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    bits = math.log(2) * nbytes
    return {"bits_per_byte": (totals["old"] + totals["new"]) / bits, "bits_per_byte_old_targets": totals["old"] / bits,
            "bits_per_byte_new_targets": totals["new"] / bits, "tokens": totals["old_tokens"] + totals["new_tokens"],
            "new_tokens": totals["new_tokens"], "bytes": nbytes,
            "new_token_mass_at_old_targets": totals["new_mass_at_old"] / max(totals["old_tokens"], 1)}


def continue_training(args, model_dir: Path, domain_train: Path, run: Path) -> Path:
    if run.exists():
        shutil.rmtree(run)
    _train([f"run_dir={run}", "init.source=hf", f"init.path={model_dir}", "model.dtype=float32",
            f"data.sources=[{{name: domain, paths: ['{domain_train}']}}]", *_common(args, args.cpt_steps),
            "optim.schedule.kind=rewarm"])
    return run / "hf" / f"step_{args.cpt_steps}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_vocab_init", help="working directory (rebuilt every run)")
    parser.add_argument("--documents", type=int, default=6000, help="documents per corpus")
    parser.add_argument("--heldout", type=int, default=200, help="held-out domain documents")
    parser.add_argument("--eval-bytes", type=int, default=300, help="bytes of each held-out document evaluated")
    parser.add_argument("--new-vocab", type=int, default=2048, help="vocabulary of the domain tokenizer")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--cpt-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "vocab_init.json"))
    args = parser.parse_args(argv)

    from jaxcpt.demo_corpora import build_corpora

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    load = CpuLoad()
    load.start()
    started = time.monotonic()
    data = out / "data"
    build_corpora(data, args.documents)
    domain_train, heldout = _split_domain(data, args.heldout)
    base = pretrain_base(args, data, out)
    extended = extend(args, base, domain_train, heldout, out)
    texts = heldout_texts(heldout, args.heldout, args.eval_bytes)
    models = {"base": base, **extended}
    before = {name: bits_per_byte(path, texts, args.seq_len) for name, path in models.items()}
    after = {}
    for name, path in models.items():
        trained = continue_training(args, path, domain_train, out / f"cpt_{name}")
        after[name] = bits_per_byte(trained, texts, args.seq_len)
    adaptation = json.loads((extended["mean"] / "jaxcpt_adaptation.json").read_text())
    step = adaptation["history"][0]
    result = {
        "benchmark": "vocab_init", "machine": machine_info(), "load": load.stop(),
        "wall_s": time.monotonic() - started, "settings": vars(args),
        "new_token_ids": adaptation["new_token_ids"], "tokenizer": step["tokenizer"],
        "compression": step["compression"], "before_training": before, "after_training": after,
    }
    table = format_table(result)
    print("\n" + table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


def format_table(result: dict) -> str:
    before, after = result["before_training"], result["after_training"]
    steps = result["settings"]["cpt_steps"]
    lines = [f"| model (new rows) | bits/byte before training | gap to base | of which at new-token targets | "
             f"p(new tokens) at old-token targets | bits/byte after {steps} steps | gap to base trained |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in before:
        label = "base, original tokenizer" if name == "base" else f"extended, {name}"
        b, a = before[name], after[name]
        lines.append(f"| {label} | {b['bits_per_byte']:.4f} | {b['bits_per_byte'] - before['base']['bits_per_byte']:+.4f} | "
                     f"{b['bits_per_byte_new_targets']:.4f} | {b['new_token_mass_at_old_targets']:.3f} | "
                     f"{a['bits_per_byte']:.4f} | {a['bits_per_byte'] - after['base']['bits_per_byte']:+.4f} |")
    (row,) = result["compression"]
    lines.append(f"\ntokens per byte on the held-out code: {row['tokens_per_byte']['before']:.4f} (base) -> "
                 f"{row['tokens_per_byte']['after']:.4f} (extended, {result['tokenizer']['added']} new tokens)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
