"""One JAX process of tests/test_multihost_elastic.py: reads ``steps`` elastic batches and writes what it trained.

argv: port num_processes process_id config.json steps state_in|- out.json
"""

import json
import sys

import jax

from jaxcpt.config import from_dict
from jaxcpt.data.config import DataConfig
from jaxcpt.data.pipeline import build_train_iterator
from jaxcpt.sharding.distributed import gather_json


def main(port, num_processes, process_id, config, steps, state_in, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    with open(config) as f:
        cfg = from_dict(DataConfig, json.load(f), prefix="data")
    global_batch = 4
    it = build_train_iterator(cfg, batch_size=global_batch // jax.process_count())  # process index/count from JAX
    if state_in != "-":
        with open(state_in) as f:
            hosts = json.load(f)["hosts"]
        # as jaxcpt.train.loop does: this host's state when the count is unchanged, else host 0's
        it.set_state(hosts[jax.process_index()] if len(hosts) == jax.process_count() else hosts[0])
    seen = []
    for _ in range(int(steps)):
        batch = next(it)
        for row in range(batch["inputs"].shape[0]):
            mask = batch["loss_mask"][row] > 0
            seen += [[int(batch["source"][row]), int(i), int(t)]
                     for i, t in zip(batch["inputs"][row][mask], batch["targets"][row][mask])]
    hosts = gather_json(it.get_state())  # what a checkpoint stores
    with open(out, "w") as f:
        json.dump({"seen": seen, "hosts": hosts}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
