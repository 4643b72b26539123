"""Stopping at a step boundary that every host agrees on: preemption notices and Ctrl-C.

A preempted TPU VM or a SLURM job gets SIGTERM some 30 seconds before it is killed. The
run must save at the next step boundary, and on several hosts all of them must save the
*same* step: a host that stops while the others enter the next step's collectives hangs
the job, and per-host checkpoints of different steps cannot be resumed.

- One process: SIGTERM and SIGINT set a flag that the loop reads at the next boundary.
- Several processes with JAX's coordination service (``jax.distributed.initialize``; the
  preemption service is on unless ``jax_enable_preemption_service`` is off): JAX installs
  its own SIGTERM handler and propagates the notice to every host; each host asks
  ``reached_preemption_sync_point(step)`` at every step boundary, a local check that costs
  nothing until a notice arrives, and the service names the same step on every host.
  SIGINT is forwarded to that handler as a SIGTERM, so Ctrl-C on one host also stops all
  of them at one step. We install no SIGTERM handler of our own there: it would replace
  JAX's and the notice would never reach the service.
- Several processes without the service (it was turned off): the hand-made fallback, a
  flag per host and an allgather every ``check_every`` steps, the only agreement possible
  without the service. A notice can then be acted on up to ``check_every`` steps late.

A second signal while a stop is pending interrupts at once (a hung collective or a long
compilation must still be stoppable).

SIGHUP (the terminal or ssh session of a foreground run went away) stops the run like
SIGTERM, saving first, unless the run was started with hang-ups ignored (``nohup``): then
it stays ignored. A hang-up also leaves stdout/stderr pointing at a dead terminal, where
the next progress line would raise EIO before the checkpoint is written; those streams are
pointed at /dev/null. A run stopped by any of these signals exits with
``jaxcpt.exit_codes.EXIT_STOPPED_EARLY`` (75), which the launch scripts restart or requeue.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np


def _preemption_service_running() -> bool:
    from jax._src import distributed  # the public API exposes no query; reached_preemption_sync_point reads this

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class StopRequests:
    """``should_stop(step)`` at every step boundary; True on every host at the same step."""

    def __init__(self, check_every: int):
        self.check_every = max(1, check_every)
        self.several_hosts = jax.process_count() > 1
        self.service = self.several_hosts and _preemption_service_running()
        self.signal: int | None = None  # the signal this host received, if any
        self._previous: dict = {}
        # Called in the handler after the flag is set; may raise into the interrupted code (the data
        # pipeline ends a stalled wait for a batch this way: TrainIterator.interrupt_if_waiting).
        self.on_signal: list = []
        self._terminal_fds: list[int] = []  # stdout/stderr when they are a terminal

    @property
    def mechanism(self) -> str:
        if self.service:
            return "JAX preemption service (checked every step)"
        if self.several_hosts:
            return f"per-host flags agreed every {self.check_every} steps (preemption service off)"
        return "signal flag (checked every step)"

    def install(self) -> None:
        signals = [signal.SIGINT] if self.service else [signal.SIGTERM, signal.SIGINT]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup asked for hang-ups to be ignored
            signals.append(signal.SIGHUP)
            # asked now: once the terminal has hung up, isatty() on it fails like any other call
            self._terminal_fds = [fd for fd in (1, 2) if os.isatty(fd)]
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame):
        if signum == signal.SIGHUP:
            _leave_a_dead_terminal(self._terminal_fds)
        if self.signal is not None:
            self.uninstall()
            raise KeyboardInterrupt(f"second signal {signum}: stopping without a checkpoint")
        self.signal = signum
        if self.service:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler tells the coordination service
        for hook in self.on_signal:
            hook()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop before running step ``step + 1``. A collective on several hosts."""
        if self.service:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if not self.several_hosts:
            return self.signal is not None
        if step % self.check_every:
            return False
        return any_host(self.signal is not None)


def _leave_a_dead_terminal(fds: list[int]) -> None:
    """Point ``fds`` (stdout/stderr that were a terminal) at /dev/null: after a hang-up, writes to it raise EIO."""
    import sys

    if not fds:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def any_host(flag: bool) -> bool:
    """True on every host if ``flag`` is true on any host (a collective: all hosts must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
