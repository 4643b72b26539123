"""The 2025-2026 dense families (OLMo 3, SmolLM3): the options whose parameters have their own layout are each
needed to match transformers, depth expansion keeps their layer patterns, and a multimodal Gemma 4 checkpoint says
what a text-only import keeps (the text model itself: tests/test_gemma4.py).

Parity, export round trip and greedy generation of these families run in the shared parametrised tests
(tests/test_families.py, tests/test_harness.py) through their cases in tests/hf_models.py.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import make_hf_model, rel_err
from test_families import packed_batch, worst_document_error
from transformers import AutoModelForCausalLM

from jaxcpt.cli import main
from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf
from jaxcpt.hf.families import config_from_hf
from jaxcpt.model.transformer import abstract_model


def _with_options(model, **overrides):
    """``model`` under a config with ``overrides``, its weights carried over where the layout allows: a [H, D]
    projection-wide q/k norm scale becomes the per-head [D] scale of its first head, and norms the source lacks
    are unit scales."""
    cfg = dataclasses.replace(model.config, **overrides)
    graphdef, state = nnx.split(abstract_model(cfg, model.rules))
    source = nnx.state(model).to_pure_dict()

    def fill(path, variable):
        value = source
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        shape = variable.get_value().shape
        if value is None:
            return variable.replace(jnp.ones(shape, jnp.float32))
        if value.shape != shape:  # [L, H, D] -> [L, D]
            value = value[:, 0]
        return variable.replace(jnp.asarray(value))

    return nnx.merge(graphdef, nnx.map_state(fill, state))


@pytest.mark.parametrize("overrides", [dict(pre_norms=True, post_norms=False), dict(qk_norm_scope="head")],
                         ids=["norms_before_not_after", "qk_norm_per_head"])
def test_olmo3_norm_placement_and_projection_wide_qk_norm_are_each_needed_to_match(overrides, tmp_path):
    hf_model = make_hf_model("olmo3_post_norm_pattern", tmp_path)
    ids, segments, positions, docs = packed_batch()
    model = load_hf(tmp_path)
    args = (jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions))
    assert worst_document_error(np.asarray(model(*args)), hf_model, docs) < 1e-5
    off = _with_options(model, **overrides)
    # > 10x the parity bound: on random weights every head's RMS is alike, so per-head q/k norms are only a few
    # 1e-4 off (measured 5.7e-4); norms before instead of after are far off
    assert worst_document_error(np.asarray(off(*args)), hf_model, docs) > 1e-4


@pytest.mark.parametrize("name", ["olmo3_post_norm_pattern", "smollm3_nope"])
def test_expand_depth_keeps_each_copy_beside_its_source_in_the_layer_pattern(name, tmp_path):
    """Copies of blocks 0 and 3 (a sliding/NoPE block and a full/RoPE one): the expanded model computes the original
    function in transformers and in jaxcpt, so each copy took its source's attention kind and RoPE flag."""
    make_hf_model(name, tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--after", "0,3", "--out", str(tmp_path / "out")]) == 0
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    order = [0, 0, 1, 2, 3, 3]
    assert out["layer_types"] == [base["layer_types"][i] for i in order]
    if "no_rope_layers" in base:
        assert out["no_rope_layers"] == [base["no_rope_layers"][i] for i in order]
    ids = np.random.RandomState(0).randint(0, 300, size=(2, 20))  # longer than the windows (6)

    def torch_logits(directory):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor(ids)).logits.numpy()

    original = torch_logits(tmp_path / "base")
    assert rel_err(torch_logits(tmp_path / "out"), original) < 1e-6
    assert rel_err(np.asarray(load_hf(tmp_path / "out")(jnp.asarray(ids))), original) < 1e-5


REQUIRED = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)


def test_smollm3_sliding_layers_without_use_sliding_window_are_refused():
    hf = dict(REQUIRED, model_type="smollm3", layer_types=["sliding_attention"] + ["full_attention"] * 3)
    with pytest.raises(HFFormatError, match="use_sliding_window"):
        config_from_hf(hf)


def test_olmo3_legacy_rope_theta_reaches_the_full_layers_only_as_in_transformers():
    cfg = config_from_hf(dict(REQUIRED, model_type="olmo3", rope_theta=1000.0))
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1000.0, 500000.0)


def test_gemma4_with_vision_and_audio_towers_says_what_a_text_only_import_keeps():
    from transformers import Gemma4Config

    hf = Gemma4Config(text_config=dict(REQUIRED, num_hidden_layers=6), vision_config={}, audio_config={}).to_dict()
    with pytest.raises(HFFormatError, match=r"vision_config, audio_config towers.*model\.language_model.*drop the vision "
                       r"and audio towers.*Gemma4ForCausalLM checkpoint, model_type gemma4_text\), which jaxcpt imports"):
        config_from_hf(hf)
