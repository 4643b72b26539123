"""`jaxcpt decontaminate`: n-gram overlap between a run's training sources and its evaluation sets.

Evaluation sets: each source's held-out documents (``eval_fraction`` / ``eval_documents``),
which the other sources' training must not contain either, and the documents of every
``eval.downstream`` task (lm-eval: the prompt with its choices and target). Text is compared
as lower-cased words (Unicode ``\\w+``), the convention of the GPT-3 and Llama contamination
studies; an evaluation document is contaminated when one of its 13-grams occurs in a training
document. The training side is streamed once per source (this host's reader, no shuffling),
keeping only the hashes of the evaluation n-grams in memory.

With ``--write-hashes FILE``, the text hashes of the contaminated training documents are
written as JSON; ``data.exclude_documents: FILE`` drops them at read time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re

from jaxcpt.errors import UserError

WORD = re.compile(r"\w+", re.UNICODE)


def ngram_hashes(text: str, n: int) -> set[int]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {_hash(" ".join(words))} if words and len(words) >= max(1, n // 2) else set()
    return {_hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def _hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")


def _first_ngram(text: str, grams: set[int], n: int) -> str | None:
    words = WORD.findall(text.lower())
    for i in range(max(1, len(words) - n + 1)):
        gram = " ".join(words[i : i + n])
        if _hash(gram) in grams:
            return gram
    return None


def _source_documents(cfg, index: int, split: str):
    """(text, text hash) of one source's split, in file order (one reader, no shuffling)."""
    from jaxcpt.data.documents import DocumentDataset
    from jaxcpt.data.plan import _counter, _limits, _plan
    from jaxcpt.data.sources import text_hash

    plan = _plan(dataclasses.replace(cfg, num_workers=0), None, 0, 1)
    src = cfg.sources[index]
    docs = DocumentDataset(source=src.name, units=plan.units[index], text_field=src.text_field,
                           text_split=src.text_split, split=split, eval_fraction=src.eval_fraction,
                           eval_hashes=plan.eval_hashes[index], held_out_anywhere=plan.held_out_anywhere,
                           counter=_counter(cfg, src.name), repeat=False, seed=cfg.seed, shuffle_units=False,
                           limits=_limits(cfg), instruction=src.instruction)
    for doc in docs:
        if isinstance(doc, str):
            yield doc, text_hash(doc.encode("utf-8"))


def _task_documents(downstream) -> dict[str, list[str]]:
    if not downstream.tasks:
        return {}
    from lm_eval.tasks import get_task_dict

    from jaxcpt.eval.downstream import task_manager

    out: dict[str, list[str]] = {}

    def walk(tasks):
        for name, task in tasks.items():
            if isinstance(task, dict):
                walk(task)
                continue
            texts = []
            for doc in task.eval_docs:
                parts = [str(task.doc_to_text(doc))]
                if task.OUTPUT_TYPE == "multiple_choice":
                    parts += [str(c) for c in task.doc_to_choice(doc)]
                else:
                    parts.append(str(task.doc_to_target(doc)))
                texts.append(" ".join(parts))
            out[getattr(name, "group_name", None) or str(name)] = texts

    walk(get_task_dict(list(downstream.tasks), task_manager(downstream.include_path)))
    return out


def decontaminate(cfg, *, n: int = 13, examples: int = 3) -> tuple[dict, list[int]]:
    """(report, text hashes of contaminated training documents) for a TrainConfig ``cfg``."""
    data = cfg.data
    eval_sets: dict[str, list[str]] = {}
    for i, src in enumerate(data.sources):
        if src.has_eval_split:
            eval_sets[f"held-out:{src.name}"] = [t for t, _ in _source_documents(data, i, "eval")]
    eval_sets.update({f"task:{k}": v for k, v in _task_documents(cfg.eval.downstream).items()})
    if not eval_sets:
        raise UserError("no evaluation set to check: give a source eval_fraction or eval_documents, or "
                        "eval.downstream.tasks")
    grams = {name: [ngram_hashes(t, n) for t in texts] for name, texts in eval_sets.items()}
    every = set().union(*(g for gs in grams.values() for g in gs))
    hit: dict[str, dict[int, dict]] = {name: {} for name in eval_sets}  # eval set -> eval doc -> first example
    flagged: list[int] = []
    trained = {}
    for i, src in enumerate(data.sources):
        count = 0
        for text, doc_hash in _source_documents(data, i, "train"):
            count += 1
            mine = ngram_hashes(text, n) & every
            if not mine:
                continue
            flagged.append(doc_hash)
            for name, per_doc in grams.items():
                for d, g in enumerate(per_doc):
                    if d not in hit[name] and g & mine:
                        gram = _first_ngram(eval_sets[name][d], g & mine, n)
                        hit[name][d] = {"eval_document": eval_sets[name][d][:300], "ngram": gram,
                                        "training_source": src.name, "training_hash": f"{doc_hash:016x}"}
        trained[src.name] = count
    report = {
        "n": n,
        "training_documents": trained,
        "eval_sets": {name: {"documents": len(eval_sets[name]), "contaminated": len(hit[name]),
                             "fraction": len(hit[name]) / max(len(eval_sets[name]), 1),
                             "examples": [hit[name][d] for d in sorted(hit[name])[:examples]]}
                      for name in eval_sets},
        "contaminated_training_documents": len(set(flagged)),
    }
    return report, sorted(set(flagged))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (its data sources and eval tasks)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for jaxcpt train")
    parser.add_argument("--ngram", type=int, default=13, help="words per n-gram (13: GPT-3's and Llama's choice)")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per evaluation set")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--write-hashes", help="write the contaminated training documents' text hashes here "
                        "(JSON), for data.exclude_documents")


def run(args) -> int:
    from jaxcpt.train.config import load_train_config

    cfg = load_train_config(args.config, list(args.overrides))
    report, flagged = decontaminate(cfg, n=args.ngram, examples=args.examples)
    print(f"{'evaluation set':<32} {'documents':>9} {'contaminated':>12} {'fraction':>8}")
    for name, r in report["eval_sets"].items():
        print(f"{name:<32} {r['documents']:>9} {r['contaminated']:>12} {r['fraction']:>8.3f}")
        for ex in r["examples"]:
            print(f"    '{ex['ngram']}' also in source '{ex['training_source']}' (document {ex['training_hash']})")
    print(f"training documents sharing a {report['n']}-gram with an evaluation set: "
          f"{report['contaminated_training_documents']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.write_hashes:
        with open(args.write_hashes, "w") as f:
            json.dump({"format": "jaxcpt-exclude-v1", "text_hashes": [f"{h:016x}" for h in flagged]}, f)
        print(f"wrote {len(flagged)} hashes to {args.write_hashes}")
    return 0
