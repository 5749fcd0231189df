"""The unit of work: one well in, its summary rows out.

`explain_well` is the one function a scheduler sends out. Its argument is a small JSON-dumpable
`WellTask` (everything a worker needs, no open handles), so the same call runs in-process, in a Dask
worker process or on a SLURM node. The worker reads and normalises the well's fields one at a time,
cuts each into tiles of model.input_size (tiling.py; one tile when the field is the model's size or
input_size is null), makes the field's prediction from its tiles (model.aggregate, engine/field.py),
fits in chunks of compute.batch_size model inputs (halved while the device runs out of memory) either
each field as a whole through its tiles (explain.tile_maps: field, one map over the field) or every
(tile, target) pair alone (per-tile / evidence, stitched), writes its own field groups of the store,
and returns one row per (field, target). The record keeps every tile's class probabilities. With
fidelity on, the maps of each well's first field also carry their stain check (engine/trivial.py: the
deletion AUCs of the map and of the maps without a model, for the plate's verdict). A field
that fails is recorded as failed with its message and its cause (data: its images; model: the model
raises, returns non-finite values, or needs a larger input than the field; output: the store cannot be
written); the other fields go on, and no error of one field reaches a field already written. A map or
a prediction with NaN or infinite values is never written. Each field's record keeps the signature of
its input files (io/signature.py) and warnings (a constant channel) that its CSV row shows.
"""

from __future__ import annotations

import logging
import socket
import time
import zlib
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pcim_cli import __version__
from pcim_cli.engine import field as field_maps
from pcim_cli.engine import metrics, tiling, trivial
from pcim_cli.engine.attribute import attribute
from pcim_cli.engine.budget import fit_adaptive, fit_quality
from pcim_cli.engine.pcim import FastForward, Forward, PcimOptions
from pcim_cli.errors import PcimError
from pcim_cli.io import images, ome_zarr_plate, signature, store, summary
from pcim_cli.io.explainer import load_explainer
from pcim_cli.io.model import LoadedModel, _summary, load_model
from pcim_cli.run import objects, threads
from pcim_cli.run.failures import (
    FieldError,
    constant_channels,
    failed_row,
    model_error_problem,
    non_finite_problem,
    tile_size_problem,
)

logger = logging.getLogger(__name__)


class FieldFiles(BaseModel):
    """One field of a well: its site number (from the file name), its index in the store, its files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: int
    index: int
    files: tuple[str, ...]
    stat: list[dict[str, Any]] = []  # the planner's stat signature of `files` (io/signature.py)
    # plate.objects (run/objects.py): kind -> label file, kind -> why there is none, what they depend on
    objects: dict[str, str] = {}
    object_problems: dict[str, str] = {}
    objects_signature: str = ""
    objects_only: bool = False  # a done field whose object tables are (re)made from its stored map
    zarr: dict[str, Any] | None = None  # an OME-Zarr field: how to read it (io/ome_zarr_plate.ZarrField)


class WellTask(BaseModel):
    """Everything a worker needs to explain one well (JSON-dumpable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plate: str
    well: str
    fields: tuple[FieldFiles, ...]
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    targets: tuple[str, ...] | None  # class names to explain; None = the predicted class
    normalize: dict[str, Any]
    model_path: str
    model_sha256: str
    input_size: tuple[int, int] | None = None
    field_size: tuple[int, int] | None = None  # (H, W) of the plate's fields; a field of another size fails
    aggregate: str = "mean-logit"  # how a tiled field's prediction is made (model.aggregate)
    tile_maps: str = "field"  # one fit over a tiled field's pixels, or per tile (explain.tile_maps)
    adaptive_budget: float | None = None  # grow the budget up to this share until the class is lost; None: fixed
    method: str = "pcim"
    engine: dict[str, Any]
    explainer_path: str | None = None  # pcim-amortised: the trained explainer (checked by the driver)
    explainer_sha256: str | None = None
    batch_size: int = 16
    channels_last: bool = True
    precision: str = "float32"
    device: str = "cpu"
    fidelity: bool = True  # deletion / insertion AUC per map
    top_objects: int = 3  # objects deleted together for a field's top-k drop (explain.top_objects)
    store_path: str
    store_format: str = "0.5"
    fingerprint: str
    timepoint: int | None = None  # plate.timepoint: the time point read from a T axis
    package: dict[str, Any] | None = None  # model.path a bioimage.io package: what was taken (field records)


_MODELS: dict[tuple[str, str], LoadedModel] = {}
_EXPLAINERS: dict[tuple[str, str], Forward] = {}
_CHANNELS_LAST: dict[tuple[str, str], bool] = {}  # (model sha256, device) -> same logits with NHWC inputs


def fast_forward(task: WellTask, model: LoadedModel, x: torch.Tensor) -> Forward:
    """The model behind the speed levers the task asks for.

    channels_last is kept only when the model runs with NHWC inputs and gives the same logits (a model
    that calls `.view` on its activations cannot): probed once per worker process and model, on the
    image `x` (C, H, W).
    """
    channels_last = False
    if task.channels_last:
        key = (task.model_sha256, task.device)
        if key not in _CHANNELS_LAST:
            _CHANNELS_LAST[key] = _same_with_channels_last(model.module, x.to(task.device))
        channels_last = _CHANNELS_LAST[key]
    if not channels_last and task.precision == "float32":
        return model.module
    return FastForward(model.module, task.precision, channels_last)


def _same_with_channels_last(module: Forward, x: torch.Tensor) -> bool:
    with torch.no_grad():
        ref = module(x[None])
        try:
            got = module(x[None].contiguous(memory_format=torch.channels_last))
        except Exception as exc:  # noqa: BLE001 - any failure means: keep NCHW
            logger.info("model does not take channels-last inputs (%s); using NCHW", type(exc).__name__)
            return False
    same = got.shape == ref.shape and torch.allclose(got.float(), ref.float(), rtol=1e-4, atol=1e-5)
    if not same:
        logger.info("model gives other logits with channels-last inputs; using NCHW")
    return bool(same)




def _explainer(task: WellTask) -> Forward | None:
    """The task's explainer (pcim-amortised), loaded once per worker process, behind compute.precision."""
    if task.method != "pcim-amortised":
        return None
    key = (str(task.explainer_sha256), task.device)
    if key not in _EXPLAINERS:
        if task.explainer_path is None:
            raise PcimError(f"{task.well}: explain.method pcim-amortised but no explainer; set explain.explainer")
        loaded = load_explainer(task.explainer_path, device=task.device)
        if loaded.sha256 != task.explainer_sha256:
            raise PcimError(f"{task.well}: the explainer {task.explainer_path} changed during the run (sha256 "
                            f"{loaded.sha256}, planned with {task.explainer_sha256}); rerun pcim explain")
        module = loaded.module
        _EXPLAINERS[key] = module if task.precision == "float32" else FastForward(module, task.precision)
    return _EXPLAINERS[key]


def _model(task: WellTask) -> LoadedModel:
    """The task's model, loaded once per worker process (keyed by its sha256 and device)."""
    key = (task.model_sha256, task.device)
    if key not in _MODELS:
        _MODELS[key] = load_model(Path(task.model_path), len(task.channels), task.input_size,
                                  device=task.device)
    return _MODELS[key]


def field_seed(seed: int, well: str, site: int, target: str) -> int:
    """A per-map seed that does not depend on which maps share a batch."""
    return seed * 7919 + zlib.crc32(f"{well}:{site}:{target}".encode())


def map_labels(targets: list[str], channels: tuple[str, ...], per_channel: bool) -> list[str]:
    """Store channel labels: `<target>` (shared map) or `<target>:<channel>` (per channel)."""
    if per_channel:
        return [f"{t}:{c}" for t in targets for c in channels]
    return list(targets)


def _source(task: WellTask, field: FieldFiles) -> images.FieldSource:
    zarr = None if field.zarr is None else ome_zarr_plate.ZarrField.from_dict(field.zarr)
    return images.FieldSource(task.well, field.site, tuple(Path(f) for f in field.files), zarr=zarr,
                              timepoint=task.timepoint)


def _read_raw(task: WellTask, field: FieldFiles) -> np.ndarray:
    return images.read_field(_source(task, field), len(task.channels))


def _normalise(task: WellTask, img: np.ndarray) -> np.ndarray:
    norm = dict(task.normalize)
    method = norm.pop("method", "percentile")
    return images.normalize(img, method, **norm)


def explain_well(task: WellTask) -> list[dict[str, Any]]:
    """Explain every field of one well; returns summary rows (one per field and target).

    Fields are read one at a time and cut into tiles of model.input_size (one tile when input_size is
    null or the field's size); the (tile, target) pairs of consecutive fields go through the fit in
    chunks of compute.batch_size, so memory holds one chunk plus the fields it touches. An unexpected
    error fails the fields not written yet, never those already in the store.
    """
    opts = PcimOptions(**task.engine)
    rows: list[dict[str, Any]] = []
    batcher: _Batcher | None = None
    try:
        for field in task.fields:
            read = _read_checked(task, field)
            if isinstance(read, dict):  # a failed row
                rows.append(read)
                continue
            img, read_s, inputs, warnings = read
            if batcher is None:
                try:
                    batcher = _Batcher(task, _model(task), opts, _explainer(task))
                except PcimError as exc:
                    rows.append(_failed_row(task, field, str(exc), "model", inputs))
                    continue
            rows += (batcher.refresh_objects(field, img) if field.objects_only
                     else batcher.add(field, img, read_s, inputs, warnings))
        if batcher is not None:
            rows += batcher.finish()
    except Exception as exc:  # noqa: BLE001 - a bug must not fail the fields already written
        reported = {r["site"] for r in rows}
        msg = f"{task.well}: {type(exc).__name__}: {_summary(exc)}"
        logger.warning("%s", msg, exc_info=logger.isEnabledFor(logging.DEBUG))
        rows += [_failed_row(task, f, msg, "other") for f in task.fields if f.site not in reported]
    return rows


def _read_checked(task: WellTask, field: FieldFiles):
    """(image, seconds, input signature, warnings) of a field, or its failed row."""
    t0 = time.perf_counter()
    inputs = signature.signature(field.files, field.stat or None)
    try:
        raw = _read_raw(task, field)
    except PcimError as exc:
        logger.warning("%s", exc)
        return _failed_row(task, field, str(exc), "data", inputs)
    where = _source(task, field).where
    warnings = constant_channels(raw, task.channels, field.files if field.zarr is None else (where,))
    img = torch.from_numpy(_normalise(task, raw))
    read_s = time.perf_counter() - t0
    if task.field_size is not None and tuple(img.shape[-2:]) != tuple(task.field_size):
        msg = images.size_problem(task.well, field.site, tuple(img.shape[-2:]), task.field_size, where)
        logger.warning("%s", msg)
        return _failed_row(task, field, msg, "data", inputs)
    for w in warnings:
        logger.warning("%s site %d: %s", task.well, field.site, w)
    return img, read_s, inputs, warnings


# --------------------------------------------------------------------------------------------------
# batching: fields -> tiles -> (tile, target) units -> chunks of batch_size through the fit


class _BatchSize:
    """compute.batch_size, halved for the rest of the well each time a chunk runs out of memory."""

    def __init__(self, task: WellTask):
        self.task = task
        self.value = task.batch_size
        self.warned = False

    def shrink(self, tried: int) -> None:
        """After an out-of-memory error at `tried` images: halve, or raise once at 1."""
        if tried <= 1:
            raise PcimError(
                f"{self.task.well}: out of memory on {self.task.device} even with one image per batch "
                f"(compute.batch_size: {self.task.batch_size} was halved down to 1); use a device with "
                "more memory or a smaller model.input_size"
            )
        self.value = max(1, tried // 2)
        _empty_cache(self.task.device)
        log = logger.debug if self.warned else logger.warning
        log("%s: out of memory with %d images per batch on %s; retrying with %d "
            "(set compute.batch_size: %d or lower to skip the retries)",
            self.task.well, tried, self.task.device, self.value, self.value)
        self.warned = True


#: what a model that fails on its input raises (TorchScript's own error is no RuntimeError)
MODEL_ERRORS = (RuntimeError, ValueError, MemoryError, torch.jit.Error)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, also when a TorchScript model re-raises it in its own error."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, torch.jit.Error)) and (
        "out of memory" in text or "can't allocate memory" in text)


def _empty_cache(device: str) -> None:
    """Give the blocks of the failed attempt back to the GPU before the retry."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


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


class _Batcher:
    """Queues the units of each field and fits them in chunks, stitching and writing finished fields."""

    def __init__(self, task: WellTask, model: LoadedModel, opts: PcimOptions, explainer: Forward | None = None):
        self.task, self.model, self.opts, self.explainer = task, model, opts, explainer
        self.forward: Forward | None = None  # the model behind the speed levers, set by the first field
        self.device = torch.device(task.device)
        self.batch = _BatchSize(task)
        self.queues: dict[tuple[int, int], list[_Unit]] = {}  # by tile size: one chunk = one tensor shape
        self.n_maps = len(task.channels) if opts.per_channel else 1

    def add(self, files: FieldFiles, x: torch.Tensor, read_s: float, inputs: dict[str, Any] | None = None,
            warnings: list[str] | None = None) -> list[dict[str, Any]]:
        """Plan and predict one field, queue its units; returns the rows of fields finished meanwhile."""
        try:
            field = self._prepare(files, x, read_s)
        except FieldError as exc:
            logger.warning("%s", exc)
            return [_failed_row(self.task, files, str(exc), exc.cause, inputs)]
        except PcimError as exc:
            logger.warning("%s", exc)
            return [_failed_row(self.task, files, str(exc), "model", inputs)]
        except MODEL_ERRORS as exc:
            return [self._fail_row(files, exc, inputs)]
        field.inputs, field.warnings = inputs or {}, warnings or []
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

    def refresh_objects(self, files: FieldFiles, x: torch.Tensor) -> list[dict[str, Any]]:
        """A done field whose object tables need (re)making: measured from its stored map, no fit."""
        task = self.task
        try:
            grid = tiling.plan_tiles(tuple(x.shape[-2:]), task.input_size)
            if self.forward is None:
                self.forward = fast_forward(task, self.model, tiling.cut(x, grid, range(1))[0])
            record = objects.refresh_field(
                Path(task.store_path), task.well, files.index, x, grid, self.forward, self.opts, task.classes,
                task.channels, label_files=files.objects, label_problems=files.object_problems,
                top_k=task.top_objects, batch_size=self.batch.value, device=task.device,
                objects_signature=files.objects_signature, format=task.store_format, aggregate=task.aggregate)
        except (PcimError, *MODEL_ERRORS) as exc:  # the map stays done; the tables are retried next run
            logger.warning("%s site %s: object tables not remade: %s", task.well, files.site, exc)
            return []
        return summary.rows_from_record(task.plate, task.well, store.field_path(task.well, files.index), record)

    def _prepare(self, files: FieldFiles, x: torch.Tensor, read_s: float) -> _Field:
        task = self.task
        try:
            grid = tiling.plan_tiles(tuple(x.shape[-2:]), task.input_size)
        except tiling.TileSizeError as exc:
            raise FieldError(tile_size_problem(task.well, files.site, exc, task.input_size), "model") from exc
        if self.forward is None:  # on a CPU, the first fit steps may decide the torch threads (threads.py)
            self.forward = threads.probing(fast_forward(task, self.model, tiling.cut(x, grid, range(1))[0]),
                                           task.device)
        probs, tile_probs = self._predict(x, grid)
        if not (torch.isfinite(probs).all() and torch.isfinite(tile_probs).all()):
            raise FieldError(non_finite_problem(task.well, files.site, task.model_path, x, "logits"), "model")
        targets = _targets(task, int(probs.argmax()))
        field = _Field(files, x, read_s, grid, probs, targets,
                       tiling.Stitcher(grid, len(targets) * self.n_maps),
                       stats=[[] for _ in targets], tile_probs=tile_probs)
        field.pending = len(targets) * (1 if self._whole(field) else grid.n_tiles)
        return field

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
            f.stats[unit.k].append(_unit_stats(result, j, dele[j], ins[j], checks[j]))
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
        if task.adaptive_budget is not None and task.method == "pcim":
            result, budgets = fit_adaptive(forward, x, tt, opts, seeds=seeds, max_budget=task.adaptive_budget)
            result.budget = budgets
        else:
            result = attribute(forward, x, tt, task.method, opts, seeds=seeds, explainer=self.explainer)
        dele = ins = [float("nan")] * len(chunk)
        checks: list[dict | None] = [None] * len(chunk)
        if task.fidelity:  # perturbed images in forward batches no larger than the fit's
            kw = {"chunk": min(64, 2 * len(chunk))}
            dele = metrics.deletion_auc(forward, x, result.maps, tt, **kw).tolist()
            ins = metrics.insertion_auc(forward, x, result.maps, tt, substrate="blur", **kw).tolist()
            if task.method not in trivial.TRIVIAL:  # for the plate's verdict, on each well's first field (cheap)
                checks = trivial.stain_check_rows(forward, x, result.maps, tt, opts, task.channels,
                                                  [u.field.files.index == 0 for u in chunk], **kw)
        return result, dele, ins, checks

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
        return _failed_row(self.task, files, msg, cause, inputs)

    def _write(self, f: _Field) -> list[dict[str, Any]]:
        """The field's record and maps into the store; its summary rows. A map with NaN or infinite values
        is not written: the field fails, naming the model."""
        task = self.task
        maps = f.stitch.out.numpy()  # (targets * M, H, W)
        per_target = {t: _mean_stats(f.stats[k], task.channels) for k, t in enumerate(f.targets)}
        # prob_mixed / prob_deleted are NaN by design for the gradient baselines; prob_original never is
        probabilities = [stats["prob_original"] for stats in per_target.values()]
        if not np.isfinite(maps).all() or not np.isfinite(probabilities).all():
            msg = non_finite_problem(task.well, f.files.site, task.model_path, f.x, "values during the fit")
            logger.warning("%s", msg)
            return [_failed_row(task, f.files, msg, "model", f.inputs)]
        predicted = task.classes[int(f.probs.argmax())]
        record = {
            "status": "done",
            "site": f.files.site,
            "targets": f.targets,
            "predicted_class": predicted,
            "class_probabilities": dict(zip(task.classes, f.probs.tolist(), strict=True)),
            "results": per_target,
            "settings": {"normalize": task.normalize, "engine": task.engine, "channels": list(task.channels)},
            "fingerprint": task.fingerprint,
            "inputs": f.inputs,
            "warnings": f.warnings,
            "model_sha256": task.model_sha256,
            **({"model_package": task.package} if task.package else {}),
            **({"explainer_sha256": task.explainer_sha256} if task.explainer_sha256 else {}),
            "pcim_version": __version__,
            "seed": self.opts.seed,
            "host": socket.gethostname(),
            "tiling": {**f.grid.record(), "aggregate": task.aggregate,
                       "maps": "field" if self._whole(f) else task.tile_maps,
                       "tile_probabilities": [[round(float(p), 6) for p in row] for row in f.tile_probs]},
            "batch_size": self.batch.value,
            "timings_s": {"read": f.read_s, "fit": f.fit_s},
            "peak_memory_mib": peak_memory_mib(task.device),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        labels = map_labels(f.targets, task.channels, self.opts.per_channel)
        found = objects.measure_field(
            f.x, f.stitch.out, f.targets, task.classes, task.channels, f.grid, self.forward, self.opts,
            label_files=f.files.objects, label_problems=f.files.object_problems, top_k=task.top_objects,
            batch_size=self.batch.value, device=task.device, where=f"{task.well} site {f.files.site}",
            objects_signature=f.files.objects_signature, format=task.store_format, aggregate=task.aggregate)
        found.update_record(record)
        try:
            rel = store.write_field(Path(task.store_path), task.well, f.files.index, maps, labels, record,
                                    format=task.store_format, extra=found.write)
        except PcimError as exc:
            logger.warning("%s", exc)
            return [_failed_row(task, f.files, str(exc), "output", f.inputs)]
        return summary.rows_from_record(task.plate, task.well, rel, record)


_STATS = ("prob_original", "prob_mixed", "prob_deleted", "loss")


def _take(queue: list[_Unit], images: int) -> list[_Unit]:
    """The first units of the queue that fit in `images` model inputs (at least one unit)."""
    n, used = 0, 0
    while n < len(queue) and (n == 0 or used + queue[n].images <= images):
        used += queue[n].images
        n += 1
    return queue[:n]


def _unit_stats(result, j: int, dele: float, ins: float, check: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {k: float(getattr(result, k)[j]) for k in _STATS}
    budget = getattr(result, "budget", None)
    if budget is not None:
        out["budget"] = float(budget[j])
    out.update(deletion_auc=float(dele), insertion_auc=float(ins), steps=int(result.steps[j]))
    if result.channel is not None:  # intensity maps: the channel shown
        out["channel"] = int(result.channel[j])
    if check is not None:  # name -> [fine, coarse] deletion AUC
        out["stain_check"] = check
    return out


def _mean_stats(tiles: list[dict[str, Any]], channels: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-field statistics: the mean over its tiles (steps stays an int when it is one), the fit's
    verdict (ok / weak / failed, engine/budget.py) from the field's probabilities; an intensity map's
    channel: the one most of its tiles show."""
    keys = [k for k in (*_STATS, "budget", "deletion_auc", "insertion_auc", "steps") if k in tiles[0]]
    out: dict[str, Any] = {k: float(np.mean([t[k] for t in tiles])) for k in keys}
    steps = out["steps"]
    out["steps"] = int(steps) if float(steps).is_integer() else steps
    out["fit"] = fit_quality(out["prob_original"], out["prob_mixed"], out["prob_deleted"])
    if "channel" in tiles[0]:
        shown = [t["channel"] for t in tiles]
        out["intensity_channel"] = channels[max(set(shown), key=shown.count)]
    if "stain_check" in tiles[0]:
        out["stain_check"] = {name: np.mean([t["stain_check"][name] for t in tiles], axis=0).tolist()
                              for name in tiles[0]["stain_check"]}
    return out


def peak_memory_mib(device: str = "cpu") -> dict[str, float | None]:
    """Peak resident memory of this process and, on CUDA, peak memory allocated by torch (MiB).

    Linux: VmHWM of /proc/self/status (the getrusage peak would include a forking parent's memory);
    elsewhere getrusage where it exists.
    """
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        try:
            import resource

            rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
        except ImportError:  # Windows
            pass
    cuda = None
    if device.startswith("cuda") and torch.cuda.is_available():
        cuda = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    return {"rss": rss, "cuda": cuda}


def _targets(task: WellTask, predicted: int) -> list[str]:
    return list(task.targets) if task.targets is not None else [task.classes[predicted]]


def _failed_row(task: WellTask, field: FieldFiles, error: str, cause: str = "other",
                inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    target = ",".join(task.targets) if task.targets else ""
    return failed_row(task.plate, task.well, field.site, field.index, error, target, cause,
                      inputs or {"stat": field.stat})
