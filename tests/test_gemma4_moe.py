"""Gemma 4's MoE block (``enable_moe_block``, the 26B-A4B text model) against transformers 5.25 on tiny random weights.

The model: 4 layers ([sliding, full] x 2) with the dense Gemma 4 options the 26B-A4B has (full layers with their own
head_dim, one KV head and k = v) plus per-layer inputs, and beside every layer's MLP 4 experts of width 16, top 2.
The router's scale, per-expert scale and the block's three norms are drawn away from their initial ones, the router
projection large enough that each token has a clear top 2 (transformers starts it near zero, where experts tie).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from test_gemma4 import _save_random, _variant, jax_leaves, packed, rel_err, worst_error
from test_moe import _batch
from transformers import AutoModelForCausalLM, Gemma4TextConfig

from hf_models import hf_logits as torch_logits
from hf_models import model_logits as logits

from jaxcpt.config import ConfigError
from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.hf.families import config_from_hf, config_to_hf
from jaxcpt.model import moe as moe_lib
from jaxcpt.sharding.mesh import build_mesh

VOCAB = 300
MOE = dict(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
           attention_k_eq_v=True, hidden_size_per_layer_input=8, sliding_window=6,
           layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=3.0,
           max_position_embeddings=512, rms_norm_eps=1e-5, enable_moe_block=True, num_experts=4, top_k_experts=2,
           moe_intermediate_size=16)
X, K, F, E, L = 4, 2, 16, 64, 4


def save_random_moe(config, directory, seed: int = 0):
    """A random Gemma 4 MoE model saved to ``directory``; returns the torch model (float32, eval).

    As tests/test_gemma4.py's models (norms and layer scalars randomised, q/k norm scales around 0.5, see there),
    and: the router's ``scale`` and ``per_expert_scale`` drawn around 1 (they start at exactly 1, where leaving
    them out would not show), the router projection at std 0.5 so that each token's top 2 is clear.
    """
    def router(name, p):
        if name.endswith(("router.scale", "router.per_expert_scale")):
            p.add_(0.3 * torch.randn_like(p))
        if name.endswith("router.proj.weight"):
            p.copy_(0.5 * torch.randn_like(p))

    return _save_random(config, directory, seed, also=router)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4_moe")
    return directory, save_random_moe(Gemma4TextConfig(**MOE), directory)


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_hf(hf_dir[0])


def test_import_reads_the_moe_block_and_counts_total_and_active_parameters(model):
    cfg = model.config
    assert cfg.moe == moe_lib.MoeConfig(num_experts=X, top_k=K, expert_intermediate_size=F, norm_topk_prob=True,
                                        beside_mlp=True, router_norm=True, per_expert_scale=True)
    layers = model.layers
    assert layers.gate[...].shape == (L, E, 48)  # the dense MLP stays
    assert layers.expert_gate[...].shape == layers.expert_up[...].shape == (L, X, E, F)
    assert layers.expert_down[...].shape == (L, X, F, E) and layers.router[...].shape == (L, E, X)
    assert layers.router_scale[...].shape == (L, E) and layers.per_expert_scale[...].shape == (L, X)
    assert layers.expert_gate.get_metadata()["axes"] == ("layers", "exp", "embed", "mlp")  # the rule table splits them
    total = sum(int(np.prod(x.shape)) for x in jax_leaves(model))
    assert cfg.num_params() == total
    assert cfg.num_active_params() == total - L * (X - K) * 3 * E * F  # the experts a token is not routed to
    assert "parameters total" in cfg.describe_params() and "active per token" in cfg.describe_params()


def test_packed_documents_match_transformers_with_the_experts_split_over_an_expert_axis(hf_dir, monkeypatch):
    """Three documents (longer than the window) packed in two rows, each routed and attended as if alone, with the
    experts split over an expert axis of 2 (the expert-parallel path of jaxcpt.model.expert_parallel), float32."""
    from jaxcpt.model import expert_parallel

    traced = []  # the expert-parallel shard_map, once per scanned segment
    shard_mapped = expert_parallel.experts_over_mesh
    monkeypatch.setattr(expert_parallel, "experts_over_mesh", lambda *a, **k: traced.append(1) or shard_mapped(*a, **k))
    mesh = build_mesh({"data": 2, "expert": 2, "tensor": 2})
    model = load_hf(hf_dir[0], mesh=mesh)
    assert "expert" in str(model.layers.expert_gate[...].sharding.spec)
    ids, seg, pos, docs = packed()
    with jax.set_mesh(mesh):
        err = worst_error(logits(model, ids, seg, pos), hf_dir[1], docs)
    print(f"gemma4_text MoE: float32 relative error {err:.2e}")
    assert err < 1e-5 and traced


def test_export_round_trip_is_bit_identical_and_reloads_in_transformers(hf_dir, model, tmp_path):
    save_hf(model, tmp_path / "out", dtype="float32")
    original, exported = load_file(hf_dir[0] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert exported["model.layers.0.experts.gate_up_proj"].shape == (X, 2 * F, E)  # fused, as transformers writes it
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["enable_moe_block"], written["num_experts"], written["top_k_experts"],
            written["moe_intermediate_size"]) == (True, X, K, F)
    assert config_from_hf(written) == model.config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.RandomState(1).randint(0, VOCAB, size=(2, 20))
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(hf_dir[1], ids))


def _router_logits(hf_model, ids) -> list[torch.Tensor]:
    """Each layer's router logits [B*T, X] (the output of ``router.proj``) in one forward pass of transformers."""
    captured = []
    hooks = [layer.router.proj.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
             for layer in hf_model.model.layers]
    with torch.no_grad():
        out = hf_model(torch.tensor(ids), labels=torch.tensor(ids))
    for hook in hooks:
        hook.remove()
    return captured, out.loss.item()


COEF = 0.02  # router_aux_loss_coef of the run the next tests train


@pytest.fixture(scope="module")
def loss_sums(model):
    """(ids, jitted ``_loss_sums(params, batch, router_bias=None)`` of the model trained with an aux loss of COEF):
    the training objective as the train step computes it, one compiled program per bias or none."""
    from jaxcpt.train.step import _loss_sums

    graphdef, params = _with_moe(model, router_aux_loss_coef=COEF)
    ids = np.random.RandomState(3).randint(0, VOCAB, size=(2, 24))
    jitted = jax.jit(functools.partial(_loss_sums, graphdef=graphdef, num_sources=1, chunk_size=0, z_loss_weight=0.0))
    return ids, lambda router_bias=None: jitted(params, _batch(ids), router_bias=router_bias)


def test_aux_loss_and_routing_statistics_equal_transformers_load_balancing_loss(hf_dir, loss_sums):
    """Gemma4ForCausalLM computes no aux loss, so the oracle is transformers' ``load_balancing_loss_func`` (the one
    the other MoE families train with) on Gemma 4's own router logits; a run that sets router_aux_loss_coef trains
    on CE + coef x that, and the routing statistics count every token's top 2 in every layer."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ids, run = loss_sums
    router_logits, ce = _router_logits(hf_dir[1], ids)
    expected = load_balancing_loss_func(tuple(router_logits), X, K).item()
    (objective_sum, tokens), aux = run()
    stats = aux["router"]
    assert stats.counts.shape == (L, X) and float(stats.counts.sum()) == L * ids.size * K
    assert abs(float(moe_lib.load_balancing_loss(stats)) - expected) < 1e-6 * expected
    assert abs(float(objective_sum / tokens) - (ce + COEF * expected)) < 1e-5 * ce


def test_the_selection_bias_of_loss_free_balancing_steers_the_grouped_layers(loss_sums):
    """model.moe.router_bias_update_rate's [L, X] bias reaches every layer of the segment-scanned model: zero changes
    nothing, a large bias on expert 0 makes every token of every layer choose it."""
    ids, run = loss_sums
    np.testing.assert_array_equal(run(np.zeros((L, X), np.float32))[1]["router"].counts, run()[1]["router"].counts)
    steered = np.asarray(run(np.tile(np.float32([5, 0, 0, 0]), (L, 1)))[1]["router"].counts)  # [L, X]
    np.testing.assert_array_equal(steered[:, 0], ids.size)


def _with_moe(model, **changes):
    from jaxcpt.model.transformer import abstract_model

    cfg = dataclasses.replace(model.config, moe=dataclasses.replace(model.config.moe, **changes))
    graphdef, _ = nnx.split(abstract_model(cfg, model.rules))
    return graphdef, nnx.state(model)


def test_an_moe_config_gemma4_cannot_hold_is_refused_on_export_naming_the_field(model):
    for change in (dict(per_expert_scale=False), dict(norm_topk_prob=False)):
        cfg = dataclasses.replace(model.config, moe=dataclasses.replace(model.config.moe, **change))
        with pytest.raises(HFFormatError, match=f"model.moe.{next(iter(change))}=False"):
            config_to_hf(cfg, "float32")
    with pytest.raises(ConfigError, match="router_norm.*beside_mlp"):
        moe_lib.MoeConfig(router_norm=True).validate()
    with pytest.raises(HFFormatError, match="top_k_experts"):
        config_from_hf(dict(Gemma4TextConfig(**MOE).to_dict(), top_k_experts=None))
    from jaxcpt.hf.families import tensor_table

    with pytest.raises(HFFormatError, match="family 'llama' has no experts beside the dense MLP"):
        tensor_table(dataclasses.replace(model.config, family="llama", global_head_dim=None, global_kv_heads=None,
                                         attention_k_eq_v=False, per_layer_input=None))



@pytest.mark.slow  # compiles a program per variant
def test_switching_each_piece_of_the_moe_block_off_disagrees_with_transformers(hf_dir, model):
    ids, seg, pos, docs = packed()
    variants = {
        # the dense Gemma 4 layer with the same dense weights: no experts, router or the block's norms
        "experts removed": _variant(model, moe=None),
        "per_expert_scale at ones": _variant(model, {"per_expert_scale": lambda s: np.ones_like(s["per_expert_scale"])}),
        "router scale at ones": _variant(model, {"router_scale": lambda s: np.ones_like(s["router_scale"])}),
        # the router reading the raw residual stream, not its norm times scale / sqrt(E)
        "router norm off": _variant(model, moe=dataclasses.replace(model.config.moe, router_norm=False)),
        # the experts in place of the dense MLP's output: the block's sum without its dense branch
        "dense branch zeroed": _variant(model, {"down": lambda s: np.zeros_like(s["down"])}),
    }
    for piece, variant in variants.items():
        assert worst_error(logits(variant, ids, seg, pos), hf_dir[1], docs) > 1e-3, piece


@pytest.mark.slow  # a compiled backward pass
def test_gradients_of_every_tensor_equal_torch_autograd(hf_dir, model, tmp_path):
    """One forward and backward pass of the training loss: the gradient of every HF tensor (router projection, scale
    and per-expert scale, the fused experts, the block's norms, the rest of the layer) equals torch's. Our gradients
    are written out by the HF export itself, so each is compared under its transformers name."""
    from jaxcpt.train.step import _loss_sums

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir[0]).float().train()
    ids = np.random.RandomState(5).randint(0, VOCAB, size=(2, 16))
    graphdef, params = nnx.split(model)
    batch = _batch(ids)

    def loss(p):
        (objective_sum, tokens), _ = _loss_sums(p, batch, graphdef=graphdef, num_sources=1, chunk_size=0,
                                                z_loss_weight=0.0)
        return objective_sum / tokens

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    save_hf(nnx.merge(graphdef, grads), tmp_path / "grads", dtype="float32")
    ours = load_file(tmp_path / "grads" / "model.safetensors")
    out = hf_model(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    assert abs(float(value) - out.loss.item()) < 1e-5 * out.loss.item()
    theirs = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    assert set(theirs) == set(ours) - {f"model.layers.{i}.layer_scalar" for i in range(L)}  # a buffer in torch
    worst = {name: rel_err(ours[name], grad) for name, grad in theirs.items()}
    print(sorted(worst.items(), key=lambda kv: -kv[1])[:5])
    assert max(worst.values()) < 1e-5, max(worst.items(), key=lambda kv: kv[1])


@pytest.mark.slow  # a training run
def test_a_cpt_run_from_the_moe_checkpoint_trains_and_records_routing(tmp_path, capsys):
    """``jaxcpt train`` from the HF directory on an expert-parallel mesh: it prints total and active parameters,
    records the expert load per layer and the aux loss, and its loss is finite."""
    from test_data_fixtures import sp_model
    from train_helpers import make_corpora

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    save_random_moe(Gemma4TextConfig(**dict(MOE, vocab_size=320, vocab_size_per_layer_input=320)), tmp_path / "hf")
    corpora = make_corpora(tmp_path / "data")
    sources = ", ".join(f"{{name: {name}, paths: [{path}], weight: 0.5}}" for name, path in corpora.items())
    run = tmp_path / "run"
    train(load_train_config(None, [
        f"run_dir={run}", "init.source=hf", f"init.path={tmp_path / 'hf'}", "model.dtype=float32",
        "model.moe.router_aux_loss_coef=0.01", f"data.tokenizer={sp_model()}", f"data.sources=[{sources}]",
        "data.seq_len=32", "data.shuffle_buffer=64", "train.steps=2", "train.batch_size=8", "train.log_every=2",
        "train.loss_chunk_size=16", "eval.every=0", "checkpoint.every_steps=0", "export.final=false",
        "optim.schedule.peak_lr=1e-3", "optim.schedule.warmup_steps=1", "mesh={expert: 2, data: 4}"]))
    assert "active per token" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = {r["step"]: r for r in records if r["kind"] == "train"}
    routing = train_records[2]["routing"]
    assert np.asarray(routing["load"]).shape == (L, X) and routing["aux_loss"] >= 1.0
    assert np.isfinite(train_records[2]["loss"])


@pytest.mark.slow  # compiles the decoder's prefill and step programs
def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(hf_dir, model):
    """The KV-cache decoder through the MoE block (its router statistics set aside): left-padded prompts, past the
    window, the same tokens as transformers' ``generate``."""
    from jaxcpt.model.decode import generate_greedy

    rng = np.random.RandomState(4)
    prompts = [rng.randint(3, VOCAB, size=n).tolist() for n in (4, 9)]
    ids, mask = np.zeros((2, 9), np.int32), np.zeros((2, 9), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    tokens, _ = generate_greedy(model, ids, mask, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        want = hf_dir[1].generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert np.asarray(tokens[row]).tolist() == want


# --- the adaptation commands ---------------------------------------------------------------------


@pytest.mark.slow  # compiles the adapted model, loads peft
def test_lora_on_attention_and_the_dense_mlp_loads_in_peft_and_merges_into_the_export(hf_dir, tmp_path):
    """Adapters on every projection of attention and of the dense MLP beside the experts (the experts themselves
    take none here); peft applies them to the transformers model, and the merged export computes our logits."""
    from test_lora import _adapted, _peft_logits

    from jaxcpt.hf.peft_export import save_peft_adapter
    from jaxcpt.model.lora import LoraConfig
    from jaxcpt.model.persist import base_model

    model = _adapted(hf_dir[0], LoraConfig(rank=2, alpha=4.0))
    assert {"gate_lora_a", "down_lora_b", "full_q_lora_a"} <= set(model.layers.names)
    assert not any(name.startswith(("expert_", "router")) and "_lora_" in name for name in model.layers.names)
    assert model.config.num_params() == sum(int(np.prod(x.shape)) for x in jax_leaves(model))
    ids = np.random.RandomState(0).randint(0, VOCAB, size=(2, 16))
    ours = logits(model, ids)
    assert rel_err(logits(base_model(model), ids), ours) > 1e-3  # the adapters change the function
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(hf_dir[0]), dtype="float32")
    assert rel_err(_peft_logits(hf_dir[0], tmp_path / "adapter", ids), ours) < 1e-5
    save_hf(model, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(torch_logits(merged, ids), ours) < 1e-5


def test_a_trained_router_is_refused_in_the_peft_export_naming_the_merged_one(hf_dir, tmp_path):
    """optim.trainable may train Gemma 4's router beside the adapters; peft's modules_to_save cannot hold it as
    jaxcpt writes routers (it was a KeyError at the end of the run): refused before anything is written."""
    from test_lora import _adapted

    from jaxcpt.errors import UserError
    from jaxcpt.hf.peft_export import save_peft_adapter
    from jaxcpt.model.lora import LoraConfig

    model = _adapted(hf_dir[0], LoraConfig(rank=2, alpha=4.0, targets=("q", "o")), trained_too=("layers.router",))
    with pytest.raises(UserError, match="router.*gemma4_text.*export.lora=merged"):
        save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(hf_dir[0]),
                          trained=("layers.router",), dtype="float32")
    assert not (tmp_path / "adapter").exists()


def test_linear_merge_covers_the_fused_experts_and_router_and_reloads(tmp_path):
    from jaxcpt.cli import main

    a = save_random_moe(Gemma4TextConfig(**MOE), tmp_path / "a", seed=0)
    save_random_moe(Gemma4TextConfig(**MOE), tmp_path / "b", seed=1)
    assert main(["merge", "--base", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--t", "0.3", "--out",
                 str(tmp_path / "m")]) == 0
    merged, x, y = (load_file(tmp_path / d / "model.safetensors") for d in ("m", "a", "b"))
    assert merged.keys() == x.keys() and {"model.layers.0.experts.gate_up_proj",
                                           "model.layers.0.router.per_expert_scale"} <= merged.keys()
    for name in x:
        np.testing.assert_array_equal(merged[name], np.float32(0.7) * x[name] + np.float32(0.3) * y[name], name)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is type(a)


def test_expand_depth_of_the_moe_model_is_refused_saying_why(tmp_path, capsys):
    from jaxcpt.cli import main

    save_random_moe(Gemma4TextConfig(**MOE), tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--every", "2", "--out", str(tmp_path / "deeper")]) == 2
    assert "does not support gemma4_text models whose layers differ in shape" in capsys.readouterr().err


def test_flops_count_the_dense_mlp_beside_the_active_experts(model):
    from jaxcpt.train.metrics import flops_per_token

    cfg = model.config
    dense = dataclasses.replace(cfg, moe=None)
    # the MoE model's matmuls per token: the dense model's plus the router and the top 2 experts, per layer
    active_experts = L * (E * X + K * 3 * E * F + E + X)  # router projection, experts, router scale, per-expert scale
    assert flops_per_token(cfg, 32) == flops_per_token(dense, 32) + 6 * active_experts
