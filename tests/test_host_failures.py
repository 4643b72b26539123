"""An error on one host stops every host within distributed.failure_timeout_seconds, each naming the host and error.

Two real JAX processes over loopback (gloo), as in test_multihost.py; only one of them meets the error.
"""

import os
import subprocess
import sys
import time

import pytest
from test_multihost import free_port, start_two_processes
from train_helpers import make_corpora, tiny_overrides

from test_data_fixtures import make_texts, write_jsonl

# A command added to the CLI for this test: process FAILING raises a UserError at its third
# step while the other one waits in the next collective (an allgather), as a training step would.
INJECTED = """
import sys, time
import numpy as np
from jaxcpt import cli
from jaxcpt.config import from_dict
from jaxcpt.sharding.distributed import DistributedConfig, initialize_distributed

address, process_id, failing, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
late = len(sys.argv) > 5  # the other host finishes first; the failing one fails afterwards


def add_arguments(parser):
    pass


def run(args):
    import jax
    from jax.experimental import multihost_utils
    from jaxcpt.errors import UserError

    initialize_distributed(from_dict(DistributedConfig, dict(
        initialize=True, coordinator_address=address, num_processes=2, process_id=process_id,
        failure_timeout_seconds=timeout)))
    if late:
        if jax.process_index() != failing:
            return 0  # done: waits for the others at exit
        time.sleep(2)
        raise UserError("could not write /runs/r/summary.json: no space left on device")
    for step in range(100000):
        if jax.process_index() == failing and step == 2:
            raise UserError("data file /data/part-00001.jsonl is missing on this host")
        multihost_utils.process_allgather(np.array([step]))
    return 0


cli.COMMANDS["inject"] = ("__main__", "raises on one host")
sys.exit(cli.main(["inject"]))
"""


def _wait_both(procs, limit: float) -> list[tuple[int, str, float]]:
    """(exit code, output, seconds until exit) of each process; kills both past ``limit`` seconds."""
    start, done = time.monotonic(), {}
    while len(done) < len(procs) and time.monotonic() - start < limit:
        for i, p in enumerate(procs):
            if i not in done and p.poll() is not None:
                done[i] = time.monotonic() - start
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate()[0] for p in procs]
    assert len(done) == len(procs), "a host did not stop:\n" + "\n----\n".join(o[-3000:] for o in outputs)
    return [(p.returncode, out, done[i]) for i, (p, out) in enumerate(zip(procs, outputs))]


def test_an_error_on_the_coordinator_host_stops_every_host_with_the_hosts_name_and_error(tmp_path):
    failing = 0  # the host that runs JAX's coordination service: the harder case (test_bad_input_... fails host 1)
    script = tmp_path / "inject.py"
    script.write_text(INJECTED)
    port, timeout = free_port(), 10.0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(failing), str(timeout)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = _wait_both(procs, limit=120)
    codes = [code for code, _, _ in results]
    assert codes[failing] == 2 and codes[1 - failing] == 4, results  # a user error there; "another host failed" here
    for _, output, _ in results:
        assert f"host {failing} of 2" in output and "failed: UserError: data file /data/part-00001.jsonl is missing" in output
    assert "because another host failed" in results[1 - failing][1]
    assert "Traceback" not in results[1 - failing][1]  # the other host's broken collective is not reported as news
    assert abs(results[0][2] - results[1][2]) < timeout  # both stopped, within the timeout of each other


@pytest.mark.slow
def test_a_host_that_finished_is_still_stopped_by_a_later_failure_on_another(tmp_path):
    """Host 1 returns 0 and waits at exit; host 0 then fails (say, writing the summary): host 1 must not sit in
    JAX's shutdown barrier for its 5 minutes, but exit 4 with host 0's error."""
    script = tmp_path / "inject.py"
    script.write_text(INJECTED)
    port, timeout = free_port(), 10.0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), "0", str(timeout), "late"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    (code0, out0, t0), (code1, out1, t1) = _wait_both(procs, limit=120)
    assert code0 == 2 and code1 == 4, (out0, out1)
    assert "host 0 of 2" in out1 and "no space left on device" in out1
    assert abs(t0 - t1) < timeout


@pytest.mark.slow
def test_bad_input_on_one_host_stops_both_training_hosts(tmp_path):
    """`jaxcpt train` on two processes; only host 1's data file holds a bad record (data.fatal_bad_input)."""
    corpora = make_corpora(tmp_path / "data")
    texts = make_texts(200, seed=3, tag="second")
    # one source of two files: host 0 reads the first, host 1 the second, whose 20th line is not JSON
    second = write_jsonl(str(tmp_path / "data" / "second.jsonl"), texts)
    lines = open(second).read().splitlines(keepends=True)
    lines[20] = '{"text": "a record cut off in the midd\n'
    open(second, "w").write("".join(lines))
    overrides = tiny_overrides(tmp_path / "run", corpora, steps=50, mesh="{fsdp: 8}")
    overrides = [o for o in overrides if not o.startswith("data.sources=")] + [
        f"data.sources=[{{name: general, paths: [{corpora['general']}, {second}], eval_documents: 8}}]",
        "data.fatal_bad_input=true", "distributed.failure_timeout_seconds=20"]
    results = _wait_both(start_two_processes(["train", *overrides]), limit=300)
    (code0, out0, t0), (code1, out1, t1) = results
    assert code1 == 2, out1[-3000:]  # the host that read the bad record: a user error
    assert code0 == 4, out0[-3000:]  # the other: stopped because host 1 failed
    for output in (out0, out1):
        assert "host 1 of 2" in output and "bad document" in output and "second.jsonl" in output
    assert abs(t0 - t1) < 20
