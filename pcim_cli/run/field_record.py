"""A field's completion record: the statistics of its maps and everything a rerun, `pcim status`, the CSV
and the verdict read back (io/records.py decides from it what the field is).

The worker (run/batching.py) collects `unit_stats` per fitted image, averages them per target with
`mean_stats` once the field is stitched, and writes `completion_record(...)` after the maps (io/store.py).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import torch

from pcim_cli import __version__
from pcim_cli.engine.pcim import PcimResult
from pcim_cli.engine.tiling import TileGrid
from pcim_cli.engine.verdict import fit_quality
from pcim_cli.run.device import peak_memory_mib
from pcim_cli.run.task import WellTask

__all__ = ["STATS", "completion_record", "mean_stats", "unit_stats"]


STATS = ("prob_original", "prob_mixed", "prob_deleted", "loss")


def unit_stats(result: PcimResult, j: int, dele: float, ins: float, check: dict | None = None) -> dict[str, Any]:
    """The statistics of image j of a fit (one tile of a field, or a whole field) for its record."""
    out: dict[str, Any] = {k: float(getattr(result, k)[j]) for k in STATS}
    full = getattr(result, "prob_full_deleted", None)
    if full is not None:  # PCIM_Fit's label test: p(target) of the fully deleted image
        out["prob_full_deleted"] = float(full[j])
    budget = getattr(result, "budget", None)
    if budget is not None:
        out["budget"] = float(budget[j])
    out.update(deletion_auc=float(dele), insertion_auc=float(ins), steps=int(result.steps[j]))
    if result.channel is not None:  # intensity maps: the channel shown
        out["channel"] = int(result.channel[j])
    if check is not None:  # {"fractions": [...], "curves": {name: [p(target) ...]}}
        out["stain_check"] = check
    return out


def mean_stats(tiles: list[dict[str, Any]], channels: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-field statistics: the mean over its tiles (steps stays an int when it is one), the fit's
    label (PCIM_Fit, engine/verdict.py) from the field's probabilities; an intensity map's channel: the
    one most of its tiles show."""
    keys = [k for k in (*STATS, "prob_full_deleted", "budget", "deletion_auc", "insertion_auc", "steps")
            if k in tiles[0]]
    out: dict[str, Any] = {k: float(np.mean([t[k] for t in tiles])) for k in keys}
    steps = out["steps"]
    out["steps"] = int(steps) if float(steps).is_integer() else steps
    out["fit"] = fit_quality(out["prob_original"], out["prob_mixed"], out["prob_deleted"],
                             out.get("prob_full_deleted"))
    if "channel" in tiles[0]:
        shown = [t["channel"] for t in tiles]
        out["intensity_channel"] = channels[max(set(shown), key=shown.count)]
    if "stain_check" in tiles[0]:  # per-tile maps: the tiles' curves averaged
        first = tiles[0]["stain_check"]
        out["stain_check"] = {"fractions": first["fractions"],
                              "curves": {name: np.mean([t["stain_check"]["curves"][name] for t in tiles],
                                                       axis=0).tolist() for name in first["curves"]}}
    return out


def completion_record(task: WellTask, *, site: int, targets: list[str], probs: torch.Tensor,
                      results: dict[str, dict[str, Any]], inputs: dict[str, Any], warnings: list[str],
                      grid: TileGrid, maps: str, tile_probs: torch.Tensor, batch_size: int,
                      timings: dict[str, float], seed: int) -> dict[str, Any]:
    """The record of a done field: its prediction, each target's statistics (`results`), the settings
    and inputs it was made with, how it was tiled (`maps`: field, per-tile or evidence), and costs."""
    return {
        "status": "done",
        "site": site,
        "targets": targets,
        "predicted_class": task.classes[int(probs.argmax())],
        # explain.target predicted, a predicted class without local evidence: the runner-up's map too
        **({"contrastive": targets[-1]} if task.targets is None and len(targets) > 1 else {}),
        "class_probabilities": dict(zip(task.classes, probs.tolist(), strict=True)),
        "results": results,
        "settings": {"normalize": task.normalize, "engine": task.engine, "channels": list(task.channels)},
        "fingerprint": task.fingerprint,
        "inputs": inputs,
        "warnings": warnings,
        "model_sha256": task.model_sha256,
        **({"model_package": task.package} if task.package else {}),
        **({"explainer_sha256": task.explainer_sha256} if task.explainer_sha256 else {}),
        "pcim_version": __version__,
        "seed": seed,
        "host": socket.gethostname(),
        "tiling": {**grid.record(), "aggregate": task.aggregate, "maps": maps,
                   "tile_probabilities": [[round(float(p), 6) for p in row] for row in tile_probs]},
        "batch_size": batch_size,
        "timings_s": timings,
        "peak_memory_mib": peak_memory_mib(task.device),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
