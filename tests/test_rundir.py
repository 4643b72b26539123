"""The run directory under real faults: torn metrics, two launches (a lease), closing a run, exports.

The lease tests run real processes: the holder is another process (the test's own pid counts
as a live holder on this host; a finished child's pid as a dead one).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
from etils import epath

from jaxcpt.errors import UserError
from jaxcpt.train.metrics import read_metrics, truncate_metrics
from jaxcpt.train.resume import restore_eval_history

TORN = '{"kind": "train", "step": 7, "loss": 3.1'  # what a crash mid-write leaves: no closing brace, no newline


def _write_metrics(run_dir, records, tail=""):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _records(steps, kind="train"):
    return [{"kind": kind, "step": s, "time": 0.0, "loss": 1.0 / s} for s in steps]


# -- #20.4 torn metrics --------------------------------------------------------------------------
def test_truncate_metrics_skips_a_torn_last_line_and_warns_naming_file_and_line(tmp_path, capsys):
    _write_metrics(tmp_path, _records([1, 2, 3, 4]), TORN)
    truncate_metrics(epath.Path(tmp_path), 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    out = capsys.readouterr().out
    assert f"{tmp_path / 'metrics.jsonl'} line 5: a torn last record" in out
    assert not [p for p in os.listdir(tmp_path) if p != "metrics.jsonl"]  # the temporary file was renamed in


def test_restore_eval_history_skips_a_torn_last_line(tmp_path, capsys):
    _write_metrics(tmp_path, _records([1, 2]), TORN)
    baseline = {"kind": "eval", "step": 0, "sources": {"general": {"loss": 5.0}}}
    restore_eval_history(epath.Path(tmp_path), [baseline])
    assert read_metrics(tmp_path) == [baseline, *_records([1, 2])]
    assert "torn last record" in capsys.readouterr().out


def test_a_damaged_line_before_the_end_is_an_error_naming_file_and_line(tmp_path):
    _write_metrics(tmp_path, _records([1]), TORN + "\n" + json.dumps(_records([2])[0]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not JSON"):
        truncate_metrics(epath.Path(tmp_path), 5)


def test_fresh_start_moves_existing_metrics_aside_instead_of_deleting_them(tmp_path, capsys):
    from jaxcpt.train.metrics import set_aside_metrics

    _write_metrics(tmp_path, _records(range(1, 6)))
    aside = set_aside_metrics(epath.Path(tmp_path), epath.Path(tmp_path / "typo"))
    assert not (tmp_path / "metrics.jsonl").exists()
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    assert "records up to step 5" in out and str(tmp_path / "typo") in out and "checkpoint.directory" in out


# -- #20.5 the lease -----------------------------------------------------------------------------
# (jaxcpt.train.rundir is imported inside each test, so that on older code each test fails on its own.)
def _fast(**changes):
    from jaxcpt.train.rundir import LockConfig

    return LockConfig(heartbeat_s=0.2, stale_after_s=2.0, **changes)


def _lease_of(pid, heartbeat_age, host=None):
    from jaxcpt.train import rundir

    return {"host": host or socket.gethostname(), "pid": pid, "process_start": rundir._process_start(pid),
            "boot_id": rundir._boot_id(), "started": time.time() - 3600, "heartbeat": time.time() - heartbeat_age,
            "token": "someone-else", "command": "jaxcpt train --config other.yaml"}


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_fresh_lease_of_a_live_process_is_refused_naming_the_holder(tmp_path):
    from jaxcpt.train import rundir

    (tmp_path / "jaxcpt.lease").write_text(json.dumps(_lease_of(os.getppid(), heartbeat_age=1)))
    with pytest.raises(rundir.RunDirectoryBusy) as refused:
        with rundir.RunDirectoryLock([epath.Path(tmp_path)], _fast(), writer=True):
            pass
    message = str(refused.value)
    assert f"host {socket.gethostname()}, pid {os.getppid()}" in message and "running since" in message
    assert "lock.take_over=true" in message and "lock.stale_after_s" in message
    assert json.loads((tmp_path / "jaxcpt.lease").read_text())["token"] == "someone-else"  # untouched


@pytest.mark.parametrize("holder", ["dead pid on this host", "old heartbeat on another host"])
def test_a_stale_lease_is_taken_over_and_released_at_the_end(tmp_path, capsys, holder):
    from jaxcpt.train import rundir

    if holder == "dead pid on this host":
        lease = _lease_of(_dead_pid(), heartbeat_age=0)  # fresh heartbeat, but its process is gone
    else:
        lease = _lease_of(os.getppid(), heartbeat_age=60, host="some-other-host")
    (tmp_path / "jaxcpt.lease").write_text(json.dumps(lease))
    with rundir.RunDirectoryLock([epath.Path(tmp_path)], _fast(), writer=True):
        held = json.loads((tmp_path / "jaxcpt.lease").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        first = held["heartbeat"]
        time.sleep(0.7)
        assert json.loads((tmp_path / "jaxcpt.lease").read_text())["heartbeat"] > first  # the heartbeat runs
    assert "took over the lease" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # released, and no temporary files left


def test_only_one_of_several_launches_takes_over_a_stale_lease(tmp_path):
    (tmp_path / "jaxcpt.lease").write_text(json.dumps(_lease_of(os.getppid(), heartbeat_age=60, host="gone")))
    script = ("import sys, time; from etils import epath; from jaxcpt.train import rundir\n"
              "lease = rundir.Lease(epath.Path(sys.argv[1]), rundir.LockConfig(heartbeat_s=1, stale_after_s=5))\n"
              "try:\n    lease.acquire(); print('took', flush=True); time.sleep(3)\n"
              "except rundir.RunDirectoryBusy as e:\n    print('refused', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip().splitlines()[-1] for p in procs)
    assert outcomes == ["refused", "refused", "refused", "took"], outcomes


def test_a_holder_whose_lease_was_taken_over_notices_at_its_next_heartbeat(tmp_path, capsys):
    from jaxcpt.train import rundir

    lease = rundir.Lease(epath.Path(tmp_path), _fast())
    lease.acquire()
    taker = rundir.Lease(epath.Path(tmp_path), _fast(take_over=True))
    taker.acquire()
    lease.refresh()
    assert lease.lost and "taken over by another launch" in lease.lost
    assert json.loads((tmp_path / "jaxcpt.lease").read_text())["token"] == taker.token  # not overwritten
    lease.release()  # must not delete the new holder's lease
    assert (tmp_path / "jaxcpt.lease").exists()


def test_a_run_whose_lease_was_taken_over_stops_before_its_next_save():
    from jaxcpt.train import rundir
    from jaxcpt.train.loop import save

    saved = []
    lock = types.SimpleNamespace(lost="the lease /r/jaxcpt.lease was taken over by another launch (now held by host b)")
    run = types.SimpleNamespace(lock=lock, setup=None, ckpt=types.SimpleNamespace(
        should_save=lambda step: True, save=lambda *a, **k: saved.append(a)))
    with pytest.raises(rundir.RunDirectoryBusy, match="taken over by another launch.*stopped before saving step 8"):
        save(run, 8)
    assert saved == []


def test_lease_directories_add_a_checkpoint_directory_outside_the_run_directory(tmp_path):
    from jaxcpt.train import rundir

    run = epath.Path(tmp_path / "run")
    assert rundir.lease_directories(run, run / "checkpoints") == [run]
    assert rundir.lease_directories(run, epath.Path("gs://bucket/ckpt")) == [run, epath.Path("gs://bucket/ckpt")]


def test_a_gs_lease_without_google_cloud_storage_is_best_effort_and_still_refuses(monkeypatch, capsys):
    from jaxcpt.train import rundir

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    for protocol in ("gs", "gcs"):  # an in-memory stand-in for GCS (no network here); etils asks for "gcs"
        fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
    from jaxcpt.train import storage

    monkeypatch.setattr(storage._BestEffortLeaseFile, "settle_s", 0.01)
    directory = epath.Path("gs://bucket/run-a")
    first = rundir.Lease(directory, _fast())
    first.acquire()
    assert "install google-cloud-storage" in capsys.readouterr().out
    with pytest.raises(rundir.RunDirectoryBusy, match="in use by another launch"):
        rundir.Lease(directory, _fast()).acquire()
    first.release()
    assert not (directory / "jaxcpt.lease").exists()


# -- #20.13 Run.close ----------------------------------------------------------------------------
def test_run_close_closes_everything_even_when_the_checkpointer_raises():
    from jaxcpt.train.loop import Run

    closed = []

    def closer(name, fail=False):
        def close():
            closed.append(name)
            if fail:
                raise OSError(f"{name} failed")
        return close

    setup = types.SimpleNamespace(data_iter=types.SimpleNamespace(close=closer("grain workers")),
                                  close=closer("scratch directories"))
    run = Run(setup=setup, ckpt=types.SimpleNamespace(close=closer("checkpointer", fail=True)), state={}, start_step=0,
              writer=types.SimpleNamespace(close=closer("metrics")), stop=types.SimpleNamespace(uninstall=closer("signals")),
              files={}, export_tokenizer=None, eval_history=[])
    with pytest.raises(OSError, match="checkpointer failed"):
        run.close()
    assert sorted(closed) == ["checkpointer", "grain workers", "metrics", "scratch directories", "signals"]


# -- #20.10 exports ------------------------------------------------------------------------------
def test_prune_exports_keeps_the_newest_steps_and_everything_else(tmp_path):
    from jaxcpt.hf.run_export import prune_exports

    for name in ("step_2", "step_4", "step_4-adapter", "step_10", "step_10-adapter", "base", "notes"):
        (tmp_path / name).mkdir()
    removed = prune_exports(str(tmp_path), keep_last=2)
    assert sorted(os.path.basename(p) for p in removed) == ["step_2"]
    assert sorted(os.listdir(tmp_path)) == ["base", "notes", "step_10", "step_10-adapter", "step_4", "step_4-adapter"]
    prune_exports(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["base", "notes", "step_10", "step_10-adapter"]


def test_export_keep_last_is_a_typed_key_that_defaults_to_keeping_every_export():
    from jaxcpt.config import ConfigError
    from jaxcpt.train.config import TrainConfig, load_train_config

    assert TrainConfig().export.keep_last == 0 and TrainConfig().lock.enabled
    with pytest.raises(ConfigError, match="keep_last"):
        load_train_config(None, ["export.keep_last=two"])
    with pytest.raises(ConfigError, match="stale_after_s"):
        load_train_config(None, ["lock.heartbeat_s=60", "lock.stale_after_s=60"])


class _FakeGCS:
    """google.cloud.storage's calls the lease makes, over a dict {name: (generation, text)}, with GCS's
    generation preconditions (no network or package here; the real API has the same names)."""

    def __init__(self):
        self.objects, self.next_generation = {}, 1

    def modules(self):
        exceptions = types.ModuleType("google.api_core.exceptions")
        exceptions.PreconditionFailed = type("PreconditionFailed", (Exception,), {})
        exceptions.NotFound = type("NotFound", (Exception,), {})
        store = self

        class Blob:
            def __init__(self, name, generation=None):
                self.name, self.generation = name, generation

            def _check(self, if_generation_match):
                current = store.objects.get(self.name, (0, None))[0]
                if if_generation_match is not None and current != if_generation_match:
                    raise exceptions.PreconditionFailed(f"{self.name}: generation {current}")

            def upload_from_string(self, text, content_type=None, if_generation_match=None):
                self._check(if_generation_match)
                store.objects[self.name] = (store.next_generation, text)
                store.next_generation += 1

            def download_as_text(self, if_generation_match=None):
                if self.name not in store.objects:
                    raise exceptions.NotFound(self.name)
                self._check(if_generation_match)
                return store.objects[self.name][1]

            def delete(self, if_generation_match=None):
                if self.name not in store.objects:
                    raise exceptions.NotFound(self.name)
                self._check(if_generation_match)
                del store.objects[self.name]

        class Bucket:
            def blob(self, name):
                return Blob(name)

            def get_blob(self, name):
                return Blob(name, store.objects[name][0]) if name in store.objects else None

        storage = types.ModuleType("google.cloud.storage")
        storage.Client = lambda: types.SimpleNamespace(bucket=lambda name: Bucket())
        google, cloud, api_core = (types.ModuleType(n) for n in ("google", "google.cloud", "google.api_core"))
        google.cloud, google.api_core, cloud.storage, api_core.exceptions = cloud, api_core, storage, exceptions
        return {"google": google, "google.cloud": cloud, "google.cloud.storage": storage,
                "google.api_core": api_core, "google.api_core.exceptions": exceptions}


def test_a_gs_lease_uses_generation_preconditions_so_a_late_refresh_cannot_clobber_a_take_over(monkeypatch):
    from jaxcpt.train import rundir

    gcs = _FakeGCS()
    for name, module in gcs.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    directory = epath.Path("gs://bucket/runs/a/checkpoints")
    holder = rundir.Lease(directory, _fast())
    holder.acquire()
    assert json.loads(gcs.objects["runs/a/checkpoints/jaxcpt.lease"][1])["token"] == holder.token
    with pytest.raises(rundir.RunDirectoryBusy, match="in use by another launch"):
        rundir.Lease(directory, _fast()).acquire()
    holder.refresh()  # a heartbeat: the generation moves on
    taker = rundir.Lease(directory, _fast(take_over=True))
    taker.acquire()
    holder.refresh()  # precondition on the generation it read: fails, so the holder knows
    assert holder.lost and json.loads(gcs.objects["runs/a/checkpoints/jaxcpt.lease"][1])["token"] == taker.token
    holder.release()  # leaves the taker's lease alone
    taker.release()
    assert gcs.objects == {}
