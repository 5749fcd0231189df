"""How a test runs pcim as a user does: the installed console script in a subprocess, under ONE
environment policy for the whole suite (issue 27; tests/conftest.py applies the same to this process).

The policy: one torch thread (OMP_NUM_THREADS=1) in every pcim a test starts, so a map is the same
float32 arithmetic on any machine and under any load (threads change the order of sums, and
compute.threads: auto would time steps to choose, which depends on the load); unbuffered output, so a
test that reads a running pcim's stderr sees it as it is written; and no NO_COLOR from the caller's
shell (pipes are plain text anyway). A test of the thread policy itself passes its own environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["PCIM", "StderrLines", "pcim_env", "run_pcim", "start_pcim", "wait_for"]

_SCRIPT = Path(sys.executable).parent / "pcim"  # the installed console script
PCIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pcim_cli.cli"]


def pcim_env(**extra: str) -> dict[str, str]:
    """This process's environment under the suite's policy (see the module docstring), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_pcim(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`pcim ARGS` as a user runs it (a subprocess of the installed console script)."""
    return subprocess.run([*PCIM, *args], capture_output=True, text=True, cwd=cwd, env=pcim_env(**env),
                          timeout=timeout)


def start_pcim(*args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """`pcim ARGS` started in the background (its output in pipes)."""
    return subprocess.Popen([*PCIM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=pcim_env(**env))


def wait_for(predicate, timeout: float = 240, what: str = "") -> None:
    """Poll `predicate` every 0.1 s until it is true; AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class StderrLines:
    """Collects a running process's stderr lines in a thread, so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    @property
    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)
