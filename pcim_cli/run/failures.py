"""How a field fails: its message, the same in `pcim explain` and `pcim validate`, its cause and its CSV row.

The cause (data: its images; model: the model raises, returns non-finite values, or needs a larger
input than the field; output: the store cannot be written; other) goes to the failure ledger, and the
exit code is derived from it (every field failed because of the model: 78).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcim_cli.errors import PcimError
from pcim_cli.io import store
from pcim_cli.io.model import error_summary


class FieldError(PcimError):
    """One field cannot be explained; `cause` says whose fault: data | model | output | other."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def failed_row(plate: str, well: str, site: int | None, index: int, error: str, target: str = "",
               cause: str = "other", inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary row of a field that could not be explained (the store path it would have had).

    `cause` (data | model | output | other) and `inputs` (the files' signature) go to the failure ledger.
    """
    nan = float("nan")
    return {
        "plate": plate, "well": well, "site": site, "target": target, "predicted_class": "",
        "prob_original": nan, "prob_mixed": nan, "prob_deleted": nan, "deletion_auc": nan,
        "insertion_auc": nan, "fit": "", "status": "failed", "error": error, "runtime_s": nan,
        "zarr_path": store.field_path(well, index),
        "cause": cause, "inputs": inputs or {},
    }


def model_error_problem(well: str, exc: BaseException) -> str:
    """The message of a model that raised on a field's input."""
    return f"{well}: fitting failed: {type(exc).__name__}: {error_summary(exc)}"


def tile_size_problem(well: str, site: int, exc: BaseException, input_size: tuple[int, int] | None) -> str:
    """The message of a field smaller than model.input_size (explain and validate say the same)."""
    h, w = input_size or (0, 0)
    return (f"{well} site {site}: {exc} (model.input_size {h}x{w}); fields must be at least the model's input "
            "size: set model.input_size to at most the field size, or null if the model accepts any size")


def non_finite_problem(well: str, site: int, model_path: str, x: torch.Tensor, what: str) -> str:
    """The message of a model that returned NaN or infinite values on a field, with the likely cause."""
    flat = x.reshape(x.shape[0], -1)
    constant = bool((flat.amax(dim=1) == flat.amin(dim=1)).all())
    hint = ("; the field is blank or constant (after model.normalize every pixel has one value per channel), "
            "which a model that divides by the image's standard deviation cannot score" if constant else
            " (a blank or constant field? a model that divides by a standard deviation, or computes a statistic "
            "over the batch?)")
    return (f"{well} site {site}: model {model_path} returned non-finite {what} (NaN or infinite) on this "
            f"field{hint}; check the field's images, or make the model robust to such input (e.g. add a small "
            "epsilon where it divides)")


def constant_channels(raw: np.ndarray, channels: tuple[str, ...], files: tuple[str, ...]) -> list[str]:
    """Warnings for channels whose every pixel has one value (a blank or failed acquisition)."""
    out = []
    flat = raw.reshape(raw.shape[0], -1)
    for c, name in enumerate(channels[: raw.shape[0]]):
        lo, hi = float(flat[c].min()), float(flat[c].max())
        if lo == hi:
            where = Path(files[c] if len(files) == len(channels) else files[0]).name
            out.append(f"channel {name} is constant (every pixel {lo:g}) in {where}: a blank or failed "
                       "acquisition? its map says nothing about that channel")
    if len(out) == len(channels) and len(out) > 1:
        names = ", ".join(Path(f).name for f in files)
        return [f"the field is blank or constant (every channel is constant, in {names}): a failed acquisition? "
                "its map says nothing"]
    return out
