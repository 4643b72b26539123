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


def start_two_processes(args) -> list[subprocess.Popen]:
    """``jaxcpt`` in two JAX processes joined over loopback, 4 CPU devices each; ``args`` is the
    command line of both, or a function of the process id giving each its own."""
    args_for = args if callable(args) else (lambda process_id: args)
    port = free_port()
    procs = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
        distributed = ["distributed.initialize=true", f"distributed.coordinator_address=127.0.0.1:{port}",
                       "distributed.num_processes=2", f"distributed.process_id={process_id}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxcpt.cli", *args_for(process_id), *distributed], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def run_two_processes(args: list[str], timeout: int = 600) -> list[str]:
    return wait_all(start_two_processes(args), timeout)


def wait_all(procs: list[subprocess.Popen], timeout: int = 600, code: int = 0) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs):
        assert proc.returncode == code, output[-4000:]
    return outputs


def test_two_process_training_checkpoints_resumes_and_exports(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run = tmp_path / "run"
    overrides = tiny_overrides(run, corpora, steps=4, mesh="{fsdp: 8}") + [
        "checkpoint.every_steps=2", "export.final=true", "export.dtype=float32"]
    outputs = run_two_processes(["train", *overrides])
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]  # only process 0 reports
    assert sorted(train_losses(run)) == [1, 2, 3, 4]  # process 0 wrote each step once
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.isdigit()) == ["2", "4"]  # beside: tokenizers/
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


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_bitwise(tmp_path):
    import signal
    import time

    corpora = make_corpora(tmp_path / "data")
    steps = 40
    straight = tiny_overrides(tmp_path / "straight", corpora, steps=steps, mesh="{fsdp: 8}")
    run_two_processes(["train", *straight])
    expected = train_losses(tmp_path / "straight")

    run = tmp_path / "run"
    args = ["train", *tiny_overrides(run, corpora, steps=steps, mesh="{fsdp: 8}")]
    procs = start_two_processes(args)
    deadline = time.monotonic() + 600
    while not ((run / "metrics.jsonl").exists() and len(train_losses(run)) >= 3):
        assert all(p.poll() is None for p in procs), "a process exited before the signal"
        assert time.monotonic() < deadline, "timed out waiting for training steps"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    outputs = wait_all(procs, code=75)  # both exit 75: stopped early, run again to resume
    saved = sorted(int(name) for name in os.listdir(run / "checkpoints") if name.isdigit())
    assert len(saved) == 1 and saved[0] < steps, outputs[0][-2000:]
    assert f"saved checkpoint at step {saved[0]}" in outputs[0]
    assert max(train_losses(run)) == saved[0]
    data_state = json.loads((run / "checkpoints" / str(saved[0]) / "data" / "metadata").read_text())
    assert all(host["step"] == saved[0] for host in data_state["hosts"])  # both hosts saved the same step

    outputs = run_two_processes(args)
    assert f"resuming from {run / 'checkpoints' / str(saved[0])}" in outputs[0]
    got = train_losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in got] == [expected[s] for s in got]  # bitwise


def test_process_zero_decides_about_an_existing_export_target_for_every_host(tmp_path):
    """Per-host disks: only host 0's target holds an old export. Every host must raise, none may hang."""
    script = tmp_path / "export.py"
    script.write_text(f"""
import os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jaxcpt.errors import UserError
from jaxcpt.hf.convert import save_hf
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
model = init_model(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                               num_kv_heads=2), build_mesh({{"fsdp": -1}}))
target = os.path.join({str(tmp_path)!r}, "host" + sys.argv[2], "export")  # each host's own disk
if jax.process_index() == 0:
    os.makedirs(target)
    open(os.path.join(target, "old.txt"), "w").write("an earlier export")
try:
    save_hf(model, target)
except UserError as e:
    print("refused:", e)
    sys.exit(0)
print("wrote", target)
""")
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = wait_all(procs, timeout=300)
    assert all("refused:" in out and "exists and is not empty" in out for out in outputs), outputs
    assert not os.path.exists(tmp_path / "host1" / "export")
