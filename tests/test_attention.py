"""Every attention implementation that runs here agrees with the reference, packed documents and windows included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcpt.config import ConfigError
from jaxcpt.errors import UserError
from jaxcpt.model.attention import attention_reference, attention_splash, attention_xla, choose_attention
from jaxcpt.model.config import ModelConfig
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules


def inputs(batch=2, length=128, heads=4, kv_heads=2, head_dim=16):
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(batch, length, heads, head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(batch, length, kv_heads, head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(batch, length, kv_heads, head_dim), jnp.float32)
    # two documents and padding in row 0, one document in row 1
    segments = np.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * length])
    return q, k, v, jnp.asarray(segments, jnp.int32)


@pytest.mark.parametrize("window", [None, 7])
def test_xla_dot_product_attention_matches_reference(window):
    q, k, v, seg = inputs()
    np.testing.assert_allclose(attention_xla(q, k, v, seg, window), attention_reference(q, k, v, seg, window), atol=2e-6)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("mesh_axes", [None, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "tensor": 4}])
def test_splash_kernel_in_interpret_mode_matches_reference(window, mesh_axes):
    """The TPU kernel, run by the Pallas interpreter; under a mesh it runs per device in shard_map.

    tensor=4 with 2 KV heads exercises the path that gives each query head its own KV head.
    """
    q, k, v, seg = inputs()
    expected = attention_reference(q, k, v, seg, window)
    fn = jax.jit(lambda *a: attention_splash(*a, window, rules=make_rules(), interpret=True))
    if mesh_axes is None:
        out = fn(q, k, v, seg)
    else:
        with jax.set_mesh(build_mesh(mesh_axes)):
            out = fn(q, k, v, seg)
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_splash_gradient_matches_reference():
    q, k, v, seg = inputs()
    def loss(fn):
        return jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    got = loss(lambda q, k, v: attention_splash(q, k, v, seg, None, rules=make_rules(), interpret=True))
    want = loss(lambda q, k, v: attention_reference(q, k, v, seg, None))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_auto_picks_reference_on_cpu_and_names_resolve():
    assert choose_attention("auto", "bfloat16", 128) is attention_reference
    assert choose_attention("xla", "float32", 128) is attention_xla


# Gemma-style settings: scores scaled by query_pre_attn_scalar**-0.5 and soft-capped, a sliding window
GEMMA = dict(scale=24**-0.5, softcap=1.5)


def large_inputs():
    q, k, v, seg = inputs()
    return 3 * q, 3 * k, v, seg  # scores large enough for the cap to bite


def test_soft_cap_changes_the_reference():
    q, k, v, seg = large_inputs()
    capped = attention_reference(q, k, v, seg, 7, **GEMMA)
    assert np.abs(capped - attention_reference(q, k, v, seg, 7, scale=GEMMA["scale"])).max() > 1e-2


@pytest.mark.parametrize("window", [None, 7])
def test_xla_path_honours_scale_and_soft_cap(window):
    q, k, v, seg = large_inputs()
    expected = attention_reference(q, k, v, seg, window, **GEMMA)
    np.testing.assert_allclose(attention_xla(q, k, v, seg, window, **GEMMA), expected, atol=2e-6)
    np.testing.assert_allclose(attention_xla(q, k, v, seg, window, scale=GEMMA["scale"]),
                               attention_reference(q, k, v, seg, window, scale=GEMMA["scale"]), atol=2e-6)


def test_splash_kernel_soft_caps_and_slides_like_the_reference_forward_and_backward():
    """The kernel's own attn_logits_soft_cap with a local mask, in interpret mode, values and gradients."""
    q, k, v, seg = large_inputs()

    def loss(fn):
        return jax.value_and_grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)

    got = loss(lambda q, k, v: attention_splash(q, k, v, seg, 7, **GEMMA, rules=make_rules(), interpret=True))
    want = loss(lambda q, k, v: attention_reference(q, k, v, seg, 7, **GEMMA))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_auto_never_picks_a_kernel_that_ignores_soft_capping(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose_attention("auto", "bfloat16", 128).func.__name__ == "attention_cudnn"
    assert choose_attention("auto", "bfloat16", 128, softcap=50.0) is attention_xla  # honours the cap
    with pytest.raises(UserError, match="cannot soft-cap"):
        choose_attention("cudnn", "bfloat16", 128, softcap=50.0)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert choose_attention("auto", "bfloat16", 128, softcap=50.0).func is attention_splash  # it soft-caps


def test_auto_on_gpu_in_float32_takes_the_xla_path_not_the_einsum_oracle(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose_attention("auto", "float32", 128) is attention_xla


def test_packed_segments_give_cudnn_the_offsets_and_lengths_of_every_document():
    from jaxcpt.model.attention import packed_segments

    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0, 0],   # three documents, padding at the end
                            [1, 1, 1, 1, 1, 1, 1, 1],   # one document filling the row
                            [0, 1, 1, 0, 2, 2, 2, 0]])  # padding between documents
    lengths, offsets, documents = map(np.asarray, packed_segments(jax.numpy.asarray(segment_ids)))
    assert lengths.shape == (3, 8) and offsets.shape == (3, 9)
    # padding is a run of its own: cuDNN writes nothing for a token outside every slot (its dK/dV were garbage)
    assert lengths[0, :5].tolist() == [3, 2, 1, 2, -1] and offsets[0, :5].tolist() == [0, 3, 5, 6, -1]
    assert lengths[1, :2].tolist() == [8, -1] and offsets[1, :2].tolist() == [0, -1]
    assert lengths[2, :6].tolist() == [1, 2, 1, 3, 1, -1] and offsets[2, :6].tolist() == [0, 1, 3, 4, 7, -1]
    assert (offsets[:, -1] == -1).all() and documents.tolist() == [4, 1, 5]
    for row in range(3):  # the slots cover every token of the row, once
        used = lengths[row] > 0
        covered = np.concatenate([np.arange(o, o + n) for o, n in zip(offsets[row, :-1][used], lengths[row][used])])
        assert covered.tolist() == list(range(8))

    # Three slots (model.cudnn_documents_per_row): rows 0 and 2 have more runs, and the count says so,
    # which is what sends attention_cudnn to the masked form for that batch.
    lengths, offsets, documents = map(np.asarray, packed_segments(jax.numpy.asarray(segment_ids), 3))
    assert lengths.shape == (3, 3) and offsets.shape == (3, 4)
    assert lengths[0].tolist() == [3, 2, 1] and offsets[0].tolist() == [0, 3, 5, -1]
    assert (documents > 3).tolist() == [True, False, True]


def test_cudnn_gets_the_configured_document_slots():
    fn = choose_attention("cudnn", "bfloat16", 128, cudnn_documents_per_row=16)
    assert fn.func.__name__ == "attention_cudnn" and fn.keywords == {"documents_per_row": 16}
    with pytest.raises(ConfigError, match="cudnn_documents_per_row must be >= 1"):
        ModelConfig(cudnn_documents_per_row=0).validate()
