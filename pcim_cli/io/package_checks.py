"""A bioimage.io package against the plate: `reconcile` checks what plate.yaml says (model.normalize,
model.classes, model.input_size, plate.channels) against what the package states (io/bioimageio.py reads
it): a disagreement is a configuration error naming both, unless the key is listed in
`model.override_package`. `self_check` runs the package's own test input through its weights with the
mapped preprocessing and compares the package's test output.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pcim_cli.io.bioimageio import TEST_ATOL, TEST_RTOL, PackageModel

# ---------------------------------------------------------------- plate.yaml against the package


@dataclass
class Resolved:
    """The settings a run uses, and how each was decided ("package", "plate.yaml", "plate.yaml (override)")."""

    normalize: dict[str, Any]
    classes: list[str] | None
    input_size: tuple[int, int] | None
    taken: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (yaml path, message): exit 78

    def record(self, package: PackageModel) -> dict[str, Any]:
        return {**package.record(), "decided": dict(self.taken)}


def reconcile(pkg: PackageModel, *, channels: Sequence[str], normalize: Mapping[str, Any] | None,
              classes: Sequence[str] | None, input_size: tuple[int, int] | None,
              override: Iterable[str] = ()) -> Resolved:
    """plate.yaml's settings (None: not set there) against the package's.

    Unset keys take the package's value; a set key that agrees is kept; one that disagrees is a problem
    naming both, unless listed in `override` (plate.yaml wins and the record says so).
    """
    override = set(override)
    where = f"model package {pkg.source}"
    out = Resolved(normalize={"method": "none"}, classes=None, input_size=None)

    if len(channels) != pkg.n_channels:
        out.problems.append(("plate.channels", f"lists {len(channels)} channel(s) ({', '.join(channels)}) but "
                             f"{where} takes {pkg.n_channels}" + (f" ({', '.join(pkg.channels)})" if pkg.channels
                                                                  else "")))
    elif pkg.channels is not None and list(channels) != pkg.channels:
        if "channels" in override:
            out.taken["channels"] = "plate.yaml (override)"
        else:
            same = sorted(channels) == sorted(pkg.channels)
            out.problems.append(("plate.channels", f"{', '.join(channels)} but {where} names its input channels "
                                 f"{', '.join(pkg.channels)}" + (" (the same names in another order: list them in "
                                                                 "the package's order)" if same else "")
                                 + "; rename them, or list channels in model.override_package"))
    else:
        out.taken["channels"] = "package" if pkg.channels is not None else "plate.yaml"

    mine = dict(normalize) if normalize is not None else None
    if mine is None:
        if pkg.normalize is None:
            out.problems.append(("model.normalize", f"{where}: {pkg.normalize_problem}"))
        else:
            out.normalize, out.taken["normalize"] = dict(pkg.normalize), "package"
    elif pkg.normalize is not None and _same_normalize(mine, pkg.normalize):
        out.normalize, out.taken["normalize"] = dict(pkg.normalize), "package"
    elif "normalize" in override:
        out.normalize, out.taken["normalize"] = mine, "plate.yaml (override)"
    elif pkg.normalize is None:
        out.problems.append(("model.normalize", f"{where}: {pkg.normalize_problem}"))
    else:
        out.problems.append(("model.normalize", f"{_describe(mine)} but {where} preprocesses its input as "
                             f"{_describe(pkg.normalize)}; remove model.normalize to use the package's, or list "
                             "normalize in model.override_package"))

    if classes is None:
        out.classes = list(pkg.classes) if pkg.classes is not None else None
        out.taken["classes"] = "package" if pkg.classes is not None else "model output"
    elif pkg.classes is None or list(classes) == pkg.classes:
        out.classes, out.taken["classes"] = list(classes), "plate.yaml"
    elif "classes" in override:
        out.classes, out.taken["classes"] = list(classes), "plate.yaml (override)"
    else:
        out.classes = list(classes)
        out.problems.append(("model.classes", f"{', '.join(classes)} but {where} names its outputs "
                             f"{', '.join(pkg.classes)}; remove model.classes to use the package's, or list "
                             "classes in model.override_package"))

    if input_size is None:
        out.input_size = pkg.input_size
        out.taken["input_size"] = "package" if pkg.input_size is not None else "fields"
    elif pkg.size_ok(tuple(input_size)):
        out.input_size, out.taken["input_size"] = tuple(input_size), "plate.yaml"
    elif "input_size" in override:
        out.input_size, out.taken["input_size"] = tuple(input_size), "plate.yaml (override)"
    else:
        out.input_size = tuple(input_size)
        rule = (f"{pkg.input_size[0]} x {pkg.input_size[1]}" if pkg.input_size is not None else
                " x ".join(f"{r['min']} + n * {r['step']}" for r in (pkg.size_rule or {}).values()))
        out.problems.append(("model.input_size", f"{list(input_size)} but {where} takes inputs of {rule} "
                             "pixels; remove model.input_size to use the package's, or list input_size in "
                             "model.override_package"))
    return out


def _same_normalize(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same normalisation (keys a method does not use and number spellings aside)."""
    if a.get("method") != b.get("method"):
        return False
    defaults = NORMALIZE_DEFAULTS.get(str(a.get("method")), {})
    for k in set(a) | set(b) | set(defaults):
        if k == "method":
            continue
        va, vb = a.get(k, defaults.get(k)), b.get(k, defaults.get(k))
        if isinstance(va, bool) or isinstance(vb, bool) or va is None or vb is None:
            if va != vb:
                return False
            continue
        try:
            x, y = np.broadcast_arrays(np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64))
        except ValueError:
            return False
        if not np.allclose(x, y, rtol=1e-9, atol=0):
            return False
    return True


#: the defaults of model.normalize's keys per method (config.py), for comparing a partly written setting
NORMALIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "percentile": {"low": 1.0, "high": 99.8, "clip": True},
    "fixed": {"clip": True},
    "zscore": {"eps": 1e-6},
    "none": {},
}


def _describe(norm: Mapping[str, Any]) -> str:
    rest = ", ".join(f"{k}: {v}" for k, v in norm.items() if k != "method")
    return f"normalize {norm.get('method')}" + (f" ({rest})" if rest else "")


# ---------------------------------------------------------------- the package's own test


def self_check(pkg: PackageModel, normalize: Mapping[str, Any], module: Any) -> str | None:
    """Run the package's test input, normalised with `normalize`, through `module` (its weights); compare
    the test output (after softmax / sigmoid when the package post-processes with one). None when it
    matches or the package has no test tensors; else the problem."""
    import torch

    from pcim_cli.io.images import normalize as apply

    if pkg.test_tensors is None:
        return None
    x = np.load(io.BytesIO(pkg.test_tensors[0]))
    expected = np.load(io.BytesIO(pkg.test_tensors[1]))
    if x.ndim != 4:
        return None
    norm = dict(normalize)
    method = norm.pop("method")
    batch = np.stack([apply(sample, method, **norm) for sample in x.astype(np.float32)])
    with torch.no_grad():
        got = module(torch.from_numpy(batch)).float()
    if "softmax" in pkg.postprocessing:
        got = torch.softmax(got, dim=1)
    elif "sigmoid" in pkg.postprocessing:
        got = torch.sigmoid(got)
    got = got.numpy()
    if got.shape != expected.shape:
        return (f"model package {pkg.source}: its test input gives outputs of shape {got.shape}, but its test "
                f"output is {expected.shape}")
    if not np.allclose(got, expected, rtol=TEST_RTOL, atol=TEST_ATOL):
        worst = float(np.max(np.abs(got - expected)))
        return (f"model package {pkg.source}: its test input, preprocessed as pcim maps the package's "
                f"preprocessing ({_describe(normalize)}), gives outputs that differ from its test output by up to "
                f"{worst:.3g}; the weights or the preprocessing stated in the package are not the ones it was "
                "tested with")
    return None
