"""The run directory with real processes: a second `jaxcpt train` on a directory in use, a killed holder,
a torn metrics line, and two JAX processes (gloo over loopback) that do not share their directories."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from train_helpers import make_corpora, run_cli, tiny_overrides, train_losses, wait_for

pytestmark = pytest.mark.slow


def test_second_train_is_refused_naming_the_holder_and_a_killed_holders_lease_is_taken_over(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", *tiny_overrides(run, corpora, steps=100_000), "checkpoint.every_steps=2"]
    holder = run_cli(args)
    try:
        wait_for(lambda: (run / "checkpoints" / "2" / "state").is_dir(), holder, timeout=300)
        started = time.monotonic()
        second = run_cli(args)
        try:
            output = second.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:  # not refused: it is training too
            second.kill()
            raise
        refused_after = time.monotonic() - started
        assert second.returncode == 2, output
        assert f"is in use by another launch (host {socket.gethostname()}, pid {holder.pid}, running since" in output
        assert "lock.take_over=true" in output
        assert "parameters |" not in output  # refused before set-up: nothing compiled, nothing written
        assert holder.poll() is None  # the first run is untouched and still training
        print(f"second launch refused after {refused_after:.1f} s")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # The killed holder's lease stays behind; a node crash also tore the last metrics line.
    assert json.loads((run / "jaxcpt.lease").read_text())["pid"] == holder.pid
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 99999, "loss": 2.')
    saved = max(int(name) for name in os.listdir(run / "checkpoints") if name.isdigit())
    resumed = run_cli([*args, f"train.steps={saved + 3}", "export.hf_every=1", "export.keep_last=2",
                       "export.final=true", "export.dtype=float32"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "took over the lease" in output and f"process {holder.pid} is gone" in output
    assert "metrics.jsonl line" in output and "a torn last record" in output
    assert sorted(train_losses(run)) == list(range(1, saved + 4))  # each step once, the torn record gone
    assert not (run / "jaxcpt.lease").exists()  # released at the end
    # hf_every=1 exported saved+1 and saved+2, the end saved+3; keep_last=2 kept the newest two
    assert sorted(os.listdir(run / "hf")) == [f"step_{saved + 2}", f"step_{saved + 3}"]


# -- two JAX processes ----------------------------------------------------------------------------
def _two_processes(args_for):
    """``jaxcpt`` in two processes joined over loopback; ``args_for(i)`` gives process i's arguments."""
    from test_multihost import start_two_processes

    procs = start_two_processes(args_for)
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return [p.returncode for p in procs], outputs


def test_hosts_with_their_own_checkpoint_directories_all_stop_naming_the_fix(tmp_path):
    corpora = make_corpora(tmp_path / "data")

    def node_local(i):  # each host's own disk, as on TPU VMs without a bucket
        return ["train", *tiny_overrides(tmp_path / f"host{i}" / "run", corpora, steps=2, mesh="{fsdp: 8}")]

    codes, outputs = _two_processes(node_local)
    assert codes == [2, 2], outputs
    for output in outputs:
        assert "the checkpoint directory is not shared between hosts" in output
        assert f"wrote to {tmp_path / 'host0' / 'run' / 'checkpoints'} is not visible to process 1" in output
        assert f"looking in {tmp_path / 'host1' / 'run' / 'checkpoints'}" in output and "checkpoint.directory=gs://" in output
    assert not (tmp_path / "host0" / "run" / "metrics.jsonl").exists()  # stopped before anything was written


def test_every_host_hears_the_refusal_when_the_run_directory_is_in_use(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 60, "heartbeat": time.time(),
             "token": "the-test", "command": "jaxcpt train (the test process)"}
    (run / "jaxcpt.lease").write_text(json.dumps(lease))  # held by this live process, heartbeat fresh
    codes, outputs = _two_processes(lambda i: ["train", *tiny_overrides(run, corpora, steps=2, mesh="{fsdp: 8}")])
    assert codes == [2, 2], outputs
    for output in outputs:
        assert f"in use by another launch (host {socket.gethostname()}, pid {os.getpid()}" in output
