"""Generated long-context retrieval tasks: sized with the tokenizer, scored by jaxcpt as by lm-eval's hf backend."""

import json

import pytest
from test_harness import _hf_backend, _jaxcpt, hf_dir  # noqa: F401  (the module fixture: a tiny Llama + tokenizer)
from transformers import AutoTokenizer

from jaxcpt.errors import UserError
from jaxcpt.eval.long_context import write_tasks


def _evaluate(lm, tasks, include):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(include)),
                                   log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


@pytest.mark.slow  # two harness runs over 256-token documents
def test_passkey_and_needle_tasks_score_as_the_hf_backend_and_fill_their_length(hf_dir, tmp_path):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    names = write_tasks(tmp_path, tokenizer, [256], [0.0, 1.0], examples=2, needles=2, max_length=256)
    assert names == ["passkey_256_d0", "passkey_256_d100", "needles_256_d0", "needles_256_d100"]
    for name in names:
        length = int(name.split("_")[1])
        for row in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines()):
            tokens = len(tokenizer(row["context"] + row["target"])["input_ids"])
            assert length - 20 < tokens <= length  # filled to its length, one filler sentence short at most
            assert row["target"].strip() in row["context"]  # the needle is in the haystack
    ours = _evaluate(_jaxcpt(hf_dir, 256), ["passkey", "needles"], tmp_path)
    theirs = _evaluate(_hf_backend(hf_dir, 256), ["passkey", "needles"], tmp_path)
    for name in names:
        for metric in ("acc,none", "perplexity,none"):
            a, b = ours["results"][name][metric], theirs["results"][name][metric]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (name, metric, a, b)


def test_a_task_longer_than_the_model_reads_is_an_error_naming_the_fix(hf_dir, tmp_path):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    with pytest.raises(UserError, match="length 512 is longer than the model reads \\(256 tokens.*lengths <= 256"):
        write_tasks(tmp_path, tokenizer, [128, 512], [0.5], max_length=256)
