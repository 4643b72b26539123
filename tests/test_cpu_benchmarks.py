"""The CPU benchmarks run on the tiny shape: the load meter, XLA's per-op profile, jaxcpt's timed train step."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from train_throughput import CpuLoad  # noqa: E402

BURN = "import time\nwhile time.process_time() < 1.0: pass\nprint('done', flush=True)\ntime.sleep(60)"


def test_cpu_load_books_a_running_child_as_this_benchmark_not_as_other_load():
    load = CpuLoad()
    load.start()
    child = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # 1 s of CPU spent, still running
        time.sleep(0.05)
        info = load.stop()
    finally:
        child.kill()
        child.wait()
    assert info["this_process_cores"] * info["wall_s"] >= 0.9


def test_cpu_profile_sorts_the_time_of_forward_and_backward_beside_pytorchs_profile_of_the_same_step(tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_profile.py"), "--shape", "tiny", "--seq-len", "32",
                             "--batch", "2", "--calls", "1", "--vs-torch", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    for label in ("forward", "forward+backward"):
        groups = report["results"][label]["thread_s"]
        assert groups.get("matmul fusion", 0) > 0 and sum(groups.values()) > 0
        torch_groups = report["pytorch"]["results"][label]["self_s"]
        assert torch_groups.get("matmul", 0) > 0 and torch_groups.get("attention (sdpa)", 0) > 0
    assert "PyTorch (eager) forward+backward" in result.stdout
    assert report["cpu_load"]["cores"] >= 1 and report["machine"]["platform"] == "cpu"


def test_benchmarks_name_the_cpu_kind_its_matmul_features_and_the_commit():
    from train_throughput import cpu_info, git_commit

    info = cpu_info()
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    assert info["cpu"] in info["cpu_kind"]
    assert ("no AMX" in info["cpu_kind"]) == ("amx_bf16" not in flags)
    assert set(info["cpu_features"]) == {f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f",
                                                     "avx2", "fma") if f in flags}
    commit = subprocess.run(["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit().split("+")[0] == commit.strip()


@pytest.mark.slow  # ~40 s on 2 shared cores: the first two calls of the step each take seconds, then XLA's loss plans
def test_train_throughput_times_jaxcpts_own_train_step_on_the_tiny_shape(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "train_throughput.py"), "--shape", "tiny", "--seq-len", "32",
                             "--batch", "2", "--steps", "2", "--warmup", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    jaxcpt = report["results"]["jaxcpt"]
    assert not report["failed"] and jaxcpt["tokens_per_s"] > 0 and 0 < jaxcpt["last_loss"] < 100
    assert report["cpu_load_during_timed_steps"]["this_process_cores"] > 0
