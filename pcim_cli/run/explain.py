"""`pcim explain`: the driver. Check, plan the wells, prepare the store, run the wells, write the CSV.

The driver is the only writer of plate-level metadata and of the CSV; each well is explained by
`worker.explain_well` (in-process or on Dask workers, run/scheduler.py); what the plate contains is
run/inventory.py. With explain.fidelity on,
the run ends with the plate's stain verdict (engine/verdict.py) from the done fields' records. Returns
data (a RunResult); the CLI decides what to print and which exit code that means.

Order of a run, so that a bad setting or a stop signal never leaves a half-written store behind:

1. `preflight`: everything that can be checked without writing (the PCIM_* settings, every output path
   (io/outputs.py), the scheduler file, who owns output.zarr); a problem ends the run with nothing written;
2. under the run lock, `plan`: model, layout, images and the store's records, read only;
3. `prepare_store`: the plate skeleton, the plate record (plate name, fingerprint), stale marks;
4. the wells run; SIGTERM / SIGINT at any moment up to here stop the run (exit 75) — before step 3
   with nothing written, later with the CSV rebuilt from the store;
5. `collect`: the failure ledger into the plate record, then the whole store's CSV from its records
   (io/records.py), so the CSV, `pcim status` and the exit code agree.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pcim_cli import __version__
from pcim_cli.config import RunConfig
from pcim_cli.config.settings import Settings, read_settings
from pcim_cli.engine import shortcuts, verdict
from pcim_cli.errors import EXIT_CONFIG, EXIT_DATA, EXIT_OK, EXIT_PARTIAL, EXIT_TEMPFAIL, ConfigError
from pcim_cli.io import images, outputs, ownership, plate, records, store, summary
from pcim_cli.io.lock import RunLock
from pcim_cli.io.model import LoadedModel
from pcim_cli.run import objects, rerun, sampling, scheduler, shortcut_qc
from pcim_cli.run.failures import failed_row
from pcim_cli.run.inventory import engine_options, fingerprint, inspect_plate, targets_per_well
from pcim_cli.run.signals import StopSignals
from pcim_cli.run.task import FieldFiles, WellTask

logger = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What a run did: where it wrote, what it counted, and the exit code that means."""

    store: Path
    csv: Path | None  # None: nothing was written (stopped before the store was touched)
    summary: pd.DataFrame
    problems: list[str] = field(default_factory=list)  # run-level problems (concern no single well)
    fitted: int = 0  # maps computed by this run (the others in `summary` were already done or failed)
    interrupted: bool = False  # SIGTERM / SIGINT: stopped early, what was done is recorded
    verdicts: list[verdict.Verdict] = field(default_factory=list)  # stain verdict per target (fidelity on)
    causes: list[str] = field(default_factory=list)  # why each failed field failed: data | model | output | other
    object_csvs: dict[str, Path] = field(default_factory=dict)  # plate.objects: {plate}_pcim_{Object}.csv
    object_failures: list[dict] = field(default_factory=list)  # object tables that failed (maps done)
    removed: list[Path] = field(default_factory=list)  # object CSVs of kinds plate.objects no longer lists
    shortcuts: shortcuts.Report | None = None  # the shortcut verdict (qc.enabled; docs/shortcuts.md)

    @property
    def counts(self) -> dict[str, int]:
        status = self.summary["PCIM_Status"] if len(self.summary) else pd.Series(dtype=str)
        return {s: int((status == s).sum()) for s in summary.STATUSES}

    @property
    def fits(self) -> dict[str, int]:
        """Done maps per PCIM_Fit label (engine/verdict.py FIT_LABELS; methods that fit nothing are not counted)."""
        done = self.summary[self.summary["PCIM_Status"] == "done"] if len(self.summary) else self.summary
        fit = done["PCIM_Fit"] if len(done) else pd.Series(dtype=str)
        return {v: int((fit == v).sum()) for v in summary.FITS}

    @property
    def failed(self) -> list[dict[str, str]]:
        bad = self.summary[self.summary["PCIM_Status"] == "failed"]
        return [{"well": r.Metadata_Well, "site": int(r.Metadata_Site), "error": r.PCIM_Error}
                for r in bad.itertuples()]

    @property
    def exit_code(self) -> int:
        """75 interrupted; 0 nothing failed; 3 some done, some failed; else 78 when every failure was the
        model's (it raises, returns non-finite values, or needs a larger input than the fields), 65."""
        counts = self.counts
        if self.interrupted:
            return EXIT_TEMPFAIL
        if counts["failed"] == 0 and not self.problems and not self.object_failures:
            return EXIT_OK
        if counts["done"]:
            return EXIT_PARTIAL
        return EXIT_CONFIG if self.causes and set(self.causes) == {"model"} and not self.problems else EXIT_DATA


@dataclass
class Plan:
    """Everything decided before the fits: each field's fate, the tasks, the rows of early failures."""

    fields: list[rerun.FieldPlan]
    tasks: list[WellTask]
    rows: list[dict]  # fields that failed at planning (discovery, layout target), one row each
    problems: list[str]  # run-level problems that concern no single well (e.g. an unparsable file name)
    layout: pd.DataFrame | None
    model: LoadedModel
    fingerprint: str
    wells: dict[str, int] = field(default_factory=dict)  # fields per well found (the store's skeleton)
    objects_refresh: set[str] = field(default_factory=set)  # done fields whose object tables are remade
    dropped: list[rerun.FieldPlan] = field(default_factory=list)  # failed at planning, with a stale map to mark
    qc_refresh: set[str] = field(default_factory=set)  # done fields whose shortcut-QC shares are measured again

    @property
    def counts(self) -> dict[str, int]:
        """Fields per action (run, redo, done, failed, excluded) plus `unusable` (failed at planning) and
        `objects` (done fields whose object tables are (re)made), `qc` (done fields whose shortcut-QC
        shares are measured again: the qc settings or the label images changed)."""
        out = {a: sum(f.action == a for f in self.fields) for a in rerun.ACTIONS}
        out["unusable"] = len({(r["well"], r["site"]) for r in self.rows})
        out["objects"] = len(self.objects_refresh)
        out["qc"] = len(self.qc_refresh)
        return out

    @property
    def scope(self) -> set[str]:
        """The wells this run looked at (found, or named by a discovery problem); others are left alone."""
        return set(self.wells) | {r["well"] for r in self.rows}


def _discovery_rows(plate_name: str, problems: list[images.Problem]) -> tuple[list[dict], list[str]]:
    """Problems about one well or field become failed CSV rows; the others stay run-level problems."""
    rows, general = [], []
    for p in problems:
        if p.well is None:
            general.append(str(p))
            continue
        row = failed_row(plate_name, p.well, p.field, 0, str(p))
        row["zarr_path"] = ""  # never written: the field has no place in the store
        row["cause"] = "data"
        rows.append(row)
    return rows, general


def plan(cfg: RunConfig, choice: rerun.Rerun | None = None) -> Plan:
    """Inventory the plate and decide each field's fate against the store; reads, never writes
    (`prepare_store` writes what the plan needs; --dry-run stops here)."""
    choice = choice or rerun.Rerun()
    inv = inspect_plate(cfg)
    model, classes, layout, found = inv.model, inv.classes, inv.layout, inv.fields
    if choice.only is not None:
        unknown = sorted(choice.only - set(found), key=plate.parse_well)
        if unknown:
            raise ConfigError(f"--only names {', '.join(unknown)}, which have no complete field here "
                              f"(wells found: {len(found)}); check the well names")
    rows, problems = _discovery_rows(cfg.plate.name, inv.problems)
    wells = sorted(found, key=plate.parse_well)
    targets = targets_per_well(cfg, classes, layout, wells)
    opts = engine_options(cfg)
    explainer = inv.explainer
    print_fp = fingerprint(cfg, model.sha256, classes, None if explainer is None else explainer.sha256)
    store_path = Path(cfg.output.zarr)
    exists = (store_path.is_dir()
              and ownership.check_owner(store_path, cfg.plate.name, force=True) is ownership.Ownership.OURS)
    ledger = store.read_plate_record(store_path).get("failed", {}) if exists else {}
    field_size = images.typical_size(src for w in wells for src in found[w])
    kinds = objects.label_kinds(cfg.plate.objects)
    top_k = cfg.explain.top_objects
    qc = shortcut_qc.qc_task(cfg)
    qc_sig = None if qc is None else qc.signature()

    fields, tasks, refresh, qc_refresh, dropped = [], [], set(), set(), []
    every = sampling.fidelity_every(cfg.explain.fidelity, cfg.explain.fidelity_every, cfg.explain.method)
    ordinal = 0  # the field's number in plate order: which fields get fidelity measures (run/sampling.py)
    for well in wells:
        first_ordinal = ordinal
        ordinal += len(found[well])
        decided = []
        for i, src in enumerate(found[well]):
            path = store.field_path(well, i)
            record = store.read_record(store_path, well, i) if exists else None
            decided.append(rerun.decide(well, src.field, i, record, ledger.get(path), print_fp, choice, src.files,
                                        targets[well]))
        well_targets = targets[well]
        if isinstance(well_targets, str):  # the layout gives this well no usable target
            for f in decided:
                if f.fitted:
                    row = failed_row(cfg.plate.name, well, f.site, f.index, well_targets)
                    rows.append({**row, "key": f.path, "cause": "data", "inputs": {"stat": f.stat}})
            dropped += [f for f in decided if f.fitted and f.stale]  # their old maps are marked stale
            decided = [f for f in decided if not f.fitted]
        fields += decided
        todo = []
        for f in decided:
            inputs = objects.field_inputs(kinds, well, f.site, top_k, opts)
            only = f.action == "done" and objects.needs_refresh(f.record, inputs["objects_signature"],
                                                                choice.retry_failed)
            # the shares follow the qc settings and the label images (no refit: qc changes no map)
            qc_only = f.action == "done" and qc is not None and (only or shortcut_qc.needs_refresh(f.record, qc_sig))
            if f.fitted or only or qc_only:
                src = found[well][f.index]
                todo.append(FieldFiles(site=f.site, index=f.index, objects_only=only, qc_only=qc_only, stat=f.stat,
                                       files=tuple(str(p) for p in src.files),
                                       zarr=None if src.zarr is None else src.zarr.to_dict(), **inputs,
                                       **sampling.fidelity_flags(first_ordinal + f.index, f.index, every)))
                refresh |= {f.path} if only else set()
                qc_refresh |= {f.path} if qc_only else set()
        if not todo:
            continue
        tasks.append(WellTask(
            plate=cfg.plate.name, well=well, channels=tuple(cfg.plate.channels),
            fields=tuple(todo), top_objects=top_k,
            classes=tuple(classes), targets=None if well_targets is None else tuple(well_targets),
            contrastive=cfg.explain.target == "contrastive",
            normalize=cfg.model.normalize.model_dump(), model_path=str(model.path), model_sha256=model.sha256,
            input_size=cfg.model.input_size, field_size=field_size, method=cfg.explain.method,
            aggregate=cfg.model.aggregate, tile_maps=cfg.explain.tile_maps,
            engine=dataclasses.asdict(opts),
            explainer_path=None if explainer is None else str(explainer.path),
            explainer_sha256=None if explainer is None else explainer.sha256,
            batch_size=cfg.compute.batch_size, channels_last=cfg.compute.channels_last,
            precision=cfg.compute.precision, device=model.device, fidelity=cfg.explain.fidelity,
            store_path=str(store_path), store_format=cfg.output.format, fingerprint=print_fp, qc=qc,
            timepoint=cfg.plate.timepoint, package=inv.package,
        ))
    return Plan(fields, tasks, rows, problems, layout, model, print_fp, {w: len(found[w]) for w in wells},
                refresh, dropped, qc_refresh)


def preflight(cfg: RunConfig, choice: rerun.Rerun, settings: Settings | None = None) -> ownership.Ownership:
    """Everything checked before anything is written: raises with nothing touched (a bad PCIM_*
    environment variable included: config/settings.py)."""
    if settings is None:
        read_settings()
    outputs.check_plate(cfg)  # every output path: no input, no collision, pcim's own files only, writable
    scheduler.check_compute(cfg.compute)
    return ownership.check_owner(Path(cfg.output.zarr), cfg.plate.name, force=choice.force)


def prepare_store(cfg: RunConfig, p: Plan, owner: ownership.Ownership) -> None:
    """The plate skeleton and record; records of fields whose map is no longer current marked stale."""
    store_path = Path(cfg.output.zarr)
    if owner is ownership.Ownership.TAKEOVER:
        previous = store.read_plate_record(store_path).get("plate")
        n = ownership.clear_store(store_path)
        logger.warning("--force: replaced the %d field(s) of plate %s in %s by plate %s", n, previous, store_path,
                       cfg.plate.name)
    started = time.strftime("%Y-%m-%d %H:%M:%S%z")
    store.create_plate(store_path, cfg.plate.name, p.wells, format=cfg.output.format,
                       record={"fingerprint": p.fingerprint, "started": started})
    for f in [*p.fields, *p.dropped]:
        if f.stale:
            store.update_record(store_path, f.well, f.index, {"status": "stale", "stale": f.stale})
        elif f.refresh:  # the same pixels under new file dates: the next rerun decides from the stat alone
            inputs = (store.read_record(store_path, f.well, f.index) or {}).get("inputs") or {}
            store.update_record(store_path, f.well, f.index, {"inputs": {**inputs, "stat": f.stat}})


def run(cfg: RunConfig, on_well: Callable[[str, list[dict]], None] | None = None,
        choice: rerun.Rerun | None = None, on_start: Callable[[int], None] | None = None) -> RunResult:
    """Explain every field that needs it under the store's run lock; rebuild the CSV from the store.

    `on_start` is told how many wells will be explained, `on_well` about each one as it finishes.
    SIGTERM / SIGINT from here on stop the run: the result says interrupted (exit 75).
    """
    choice = choice or rerun.Rerun()
    store_path = Path(cfg.output.zarr)
    settings = read_settings()
    with StopSignals(settings.grace_seconds) as stop:
        preflight(cfg, choice, settings)  # raises with nothing written; ownership is checked again under the lock
        try:
            with RunLock(store_path, stale_after_s=settings.lock_stale_s):
                return _run_locked(cfg, choice, stop, on_well, on_start)
        except KeyboardInterrupt:  # a forced stop while taking or releasing the lock
            if not stop.requested:
                raise
            return RunResult(store=store_path, csv=None, summary=summary.build_summary([]), interrupted=True)


def _run_locked(cfg: RunConfig, choice: rerun.Rerun, stop: StopSignals,
                on_well: Callable[[str, list[dict]], None] | None,
                on_start: Callable[[int], None] | None) -> RunResult:
    store_path = Path(cfg.output.zarr)
    owner = ownership.check_owner(store_path, cfg.plate.name, force=choice.force)  # again, now under the lock
    p: Plan | None = None
    prepared = False
    dispatch = scheduler.Dispatch()
    try:
        p = None if stop.requested else plan(cfg, choice)
        if p is not None and not stop.requested:
            prepared = True
            _prepare(cfg, p, owner)
            if on_start is not None:
                on_start(len(p.tasks))
            dispatch = scheduler.run_wells(p.tasks, cfg.compute, on_well, stop)
    except KeyboardInterrupt:
        if not stop.requested:
            raise
        logger.warning("stopped at once")
    interrupted = stop.requested or dispatch.interrupted
    if p is None or not prepared or not store.has_root(store_path):  # stopped before anything was written:
        # the store and its CSV are as they were
        logger.warning("stopped before any field was written; rerun the same command to explain the plate")
        return RunResult(store=store_path, csv=None, summary=summary.build_summary([]),
                         problems=p.problems if p else [], interrupted=True)
    with stop.deferred():  # the ledger and the CSV are written whatever signal comes now
        return _write_results(cfg, p, dispatch.rows, interrupted)


def _prepare(cfg: RunConfig, p: Plan, owner: ownership.Ownership) -> None:
    """prepare_store, and say what the run will do."""
    prepare_store(cfg, p, owner)
    counts = p.counts
    logger.info("%s: %d fields to fit (%d new, %d redone), %d already done, %d failed before; %d wells -> %s",
                cfg.plate.name, counts["run"] + counts["redo"], counts["run"], counts["redo"], counts["done"],
                counts["failed"], len(p.tasks), cfg.output.zarr)
    if counts["objects"]:
        logger.info("%d done fields get their object tables (re)made from their maps (labels or "
                    "explain.top_objects changed)", counts["objects"])
    if counts["qc"]:
        logger.info("%d done fields get their shortcut-QC shares measured again from their maps (the qc "
                    "settings or the label images changed)", counts["qc"])


def _write_results(cfg: RunConfig, p: Plan, rows: list[dict], interrupted: bool) -> RunResult:
    """After the wells: the ledger and plate record (with the stain verdict), the CSV and the object
    tables, all from the store."""
    store_path, csv_path = Path(cfg.output.zarr), Path(cfg.output.csv)
    table, causes, done = collect(cfg, p, rows, interrupted)
    verdicts = verdict.from_records([r for _, r in done], cfg.explain.method) if cfg.explain.fidelity else []
    report = _shortcut_report(cfg, p, table, done)
    store.update_plate_record(store_path, {"last_run": {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S%z"), "fingerprint": p.fingerprint,
        "pcim_version": __version__, "interrupted": interrupted,
        "verdicts": [v.to_dict() for v in verdicts],
        "shortcuts": None if report is None else report.to_dict()}})
    summary.write_csv_atomic(table, csv_path)
    object_csvs, object_failures = objects.write_tables(store_path, cfg.plate.name, csv_path,
                                                        list(cfg.plate.objects or {}), table)
    removed = objects.remove_stale_tables(csv_path, cfg.plate.name, object_csvs.values())
    fitted = sum(1 for r in rows if r["status"] == "done"
                 and r["zarr_path"] not in p.objects_refresh | p.qc_refresh)
    return RunResult(store=store_path, csv=csv_path, summary=table, problems=p.problems, fitted=fitted,
                     interrupted=interrupted, causes=causes, object_csvs=object_csvs,
                     object_failures=object_failures, verdicts=verdicts, removed=removed, shortcuts=report)


def _shortcut_report(cfg: RunConfig, p: Plan, table: pd.DataFrame, done: list[tuple[str, dict]]
                     ) -> shortcuts.Report | None:
    """The plate's shortcut verdict from its done fields (None with qc.enabled false); the outer ring is
    that of the smallest standard plate holding the store's and the layout's wells."""
    if not cfg.qc.enabled:
        return None
    wells = set(table["Metadata_Well"].dropna().astype(str)) if len(table) else set()
    if p.layout is not None and "well" in p.layout.columns:
        wells |= set(p.layout["well"].dropna().astype(str))
    return shortcut_qc.plate_report(done, sorted(wells))


# ---------------------------------------------------------------- a plate of a screen (run/screen.py)


@dataclass
class OpenPlate:
    """A plate of a screen between `open_plate` and `finish_plate`: its lock held, its store prepared."""

    cfg: RunConfig
    plan: Plan
    lock: RunLock

    def release(self) -> None:
        """Give the run lock back (finish_plate does; call it when the run fails in between)."""
        self.lock.__exit__(None, None, None)


def open_plate(cfg: RunConfig, choice: rerun.Rerun, settings: Settings | None = None) -> OpenPlate:
    """What `run` does before its wells, for one plate of a screen (whose StopSignals are the caller's):
    the checks, the run lock, the plan and the prepared store. Raises a PcimError with the lock given
    back: a held lock is a TemporaryFailure (75), a store pcim may not write an OutputError (65)."""
    settings = settings or read_settings()
    preflight(cfg, choice, settings)
    store_path = Path(cfg.output.zarr)
    lock = RunLock(store_path, stale_after_s=settings.lock_stale_s).__enter__()
    try:
        owner = ownership.check_owner(store_path, cfg.plate.name, force=choice.force)
        p = plan(cfg, choice)
        _prepare(cfg, p, owner)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return OpenPlate(cfg, p, lock)


def finish_plate(opened: OpenPlate, rows: list[dict], interrupted: bool) -> RunResult:
    """A screen's plate whose wells are all back (or interrupted): what `run` writes after its wells,
    then the lock given back."""
    try:
        return _write_results(opened.cfg, opened.plan, rows, interrupted)
    finally:
        opened.release()


def collect(cfg: RunConfig, p: Plan, run_rows: list[dict],
            interrupted: bool = False) -> tuple[pd.DataFrame, list, list[dict]]:
    """Write the failure ledger, then build the whole store's CSV table from its records (io/records.py).

    Returns the table, the causes of its failed rows, and the (well, record) pairs of the fields whose
    maps are current (for the stain and shortcut verdicts).
    """
    by_field: dict[tuple[str, int], list[dict]] = {}
    for row in run_rows:
        by_field.setdefault((row["well"], row["site"]), []).append(row)
    store_path = Path(cfg.output.zarr)
    old = store.read_plate_record(store_path).get("failed") or {}
    ledger = rerun.next_ledger(old, p.fields, p.rows, by_field, p.fingerprint, p.scope)
    store.update_plate_record(store_path, {"failed": ledger})
    states, _ = records.store_states(store_path, p.fingerprint)
    plans = {f.path: f for f in p.fields}
    rows, causes, done = [], [], []
    for s in states:
        if s.state == "done":
            rows += summary.rows_from_record(cfg.plate.name, s.well, s.path, s.record)
            done.append((s.well, s.record))
            continue
        if s.state == "failed":
            causes.append(s.cause)
            error = s.error
            now = any(r["status"] == "failed" for r in by_field.get((s.well, s.site), []))
            if s.path in plans and not now:  # a failure of an earlier run, still standing
                error += f" (failed on {(s.failure or {}).get('at', '?')}; rerun with --retry-failed)"
        else:
            error = _why_not_done(s, plans.get(s.path), interrupted)
        site = s.site if s.site is not None else (plans[s.path].site if s.path in plans else None)
        rows.append(failed_row(cfg.plate.name, s.well, site, s.index or 0, error) | {
            "status": "failed" if s.state == "failed" else "skipped", "zarr_path": s.path})
    return summary.build_summary(rows, p.layout), causes, done


def _why_not_done(s: records.FieldState, f: rerun.FieldPlan | None, interrupted: bool) -> str:
    """The PCIM_Error of a skipped row: why the field has no current map."""
    if f is None:
        return f"not in this run (outside plate.wells); {s.state}" + (f": {s.error}" if s.error else "")
    if f.action == "excluded":
        return "not in --only" + (f" ({s.state}: {s.error})" if s.state in ("stale", "damaged") else "")
    if f.fitted:
        return "not run (interrupted)" if interrupted else f"not written ({s.state}{': ' + s.error if s.error else ''})"
    return f.reason or s.error or s.state
