"""Stopping a run cleanly: SIGTERM (a preemption, a scheduler) and Ctrl-C save a checkpoint at the
next log boundary, where all processes agree on the step, and exit with the shell's code."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import ClassVar


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint was saved and rerunning the command resumes.

    The signal is acted on at the next log boundary (train.log_every), where all processes agree.
    `exit_code` is the shell's for the signal: 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask for a checkpoint at the next log boundary; a second Ctrl-C
    stops at once. Handlers are installed only from the main thread (Python's rule).

    "At once" is `os._exit(130)`: a KeyboardInterrupt raised wherever the main thread happens to
    be (inside JAX's dispatch, say) could leave a lock held and the cleanup after it waiting
    forever (seen once in the test suite). Checkpoints stay consistent: orbax commits one by
    renaming, so a save cut short is never read. In a notebook the second interrupt raises
    KeyboardInterrupt instead, which stops the cell and keeps the kernel.
    """

    EXIT_CODES: ClassVar[dict[int, int]] = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self, announce: bool):
        self.received: list[int] = []
        self._announce = announce
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            if "ipykernel" in sys.modules:
                raise KeyboardInterrupt
            print("\njaxopt-lab: interrupted; steps since the last checkpoint are lost",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)
        self.received.append(signum)
        if self._announce and signum == signal.SIGINT:
            print("\ninterrupted: saving a checkpoint at the next log boundary "
                  "(Ctrl-C again stops at once)", file=sys.stderr)

    def stop_if_received(self, what: str) -> None:
        """Raises `Preempted` ("SIGINT: `what`", the shell's exit code) once a signal came."""
        if self.received:
            signum = self.received[0]
            raise Preempted(f"{signal.Signals(signum).name}: {what}", self.EXIT_CODES[signum])

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
            # A stop asked for inside (a run of a procedure of several: optimize, a sweep) is
            # the procedure's too: it then stops after this run instead of starting the next.
            outer = getattr(handler, "__self__", None)
            if (isinstance(outer, StopSignals) and signum in self.received
                    and signum not in outer.received):
                outer.received.append(signum)
