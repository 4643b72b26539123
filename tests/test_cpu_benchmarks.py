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


def test_cpu_profile_sorts_the_thread_time_of_forward_and_backward(tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_profile.py"), "--shape", "tiny", "--seq-len", "32",
                             "--batch", "2", "--calls", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    for label in ("forward", "forward+backward"):
        groups = report["results"][label]["thread_s"]
        assert groups.get("matmul fusion", 0) > 0 and sum(groups.values()) > 0
    assert report["cpu_load"]["cores"] >= 1 and report["machine"]["platform"] == "cpu"


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
