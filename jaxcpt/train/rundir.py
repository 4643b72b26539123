"""The run directory under real faults: one launch at a time, one directory for every host, whole files.

* **A lease** (``RUN/jaxcpt.lease``, and ``CHECKPOINTS/jaxcpt.lease`` when checkpoint.directory
  lies outside the run directory, e.g. on gs://): a JSON file naming the holder (host, pid,
  start time) with a heartbeat a thread refreshes every ``lock.heartbeat_s``. A second launch
  on the directory is refused with a message naming the holder; a lease whose heartbeat is
  older than ``lock.stale_after_s``, or whose holder is a dead process on this very host, is
  taken over. Only process 0 holds it; every host hears its answer.
* **The same checkpoint directory on every host**: process 0 writes a random token there and
  every other host must read it back, or every host stops with the fix (``check_shared``).
* **Whole files**: ``storage.write_atomically`` replaces a file so that a crash leaves the old
  version or the new one, never a torn mix.

Why a lease and not ``flock``: flock is advisory and local to one kernel (NFS maps it to NLM
locks that a crashed client may hold for minutes, and GCS has none). What each storage
guarantees for creating the lease when it is absent:

* local disks and NFSv3+: ``link(2)`` of a complete temporary file onto the lease's name is
  atomic on the server (the classic NFS-safe lock recipe; ``O_EXCL`` was not atomic on NFSv2),
  so of two launches exactly one creates it, and a reader never sees a half-written lease.
* gs:// with google-cloud-storage installed: an upload with ``if_generation_match=0`` (create
  only if absent) and refreshes / take-overs with ``if_generation_match=<generation read>``,
  so a refresh after a take-over fails instead of overwriting the new holder.
* other fsspec URLs (and gs:// without google-cloud-storage): write, then read back after a
  short pause and check the token is ours. Two launches within that pause can both win; a
  warning says so and names the package that makes it atomic.

A holder checks its own lease at every heartbeat. If another launch took it over (this
process was paused past ``stale_after_s``), ``lost`` is set, an error is printed, and the
loop stops at its next checkpoint instead of writing into the other run's directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time

from etils import epath

from jaxcpt.config import ConfigError, field
from jaxcpt.errors import UserError
from jaxcpt.train.storage import LEASE_NAME, is_remote, lease_file, write_atomically

log = logging.getLogger("jaxcpt.train")
SHARED_CHECK_NAME = ".jaxcpt-hosts-check"


@dataclasses.dataclass(frozen=True)
class LockConfig:
    enabled: bool = field(True, help="hold a lease on the run directory (and an outside checkpoint.directory) so that a "
                                     "second launch on it is refused; false only where something else guarantees one launch")
    heartbeat_s: float = field(30.0, help="seconds between refreshes of the lease's heartbeat (by a thread: long "
                                          "steps or compiles do not delay it)")
    stale_after_s: float = field(300.0, help="a lease whose heartbeat is older than this is stale and a new launch takes "
                                             "it over (a dead holder on the same host is taken over at once); keep it "
                                             "well above heartbeat_s and the clock skew between hosts")
    take_over: bool = field(False, help="take the lease even though its holder looks alive: only when you know that "
                                        "run is gone (e.g. its host was lost); pass it on the command line, not in a YAML")

    def validate(self) -> None:
        if self.heartbeat_s <= 0 or self.stale_after_s < 2 * self.heartbeat_s:
            raise ConfigError(f"lock.heartbeat_s ({self.heartbeat_s}) must be > 0 and lock.stale_after_s "
                              f"({self.stale_after_s}) at least twice it, or a live run's lease looks stale")


class RunDirectoryBusy(UserError):
    """Another launch holds the run directory's lease."""


# -- who holds a lease, and whether it is alive -----------------------------------------------
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:  # Linux: changes at every boot
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """A Linux process's start time in clock ticks since boot: with the pid, it names one process
    (a pid alone may be reused by another process after the holder died)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_record(token: str, started: float) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid), "boot_id": _boot_id(),
            "started": started, "heartbeat": time.time(), "token": token, "command": " ".join(sys.argv)[:300]}


def _dead_on_this_host(holder: dict) -> str | None:
    """Why the holder is certainly gone, judged on its own host; None when alive or elsewhere."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return "this host rebooted since"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass  # it exists under another user
    if holder.get("process_start") and _process_start(pid) not in (None, holder["process_start"]):
        return f"pid {pid} now belongs to another process"
    return None


def _describe(holder: dict, now: float) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    age = now - float(holder.get("heartbeat", 0))
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, running since {since}, last heartbeat "
            f"{age:.0f} s ago")


# -- the lease --------------------------------------------------------------------------------
class Lease:
    """This launch's hold on one directory (see the module docstring)."""

    def __init__(self, directory: epath.Path, cfg: LockConfig):
        self.directory = epath.Path(directory)
        self.path = self.directory / LEASE_NAME
        self.cfg = cfg
        self.file = None
        self.version = None
        self.token = secrets.token_hex(16)
        self.started = time.time()
        self.lost: str | None = None

    def acquire(self) -> None:
        """Take the lease, taking over a stale one; RunDirectoryBusy when a live launch holds it."""
        if not is_remote(self.directory):  # object stores have no directories to make
            self.directory.mkdir(parents=True, exist_ok=True)
        self.file = lease_file(self.path)
        for _ in range(10):  # each round either takes the lease or sees one that another launch just wrote
            record = json.dumps(_holder_record(self.token, self.started), indent=1)
            if self.file.create(record):
                self.version = self.file.read()[1]
                return
            text, version = self.file.read()
            if text is None:
                continue  # released meanwhile
            why = self._stale_because(text)
            if why is None:
                holder = json.loads(text)
                raise RunDirectoryBusy(
                    f"{self.directory} is in use by another launch ({_describe(holder, time.time())}; "
                    f"command: {holder.get('command', '?')}). Wait for it to finish or stop it. If it is gone, its "
                    f"lease {self.path} goes stale {self.cfg.stale_after_s:.0f} s after its last heartbeat "
                    "(lock.stale_after_s), or at once on its own host; to take over now, relaunch with "
                    "lock.take_over=true (only when you are sure that run is not writing)")
            if self.file.take_over(record, version):
                self.version = self.file.read()[1]
                print(f"warning: took over the lease {self.path}: {why}", flush=True)
                return
        raise RunDirectoryBusy(f"could not take the lease {self.path}: other launches keep taking it; start one only")

    def _stale_because(self, text: str) -> str | None:
        now = time.time()
        try:
            holder = json.loads(text)
            heartbeat = float(holder["heartbeat"])
        except (ValueError, KeyError, TypeError):
            return f"its content is not a lease ({text[:80]!r})"  # written by something else, or damaged
        if self.cfg.take_over:
            return f"lock.take_over=true (the holder was {_describe(holder, now)})"
        dead = _dead_on_this_host(holder)
        if dead:
            return f"its holder ({_describe(holder, now)}) is dead: {dead}"
        if now - heartbeat > self.cfg.stale_after_s:
            return f"its holder ({_describe(holder, now)}) stopped its heartbeat more than {self.cfg.stale_after_s:.0f} s ago"
        return None

    def refresh(self) -> None:
        if self.lost:
            return
        record = json.dumps(_holder_record(self.token, self.started), indent=1)
        try:
            ok = self.file.refresh(record, self.version)
        except OSError as e:  # a storage hiccup: try again at the next heartbeat
            log.warning("could not refresh the lease %s (%s)", self.path, e)
            return
        if ok:
            self.version = self.file.read()[1]
            return
        text = self.file.read()[0]
        try:
            holder = _describe(json.loads(text), time.time()) if text else "nobody"
        except ValueError:
            holder = "unreadable content"
        self.lost = f"the lease {self.path} was taken over by another launch (now held by {holder})"
        print(f"error: {self.lost}; this run stops at its next checkpoint", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self.file is not None and self.version is not None and not self.lost:
            try:
                self.file.delete(self.version)
            except OSError as e:
                log.warning("could not remove the lease %s (%s); the next launch takes it over once stale", self.path, e)
        self.version = None


class RunDirectoryLock:
    """The leases of one launch and the thread that keeps their heartbeats; a context manager.

    Every process constructs it; process 0 holds the leases, and its answer (taken, or the
    refusal) reaches every host, so a refused pod stops on every host with the same message.
    """

    def __init__(self, directories: list[epath.Path], cfg: LockConfig, writer: bool):
        self.cfg = cfg
        self.leases = [Lease(d, cfg) for d in directories] if (writer and cfg.enabled) else []
        self._stop = threading.Event()
        self._thread = None

    @property
    def lost(self) -> str | None:
        return next((lease.lost for lease in self.leases if lease.lost), None)

    def __enter__(self) -> "RunDirectoryLock":
        from jaxcpt.sharding.distributed import gather_json

        refusal = None
        try:
            for lease in self.leases:
                lease.acquire()
        except UserError as e:
            refusal = str(e)
        except Exception as e:  # noqa: BLE001 - e.g. no permission: every host must hear it, or the others hang
            refusal = f"cannot take the lease in {lease.directory} ({e!r}); check that the directory is writable"
        refusal = gather_json(refusal)[0]  # process 0's answer on every host
        if refusal is not None:
            self._release()
            raise RunDirectoryBusy(refusal)
        if self.leases:
            self._thread = threading.Thread(target=self._heartbeat, name="jaxcpt-lease", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_s):
            for lease in self.leases:
                try:
                    lease.refresh()
                except Exception as e:  # noqa: BLE001 - a transient storage error: the next heartbeat retries
                    log.warning("could not refresh the lease %s (%r)", lease.path, e)

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for lease in self.leases:
            lease.release()


def lease_directories(run_dir: epath.Path, checkpoint_dir: epath.Path) -> list[epath.Path]:
    """The run directory, and the checkpoint directory when it lies outside it (another disk, a bucket)."""
    run = os.path.abspath(str(run_dir))
    ckpt = str(checkpoint_dir) if is_remote(checkpoint_dir) else os.path.abspath(str(checkpoint_dir))
    inside = not is_remote(checkpoint_dir) and (ckpt == run or ckpt.startswith(run.rstrip("/") + "/"))
    return [epath.Path(run)] + ([] if inside else [epath.Path(ckpt)])


# -- every host sees the same checkpoint directory --------------------------------------------
def check_shared(checkpoint_dir: epath.Path) -> None:
    """Stop on every host unless all of them see the same ``checkpoint_dir``.

    Each host decides resume-or-fresh from what it sees there; with node-local directories
    host 0 would resume while the others start fresh. Process 0 writes a random token, every
    host reads it after process 0's answer (a collective, so also a barrier), and all hosts
    learn which of them did not see it.
    """
    import jax

    from jaxcpt.sharding.distributed import gather_json

    if jax.process_count() == 1:
        return
    path = epath.Path(checkpoint_dir) / SHARED_CHECK_NAME
    token = None
    if jax.process_index() == 0:
        token = secrets.token_hex(16)
        epath.Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(path, token)
    token = gather_json(token)[0]  # every host waits here until process 0 has written it
    try:
        seen = path.read_text().strip() == token
    except (FileNotFoundError, OSError):
        seen = False
    seen_by = gather_json([socket.gethostname(), seen, str(checkpoint_dir)])  # and here until every host has read it
    if jax.process_index() == 0:
        path.unlink(missing_ok=True)
    blind = [f"process {i} ({host}, looking in {where})" for i, (host, ok, where) in enumerate(seen_by) if not ok]
    if blind:
        raise UserError(
            f"the checkpoint directory is not shared between hosts: a token process 0 ({seen_by[0][0]}) wrote to "
            f"{seen_by[0][2]} is not visible to {', '.join(blind)}. Every host must see the same checkpoint "
            "directory, or each decides on its own whether to resume. Put it on shared storage: "
            "checkpoint.directory=gs://BUCKET/RUN/checkpoints, or an NFS path mounted at the same place on every host")
