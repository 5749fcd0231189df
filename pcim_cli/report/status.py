"""`pcim status`: what a store holds, per well — done, failed, missing — read from its records alone.

The states come from `io/records.store_states`, the same function the CSV summary is built from, so
`status` and the CSV of the last run always agree. Fields whose metadata is damaged, or whose maps were
made with other settings than the plate's last run (stale), are not done: they count as missing, and
are listed with their store path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pcim_cli.errors import EXIT_OK, EXIT_PARTIAL, InputDataError
from pcim_cli.io import records, store
from pcim_cli.io.plate import parse_well


@dataclass
class WellStatus:
    well: str
    fields: int
    done: int = 0
    failed: int = 0
    missing: int = 0  # not done: never run, interrupted, stale or damaged
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
        return out

    @property
    def exit_code(self) -> int:
        totals = self.totals
        return EXIT_OK if totals["failed"] == 0 and totals["missing"] == 0 else EXIT_PARTIAL

    def as_dict(self) -> dict[str, Any]:
        return {"store": str(self.store), "totals": self.totals, "fingerprints": self.fingerprints,
                "last_run": self.last_run, "exit_code": self.exit_code,
                "wells": [asdict(w) for w in self.wells],
                "fields": [{"well": f.well, "site": f.site, "path": f.path, "state": f.state, "error": f.error}
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
        elif s.state == "failed":
            status.failed += 1
            status.errors.append(f"site {s.site}: {s.error}")
        else:
            status.missing += 1
            if s.state in ("damaged", "stale"):
                status.errors.append(f"{s.path} {s.state}: {s.error}")
    for well, n in wells.items():
        by_well.setdefault(well, WellStatus(well, n))
    fingerprints = {str(s.record.get("fingerprint")) for s in states if s.record and s.record.get("status") == "done"}
    return StoreStatus(path, [by_well[w] for w in sorted(by_well, key=parse_well)], states, len(fingerprints),
                       plate_record.get("last_run", {}))
