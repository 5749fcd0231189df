"""The worker: one well in (a `WellTask`, run/task.py), its summary rows out.

`explain_well` is the one function a scheduler sends out, in-process, in a Dask worker process or on a
SLURM node. The worker reads and normalises the well's fields one at a time,
cuts each into tiles of model.input_size (tiling.py; one tile when the field is the model's size or
input_size is null), makes the field's prediction from its tiles (model.aggregate, engine/field.py),
fits in chunks of compute.batch_size model inputs (run/batching.py), writes its own field groups of the
store, and returns one row per (field, target). The record keeps every tile's class probabilities. With
fidelity on, the maps of the fields run/sampling.py picks carry their AUCs and stain check (engine/fidelity.py: the
deletion AUCs of the map and of the maps without a model, for the plate's verdict). A field
that fails is recorded as failed with its message and its cause (data: its images; model: the model
raises, returns non-finite values, or needs a larger input than the field; output: the store cannot be
written); the other fields go on, and no error of one field reaches a field already written. A map or
a prediction with NaN or infinite values is never written. Each field's record keeps the signature of
its input files (io/signature.py) and warnings (a constant channel) that its CSV row shows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcim_cli.engine.pcim import FastForward, Forward, PcimOptions
from pcim_cli.errors import PcimError
from pcim_cli.io import images, ome_zarr_plate, signature
from pcim_cli.io.model import LoadedModel, error_summary
from pcim_cli.run import device, shortcut_qc
from pcim_cli.run.batching import Batcher
from pcim_cli.run.failures import constant_channels
from pcim_cli.run.task import FieldFiles, WellTask, task_failed_row

__all__ = ["explain_well"]

logger = logging.getLogger(__name__)


def _model(task: WellTask) -> LoadedModel:
    """The task's model, loaded once per worker process (run/device.py's cache)."""
    return device.model(task.model_path, len(task.channels), task.input_size, task.device, task.model_sha256)


def _explainer(task: WellTask) -> Forward | None:
    """The task's explainer (pcim-amortised), loaded once per worker process, behind compute.precision."""
    if task.method != "pcim-amortised":
        return None
    if task.explainer_path is None:
        raise PcimError(f"{task.well}: explain.method pcim-amortised but no explainer; set explain.explainer")
    try:
        module = device.explainer(task.explainer_path, task.device, task.explainer_sha256).module
    except PcimError as exc:
        raise PcimError(f"{task.well}: {exc}") from None
    return module if task.precision == "float32" else FastForward(module, task.precision)


def _source(task: WellTask, field: FieldFiles) -> images.FieldSource:
    """The field to read: its TIFF files, or its OME-Zarr arrays; at the plate's time point."""
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
    batcher: Batcher | None = None
    try:
        for field in task.fields:
            read = _read_checked(task, field)
            if isinstance(read, dict):  # a failed row
                rows.append(read)
                continue
            img, read_s, inputs, warnings, saturation = read
            if batcher is None:
                try:
                    batcher = Batcher(task, _model(task), opts, _explainer(task))
                except PcimError as exc:
                    rows.append(task_failed_row(task, field, str(exc), "model", inputs))
                    continue
            rows += (batcher.refresh(field, img, saturation) if field.objects_only or field.qc_only
                     else batcher.add(field, img, read_s, inputs, warnings, saturation))
        if batcher is not None:
            rows += batcher.finish()
    except Exception as exc:  # noqa: BLE001 - a bug must not fail the fields already written
        reported = {r["site"] for r in rows}
        msg = f"{task.well}: {type(exc).__name__}: {error_summary(exc)}"
        logger.warning("%s", msg, exc_info=logger.isEnabledFor(logging.DEBUG))
        rows += [task_failed_row(task, f, msg, "other") for f in task.fields if f.site not in reported]
    return rows


def _read_checked(task: WellTask, field: FieldFiles):
    """(image, seconds, input signature, warnings, saturation) of a field, or its failed row; saturation:
    the shortcut QC's saturated pixels and levels, from the raw counts (None without qc)."""
    t0 = time.perf_counter()
    inputs = signature.signature(field.files, field.stat or None)
    try:
        raw = _read_raw(task, field)
    except PcimError as exc:
        logger.warning("%s", exc)
        return task_failed_row(task, field, str(exc), "data", inputs)
    where = _source(task, field).where
    warnings = constant_channels(raw, task.channels, field.files if field.zarr is None else (where,))
    saturation = None if task.qc is None else shortcut_qc.saturation_mask(raw, task.qc)
    img = torch.from_numpy(_normalise(task, raw))
    read_s = time.perf_counter() - t0
    if task.field_size is not None and tuple(img.shape[-2:]) != tuple(task.field_size):
        msg = images.size_problem(task.well, field.site, tuple(img.shape[-2:]), task.field_size, where)
        logger.warning("%s", msg)
        return task_failed_row(task, field, msg, "data", inputs)
    for w in warnings:
        logger.warning("%s site %d: %s", task.well, field.site, w)
    return img, read_s, inputs, warnings, saturation
