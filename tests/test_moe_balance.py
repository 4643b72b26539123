"""Auxiliary-loss-free load balancing (jaxcpt/train/balance.py): the DeepSeek-V3 selection bias."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxcpt.config import ConfigError
from jaxcpt.model import moe as moe_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.persist import abstract_params, params_of
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import logical_to_spec, make_rules
from jaxcpt.train import balance
from jaxcpt.train.state import graphdef_of, trainable_view
from jaxcpt.train.step import _loss_sums, train_step

RATE = 0.02
MOE = moe_lib.MoeConfig(num_experts=4, top_k=2, expert_intermediate_size=16, router_bias_update_rate=RATE)
CFG = ModelConfig(family="qwen3_moe", vocab_size=64, vocab_pad_multiple=1, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True, moe=MOE)


@functools.lru_cache(maxsize=None)
def skewed_params():
    """Host copies of a tiny MoE model whose routers crowd tokens onto experts 0 and 1: every token's
    embedding shares a positive feature 0, and the routers read it for experts 0 and 1."""
    params = jax.device_get(params_of(init_model(CFG, build_mesh({"data": 1}, devices=jax.devices()[:1]))))
    params = jax.tree.map(np.array, params)
    params["embedding"][:, 0] += 0.04  # embeddings have std 0.02: the shared feature dominates dim 0
    router = params["layers"]["router"]  # [L, E, X]
    router[:] = np.random.RandomState(0).normal(0, 0.3, router.shape)
    router[:, 0, 0] += 1.0
    router[:, 0, 1] += 0.6
    return params


def batch_of(seed: int, rows: int = 16, length: int = 16):
    ids = np.random.RandomState(seed).randint(0, CFG.vocab_size, (rows, length + 1))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
            "loss_mask": np.ones((rows, length), np.float32), "source": np.zeros((rows,), np.int32)}


@functools.lru_cache(maxsize=None)
def program(mesh_shape: tuple, accum: int = 1, rate: float = RATE):
    """(jitted train step, state at step 0, batch placer) on the mesh ``dict(mesh_shape)``."""
    mesh = build_mesh(dict(mesh_shape))
    rules = make_rules()
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, router_bias_update_rate=rate))
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params(cfg, mesh, rules))
    params = jax.tree.map(jax.device_put, skewed_params(), shardings)
    keys = tuple(_all_keys(params))
    tx = optax.sgd(1e-3)
    step = jax.jit(functools.partial(
        train_step, graphdef=graphdef_of(cfg, rules), tx=tx, schedule=lambda s: 1e-3, num_sources=1,
        grad_accum_steps=accum, chunk_size=0, z_loss_weight=0.0, trainable_keys=keys, router_bias_rate=rate))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"params": params, "opt_state": tx.init(trainable_view(params, keys)),
             "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
             balance.STATE_KEY: jax.device_put(balance.zero_bias(cfg), replicated)}
    rows = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, dict(mesh.shape)))
    source = NamedSharding(mesh, logical_to_spec(("batch",), rules, dict(mesh.shape)))

    def place(batch):
        return {k: jax.device_put(np.asarray(v), source if k == "source" else rows) for k, v in batch.items()}

    return mesh, step, state, place


def _all_keys(params):
    return [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def run_steps(mesh_shape, steps: int, accum: int = 1):
    """[(loss, router counts [L, X], bias after the step [L, X])] of ``steps`` steps on fresh batches."""
    mesh, step, state, place = program(tuple(mesh_shape.items()), accum)
    out = []
    with jax.set_mesh(mesh):
        for i in range(steps):
            state, metrics = step(state, place(batch_of(i)))
            out.append((float(metrics["loss"]), np.asarray(metrics["router_counts"]),
                        np.asarray(state[balance.STATE_KEY])))
    return out


def max_load(counts):
    return float((counts / counts.mean(-1, keepdims=True)).max())


def test_bias_moves_a_skewed_load_toward_uniform():
    history = run_steps({"data": 8}, 40)
    first, last = history[0][1], np.mean([c for _, c, _ in history[-5:]], axis=0)
    assert max_load(first) > 1.5  # the skewed routers: expert 0 takes most tokens (2 = all of them)
    assert max_load(last) < 1.2, (first, last)  # SGD at 1e-3 alone does not undo the skew in 40 steps
    bias = history[-1][2]
    assert (bias.argmin(-1) == 0).all() and (bias[:, 2:] > 0).all()  # the crowded expert held back, idle ones favoured
    np.testing.assert_allclose(bias.mean(-1), 0.0, atol=1e-6)  # centred per layer


def test_bias_update_is_the_same_on_every_mesh():
    one = run_steps({"data": 8}, 3)
    for other in ({"expert": 2, "fsdp": 4},):
        got = run_steps(other, 3)
        for (_, counts_a, bias_a), (_, counts_b, bias_b) in zip(one, got):
            np.testing.assert_array_equal(counts_a, counts_b)
            np.testing.assert_array_equal(bias_a, bias_b)  # bitwise: exact integer counts, the same sign rule
    assert np.abs(one[-1][2]).max() > 0


@pytest.mark.slow
def test_gradient_accumulation_moves_the_bias_by_the_whole_steps_load():
    batch = batch_of(0)
    batch["segment_ids"][1::2] = 0  # the second micro-batch (strided rows, as accumulate_gradients splits) is padding
    batch["loss_mask"][1::2] = 0.0
    mesh, _, state, place = program((("data", 8),))
    results = []
    for accum in (1, 2):
        _, step, _, _ = program((("data", 8),), accum)
        with jax.set_mesh(mesh):
            new_state, metrics = step(state, place(batch))
        results.append((np.asarray(metrics["router_counts"]), np.asarray(new_state[balance.STATE_KEY])))
    (whole_counts, whole_bias), (counts, bias) = results
    np.testing.assert_array_equal(counts, whole_counts)
    np.testing.assert_array_equal(bias, whole_bias)
    assert np.abs(bias).max() > 0  # the last micro-batch alone (no real tokens) would have left it at zero


route = jax.jit(moe_lib.route, static_argnums=2)
X = np.random.RandomState(0).normal(size=(64, 8)).astype(np.float32)  # tokens [N, E]
W = np.random.RandomState(1).normal(size=(8, 4)).astype(np.float32)  # router [E, X]


def test_bias_chooses_experts_but_the_weights_stay_unbiased():
    bias = jnp.array([0.0, 0.0, 0.0, 2.0])  # expert 3 always chosen
    _, weights, experts = route(X, W, MOE, selection_bias=bias)
    _, _, plain = route(X, W, MOE)
    assert (experts == 3).any(-1).all() and not (plain == 3).any(-1).all()
    probs = np.asarray(jax.nn.softmax(X @ W, axis=-1))
    chosen = np.take_along_axis(probs, np.asarray(experts), axis=-1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)


def test_bias_changes_the_gradient_only_through_which_experts_are_chosen():
    x, w = X, W
    target = np.random.RandomState(2).normal(size=(64, 2)).astype(np.float32)
    bias = jnp.array([0.3, -0.2, 0.0, 0.1])
    experts = route(x, w, MOE, selection_bias=bias)[2]

    def biased(w, bias):
        return jnp.sum(moe_lib.route(x, w, MOE, selection_bias=bias)[1] * target)

    def fixed_choice(w):  # the unbiased router restricted to the experts the bias chose
        chosen = jnp.take_along_axis(jax.nn.softmax(x @ w, axis=-1), experts, axis=-1)
        return jnp.sum(chosen / chosen.sum(-1, keepdims=True) * target)

    grad_w, grad_bias = jax.jit(jax.grad(biased, argnums=(0, 1)))(w, bias)
    assert not np.array_equal(experts, route(x, w, MOE)[2])  # the bias did change some choices
    np.testing.assert_allclose(grad_w, jax.jit(jax.grad(fixed_choice))(w), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_bias, 0.0)  # the bias is no parameter: no gradient reaches it


def test_a_bias_shared_by_all_experts_changes_no_loss_or_gradient():
    params = jax.tree.map(jnp.asarray, skewed_params())
    graphdef = graphdef_of(CFG, make_rules())
    batch = batch_of(0)

    def loss(p, bias):
        (total, tokens), _ = _loss_sums(p, batch, graphdef=graphdef, num_sources=1, chunk_size=0,
                                        z_loss_weight=0.0, router_bias=bias)
        return total / tokens

    plain = jax.jit(jax.value_and_grad(loss))(params, None)
    shifted = jax.jit(jax.value_and_grad(loss))(params, jnp.full((2, 4), 0.25))
    assert float(plain[0]) == float(shifted[0])
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(shifted[1])):
        np.testing.assert_array_equal(a, b)


def test_export_of_a_bias_to_a_family_without_one_is_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"qwen3_moe family in transformers has no such bias.*export.router_bias=drop"):
        balance.check_export(CFG, "refuse", exports=True)
    balance.check_export(CFG, "drop", exports=True)  # the user's stated choice
    balance.check_export(CFG, "refuse", exports=False)  # nothing exported: nothing to refuse
    balance.check_export(dataclasses.replace(CFG, moe=dataclasses.replace(MOE, router_bias_update_rate=0.0)),
                         "refuse", exports=True)


def test_balancing_options_may_be_set_for_a_model_from_an_hf_directory(tmp_path):
    from jaxcpt.train.config import config_as_yaml_dict, load_train_config

    base = ["init.source=hf", f"init.path={tmp_path}", "data.sources=[{name: d, paths: [d.jsonl]}]"]
    cfg = load_train_config(None, base + ["model.moe.router_bias_update_rate=0.001"])
    assert cfg.model.moe.router_bias_update_rate == 0.001
    assert config_as_yaml_dict(cfg)["model"]["moe"] == {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0,
                                                        "router_bias_update_rate": 0.001}
    with pytest.raises(ConfigError, match=r"model.moe.num_experts is set.*model.moe.\{router_aux_loss_coef"):
        load_train_config(None, base + ["model.moe.num_experts=4"])


def test_a_negative_bias_rate_is_a_config_error():
    with pytest.raises(ConfigError, match="router_bias_update_rate must be >= 0"):
        dataclasses.replace(MOE, router_bias_update_rate=-1.0).validate()


@pytest.mark.slow
def test_bias_run_resumes_bitwise_and_exports_only_when_told(tmp_path):
    from train_helpers import make_corpora, run_cli, tiny_overrides

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    corpora = make_corpora(tmp_path / "data")
    run = tmp_path / "run"
    moe = ["model.family=qwen3_moe", "model.qk_norm=true", "model.moe.num_experts=4", "model.moe.top_k=2",
           "model.moe.expert_intermediate_size=32", "model.moe.router_bias_update_rate=0.01"]
    args = tiny_overrides(run, corpora, steps=6, mesh="{expert: 2, data: 4}") + moe + ["checkpoint.every_steps=3"]
    with pytest.raises(ConfigError, match="export.router_bias=drop"):  # refused before any step
        train(load_train_config(None, args + ["export.final=true"]))
    assert not (run / "checkpoints").exists()

    train(load_train_config(None, args))
    straight = _train_records(run)
    assert np.abs(straight[3]["routing"]["bias"]).max() > 0  # the checkpoint at step 3 holds a moved bias
    shutil.rmtree(run / "checkpoints" / "6")
    train(load_train_config(None, args + ["export.final=true", "export.router_bias=drop", "export.dtype=float32"]))
    resumed = _train_records(run)
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == straight[step]["loss"]
        assert resumed[step]["routing"]["bias"] == straight[step]["routing"]["bias"]  # exact float32 values
    assert (run / "hf" / "step_6" / "config.json").is_file()

    refused = run_cli(["export-hf", str(run), "--out", str(tmp_path / "out")])
    output = refused.communicate(timeout=300)[0]
    assert refused.returncode != 0 and "--router-bias drop" in output, output
    dropped = run_cli(["export-hf", str(run), "--out", str(tmp_path / "out"), "--router-bias", "drop"])
    output = dropped.communicate(timeout=300)[0]
    assert dropped.returncode == 0 and "routes without the selection bias" in output, output
    assert (tmp_path / "out" / "config.json").is_file()


def _train_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "train"}


def test_report_shows_the_bias_spread_per_layer(tmp_path):
    from jaxcpt.report.routing import routing_lines

    load = [[1.0, 1.0], [1.5, 0.5]]
    records = [{"kind": "eval", "step": s, "sources": {"general": {"loss": 3.0, "routing": {"load": load}}}}
               for s in (0, 4)]
    records.insert(1, {"kind": "train", "step": 4, "routing": {"load": load, "bias": [[0.01, -0.01], [0.03, -0.02]]}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert any("selection bias (auxiliary-loss-free balancing) at step 4: per-layer spread 0.0200, 0.0500" in line
               for line in routing_lines(tmp_path))
