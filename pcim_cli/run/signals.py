"""Stop signals, one mechanism for every command: SIGTERM / SIGINT end a run cleanly at any moment.

- `StopSignals(grace)`: the first signal asks for a stop, a second one (or the end of the grace period,
  when there is one) forces it. `pcim explain` and screens install it for a whole run, planning included
  (no new wells; running ones get PCIM_GRACE_SECONDS, config/settings.py); `pcim train-explainer` with no
  grace period (the current step finishes, a checkpoint is written).
- `BeforeRun`: what the CLI installs from the start of a command until the run installs its own
  handlers: a signal then stops at once (nothing is written yet); after the run, signals change nothing.

Handlers are installed only in the main thread, and the previous ones are restored afterwards.
"""

from __future__ import annotations

import _thread  # noqa: PLC2701 - interrupt_main: SIGINT in the main thread, from a timer
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from pcim_cli.config.settings import GRACE_ENV

logger = logging.getLogger(__name__)

__all__ = ["BeforeRun", "StopSignals"]

#: what the first signal of a run says, by default
WELLS_STOP = ("no new wells; running wells get up to {grace:.0f} s to finish (" + GRACE_ENV
              + " to change; send the signal again to stop now)")


class _Handlers:
    """Installs `_handle` for SIGTERM and SIGINT in the main thread; restores the previous handlers."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Handlers:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        raise NotImplementedError


class BeforeRun(_Handlers):
    """From a command's start until its run begins, a signal stops at once (KeyboardInterrupt: nothing is
    written yet); once `started()` is called, signals outside the run's own handlers change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.running = False

    def started(self) -> None:
        self.running = True

    def _handle(self, signum: int, frame: object) -> None:
        if not self.running:
            raise KeyboardInterrupt


class _StopAftermath(logging.Filter):
    """After a stop signal, worker processes that the same Ctrl-C killed while a cluster started leave
    asyncio tasks whose exceptions nobody retrieves ("Nanny failed to start worker process"); asyncio logs
    each with a traceback when the task is collected, often at exit. They are the expected consequence of
    the stop, which pcim has already reported: dropped, not shown as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


_AFTERMATH = _StopAftermath()


class StopSignals(_Handlers):
    """SIGTERM / SIGINT: the first asks for a graceful stop, a second one (or the grace period) forces it.

    `grace`: seconds after the first signal until the stop is forced; None: never (only a second signal
    forces it). `first`: what the first signal logs ({grace} is filled in). While `raise_on_force`
    (planning, in-process fits, starting a cluster, a training step) a forced stop is a KeyboardInterrupt
    in the main thread; inside `deferred()` (polling a cluster, writing the CSV) it only sets `forced`,
    which the code there looks at.
    """

    def __init__(self, grace: float | None, raise_on_force: bool = True, first: str = WELLS_STOP):
        super().__init__()
        self.grace = grace
        self.raise_on_force = raise_on_force
        self.first = first
        self.requested_at: float | None = None
        self.forced = False
        self._timer: threading.Timer | None = None
        self._expired = False

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def overdue(self) -> bool:
        if self.forced:
            return True
        return self.grace is not None and self.requested_at is not None and \
            time.monotonic() - self.requested_at > self.grace

    def __enter__(self) -> StopSignals:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        super().__exit__(*exc)

    def disarm(self) -> None:
        """No forced stop any more (the in-process loop is done)."""
        if self._timer is not None:
            self._timer.cancel()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals inside only set `requested` / `forced`: no KeyboardInterrupt while the code there runs."""
        previous, self.raise_on_force = self.raise_on_force, False
        try:
            yield
        finally:
            self.raise_on_force = previous

    def _grace_over(self) -> None:
        self._expired = True
        if self.raise_on_force:
            _thread.interrupt_main()  # runs _handle (SIGINT) in the main thread

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            logging.getLogger("asyncio").addFilter(_AFTERMATH)  # idempotent: a filter is added once
            logger.warning("%s: %s", name, self.first.format(grace=self.grace or 0))
            if self.grace is not None:
                self._timer = threading.Timer(self.grace, self._grace_over)
                self._timer.daemon = True
                self._timer.start()
            return
        if not self.forced:
            logger.warning("%s: stopping now", "grace period over" if self._expired else f"{name} again")
        self.forced = True
        if self.raise_on_force:
            raise KeyboardInterrupt
