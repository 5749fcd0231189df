"""Checks that the CSV, `pcim status` and the store's records tell the same story about every field.

The store is read with zarr directly (its JSON metadata, not pcim's reader), so a check does not trust
the code it checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from cli_runner import run_pcim


def _attrs(path: Path) -> dict | None:
    """The attributes of a Zarr v3 group at `path` (its zarr.json), None when absent or unreadable."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None


def plate_record(zarr_path: Path) -> dict:
    return (_attrs(zarr_path) or {}).get("pcim") or {}


def field_record(zarr_path: Path, rel: str) -> dict | None:
    attrs = _attrs(zarr_path / rel)
    return None if attrs is None else attrs.get("pcim")


def record_states(zarr_path: Path) -> dict[str, str]:
    """{field path: done | failed | not done} from the raw records, with the plate's current fingerprint."""
    plate = plate_record(zarr_path)
    current = plate.get("fingerprint") or (plate.get("last_run") or {}).get("fingerprint")
    ledger = plate.get("failed") or {}
    ome = (_attrs(zarr_path) or {}).get("ome", {}).get("plate", {})
    out: dict[str, str] = {}
    for well in ome.get("wells", []):
        images = ((_attrs(zarr_path / well["path"]) or {}).get("ome", {}).get("well", {}).get("images", []))
        for image in images:
            rel = f"{well['path']}/{image['path']}"
            record = field_record(zarr_path, rel)
            failure = ledger.get(rel)
            if record and record.get("status") == "done" and record.get("fingerprint") == current:
                out[rel] = "done"
            elif failure and failure.get("fingerprint") == current:
                out[rel] = "failed"
            else:
                out[rel] = "not done"
    return out


def csv_states(csv_path: Path) -> dict[str, str]:
    """{field path: done | failed | not done} from the CSV (rows without a store path are left out)."""
    table = pd.read_csv(csv_path, keep_default_na=False)
    out: dict[str, str] = {}
    for row in table.itertuples():
        if not row.PCIM_ZarrPath:
            continue
        state = row.PCIM_Status if row.PCIM_Status in ("done", "failed") else "not done"
        assert out.get(row.PCIM_ZarrPath, state) == state, f"{row.PCIM_ZarrPath}: rows disagree"
        out[row.PCIM_ZarrPath] = state
    return out


def status_states(zarr_path: Path) -> dict[str, str]:
    proc = run_pcim("status", str(zarr_path), "--json")
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    out = {}
    for f in doc["fields"]:
        if f["path"]:
            out[f["path"]] = f["state"] if f["state"] in ("done", "failed") else "not done"
    assert proc.returncode == (0 if all(s == "done" for s in out.values()) and doc["totals"]["failed"] == 0
                               else 3)
    return out


def assert_consistent(zarr_path: Path, csv_path: Path) -> dict[str, str]:
    """CSV == records == status for every field of the store; returns the states."""
    records = record_states(zarr_path)
    csv = csv_states(csv_path)
    status = status_states(zarr_path)
    assert csv == records, f"CSV {csv} != records {records}"
    assert status == records, f"status {status} != records {records}"
    return records
