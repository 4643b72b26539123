"""lm-eval with jaxcpt's model: the same scores as the harness's own HF backend, and greedy decoding as transformers'."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hf_models import make_hf_model
from tokenizer_fixtures import llama_style_tokenizer_dir
from transformers import LlamaConfig, LlamaForCausalLM

TASKS = os.path.join(os.path.dirname(__file__), "eval_tasks")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers beside a Llama-style tokenizer (BOS added, 320 ids)."""
    directory = tmp_path_factory.mktemp("harness") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(directory)
    for name in os.listdir(llama_style_tokenizer_dir()):
        shutil.copy(os.path.join(llama_style_tokenizer_dir(), name), directory / name)
    return directory


def _evaluate(lm, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=TASKS),
                                   log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def _hf_backend(hf_dir, max_length):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, device="cpu", max_length=max_length)


def _jaxcpt(path, max_length, **kwargs):
    from jaxcpt.eval.harness import JaxcptLM

    return JaxcptLM.from_path(str(path), batch_size=4, max_length=max_length, **kwargs)


def _responses(results, task):
    return [sample["resps"] for sample in results["samples"][task]]


def test_loglikelihoods_and_accuracy_equal_the_hf_backend(hf_dir):
    tasks = ["jaxcpt_tiny_mc", "jaxcpt_tiny_ppl"]  # multiple choice, and rolling windows (documents > 48 tokens)
    ours, theirs = _evaluate(_jaxcpt(hf_dir, 48), tasks), _evaluate(_hf_backend(hf_dir, 48), tasks)
    ll_ours = np.array([r[0][0] for rs in _responses(ours, "jaxcpt_tiny_mc") for r in rs], np.float64)
    ll_theirs = np.array([r[0][0] for rs in _responses(theirs, "jaxcpt_tiny_mc") for r in rs], np.float64)
    assert len(ll_ours) == 48
    assert np.abs(ll_ours - ll_theirs).max() / np.abs(ll_theirs).max() < 1e-4
    greedy = [r[0][1] for rs in _responses(ours, "jaxcpt_tiny_mc") for r in rs]
    assert greedy == [r[0][1] for rs in _responses(theirs, "jaxcpt_tiny_mc") for r in rs]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["jaxcpt_tiny_mc"][metric] == theirs["results"]["jaxcpt_tiny_mc"][metric]
    rolling_ours = np.array([rs[0][0] for rs in _responses(ours, "jaxcpt_tiny_ppl")])
    rolling_theirs = np.array([rs[0][0] for rs in _responses(theirs, "jaxcpt_tiny_ppl")])
    assert np.abs(rolling_ours - rolling_theirs).max() / np.abs(rolling_theirs).max() < 1e-4
    ppl = ours["results"]["jaxcpt_tiny_ppl"]["word_perplexity,none"]
    assert abs(ppl - theirs["results"]["jaxcpt_tiny_ppl"]["word_perplexity,none"]) / ppl < 1e-4


def test_generate_until_returns_what_the_hf_backend_generates(hf_dir):
    ours, theirs = _evaluate(_jaxcpt(hf_dir, 64), ["jaxcpt_tiny_gen"]), _evaluate(_hf_backend(hf_dir, 64), ["jaxcpt_tiny_gen"])
    generated = _responses(ours, "jaxcpt_tiny_gen")
    assert generated == _responses(theirs, "jaxcpt_tiny_gen")
    assert any(resp[0][0].strip() for resp in generated)  # something was generated, not only empty strings
    assert ours["results"]["jaxcpt_tiny_gen"]["exact_match,none"] == theirs["results"]["jaxcpt_tiny_gen"]["exact_match,none"]


def test_a_jaxcpt_checkpoint_scores_like_the_hf_directory_it_came_from(hf_dir, tmp_path):
    from jaxcpt.cli import main

    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    from_hf = _evaluate(_jaxcpt(hf_dir, 48), ["jaxcpt_tiny_mc"])
    from_checkpoint = _evaluate(_jaxcpt(tmp_path / "ckpt", 48), ["jaxcpt_tiny_mc"])
    assert _responses(from_checkpoint, "jaxcpt_tiny_mc") == _responses(from_hf, "jaxcpt_tiny_mc")


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window", "qwen3_tied", "gemma2_softcap_window",
                                  "gemma3_pattern_two_bases", "olmo3_post_norm_pattern", "smollm3_nope"])
def test_greedy_decoding_with_the_kv_cache_matches_transformers_generate(tmp_path, name):
    from jaxcpt.hf.convert import load_hf
    from jaxcpt.model.decode import generate_greedy

    torch_model = make_hf_model(name, tmp_path / name)
    model = load_hf(tmp_path / name)
    rng = np.random.RandomState(0)
    vocab = model.config.vocab_size
    prompts = [rng.randint(3, vocab, size=n).tolist() for n in (4, 11)]  # different lengths: left padding
    width = max(map(len, prompts))
    ids, mask = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    tokens, lengths = generate_greedy(model, ids, mask, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, len(prompt):].tolist()
        assert np.asarray(tokens[row]).tolist() == expected
    assert np.asarray(lengths).tolist() == [10, 10]


def test_decoding_stops_at_a_stop_id(tmp_path):
    from jaxcpt.hf.convert import load_hf
    from jaxcpt.model.decode import generate_greedy

    make_hf_model("llama_gqa", tmp_path / "m")
    model = load_hf(tmp_path / "m")
    ids, mask = np.array([[5, 6, 7, 8]], np.int32), np.ones((1, 4), np.int32)
    free, _ = generate_greedy(model, ids, mask, max_new_tokens=6)
    stop = int(free[0, 2])  # make the third generated token a stop id
    tokens, lengths = generate_greedy(model, ids, mask, max_new_tokens=6, stop_ids=(stop,))
    first = np.asarray(free[0]).tolist().index(stop)
    assert int(lengths[0]) == first + 1 and np.asarray(tokens[0, :first + 1]).tolist() == np.asarray(free[0, :first + 1]).tolist()


def test_evaluate_command_writes_the_harness_results_json(hf_dir, tmp_path):
    from jaxcpt.cli import main

    out = tmp_path / "results.json"
    assert main(["evaluate", str(hf_dir), "--tasks", "jaxcpt_tiny_mc", "--include-path", TASKS, "--limit", "4",
                 "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert "acc,none" in results["results"]["jaxcpt_tiny_mc"] and results["configs"]["jaxcpt_tiny_mc"]
    assert main(["evaluate", str(hf_dir), "--tasks", "no_such_task", "--include-path", TASKS]) == 2


def _downstream_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records if r["kind"] == "downstream"]
    assert len(steps) == len(set(steps)), f"a downstream step recorded twice: {steps}"
    return {r["step"]: r["tasks"] for r in records if r["kind"] == "downstream"}


@pytest.mark.slow
def test_downstream_tasks_in_training_are_scored_at_step_0_and_later_and_resume_after_sigkill(tmp_path):
    import signal
    import time

    from train_helpers import make_corpora, run_cli, tiny_overrides

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    corpora = make_corpora(tmp_path / "data")
    downstream = [f"eval.downstream={{tasks: [jaxcpt_tiny_mc], include_path: {TASKS}, limit: 4, every: 4}}",
                  "checkpoint.every_steps=4", "ema.decay=0.9"]
    train(load_train_config(None, tiny_overrides(tmp_path / "straight", corpora, steps=12) + downstream))
    straight = _downstream_records(tmp_path / "straight")
    assert sorted(straight) == [0, 4, 8, 12]
    assert all(set(tasks["jaxcpt_tiny_mc"]) == {"acc", "acc_norm"} for tasks in straight.values())
    with open(tmp_path / "straight" / "metrics.jsonl") as f:
        assert all("ema" in r for r in map(json.loads, f) if r["kind"] == "downstream")

    killed = tmp_path / "killed"
    args = ["train", *tiny_overrides(killed, corpora, steps=12), *downstream]
    proc = run_cli(args)
    start = time.monotonic()
    while not (killed / "checkpoints" / "8" / "state").is_dir():
        assert proc.poll() is None and time.monotonic() - start < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(killed / "checkpoints" / "8")  # as if killed before the step-8 save finished
    resumed = run_cli(args)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert _downstream_records(killed) == straight


def test_downstream_evaluation_without_lm_eval_installed_stops_before_any_work(monkeypatch):
    import importlib.util

    from jaxcpt.errors import UserError
    from jaxcpt.eval.downstream import DownstreamConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    DownstreamConfig().validate()  # not enabled: nothing needed
    with pytest.raises(UserError, match=r"pip install 'jaxcpt\[eval\]'"):
        DownstreamConfig(tasks=["arc_easy"]).validate()
