"""The one place that decides what a field of a store is: done, failed, stale, damaged or missing.

A field's truth is in the store: its group's completion record (written by the worker after its maps)
and the plate record (written by the driver): the fingerprint of the settings the plate was last run
with, and the failure ledger. The CSV summary (`run/explain.collect`), `pcim status`, `--json` and
the exit code are all derived from :func:`store_states`, so they cannot disagree.

- done: a record with status done, made with the plate's current fingerprint;
- failed: no such record, and a ledger entry made with the current fingerprint;
- damaged: the field group's metadata cannot be read, or its map arrays cannot be opened or lack chunk
  files (redone by the next run);
- stale: a record made with other settings, or marked stale because its input files changed;
- missing: nothing yet (never run, interrupted, or a crash mid-write).

A done field may still have failed object tables (plate.objects: a label image missing or unusable):
`FieldState.object_failures`; they count as failures for `pcim status` and the exit code, as in the
`--json` of `pcim explain`.

The ledger also holds fields that could not be planned at all (a channel file missing): their key is
:func:`unplaced_key` (no store path), so they are listed by `status` and the CSV too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcim_cli.io import store
from pcim_cli.io.plate import parse_well

STATES = ("done", "failed", "damaged", "stale", "missing")


@dataclass(frozen=True)
class FieldState:
    """One field of a store, as its records say."""

    well: str
    site: int | None  # from the record or the ledger; None when neither says (never run)
    index: int | None  # the field's number in the store; None for a field that has no place there
    state: str  # one of STATES
    error: str = ""  # why it failed, or what is damaged / stale
    cause: str = ""  # failed: data | model | output | other (what the exit code is derived from)
    record: Mapping[str, Any] | None = None
    failure: Mapping[str, Any] | None = None

    @property
    def path(self) -> str:
        return "" if self.index is None else store.field_path(self.well, self.index)

    @property
    def object_failures(self) -> list[tuple[str, str]]:
        """(object kind, message) of the object tables that failed in a done field (its map is done)."""
        if self.state != "done":
            return []
        entries = (self.record or {}).get("objects") or {}
        return [(str(name), str(o.get("error", ""))) for name, o in entries.items()
                if isinstance(o, Mapping) and o.get("status") == "failed"]


def unplaced_key(well: str, site: int | None) -> str:
    """Ledger key of a field that failed before it had a place in the store (e.g. a missing channel file)."""
    row, col = store.split_well(well)
    return f"{row}/{col}/site-{'' if site is None else site}"


def field_state(well: str, index: int | None, record: Mapping[str, Any] | None,
                failure: Mapping[str, Any] | None, fingerprint: str | None) -> FieldState:
    """The state of one field from its record and its ledger entry, against the current fingerprint."""
    site = (record or {}).get("site", (failure or {}).get("site"))
    site = site if isinstance(site, int) else None
    status = (record or {}).get("status")
    if status == "done" and fingerprint is not None and record.get("fingerprint") == fingerprint:
        return FieldState(well, site, index, "done", _warnings(record), record=record)
    if failure is not None and failure.get("fingerprint") == fingerprint:
        return FieldState(well, failure.get("site", site), index, "failed", str(failure.get("error", "")),
                          str(failure.get("cause", "other")), record=record, failure=failure)
    if status == "damaged":
        return FieldState(well, site, index, "damaged", str(record.get("error", "")), record=record)
    if record is not None:
        why = record.get("stale") or ("incomplete" if status != "done" else "made with other settings or model")
        return FieldState(well, site, index, "stale", str(why), record=record)
    return FieldState(well, site, index, "missing")


def _warnings(record: Mapping[str, Any]) -> str:
    warnings = record.get("warnings") or []
    return "; ".join(f"warning: {w}" for w in warnings)


def store_states(path: Path, fingerprint: str | None = None) -> tuple[list[FieldState], dict[str, Any]]:
    """Every field of the store (those its plate metadata lists, and the ledger's unplaced ones), in
    plate order, and the plate record. `fingerprint`: the current settings (default: the plate record's)."""
    plate_record = store.read_plate_record(path)
    if fingerprint is None:
        fingerprint = plate_record.get("fingerprint")
    ledger = plate_record.get("failed") or {}
    wells = store.plate_fields(path)
    out = []
    for well in wells:
        for index in range(wells[well]):
            rel = store.field_path(well, index)
            out.append(field_state(well, index, store.read_record(path, well, index), ledger.get(rel), fingerprint))
    placed = {s.path for s in out}
    for key, failure in ledger.items():
        if key in placed or not isinstance(failure, Mapping) or failure.get("fingerprint") != fingerprint:
            continue
        try:
            well = parse_well(str(failure.get("well", ""))).name
        except ValueError:
            continue
        out.append(field_state(well, None, None, failure, fingerprint))
    out.sort(key=_order)
    return out, plate_record


def _order(state: FieldState) -> tuple:
    well = parse_well(state.well)
    return (well.row, well.col, state.site if state.site is not None else -1,
            state.index if state.index is not None else -1)
