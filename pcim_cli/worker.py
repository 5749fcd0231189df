"""The unit of work: one well in, its summary rows out.

`explain_well` is the one function a scheduler sends out. Its argument is a small JSON-dumpable
`WellTask` (everything a worker needs, no open handles), so the same call runs in-process, in a Dask
worker process or on a SLURM node. The worker reads and normalises the well's fields, fits the maps in
batches, writes its own field groups of the store, and returns one row per (field, target).
A field that fails is recorded as failed with its message; the other fields go on.
"""

from __future__ import annotations

import logging
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pcim_cli import __version__, images, store
from pcim_cli.engine import metrics
from pcim_cli.engine.attribute import attribute
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.errors import PcimError
from pcim_cli.model import LoadedModel, load_model

logger = logging.getLogger(__name__)


class FieldFiles(BaseModel):
    """One field of a well: its site number (from the file name), its index in the store, its files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: int
    index: int
    files: tuple[str, ...]


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
    method: str = "pcim"
    engine: dict[str, Any]
    batch_size: int = 16
    device: str = "cpu"
    fidelity: bool = True  # deletion / insertion AUC per map
    store_path: str
    store_format: str = "0.5"
    fingerprint: str


_MODELS: dict[tuple[str, str], LoadedModel] = {}


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


def _read(task: WellTask, field: FieldFiles) -> np.ndarray:
    src = images.FieldSource(task.well, field.site, tuple(Path(f) for f in field.files))
    img = images.read_field(src, len(task.channels))
    norm = dict(task.normalize)
    method = norm.pop("method", "percentile")
    return images.normalize(img, method, **norm)


def explain_well(task: WellTask) -> list[dict[str, Any]]:
    """Explain every field of one well; returns summary rows (one per field and target)."""
    opts = PcimOptions(**task.engine)
    rows: list[dict[str, Any]] = []
    ready: list[tuple[FieldFiles, torch.Tensor, float]] = []
    for field in task.fields:
        t0 = time.perf_counter()
        try:
            ready.append((field, torch.from_numpy(_read(task, field)), time.perf_counter() - t0))
        except PcimError as exc:
            logger.warning("%s", exc)
            rows.append(_failed_row(task, field, str(exc)))
    if not ready:
        return rows
    try:
        model = _model(task)
    except PcimError as exc:
        return rows + [_failed_row(task, f, str(exc)) for f, _, _ in ready]
    # fields of one size are fitted together, batch_size maps at a time
    by_shape: dict[tuple[int, ...], list[tuple[FieldFiles, torch.Tensor, float]]] = {}
    for item in ready:
        by_shape.setdefault(tuple(item[1].shape), []).append(item)
    for group in by_shape.values():
        for start in range(0, len(group), task.batch_size):
            part = group[start : start + task.batch_size]
            try:
                rows += _explain_batch(task, model, opts, part)
            except PcimError as exc:
                logger.warning("%s", exc)
                rows += [_failed_row(task, f, str(exc)) for f, _, _ in part]
            except (RuntimeError, ValueError) as exc:  # a model that fails on this input
                msg = f"{task.well}: fitting failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                logger.warning("%s", msg)
                rows += [_failed_row(task, f, msg) for f, _, _ in part]
    return rows


def _explain_batch(task: WellTask, model: LoadedModel, opts: PcimOptions,
                   part: list[tuple[FieldFiles, torch.Tensor, float]]) -> list[dict[str, Any]]:
    """Fit the maps of some fields of one size (all their targets in one batch) and write them."""
    device = torch.device(task.device)
    x = torch.stack([img for _, img, _ in part]).to(device)
    if task.input_size is not None and tuple(x.shape[-2:]) != tuple(task.input_size):
        raise PcimError(
            f"{task.well}: fields are {x.shape[-2]}x{x.shape[-1]} px but model.input_size is "
            f"{task.input_size[0]}x{task.input_size[1]}; tiling is not supported yet - set "
            "model.input_size: null if the model accepts whole fields"
        )
    with torch.no_grad():
        probs = torch.softmax(model.module(x).float(), dim=1)
    predicted = probs.argmax(1).tolist()
    # one (field, target) pair per map
    pairs = [(i, t) for i in range(len(part)) for t in _targets(task, predicted[i])]
    xi = torch.tensor([i for i, _ in pairs], device=device)
    tt = torch.tensor([task.classes.index(t) for _, t in pairs], device=device)
    seeds = torch.tensor([field_seed(opts.seed, task.well, part[i][0].site, t) for i, t in pairs])
    t0 = time.perf_counter()
    result = attribute(model.module, x[xi], tt, task.method, opts, seeds=seeds)
    if task.fidelity:
        dele = metrics.deletion_auc(model.module, x[xi], result.maps, tt).tolist()
        ins = metrics.insertion_auc(model.module, x[xi], result.maps, tt, substrate="blur").tolist()
    else:
        dele = ins = [float("nan")] * len(pairs)
    fit_s = (time.perf_counter() - t0) / len(part)

    rows = []
    for i, (field, _, read_s) in enumerate(part):
        own = [k for k, (j, _) in enumerate(pairs) if j == i]
        targets = [pairs[k][1] for k in own]
        maps = result.maps[own].flatten(0, 1).cpu().numpy()  # (targets * M, H, W)
        per_target = {
            pairs[k][1]: {
                "prob_original": float(result.prob_original[k]),
                "prob_mixed": float(result.prob_mixed[k]),
                "prob_deleted": float(result.prob_deleted[k]),
                "deletion_auc": dele[k],
                "insertion_auc": ins[k],
                "loss": float(result.loss[k]),
                "steps": int(result.steps[k]),
            }
            for k in own
        }
        record = {
            "status": "done",
            "site": field.site,
            "targets": targets,
            "predicted_class": task.classes[predicted[i]],
            "class_probabilities": dict(zip(task.classes, probs[i].tolist(), strict=True)),
            "results": per_target,
            "settings": {"normalize": task.normalize, "engine": task.engine, "channels": list(task.channels)},
            "fingerprint": task.fingerprint,
            "model_sha256": task.model_sha256,
            "pcim_version": __version__,
            "seed": opts.seed,
            "host": socket.gethostname(),
            "timings_s": {"read": read_s, "fit": fit_s},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        t1 = time.perf_counter()
        labels = map_labels(targets, task.channels, opts.per_channel)
        rel = store.write_field(Path(task.store_path), task.well, field.index, maps, labels, record,
                                format=task.store_format)
        runtime = read_s + fit_s + time.perf_counter() - t1
        for t, r in per_target.items():
            rows.append({
                "plate": task.plate, "well": task.well, "site": field.site, "target": t,
                "predicted_class": task.classes[predicted[i]],
                "prob_original": r["prob_original"], "prob_mixed": r["prob_mixed"],
                "deletion_auc": r["deletion_auc"], "insertion_auc": r["insertion_auc"],
                "status": "done", "error": "", "runtime_s": runtime, "zarr_path": rel,
            })
    return rows


def _targets(task: WellTask, predicted: int) -> list[str]:
    return list(task.targets) if task.targets is not None else [task.classes[predicted]]


def failed_row(plate: str, well: str, site: int, index: int, error: str, target: str = "") -> dict[str, Any]:
    """The summary row of a field that could not be explained (the store path it would have had)."""
    nan = float("nan")
    return {
        "plate": plate, "well": well, "site": site, "target": target, "predicted_class": "",
        "prob_original": nan, "prob_mixed": nan, "deletion_auc": nan, "insertion_auc": nan,
        "status": "failed", "error": error, "runtime_s": nan, "zarr_path": store.field_path(well, index),
    }


def _failed_row(task: WellTask, field: FieldFiles, error: str) -> dict[str, Any]:
    target = ",".join(task.targets) if task.targets else ""
    return failed_row(task.plate, task.well, field.site, field.index, error, target)
