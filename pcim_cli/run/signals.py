"""Stop signals: SIGTERM / SIGINT end a run cleanly at any moment, after a grace period for running wells.

The driver (run/explain.py) installs `StopSignals` for a whole run, planning included: the first
signal asks for a stop (no new wells; running ones get `grace_seconds()`), a second one or the end of
the grace period forces it.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from pcim_cli.errors import ConfigError

logger = logging.getLogger(__name__)

#: seconds running wells get to finish after SIGTERM / SIGINT (environment variable overrides)
GRACE_ENV = "PCIM_GRACE_SECONDS"
DEFAULT_GRACE_S = 60.0


def grace_seconds() -> float:
    """Seconds running wells may take to finish after a stop signal (PCIM_GRACE_SECONDS, default 60)."""
    text = os.environ.get(GRACE_ENV)
    if text is None:
        return DEFAULT_GRACE_S
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{GRACE_ENV}={text!r} is not a number of seconds; e.g. {GRACE_ENV}=60") from None
    if value < 0:
        raise ConfigError(f"{GRACE_ENV}={text!r}: give zero or more seconds")
    return value


class _StopAftermath(logging.Filter):
    """After a stop signal, worker processes that the same Ctrl-C killed while a cluster started leave
    asyncio tasks whose exceptions nobody retrieves ("Nanny failed to start worker process"); asyncio logs
    each with a traceback when the task is collected, often at exit. They are the expected consequence of
    the stop, which pcim has already reported: dropped, not shown as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


_AFTERMATH = _StopAftermath()


class StopSignals:
    """SIGTERM / SIGINT: the first asks for a graceful stop, a second one (or the grace period) forces it.

    The driver installs it for a whole run. While `raise_on_force` (planning, in-process fits, starting a
    cluster) a forced stop is a KeyboardInterrupt in the main thread; inside `deferred()` (polling a
    cluster, writing the CSV) it only sets `forced`, which the code there looks at. Handlers are installed
    only in the main thread, and restored after.
    """

    def __init__(self, grace: float, raise_on_force: bool = True):
        self.grace = grace
        self.raise_on_force = raise_on_force
        self.requested_at: float | None = None
        self.forced = False
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._expired = False

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def overdue(self) -> bool:
        return self.forced or (self.requested_at is not None and time.monotonic() - self.requested_at > self.grace)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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
            logger.warning("%s: no new wells; running wells get up to %.0f s to finish (%s to change; "
                           "send the signal again to stop now)", name, self.grace, GRACE_ENV)
            self._timer = threading.Timer(self.grace, self._grace_over)
            self._timer.daemon = True
            self._timer.start()
            return
        if not self.forced:
            logger.warning("%s: stopping now", "grace period over" if self._expired else f"{name} again")
        self.forced = True
        if self.raise_on_force:
            raise KeyboardInterrupt
