"""Multi-host start-up and the few host-side collectives the trainer needs.

On a TPU pod slice and under SLURM, ``jax.distributed.initialize()`` finds its
coordinator by itself; on other multi-node GPU setups the coordinator address,
process count and index come from the ``distributed`` config section (the launch
scripts in launch/ fill them in).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Literal

import jax
import numpy as np

from jaxcpt.config import field
from jaxcpt.errors import UserError
from jaxcpt.sharding import failures

@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    initialize: bool | Literal["auto"] = field(
        "auto",
        help="call jax.distributed.initialize(): auto = when launched on several hosts (TPU pod, SLURM, "
        "coordinator settings below), true = always, false = never",
    )
    coordinator_address: str | None = field(None, help="host:port of process 0 (multi-node GPU); auto-detected on TPU and SLURM")
    num_processes: int | None = field(None, help="number of processes (hosts)")
    process_id: int | None = field(None, help="this process's index")
    failure_timeout_seconds: float = field(
        60.0,
        help="after an error on one host (bad input, a missing file, a failed export), every host stops within this "
        "many seconds, printing which host failed and why: the time the hosts wait for each other to hear of it "
        "(a failing host's own cleanup gets half of it)",
    )
    heartbeat_timeout_seconds: int = field(
        100,
        help="a host that dies without a word (kill -9, out of memory) is declared dead after this many seconds "
        "without heartbeats, and JAX stops every other host",
    )

    def validate(self) -> None:
        from jaxcpt.config import ConfigError

        if not self.failure_timeout_seconds > 0:
            raise ConfigError(f"distributed.failure_timeout_seconds must be > 0, got {self.failure_timeout_seconds}")
        if self.heartbeat_timeout_seconds < 1:
            raise ConfigError(f"distributed.heartbeat_timeout_seconds must be >= 1, got {self.heartbeat_timeout_seconds}")


def _launched_on_several_hosts() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([w for w in workers.split(",") if w]) > 1


def initialize_distributed(cfg) -> bool:
    """Call ``jax.distributed.initialize`` when configured or auto-detected; True if it ran."""
    explicit = cfg.coordinator_address is not None
    wanted = cfg.initialize is True or (cfg.initialize == "auto" and (explicit or _launched_on_several_hosts()))
    if not wanted:
        return False
    if jax.distributed.is_initialized():
        failures.watch(cfg.failure_timeout_seconds)
        return True
    kwargs = {}
    if explicit:
        if cfg.num_processes is None or cfg.process_id is None:
            raise UserError("distributed.coordinator_address needs distributed.num_processes and distributed.process_id too")
        kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id)
    try:
        # CPU processes talk through gloo (TCP); accelerators use their own collectives and
        # ignore this. It makes multi-process runs on CPU work, which is how the tests check
        # the multi-host paths on one machine.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = cfg.heartbeat_timeout_seconds
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - report with what to check
        raise UserError(f"jax.distributed.initialize failed ({e}); check distributed.* settings and that every host runs the same command") from e
    failures.watch(cfg.failure_timeout_seconds)
    return True


def is_writer() -> bool:
    """The process that writes shared files (logs, metrics, config, reports): process 0."""
    return jax.process_index() == 0


def gather_json(value) -> list:
    """Every host's JSON-serialisable ``value``, as a list indexed by process (the same list on every host)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size])))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, lengths.reshape(-1))]
