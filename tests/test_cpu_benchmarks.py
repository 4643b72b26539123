"""The CPU benchmarks' own measuring: the load meter and XLA's per-op profile (tiny shape)."""

import json
import subprocess
import sys
import time
from pathlib import Path

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
