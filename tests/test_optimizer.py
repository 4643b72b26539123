"""AdamW with the weight-decay mask, clipping, the exposed schedule, and exact gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcpt.config import ConfigError, from_dict
from jaxcpt.optim import OptimConfig, ScheduleConfig, accumulate_gradients, build_optimizer, weight_decay_mask

LR, WD = 1e-2, 0.1


def llama_like_params():
    """Names as the model files use them: norms, biases (Qwen), embedding, lm_head, scanned layers."""
    key = iter(jax.random.split(jax.random.key(0), 8))
    return {
        "embed": {"embedding": jax.random.normal(next(key), (16, 4))},
        "layers": [
            {
                "attn_norm": {"scale": jnp.ones(4)},
                "q_proj": {"kernel": jax.random.normal(next(key), (4, 4)), "bias": jax.random.normal(next(key), (4,))},
                "q_norm": {"scale": jnp.full(4, 1.5)},
                "sinks": jnp.zeros(4),  # gpt-oss's per-head attention sink logits
            }
        ],
        "final_norm": {"scale": jnp.full(4, 0.7)},
        "lm_head": {"kernel": jax.random.normal(next(key), (4, 16))},
    }


def constant_lr_config(**optim) -> OptimConfig:
    schedule = ScheduleConfig(kind="constant", peak_lr=LR, warmup_steps=0)
    return OptimConfig(schedule=schedule, weight_decay=WD, **optim)


# --- the weight-decay mask -----------------------------------------------------------------------


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_mask_spares_norms_and_biases_and_decays_embeddings_only_on_request(decay_embeddings):
    mask = weight_decay_mask(llama_like_params(), decay_embeddings=decay_embeddings)
    assert mask == {
        "embed": {"embedding": decay_embeddings},
        "layers": [{"attn_norm": {"scale": False}, "q_proj": {"kernel": True, "bias": False}, "q_norm": {"scale": False},
                    "sinks": False}],
        "final_norm": {"scale": False},
        "lm_head": {"kernel": True},  # the output projection is a kernel, not the embedding
    }


class TinyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(16, 4, rngs=rngs)
        self.input_norm = nnx.RMSNorm(4, rngs=rngs)
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.lm_head = nnx.Linear(4, 16, use_bias=False, rngs=rngs)


def test_mask_reads_nnx_state_paths():
    mask = weight_decay_mask(nnx.state(TinyModel(nnx.Rngs(0)), nnx.Param))
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat == {
        "embed/embedding/value": False,
        "input_norm/scale/value": False,
        "proj/bias/value": False,
        "proj/kernel/value": True,
        "lm_head/kernel/value": True,
    }


# --- AdamW behaviour the mask and schedule must produce ------------------------------------------


def run_zero_grad_steps(tx, params, n):
    """With zero gradients Adam's moments stay 0, so the only update is the decoupled weight decay."""
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(n):
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_zero_grads_leave_norms_biases_untouched_and_shrink_kernels(decay_embeddings):
    params = llama_like_params()
    tx, _ = build_optimizer(constant_lr_config(decay_embeddings=decay_embeddings), total_steps=100)
    after = run_zero_grad_steps(tx, params, n=5)
    shrink = (1 - LR * WD) ** 5  # AdamW: p <- p - lr * wd * p per step
    layer, layer0 = after["layers"][0], params["layers"][0]
    np.testing.assert_array_equal(after["final_norm"]["scale"], params["final_norm"]["scale"])
    np.testing.assert_array_equal(layer["attn_norm"]["scale"], layer0["attn_norm"]["scale"])
    np.testing.assert_array_equal(layer["q_norm"]["scale"], layer0["q_norm"]["scale"])
    np.testing.assert_array_equal(layer["q_proj"]["bias"], layer0["q_proj"]["bias"])
    np.testing.assert_allclose(layer["q_proj"]["kernel"], layer0["q_proj"]["kernel"] * shrink, rtol=1e-6)
    np.testing.assert_allclose(after["lm_head"]["kernel"], params["lm_head"]["kernel"] * shrink, rtol=1e-6)
    embed_factor = shrink if decay_embeddings else 1.0
    np.testing.assert_allclose(after["embed"]["embedding"], params["embed"]["embedding"] * embed_factor, rtol=1e-6)


def test_nnx_optimizer_keeps_norm_scale_and_decays_kernel():
    model = TinyModel(nnx.Rngs(0))
    scale0, kernel0 = model.input_norm.scale[...], model.proj.kernel[...]
    tx, _ = build_optimizer(constant_lr_config(), total_steps=100)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    np.testing.assert_array_equal(model.input_norm.scale[...], scale0)
    np.testing.assert_allclose(model.proj.kernel[...], kernel0 * (1 - LR * WD), rtol=1e-6)


def test_returned_schedule_is_the_lr_that_drives_updates():
    cfg = OptimConfig(schedule=ScheduleConfig(peak_lr=LR, warmup_steps=4), weight_decay=WD)
    tx, schedule = build_optimizer(cfg, total_steps=20)
    kernel = {"kernel": jnp.ones((2, 2))}
    state = tx.init(kernel)
    for step in range(6):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, kernel), state, kernel)
        # zero grads: the update is -lr(step) * wd * p, so it reveals the lr optax used at this step
        np.testing.assert_allclose(updates["kernel"], -float(schedule(step)) * WD * kernel["kernel"], rtol=1e-6)
        kernel = optax.apply_updates(kernel, updates)


@pytest.mark.parametrize("clip, expected_scale", [(1.0, 1 / 5.0), (None, 1.0), (0.0, 1.0)])
def test_global_norm_clipping_scales_the_gradient_adam_sees(clip, expected_scale):
    tx, _ = build_optimizer(constant_lr_config(clip_grad_norm=clip, betas=(0.9, 0.95)), total_steps=10)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")  # first moment after one step: (1 - b1) * g
    np.testing.assert_allclose(mu["a"], 0.1 * grads["a"] * expected_scale, rtol=1e-6)
    np.testing.assert_allclose(mu["b"], 0.1 * grads["b"] * expected_scale, rtol=1e-6)


@pytest.mark.parametrize(
    "optim, message",
    [
        ({"betas": [0.9, 1.0]}, r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
        ({"grad_accum_steps": 0}, r"optim.grad_accum_steps must be >= 1, got 0"),
        ({"clip_grad_norm": -1}, r"optim.clip_grad_norm must be >= 0 \(0 or null = off\)"),
        ({"weight_decay": -0.1}, r"optim.weight_decay must be >= 0"),
        ({"weight_decai": 0.1}, r"unknown config key 'optim.weight_decai'; did you mean 'optim.weight_decay'\?"),
    ],
)
def test_bad_optim_configs_raise_clear_errors(optim, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(OptimConfig, optim, prefix="optim")


def test_default_optim_config_builds():
    cfg = from_dict(OptimConfig, {}, prefix="optim")
    tx, schedule = build_optimizer(cfg, total_steps=1000)
    assert float(schedule(10)) == pytest.approx(cfg.schedule.peak_lr, rel=1e-6)  # 1% warmup of 1000 steps
    assert cfg.z_loss_weight == 0.0 and cfg.grad_accum_steps == 1


# --- gradient accumulation ----------------------------------------------------------------------

VOCAB, DIM, BATCH, SEQ = 11, 8, 8, 6


def tiny_lm_params():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    return {
        "embed": jax.random.normal(k1, (VOCAB, DIM)) * 0.5,
        "hidden": jax.random.normal(k2, (DIM, DIM)) * 0.5,
        "out": jax.random.normal(k3, (DIM, VOCAB)) * 0.5,
    }


def token_loss_sum(params, batch):
    """The accumulation contract: ((sum of masked per-token losses, token count), aux)."""
    h = jnp.tanh(params["embed"][batch["inputs"]] @ params["hidden"])  # [batch, seq, dim]
    logits = h @ params["out"]  # [batch, seq, vocab]
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [batch, seq]
    loss_sum = jnp.sum(per_token * batch["mask"])
    tokens = jnp.sum(batch["mask"])
    return (loss_sum, tokens), {"tokens": tokens, "loss_sum": loss_sum}


def uneven_batch():
    k1, k2 = jax.random.split(jax.random.key(2))
    # real lengths differ per row, so the 4 micro-batches of 2 rows hold 12, 3, 7 and 0+5 tokens
    lengths = jnp.array([6, 6, 1, 2, 4, 3, 0, 5])
    return {
        "inputs": jax.random.randint(k1, (BATCH, SEQ), 0, VOCAB),
        "targets": jax.random.randint(k2, (BATCH, SEQ), 0, VOCAB),
        "mask": (jnp.arange(SEQ)[None, :] < lengths[:, None]).astype(jnp.float32),  # [batch, seq]
    }


def relative_error(a, b):
    diff = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    norm = jnp.sqrt(sum(jnp.sum(y**2) for y in jax.tree.leaves(b)))
    return float(diff / norm)


def test_four_microbatches_give_the_full_batch_gradient():
    params, batch = tiny_lm_params(), uneven_batch()

    def full_batch_mean(p):
        (loss_sum, tokens), _ = token_loss_sum(p, batch)
        return loss_sum / tokens

    want_loss, want_grads = jax.jit(jax.value_and_grad(full_batch_mean))(params)
    loss, grads, aux = jax.jit(accumulate_gradients, static_argnums=(0, 3))(token_loss_sum, params, batch, 4)

    assert grads["embed"].dtype == jnp.float32
    assert relative_error(grads, want_grads) < 1e-6
    assert abs(float(loss) - float(want_loss)) / abs(float(want_loss)) < 1e-6
    assert float(aux["tokens"]) == float(batch["mask"].sum())  # aux is summed over micro-batches

    # The contract matters: averaging each micro-batch's mean is not the full-batch mean.
    def microbatch_mean(p, i):
        sl = jax.tree.map(lambda x: x[2 * i : 2 * i + 2], batch)
        (s, n), _ = token_loss_sum(p, sl)
        return s / jnp.maximum(n, 1)

    naive = jax.jit(jax.grad(lambda p: sum(microbatch_mean(p, i) for i in range(4)) / 4))(params)
    assert relative_error(naive, want_grads) > 1e-2


def test_one_microbatch_and_optimizer_update_match_too():
    params, batch = tiny_lm_params(), uneven_batch()
    loss1, grads1, _ = accumulate_gradients(token_loss_sum, params, batch, 1)
    loss4, grads4, _ = accumulate_gradients(token_loss_sum, params, batch, 4)
    assert relative_error(grads4, grads1) < 1e-6
    tx, _ = build_optimizer(constant_lr_config(), total_steps=10)
    state = tx.init(params)
    updates1, _ = tx.update(grads1, state, params)
    updates4, _ = tx.update(grads4, state, params)
    # Adam divides by |g|, so compare the updates where the gradient is not vanishingly small.
    for u1, u4, g in zip(jax.tree.leaves(updates1), jax.tree.leaves(updates4), jax.tree.leaves(grads1)):
        big = jnp.abs(g) > 1e-4
        np.testing.assert_allclose(u4[big], u1[big], rtol=1e-5)


def test_batch_that_does_not_split_evenly_is_a_config_error():
    with pytest.raises(ConfigError, match=r"batch of 8 sequences does not split into grad_accum_steps=3"):
        accumulate_gradients(token_loss_sum, tiny_lm_params(), uneven_batch(), 3)
