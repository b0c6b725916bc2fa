"""Stopping on request: SIGTERM (what cluster schedulers send before preemption) and SIGINT.

While `StopRequest.handling_signals()` is active, the first SIGTERM or SIGINT only records
the request; the trainer sees it at the next step boundary (all DDP ranks agree through
the all-reduce they already do every step), writes a checkpoint there and raises
TrainingStopped, which the command line turns into a message and exit code EXIT_STOPPED.
A second signal acts at once, as if no handler were installed (SIGINT: KeyboardInterrupt).
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

# sysexits.h's EX_TEMPFAIL ("temporary failure, the user is invited to retry"): the run
# stopped cleanly with a checkpoint; the same command continues it.
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped at a step boundary on request, after writing a checkpoint."""

    def __init__(self, message: str, is_main: bool = True):
        super().__init__(message)
        self.is_main = is_main


class StopRequest:
    """Whether a stop was requested, and by which signal."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, signal_name: str) -> None:
        self.signal_name = signal_name

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            # The second signal: what it would have done without us.
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        # Only a flag: logging or I/O here could re-enter a write the signal interrupted.
        self.request(signal.Signals(signum).name)

    @contextmanager
    def handling_signals(self) -> Iterator["StopRequest"]:
        """Route SIGTERM and SIGINT to this request for the duration (main thread only;
        elsewhere it does nothing, as Python allows handlers only there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
