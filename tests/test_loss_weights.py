"""Per-source loss weights (data.sources[].loss_weight): the objective weights each source's token losses;
the reported per-source sums (the oracle) stay unweighted."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from test_scan_and_loss import TINY

from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.train.step import _loss_sums


def test_objective_is_the_loss_weighted_sum_of_the_per_source_losses():
    model = init_model(dataclasses.replace(TINY, num_layers=1), build_mesh({"data": 1}, jax.devices()[:1]))
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 128, size=(3, 9))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "segment_ids": jnp.ones((3, 8), jnp.int32), "positions": jnp.tile(jnp.arange(8), (3, 1)),
             "loss_mask": jnp.ones((3, 8), jnp.float32), "source": jnp.asarray([0, 1, 1], jnp.int32)}
    kw = dict(graphdef=graphdef, num_sources=2, chunk_size=0, z_loss_weight=0.0)
    (plain, tokens_plain), aux = jax.jit(functools.partial(_loss_sums, **kw))(params, batch)
    (weighted, tokens_weighted), aux_w = jax.jit(functools.partial(_loss_sums, **kw, source_loss_weights=(2.0, 0.25)))(
        params, batch)
    per_source = np.asarray(aux["source_loss_sum"])  # [2], unweighted
    np.testing.assert_allclose(plain, per_source.sum(), rtol=1e-6)
    np.testing.assert_allclose(weighted, 2.0 * per_source[0] + 0.25 * per_source[1], rtol=1e-6)
    np.testing.assert_allclose(aux_w["source_loss_sum"], per_source, rtol=1e-6)  # reports stay unweighted
    assert tokens_plain == tokens_weighted == 24
