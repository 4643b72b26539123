"""Held-out evaluation batches, the same for the streaming and the elastic reader.

A source's evaluation rows (the first ``data.eval_rows`` of its held-out split, the same every
call) are dealt to hosts round-robin and stacked into batches (``packing.stack_rows``); every
host gets the same number of batches (missing rows are all padding, loss_mask 0), so a
multi-host evaluation step never waits on a host with fewer batches.
"""

from __future__ import annotations

import math

import numpy as np

from jaxcpt.data.packing import stack_rows


def eval_batches(rows: list[dict], *, batch_size: int, seq_len: int, host: tuple[int, int],
                 byte_lengths: np.ndarray | None) -> list[dict[str, np.ndarray]]:
    """This host's batches of ``rows`` (each with its ``source``), with ``target_bytes`` [batch, seq]: the
    UTF-8 bytes each target token spells (``byte_lengths`` [vocab]; zeros, so no bits per byte, without one)."""
    index, count = host
    mine = rows[index::count]
    num_batches = math.ceil(math.ceil(len(rows) / count) / batch_size)
    batches = [stack_rows(mine[b * batch_size : (b + 1) * batch_size], batch_size, seq_len) for b in range(num_batches)]
    for batch in batches:
        batch["target_bytes"] = (np.zeros(batch["targets"].shape, np.float32) if byte_lengths is None else
                                 (byte_lengths[batch["targets"]] * (batch["loss_mask"] > 0)).astype(np.float32))
    return batches
