"""Datasets of the tiny test tasks, read from the JSONL files beside this file (nothing is downloaded)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, **_) -> datasets.DatasetDict:
    with open(os.path.join(HERE, name)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs):
    return _load("tiny_mc.jsonl", **kwargs)


def generation(**kwargs):
    return _load("tiny_gen.jsonl", **kwargs)


def documents(**kwargs):
    return _load("tiny_text.jsonl", **kwargs)
