"""Shortcut QC of a finished field, on the worker: where its maps lie (docs/shortcuts.md).

Hooked in where a field's map is complete (beside the object measures): from the final field map in
memory, the field's normalised image, its saturation mask (made when the raw image was read: the raw
counts are not kept) and the object labels, `measure` computes per target the shares of
engine/shares.py and returns the record entries:

- `record["results"][target]["shares"]`: {objects, background, border, saturated, seams} (None where the
  field has no such region: seams on an untiled field);
- `record["qc"]`: how the regions were made (objects: the label kind or the automatic foreground, border
  width, saturation levels per channel) and each region's area fraction.

The CSV columns (io/summary.py) and the per-plate verdict (engine/shortcuts.py) read these entries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcim_cli.config import RunConfig
from pcim_cli.engine import shares, shortcuts
from pcim_cli.errors import PcimError
from pcim_cli.io import labels as label_io
from pcim_cli.io import store
from pcim_cli.io.plate import edge_wells, infer_plate_format
from pcim_cli.run.task import QcTask

logger = logging.getLogger(__name__)

FOREGROUND_METHOD = (f"Otsu's threshold on the channel smoothed by a Gaussian (sigma {shares.FOREGROUND_SIGMA:g} px), "
                     f"opened by {shares.FOREGROUND_OPEN} px, dilated by {shares.OBJECT_DILATE} px")


def qc_task(cfg: RunConfig) -> QcTask | None:
    """The worker's QC settings from plate.yaml's `qc:` (None when qc.enabled is false): the objects kind
    (qc.objects, else the first of plate.objects, else the automatic foreground), the foreground channel,
    the border, the saturation levels, and the clip level of a fixed normalisation."""
    qc = cfg.qc
    if not qc.enabled:
        return None
    channels = list(cfg.plate.channels)
    kinds = list(cfg.plate.objects or {})
    name = qc.foreground_channel or channels[0]
    norm = cfg.model.normalize
    clip = None
    if getattr(norm, "method", "") == "fixed" and norm.clip:  # clip: false (a bioimage.io scale) clips nothing
        highs = [float(v) for v in (norm.max if isinstance(norm.max, list) else [norm.max])]
        clip = tuple(highs * len(channels) if len(highs) == 1 else highs)  # one max, or one per channel
    saturation = tuple(qc.saturation) if isinstance(qc.saturation, list) else qc.saturation
    return QcTask(objects=qc.objects or (kinds[0] if kinds else None), foreground_channel=channels.index(name),
                  foreground_name=name, polarity=qc.foreground, border=qc.border, saturation=saturation,
                  clip_at=clip)


def saturation_mask(raw: np.ndarray, qc: QcTask) -> tuple[torch.Tensor, list[float | None]]:
    """(H, W) the field's saturated pixels (any channel), from its raw counts (C, H, W), and each
    channel's level (engine/shares.py `saturation_levels`)."""
    t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    levels = shares.saturation_levels(t, qc.saturation if not isinstance(qc.saturation, tuple)
                                      else list(qc.saturation), qc.clip_at)
    return shares.saturated_mask(t, levels), levels


def objects_mask(x: torch.Tensor, qc: QcTask, label_files: Mapping[str, str], labels: Mapping[str, np.ndarray],
                 where: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The field's object mask and its `qc.objects` record entry: the named kind's labels (already read,
    or read here), else the automatic foreground of the named channel (also when the field's label image
    is missing or unreadable: the entry says why)."""
    h, w = x.shape[-2:]
    note = ""
    if qc.objects is not None:
        lab = labels.get(qc.objects)
        if lab is None and qc.objects in label_files:
            try:
                lab = label_io.read_labels(Path(label_files[qc.objects]), (h, w), qc.objects)
            except PcimError as exc:
                note = str(exc)
        elif lab is None:
            note = f"no {qc.objects} label image for this field"
        if lab is not None:
            mask = shares.object_mask(torch.from_numpy(lab.astype(np.int64)))
            return mask, {"source": "labels", "kind": qc.objects, "dilate_px": shares.OBJECT_DILATE}
        logger.warning("%s: shortcut QC uses the automatic %s foreground: %s", where, qc.foreground_name, note)
    mask = shares.foreground_mask(x[qc.foreground_channel], qc.polarity)
    entry = {"source": "foreground", "channel": qc.foreground_name, "polarity": qc.polarity,
             "method": FOREGROUND_METHOD}
    if note:
        entry["note"] = note
    return mask, entry


def measure(maps: torch.Tensor, targets: Sequence[str], x: torch.Tensor, saturated: torch.Tensor | None,
            levels: Sequence[float | None] | None, tile_grid, qc: QcTask, *, label_files: Mapping[str, str],
            labels: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
    """Per target its shares, and the field's `qc` record entry. maps (T * M, H, W) as the worker stitches
    them (M maps per target), x (C, H, W) the normalised field, tile_grid the field's TileGrid."""
    h, w = x.shape[-2:]
    per_target = maps.reshape(len(targets), -1, h, w)
    objects, source = objects_mask(x, qc, label_files, labels, where)
    margin = shares.border_margin((h, w), qc.border)
    seams = shares.seam_mask(tile_grid.field, tile_grid.tile, tile_grid.starts_y, tile_grid.starts_x)
    found = shares.field_shares(per_target, objects, shares.border_mask((h, w), margin), saturated, seams)
    out = {t: {r: (None if v is None else (None if v != v else round(v, 6))) for r, v in found.target(k).items()}
           for k, t in enumerate(targets)}
    entry = {"signature": qc.signature(), "objects": source, "border": qc.border, "border_px": margin,
             "saturation": list(qc.saturation) if isinstance(qc.saturation, tuple) else qc.saturation,
             "saturation_levels": None if levels is None else [None if v is None else float(v) for v in levels],
             "areas": {r: (None if a is None else round(a, 6)) for r, a in found.areas.items()}}
    return out, entry


def needs_refresh(record: Mapping[str, Any] | None, signature: str | None) -> bool:
    """A done field whose shares were measured with other qc settings (or never, or failed): its shares
    are measured again from the stored map on the next run, without a fit (qc changes no map, so it is
    not part of the settings fingerprint). signature: the run's `QcTask.signature()`, None with qc off."""
    if signature is None or record is None:
        return False
    entry = record.get("qc")
    return not isinstance(entry, Mapping) or entry.get("signature") != signature


def refresh_field(store_path: Path, well: str, index: int, x: torch.Tensor,
                  saturation: tuple[torch.Tensor, list[float | None]] | None, tile_grid, qc: QcTask, *,
                  label_files: Mapping[str, str]) -> dict[str, Any]:
    """Measure a done field's shares again from the map in the store (no fit); its new record."""
    maps, _, record = store.read_field(store_path, well, index)
    if record is None:
        raise PcimError(f"{well} (store field {index}): no complete map to measure the shortcut QC on; "
                        "rerun with --force")
    record = dict(record)
    measure_into(record, torch.from_numpy(maps), list(record["targets"]), x, saturation, tile_grid, qc,
                 label_files=label_files, labels={}, where=f"{well} site {record.get('site')}")
    store.update_record(store_path, well, index, {"qc": record["qc"], "results": record["results"]})
    return record


def update_record(record: dict[str, Any], per_target: Mapping[str, Mapping[str, float | None]],
                  entry: Mapping[str, Any]) -> dict[str, Any]:
    """Add the shares to each target's results and the `qc` entry to a completion record."""
    for target, found in per_target.items():
        if target in record.get("results", {}):
            record["results"][target]["shares"] = dict(found)
    record["qc"] = dict(entry)
    return record


def measure_into(record: dict[str, Any], maps: torch.Tensor, targets: Sequence[str], x: torch.Tensor,
                 saturation: tuple[torch.Tensor, list[float | None]] | None, tile_grid, qc: QcTask, *,
                 label_files: Mapping[str, str], labels: Mapping[str, np.ndarray], where: str) -> None:
    """`measure` into a completion record (the worker's one call). The QC never fails a field: an error
    is logged and recorded as `qc.error`, the map is written as usual."""
    saturated, levels = saturation if saturation is not None else (None, None)
    try:
        per_target, entry = measure(maps, targets, x, saturated, levels, tile_grid, qc, label_files=label_files,
                                    labels=labels, where=where)
    except Exception as exc:  # noqa: BLE001 - the map is done; the QC is a measure of it
        logger.warning("%s: shortcut QC not measured: %s: %s", where, type(exc).__name__, exc)
        record["qc"] = {"error": f"{type(exc).__name__}: {exc}"}
        return
    update_record(record, per_target, entry)


def plate_report(done: Sequence[tuple[str, Mapping[str, Any]]], wells: Sequence[str] = ()) -> shortcuts.Report:
    """The plate's shortcut verdict (engine/shortcuts.py) from the (well, record) pairs of its done fields;
    the outer ring is that of the smallest standard plate holding `wells` (the plate's wells: store and
    layout) and the done fields' wells."""
    names = {w for w, _ in done} | set(wells)
    ring = edge_wells(infer_plate_format(names)) if names else []
    return shortcuts.from_records(done, ring)
