"""The set-up stage: what `jaxcpt train --check` resolves, and the errors that stop a run before it starts."""

import json

import pytest
import torch
from tokenizer_fixtures import QWEN_STYLE, qwen_style_tokenizer_dir
from train_helpers import make_corpora, tiny_overrides
from transformers import LlamaConfig, LlamaForCausalLM

from jaxcpt.cli import main
from jaxcpt.config import ConfigError
from jaxcpt.errors import UserError
from jaxcpt.train.config import load_train_config
from jaxcpt.train.setup import set_up


def test_check_prints_config_layout_and_data_and_writes_nothing(tmp_path, capsys):
    corpora = make_corpora(tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, corpora, mesh="{data: 2, fsdp: 2, tensor: 2}")
    assert main(["train", "--check", *overrides]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out
    assert "mesh         data=2 x fsdp=2 x tensor=2 (8 devices)" in out
    assert "layers.k" in out and "per device" in out
    # 2 KV heads split over tensor=2; the embedding's 320 rows over tensor=2
    assert "source       general" in out and "source       domain" in out
    assert "documents    BOS 1 before, EOS 2 after each document" in out
    assert not run_dir.exists()


def test_check_reports_a_missing_data_path_and_exits_2(tmp_path, capsys):
    corpora = make_corpora(tmp_path / "data")
    corpora["domain"] = str(tmp_path / "nowhere.jsonl")
    assert main(["train", "--check", *tiny_overrides(tmp_path / "run", corpora)]) == 2
    err = capsys.readouterr().err
    assert "source 'domain'" in err and "nowhere.jsonl" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_layout_notes_a_dimension_the_mesh_cannot_split(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    overrides = tiny_overrides(tmp_path / "run", corpora, mesh="{data: 2, tensor: 4}")  # 2 KV heads, tensor=4
    layout = set_up(load_train_config(None, overrides), check=True).program.layout
    line = next(line for line in layout.splitlines() if line.strip().startswith("layers.k "))
    assert "kv_heads=2 not split over tensor=4 (does not divide)" in line


def test_micro_batches_that_cannot_split_over_the_batch_axes_are_an_error_naming_the_fix(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    overrides = tiny_overrides(tmp_path / "run", corpora, mesh="{data: 8}", batch=8) + ["optim.grad_accum_steps=2"]
    with pytest.raises(UserError, match=r"micro-batches of 4 rows.*data=8.*multiple of 16"):
        set_up(load_train_config(None, overrides), check=True)


def test_bf16_parameters_are_refused_with_the_reason(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    overrides = tiny_overrides(tmp_path / "run", corpora) + ["model.param_dtype=bfloat16"]
    with pytest.raises(ConfigError, match=r"Adam's moments.*rounds away.*param_dtype=float32 and model.dtype=bfloat16"):
        set_up(load_train_config(None, overrides), check=True)


def test_tokenizer_ids_past_the_embedding_are_an_error_before_training(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    overrides = tiny_overrides(tmp_path / "run", corpora) + ["model.vocab_size=300"]  # the tokenizer has 320 ids
    with pytest.raises(UserError, match=r"ids up to 319.*300 rows.*extend-vocab"):
        set_up(load_train_config(None, overrides), check=True)


def _qwen_style_hf_dir(tmp_path, **config):
    """A tiny Qwen2-like model saved by transformers next to the Qwen-style tokenizer (no BOS)."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = tmp_path / "qwen"
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         bos_token_id=QWEN_STYLE["eos_id"], eos_token_id=QWEN_STYLE["eos_id"], **config))
    model.save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = f"{qwen_style_tokenizer_dir()}/{name}"
        try:
            shutil.copy(source, hf / name)
        except FileNotFoundError:
            pass
    return hf


def test_hf_model_with_a_tokenizer_without_bos_starts_with_default_data_settings(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    hf = _qwen_style_hf_dir(tmp_path)
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora) if not o.startswith(("model.", "data.tokenizer"))]
    setup = set_up(load_train_config(None, overrides + ["init.source=hf", f"init.path={hf}"]), check=True)
    assert setup.tokenizers.data == str(hf)
    m = setup.model_cfg
    assert (m.eos_token_id, m.pad_token_id) == (QWEN_STYLE["eos_id"], QWEN_STYLE["pad_id"])
    assert m.bos_token_id == QWEN_STYLE["eos_id"]  # the HF config's BOS stays (Qwen names one it never adds)
    rows = setup.eval_batches["general"][0]
    starts = rows["inputs"][rows["positions"] == 0]
    assert QWEN_STYLE["eos_id"] not in starts.tolist()  # no BOS was invented: documents start with text


def test_scratch_model_takes_the_tokenizers_special_ids(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora) if not o.startswith(("data.tokenizer", "model.vocab"))]
    overrides += [f"data.tokenizer={qwen_style_tokenizer_dir()}", "model.vocab_size=512"]
    m = set_up(load_train_config(None, overrides), check=True).model_cfg
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (None, QWEN_STYLE["eos_id"], QWEN_STYLE["pad_id"])


def test_hf_export_writes_the_tokenizers_special_ids(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    torch.manual_seed(0)
    hf = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=7, eos_token_id=8)).save_pretrained(hf)
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora, steps=2) if not o.startswith(("model.", "data.tokenizer"))]
    overrides += ["init.source=hf", f"init.path={hf}", f"data.tokenizer={qwen_style_tokenizer_dir()}",
                  "export.final=true", "export.dtype=float32"]
    from jaxcpt.train.loop import train

    cfg = load_train_config(None, overrides)
    train(cfg)
    assert load_train_config(str(tmp_path / "run" / "config.yaml")) == cfg  # the run's config reads back
    exported = json.loads((tmp_path / "run" / "hf" / "step_2" / "config.json").read_text())
    assert exported["eos_token_id"] == QWEN_STYLE["eos_id"] and exported["pad_token_id"] == QWEN_STYLE["pad_id"]
    assert exported["bos_token_id"] == 7  # the tokenizer has none: the model's own stays
    assert (tmp_path / "run" / "hf" / "step_2" / "tokenizer.json").is_file()  # the tokenizer trained with ships


def test_training_from_a_qwen_style_hf_directory_with_default_data_settings(tmp_path):
    """No BOS token, EOS/PAD after the BPE vocabulary: the shipped defaults train and export it."""
    from jaxcpt.train.loop import train

    corpora = make_corpora(tmp_path / "data")
    hf = _qwen_style_hf_dir(tmp_path)
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora, steps=2) if not o.startswith(("model.", "data.tokenizer"))]
    summary = train(load_train_config(None, overrides + ["init.source=hf", f"init.path={hf}", "export.final=true"]))
    export = summary["exports"][-1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.bos_token is None and tokenizer.eos_token_id == QWEN_STYLE["eos_id"]
    assert AutoModelForCausalLM.from_pretrained(export).config.eos_token_id == QWEN_STYLE["eos_id"]
