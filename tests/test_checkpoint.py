"""Checkpointer: round trip, keep policy, resharding, params-only restore, crash safety, errors."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcpt import checkpoint as ck
from jaxcpt.config import ConfigError, from_dict
from jaxcpt.errors import UserError

SYNC = ck.CheckpointConfig(every_steps=1, async_save=False)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _state(mesh=None, seed=0):
    """A trainer-like state: params, an optax-like opt_state (tuples, None), a step counter."""
    rng = np.random.default_rng(seed)
    params = {"embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "mlp": {"w": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)}}
    if mesh is not None:
        params = {"embed": jax.device_put(params["embed"], NamedSharding(mesh, P("data", None))),
                  "mlp": {"w": jax.device_put(params["mlp"]["w"], NamedSharding(mesh, P("data", None)))}}
    opt_state = (None, {"count": jnp.array(3, jnp.int32), "mu": jax.tree.map(jnp.zeros_like, params)})
    return {"params": params, "opt_state": opt_state, "step": jnp.array(7, jnp.int32)}


def _abstract(tree, sharding_for=lambda name: None):
    def leaf(path, x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(ck._key_name(path)))
    return jax.tree_util.tree_map_with_path(leaf, tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_data_and_meta(tmp_path):
    state = _state()
    data = {"source": "web", "position": [3, 1], "epoch": 0}
    meta = {"model": {"layers": 2}, "versions": {"jax": jax.__version__}}
    with ck.Checkpointer(tmp_path / "ckpt", SYNC) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(100, state, data, meta)
    with ck.Checkpointer(tmp_path / "ckpt", SYNC) as ckpt:
        got_state, got_data, got_meta = ckpt.restore(None, _abstract(state))
    _assert_tree_equal(got_state, state)
    assert got_data == data and got_meta == meta


def test_async_save_is_complete_after_wait(tmp_path):
    state = _state()
    ckpt = ck.Checkpointer(tmp_path, ck.CheckpointConfig(every_steps=1, async_save=True))
    assert ckpt.save(1, state, {"pos": 1}, {})
    ckpt.wait()
    # A second manager reads the directory from scratch: only committed steps appear.
    fresh = ck.Checkpointer(tmp_path, SYNC)
    assert fresh.latest_step() == 1
    _assert_tree_equal(fresh.restore(1, _abstract(state))[0], state)
    ckpt.close()
    fresh.close()


def test_keep_policy_keeps_last_n_and_multiples_of_keep_every(tmp_path):
    state = {"w": jnp.ones(4)}
    cfg = ck.CheckpointConfig(every_steps=1, keep_last=3, keep_every=5, async_save=True)
    with ck.Checkpointer(tmp_path, cfg) as ckpt:
        for step in range(1, 13):
            ckpt.save(step, state)
    # keep_last counts the kept-forever 10 too: newest three are 10, 11, 12; plus 5.
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [5, 10, 11, 12]
    with ck.Checkpointer(tmp_path, cfg) as ckpt:
        assert ckpt.all_steps() == [5, 10, 11, 12]


def test_should_save_combines_steps_and_minutes(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(ck.time, "monotonic", lambda: clock[0])
    with ck.Checkpointer(tmp_path, ck.CheckpointConfig(every_steps=10, every_minutes=2.0, async_save=False)) as ckpt:
        assert ckpt.should_save(10) and not ckpt.should_save(11)
        clock[0] += 121  # two minutes since construction
        assert ckpt.should_save(11)
        assert ckpt.save(11, {"w": jnp.ones(2)})
        assert not ckpt.should_save(12)  # the save reset the clock
        assert not ckpt.should_save(10)  # at or before the latest step: never
        assert not ckpt.save(11, {"w": jnp.ones(2)}, force=True)  # existing step is skipped


def test_restore_onto_a_different_mesh_reshards(tmp_path):
    state = _state(_mesh((8,), ("data",)))
    with ck.Checkpointer(tmp_path, SYNC) as ckpt:
        ckpt.save(5, state, {}, {})
    new_mesh = _mesh((4, 2), ("fsdp", "tensor"))
    specs = {"params.embed": P("fsdp", "tensor"), "params.mlp.w": P(None, ("fsdp", "tensor"))}
    target = _abstract(state, lambda name: NamedSharding(new_mesh, specs.get(name, P())))
    with ck.Checkpointer(tmp_path, SYNC) as ckpt:
        restored, _, _ = ckpt.restore(5, target)
    _assert_tree_equal(restored, state)
    assert restored["params"]["embed"].sharding == NamedSharding(new_mesh, P("fsdp", "tensor"))
    assert restored["params"]["mlp"]["w"].sharding == NamedSharding(new_mesh, P(None, ("fsdp", "tensor")))


def test_restore_params_only_from_root_and_from_step_dir(tmp_path):
    old, new = _state(seed=0), _state(seed=1)
    with ck.Checkpointer(tmp_path, SYNC) as ckpt:
        ckpt.save(100, old, {}, {"run": "a"})
        ckpt.save(200, new, {}, {"run": "b"})
    mesh = _mesh((2, 4), ("fsdp", "tensor"))
    abstract_params = _abstract(new["params"], lambda name: NamedSharding(mesh, P("fsdp")))
    from_root = ck.restore_params(tmp_path, abstract_params)  # latest step: 200
    _assert_tree_equal(from_root, new["params"])
    assert from_root["embed"].sharding == NamedSharding(mesh, P("fsdp"))
    _assert_tree_equal(ck.restore_params(str(tmp_path / "100"), abstract_params), old["params"])
    assert ck.read_meta(tmp_path) == {"run": "b"}
    assert ck.read_meta(tmp_path / "100") == {"run": "a"}


def test_mismatched_tree_error_names_the_first_differing_keys(tmp_path):
    state = _state()
    with ck.Checkpointer(tmp_path, SYNC) as ckpt:
        ckpt.save(1, state)
        wrong = _abstract(state)
        wrong["params"]["lm_head"] = wrong["params"].pop("embed")
        wrong["step"] = jax.ShapeDtypeStruct((2,), jnp.int32)
        with pytest.raises(ck.CheckpointMismatchError) as e:
            ckpt.restore(1, wrong)
    msg = str(e.value)
    assert "'params.lm_head' is not in the checkpoint" in msg
    assert "'params.embed' is in the checkpoint but not in the target" in msg
    assert "'step' has shape () in the checkpoint but (2,)" in msg
    with pytest.raises(ck.CheckpointMismatchError, match="params.mlp.w"):
        ck.restore_params(tmp_path, {"mlp": {"w": jax.ShapeDtypeStruct((8, 25), jnp.float32)}})


def test_missing_or_empty_paths_raise_user_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=r"'.*nope' does not exist; expected a checkpoint directory"):
        ck.restore_params(missing, {})
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        ck.read_meta(tmp_path)
    with ck.Checkpointer(tmp_path / "empty", SYNC) as ckpt:
        with pytest.raises(UserError, match="no complete checkpoint"):
            ckpt.restore(None, {})
        ckpt.save(3, {"w": jnp.ones(2)})
        with pytest.raises(UserError, match=r"no checkpoint for step 4 .*steps there: \[3\]"):
            ckpt.restore(4, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_non_json_data_state_fails_before_writing(tmp_path):
    with ck.Checkpointer(tmp_path, SYNC) as ckpt:
        with pytest.raises(TypeError, match="'data' must be JSON-serialisable"):
            ckpt.save(1, {"w": jnp.ones(2)}, {"rng": np.ones(2)})
        assert ckpt.latest_step() is None


def test_config_rejects_keep_last_zero_and_negative_intervals():
    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        from_dict(ck.CheckpointConfig, {"keep_last": 0})
    with pytest.raises(ConfigError, match="every_minutes must be >= 0"):
        from_dict(ck.CheckpointConfig, {"every_minutes": -1})


_CHILD = textwrap.dedent("""
    import os, sys, threading, time
    import jax.numpy as jnp, numpy as np
    from jaxcpt.checkpoint import Checkpointer, CheckpointConfig
    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(every_steps=1, async_save=True))
    ckpt.save(1, {"w": jnp.ones(4), "big": jnp.zeros(8)}, {"pos": 1}, {})
    ckpt.wait()
    big = np.random.default_rng(0).random(32_000_000, dtype=np.float32)  # 128 MB: ~0.3 s to write

    def announce():  # on CPU save() waits for its write: say when the write has begun, from beside it
        while not os.path.exists(os.path.join(sys.argv[1], "2.orbax-checkpoint-tmp")):
            time.sleep(0.002)
        print("SAVING", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    ckpt.save(2, {"w": jnp.zeros(4), "big": jnp.asarray(big)}, {"pos": 2}, {})
    time.sleep(60)
""")


def test_sigkill_mid_save_leaves_previous_step_latest_and_next_save_works(tmp_path):
    directory = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for line in child.stdout:
            if line.startswith("SAVING"):
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    names = sorted(p.name for p in directory.iterdir())
    # The kill must have landed mid-write, or this test proves nothing.
    assert names == ["1", "2.orbax-checkpoint-tmp"], names

    with pytest.raises(UserError, match="is incomplete"):
        ck.read_meta(directory / "2.orbax-checkpoint-tmp")
    with ck.Checkpointer(directory, SYNC) as ckpt:
        assert ckpt.latest_step() == 1
        target = {"big": jax.ShapeDtypeStruct((8,), jnp.float32), "w": jax.ShapeDtypeStruct((4,), jnp.float32)}
        state, data, _ = ckpt.restore(None, target)
        np.testing.assert_array_equal(state["w"], np.ones(4))
        assert data == {"pos": 1}
        # The resumed run reaches step 2 again; the leftover tmp directory must not get in the way.
        assert ckpt.save(2, {"w": jnp.full(4, 2.0), "big": jnp.zeros(8)}, {"pos": 2}, {})
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
    with ck.Checkpointer(directory, SYNC) as ckpt:
        np.testing.assert_array_equal(ckpt.restore(2, target)[0]["w"], np.full(4, 2.0))
