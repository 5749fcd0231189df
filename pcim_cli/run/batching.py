"""The worker's batching: fields -> tiles -> (tile, target) units -> chunks of compute.batch_size through
the fit, stitched back into field maps and written field by field.

`Batcher` queues the units of each field as it is read (run/worker.py) and fits them in chunks: a tiled
field either as a whole through its tiles (explain.tile_maps: field, one map over the field) or every
(tile, target) pair alone (per-tile / evidence, stitched). A chunk that runs out of memory is retried
with half the batch (run/device.py). A finished field gets its object measures (run/objects.py), its
completion record (run/field_record.py) and its maps in the store; a map or a prediction with NaN or
infinite values is never written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcim_cli.engine import absence, fidelity, tiling, trivial
from pcim_cli.engine import field as field_maps
from pcim_cli.engine.attribute import attribute
from pcim_cli.engine.pcim import Forward, PcimOptions
from pcim_cli.engine.verdict import JUDGED, fit_quality
from pcim_cli.errors import PcimError
from pcim_cli.io import store, summary
from pcim_cli.io.model import LoadedModel
from pcim_cli.run import objects, shortcut_qc, threads
from pcim_cli.run.device import MODEL_ERRORS, BatchSize, fast_forward, is_out_of_memory
from pcim_cli.run.failures import FieldError, model_error_problem, non_finite_problem, tile_size_problem
from pcim_cli.run.field_record import STATS, completion_record, mean_stats, unit_stats
from pcim_cli.run.task import FieldFiles, WellTask, field_seed, map_labels, task_failed_row

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)


@dataclass
class _Field:
    """A field being explained: its tiles, class probabilities, targets and the maps stitched so far."""

    files: FieldFiles
    x: torch.Tensor  # (C, H, W), on the CPU
    read_s: float
    grid: tiling.TileGrid
    probs: torch.Tensor  # (K,): the field's prediction (model.aggregate over its tiles)
    targets: list[str]
    stitch: tiling.Stitcher
    tile_probs: torch.Tensor | None = None  # (n_tiles, K): what the model said about each tile
    stats: list[list[dict[str, float]]] = dc_field(default_factory=list)  # per target, one dict per tile
    pending: int = 0  # units not fitted yet
    fit_s: float = 0.0
    inputs: dict[str, Any] = dc_field(default_factory=dict)  # signature of the input files
    warnings: list[str] = dc_field(default_factory=list)
    saturation: tuple[torch.Tensor, list] | None = None  # the shortcut QC's saturated pixels and levels


@dataclass(frozen=True)
class _Unit:
    """One image of the fit: tile `tile` of a field (WHOLE: the whole field, fitted through its tiles at
    once), for its target number `k`."""

    field: _Field
    tile: int
    k: int

    @property
    def images(self) -> int:
        """Model inputs this unit puts in a batch (a whole field: one per tile)."""
        return self.field.grid.n_tiles if self.tile == WHOLE else 1


WHOLE = -1


class Batcher:
    """Queues the units of each field and fits them in chunks, stitching and writing finished fields."""

    def __init__(self, task: WellTask, model: LoadedModel, opts: PcimOptions, explainer: Forward | None = None):
        self.task, self.model, self.opts, self.explainer = task, model, opts, explainer
        self.forward: Forward | None = None  # the model behind the speed levers, set by the first field
        self.device = torch.device(task.device)
        self.batch = BatchSize(task.batch_size, task.device, task.well)
        self.queues: dict[tuple[int, int], list[_Unit]] = {}  # by tile size: one chunk = one tensor shape
        self.n_maps = len(task.channels) if opts.per_channel else 1

    def _fast(self, x: torch.Tensor) -> Forward:
        """The model behind the task's speed levers (channels-last probed on the image x)."""
        task = self.task
        return fast_forward(self.model, x, task.device, task.precision, task.channels_last)

    def add(self, files: FieldFiles, x: torch.Tensor, read_s: float, inputs: dict[str, Any] | None = None,
            warnings: list[str] | None = None, saturation: tuple[torch.Tensor, list] | None = None,
            ) -> list[dict[str, Any]]:
        """Plan and predict one field, queue its units; returns the rows of fields finished meanwhile."""
        try:
            field = self._prepare(files, x, read_s)
        except FieldError as exc:
            logger.warning("%s", exc)
            return [task_failed_row(self.task, files, str(exc), exc.cause, inputs)]
        except PcimError as exc:
            logger.warning("%s", exc)
            return [task_failed_row(self.task, files, str(exc), "model", inputs)]
        except MODEL_ERRORS as exc:
            return [self._fail_row(files, exc, inputs)]
        field.inputs, field.warnings, field.saturation = inputs or {}, warnings or [], saturation
        if self._whole(field):  # one unit per target: the field's tiles fitted together
            queue = self.queues.setdefault(("field", *field.grid.field), [])
            queue += [_Unit(field, WHOLE, k) for k in range(len(field.targets))]
        else:  # a tile's targets in a row: pcim-amortised makes all of them from one explainer forward
            queue = self.queues.setdefault(field.grid.tile, [])
            queue += [_Unit(field, i, k) for i in range(field.grid.n_tiles) for k in range(len(field.targets))]
        rows: list[dict[str, Any]] = []
        while sum(u.images for u in queue) >= self.batch.value:
            rows += self._run(queue)
        return rows

    def _whole(self, field: _Field) -> bool:
        """Is the field fitted as a whole (one map over all its tiles) rather than tile by tile?"""
        return field.grid.n_tiles > 1 and (self.task.tile_maps == "field" or self.task.aggregate == "whole-field")

    def _field_forward(self, field: _Field) -> Forward:
        """The model as the field's classifier (its tiles, aggregated as model.aggregate says), in model
        calls of at most 2 x the batch size tiles: the kept and deleted images of batch-size units, as a
        per-tile fit batches them (checkpointed, so memory follows the batch size, not the field)."""
        return field_maps.TiledForward(self.forward, field.grid, self.task.aggregate, chunk=2 * self.batch.value)

    def finish(self) -> list[dict[str, Any]]:
        """Fit whatever is still queued."""
        rows: list[dict[str, Any]] = []
        for queue in self.queues.values():
            while queue:
                rows += self._run(queue)
        return rows

    def refresh(self, files: FieldFiles, x: torch.Tensor,
                saturation: tuple[torch.Tensor, list] | None = None) -> list[dict[str, Any]]:
        """A done field whose object tables (files.objects_only) or shortcut-QC shares (files.qc_only) need
        (re)making: measured from its stored map, no fit."""
        task = self.task
        record = None
        try:
            grid = tiling.plan_tiles(tuple(x.shape[-2:]), task.input_size)
        except tiling.TileSizeError as exc:
            logger.warning("%s site %s: not measured again: %s", task.well, files.site, exc)
            return []
        if files.objects_only:
            try:
                if self.forward is None:
                    self.forward = self._fast(tiling.cut(x, grid, range(1))[0])
                record = objects.refresh_field(
                    Path(task.store_path), task.well, files.index, x, grid, self.forward, self.opts, task.classes,
                    task.channels, label_files=files.objects, label_problems=files.object_problems,
                    top_k=task.top_objects, batch_size=self.batch.value, device=task.device,
                    objects_signature=files.objects_signature, format=task.store_format, aggregate=task.aggregate)
            except (PcimError, *MODEL_ERRORS) as exc:  # the map stays done; the tables are retried next run
                logger.warning("%s site %s: object tables not remade: %s", task.well, files.site, exc)
        if files.qc_only and task.qc is not None:
            try:
                record = shortcut_qc.refresh_field(Path(task.store_path), task.well, files.index, x, saturation, grid,
                                                   task.qc, label_files=files.objects)
            except PcimError as exc:  # the map stays done; the shares are measured on the next run
                logger.warning("%s site %s: shortcut QC not measured again: %s", task.well, files.site, exc)
        if record is None:
            return []
        return summary.rows_from_record(task.plate, task.well, store.field_path(task.well, files.index), record)

    def _prepare(self, files: FieldFiles, x: torch.Tensor, read_s: float) -> _Field:
        task = self.task
        try:
            grid = tiling.plan_tiles(tuple(x.shape[-2:]), task.input_size)
        except tiling.TileSizeError as exc:
            raise FieldError(tile_size_problem(task.well, files.site, exc, task.input_size), "model") from exc
        if self.forward is None:  # on a CPU, the first fit steps may decide the torch threads (threads.py)
            self.forward = threads.probing(self._fast(tiling.cut(x, grid, range(1))[0]),
                                           task.device, steps=_makes_steps(task, self.opts))
        probs, tile_probs = self._predict(x, grid)
        if not (torch.isfinite(probs).all() and torch.isfinite(tile_probs).all()):
            raise FieldError(non_finite_problem(task.well, files.site, task.model_path, x, "logits"), "model")
        targets = _targets(task, int(probs.argmax()))
        contrastive = self._contrastive(x, grid, probs) if task.targets is None and task.contrastive else None
        if contrastive is not None:  # issue 26: a call resting on what is missing, and the runner-up's map
            targets.append(task.classes[contrastive])
        field = _Field(files, x, read_s, grid, probs, targets,
                       tiling.Stitcher(grid, len(targets) * self.n_maps),
                       stats=[[] for _ in targets], tile_probs=tile_probs)
        field.pending = len(targets) * (1 if self._whole(field) else grid.n_tiles)
        return field

    def _contrastive(self, x: torch.Tensor, grid: tiling.TileGrid, probs: torch.Tensor) -> int | None:
        """explain.target contrastive: the runner-up class when the predicted one survives the deletion of
        the whole field (engine/absence.py `contrastive_class`: its map would hold nothing; the runner-up's
        shows where the evidence it lacks comes closest). Two more predictions of the field, pcim only."""
        if self.task.method not in ("pcim", "pcim-amortised") or len(probs) < 2:
            return None
        if bool((x.amax(dim=(-2, -1)) == x.amin(dim=(-2, -1))).all()):  # a blank field: nothing to contrast
            return None
        try:
            full = torch.stack([self._predict(image, grid)[0]
                                for image in absence.full_deletion_images(x[None])]).amin(0)
        except MODEL_ERRORS as exc:
            if is_out_of_memory(exc):
                raise
            return None
        return absence.contrastive_class(probs, full)

    def _predict(self, x: torch.Tensor, grid: tiling.TileGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """The field's class probabilities (model.aggregate over its tiles, or the model on the whole
        field) and each tile's (chunks of batch_size, with the OOM back-off)."""
        logits = []
        start = 0
        while start < grid.n_tiles:
            part = range(start, min(start + self.batch.value, grid.n_tiles))
            try:
                with torch.no_grad():
                    logits.append(self.forward(tiling.cut(x, grid, part).to(self.device)).float().cpu())
            except MODEL_ERRORS as exc:
                if not is_out_of_memory(exc):
                    raise
                self.batch.shrink(len(part))
                continue
            start = part.stop
        tile_logits = torch.cat(logits)
        if self.task.aggregate == "whole-field" and grid.n_tiles > 1:
            with torch.no_grad():
                field_logits = self.forward(x[None].to(self.device)).float().cpu()[0]
        else:
            field_logits = field_maps.aggregate_logits(tile_logits[None], self.task.aggregate
                                                       if grid.n_tiles > 1 else "mean-prob")[0]
        return torch.softmax(field_logits, dim=0), torch.softmax(tile_logits, dim=1)

    def _run(self, queue: list[_Unit]) -> list[dict[str, Any]]:
        """Fit the first chunk of the queue (halving it on out-of-memory) and stitch its maps."""
        chunk = _take(queue, self.batch.value)
        try:
            t0 = time.perf_counter()
            result, dele, ins, checks = self._fit(chunk)
            per_unit = (time.perf_counter() - t0) / len(chunk)
        except PcimError as exc:
            return self._fail(queue, chunk, exc)
        except MODEL_ERRORS as exc:
            if not is_out_of_memory(exc):
                return self._fail(queue, chunk, exc)
            tried = sum(u.images for u in chunk)
            if len(chunk) == 1 and chunk[0].tile == WHOLE:  # one field: its tiles go in smaller model calls
                f = chunk[0].field
                if self.batch.value <= 1:
                    return self._fail(queue, chunk, PcimError(
                        f"{self.task.well} site {f.files.site}: out of memory on {self.task.device} fitting the "
                        f"field's {f.grid.n_tiles} tiles together (explain.tile_maps: field), even 2 tiles per "
                        "model call; set explain.tile_maps: per-tile, or use a device with more memory"))
                tried = min(tried, self.batch.value)
            try:
                self.batch.shrink(tried)
            except PcimError as err:
                return self._fail(queue, chunk, err)
            return []
        del queue[: len(chunk)]
        rows = []
        weights = (field_maps.evidence_weights(result.prob_original, result.prob_deleted)
                   if self.task.tile_maps == "evidence" else None)
        for j, unit in enumerate(chunk):
            f = unit.field
            rows_k = slice(unit.k * self.n_maps, (unit.k + 1) * self.n_maps)
            if unit.tile == WHOLE:
                f.stitch.out[rows_k] += result.maps[j].to(f.stitch.out.dtype).cpu()
            else:
                tile_map = result.maps[j] if weights is None or f.grid.n_tiles == 1 else result.maps[j] * weights[j]
                f.stitch.add(unit.tile, tile_map, rows_k)
            f.stats[unit.k].append(unit_stats(result, j, dele[j], ins[j], checks[j]))
            f.fit_s += per_unit
            f.pending -= 1
            if f.pending == 0:
                rows += self._write(f)
        return rows

    def _fit(self, chunk: list[_Unit]):
        task, opts = self.task, self.opts
        forward = self.forward
        if chunk[0].tile == WHOLE:  # whole fields through their tiles (one queue per field size)
            x = torch.stack([u.field.x for u in chunk]).to(self.device)
            forward = self._field_forward(chunk[0].field)
        else:
            x = torch.cat([tiling.cut(u.field.x, u.field.grid, [u.tile]) for u in chunk]).to(self.device)
        tt = torch.tensor([task.classes.index(u.field.targets[u.k]) for u in chunk], device=self.device)
        seeds = torch.tensor([field_seed(opts.seed, task.well, u.field.files.site, u.field.targets[u.k])
                              + max(u.tile, 0) for u in chunk])
        # PCIM grows each map's budget within its fit (explain.adaptive_budget); result.budget says where it ended
        result = attribute(forward, x, tt, task.method, opts, seeds=seeds, explainer=self.explainer,
                           prob_original=_known_probs(chunk, tt))
        if task.method in ("pcim", "pcim-amortised"):  # PCIM_Fit's label test (issue 26); baselines fit nothing
            result.prob_full_deleted = _full_deletion(forward, x, tt)
        checked = [self._checked(u, result, j) for j, u in enumerate(chunk)]
        dele, ins, checks = _fidelity(forward, x, result, tt, chunk, task, opts, checked)
        return result, dele, ins, checks

    def _checked(self, unit: _Unit, result, j: int) -> bool:
        """Does the stain check run on this unit? The fields run/sampling.py picks for it (each well's first
        field when every field is measured), where the map holds evidence (PCIM_Fit ok / weak: a verdict
        never judges the others); every tile of a per-tile field."""
        if not unit.field.files.stain_check:
            return False
        if unit.tile != WHOLE and unit.field.grid.n_tiles > 1:
            return True
        full = getattr(result, "prob_full_deleted", None)
        probs = [float(getattr(result, k)[j]) for k in STATS[:3]] + ([float(full[j])] if full is not None else [])
        return fit_quality(*probs) in (*JUDGED, "")  # "": a method that fits nothing

    def _fail(self, queue: list[_Unit], chunk: list[_Unit], exc: BaseException) -> list[dict[str, Any]]:
        """Fail every field with a unit in the chunk and drop their queued units."""
        fields = list({id(u.field): u.field for u in chunk}.values())
        dead = {id(f) for f in fields}
        queue[:] = [u for u in queue if id(u.field) not in dead]
        return [self._fail_row(f.files, exc, f.inputs) for f in fields]

    def _fail_row(self, files: FieldFiles, exc: BaseException, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        if isinstance(exc, FieldError):
            msg, cause = str(exc), exc.cause
        elif isinstance(exc, PcimError):
            msg, cause = str(exc), "other"
        else:  # a model that fails on this input
            msg, cause = model_error_problem(self.task.well, exc), "model"
        logger.warning("%s", msg)
        return task_failed_row(self.task, files, msg, cause, inputs)

    def _write(self, f: _Field) -> list[dict[str, Any]]:
        """The field's record and maps into the store; its summary rows. A map with NaN or infinite values
        is not written: the field fails, naming the model."""
        task = self.task
        maps = f.stitch.out.numpy()  # (targets * M, H, W)
        per_target = {t: mean_stats(f.stats[k], task.channels) for k, t in enumerate(f.targets)}
        # prob_mixed / prob_deleted are NaN by design for the gradient baselines; prob_original never is
        probabilities = [stats["prob_original"] for stats in per_target.values()]
        if not np.isfinite(maps).all() or not np.isfinite(probabilities).all():
            msg = non_finite_problem(task.well, f.files.site, task.model_path, f.x, "values during the fit")
            logger.warning("%s", msg)
            return [task_failed_row(task, f.files, msg, "model", f.inputs)]
        record = completion_record(
            task, site=f.files.site, targets=f.targets, probs=f.probs, results=per_target, inputs=f.inputs,
            warnings=f.warnings, grid=f.grid, maps="field" if self._whole(f) else task.tile_maps,
            tile_probs=f.tile_probs, batch_size=self.batch.value, timings={"read": f.read_s, "fit": f.fit_s},
            seed=self.opts.seed,
            fidelity=("measured" if f.files.fidelity else "not sampled") if task.fidelity else "off")
        labels = map_labels(f.targets, task.channels, self.opts.per_channel)
        found = objects.measure_field(
            f.x, f.stitch.out, f.targets, task.classes, task.channels, f.grid, self.forward, self.opts,
            label_files=f.files.objects, label_problems=f.files.object_problems, top_k=task.top_objects,
            batch_size=self.batch.value, device=task.device, where=f"{task.well} site {f.files.site}",
            objects_signature=f.files.objects_signature, format=task.store_format, aggregate=task.aggregate)
        found.update_record(record)
        if task.qc is not None:  # where the map lies (docs/shortcuts.md), from the map in memory
            shortcut_qc.measure_into(record, f.stitch.out, f.targets, f.x, f.saturation, f.grid, task.qc,
                                     label_files=f.files.objects, labels=found.labels,
                                     where=f"{task.well} site {f.files.site}")
        try:
            rel = store.write_field(Path(task.store_path), task.well, f.files.index, maps, labels, record,
                                    format=task.store_format,
                                    extra=found.write if found.labels or found.tables else None)
        except PcimError as exc:
            logger.warning("%s", exc)
            return [task_failed_row(task, f.files, str(exc), "output", f.inputs)]
        return summary.rows_from_record(task.plate, task.well, rel, record)


def _full_deletion(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """p(target) (B,) of each image fully deleted (engine/absence.py): NaN where the model fails on it."""
    try:
        probs = absence.full_deletion_probs(forward, x)
    except MODEL_ERRORS as exc:
        if is_out_of_memory(exc):
            raise
        logger.debug("the model fails on the fully deleted image (%s): no no-local-evidence label", exc)
        return torch.full((x.shape[0],), float("nan"))
    return probs.gather(1, target.to(probs.device).view(-1, 1))[:, 0].cpu()


def _fidelity(forward: Forward, x: torch.Tensor, result, tt: torch.Tensor, chunk: list[_Unit], task: WellTask,
              opts: PcimOptions, checked: list[bool]) -> tuple[list[float], list[float], list[dict | None]]:
    """Deletion / insertion AUCs and stain checks of the chunk's maps, on the units whose field is in the
    fidelity sample (run/sampling.py; NaN / None elsewhere; the stain check where `checked`), in forward
    batches no larger than the fit's
    (engine/fidelity.py: the map-free points once per field, shared by its targets)."""
    n = len(chunk)
    dele, ins = [float("nan")] * n, [float("nan")] * n
    checks: list[dict | None] = [None] * n
    rows = [j for j, u in enumerate(chunk) if u.field.files.fidelity] if task.fidelity else []
    if not rows:
        return dele, ins, checks
    kw = {"chunk": min(64, 2 * n)}
    idx = torch.tensor(rows, device=x.device)
    xs, maps, ts, p0 = x[idx], result.maps[idx], tt[idx], result.prob_original[idx]
    d, i = fidelity.deletion_insertion(forward, xs, maps, ts, p0, **kw)
    for r, j in enumerate(rows):
        dele[j], ins[j] = float(d[r]), float(i[r])
    if task.method not in trivial.TRIVIAL:  # for the plate's verdict (sampling.py: which fields)
        found = fidelity.stain_check_rows(forward, xs, maps, ts, p0, opts, task.channels,
                                          [checked[j] for j in rows], **kw)
        for r, j in enumerate(rows):
            checks[j] = found[r]
    return dele, ins, checks


def _known_probs(chunk: list[_Unit], tt: torch.Tensor) -> torch.Tensor | None:
    """p(target | tile) of the chunk's units from their fields' predictions (`_predict`: the same model
    call on the same tiles), so a method needs no forward for it; None for whole-field units."""
    if any(u.tile == WHOLE or u.field.tile_probs is None for u in chunk):
        return None
    probs = torch.stack([u.field.tile_probs[u.tile] for u in chunk])
    return probs.gather(1, tt.cpu().view(-1, 1))[:, 0].to(tt.device)


#: methods that call the model without fit steps (amortised without refine: `_makes_steps`)
FORWARD_ONLY = ("occlusion", "rise", "intensity", "contrast")


def _makes_steps(task: WellTask, opts: PcimOptions) -> bool:
    """Does the method make fit steps (calls with gradients, repeated) for the thread probe to time? If not,
    the probe times whole wells (run/threads.py WellProbe)."""
    if task.method == "pcim-amortised":
        return opts.refine_steps > 0
    return task.method not in FORWARD_ONLY


def _take(queue: list[_Unit], images: int) -> list[_Unit]:
    """The first units of the queue that fit in `images` model inputs (at least one unit)."""
    n, used = 0, 0
    while n < len(queue) and (n == 0 or used + queue[n].images <= images):
        used += queue[n].images
        n += 1
    return queue[:n]


def _targets(task: WellTask, predicted: int) -> list[str]:
    return list(task.targets) if task.targets is not None else [task.classes[predicted]]
