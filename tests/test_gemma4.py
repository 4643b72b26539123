"""Gemma 4 text (``gemma4_text``) against transformers 5.25's ``models/gemma4`` on tiny random weights.

The main model has every option the dense text checkpoints use: per-layer input embeddings, full-attention
layers with their own head_dim and KV heads and k = v, the proportional RoPE, the unscaled v norm, the layer
scalars, KV sharing over the last 4 of 10 layers with double-wide MLPs there, final logit soft-capping. Its
10 layers ([sliding, full] x 5, the last 4 sharing) scan as two segments: 3 repeats that compute keys and
values, 2 that reuse them (``jaxcpt.model.layer_groups``).
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, Gemma4TextConfig

from hf_models import hf_logits as torch_logits
from hf_models import model_logits as logits

from jaxcpt.cli import main
from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.hf.families import config_from_hf
from jaxcpt.model import layer_groups
from jaxcpt.model.decode import generate_greedy
from jaxcpt.model.transformer import abstract_model

VOCAB = 300  # stored padded to 384 rows
TINY = dict(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, intermediate_size=48,
            num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=4, use_double_wide_mlp=True,
            hidden_size_per_layer_input=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 5,
            final_logit_softcapping=3.0, max_position_embeddings=512, rms_norm_eps=1e-5)
SMALL = dict(TINY, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2)


def _save_random(config, directory, seed: int = 0, also=None):
    """A random model: norms and layer scalars randomised (they start at 1), saved; returns the torch model.
    ``also(name, parameter)`` randomises more, in the same pass (tests/test_gemma4_moe.py's router).

    Gemma 4 scales attention scores by 1, not 1/sqrt(D): with unit-RMS q and k (q/k norms at 1) the scores
    reach +-D and the softmax amplifies float32 rounding, so that transformers' own float32 logits are 6e-5 away
    from its float64 ones (measured on this model). The q/k norm scales drawn around 0.5 keep the reference
    itself within 4e-6, below the 1e-5 bound the parity tests hold.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(0.5)
            if also is not None:
                also(name, p)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    model = model.float().eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4")
    return directory, _save_random(Gemma4TextConfig(**TINY), directory)


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_hf(hf_dir[0])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def packed():
    """Two rows of 32: documents of 12 + 20 and 25 + 7 padding (longer than the window of 6)."""
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, VOCAB, n) for n in (12, 20, 25)]
    ids = np.zeros((2, 32), np.int32)
    seg, pos = np.zeros_like(ids), np.zeros_like(ids)
    for row, start, s, doc in ((0, 0, 1, docs[0]), (0, 12, 2, docs[1]), (1, 0, 1, docs[2])):
        ids[row, start:start + len(doc)], seg[row, start:start + len(doc)] = doc, s
        pos[row, start:start + len(doc)] = np.arange(len(doc))
    return ids, seg, pos, [(0, 0, docs[0]), (0, 12, docs[1]), (1, 0, docs[2])]


def worst_error(model_logits, hf_model, docs) -> float:
    return max(rel_err(model_logits[r, s:s + len(d)], torch_logits(hf_model, d[None])[0]) for r, s, d in docs)


def test_import_reads_every_option_and_scans_two_segments(model):
    cfg = model.config
    assert (cfg.global_head_dim, cfg.global_kv_heads, cfg.attention_k_eq_v, cfg.kv_shared_layers,
            cfg.double_wide_mlp, cfg.per_layer_input, cfg.rope_proportion) == (32, 1, True, 4, True, 8, 0.25)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 1.0)
    sets = {name: layer_groups.layers_of(cfg, name) for name in model.layers.names}
    assert sets["k"] == (0, 2, 4) and sets["full_k"] == (1, 3, 5) and "full_v" not in sets
    assert sets["wide_gate"] == (6, 7, 8, 9) and sets["full_q"] == (1, 3, 5, 7, 9)
    assert [(s.start, s.repeats, len(s.kinds)) for s in layer_groups.segments(cfg, sets)] == [(0, 3, 2), (6, 2, 2)]
    assert model.layers.full_q[...].shape == (5, 64, 4, 32) and model.layers.wide_up[...].shape == (4, 64, 96)
    n = sum(int(np.prod(x.shape)) for x in jax_leaves(model))
    assert cfg.num_params() == n


def jax_leaves(model):
    import jax

    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_packed_documents_match_transformers_on_each_alone_in_float32(hf_dir, model):
    ids, seg, pos, docs = packed()
    err = worst_error(logits(model, ids, seg, pos), hf_dir[1], docs)
    print(f"gemma4_text: float32 relative error {err:.2e}")
    assert err < 1e-5


def _variant(model, fills=None, **overrides):
    """``model`` under a config with ``overrides``; each weight carried over where its shape allows, else built by
    ``fills[name](source layer weights)``, else random (as a fresh model would start)."""
    cfg = dataclasses.replace(model.config, **overrides)
    graphdef, state = nnx.split(abstract_model(cfg, model.rules))
    source = nnx.state(model).to_pure_dict()
    rng = np.random.RandomState(1)

    def fill(path, variable):
        value = source
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if fills and path[-1] in fills:
            value = fills[path[-1]](source["layers"])
        shape = variable.get_value().shape
        if value is None or value.shape != shape:
            value = rng.normal(0, 0.02, shape).astype(np.float32)
        return variable.replace(jnp.asarray(value))

    return nnx.merge(graphdef, nnx.map_state(fill, state))


@pytest.mark.slow  # compiles several programs (variants, decoding, the command's model)
def test_switching_each_new_option_off_disagrees_with_transformers(hf_dir, model):
    ids, seg, pos, docs = packed()
    half = model.config.intermediate_size
    variants = {
        "value_norm": _variant(model, value_norm=False),
        "rope_proportion": _variant(model, rope_proportion=1.0),
        "layer_scalar": _variant(model, layer_scalar=False),
        "per_layer_input": _variant(model, per_layer_input=None),
        "attention scale 1": _variant(model, query_pre_attn_scalar=None),
        # full layers with a v projection of their own (random) instead of their keys as values
        "attention_k_eq_v": _variant(model, attention_k_eq_v=False),
        # the KV-shared layers' MLP at the normal width: their first half of the hidden units
        "double_wide_mlp": _variant(model, {"gate": lambda s: np.concatenate([s["gate"], s["wide_gate"][..., :half]]),
                                            "up": lambda s: np.concatenate([s["up"], s["wide_up"][..., :half]]),
                                            "down": lambda s: np.concatenate([s["down"], s["wide_down"][:, :half]])},
                                    double_wide_mlp=False),
    }
    for option, variant in variants.items():
        assert worst_error(logits(variant, ids, seg, pos), hf_dir[1], docs) > 1e-3, option


@pytest.mark.slow  # compiles several programs (variants, decoding, the command's model)
def test_kv_sharing_off_recomputing_the_shared_keys_with_the_same_weights_disagrees(tmp_path):
    """The shared layers attend to the keys and values their producer computed from its own input; giving them copies
    of the producer's k/v weights (so they compute from theirs) is a different model."""
    hf_model = _save_random(Gemma4TextConfig(**dict(TINY, use_double_wide_mlp=False)), tmp_path)
    model = load_hf(tmp_path)
    ids, seg, pos, docs = packed()
    assert worst_error(logits(model, ids, seg, pos), hf_model, docs) < 1e-5
    copies = {name: (lambda n: lambda s: np.concatenate([s[n], np.repeat(s[n][-1:], 2, axis=0)]))(name)
              for name in ("k", "v", "k_norm", "full_k", "full_k_norm")}  # layers 6, 8 <- 4; 7, 9 <- 5
    unshared = _variant(model, copies, kv_shared_layers=0)
    assert worst_error(logits(unshared, ids, seg, pos), hf_model, docs) > 1e-3


def test_full_layers_shape_is_needed_to_load(hf_dir):
    with pytest.raises(HFFormatError, match="self_attn.q_proj.weight.*shape"):
        load_hf(hf_dir[0], global_head_dim=None)


def test_export_round_trip_is_bit_identical_and_reloads_in_transformers(hf_dir, model, tmp_path):
    save_hf(model, tmp_path / "out", dtype="float32")
    original, exported = load_file(hf_dir[0] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_from_hf(written) == model.config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Gemma4ForCausalLM"
    ids = np.random.RandomState(1).randint(0, VOCAB, size=(2, 20))
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(hf_dir[1], ids))


@pytest.mark.slow  # compiles several programs (variants, decoding, the command's model)
def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(hf_dir, model):
    rng = np.random.RandomState(4)
    prompts = [rng.randint(3, VOCAB, size=n).tolist() for n in (4, 9)]  # different lengths: left padding
    ids, mask = np.zeros((2, 9), np.int32), np.zeros((2, 9), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    tokens, _ = generate_greedy(model, ids, mask, max_new_tokens=10)  # past the window of 6
    for row, prompt in enumerate(prompts):
        want = hf_dir[1].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert np.asarray(tokens[row]).tolist() == want


def test_moe_block_reads_as_experts_beside_the_mlp_with_gemmas_router():
    """The MoE block (tests/test_gemma4_moe.py has its parity) is read, no longer refused."""
    hf = Gemma4TextConfig(**TINY, enable_moe_block=True, num_experts=4, top_k_experts=2,
                          moe_intermediate_size=16).to_dict()
    moe = config_from_hf(hf).moe
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size) == (4, 2, 16)
    assert moe.beside_mlp and moe.router_norm and moe.per_expert_scale and moe.norm_topk_prob
    assert config_from_hf(Gemma4TextConfig(**TINY).to_dict()).moe is None


def test_bidirectional_gemma4_is_refused():
    with pytest.raises(HFFormatError, match="use_bidirectional_attention"):
        config_from_hf(dict(TINY, model_type="gemma4_text", use_bidirectional_attention="all"))


@pytest.mark.slow  # compiles several programs (variants, decoding, the command's model)
def test_lora_adapters_on_every_shape_load_in_peft_and_merge_into_the_export(tmp_path):
    """Adapters sit beside each stack of a target (``q`` and ``full_q``, ``gate`` and ``wide_gate``); peft applies
    them to every q_proj / gate_proj however wide, and the merged export folds them into each layer's tensor."""
    from test_lora import _adapted, _peft_logits

    from jaxcpt.hf.peft_export import save_peft_adapter
    from jaxcpt.model.lora import LoraConfig
    from jaxcpt.model.persist import base_model

    _save_random(Gemma4TextConfig(**SMALL), tmp_path / "base")
    model = _adapted(tmp_path / "base", LoraConfig(rank=2, alpha=4.0))
    assert {"full_q_lora_a", "wide_gate_lora_b", "full_k_lora_a"} <= set(model.layers.names)
    assert "full_v_lora_a" not in model.layers.names  # k = v: the full layers have no v projection to adapt
    assert model.config.num_params() == sum(int(np.prod(x.shape)) for x in jax_leaves(model))
    ids = np.random.RandomState(0).randint(0, VOCAB, size=(2, 16))
    ours = logits(model, ids)
    assert rel_err(logits(base_model(model), ids), ours) > 1e-3  # the adapters change the function
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"), dtype="float32")
    assert rel_err(_peft_logits(tmp_path / "base", tmp_path / "adapter", ids), ours) < 1e-5
    save_hf(model, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(torch_logits(merged, ids), ours) < 1e-5


# --- the adaptation commands ---------------------------------------------------------------------


@pytest.mark.slow  # compiles several programs (variants, decoding, the command's model)
def test_extend_vocab_grows_the_per_layer_table_with_the_embedding_and_keeps_old_logits(tmp_path):
    from adapt_fixtures import BYTE_LEVEL_MODEL_VOCAB, _copy_tokenizer
    from tokenizer_fixtures import qwen_style_tokenizer_dir

    base, out = tmp_path / "base", tmp_path / "out"
    _copy_tokenizer(qwen_style_tokenizer_dir(), base)
    vocab = BYTE_LEVEL_MODEL_VOCAB
    old = _save_random(Gemma4TextConfig(**dict(SMALL, vocab_size=vocab, vocab_size_per_layer_input=vocab,
                                                eos_token_id=400, bos_token_id=None)), base)
    (tmp_path / "tokens.txt").write_text(" dataframe\n tokenizer\n")
    assert main(["extend-vocab", str(base), "--tokens", str(tmp_path / "tokens.txt"), "--out", str(out),
                 "--init", "mean"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == config["vocab_size_per_layer_input"] > vocab
    table = load_file(out / "model.safetensors")["model.embed_tokens_per_layer.weight"]
    before = load_file(base / "model.safetensors")["model.embed_tokens_per_layer.weight"]
    np.testing.assert_array_equal(table[:vocab], before)
    assert np.allclose(table[vocab:], before[:403].mean(0), atol=1e-6)  # mean of the tokenizer's 403 ids
    new = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(2).randint(0, 400, size=(1, 12))
    assert rel_err(torch_logits(new, ids)[..., :vocab], torch_logits(old, ids)) < 1e-6


def test_expand_depth_is_refused_saying_why(tmp_path, capsys):
    _save_random(Gemma4TextConfig(**SMALL), tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--every", "2", "--out", str(tmp_path / "deeper")]) == 2
    assert "does not support gemma4_text models whose layers differ in shape" in capsys.readouterr().err


def test_linear_merge_covers_every_gemma4_tensor_and_reloads(tmp_path):
    a = _save_random(Gemma4TextConfig(**SMALL), tmp_path / "a", seed=0)
    _save_random(Gemma4TextConfig(**SMALL), tmp_path / "b", seed=1)
    assert main(["merge", "--base", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--t", "0.3", "--out",
                 str(tmp_path / "m")]) == 0
    merged, x, y = (load_file(tmp_path / d / "model.safetensors") for d in ("m", "a", "b"))
    assert merged.keys() == x.keys() and "model.layers.0.layer_scalar" in merged
    for name in x:
        np.testing.assert_array_equal(merged[name], np.float32(0.7) * x[name] + np.float32(0.3) * y[name], name)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is type(a)
