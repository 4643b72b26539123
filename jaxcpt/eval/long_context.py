"""Long-context retrieval tasks generated locally, as lm-eval tasks: passkey and multi-needle (RULER-style).

``jaxcpt long-context-tasks --tokenizer DIR --lengths 4096,16384 --depths 0,0.5,1 --out DIR`` writes
one lm-eval task per (kind, length, depth) into DIR (a YAML and a JSONL each; nothing is
downloaded), named ``passkey_L_dD`` and ``needles_L_dD``; point ``eval.downstream.include_path``
(or ``jaxcpt evaluate --include-path``) at DIR and list the names (or the groups ``passkey`` /
``needles``) in ``tasks``.

- **passkey** (Mohtashami & Jaggi 2023): a 5-digit key hidden at ``depth`` (0 = start, 1 = end)
  of repeated filler sentences; the model must continue "The pass key is" with it.
- **needles** (RULER's multi-key needle-in-a-haystack, Hsieh et al. 2024): ``needles`` key/value
  facts spread around ``depth``; the question asks for one of them.

Each document is sized with the model's own tokenizer to ``length`` tokens (prompt plus answer),
and scored as a ``loglikelihood`` task: ``acc`` is 1 when the answer is the model's greedy
continuation (what retrieval asks), ``perplexity`` is the answer's. Scoring by likelihood rather
than generation keeps one forward pass per document, which is what lengths of 32k and more need.

A task longer than the model reads (``max_position_embeddings`` from ``--model``) is an error:
the harness would silently cut the haystack from the left, dropping the needle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxcpt.errors import UserError

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")  # RULER's noise
KINDS = ("passkey", "needles")


def _passkey(rng: random.Random) -> tuple[str, str, str]:
    key = str(rng.randint(10000, 99999))
    return f"The pass key is {key}. Remember it. {key} is the pass key. ", "What is the pass key? The pass key is", f" {key}"


def _needles(rng: random.Random, count: int) -> tuple[list[str], str, str]:
    words = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper"]
    keys = rng.sample(words, count)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    asked = rng.randrange(count)
    facts = [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
    return facts, f"What is the special magic number for {keys[asked]}? The special magic number for {keys[asked]} is:", \
        f" {values[asked]}"


def _haystack(count_tokens, length: int, inserts: list[str], depth: float, question: str, answer: str) -> str:
    """Filler sentences with ``inserts`` placed around ``depth``, sized so prompt + answer is at most ``length`` tokens."""
    sentences = [s + "." for s in FILLER.strip().split(".") if s.strip()]

    def build(n: int) -> str:
        filler = [sentences[i % len(sentences)] for i in range(n)]
        at = round(depth * n)
        body = filler[:at] + [s.strip() for s in inserts] + filler[at:]
        return " ".join(body) + "\n" + question

    low, high = 0, 1
    while count_tokens(build(high) + answer) <= length:
        low, high = high, high * 2
    while high - low > 1:  # the most filler sentences that still fit
        mid = (low + high) // 2
        low, high = (mid, high) if count_tokens(build(mid) + answer) <= length else (low, mid)
    text = build(low)
    if low == 0 and count_tokens(text + answer) > length:
        raise UserError(f"a long-context task of {length} tokens cannot hold even its needle and question "
                        f"({count_tokens(text + answer)} tokens); choose a longer length")
    return text


def task_name(kind: str, length: int, depth: float) -> str:
    return f"{kind}_{length}_d{round(depth * 100)}"


def write_tasks(out: str | Path, tokenizer, lengths: list[int], depths: list[float], *, kinds=KINDS,
                examples: int = 20, needles: int = 4, seed: int = 0, max_length: int | None = None) -> list[str]:
    """Write the tasks into ``out``; their names. ``tokenizer``: a transformers tokenizer (sizes each document).
    ``max_length``: the longest context the model reads (an error for a longer task)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise UserError(f"unknown long-context task kind '{unknown[0]}'; the kinds are {', '.join(KINDS)}")
    if max_length is not None and max(lengths) > max_length:
        raise UserError(f"long-context task length {max(lengths)} is longer than the model reads ({max_length} "
                        "tokens, its max_position_embeddings): the harness would cut the haystack, needle included; "
                        f"choose lengths <= {max_length}, or extend the model's context first (model.rope)")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise UserError(f"needle depth {bad[0]} is outside [0, 1] (0 = start of the context, 1 = end)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])  # with the BOS the harness also adds

    names = []
    for kind in kinds:
        for length in lengths:
            for depth in depths:
                name = task_name(kind, length, depth)
                rng = random.Random(f"{seed}/{name}")
                rows = []
                for _ in range(examples):
                    if kind == "passkey":
                        insert, question, answer = _passkey(rng)
                        inserts = [insert]
                    else:
                        inserts, question, answer = _needles(rng, needles)
                    rows.append({"context": _haystack(count_tokens, length, inserts, depth, question, answer),
                                 "target": answer})
                data = out / f"{name}.jsonl"
                data.write_text("".join(json.dumps(r) + "\n" for r in rows))
                (out / f"{name}.yaml").write_text(_task_yaml(name, kind, data.resolve()))
                names.append(name)
        (out / f"{kind}.yaml").write_text(json.dumps({"group": kind, "task": [n for n in names if n.startswith(kind)],
                                                      "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]},
                                                     indent=1) + "\n")
    return names


def _task_yaml(name: str, kind: str, data: Path) -> str:
    # JSON is YAML: one dict, no templating surprises
    return json.dumps({
        "task": name, "tag": [f"{kind}_all"], "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
        "metadata": {"version": 1.0}}, indent=1) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory (the model's), to size documents")
    parser.add_argument("--lengths", required=True, help="comma-separated task lengths in tokens, e.g. 4096,16384")
    parser.add_argument("--depths", default="0,0.5,1", help="comma-separated needle depths in [0, 1]")
    parser.add_argument("--kinds", default=",".join(KINDS), help="passkey, needles or both")
    parser.add_argument("--examples", type=int, default=20, help="documents per task")
    parser.add_argument("--model", default=None, help="the model's HF directory: lengths past its "
                        "max_position_embeddings are an error")
    parser.add_argument("--out", required=True, help="directory to write the task YAMLs and data into")


def main(args) -> int:
    from transformers import AutoTokenizer

    max_length = None
    if args.model:
        max_length = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings")
    names = write_tasks(args.out, AutoTokenizer.from_pretrained(args.tokenizer),
                        [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")],
                        kinds=args.kinds.split(","), examples=args.examples, max_length=max_length)
    print(f"wrote {len(names)} tasks to {args.out}: {', '.join(names)}")
    return 0
