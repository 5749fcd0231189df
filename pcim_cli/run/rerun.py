"""Reruns that never lose or redo work, and never keep a stale map: what to do with each field.

A field is *done* when its group in the store has a completion record with status done, the
fingerprint of the current settings, the same site and the same input files (io/signature.py: name,
size and modification time, and when those changed, a digest of the files' content); it is then
skipped. A field whose record has another fingerprint (settings, model, channels or class names
changed), another site, other input files, maps for another target than the field resolves to now
(`explain.target: layout:<column>` after the layout changed), or no record at all (a crash mid-write)
is redone; the driver marks the record of a field whose input files or target changed *stale* before
anything runs, so a run that is stopped never leaves a stale map counted as done. A field that failed with the current
settings (the plate record's failure ledger) stays failed unless `--retry-failed` or its input files
changed since (a file restored or exported again is retried without asking); `--force` redoes
everything; `--only` restricts the run to some wells. What each field *is* afterwards is decided by
io/records.py from the store alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcim_cli.io import records, signature, store

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
    stat: list[dict[str, Any]] = field(default_factory=list)  # stat signature of the input files
    stale: str = ""  # the record's map is no longer current (inputs or site changed): mark it so
    refresh: bool = False  # same pixels, new file stats: update the record's signature

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


def target_change(record: Mapping[str, Any] | None, targets: tuple[str, ...] | str | None) -> str:
    """Why a record's maps are not for the targets the field resolves to now ('' when they are).

    `targets`: the class names to explain (fixed targets: a class, all, a layout column's value), an error
    message (the layout gives the well no usable target any more), or None (the predicted class: the map
    follows the model, whose sha256 is in the fingerprint)."""
    if record is None or targets is None:
        return ""
    had = [str(t) for t in record.get("targets") or []]
    if isinstance(targets, str):
        return f"its target {', '.join(had) or '?'} is no longer given ({targets})"
    if had != list(targets):
        return f"its target changed ({', '.join(had) or '?'} then, {', '.join(targets)} now)"
    return ""


def decide(well: str, site: int, index: int, record: dict[str, Any] | None, failure: dict[str, Any] | None,
           fingerprint: str, rerun: Rerun, files: Iterable[Path] = (),
           targets: tuple[str, ...] | str | None = None) -> FieldPlan:
    """What to do with one field, given its record in the store, its entry in the failure ledger and the
    targets it resolves to now (`target_change`)."""
    files = tuple(files)
    stat = signature.stat_signature(files)
    plan = FieldPlan(well, site, index, "run", stat=stat)
    settings_current = is_current(record, fingerprint, site)
    retarget = target_change(record, targets) if settings_current else ""
    inputs_same, refresh = (signature.same_inputs(record.get("inputs"), files, stat)
                            if settings_current and not retarget else (False, False))
    current = settings_current and inputs_same
    plan.refresh = current and refresh
    if record is not None and record.get("status") == "done" and not current:
        if retarget:
            plan.stale = retarget
        elif settings_current:
            plan.stale = "its input files changed since"
        elif record.get("fingerprint") == fingerprint:
            plan.stale = f"its site changed (site {record.get('site')} then, {site} now)"
    standing = (failure is not None and failure.get("fingerprint") == fingerprint and failure.get("site") == site
                and signature.same_inputs(failure.get("inputs"), files, stat)[0])
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
        plan.reason = (plan.stale or ("its map or metadata was damaged" if record.get("status") == "damaged"
                                      else "settings or model changed" if record.get("fingerprint") != fingerprint
                                      else "incomplete"))
    elif failure is not None:
        plan.action, plan.reason = "run", ("failed before" if standing else "failed before, input files changed since")
    return plan


def next_ledger(old: Mapping[str, Any], plans: Iterable[FieldPlan], early: Iterable[Mapping[str, Any]],
                rows_by_field: Mapping[tuple[str, int], list[dict[str, Any]]], fingerprint: str,
                wells: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The failure ledger after this run.

    Fields this run planned: failed now (from the workers' rows), or a failure still standing. Fields
    that failed before they had a place in the store (`early` rows: a missing channel file) are keyed by
    records.unplaced_key. Entries of wells outside this run (a `plate.wells` subset) are kept as they are.
    """
    wells = set(wells)
    ledger = {k: v for k, v in old.items() if isinstance(v, Mapping) and v.get("well") not in wells}
    now = time.strftime("%Y-%m-%d %H:%M:%S%z")
    for plan in plans:
        rows = rows_by_field.get((plan.well, plan.site)) or []
        failed = [r for r in rows if r["status"] == "failed"]
        if plan.fitted and failed:
            ledger[plan.path] = {"well": plan.well, "site": plan.site, "error": failed[0]["error"],
                                 "cause": failed[0].get("cause", "other"), "fingerprint": fingerprint,
                                 "inputs": failed[0].get("inputs") or {"stat": plan.stat}, "at": now}
        elif plan.action in ("failed", "excluded") and plan.failure is not None:
            ledger[plan.path] = plan.failure
    for row in early:
        key = row.get("key") or records.unplaced_key(row["well"], row["site"])
        ledger[key] = {"well": row["well"], "site": row["site"], "error": row["error"],
                       "cause": row.get("cause", "data"), "fingerprint": fingerprint,
                       "inputs": row.get("inputs") or {}, "at": now}
    return ledger
