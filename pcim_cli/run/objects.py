"""Per-object measurement of finished fields (`plate.objects`), on the worker, and what the driver plans.

Hooked in at one place: when a field's map is complete (run/batching.py stitches it), `measure_field`
reads the field's label images and computes, from the final field map,

- per target, the channel shares of the whole map (`PCIM_Share_<channel>` in the main CSV), always;
- per object kind, the object table (io/object_tables.py) with the batched per-object deletion drop
  (engine/objects.py) and, per target, the drop when its top-k objects are deleted together.

The label images and tables are written into the field group before its completion record. A label
image that is missing, unreadable or of another size fails that kind's table only (its record entry
says why); the map is still done. A done field whose object inputs changed since (label files
replaced, `explain.top_objects`, deletion settings) is measured again without refitting its map
(`refresh_field`). The table of an object kind removed from plate.objects is deleted at the end of the
run (`remove_stale_tables`: only a file whose header is pcim's object-table header).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pcim_cli.engine import field as field_maps
from pcim_cli.engine import mixing, tiling
from pcim_cli.engine import objects as engine
from pcim_cli.engine.pcim import Forward, PcimOptions
from pcim_cli.errors import PcimError
from pcim_cli.io import labels as label_io
from pcim_cli.io import object_tables, store
from pcim_cli.run import device as run_device

logger = logging.getLogger(__name__)

OBJECTS_VERSION = 1  # bump when the object measures change meaning: done fields are measured again


# --------------------------------------------------------------------------------------------------
# driver side


def signature(files: Mapping[str, Path | None], problems: Mapping[str, str], top_k: int,
              opts: PcimOptions) -> str:
    """What the object measures of a field depend on besides its map: label files (name, size, mtime),
    `explain.top_objects`, the deletion substrate. '' when the plate has no objects."""
    if not files and not problems:
        return ""
    doc = {"labels": {n: label_io.file_signature(p) for n, p in sorted(files.items())},
           "problems": dict(sorted(problems.items())), "top_k": top_k,
           "delete": [opts.delete_substrate, opts.blur_sigma], "version": OBJECTS_VERSION}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def label_kinds(objects: Mapping[str, str] | None) -> dict[str, label_io.LabelFiles]:
    """The label files of each object kind of `plate.objects` (patterns already anchored by config.py)."""
    return {name: label_io.discover_labels(name, pattern) for name, pattern in (objects or {}).items()}


def field_inputs(kinds: Mapping[str, label_io.LabelFiles], well: str, site: int, top_k: int,
                 opts: PcimOptions) -> dict[str, Any]:
    """The FieldFiles keys of one field: its label files, why a kind has none, and their signature."""
    files: dict[str, Path | None] = {}
    problems: dict[str, str] = {}
    for name, kind in kinds.items():
        problem = kind.problem(well, site)
        if problem is None:
            files[name] = kind.path(well, site)
        else:
            problems[name] = problem
    return {"objects": {n: str(p) for n, p in files.items()}, "object_problems": problems,
            "objects_signature": signature(files, problems, top_k, opts)}


def needs_refresh(record: Mapping[str, Any] | None, objects_signature: str, retry_failed: bool = False) -> bool:
    """A done field whose object measures are missing, stale, or failed (with --retry-failed)."""
    if record is None:
        return False
    if record.get("objects_signature", "") != objects_signature:
        return True
    failed = any(o.get("status") == "failed" for o in (record.get("objects") or {}).values())
    return retry_failed and failed


def failures(record: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(object kind, message) of the object tables that failed in a field's record."""
    return [(name, str(o.get("error", ""))) for name, o in ((record or {}).get("objects") or {}).items()
            if o.get("status") == "failed"]


def write_tables(store_path: Path, plate: str, csv: Path, names: list[str], table) -> tuple[dict[str, Path],
                                                                                          list[dict[str, Any]]]:
    """Rebuild every `{plate}_pcim_{Object}.csv` from the store's done fields (the rows of the main CSV
    `table` that are done) and write them atomically; also the object tables that failed, per field."""
    if not names:
        return {}, []
    done = table[table["PCIM_Status"] == "done"].drop_duplicates(["Metadata_Well", "Metadata_Site"])
    fields, failed = [], []
    for row in done.itertuples():
        index = int(str(row.PCIM_ZarrPath).rsplit("/", 1)[1])
        fields.append((row.Metadata_Well, int(row.Metadata_Site), index))
        record = store.read_record(store_path, row.Metadata_Well, index)
        failed += [{"well": row.Metadata_Well, "site": int(row.Metadata_Site), "object": name, "error": error}
                   for name, error in failures(record) if name in names]
    written = object_tables.write_csvs(object_tables.rebuild(store_path, plate, names, fields), csv, plate)
    return written, failed


def remove_stale_tables(csv: Path, plate: str, written: Iterable[Path]) -> list[Path]:
    """Delete the `{plate}_pcim_{Object}.csv` files beside output.csv that pcim wrote (their header says
    so) for object kinds plate.objects no longer lists: they describe maps that are gone. Returns them."""
    from pcim_cli.io.outputs import stale_object_csvs

    removed = []
    for path in stale_object_csvs(csv, plate, [csv, *written]):
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("cannot remove the stale object table %s (%s); delete it by hand", path, exc)
            continue
        logger.warning("removed %s: plate.objects no longer lists %s, so pcim's table of it described maps "
                       "that are gone", path, path.stem.split("_pcim_", 1)[-1])
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------------
# worker side


@dataclass
class FieldObjects:
    """What `measure_field` found for one field: record entries and the members to write."""

    channel_shares: dict[str, dict[str, float]]  # target -> channel -> share
    objects: dict[str, dict[str, Any]]  # kind -> record entry
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    signature: str = ""
    seconds: float = 0.0
    format: str = "0.5"

    def update_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add the channel shares to each target's results and the object entries to the record."""
        for target, shares in self.channel_shares.items():
            if target in record.get("results", {}):
                record["results"][target]["channel_shares"] = shares
        if self.objects:
            record["objects"] = self.objects
        else:
            record.pop("objects", None)
        record["objects_signature"] = self.signature
        record.setdefault("timings_s", {})["objects"] = self.seconds
        return record

    def write(self, group: zarr.Group, n_levels: int) -> None:
        """The label images and tables into a field group (before its record)."""
        label_io.write_labels(group, self.labels, n_levels, self.format)
        object_tables.write_tables(group, self.tables, self.format)


def measure_field(x: torch.Tensor, maps: torch.Tensor, targets: list[str], classes: tuple[str, ...],
                  channels: tuple[str, ...], grid: tiling.TileGrid, forward: Forward, opts: PcimOptions, *,
                  label_files: Mapping[str, str], label_problems: Mapping[str, str], top_k: int,
                  batch_size: int, device: str, where: str, objects_signature: str = "",
                  format: str = "0.5", aggregate: str = "mean-prob") -> FieldObjects:
    """Channel shares and object tables of one field from its final map (T*M, H, W) and image x (C, H, W).

    `aggregate` is model.aggregate: the deletions' field probabilities are made like the field's prediction."""
    t0 = time.perf_counter()
    c, h, w = x.shape
    per_target = maps.reshape(len(targets), -1, h, w).float()
    deleted = mixing.substrate(x[None], opts.delete_substrate, opts.blur_sigma)
    deleted = torch.zeros_like(x) if deleted is None else deleted[0]
    per_channel = engine.channel_attribution(per_target, x, deleted)
    shares = engine.channel_shares(per_channel)
    found = FieldObjects({t: dict(zip(channels, shares[k].tolist(), strict=True)) for k, t in enumerate(targets)},
                         {}, signature=objects_signature, format=format)
    for name, problem in label_problems.items():
        logger.warning("%s", problem)
        found.objects[name] = {"status": "failed", "error": problem}
    for name, path in label_files.items():
        try:
            lab = label_io.read_labels(Path(path), (h, w), name)
            entry, columns, table = _object_table(x, lab, per_channel, targets, classes, channels,
                                                  *prediction(grid, aggregate), forward, deleted, top_k,
                                                  batch_size, device)
        except PcimError as exc:
            msg = f"{where}: {exc}"
            logger.warning("%s", msg)
            found.objects[name] = {"status": "failed", "error": msg, "labels": path}
            continue
        except run_device.MODEL_ERRORS as exc:  # the model fails on a deletion
            msg = f"{where}: deleting the {name} objects failed ({type(exc).__name__}: {exc})"
            logger.warning("%s", msg)
            found.objects[name] = {"status": "failed", "error": msg, "labels": path}
            continue
        found.objects[name] = {**entry, "labels": path}
        found.labels[name] = lab
        found.tables[name] = (columns, table)
    found.seconds = time.perf_counter() - t0
    return found


def prediction(grid: tiling.TileGrid, aggregate: str) -> tuple[tiling.TileGrid, engine.Aggregate]:
    """How the worker predicts a field (run/batching.py `Batcher._predict`): the grid whose tiles the model sees and
    how their logits make the field's. `whole-field` runs the model on the untiled field; an untiled
    field is its one tile."""
    if grid.n_tiles == 1 or aggregate == "whole-field":
        return tiling.plan_tiles(grid.field, None), engine.mean_prob
    return grid, lambda tile_logits: field_maps.aggregate_logits(tile_logits[None], aggregate)[0]


def _object_table(x, lab: np.ndarray, per_channel: torch.Tensor, targets: list[str], classes, channels, grid,
                  aggregate: engine.Aggregate, forward: Forward, deleted: torch.Tensor, top_k: int, batch_size: int,
                  device: str):
    """The record entry, columns and (N, columns) rows of one object kind."""
    labels_t = torch.from_numpy(lab.astype(np.int64))
    m = engine.measure(per_channel, labels_t)
    n = m.ids.numel()
    tops = engine.top_objects(m.sum, m.ids, top_k)
    deletions = [m.ids[i : i + 1] for i in range(n)] + tops
    base, after = _deletion_probs(forward, x, labels_t, deletions, deleted, grid, batch_size, device, aggregate)
    tidx = torch.tensor([classes.index(t) for t in targets])
    single = base[tidx][:, None] - after[:n, tidx].T  # (T, N) drop of p(target) per object
    columns = list(object_tables.OBJECT_ID_COLUMNS)
    blocks = [m.ids.double(), m.center_x, m.center_y, m.area]
    entry: dict[str, Any] = {"status": "done", "count": n, "top_k": top_k, "top": {}}
    for k, target in enumerate(targets):
        columns += object_tables.target_columns(target, channels)
        blocks += [m.sum[k], m.mean[k], m.max[k].clamp(min=0), m.share[k], m.rank[k].double(), single[k].double()]
        blocks += [m.channel_share[k, ci] for ci in range(len(channels))]
        entry["top"][target] = {"objects": tops[k].tolist(),
                                "delta_p": float(base[tidx[k]] - after[n + k, tidx[k]]) if n else None,
                                "share": float(m.share[k][torch.isin(m.ids, tops[k])].sum()) if n else None}
    table = torch.stack([b.double().reshape(n) for b in blocks], dim=1).numpy() if n else \
        np.zeros((0, len(columns)))
    return entry, columns, table


def _deletion_probs(forward, x, labels_t, deletions, deleted, grid, batch_size: int, device: str, aggregate):
    """engine.deletion_probs, with the out-of-memory back-off of run/device.py."""
    batch = run_device.BatchSize(batch_size, device, "deleting objects")
    return run_device.with_backoff(
        lambda n: engine.deletion_probs(forward, x, labels_t, deletions, deleted, grid, batch_size=n,
                                        aggregate=aggregate, device=device), batch)


def refresh_field(store_path: Path, well: str, index: int, x: torch.Tensor, grid: tiling.TileGrid,
                  forward: Forward, opts: PcimOptions, classes: tuple[str, ...], channels: tuple[str, ...], *,
                  label_files: Mapping[str, str], label_problems: Mapping[str, str], top_k: int,
                  batch_size: int, device: str, objects_signature: str, format: str,
                  aggregate: str = "mean-prob") -> dict[str, Any]:
    """Measure the objects of a done field again from the map in the store (no fit); its new record."""
    maps, _, record = store.read_field(store_path, well, index)
    if record is None:
        raise PcimError(f"{well} (store field {index}): no complete map to measure objects on; rerun with --force")
    found = measure_field(x, torch.from_numpy(maps), list(record["targets"]), classes, channels, grid, forward,
                          opts, label_files=label_files, label_problems=label_problems, top_k=top_k,
                          batch_size=batch_size, device=device, where=f"{well} site {record.get('site')}",
                          objects_signature=objects_signature, format=format, aggregate=aggregate)
    record = found.update_record(dict(record))
    store.update_field(store_path, well, index, found.write, record)
    return record
