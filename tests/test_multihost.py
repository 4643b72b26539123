"""Two real JAX processes on this machine (4 CPU devices each, gloo collectives over loopback).

They exercise what one process cannot: per-host data, agreement on stopping, Orbax
multi-process saving, and an HF export whose arrays span both processes' devices.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from train_helpers import make_corpora, tiny_overrides, train_losses

from jaxcpt.cli import main

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(args: list[str], timeout: int = 600) -> list[str]:
    port = free_port()
    procs = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
        distributed = ["distributed.initialize=true", f"distributed.coordinator_address=127.0.0.1:{port}",
                       "distributed.num_processes=2", f"distributed.process_id={process_id}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxcpt.cli", *args, *distributed], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def test_two_process_training_checkpoints_resumes_and_exports(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run = tmp_path / "run"
    overrides = tiny_overrides(run, corpora, steps=4, mesh="{fsdp: 8}") + [
        "checkpoint.every_steps=2", "export.final=true", "export.dtype=float32"]
    outputs = run_two_processes(["train", *overrides])
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]  # only process 0 reports
    assert sorted(train_losses(run)) == [1, 2, 3, 4]  # process 0 wrote each step once
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    data_state = json.loads((run / "checkpoints" / "4" / "data" / "metadata").read_text())  # Orbax's JSON item
    assert len(data_state["hosts"]) == 2 and data_state["hosts"][0] != data_state["hosts"][1]  # one per host

    # the export gathered parameters sharded over both processes' devices: compare it with a
    # single-process export of the same checkpoint
    assert main(["export-hf", str(run / "checkpoints" / "4"), "--out", str(tmp_path / "single"), "--dtype", "float32"]) == 0
    multi, single = load_file(run / "hf" / "step_4" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert multi.keys() == single.keys()
    for key in multi:
        np.testing.assert_array_equal(multi[key], single[key])

    # resume on two processes: each host continues its own data stream
    outputs = run_two_processes(["train", *overrides[:-3], "train.steps=6", "checkpoint.every_steps=2", "export.final=false"])
    assert "resuming from" in outputs[0]
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5, 6]
