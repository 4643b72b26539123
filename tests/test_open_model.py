"""One way to open a model (jaxcpt.open_model): every command reads the same parameters, tokenizer and
adaptation record from an HF directory, a run, RUN/checkpoints or one step; one rule for a LoRA
adapter's base, with init.path present and gone."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import hf_logits, rel_err
from tokenizer_fixtures import llama_style_tokenizer_dir
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from jaxcpt.cli import main
from jaxcpt.sharding.mesh import build_mesh

KINDS = ("hf", "run", "checkpoints", "step")


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    """{kind: path} of one model: a tiny Llama HF directory (tokenizer and adaptation record beside it)
    and its import-hf run directory, RUN/checkpoints and RUN/checkpoints/0."""
    from jaxcpt.adapt.metadata import FORMAT

    root = tmp_path_factory.mktemp("open_model")
    hf = root / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(hf)
    for name in os.listdir(llama_style_tokenizer_dir()):
        shutil.copy(os.path.join(llama_style_tokenizer_dir(), name), hf / name)
    (hf / "jaxcpt_adaptation.json").write_text(json.dumps({"format": FORMAT, "note": "a record to carry"}))
    assert main(["import-hf", str(hf), "--out", str(root / "run")]) == 0
    return {"hf": hf, "run": root / "run", "checkpoints": root / "run" / "checkpoints",
            "step": root / "run" / "checkpoints" / "0"}


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_same_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _tokenizer_files(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
            if name.startswith(("tokenizer", "special_tokens"))}


def test_open_model_gives_one_record_from_every_kind_of_path(model_paths):
    from jaxcpt.open_model import open_model

    opened = {kind: open_model(path, mesh=build_mesh({"data": 8})) for kind, path in model_paths.items()}
    reference = opened["hf"]
    assert reference.location.kind == "hf" and reference.location.step_dir is None
    for kind in KINDS[1:]:
        got = opened[kind]
        assert got.location.kind == "checkpoint" and got.location.step_dir.endswith("checkpoints/0")
        assert got.config == reference.config
        _assert_same_trees(_numpy(got.params), _numpy(reference.params))
        assert got.adaptation == reference.adaptation and reference.adaptation["note"]  # import-hf keeps it in the meta
        assert got.tokenizer_dir == str(model_paths["run"] / "tokenizer")
        assert _tokenizer_files(got.tokenizer_dir) == _tokenizer_files(reference.tokenizer_dir)
    abstract = open_model(model_paths["step"], mesh=build_mesh({"data": 8}), abstract=True)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract.params) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), reference.params)


def test_evaluate_opens_every_kind_of_path_with_equal_parameters(model_paths):
    from jaxcpt.eval.loading import load_for_evaluation
    from jaxcpt.model.persist import params_of

    loaded = {kind: load_for_evaluation(path, mesh=build_mesh({"data": 8})) for kind, path in model_paths.items()}
    reference = _numpy(params_of(loaded["hf"][0]))
    for kind in KINDS:
        model, tokenizer, _ = loaded[kind]
        _assert_same_trees(_numpy(params_of(model)), reference)
        assert tokenizer("a b c")["input_ids"] == loaded["hf"][1]("a b c")["input_ids"]


def test_export_hf_opens_every_kind_of_path_with_equal_parameters(model_paths, tmp_path):
    from safetensors.numpy import load_file

    exported = {}
    for kind, path in model_paths.items():  # an HF directory too: export-hf re-shards or re-types it
        assert main(["export-hf", str(path), "--out", str(tmp_path / kind), "--dtype", "float32"]) == 0
        exported[kind] = load_file(tmp_path / kind / "model.safetensors")
        assert (tmp_path / kind / "tokenizer_config.json").is_file()
        assert (tmp_path / kind / "jaxcpt_adaptation.json").is_file()
    original = load_file(model_paths["hf"] / "model.safetensors")
    for kind in KINDS:
        assert exported[kind].keys() == original.keys()
        assert all(np.array_equal(exported[kind][k], original[k]) for k in original), kind


def test_adapt_opens_every_kind_of_path_with_equal_parameters(model_paths):
    from jaxcpt.adapt.model_io import load_source

    sources = {kind: load_source(path) for kind, path in model_paths.items()}
    for kind in KINDS:
        _assert_same_trees(sources[kind].params, sources["hf"].params)
        assert sources[kind].config == sources["hf"].config
        assert sources[kind].adaptation == sources["hf"].adaptation
        assert _tokenizer_files(sources[kind].tokenizer_dir) == _tokenizer_files(sources["hf"].tokenizer_dir)


def test_merge_opens_every_kind_of_path_with_equal_tensors(model_paths):
    from jaxcpt.merge.inputs import hf_tensors, open_input

    inputs = {kind: open_input(path) for kind, path in model_paths.items()}
    for tensor in hf_tensors(inputs["hf"].config):
        want = inputs["hf"].read(tensor)
        for kind in KINDS[1:]:
            np.testing.assert_array_equal(inputs[kind].read(tensor), want, err_msg=f"{kind}: {tensor.name}")


def test_train_start_up_opens_every_kind_of_path_with_equal_parameters(model_paths, tmp_path):
    from jaxcpt.sharding.rules import make_rules
    from jaxcpt.train import state as train_state
    from jaxcpt.train.config import load_train_config

    mesh, rules, params = build_mesh({"data": 8}), make_rules(), {}
    for kind, path in model_paths.items():
        source = "hf" if kind == "hf" else "checkpoint"
        cfg = load_train_config(None, [f"run_dir={tmp_path / kind}", f"init.source={source}", f"init.path={path}",
                                       "data.sources=[{name: d, paths: [unread.jsonl]}]"])
        start = train_state.locate_start(cfg)
        model_cfg = train_state.resolve_model_config(cfg, start)
        params[kind] = _numpy(train_state.initial_params(cfg, model_cfg, mesh, rules, start))
        assert start.adaptation["note"] == "a record to carry"
    for kind in KINDS[1:]:
        _assert_same_trees(params[kind], params["hf"])


def test_a_mismatched_init_source_names_the_fix(model_paths, tmp_path):
    from jaxcpt.errors import UserError
    from jaxcpt.train import state as train_state
    from jaxcpt.train.config import load_train_config

    cfg = load_train_config(None, [f"run_dir={tmp_path}", "init.source=hf", f"init.path={model_paths['run']}",
                                   "data.sources=[{name: d, paths: [unread.jsonl]}]"])
    with pytest.raises(UserError, match="set init.source=checkpoint"):
        train_state.locate_start(cfg)


# -- a LoRA adapter's base: init.path while it exists, else RUN/hf/base ---------------------------------
def _lora_run(tmp_path, *extra):
    from test_lora import _hf_start

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    return train(load_train_config(None, _hf_start(tmp_path, "train.steps=2", "checkpoint.every_steps=2", *extra)))


def _adapter_base_name(adapter_dir):
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.slow
def test_lora_adapter_base_is_init_path_while_it_exists_else_run_hf_base_for_export_and_evaluate(tmp_path):
    from test_lora import SEQ, _peft_logits

    from jaxcpt.eval.loading import load_for_evaluation

    _lora_run(tmp_path)
    run, base = tmp_path / "run", tmp_path / "base"
    input_ids = np.random.RandomState(0).randint(0, 200, size=(2, SEQ))

    def evaluated_logits():
        model, _, _ = load_for_evaluation(run, mesh=build_mesh({"data": 8}))
        return np.asarray(model(jnp.asarray(input_ids)))

    # init.path present: the adapter names it; evaluation runs the checkpoint's own model
    assert main(["export-hf", str(run), "--out", str(tmp_path / "adapter_a"), "--lora", "adapter",
                 "--dtype", "float32"]) == 0
    assert _adapter_base_name(tmp_path / "adapter_a") == str(base)
    assert not (run / "hf" / "base").exists()
    assert main(["export-hf", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval(),
                       input_ids)
    before = evaluated_logits()
    assert rel_err(before, merged) < 1e-5

    # init.path gone: the same rule writes RUN/hf/base from the checkpoint (no error), peft loads the pair,
    # and evaluation, which never needed init.path, is unchanged
    shutil.move(base, tmp_path / "moved_away")
    assert main(["export-hf", str(run), "--out", str(tmp_path / "adapter_b"), "--lora", "adapter",
                 "--dtype", "float32"]) == 0
    assert _adapter_base_name(tmp_path / "adapter_b") == str(run / "hf" / "base")
    assert rel_err(_peft_logits(run / "hf" / "base", tmp_path / "adapter_b", input_ids), merged) < 1e-5
    np.testing.assert_array_equal(evaluated_logits(), before)


@pytest.mark.slow
def test_the_trainers_adapter_export_follows_the_same_base_rule(tmp_path):
    _lora_run(tmp_path, "export.final=true", "export.lora=adapter", "export.dtype=float32")
    run = tmp_path / "run"
    assert _adapter_base_name(run / "hf" / "step_2-adapter") == str(tmp_path / "base")
    assert not (run / "hf" / "base").exists()
    # the start gone (deleted, or a fresh VM): the run resumes from its checkpoint alone
    _lora_run(tmp_path, "export.final=true", "export.lora=adapter", "export.dtype=float32", "train.steps=4",
              "checkpoint.every_steps=4", f"init.path={tmp_path / 'gone'}")
    assert _adapter_base_name(run / "hf" / "step_4-adapter") == str(run / "hf" / "base")
    assert (run / "hf" / "base" / "config.json").is_file()
