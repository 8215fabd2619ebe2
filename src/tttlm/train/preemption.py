"""Stopping on request: SIGTERM (what schedulers send before they take a job's machines) and SIGINT (Ctrl-C)
make a training run save a checkpoint at the next step boundary and exit, instead of losing the work since the
last checkpoint."""

from __future__ import annotations

import signal
import threading


class StopRequests:
    """A context in which SIGTERM and SIGINT only set `received` (the first one's name, e.g. "SIGTERM"), for the
    training loop to act on; the handlers before it come back on exit. Signals after the first change nothing:
    under torchrun a process may get two (the terminal's and torchrun's), and SIGKILL remains to stop without
    saving. Outside the main thread, where Python cannot install handlers, signals keep their usual effect."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
