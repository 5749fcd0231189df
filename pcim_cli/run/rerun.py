"""Reruns that never lose or redo work: what to do with each field, and its CSV rows afterwards.

A field is *done* when its group in the store has a completion record with status done, the
fingerprint of the current settings and the same site; it is then skipped. A field whose record has
another fingerprint (settings or model changed) or none (a crash mid-write) is redone. A field that
failed with the current settings (the plate record's `failed` ledger) stays failed unless
`--retry-failed` or its input files changed since (a file restored or copied again is retried without
asking); `--force` redoes everything; `--only` restricts the run to some wells, while the
CSV still lists every field of the plate.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcim_cli.io import store, summary

#: what happens to a field in a run
ACTIONS = ("run", "redo", "done", "failed", "excluded")


@dataclass(frozen=True)
class Rerun:
    """The command line's rerun choices."""

    force: bool = False
    retry_failed: bool = False
    only: frozenset[str] | None = None  # canonical well names


@dataclass
class FieldPlan:
    """One discovered field and what this run does with it."""

    well: str
    site: int
    index: int
    action: str
    reason: str = ""
    record: dict[str, Any] | None = None  # the current completion record (action done)
    failure: dict[str, Any] | None = None  # the ledger entry (action failed)
    inputs: str = ""  # signature of the input files (input_signature)

    @property
    def path(self) -> str:
        return store.field_path(self.well, self.index)

    @property
    def fitted(self) -> bool:
        return self.action in ("run", "redo")


def is_current(record: Mapping[str, Any] | None, fingerprint: str, site: int) -> bool:
    """The record is a finished map made with these settings, of this site."""
    return (record is not None and record.get("status") == "done" and record.get("fingerprint") == fingerprint
            and record.get("site") == site)


def input_signature(files: Iterable[Path]) -> str:
    """Names, sizes and modification times of a field's files: changes when a file is replaced."""
    parts = []
    for path in files:
        try:
            st = os.stat(path)
            parts.append(f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{Path(path).name}:missing")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def decide(well: str, site: int, index: int, record: dict[str, Any] | None, failure: dict[str, Any] | None,
           fingerprint: str, rerun: Rerun, inputs: str = "") -> FieldPlan:
    """What to do with one field, given its record in the store and its entry in the failure ledger."""
    plan = FieldPlan(well, site, index, "run", inputs=inputs)
    current = is_current(record, fingerprint, site)
    standing = (failure is not None and failure.get("fingerprint") == fingerprint
                and failure.get("site") == site and failure.get("inputs", "") == inputs)
    if rerun.only is not None and well not in rerun.only:
        plan.action, plan.reason = "excluded", "not in --only"
        plan.record = record if current else None
        plan.failure = failure if standing else None
    elif rerun.force:
        plan.action, plan.reason = ("redo" if record else "run"), "--force"
    elif current:
        plan.action, plan.record = "done", record
    elif standing and not rerun.retry_failed:
        plan.action, plan.failure = "failed", failure
    elif record is not None:
        plan.action = "redo"
        plan.reason = ("settings or model changed" if record.get("fingerprint") != fingerprint
                       else "incomplete" if record.get("status") != "done" else "site changed")
    elif failure is not None:
        plan.action, plan.reason = "run", ("failed before, input files changed since"
                                           if failure.get("inputs", "") != inputs else "failed before")
    return plan


def field_rows(plate: str, plan: FieldPlan, record: Mapping[str, Any] | None,
               run_rows: list[dict[str, Any]] | None, fingerprint: str) -> list[dict[str, Any]]:
    """The CSV rows of one field after the run: from its record when its map is current, else why not."""
    if run_rows and any(r["status"] == "failed" for r in run_rows):
        return run_rows
    if is_current(record, fingerprint, plan.site):
        return summary.rows_from_record(plate, plan.well, plan.path, record)
    if plan.action in ("failed", "excluded") and plan.failure is not None:
        return [_row(plate, plan, "failed", f"{plan.failure.get('error', '')} (failed on "
                     f"{plan.failure.get('at', '?')}; rerun with --retry-failed)")]
    why = plan.reason if plan.action == "excluded" else "not run (interrupted)" if plan.fitted else plan.reason
    return [_row(plate, plan, "skipped", why or "not run")]


def _row(plate: str, plan: FieldPlan, status: str, error: str) -> dict[str, Any]:
    nan = float("nan")
    return {"plate": plate, "well": plan.well, "site": plan.site, "target": "", "predicted_class": "",
            "prob_original": nan, "prob_mixed": nan, "prob_deleted": nan, "deletion_auc": nan,
            "insertion_auc": nan, "fit": "", "status": status, "error": error, "runtime_s": nan, "zarr_path": plan.path}


def next_ledger(plans: Iterable[FieldPlan], rows_by_field: Mapping[tuple[str, int], list[dict[str, Any]]],
                fingerprint: str) -> dict[str, dict[str, Any]]:
    """The failure ledger after this run: fields that failed now, plus earlier failures still standing."""
    ledger: dict[str, dict[str, Any]] = {}
    now = time.strftime("%Y-%m-%d %H:%M:%S%z")
    for plan in plans:
        rows = rows_by_field.get((plan.well, plan.site)) or []
        failed = [r for r in rows if r["status"] == "failed"]
        if plan.fitted and failed:
            ledger[plan.path] = {"well": plan.well, "site": plan.site, "error": failed[0]["error"],
                                 "fingerprint": fingerprint, "inputs": plan.inputs, "at": now}
        elif plan.action in ("failed", "excluded") and plan.failure is not None:
            ledger[plan.path] = plan.failure
    return ledger
