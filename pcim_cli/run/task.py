"""The unit of work: one well, as a small JSON-dumpable `WellTask` (everything a worker needs, no open
handles), so the same call runs in-process, in a Dask worker process or on a SLURM node.

The driver (run/explain.py `plan`) makes the tasks, the scheduler (run/scheduler.py) sends them out, the
worker (run/worker.py `explain_well`) turns each into summary rows.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

from pydantic import BaseModel, ConfigDict

from pcim_cli.engine.options import QC_BORDER_FRACTION
from pcim_cli.run.failures import failed_row

__all__ = ["FieldFiles", "QcTask", "WellTask", "field_seed", "map_labels", "task_failed_row", "task_failed_rows"]


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
    qc_only: bool = False  # a done field whose shortcut-QC shares are measured again from its stored map
    zarr: dict[str, Any] | None = None  # an OME-Zarr field: how to read it (io/ome_zarr_plate.ZarrField)
    # explain.fidelity on: this field's maps get their deletion / insertion AUCs (a sample of the plate's
    # fields with explain.fidelity_every > 1), and its stain check (run/sampling.py)
    fidelity: bool = True
    stain_check: bool = False


class QcTask(BaseModel):
    """The shortcut-QC settings a worker needs (config/qc.py resolved against the plate; run/shortcut_qc.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objects: str | None = None  # the plate.objects kind whose union is "on objects"; None: the foreground
    foreground_channel: int = 0  # index into the plate's channels
    foreground_name: str = ""
    polarity: str = "bright"
    border: float = QC_BORDER_FRACTION
    saturation: str | float | tuple[float | None, ...] | None = "auto"
    clip_at: tuple[float, ...] | None = None  # model.normalize fixed: each channel's max (clipped above)

    def signature(self) -> str:
        """What a field's shares depend on besides its map and pixels: every setting above. A done field
        whose record holds another signature has its shares measured again (run/shortcut_qc.py)."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True, default=str).encode()).hexdigest()[:16]


class WellTask(BaseModel):
    """Everything a worker needs to explain one well (JSON-dumpable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plate: str
    well: str
    fields: tuple[FieldFiles, ...]
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    targets: tuple[str, ...] | None  # class names to explain; None = the predicted class
    contrastive: bool = False  # explain.target contrastive: + the runner-up's map where the predicted class
    #                            survives the deletion of the whole field (docs/verdicts.md)
    normalize: dict[str, Any]
    model_path: str
    model_sha256: str
    input_size: tuple[int, int] | None = None
    field_size: tuple[int, int] | None = None  # (H, W) of the plate's fields; a field of another size fails
    aggregate: str = "mean-logit"  # how a tiled field's prediction is made (model.aggregate)
    tile_maps: str = "field"  # one fit over a tiled field's pixels, or per tile (explain.tile_maps)
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
    qc: QcTask | None = None  # the shortcut QC (qc.enabled); None: no shares, no verdict
    timepoint: int | None = None  # plate.timepoint: the time point read from a T axis
    package: dict[str, Any] | None = None  # model.path a bioimage.io package: what was taken (field records)


def field_seed(seed: int, well: str, site: int, target: str) -> int:
    """A per-map seed that does not depend on which maps share a batch."""
    return seed * 7919 + zlib.crc32(f"{well}:{site}:{target}".encode())


def map_labels(targets: list[str], channels: tuple[str, ...], per_channel: bool) -> list[str]:
    """Store channel labels: `<target>` (shared map) or `<target>:<channel>` (per channel)."""
    if per_channel:
        return [f"{t}:{c}" for t in targets for c in channels]
    return list(targets)


def task_failed_row(task: WellTask, field: FieldFiles, error: str, cause: str = "other",
                    inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary row of one field of the task that failed (run/failures.py `failed_row`)."""
    target = ",".join(task.targets) if task.targets else ""
    return failed_row(task.plate, task.well, field.site, field.index, error, target, cause,
                      inputs or {"stat": field.stat})


def task_failed_rows(task: WellTask, error: str) -> list[dict[str, Any]]:
    """Every field of the task failed with one message (a well whose task raised, or whose worker died)."""
    target = ",".join(task.targets) if task.targets else ""
    return [failed_row(task.plate, task.well, f.site, f.index, error, target) for f in task.fields]
