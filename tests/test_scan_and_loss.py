"""Memory and speed features: scanned layers compile in time flat in depth; chunked loss equals plain loss; remat equals
none and recomputes what jaxcpt.model.remat says; the CPU matmul trick stays on CPU."""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcpt.model import remat as remat_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.train.loss import model_loss, token_loss_sums

TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)


def batch(rows=2, length=16, vocab=128):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, vocab, size=(rows, length + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.asarray((rng.rand(rows, length) > 0.2).astype(np.float32))}


def compile_seconds(num_layers: int) -> float:
    model = init_model(dataclasses.replace(TINY, num_layers=num_layers), build_mesh({"data": 1}, jax.devices()[:1]))
    graphdef, state = nnx.split(model)
    grad_fn = jax.jit(jax.grad(lambda s, b: model_loss(nnx.merge(graphdef, s), b)[0]))
    start = time.perf_counter()
    grad_fn.lower(state, batch()).compile()
    return time.perf_counter() - start


@pytest.fixture
def without_compilation_cache():
    """Compile for real: tests/conftest.py's persistent cache would answer both depths from disk."""
    from jax._src import compilation_cache  # reset_cache: JAX's own hook for tests, to re-read the setting

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


def test_compile_time_of_32_layers_is_within_2x_of_4_layers(without_compilation_cache):
    """A property of the compiled program's structure (one scanned block, whatever the depth),
    checked with a generous 2x margin; unrolled layers would grow compile time with depth."""
    compile_seconds(4)  # warm the compiler's caches for both measurements alike
    four = min(compile_seconds(4) for _ in range(2))
    thirty_two = min(compile_seconds(32) for _ in range(2))
    assert thirty_two < 2 * four, (four, thirty_two)


@pytest.mark.parametrize("chunk", [4, 5, 16])  # divides, does not divide (padding), one chunk
def test_chunked_loss_and_gradient_equal_plain(chunk):
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 16, 32), jnp.float32)
    weights = jnp.asarray(rng.randn(32, 128) * 0.1, jnp.float32)
    b = batch()

    def total(h, w, chunk_size):
        loss, lse2 = token_loss_sums(h, w, b["targets"], b["loss_mask"], chunk_size=chunk_size)
        return loss.sum() + 1e-3 * lse2.sum()

    np.testing.assert_allclose(total(hidden, weights, chunk), total(hidden, weights, 0), rtol=1e-6)
    g_chunk = jax.grad(total, argnums=(0, 1))(hidden, weights, chunk)
    g_plain = jax.grad(total, argnums=(0, 1))(hidden, weights, 0)
    for a, p in zip(g_chunk, g_plain):
        np.testing.assert_allclose(a, p, rtol=1e-5, atol=1e-7)


def test_loss_matches_a_plain_softmax_cross_entropy():
    model = init_model(TINY, build_mesh({"data": 1}, jax.devices()[:1]))
    b = batch()
    logits = model(b["inputs"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
    expected = (nll * b["loss_mask"]).sum() / b["loss_mask"].sum()
    np.testing.assert_allclose(model_loss(model, b, chunk_size=4)[0], expected, rtol=1e-6)


@pytest.mark.parametrize("remat", ["minimal", "save_attention", "full"])  # save_attention: the attention output named
def test_remat_gives_the_same_gradient_as_none(remat):
    mesh = build_mesh({"data": 1}, jax.devices()[:1])
    grads = {}
    for policy in ("none", remat):
        model = init_model(dataclasses.replace(TINY, remat=policy), mesh)
        graphdef, state = nnx.split(model)
        grads[policy] = jax.grad(lambda s: model_loss(nnx.merge(graphdef, s), batch())[0])(state)
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_minimal_remat_keeps_more_activations_than_full_and_fewer_than_none():
    """XLA's planned temporary memory of the gradient: 'minimal' keeps the projections' outputs.

    With the projections' hand-written backward, a policy that looks for dot primitives saw
    nothing to save, and 'minimal' planned exactly the memory of 'full'.
    """
    mesh = build_mesh({"data": 1}, jax.devices()[:1])
    temp = {}
    for policy in ("none", "minimal", "full"):
        model = init_model(dataclasses.replace(TINY, num_layers=2, remat=policy), mesh)
        graphdef, state = nnx.split(model)
        grad_fn = jax.jit(jax.grad(lambda s: model_loss(nnx.merge(graphdef, s), batch())[0]))
        temp[policy] = grad_fn.lower(state).compile().memory_analysis().temp_size_in_bytes
    assert temp["none"] > temp["minimal"] > temp["full"], temp


def test_a_local_global_layer_pattern_stays_one_scan_over_all_layers():
    """Gemma 3's 5:1 pattern: each layer's kind is scanned data and lax.cond picks its window and
    RoPE, so the program has one scanned block, not a Python loop over layers."""
    cfg = dataclasses.replace(TINY, num_layers=6, sliding_window=4, rope_local_theta=100.0,
                              layer_types=("sliding_attention",) * 5 + ("full_attention",))
    model = init_model(cfg, build_mesh({"data": 1}, jax.devices()[:1]))
    jaxpr = jax.make_jaxpr(lambda ids: model(ids))(batch()["inputs"])
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 6
    assert "cond[" in str(scans[0].params["jaxpr"])


def _jaxpr_dot_flops(jaxpr, times: int = 1) -> int:
    """FLOPs of every dot_general in a jaxpr, a scan's body counted once per iteration (2 per multiply-add)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            inner = math.prod(eqn.invars[0].aval.shape[i] for i in contract)
            total += times * 2 * math.prod(eqn.outvars[0].aval.shape) * inner
        inner_times = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _jaxpr_dot_flops(sub.jaxpr, inner_times)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _jaxpr_dot_flops(sub, inner_times)
    return total


def test_each_remat_policy_recomputes_the_matmuls_its_table_counts():
    """The gradient's jaxpr is the oracle: its matmul FLOPs beyond remat=none's are what the policy reruns,
    and jaxcpt.model.remat.recompute_flops (what `jaxcpt compile --explore` and docs/accelerators.md report)
    must count the same. Einsum attention here: with the attention output kept only the scores rerun."""
    cfg = dataclasses.replace(TINY, num_layers=2, attention="reference")
    mesh = build_mesh({"data": 1}, jax.devices()[:1])
    b = batch()
    flops = {}
    for policy in ("none", "minimal", "save_dot_except_mlp", "save_attention", "full"):
        model = init_model(dataclasses.replace(cfg, remat=policy), mesh)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(jax.grad(lambda s: model_loss(nnx.merge(graphdef, s), b)[0]))(state)
        flops[policy] = _jaxpr_dot_flops(jaxpr.jaxpr)
    tokens, length = b["inputs"].size, b["inputs"].shape[1]
    # the table's attention FLOPs are causal ((T + 1) / 2 keys per query); the einsum path computes all T
    causal_to_full = length / ((length + 1) / 2)
    for policy in ("minimal", "save_dot_except_mlp", "save_attention", "full"):
        expected = remat_lib.recompute_flops(cfg, policy, tokens, length, fused_attention=False)
        attention = (remat_lib.attention_flops_per_token(cfg, length) * cfg.num_layers * tokens
                     * (0.5 if remat_lib.ATTENTION_OUT in remat_lib.KEPT[policy] else 1.0))
        expected += attention * (causal_to_full - 1)
        assert flops[policy] - flops["none"] == pytest.approx(expected, rel=1e-9), policy
    assert flops["full"] > flops["save_attention"] > flops["save_dot_except_mlp"] > flops["minimal"] > flops["none"]


def _primitives(jaxpr) -> set[str]:
    """Every primitive's name in a jaxpr and the jaxprs nested in it (scan bodies, custom_vjp calls ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names |= _primitives(sub)
    return names


def _gradient_primitives(devices) -> set[str]:
    """Primitives of the tiny model's gradient, traced (not run) under a mesh of ``devices``."""
    from jaxcpt.model.transformer import abstract_model
    from jaxcpt.sharding.rules import make_rules
    from jaxcpt.train.state import graphdef_of

    cfg = dataclasses.replace(TINY, num_layers=1, attention="reference")
    _, state = nnx.split(abstract_model(cfg, make_rules()))
    graphdef = graphdef_of(cfg, make_rules())
    with jax.set_mesh(build_mesh({"data": 1}, devices[:1])):
        jaxpr = jax.make_jaxpr(jax.grad(lambda s: model_loss(nnx.merge(graphdef, s), batch())[0]))(state)
    return _primitives(jaxpr.jaxpr)


def test_the_cpu_matmul_backward_is_traced_for_cpu_only():
    """The projections' custom_vjp is an XLA:CPU trick: a program traced for TPU devices (from this CPU host,
    as `jaxcpt compile` does) has plain dots that remat policies can see, whatever the host's backend."""
    pytest.importorskip("libtpu")
    from jaxcpt.aot.topology import parse_topology, tpu_devices

    assert "custom_vjp_call" in _gradient_primitives(jax.devices())
    on_tpu = _gradient_primitives(tpu_devices(parse_topology("v5p-8")))
    assert "custom_vjp_call" not in on_tpu and "dot_general" in on_tpu
