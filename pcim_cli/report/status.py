"""`pcim status`: what a store holds, per well — done, failed, missing — read from its records alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcim_cli.errors import EXIT_OK, EXIT_PARTIAL, InputDataError
from pcim_cli.io import store
from pcim_cli.io.plate import parse_well


@dataclass
class WellStatus:
    well: str
    fields: int
    done: int = 0
    failed: int = 0
    missing: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class StoreStatus:
    store: Path
    wells: list[WellStatus]
    fingerprints: int  # distinct settings fingerprints among done fields (> 1: made with mixed settings)
    last_run: dict[str, Any]

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(w, k) for w in self.wells) for k in ("fields", "done", "failed", "missing")}

    @property
    def exit_code(self) -> int:
        totals = self.totals
        return EXIT_OK if totals["failed"] == 0 and totals["missing"] == 0 else EXIT_PARTIAL

    def as_dict(self) -> dict[str, Any]:
        return {"store": str(self.store), "totals": self.totals, "fingerprints": self.fingerprints,
                "last_run": self.last_run, "exit_code": self.exit_code,
                "wells": [vars(w) for w in self.wells]}


def store_status(path: Path) -> StoreStatus:
    """Count each well's fields by state. Raises InputDataError when `path` is no pcim store."""
    path = Path(path)
    wells = store.plate_fields(path) if path.exists() else {}
    if not wells:
        raise InputDataError(f"{path} is not a pcim store (no OME-Zarr plate there); check the path, "
                             "or run `pcim explain plate.yaml` first")
    plate_record = store.read_plate_record(path)
    ledger = plate_record.get("failed", {})
    fingerprints: set[str] = set()
    out = []
    for well in sorted(wells, key=parse_well):
        status = WellStatus(well, wells[well])
        for index in range(wells[well]):
            record = store.read_record(path, well, index)
            failure = ledger.get(store.field_path(well, index))
            if record is not None and record.get("status") == "done" and failure is None:
                status.done += 1
                fingerprints.add(str(record.get("fingerprint")))
            elif failure is not None:
                status.failed += 1
                status.errors.append(f"site {failure.get('site')}: {failure.get('error', '')}")
            else:
                status.missing += 1
        out.append(status)
    return StoreStatus(path, out, len(fingerprints), plate_record.get("last_run", {}))
