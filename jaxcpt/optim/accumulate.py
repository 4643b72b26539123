"""Gradient accumulation that gives exactly the large-batch gradient of the mean per-token loss.

Averaging per-micro-batch *means* is wrong when micro-batches hold different numbers of
real tokens (padding, packing, loss masks): a micro-batch with 10 tokens would weigh as
much as one with 1000. So the loss function returns *sums* and *counts*, and the mean is
taken once, over the whole batch:

    loss_fn(params, microbatch) -> ((loss_sum, num_tokens), aux)

    loss_sum    scalar: sum of the per-token losses of the micro-batch (masked tokens add 0)
    num_tokens  scalar: number of tokens that count (the mask's sum)
    aux         any pytree of arrays, e.g. more sums for metrics; accumulated by summing

    grad = sum_i d(loss_sum_i)/d(params) / sum_i num_tokens_i  ==  d(mean token loss)/d(params)

Any extra per-token term (the z-loss) belongs in ``loss_sum`` as a masked sum too, so
it is averaged over the same tokens. Put the token count in ``aux`` as well if the
caller wants it (tokens/s): aux is summed over micro-batches.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError

LossFn = Callable[[Any, Any], tuple[tuple[jax.Array, jax.Array], Any]]


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """Every leaf ``[batch, ...]`` as ``[num_microbatches, batch // num_microbatches, ...]``, strided.

    Micro-batch ``i`` holds rows ``i, i + n, i + 2n, ...``: the batch is sharded over the
    devices in contiguous blocks, and a strided split keeps every micro-batch spread over
    all of them. A contiguous split (rows ``0..m-1`` first) would put each micro-batch on
    a fraction of the devices and replicate its work over the rest.
    """

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ConfigError(
                f"batch of {x.shape[0]} sequences does not split into grad_accum_steps={num_microbatches} "
                "equal micro-batches; make the batch size a multiple of optim.grad_accum_steps"
            )
        rows = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])  # [m, n, ...]
        return jnp.swapaxes(rows, 0, 1)  # [n, m, ...]

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: LossFn, params: Any, batch: Any, num_microbatches: int
) -> tuple[jax.Array, Any, Any]:
    """``(loss_mean, grads, aux_sum)`` over ``batch`` split into ``num_microbatches``.

    ``loss_mean`` (float32) and ``grads`` are those of the mean per-token loss of the
    whole batch; ``aux_sum`` is the sum of the micro-batches' aux. Micro-batches run one after another under ``jax.lax.scan``, so memory is
    that of one micro-batch plus one float32 gradient accumulator. Gradients come back
    in the dtype of ``params``. A batch with no counted tokens gives zero gradients.
    """
    grad_of_sum = jax.value_and_grad(_sum_and_aux(loss_fn), has_aux=True)

    if num_microbatches == 1:  # no scan: same contract, simpler program
        loss_sum, (tokens, aux), grads = _unpack(grad_of_sum(params, batch))
    else:
        micro = split_microbatches(batch, num_microbatches)  # each leaf: [num_micro, micro_batch, ...]
        first = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda p, b: loss_fn(p, b)[1], params, first)
        zeros = (
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        )

        def add_microbatch(carry, microbatch):
            loss_acc, tokens_acc, aux_acc, grad_acc = carry
            loss_sum, (tokens, aux), grads = _unpack(grad_of_sum(params, microbatch))
            return (
                loss_acc + loss_sum.astype(jnp.float32),
                tokens_acc + tokens,
                jax.tree.map(jnp.add, aux_acc, aux),
                jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_acc, grads),
            ), None

        (loss_sum, tokens, aux, grads), _ = jax.lax.scan(add_microbatch, zeros, micro)

    denominator = jnp.maximum(tokens, 1.0)  # all-masked batch: sums are 0, avoid 0/0
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    return loss_sum.astype(jnp.float32) / denominator, grads, aux


def _sum_and_aux(loss_fn: LossFn):
    """``loss_fn`` reshaped for ``jax.value_and_grad(has_aux=True)``: differentiate the sum only."""

    def fn(params, microbatch):
        (loss_sum, num_tokens), aux = loss_fn(params, microbatch)
        return loss_sum, (jnp.asarray(num_tokens, jnp.float32), aux)

    return fn


def _unpack(value_and_grads):
    (loss_sum, (tokens, aux)), grads = value_and_grads
    return loss_sum, (tokens, aux), grads
