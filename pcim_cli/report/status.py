"""`pcim status`: what a store holds, per well — done, failed, missing — read from its records alone.

The states come from `io/records.store_states`, the same function the CSV summary is built from, so
`status` and the CSV of the last run always agree. Fields whose metadata is damaged, or whose maps were
made with other settings than the plate's last run (stale), are not done: they count as missing, and
are listed with their store path. Object tables that failed in done fields (plate.objects) are counted
and listed too, and make the exit code 3, as they do for `pcim explain`. The maps of done fields are
counted by PCIM_Fit label (`fits`, as in `pcim explain`'s summary and the CSV), and the last run's stain
verdicts (plate record) are shown again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pcim_cli.engine.verdict import FIT_LABELS
from pcim_cli.errors import EXIT_OK, EXIT_PARTIAL, InputDataError, unplaced
from pcim_cli.io import records, store
from pcim_cli.io.plate import parse_well


@dataclass
class WellStatus:
    well: str
    fields: int
    done: int = 0
    failed: int = 0
    missing: int = 0  # not done: never run, interrupted, stale or damaged
    object_failures: int = 0  # object tables that failed in done fields (plate.objects)
    errors: list[str] = field(default_factory=list)


@dataclass
class StoreStatus:
    store: Path
    wells: list[WellStatus]
    fields: list[records.FieldState]
    fingerprints: int  # distinct settings among the finished maps, current or stale (> 1: mixed settings)
    last_run: dict[str, Any]

    @property
    def totals(self) -> dict[str, int]:
        out = {k: sum(getattr(w, k) for w in self.wells) for k in ("fields", "done", "failed", "missing")}
        out["damaged"] = sum(f.state == "damaged" for f in self.fields)
        out["stale"] = sum(f.state == "stale" for f in self.fields)
        out["object_failures"] = sum(len(f.object_failures) for f in self.fields)
        return out

    @property
    def fits(self) -> dict[str, int]:
        """Maps of done fields per PCIM_Fit label (engine/verdict.py; methods that fit nothing are not counted)."""
        out = dict.fromkeys(FIT_LABELS, 0)
        for f in self.fields:
            if f.state != "done" or not f.record:
                continue
            for result in (f.record.get("results") or {}).values():
                label = result.get("fit") if isinstance(result, Mapping) else None
                if label in out:
                    out[label] += 1
        return out

    @property
    def exit_code(self) -> int:
        """0 when every field is done and every object table made; else 3 (as `pcim explain` exits)."""
        totals = self.totals
        complete = totals["failed"] == 0 and totals["missing"] == 0 and totals["object_failures"] == 0
        return EXIT_OK if complete else EXIT_PARTIAL

    def as_dict(self) -> dict[str, Any]:
        return {"store": str(self.store), "totals": self.totals, "fits": self.fits, "fingerprints": self.fingerprints,
                "last_run": self.last_run, "exit_code": self.exit_code,
                "wells": [asdict(w) for w in self.wells],
                "fields": [{"well": f.well, "site": f.site, "path": f.path, "state": f.state, "error": f.error,
                            "object_failures": [{"object": o, "error": e} for o, e in f.object_failures]}
                           for f in self.fields]}


def store_status(path: Path) -> StoreStatus:
    """Count each well's fields by state. Raises InputDataError when `path` is no pcim store."""
    path = Path(path)
    wells = store.plate_fields(path) if path.exists() else {}
    if not wells:
        raise InputDataError(f"{path} is not a pcim store (no OME-Zarr plate there); check the path, "
                             "or run `pcim explain plate.yaml` first")
    states, plate_record = records.store_states(path)
    if not plate_record:
        raise InputDataError(f"{path} is an OME-Zarr plate that pcim did not write (it has no pcim plate record); "
                             "pass the output.zarr of a pcim explain run")
    by_well: dict[str, WellStatus] = {}
    for s in states:
        status = by_well.setdefault(s.well, WellStatus(s.well, 0))
        status.fields += 1
        if s.state == "done":
            status.done += 1
            for name, error in s.object_failures:
                status.object_failures += 1
                status.errors.append(f"site {s.site} {name} table: {unplaced(s.well, s.site, error)}")
        elif s.state == "failed":
            status.failed += 1
            status.errors.append(f"site {s.site}: {unplaced(s.well, s.site, s.error)}")
        else:
            status.missing += 1
            if s.state in ("damaged", "stale"):
                status.errors.append(f"{s.path} {s.state}: {s.error}")
    for well, n in wells.items():
        by_well.setdefault(well, WellStatus(well, n))
    fingerprints = {str(s.record.get("fingerprint")) for s in states if s.record and s.record.get("status") == "done"}
    return StoreStatus(path, [by_well[w] for w in sorted(by_well, key=parse_well)], states, len(fingerprints),
                       plate_record.get("last_run", {}))


# ---------------------------------------------------------------- several plates: a screen


#: the columns of a screen's status table, in order (stale / damaged where the store tells them)
TOTALS = ("fields", "done", "failed", "missing", "stale", "damaged", "object_failures")


@dataclass
class PlateStatus:
    """One plate of `pcim status` over several plates: its store's totals, or why there are none."""

    plate: str
    source: str  # the store, plate.yaml or screen entry it was named by
    store: Path | None
    totals: dict[str, int] = field(default_factory=dict)  # fields, done, failed, missing (+ stale, damaged)
    problem: str | None = None  # invalid config, no store yet, not a pcim store

    @property
    def complete(self) -> bool:
        t = self.totals
        return (self.problem is None and t.get("fields", 0) > 0 and not t.get("failed") and not t.get("missing")
                and not t.get("object_failures"))

    def as_dict(self) -> dict[str, Any]:
        return {"plate": self.plate, "source": self.source, "store": None if self.store is None else str(self.store),
                "totals": self.totals, "complete": self.complete, "problem": self.problem}


@dataclass
class ScreenStatus:
    plates: list[PlateStatus]

    @property
    def totals(self) -> dict[str, int]:
        seen = {k for p in self.plates for k in p.totals}
        keys = [k for k in TOTALS if k in seen] + sorted(seen - set(TOTALS))
        return {k: sum(p.totals.get(k, 0) for p in self.plates) for k in keys}

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.plates and all(p.complete for p in self.plates) else EXIT_PARTIAL

    def as_dict(self) -> dict[str, Any]:
        return {"plates": [p.as_dict() for p in self.plates], "totals": self.totals,
                "complete": sum(p.complete for p in self.plates), "exit_code": self.exit_code}


def screen_status(args: list[str], overrides: list[str] | tuple[str, ...] = ()) -> ScreenStatus:
    """Status of every plate named by `args`: stores (folders), plate.yaml files, screen files, globs of
    them. A plate.yaml's store is its output.zarr; an invalid config is a row with its problem."""
    from pcim_cli.config.screen import expand_arguments, load_screen

    plates: list[PlateStatus] = []
    for path in expand_arguments(args):
        if path.is_dir():
            plates.append(_plate_status(path.name, str(path), path))
            continue
        for entry in load_screen([path], overrides).entries:
            if entry.config is None:
                plates.append(PlateStatus(entry.name, entry.source, None, problem=entry.problem))
            else:
                plates.append(_plate_status(entry.config.plate.name, entry.source, Path(entry.config.output.zarr)))
    return ScreenStatus(plates)


def _plate_status(name: str, source: str, path: Path) -> PlateStatus:
    if not path.exists():
        return PlateStatus(name, source, path, problem="no store yet (never run)")
    try:
        report = store_status(path)
    except InputDataError as exc:
        return PlateStatus(name, source, path, problem=str(exc))
    plate_name = str(store.read_plate_record(path).get("plate") or name)
    return PlateStatus(plate_name, source, path, totals=report.totals)
