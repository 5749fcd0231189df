"""bioimage.io model packages built by bioimageio.spec itself (build_description, save_bioimageio_package)
around real TorchScript classifiers, format-validated before any test uses them.

The test tensors are made here, independently of pcim's own mapping: the test input is a real demo field,
the test output what the weights give for it after the stated preprocessing computed with numpy.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ome_zarr_factory import demo_fields

SCALE_RANGE_CLIP = [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 1.0,
                                                       "max_percentile": 99.8}},
                    {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}}]


def reference_preprocess(x: np.ndarray, ops: Sequence[dict[str, Any]]) -> np.ndarray:
    """The bioimage.io operations on a (B, C, Y, X) batch, per sample and channel, written out with numpy."""
    x = x.astype(np.float64)
    for op in ops:
        kw = op.get("kwargs", {})
        if op["id"] == "scale_range":
            lo = np.percentile(x, kw.get("min_percentile", 0.0), axis=(2, 3), keepdims=True)
            hi = np.percentile(x, kw.get("max_percentile", 100.0), axis=(2, 3), keepdims=True)
            x = (x - lo) / (hi - lo + kw.get("eps", 1e-6))
        elif op["id"] == "clip":
            x = np.clip(x, kw["min"], kw["max"])
        elif op["id"] == "zero_mean_unit_variance":
            x = (x - x.mean(axis=(2, 3), keepdims=True)) / (x.std(axis=(2, 3), keepdims=True) + kw.get("eps", 1e-6))
        elif op["id"] == "fixed_zero_mean_unit_variance":
            shape = (1, -1, 1, 1)
            x = (x - np.reshape(kw["mean"], shape)) / np.reshape(kw["std"], shape)
        elif op["id"] == "scale_linear":
            shape = (1, -1, 1, 1)
            x = x * np.reshape(kw.get("gain", 1.0), shape) + np.reshape(kw.get("offset", 0.0), shape)
        else:
            raise ValueError(op["id"])
    return x.astype(np.float32)


def _space(axis_id: str, size: int | tuple[int, int]) -> dict[str, Any]:
    if isinstance(size, tuple):
        return {"type": "space", "id": axis_id, "size": {"min": size[0], "step": size[1]}}
    return {"type": "space", "id": axis_id, "size": size}


def build_package(folder: Path, weights: Path, *, channels: Sequence[str] = ("DNA", "PH3", "Actin"),
                  classes: Sequence[str] | None = ("negative", "mitotic"), size: int | tuple[int, int] = (32, 16),
                  preprocessing: Sequence[dict[str, Any]] = tuple(SCALE_RANGE_CLIP), test_size: int = 128,
                  zip_name: str | None = "model.zip", expected_ops: Sequence[dict[str, Any]] | None = None,
                  output_axes: list[dict[str, Any]] | None = None, weights_entry: dict[str, Any] | None = None,
                  extra_files: dict[str, Path] | None = None) -> Path:
    """A model package around `weights` (TorchScript): the .zip (or the folder's rdf.yaml when zip_name is
    None). `expected_ops`: the preprocessing that made the test output (default: the stated one)."""
    spec = pytest.importorskip("bioimageio.spec", reason="bioimageio.spec (test extra) builds the packages")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, folder / "weights.ts")
    for name, path in (extra_files or {}).items():
        shutil.copy(path, folder / name)
    field = demo_fields(["A01"])["A01"][1][:, :test_size, :test_size].astype(np.float32)[None]
    np.save(folder / "test_input.npy", field)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(weights))
    with torch.no_grad():
        out = module(torch.from_numpy(reference_preprocess(field, expected_ops or preprocessing))).numpy()
    np.save(folder / "test_output.npy", out)
    (folder / "README.md").write_text("# A pcim test classifier\n\n## Validation\n\nBuilt by pcim's tests.\n")
    out_channel = ({"type": "channel", "channel_names": list(classes)} if classes is not None
                   else {"type": "channel", "channel_names": [f"channel{i}" for i in range(out.shape[1])]})
    rdf = {
        "format_version": "0.5.4", "type": "model", "name": "pcim test classifier",
        "description": "a classifier of multi-channel fields, for pcim's tests",
        "authors": [{"name": "pcim team"}], "cite": [{"text": "pcim", "url": "https://example.org/pcim"}],
        "license": "BSD-3-Clause", "documentation": "README.md", "tags": ["classification"],
        "inputs": [{"id": "raw", "axes": [{"type": "batch"},
                                          {"type": "channel", "channel_names": list(channels)},
                                          _space("y", size), _space("x", size)],
                    "test_tensor": {"source": "test_input.npy"}, "preprocessing": list(preprocessing)}],
        "outputs": [{"id": "logits", "axes": output_axes or [{"type": "batch"}, out_channel],
                     "test_tensor": {"source": "test_output.npy"}}],
        "weights": weights_entry or {"torchscript": {"source": "weights.ts", "pytorch_version": "2.13"}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        descr = spec.build_description(rdf, context=spec.ValidationContext(root=folder))
    assert not isinstance(descr, spec.InvalidDescr), descr.validation_summary.format()
    assert descr.validation_summary.status != "failed"  # validated by bioimageio.spec before use
    if zip_name is None:
        spec.save_bioimageio_yaml_only(descr, folder / "rdf.yaml")
        return folder / "rdf.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(spec.save_bioimageio_package(descr, output_path=folder.parent / zip_name))
