"""One host's error stops every host, within a timeout, with the same message everywhere.

Without this, an error on one host (a bad record, a file missing there, an export that
cannot write) ends that process while the others wait in the next collective: a device
all-reduce, an ``allgather`` of flags, a checkpoint barrier. They hang until JAX's own
timeouts (a failed host's exit even waits ``shutdown_timeout`` = 5 minutes in JAX's
shutdown barrier first), and their logs say nothing about why.

Why not an error flag agreed at the step boundary: a host blocked in a collective never
reaches the next boundary, and an agreement every step would make every host wait for
the slowest at every step. Instead the error travels outside the devices, through JAX's
coordination service (the key-value store that ``jax.distributed.initialize`` starts,
the one the preemption notices use):

- ``announce(error)`` on the failing host puts ``jaxcpt/failed/<process>`` = "host i of n
  (hostname): Type: message" in the store, as soon as the error is caught and before any
  cleanup that might itself block.
- A daemon thread on every host (``watch``) reads that directory once per poll interval;
  it runs while the main thread is blocked in a collective (which releases the GIL).
  When it finds another host's failure, it prints it and stops this host.
- Every host, failing or not, then meets the others at one barrier, at most
  ``distributed.failure_timeout_seconds`` (a host that is hung or already gone cannot
  arrive), and ends with ``os._exit``: a normal exit would run JAX's shutdown barrier,
  which waits for the hosts that are stuck. The failing host exits with its own code
  (2 for a config or input error, 1 for a crash); the others with ``EXIT_OTHER_HOST_FAILED``.
  A checkpoint being written at that moment is left unfinished and is never used: Orbax
  only finalises complete ones, and the next run cleans the temporary directory.

A host that dies without a word (kill -9, the kernel's OOM killer) is JAX's to notice: its
heartbeats stop, and after ``distributed.heartbeat_timeout_seconds`` the coordination
service ends every process.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

from jaxcpt.exit_codes import EXIT_CRASH, EXIT_OTHER_HOST_FAILED, EXIT_USER_ERROR

_KEY_DIR = "jaxcpt/failed/"
_BARRIER = "jaxcpt_failure_exit"
_NORMAL_EXIT_BARRIER = "jaxcpt_normal_exit"
_NORMAL_EXIT_WAIT_MS = 300_000  # as long as JAX's shutdown barrier waits (shutdown_timeout_seconds' default)
_MAX_MESSAGE = 4000  # characters of an error message put in the store


def _client():
    from jax._src import distributed  # the key-value store and barriers of the public jax.distributed client

    return distributed.global_state.client


def exit_code_for(error: BaseException) -> int:
    from jaxcpt.errors import UserError

    if isinstance(error, UserError):
        return EXIT_USER_ERROR
    return int(getattr(error, "exit_code", EXIT_CRASH))


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Watch:
    """The state of this process's failure handling; one per process (module-level ``_watch``)."""

    def __init__(self, client, process_index: int, process_count: int, timeout_s: float):
        self.client = client
        self.process_index, self.process_count = process_index, process_count
        self.timeout_s = float(timeout_s)
        self.poll_s = min(1.0, self.timeout_s / 10)
        self.host = f"host {process_index} of {process_count} ({socket.gethostname()}, pid {os.getpid()})"
        self.failed: str | None = None  # this host's announced failure
        self.stopping = threading.Lock()  # held by whoever ends the process
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxcpt-failure-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        # atexit runs in reverse order of registration: this runs before JAX's own atexit
        # shuts the client down (and the poller with it).
        atexit.register(self.close)

    def close(self) -> None:
        """At a normal exit: wait, still watching, until every host exits too (as JAX's own shutdown barrier
        would, blind), so that a host that fails after this one finished still stops it within the timeout."""
        if self.failed is None and not self.stopping.locked():
            try:
                self.client.wait_at_barrier(_NORMAL_EXIT_BARRIER, _NORMAL_EXIT_WAIT_MS)
            except Exception:  # noqa: BLE001 - a host that died: JAX's shutdown reports it
                pass
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll_s)

    def others_failed(self) -> list[tuple[int, str]]:
        try:
            entries = self.client.key_value_dir_get(_KEY_DIR)
        except Exception:  # noqa: BLE001 - the service is going away (normal exit, or the coordinator died)
            return []
        failures = []
        for key, value in entries:
            index = int(key.rsplit("/", 1)[-1])
            if index != self.process_index:
                failures.append((index, value))
        return sorted(failures)

    def _run(self) -> None:
        while not self._done.wait(self.poll_s):
            if self.failed is not None:
                return  # this host failed: it is ending itself
            failures = self.others_failed()
            if failures and self.stopping.acquire(blocking=False):
                if self.failed is not None:  # this host failed meanwhile: its own path ends it
                    self.stopping.release()
                    return
                for _, message in failures:
                    _print(f"jaxcpt: {message}")
                _print(f"jaxcpt: stopping {self.host} because another host failed (see above); exit code "
                       f"{EXIT_OTHER_HOST_FAILED}")
                self._meet_and_exit(EXIT_OTHER_HOST_FAILED)

    def announce(self, error: BaseException | str) -> None:
        if self.failed is not None or self.stopping.locked():  # announced, or being stopped by another host
            return
        text = error if isinstance(error, str) else describe(error)
        self.failed = f"{self.host} failed: {text}"[:_MAX_MESSAGE]
        try:
            self.client.key_value_set(f"{_KEY_DIR}{self.process_index}", self.failed, allow_overwrite=True)
        except Exception as e:  # noqa: BLE001 - still stop this host; the others fall back to JAX's timeouts
            _print(f"jaxcpt: could not tell the other hosts about this failure ({e})")
        # This host's cleanup (closing the checkpoint manager, data workers) may itself wait
        # on the hosts that are stopping: bound it.
        code = exit_code_for(error) if isinstance(error, BaseException) else EXIT_CRASH
        threading.Thread(target=self._deadline, args=(code,), name="jaxcpt-failure-deadline", daemon=True).start()

    def _deadline(self, code: int) -> None:
        # Half the timeout for cleanup, so this host still reaches the barrier before the others give up on it.
        time.sleep(self.timeout_s / 2)
        if self.stopping.acquire(blocking=False):
            _print(f"jaxcpt: {self.failed}; cleanup took over {self.timeout_s / 2:g} s (half of "
                   f"distributed.failure_timeout_seconds): stopping every host (this one exits with code {code})")
            self._meet_and_exit(code)

    def fail(self, code: int) -> None:
        """End this (failed) process with ``code`` once the other hosts know, or the timeout passed."""
        if self.stopping.acquire(blocking=False):
            for _, message in self.others_failed():  # this error may only be the echo of theirs
                _print(f"jaxcpt: {message}")
            _print(f"jaxcpt: {self.failed}; stopping every host (this one exits with code {code})")
            self._meet_and_exit(code)
        while True:  # the deadline or the watcher is already ending the process
            time.sleep(60)

    def _meet_and_exit(self, code: int) -> None:
        try:
            self.client.wait_at_barrier(_BARRIER, int(self.timeout_s * 1000))
        except Exception as e:  # noqa: BLE001 - a host that is hung or gone never arrives
            _print(f"jaxcpt: not every host confirmed within distributed.failure_timeout_seconds="
                   f"{self.timeout_s:g} ({str(e).splitlines()[0][:200]}); exiting anyway")
        if self.process_index == 0:
            # Process 0 runs the coordination service: leave the others a moment to pass the
            # barrier and exit before it goes, or their clients would abort on the lost service.
            time.sleep(min(1.0, self.timeout_s / 10))
        self._exit(code)

    @staticmethod
    def _exit(code: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _print(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - a closed terminal must not stop the shutdown
        pass


_watch: _Watch | None = None


def watch(timeout_s: float) -> None:
    """Start watching for other hosts' failures (after ``jax.distributed.initialize``, several processes)."""
    global _watch
    import jax

    client = _client()
    if _watch is not None or client is None or jax.process_count() == 1:
        return
    _watch = _Watch(client, jax.process_index(), jax.process_count(), timeout_s)
    _watch.start()


def watching() -> bool:
    return _watch is not None


def wait_if_stopping() -> None:
    """Never returns while this process is being ended (after another host's failure); else returns at once."""
    if _watch is not None and _watch.stopping.locked():
        while True:
            time.sleep(60)


def announce(error: BaseException | str) -> None:
    """Tell every other host that this one failed (no-op on one process). Call as soon as the error is caught."""
    if _watch is not None:
        _watch.announce(error)


def fail_everywhere(error: BaseException | str, code: int) -> None:
    """Announce ``error`` if not done yet and end this process with ``code`` (never returns) once every host
    knows, or after ``distributed.failure_timeout_seconds``. Does nothing on one process."""
    if _watch is None:
        return
    _watch.announce(error)
    _watch.fail(code)
