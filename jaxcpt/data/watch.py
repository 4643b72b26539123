"""Saying what the input pipeline waits for when it stalls, and stopping a stalled wait on a signal.

Every process that runs the pipeline (the trainer; each Grain worker) keeps one ``ACTIVITY``:
the outermost call that is producing data (a batch in the trainer, a row in a worker), when
it began, and the reader it is in (``DocumentIterator.describe()``: source, host and worker,
file, byte offset or row, records read). A daemon thread looks at it every second; when one
call has run for longer than ``data.stall_warn_seconds`` it logs a warning with those facts,
and again each time that much more time passes. The readers only store a reference to
themselves per document (no formatting on the hot path); the thread formats.

A stalled wait cannot reach the training loop's step boundary, where a SIGTERM is acted on.
``TrainIterator.interrupt_if_waiting`` (called by the trainer's signal handler,
``jaxcpt.train.signals.StopRequests.on_signal``) raises ``InputWaitInterrupted`` inside the
wait instead; the iterator keeps the state it had before the call, so the checkpoint saved
next holds a consistent data position and resuming re-reads the batch that never came.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


class InputWaitInterrupted(Exception):
    """A stop signal arrived while the trainer waited for the input pipeline."""


class Activity:
    """What this process's pipeline is doing (see the module docstring)."""

    def __init__(self):
        self.depth = 0  # nested producing calls (a batch in the trainer contains rows, which contain documents)
        self.since = 0.0
        self.label = ""
        self.timeout = 0.0
        self.reader = None  # the DocumentIterator that read last: describe() says where it is
        self._warnings = 0
        self._thread: threading.Thread | None = None

    def begin(self, label: str, timeout: float) -> None:
        if self.depth == 0:
            self.since, self.label, self.timeout, self._warnings = time.monotonic(), label, timeout, 0
            if timeout > 0 and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._watch, name="jaxcpt-data-watch", daemon=True)
                self._thread.start()
        self.depth += 1

    def end(self) -> None:
        self.depth = max(0, self.depth - 1)

    def stalled_for(self) -> float:
        return time.monotonic() - self.since if self.depth > 0 else 0.0

    def describe(self) -> str:
        reader = self.reader  # None in a trainer whose Grain workers read: the label names the worker
        return f"waiting for {self.label}" + (f"; last reader: {reader.describe()}" if reader is not None else "")

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, max(0.05, self.timeout / 4)))
            waited = self.stalled_for()
            if self.timeout > 0 and waited >= self.timeout * (self._warnings + 1):
                self._warnings += 1
                try:
                    what = self.describe()
                except Exception as e:  # the reader changed under us: say so rather than die
                    what = f"waiting for {self.label} ({type(e).__name__} while describing the reader)"
                log.warning(
                    "input pipeline stalled for %.0f s (process %d): %s. A file on a hung mount, a source whose "
                    "documents all encode to nothing, or a slow tokenizer stall it; data.stall_warn_seconds=%g "
                    "sets this warning",
                    waited, os.getpid(), what, self.timeout,
                )


ACTIVITY = Activity()
