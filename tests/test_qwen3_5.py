"""Qwen3.5 text (Gated DeltaNet + gated attention hybrid) against transformers' reference PyTorch code.

transformers' Qwen3.5 takes flash-linear-attention's and causal-conv1d's kernels when they are
installed and support the device; on CPU (and without the packages, as in CI) it falls back to its
own PyTorch implementation (``torch_chunk_gated_delta_rule``, ``torch_causal_conv1d_fn``), which is
the reference here. The fixture below asserts the fallback is what runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as ref

from hf_models import hf_logits as torch_logits
from hf_models import model_logits as logits

from jaxcpt.config import ConfigError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.model.config import LinearAttentionConfig, ModelConfig
from jaxcpt.model.decode import generate_greedy
from jaxcpt.model.gated_deltanet import document_index, gated_delta_rule, gated_deltanet
from jaxcpt.model.transformer import Transformer

VOCAB, SEQ = 300, 40  # 300 is stored padded to 384 rows; 40 tokens span several chunks of 16
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 8-layer Qwen3.5 (two repeats of 3 linear + 1 full), norms and biases randomised, saved."""
    assert importlib.util.find_spec("fla") is None and importlib.util.find_spec("causal_conv1d") is None, \
        "flash-linear-attention / causal-conv1d are installed: the reference would not be transformers' torch code"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3_5TextConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("qwen3_5")
    model.eval().save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_hf(hf_dir[0])


@pytest.fixture(scope="module")
def input_ids():
    return np.random.RandomState(0).randint(0, VOCAB, size=(2, SEQ))


# --- the layer --------------------------------------------------------------------------


def _rule_inputs(seed=0, b=2, t=37, hk=2, hv=4, d=8):
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(b, t, hk, d)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(b, t, hv, d)).astype(np.float32)
    g = (-0.5 * np.abs(rng.normal(size=(b, t, hv)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.normal(size=(b, t, hv))))).astype(np.float32)
    return q, k, v, g, beta


def test_gated_delta_rule_matches_transformers_chunked_reference():
    q, k, v, g, beta = _rule_inputs()
    want, want_state = ref.torch_chunk_gated_delta_rule(
        *(torch.tensor(x) for x in (q, k, v)), g=torch.tensor(g), beta=torch.tensor(beta), chunk_size=16,
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    got, state = gated_delta_rule(q, k, v, g, beta, jnp.zeros(q.shape[:2], jnp.int32), chunk_size=16)
    assert rel_err(got, want.numpy()) < 1e-5
    assert rel_err(state, want_state.numpy()) < 1e-5


def test_chunk_size_does_not_change_the_result():
    q, k, v, g, beta = _rule_inputs(seed=1)
    doc = document_index(jnp.asarray(np.repeat([[1] * 20 + [2] * 17], 2, axis=0)))
    outs = [gated_delta_rule(q, k, v, g, beta, doc, chunk_size=c)[0] for c in (1, 5, 16, 64)]
    for other in outs[1:]:
        assert rel_err(other, outs[0]) < 1e-5
    # and chunk 1 is the token-by-token recurrence transformers decodes with
    want, _ = ref.torch_recurrent_gated_delta_rule(*(torch.tensor(x[:, :20]) for x in (q, k, v)),
                                                   g=torch.tensor(g[:, :20]), beta=torch.tensor(beta[:, :20]),
                                                   use_qk_l2norm_in_kernel=True)
    assert rel_err(outs[0][:, :20], want.numpy()) < 1e-5


def _torch_layer(hf_model, layer: int):
    return hf_model.model.layers[layer].linear_attn


def _jax_layer_params(torch_layer, grads: bool = False) -> dict:
    """The torch layer's weights (or their gradients) in jaxcpt's layout, as the family's tensor table maps them."""
    w = {n: (p.grad if grads else p).detach().numpy().copy() for n, p in torch_layer.named_parameters()}
    hv, dv = torch_layer.num_v_heads, torch_layer.head_v_dim
    e = w["in_proj_z.weight"].shape[1]
    return {"lin_qkv": w["in_proj_qkv.weight"].T, "lin_conv": w["conv1d.weight"][:, 0, :].T,
            "lin_z": w["in_proj_z.weight"].T.reshape(e, hv, dv), "lin_b": w["in_proj_b.weight"].T,
            "lin_a": w["in_proj_a.weight"].T, "lin_dt_bias": w["dt_bias"], "lin_a_log": w["A_log"],
            "lin_norm": w["norm.weight"], "lin_out": w["out_proj.weight"].T.reshape(hv, dv, e)}


def test_layer_gradients_match_torch_autograd_over_sgd_steps(hf_dir):
    """Three SGD steps on one Gated DeltaNet layer, in torch (autograd through the reference) and in jax."""
    torch_layer = type(_torch_layer(hf_dir[1], 0))(hf_dir[1].config, 0)  # a copy: the fixture's model stays put
    torch_layer.load_state_dict(_torch_layer(hf_dir[1], 0).state_dict())
    with torch.no_grad():  # decay rates A in [0.05, 0.5): with A up to 16, exp(g) ~ 0 and every gradient through g is noise
        torch_layer.A_log.copy_(torch.log(torch.linspace(0.05, 0.5, torch_layer.num_v_heads)))
    params = {k: jnp.asarray(v) for k, v in _jax_layer_params(torch_layer).items()}
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 21, 64)).astype(np.float32)
    target = rng.normal(size=(2, 21, 64)).astype(np.float32)
    doc = jnp.zeros((2, 21), jnp.int32)

    def loss(p):
        out, _ = gated_deltanet(p, jnp.asarray(x), doc, num_key_heads=2, key_head_dim=16, value_head_dim=8,
                                eps=1e-5, chunk_size=8)
        return jnp.mean((out - target) ** 2)

    grad = jax.jit(jax.grad(loss))
    opt = torch.optim.SGD(torch_layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        torch.mean((torch_layer(torch.tensor(x)) - torch.tensor(target)) ** 2).backward()
        grads = grad(params)
        torch_grads = _jax_layer_params(torch_layer, grads=True)
        for name in params:
            assert rel_err(grads[name], torch_grads[name]) < 1e-4, name
        opt.step()
        params = {k: v - 0.5 * grads[k] for k, v in params.items()}
    after = _jax_layer_params(torch_layer)
    for name in params:
        assert rel_err(params[name], after[name]) < 1e-5, name


# --- the model --------------------------------------------------------------------------


def test_float32_logits_match_transformers(hf_dir, model, input_ids):
    got = logits(model, input_ids)
    assert got.shape == (2, SEQ, VOCAB) and got.dtype == np.float32
    assert rel_err(got, torch_logits(hf_dir[1], input_ids)) < 1e-5


def test_packed_row_matches_each_document_alone(model):
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, VOCAB, 13), rng.randint(0, VOCAB, 22)  # a boundary inside a chunk of 64
    packed = np.concatenate([doc_a, doc_b])[None]
    segment_ids = np.array([[1] * 13 + [2] * 22])
    positions = np.array([list(range(13)) + list(range(22))])
    packed_logits = logits(model, packed, segment_ids, positions)
    alone_a, alone_b = (logits(model, d[None]) for d in (doc_a, doc_b))
    assert rel_err(packed_logits[0, :13], alone_a[0]) < 1e-5
    assert rel_err(packed_logits[0, 13:], alone_b[0]) < 1e-5


@pytest.mark.slow  # several compiles of the 8-layer hybrid
def test_document_boundary_resets_both_state_and_convolution(model):
    """Each reset on its own matters: without it, document b's first tokens see document a."""
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.normal(size=(1, 12, 64)).astype(np.float32))
    p = {k: v[0] for k, v in model.layers.arrays().items() if k.startswith("lin_")}
    lin = model.config.linear_attention
    kw = dict(num_key_heads=lin.num_key_heads, key_head_dim=lin.key_head_dim, value_head_dim=lin.value_head_dim,
              eps=1e-5, chunk_size=8)
    doc = document_index(jnp.asarray([[1] * 5 + [2] * 7]))
    packed, _ = gated_deltanet(p, x, doc, **kw)
    alone, _ = gated_deltanet(p, x[:, 5:], jnp.zeros((1, 7), jnp.int32), **kw)
    assert rel_err(packed[:, 5:], alone) < 1e-5
    one_doc = jnp.zeros((1, 12), jnp.int32)
    # a width-1 conv (its earlier taps zero) cannot leak: only the recurrent state could (slow decay: A = 0.1)
    state_only = p | {"lin_conv": p["lin_conv"].at[:-1].set(0), "lin_a_log": jnp.full_like(p["lin_a_log"], -2.3)}
    alone_1, _ = gated_deltanet(state_only, x[:, 5:], one_doc[:, 5:], **kw)
    assert rel_err(gated_deltanet(state_only, x, doc, **kw)[0][:, 5:], alone_1) < 1e-5
    assert rel_err(gated_deltanet(state_only, x, one_doc, **kw)[0][:, 5:], alone_1) > 1e-3
    # a decay of exp(-e^10) per token wipes the state between tokens: only the conv could leak
    conv_only = p | {"lin_a_log": jnp.full_like(p["lin_a_log"], 10.0)}
    alone_2, _ = gated_deltanet(conv_only, x[:, 5:], one_doc[:, 5:], **kw)
    assert rel_err(gated_deltanet(conv_only, x, doc, **kw)[0][:, 5:], alone_2) < 1e-5
    assert rel_err(gated_deltanet(conv_only, x, one_doc, **kw)[0][:, 5:], alone_2) > 1e-3


@pytest.mark.slow  # several compiles of the 8-layer hybrid
def test_chunk_size_leaves_model_logits_unchanged(hf_dir, model, input_ids):
    cfg = model.config
    small = dataclasses.replace(cfg, linear_attention=dataclasses.replace(cfg.linear_attention, chunk_size=7))
    other = load_hf(hf_dir[0], linear_attention=small.linear_attention)
    assert rel_err(logits(other, input_ids), logits(model, input_ids)) < 1e-5


def _without_output_gate(model: Transformer) -> Transformer:
    """The same weights with attn_output_gate off: q keeps the query halves of its heads."""
    cfg = dataclasses.replace(model.config, attn_output_gate=False)
    off = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(off)
    values = nnx.state(model)
    q = values["layers"]["q"][...]  # [La, E, 2H, D]
    for path, var in nnx.to_flat_state(state):
        src = values
        for key in path:
            src = src[key]
        value = src[...]
        if path == ("layers", "q"):
            value = q.reshape(q.shape[0], q.shape[1], -1, 2, q.shape[-1])[..., 0, :]
        var.set_value(value)
    return nnx.merge(graphdef, state)


@pytest.mark.slow  # several compiles of the 8-layer hybrid
def test_switching_each_option_off_disagrees_with_transformers(hf_dir, model, input_ids):
    want = torch_logits(hf_dir[1], input_ids)
    assert rel_err(logits(model, input_ids), want) < 1e-5
    full_rope = load_hf(hf_dir[0], partial_rotary_factor=1.0)
    assert rel_err(logits(full_rope, input_ids), want) > 1e-3
    assert rel_err(logits(_without_output_gate(model), input_ids), want) > 1e-3


@pytest.mark.slow  # several compiles of the 8-layer hybrid
def test_export_round_trip_is_bit_identical_and_loads_in_transformers(hf_dir, model, input_ids, tmp_path):
    save_hf(model, tmp_path / "out", dtype="float32")
    original, exported = load_file(hf_dir[0] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Qwen3_5ForCausalLM"
    np.testing.assert_array_equal(torch_logits(reloaded, input_ids), torch_logits(hf_dir[1], input_ids))


@pytest.mark.slow  # several compiles of the 8-layer hybrid
def test_greedy_generation_matches_transformers_generate(hf_dir, model):
    prompts = np.random.RandomState(4).randint(0, VOCAB, size=(2, 7))
    mask = np.ones((2, 7), np.int32)
    mask[1, :3] = 0  # row 1 is left-padded: the padding must not reach the recurrent or conv state
    tokens, lengths = generate_greedy(model, prompts, mask, max_new_tokens=10)
    for row in range(2):
        prompt = torch.tensor(prompts[row][mask[row] == 1])[None]
        want = hf_dir[1].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
        np.testing.assert_array_equal(np.asarray(tokens[row]), want.numpy())


def test_layer_pattern_that_cannot_be_scanned_is_refused():
    kinds = ["linear_attention"] * 9 + ["full_attention"]  # period 10 > 8 layers unrolled per scan step
    cfg = ModelConfig(family="qwen3_5_text", num_layers=10, layer_types=tuple(kinds),
                      linear_attention=LinearAttentionConfig())
    with pytest.raises(ConfigError, match="repeated pattern"):
        cfg.validate()


# --- adaptation -------------------------------------------------------------------------


@pytest.mark.slow  # several compiles of the 8-layer hybrid
def test_expand_depth_copies_whole_pattern_repeats_and_keeps_the_function(hf_dir, input_ids, tmp_path):
    from jaxcpt.cli import main

    assert main(["expand-depth", str(hf_dir[0]), "--every", "4", "--out", str(tmp_path / "out")]) == 0
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert grown.config.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 4
    assert rel_err(torch_logits(grown, input_ids), torch_logits(hf_dir[1], input_ids)) < 1e-5
    assert main(["expand-depth", str(hf_dir[0]), "--after", "1", "--out", str(tmp_path / "bad")]) == 2


# --- sharding and compiling ---------------------------------------------------------------------------------------

# One repeat of the pattern; weights 10x the default init, so every layer moves the loss (at 0.02 the logits are
# nearly uniform and a wrongly sharded mixer would hide under 1e-5). Heads divide a tensor axis of 4 (4 query and 4
# linear value heads; the 2 KV heads stay whole on that axis, as the rules say).
HYBRID = ModelConfig(family="qwen3_5_text", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=16, norm_plus_one=True, qk_norm=True, attn_output_gate=True,
                     partial_rotary_factor=0.25, layer_types=("linear_attention",) * 3 + ("full_attention",),
                     linear_attention=LinearAttentionConfig(num_key_heads=2, num_value_heads=4, key_head_dim=16,
                                                            value_head_dim=8, chunk_size=8),
                     initializer_range=0.2)
MESHES = [{"data": 8}, {"fsdp": 4, "data": 2}, {"fsdp": 2, "tensor": 4}]


def _packed_batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, size=(8, 33))
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "segment_ids": jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 8, axis=0)),
            "positions": jnp.asarray(np.repeat([list(range(20)) + list(range(12))], 8, axis=0)),
            "loss_mask": jnp.asarray((rng.rand(8, 32) > 0.1).astype(np.float32))}


def _loss_and_grads(mesh_axes, grads: bool):
    """(loss, gradients or None, model) of HYBRID on the packed batch under a mesh of ``mesh_axes``."""
    from jaxcpt.model.persist import params_of
    from jaxcpt.model.transformer import init_model
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.loss import model_loss

    mesh = build_mesh(mesh_axes)
    model = init_model(HYBRID, mesh, seed=3)  # the same values whatever the layout
    graphdef, state = nnx.split(model)

    def loss(state):
        return model_loss(nnx.merge(graphdef, state), _packed_batch(), chunk_size=8)[0]

    with jax.set_mesh(mesh):  # traced under the mesh, as the train step is
        if not grads:
            return float(jax.jit(loss)(state)), None, model
        value, grad = jax.jit(jax.value_and_grad(loss))(state)
    return float(value), jax.tree.map(np.asarray, params_of(nnx.merge(graphdef, grad))), model


def test_hybrid_loss_is_the_same_under_every_mesh_and_its_weights_sit_where_the_rules_say():
    from jax.sharding import PartitionSpec as P

    results = [_loss_and_grads(axes, grads=False) for axes in MESHES]
    for axes, (loss, _, _) in zip(MESHES[1:], results[1:]):
        assert abs(loss - results[0][0]) / abs(results[0][0]) < 1e-5, (axes, loss, results[0][0])
    # the Gated DeltaNet weights sit where the one rule table says: value heads over tensor, embed over fsdp
    model = results[2][2]
    specs = {".".join(path): v[...].sharding.spec for path, v in nnx.to_flat_state(nnx.state(model))}
    assert {name: specs[f"layers.{name}"] for name in ("lin_qkv", "lin_conv", "lin_z", "lin_b", "lin_a", "lin_dt_bias",
                                                        "lin_a_log", "lin_norm", "lin_out", "q", "k")} == {
        "lin_qkv": P(None, "fsdp"), "lin_conv": P(), "lin_z": P(None, "fsdp", "tensor"),
        "lin_b": P(None, "fsdp", "tensor"), "lin_a": P(None, "fsdp", "tensor"), "lin_dt_bias": P(None, "tensor"),
        "lin_a_log": P(None, "tensor"), "lin_norm": P(), "lin_out": P(None, "tensor", None, "fsdp"),
        "q": P(None, "fsdp", "tensor"), "k": P(None, "fsdp")}


@pytest.mark.slow  # compiled backward passes of the hybrid on 8 CPU devices (~30 s of CPU each)
def test_hybrid_gradients_are_the_same_with_heads_split_over_tensor():
    meshes = [MESHES[0], MESHES[2]]  # data-parallel against fsdp x tensor (heads and linear heads split)
    (loss, grads, _), *others = [_loss_and_grads(axes, grads=True) for axes in meshes]
    for axes, (other_loss, other_grads, _) in zip(meshes[1:], others):
        assert abs(other_loss - loss) / abs(loss) < 1e-5, (axes, other_loss, loss)
        errors = jax.tree.map(rel_err, other_grads, grads)
        print(axes, "loss", abs(other_loss - loss) / abs(loss), "worst gradient", max(jax.tree.leaves(errors)))
        assert max(jax.tree.leaves(errors)) < 1e-4, (axes, errors)


@pytest.mark.slow  # a TPU compile (libtpu on this CPU host) of a tiny hybrid train step
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed: pip install "
                    "'jaxcpt[tpu-compile]' (in the test extra)")
def test_tiny_hybrid_compiles_for_tpu_with_splash_and_the_chunk_scan_of_the_delta_rule():
    """The attention layer lowers to the Pallas splash kernel, and the Gated DeltaNet layers to XLA loops (the scan
    over chunks) from gated_deltanet.py: what the Qwen3.5-9B compile in docs/qwen3_5.md runs at full size."""
    from jaxcpt.aot.topology import parse_topology
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.sharding.rules import make_rules
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.setup import build_program

    cfg = load_train_config(None, [
        "model.family=qwen3_5_text", "model.vocab_size=256", "model.hidden_size=128", "model.intermediate_size=256",
        "model.num_layers=8", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=128", "model.qk_norm=true",
        "model.norm_plus_one=true", "model.attn_output_gate=true", "model.partial_rotary_factor=0.25",
        "model.layer_types=[linear_attention, linear_attention, linear_attention, full_attention, linear_attention, "
        "linear_attention, linear_attention, full_attention]",
        "model.linear_attention={num_key_heads: 2, num_value_heads: 4, key_head_dim: 64, value_head_dim: 64}",
        "model.dtype=bfloat16", "model.remat=full", "mesh={fsdp: 2, data: 2}", "data.seq_len=256",
        "train.batch_size=8", "data.sources=[{name: a, paths: [x]}]"])
    topology = parse_topology("v5p-8")
    mesh = build_mesh(cfg.mesh, devices=topology.devices())
    program = build_program(cfg, cfg.model, mesh, make_rules(), num_sources=1)
    with topology.lowering_checks():
        compiled = program.lower_train_step().compile()
    text = compiled.as_text()
    assert text.count(topology.kernel_call) >= 3  # splash forward, dq, dkv: the real Mosaic kernel
    # the scan over chunks: a loop inside the scan over layer groups carrying the recurrent state, [B, Hv, Dk, Dv]
    # float32 per chip (8 rows over data x fsdp = 2 rows, 4 value heads of 64 x 64); the state never leaves it
    state = "f32[2,4,64,64]"
    loops = [line for line in text.splitlines() if " while(" in line and state in line and "while/body" in line]
    assert len(loops) >= 3, "the chunked delta rule's scan (one per linear layer of the pattern) is not in the program"


def test_training_flops_count_the_hybrids_own_projections_and_the_delta_rule_not_attention():
    """MFU of a hybrid: 6 x the matmul weights the model really holds (the Gated DeltaNet layers' q/k/v, z, b, a
    and output projections; the full layers' gated q), plus attention on the full layers only and the chunked
    delta rule on the linear ones. It counted every layer as a full-attention layer before."""
    from jaxcpt.model.persist import params_of
    from jaxcpt.model.transformer import init_model
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.metrics import flops_per_token

    params = params_of(init_model(HYBRID, build_mesh({"data": 1}, jax.devices()[:1])))
    matmuls = sum(x.size for name, x in params["layers"].items() if x.ndim >= 3 and name != "lin_conv")  # [L, in, out]
    matmuls += params["lm_head"].size  # the input embedding is a lookup, norms and the conv kernel are not matmuls
    lin, t = HYBRID.linear_attention, 32
    full_attention = 12 * 1 * HYBRID.num_heads * HYBRID.head_size * t  # one full layer: q.k and p.v, x3
    delta_rule = 3 * 3 * 2 * lin.num_value_heads * (lin.chunk_size * (lin.key_head_dim + lin.value_head_dim)
                                                     + 2 * lin.key_head_dim * lin.value_head_dim)  # three linear layers
    assert flops_per_token(HYBRID, t) == 6 * matmuls + full_attention + delta_rule


def test_a_run_sets_the_delta_rule_chunk_on_any_start_and_the_layers_use_it(hf_dir):
    """model.linear_chunk_size is how to compute, not what the model is: an HF start takes it (model.linear_attention
    is the checkpoint's architecture there), and the Gated DeltaNet layers scan chunks of that many tokens."""
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.state import resolve_model_config

    cfg = load_train_config(None, ["init.source=hf", f"init.path={hf_dir[0]}", "model.linear_chunk_size=7",
                                   "data.sources=[{name: d, paths: [d.jsonl]}]"])
    model_cfg = resolve_model_config(cfg)
    assert model_cfg.delta_rule_chunk_size == 7 and model_cfg.linear_attention.chunk_size == 64  # the model's kept
    with pytest.raises(ConfigError, match="linear_chunk_size"):  # the architecture's own field is refused there
        load_train_config(None, ["init.source=hf", f"init.path={hf_dir[0]}", "model.linear_attention.chunk_size=7"])
    tiny = dataclasses.replace(HYBRID, linear_chunk_size=7)
    model = Transformer(tiny, rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda ids: model(ids))(jnp.zeros((1, 32), jnp.int32)))
    text = jaxpr.replace(" ", "")  # the chunked q/k/v: [B, value heads, chunks, chunk, D]
    assert "[1,4,5,7," in text and "[1,4,4,8," not in text  # 32 tokens in 5 chunks of 7, not the model's 4 of 8
