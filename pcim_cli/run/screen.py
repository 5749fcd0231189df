"""`pcim explain` over a screen: the wells of many plates on one cluster, each plate as its own run.

Each plate keeps everything a single-plate run has — its store, run lock, rerun decisions, CSV and
plate record (run/explain.py `open_plate` / `finish_plate`) — while the wells of all plates go to one
`scheduler.run_stream`: plates are opened (locked and planned) in the order given, at most
`max_in_flight` at a time, and the next plate's wells are queued while the last wells of the previous
one run, so workers never wait between plates. A plate's CSV and plate record are written when its
last well finishes. Nothing is started when nothing needs fitting: plates that are complete are
finished at once, and the cluster starts only when the first well to fit is found.

A plate that cannot run — invalid config (78), its store locked by another run (75), no usable image
(65), … — is reported with its reason and skipped; the others go on. The screen's exit code is the
worst of its plates' in the order `EXIT_ORDER`. `output.screen_csv` concatenates every plate's CSV
rows and is rewritten (atomically) at the end of every run.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pcim_cli.config.screen import PlateEntry, Screen
from pcim_cli.config.settings import read_settings
from pcim_cli.errors import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TEMPFAIL,
    PcimError,
)
from pcim_cli.io import outputs, summary
from pcim_cli.run import explain, rerun, scheduler
from pcim_cli.run.progress import ScreenProgress
from pcim_cli.run.signals import StopSignals
from pcim_cli.run.task import WellTask

logger = logging.getLogger(__name__)

#: exit codes from worst to best: the screen exits with the first one any plate has
EXIT_ORDER = (EXIT_INTERNAL, EXIT_CONFIG, EXIT_DATA, EXIT_TEMPFAIL, EXIT_PARTIAL, EXIT_OK)
#: plates planned and holding their lock at once, by default
DEFAULT_IN_FLIGHT = 4


def combine_exit_codes(codes: list[int]) -> int:
    """The worst code (EXIT_ORDER; an unknown code counts as an internal error); 0 for none."""
    rank = {c: i for i, c in enumerate(EXIT_ORDER)}
    return min(codes, key=lambda c: rank.get(c, 0), default=EXIT_OK) if codes else EXIT_OK


@dataclass
class PlateOutcome:
    """One plate of a screen run: its result, or why it did not run."""

    source: str
    name: str
    result: explain.RunResult | None = None
    error: str | None = None  # why the plate did not run (or stopped)
    code: int = EXIT_OK  # its exit code when it has no result
    position: int = 0  # 1-based place in the screen, for messages ("plate P2 (2/3)")

    @property
    def exit_code(self) -> int:
        return self.result.exit_code if self.result is not None else self.code

    def as_dict(self) -> dict:
        r = self.result
        return {"plate": self.name, "source": self.source, "exit_code": self.exit_code, "error": self.error,
                "store": None if r is None else str(r.store), "csv": None if r is None else str(r.csv),
                "counts": None if r is None else r.counts, "fitted": 0 if r is None else r.fitted,
                "failed": [] if r is None else r.failed + r.object_failures,
                "problems": [] if r is None else r.problems,
                "shortcuts": None if r is None or r.shortcuts is None else r.shortcuts.to_dict()}


@dataclass
class ScreenResult:
    plates: list[PlateOutcome]
    screen_csv: Path | None = None
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return combine_exit_codes([p.exit_code for p in self.plates])

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(summary.STATUSES, 0)
        for p in self.plates:
            if p.result is not None:
                for k, v in p.result.counts.items():
                    out[k] += v
        return out

    @property
    def fitted(self) -> int:
        return sum(p.result.fitted for p in self.plates if p.result is not None)


@dataclass
class _Active:
    """An open plate whose wells are on the cluster."""

    opened: explain.OpenPlate
    outcome: PlateOutcome
    remaining: set[str]
    rows: list[dict] = field(default_factory=list)


def run_screen(screen: Screen, choice: rerun.Rerun | None = None, max_in_flight: int = DEFAULT_IN_FLIGHT,
               progress: ScreenProgress | None = None) -> ScreenResult:
    """Explain every plate of `screen` on one cluster (screen.compute); see the module docstring."""
    choice = choice or rerun.Rerun()
    outputs.check_screen(screen.configs, screen.screen_csv, screen.files)  # before any plate: nothing written
    progress = progress or ScreenProgress(fancy=False, quiet=True)
    progress.plates = len(screen.entries)
    progress.start()
    outcomes: list[PlateOutcome] = []
    queue: collections.deque[tuple[PlateOutcome, object]] = collections.deque()
    for i, entry in enumerate(screen.entries):
        outcome = PlateOutcome(entry.source, entry.name, position=i + 1)
        outcomes.append(outcome)
        if entry.config is None:
            _not_run(outcome, EXIT_CONFIG, entry.problem or "invalid configuration", progress)
        else:
            queue.append((outcome, entry.config))
    active: dict[str, _Active] = {}
    compute = screen.compute
    _warn_other_clusters(screen)

    def finish(name: str, interrupted: bool) -> None:
        act = active.pop(name)
        with stop.deferred():  # the plate's ledger and CSV are written whatever signal comes now
            act.outcome.result = explain.finish_plate(act.opened, act.rows, interrupted)
        _finished(act.outcome, progress)

    def open_more() -> list[WellTask]:
        tasks: list[WellTask] = []
        while queue and len(active) < max_in_flight and not stop.requested:
            outcome, cfg = queue.popleft()
            try:
                opened = explain.open_plate(cfg, choice, settings)
            except PcimError as exc:
                _not_run(outcome, exc.exit_code, str(exc), progress)
                continue
            except Exception as exc:  # noqa: BLE001 - one plate's bug must not stop the screen
                logger.debug("plate %s", outcome.name, exc_info=True)
                _not_run(outcome, EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc}", progress)
                continue
            if not opened.plan.tasks:  # complete (or nothing to do): finished at once, nothing started
                with stop.deferred():
                    outcome.result = explain.finish_plate(opened, [], False)
                _finished(outcome, progress)
                continue
            active[outcome.name] = _Active(opened, outcome, {t.well for t in opened.plan.tasks})
            progress.add(len(opened.plan.tasks))
            tasks += opened.plan.tasks
        return tasks

    def on_well(well: str, rows: list[dict]) -> None:
        progress.on_well(well, rows)
        act = active.get(str(rows[0]["plate"])) if rows else None
        if act is None:
            return
        act.rows += rows
        act.remaining.discard(well)
        if not act.remaining:
            finish(act.outcome.name, False)

    interrupted = False
    settings = read_settings()
    stop = StopSignals(settings.grace_seconds)
    with stop:
        try:
            dispatch = scheduler.run_stream(compute, open_more, on_well, stop)
            interrupted = dispatch.interrupted or stop.requested
        except KeyboardInterrupt:  # a forced stop while planning a plate or fitting in-process
            if not stop.requested:
                for act in active.values():
                    act.opened.release()
                raise
            interrupted = True
        except PcimError as exc:  # the cluster could not be started or reached: no plate ran
            for act in list(active.values()):
                act.opened.release()
                _not_run(act.outcome, exc.exit_code, str(exc), progress)
            active.clear()
            for outcome, _ in queue:
                _not_run(outcome, exc.exit_code, str(exc), progress)
            queue.clear()
        except BaseException:
            for act in active.values():
                act.opened.release()
            raise
        for name in list(active):  # interrupted: what was done is recorded, the rest says skipped
            finish(name, True)
    for outcome, _ in queue:
        _not_run(outcome, EXIT_TEMPFAIL, "not run (interrupted); run the same command again", progress)
    progress.close()
    result = ScreenResult(outcomes, screen.screen_csv, interrupted)
    if result.screen_csv is not None:
        write_screen_csv(screen, result.screen_csv)
    return result


def _not_run(outcome: PlateOutcome, code: int, error: str, progress: ScreenProgress) -> None:
    outcome.code, outcome.error = code, error
    progress.plate_finished(outcome.name, f"not run (exit {code}): {error}", logging.WARNING, outcome.position)


def _finished(outcome: PlateOutcome, progress: ScreenProgress) -> None:
    r = outcome.result
    assert r is not None
    counts = r.counts
    progress.plate_finished(outcome.name, f"{counts['done']} maps done ({r.fitted} fitted by this run), "
                                          f"{counts['failed']} failed, {counts['skipped']} not run; exit "
                                          f"{r.exit_code}; csv {r.csv}",
                            logging.INFO if r.exit_code == EXIT_OK else logging.WARNING, outcome.position)


def _warn_other_clusters(screen: Screen) -> None:
    """The screen runs on one cluster: say so when plates ask for another one, naming the keys that differ."""
    first = screen.compute
    keys = ("cluster", "address", "scheduler_file", "workers", "slurm")
    name = screen.configs[0].plate.name if screen.configs else ""
    for c in screen.configs[1:]:
        differ = [f"compute.{k} {getattr(c.compute, k)} (not {getattr(first, k)})" for k in keys
                  if getattr(c.compute, k) != getattr(first, k)]
        if differ:
            logger.warning("plate %s asks for %s; the screen runs all its plates on one cluster, %s's", c.plate.name,
                           ", ".join(differ), name)


def write_screen_csv(screen: Screen | list[PlateEntry], path: Path) -> Path:
    """output.screen_csv: every plate's CSV rows (as written by its last run), concatenated; atomic."""
    entries = screen.entries if isinstance(screen, Screen) else screen
    tables = []
    for e in entries:
        if e.config is None:
            continue
        csv = Path(e.config.output.csv)
        if csv.is_file():
            tables.append(pd.read_csv(csv, keep_default_na=False, na_values=[""]))
    table = pd.concat(tables, ignore_index=True, sort=False) if tables else summary.build_summary([])
    meta = [c for c in table.columns if c.startswith("Metadata_")]  # each plate's layout columns up front
    table = table[meta + [c for c in table.columns if c not in meta]]
    summary.write_csv_atomic(table, path)
    logger.info("screen CSV %s: %d rows from %d plates", path, len(table), len(tables))
    return path
