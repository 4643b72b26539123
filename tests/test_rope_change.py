"""A RoPE change at the start of a run (model.rope) computes and exports what transformers computes with that config.

Oracle: transformers loading the *starting* directory with the new rope_parameters passed as a config
override (its own reading of the settings), against jaxcpt's run-start path and the export it writes.
"""

import json

import numpy as np
import pytest
import torch
from hf_models import hf_logits, make_hf_model, rel_err
from transformers import AutoModelForCausalLM

from jaxcpt.hf.convert import save_hf
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.rope_change import apply_rope_change, check_trained_length
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules
from jaxcpt.train.config import config_as_yaml_dict, load_train_config
from jaxcpt.train.state import graphdef_of, initial_params, locate_start, model_of, resolve_model_config

SOURCE = "data.sources=[{name: text, paths: [unused.jsonl]}]"  # a run needs one; these tests read no data
F32 = "model.dtype=float32"  # the run default is bfloat16 compute
SEQ = 48  # the starting model's RoPE is changed for positions past the original lengths (16) below

# (overrides, the rope_parameters transformers is given, max_position_embeddings)
CHANGES = {
    "theta": (["model.rope.theta=500000"], {"rope_type": "default", "rope_theta": 500000.0}, 512),
    "yarn": (["model.rope.scaling.type=yarn", "model.rope.scaling.factor=4", "model.rope.scaling.original_max_position_embeddings=16",
              "model.rope.max_position_embeddings=64"],
             {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
              "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}, 64),
    "llama3": (["model.rope.theta=500000", "model.rope.scaling.type=llama3", "model.rope.scaling.factor=8",
                "model.rope.scaling.original_max_position_embeddings=16"],
               {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 16,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 512),
}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    directory = tmp_path_factory.mktemp("start")
    make_hf_model("llama_gqa", directory)  # theta 10000, no scaling, max_position_embeddings 512
    return directory


@pytest.mark.parametrize("name", list(CHANGES))
def test_rope_change_matches_transformers_through_export(name, start, tmp_path):
    overrides, rope_parameters, longest = CHANGES[name]
    cfg = load_train_config(None, [SOURCE, F32, "init.source=hf", f"init.path={start}", *overrides])
    location = locate_start(cfg)
    model_cfg = resolve_model_config(cfg, location)  # the run's start: the HF config with the change applied
    mesh, rules = build_mesh({"data": 8}), make_rules()
    params = initial_params(cfg, model_cfg, mesh, rules, location)
    model = model_of(graphdef_of(model_cfg, rules), params)
    ids = np.random.RandomState(0).randint(0, 256, size=(2, SEQ))
    ours = np.asarray(model(ids))

    oracle = AutoModelForCausalLM.from_pretrained(start, rope_parameters=rope_parameters, dtype=torch.float32).eval()
    expected = hf_logits(oracle, ids)
    unchanged = hf_logits(AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval(), ids)
    assert rel_err(unchanged, expected) > 1e-3  # the change matters at these positions
    assert rel_err(ours, expected) < 1e-5

    save_hf(model, tmp_path / "export", dtype="float32")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["rope_parameters"] == rope_parameters and written["max_position_embeddings"] == longest
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert rel_err(hf_logits(exported, ids), expected) < 1e-5
    # the run's own config.yaml keeps the change, so a resume or a rerun reads it back
    assert config_as_yaml_dict(cfg)["model"]["rope"]["theta"] == cfg.model.rope.theta


def test_architecture_fields_other_than_rope_stay_refused_on_an_hf_start(start):
    from jaxcpt.config import ConfigError

    with pytest.raises(ConfigError, match="model.rope_theta is set.*only model"):
        load_train_config(None, [SOURCE, "init.source=hf", f"init.path={start}", "model.rope_theta=500000"])


def test_longer_rows_than_the_rope_was_trained_for_warn_with_the_numbers_unless_the_rope_changes():
    model_cfg = ModelConfig(max_position_embeddings=8192, rope_theta=500000.0)
    (warning,) = check_trained_length(model_cfg, None, {"stage long": 32768, "stage short": 8192})
    assert "stage long trains rows of 32768 tokens" in warning and "trained for 8192 positions" in warning
    assert "positions 8192..32767" in warning and "factor: 4" in warning
    change = load_train_config(None, [SOURCE, "model.rope.theta=1000000"]).model.rope
    assert check_trained_length(apply_rope_change(model_cfg, change), change, {"stage long": 32768}) == []
