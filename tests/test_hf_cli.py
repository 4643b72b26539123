"""import-hf and export-hf from the command line: HF -> jaxcpt checkpoint -> HF with the same logits."""

import numpy as np
import torch
from hf_models import hf_logits, make_hf_model, rel_err
from transformers import AutoModelForCausalLM

from jaxcpt.cli import main


def test_import_then_export_gives_the_same_model(tmp_path, capsys):
    make_hf_model("qwen2_tied", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")  # a tokenizer file travels along
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--mesh", "{fsdp: 4, tensor: 2}"]) == 0
    assert (tmp_path / "ckpt" / "checkpoints" / "0").is_dir()
    assert main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    ids = np.random.RandomState(0).randint(0, 256, size=(1, 12))
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert rel_err(hf_logits(exported, ids), hf_logits(original, ids)) == 0.0


def test_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["export-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_import_of_a_directory_without_config_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert "config.json" in capsys.readouterr().err
