"""Checks that the CSV, `pcim status` and the store's records tell the same story about every field.

The store is read with zarr directly (its JSON metadata, not pcim's reader), so a check does not trust
the code it checks.
"""

from __future__ import annotations

import itertools
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


def maps_whole(zarr_path: Path, rel: str) -> bool:
    """The field's map arrays (its multiscales datasets) have readable metadata and every chunk file of
    their chunk grid, read from the JSON and the folder listing (Zarr v3, default chunk keys)."""
    attrs = _attrs(zarr_path / rel) or {}
    try:
        datasets = [d["path"] for d in attrs["ome"]["multiscales"][0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        return False
    for name in datasets:
        folder = zarr_path / rel / name
        try:
            meta = json.loads((folder / "zarr.json").read_text())
            shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        grid = [range(-(-n // c)) for n, c in zip(shape, chunks, strict=True)]
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        if any("c/" + "/".join(map(str, idx)) not in files for idx in itertools.product(*grid)):
            return False
    return True


def record_states(zarr_path: Path) -> dict[str, str]:
    """{field path: done | failed | not done} from the raw records (a done record counts only when its
    map arrays are whole), with the plate's current fingerprint."""
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
            if (record and record.get("status") == "done" and record.get("fingerprint") == current
                    and maps_whole(zarr_path, rel)):
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
    complete = (all(s == "done" for s in out.values()) and doc["totals"]["failed"] == 0
                and doc["totals"].get("object_failures", 0) == 0)
    assert proc.returncode == (0 if complete else 3)
    return out


def assert_consistent(zarr_path: Path, csv_path: Path) -> dict[str, str]:
    """CSV == records == status for every field of the store; returns the states."""
    records = record_states(zarr_path)
    csv = csv_states(csv_path)
    status = status_states(zarr_path)
    assert csv == records, f"CSV {csv} != records {records}"
    assert status == records, f"status {status} != records {records}"
    return records
