"""Progress of a run, on stderr: a Rich bar on a terminal, plain periodic log lines elsewhere.

    with WellProgress(fancy=cli.fancy_terminal(), quiet=quiet) as progress:
        explain.run(cfg, on_well=progress.on_well, on_start=progress.start)

- terminal: a live bar (wells done / total, failed, elapsed, ETA); log lines print above it;
- not a terminal (cron mail, SLURM .out files, pipes): a line ``wells 120/384 done, 2 failed, ETA 00:41``
  at most every `every_s` seconds, plus one at the end; each well's result at debug level (-v), a
  well with failed fields at info level;
- quiet: nothing.

`StepProgress` does the same for the steps of `pcim train-explainer`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

#: seconds between two plain progress lines
EVERY_S = 30.0


def clock(seconds: float | None) -> str:
    """mm:ss (or h:mm:ss) of a duration; --:-- when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class WellCounter:
    """Wells done / failed out of a total, and the time left at the rate so far."""

    def __init__(self, total: int = 0, now: float | None = None):
        self.total = total
        self.done = 0
        self.failed = 0  # wells with at least one failed field
        self.started = time.monotonic() if now is None else now

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.done += 1
        if any(r.get("status") == "failed" for r in rows):
            self.failed += 1

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the mean rate so far (None before the first well)."""
        if not self.done:
            return None
        elapsed = (time.monotonic() if now is None else now) - self.started
        return elapsed / self.done * max(0, self.total - self.done)

    def line(self, now: float | None = None) -> str:
        return f"wells {self.done}/{self.total} done, {self.failed} failed, ETA {clock(self.eta(now))}"


class WellProgress:
    """Reports wells as they finish. `start(total)` once the plan is known, `on_well` per well, `close`."""

    def __init__(self, fancy: bool, quiet: bool = False, every_s: float = EVERY_S):
        self.fancy = fancy and not quiet
        self.quiet = quiet
        self.every_s = every_s
        self.counter = WellCounter()
        self._last_line = 0.0
        self._logged = -1  # wells done at the last plain line
        self._bar: Any = None
        self._bar_task: Any = None
        self._swapped: list[tuple[Any, Any]] = []

    def __enter__(self) -> WellProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, total: int) -> None:
        """The run is about to explain `total` wells."""
        self.counter = WellCounter(total)
        self._last_line = time.monotonic()
        if self.quiet or not total:
            return
        if self.fancy:
            self._start_bar(total)
        else:
            self._log_line(self._last_line)

    def on_well(self, well: str, rows: list[dict[str, Any]]) -> None:
        """A well finished with these summary rows."""
        self.counter.add(rows)
        bad = [r for r in rows if r.get("status") == "failed"]
        per_well = logging.INFO if bad else logging.DEBUG
        logger.log(per_well, "%s: %s", well, ", ".join(f"site {r['site']} {r['status']}" for r in rows))
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._bar_task, advance=1, failed=self.counter.failed)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or self.counter.done == self.counter.total:
            self._log_line(now)

    def close(self) -> None:
        """Stop the bar (it stays on screen); log lines go back to their own console."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif not self.quiet and self.counter.total and self._logged != self.counter.done:
            self._log_line(time.monotonic())  # the end of an interrupted run
        for handler, console in self._swapped:
            handler.console = console
        self._swapped = []

    def _log_line(self, now: float) -> None:
        self._last_line = now
        self._logged = self.counter.done
        logger.info("%s", self.counter.line(now))

    def _start_bar(self, total: int) -> None:
        from rich.progress import MofNCompleteColumn, TextColumn

        self._bar, self._swapped = rich_bar(TextColumn("wells"), "BAR", MofNCompleteColumn(),
                                            TextColumn("{task.fields[failed]} failed"), "TIMES")
        self._bar_task = self._bar.add_task("wells", total=total, failed=0)
        self._bar.start()


def rich_bar(*columns: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    """A Rich progress bar on stderr with `columns` ("BAR": the bar; "TIMES": elapsed, ETA), and pcim's
    Rich log handlers routed through its console, so log lines appear above the bar. Returns the bar
    (not started) and the (handler, console) pairs to restore when it stops."""
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    expanded: list[Any] = []
    for c in columns:
        if c == "BAR":
            expanded.append(BarColumn())
        elif c == "TIMES":
            expanded += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        else:
            expanded.append(c)
    console = Console(stderr=True)
    swapped = []
    for handler in logging.getLogger("pcim_cli").handlers:
        if isinstance(handler, RichHandler):
            swapped.append((handler, handler.console))
            handler.console = console
    return Progress(*expanded, console=console), swapped


class StepProgress:
    """Progress of a training run: `start(total, done)`, `update(done, loss)` after each step, `close`.

    On a terminal a Rich bar (steps, running objective, elapsed, ETA); elsewhere a plain line
    ``explainer steps 120/300, objective 0.412, ETA 01:10`` at most every `every_s` seconds and at the
    end; nothing when quiet.
    """

    def __init__(self, fancy: bool, quiet: bool = False, every_s: float = EVERY_S):
        self.fancy = fancy and not quiet
        self.quiet = quiet
        self.every_s = every_s
        self.total = self.done = self.first = 0
        self.loss = float("nan")
        self.started = self._last_line = time.monotonic()
        self._bar: Any = None
        self._bar_task: Any = None
        self._swapped: list[tuple[Any, Any]] = []

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, total: int, done: int = 0) -> None:
        """`total` steps, of which `done` were made before (a resumed run)."""
        self.total, self.done, self.first = total, done, done
        self.started = self._last_line = time.monotonic()
        if self.quiet or done >= total:
            return
        if self.fancy:
            from rich.progress import MofNCompleteColumn, TextColumn

            self._bar, self._swapped = rich_bar(TextColumn("explainer steps"), "BAR", MofNCompleteColumn(),
                                                TextColumn("objective {task.fields[loss]}"), "TIMES")
            self._bar_task = self._bar.add_task("steps", total=total, completed=done, loss="-")
            self._bar.start()

    def eta(self, now: float) -> float | None:
        made = self.done - self.first
        return None if made <= 0 else (now - self.started) / made * max(0, self.total - self.done)

    def line(self, now: float) -> str:
        return f"explainer steps {self.done}/{self.total}, objective {self.loss:.4f}, ETA {clock(self.eta(now))}"

    def update(self, done: int, loss: float) -> None:
        """`done` steps made so far; `loss`: the running training objective."""
        self.done, self.loss = done, loss
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=done, loss=f"{loss:.4f}")
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or done == self.total:
            self._last_line = now
            logger.info("%s", self.line(now))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        for handler, console in self._swapped:
            handler.console = console
        self._swapped = []


class ScreenProgress(WellProgress):
    """Progress of a screen: one bar (or plain line) over the wells of every plate planned so far, and a
    line per plate as it completes. Plates are planned as they are reached, so the total grows (`add`);
    the ETA is the measured wells/min applied to the wells planned so far."""

    def __init__(self, fancy: bool, quiet: bool = False, plates: int = 0, every_s: float = EVERY_S):
        super().__init__(fancy, quiet, every_s)
        self.plates = plates
        self.plates_done = 0

    def start(self, total: int = 0) -> None:
        self.counter = WellCounter(total)
        self._last_line = time.monotonic()

    def add(self, wells: int) -> None:
        """A plate with `wells` wells to explain was planned."""
        if not wells:
            return
        self.counter.total += wells
        if self.quiet:
            return
        if self.fancy and self._bar is None:
            self._start_bar(self.counter.total)
        elif self._bar is not None:
            self._bar.update(self._bar_task, total=self.counter.total)

    def plate_finished(self, name: str, text: str, level: int = logging.INFO, position: int | None = None) -> None:
        """Plate `name` (the `position`-th of the screen) is complete (or could not run): one line saying how
        it went."""
        self.plates_done += 1
        place = f"{position}/{self.plates}" if position else f"{self.plates_done} finished of {self.plates}"
        logger.log(level, "plate %s (%s): %s", name, place, text)

    def _log_line(self, now: float) -> None:
        self._last_line = now
        self._logged = self.counter.done
        logger.info("plates %d/%d done; %s", self.plates_done, self.plates, self.counter.line(now))
