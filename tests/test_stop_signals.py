"""A hang-up (a foreground ssh session dropped) stops a run like SIGTERM: it saves, then exits 75 (stopped early)."""

import os
import pty
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import make_corpora, tiny_overrides, train_losses

from jaxcpt.exit_codes import EXIT_STOPPED_EARLY

# The signal path alone, in a child process whose stdout and stderr are a terminal that goes away.
HANGUP = """
import os, signal, sys, time
from jaxcpt.train.signals import StopRequests

stop = StopRequests(check_every=1)
stop.install()
print("ready", flush=True)
for _ in range(600):  # until the test hangs up
    if stop.should_stop(0):
        break
    time.sleep(0.1)
assert stop.signal == signal.SIGHUP
for _ in range(100):
    print("a progress line to the terminal that is gone", flush=True)  # EIO, unless pointed away from it
open(sys.argv[1], "w").write("stopped cleanly")
"""


def _read_until(controller: int, text: bytes, proc) -> None:
    seen = b""
    while text not in seen:
        assert proc.poll() is None, seen
        seen += os.read(controller, 4096)


def test_sighup_asks_for_a_stop_and_later_output_to_the_dead_terminal_does_not_crash(tmp_path):
    marker = tmp_path / "marker"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", HANGUP, str(marker)], stdin=terminal, stdout=terminal,
                            stderr=terminal, start_new_session=True)
    os.close(terminal)
    _read_until(controller, b"ready", proc)
    os.close(controller)  # the ssh session is gone: writes to its terminal now fail ...
    proc.send_signal(signal.SIGHUP)  # ... and its processes are hung up
    assert proc.wait(timeout=120) == 0
    assert marker.read_text() == "stopped cleanly"


@pytest.mark.slow
def test_sighup_to_a_foreground_run_saves_a_checkpoint_and_exits_75(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run_dir = tmp_path / "run"
    controller, terminal = pty.openpty()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "jaxcpt.cli", "train", *tiny_overrides(run_dir, corpora, steps=500)],
                            env=env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    start = time.monotonic()
    while not ((run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 3):
        try:
            os.read(controller, 65536)  # keep the terminal drained, as a user's would be
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() - start < 300, "the run ended before the hang-up"
        time.sleep(0.05)
    # The kernel hangs up the session's processes as the terminal goes; a step line written between the
    # two by this fast tiny run would hit a closed terminal before any handler ran, so signal first.
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    os.close(controller)  # ... and the terminal is gone: later writes would raise EIO
    assert proc.wait(timeout=120) == EXIT_STOPPED_EARLY
    saved = sorted(int(name) for name in os.listdir(run_dir / "checkpoints") if name.isdigit())
    assert saved and saved[-1] == max(train_losses(run_dir)) < 500
