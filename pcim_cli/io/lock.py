"""The run lock: one `pcim explain` per store at a time.

The lock is a small JSON file `.pcim-lock` inside the store folder, created atomically (O_EXCL), that
names its holder (host, pid, user, start time). While a run holds it, a heartbeat thread touches it
every `HEARTBEAT_S` seconds. A second run finds it and stops with TemporaryFailure (exit 75) naming
the holder. A lock is stale, and taken over with a warning, when its process is gone (same host) or
its heartbeat is older than `stale_after_s` (other hosts, where a pid means nothing; the driver passes
PCIM_LOCK_STALE_S, config/settings.py, default 15 min): a run killed with `kill -9` or by a node
failure never blocks the plate for good.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pcim_cli.errors import OutputError, TemporaryFailure, os_reason

logger = logging.getLogger(__name__)

LOCK_NAME = ".pcim-lock"
HEARTBEAT_S = 60.0
DEFAULT_STALE_S = 15 * 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """`host node7, pid 4242, user ana, since 2026-11-25 03:00:12`."""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, user {holder.get('user', '?')}, "
            f"since {holder.get('started', '?')}")


class RunLock:
    """Context manager holding the run lock of `store` (a folder, created if needed).

    `lock_file` puts the lock elsewhere in that folder (`pcim train-explainer`: one lock per --out), and
    `subject` names what is locked in the message of a second run (default: the folder). Another host's
    lock counts as abandoned after `stale_after_s` seconds without a heartbeat.
    """

    def __init__(self, store: Path, heartbeat_s: float = HEARTBEAT_S, lock_file: str = LOCK_NAME,
                 subject: str | None = None, stale_after_s: float = DEFAULT_STALE_S):
        self.store = Path(store)
        self.path = self.store / lock_file
        self.subject = subject or str(self.store)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[Path] = []  # folders made for the lock (innermost first), removed with it if empty
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S%z"),
        }

    def __enter__(self) -> RunLock:
        folder = self.store.absolute()  # folders made only for the lock are removed with it
        while not folder.exists() and folder != folder.parent:
            self._created.append(folder)
            folder = folder.parent
        try:
            self.store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the store folder {self.store}: {os_reason(exc)}; make its parent "
                              "writable or set output.zarr to a writable path") from exc
        for _ in range(3):  # create; or find a stale lock, remove it, try again
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="pcim-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            reason = self._stale_reason(holder)
            if reason is None:
                raise TemporaryFailure(
                    f"{self.subject} is locked by another pcim run ({describe(holder)}); wait for it to "
                    f"finish, or remove {self.path} if that run is certainly gone"
                )
            logger.warning("taking over the lock of %s: %s (%s)", self.store, reason, describe(holder))
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise TemporaryFailure(f"could not take the lock {self.path}: other runs keep taking it; retry later")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._read().get("pid") == self.me["pid"] and self._read().get("host") == self.me["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for folder in self._created:  # empty: nothing was written (a run stopped before its store was made)
            try:
                folder.rmdir()
            except OSError:
                break

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"cannot write the lock file {self.path}: {os_reason(exc)}; make the store writable "
                              "(with free space)") from exc
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.me, handle)
        except OSError as exc:  # a full disk: no half-written lock left behind
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise OutputError(f"cannot write the lock file {self.path}: {os_reason(exc)}; free space on that "
                              "disk, or set output.zarr to another one") from exc
        return True

    def _read(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # gone, or half-written by a run that died while creating it

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            return None if _pid_alive(holder["pid"]) else "its process no longer runs"
        if not holder:
            return "it is unreadable" if age > 60 else None
        limit = self.stale_after_s
        return f"no heartbeat for {age:.0f} s (limit {limit:.0f} s)" if age > limit else None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
