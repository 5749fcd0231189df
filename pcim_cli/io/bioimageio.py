"""A bioimage.io model package as `model.path`: its TorchScript weights and the settings its rdf.yaml states.

A package is an `rdf.yaml` / `bioimageio.yaml` (with its files beside it), a folder holding one, or the
`.zip` bioimage.io distributes; it is read with `bioimageio.spec` (the `pcim-cli[bioimageio]` extra),
format-validated, and converted to the latest format (0.5) when older. pcim takes from it:

- the weights: `torchscript` (from a .zip, extracted once into the cache, `$PCIM_CACHE_DIR` or
  `~/.cache/pcim`, named by their sha256); other weight formats are refused, naming the supported one;
- the input: one tensor with axes batch, channel, y, x (in that order); its channel names; its spatial
  size: fixed (-> model.input_size, fields are tiled) or `min + n * step` (a rule fields are checked
  against); its preprocessing, mapped to `model.normalize` (`map_preprocessing`); anything pcim cannot
  reproduce exactly is refused with the reason;
- the output: one tensor with axes batch and channel (or index): the class logits, named by its
  channel names.

Channel names that bioimage.io fills in by default (`channel0`, `channel1`, …) name nothing and are not
compared. io/package_checks.py checks the package against plate.yaml (`reconcile`) and runs its own test
(`self_check`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcim_cli.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

DESCRIPTION_NAMES = ("rdf.yaml", "bioimageio.yaml")
SUPPORTED_WEIGHTS = ("torchscript",)
#: plate.yaml keys the user may let win over the package (model.override_package)
OVERRIDABLE = ("normalize", "channels", "classes", "input_size")
INSTALL_HINT = "pip install 'pcim-cli[bioimageio]'"
_GENERIC_NAME = re.compile(r"channel\d+")
#: the package's test output must be met within these tolerances (as bioimageio.core's own test)
TEST_RTOL, TEST_ATOL = 1e-3, 1e-4


class PackageError(ModelError):
    """The package cannot be used as it is (exit 78): what it says, and why pcim cannot do it."""


@dataclass
class PackageModel:
    """What pcim takes from a bioimage.io model package."""

    source: Path  # the rdf.yaml, folder or .zip the user gave
    name: str
    id: str | None
    version: str | None
    format_version: str  # as read (an older description is converted to the latest 0.5)
    weights: Path  # a local TorchScript file
    weights_sha256: str
    n_channels: int
    channels: list[str] | None  # input channel names; None when the package names none
    classes: list[str] | None  # output channel names; None when the package names none
    n_classes: int | None
    input_size: tuple[int, int] | None  # a fixed (y, x) input size
    size_rule: dict[str, dict[str, int]] | None  # {"y": {"min": m, "step": s}, "x": {...}}: min + n * step
    normalize: dict[str, Any] | None  # model.normalize; None: the preprocessing cannot be mapped
    normalize_problem: str | None  # why the preprocessing cannot be mapped
    preprocessing: list[dict[str, Any]] = field(default_factory=list)  # as the package states it
    postprocessing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what pcim does not reproduce, and why it does not matter
    test_tensors: tuple[bytes, bytes] | None = None  # the .npy of the test input and output

    def size_ok(self, size: tuple[int, int]) -> bool:
        """The package accepts an input of (H, W) `size`."""
        if self.input_size is not None:
            return tuple(size) == tuple(self.input_size)
        if self.size_rule is None:
            return True
        return all(n >= r["min"] and (n - r["min"]) % r["step"] == 0
                   for n, r in zip(size, (self.size_rule["y"], self.size_rule["x"]), strict=True))

    def largest_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The largest accepted input size within `size` (a tile size for fields the rule does not fit)."""
        if self.size_rule is None:
            return None
        out = []
        for n, r in zip(size, (self.size_rule["y"], self.size_rule["x"]), strict=True):
            if n < r["min"]:
                return None
            out.append(r["min"] + (n - r["min"]) // r["step"] * r["step"])
        return out[0], out[1]

    def record(self) -> dict[str, Any]:
        """What was taken from the package (field records, `pcim validate`)."""
        return {"source": str(self.source), "name": self.name, "id": self.id, "version": self.version,
                "format_version": self.format_version, "weights": "torchscript",
                "weights_sha256": self.weights_sha256, "channels": self.channels, "classes": self.classes,
                "input_size": list(self.input_size) if self.input_size else None, "size_rule": self.size_rule,
                "normalize": self.normalize, "preprocessing": self.preprocessing,
                "postprocessing": self.postprocessing, "notes": self.notes}


# ---------------------------------------------------------------- finding and loading


def is_package(path: Path) -> bool:
    """`model.path` names a bioimage.io package (a .zip, a YAML description, or a folder holding one)."""
    path = Path(path)
    if path.suffix.lower() in (".zip", ".yaml", ".yml"):
        return True
    return path.is_dir() and any((path / n).is_file() for n in DESCRIPTION_NAMES)


def _description_source(path: Path) -> Path:
    if path.is_dir():
        for name in DESCRIPTION_NAMES:
            if (path / name).is_file():
                return path / name
    return path


def _spec():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bioimageio.spec as spec
    except ImportError as exc:
        raise ConfigError(f"model.path is a bioimage.io model package, which pcim reads with bioimageio.spec: "
                          f"install it ({INSTALL_HINT})") from exc
    return spec


def cache_dir() -> Path:
    """Where weights taken out of .zip packages are kept: $PCIM_CACHE_DIR, else $XDG_CACHE_HOME/pcim
    (~/.cache/pcim). On a cluster it must be readable from the workers (a shared home is)."""
    if os.environ.get("PCIM_CACHE_DIR"):
        return Path(os.environ["PCIM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pcim"


def load_package(path: str | Path) -> PackageModel:
    """Read and format-validate a package; raise PackageError (78) naming the file and what is wrong.

    No file is downloaded: a package whose weights are at a URL is refused (download it as a .zip).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model package {path} does not exist: fix model.path")
    if path.is_file() and path.suffix.lower() == ".zip" and not zipfile.is_zipfile(path):
        raise PackageError(f"model package {path} is not a zip archive (a download that stopped early?): download "
                           "the package again, or give its rdf.yaml")
    spec = _spec()
    source = _description_source(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descr = spec.load_description(source, format_version="latest", perform_io_checks=False)
    except Exception as exc:  # noqa: BLE001 - a damaged zip, unreadable YAML, …
        raise PackageError(f"cannot read model package {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(descr, spec.InvalidDescr):
        raise PackageError(f"model package {path} is not a valid bioimage.io description: {_errors(descr)}")
    if getattr(descr, "type", None) != "model":
        raise PackageError(f"{path} describes a bioimage.io {getattr(descr, 'type', '?')}, not a model")
    where = f"model package {path}"
    weights, sha = _weights(descr, where)
    inp = _one(descr.inputs, "input", where)
    out = _one(descr.outputs, "output", where)
    n_channels, channels, input_size, size_rule = _input_axes(inp, where)
    n_classes, classes = _output_axes(out, where)
    ops = [d for d in map(_op_dict, inp.preprocessing or [])  # bioimageio.spec adds float32 casts itself
           if not (d["id"] == "ensure_dtype" and d["kwargs"].get("dtype") in ("float32", "float64"))]
    normalize, notes, problem = None, [], None
    try:
        normalize, notes = map_preprocessing(ops, n_channels, {str(a.id): a.type for a in inp.axes})
    except PackageError as exc:
        problem = str(exc)
    post = [op.id for op in out.postprocessing or [] if op.id != "ensure_dtype"]
    if post:
        notes.append(f"postprocessing {', '.join(post)} is not applied: pcim explains the weights' outputs as logits")
    return PackageModel(
        source=path, name=str(descr.name), id=None if descr.id is None else str(descr.id),
        version=None if getattr(descr, "version", None) is None else str(descr.version),
        format_version=str(descr.format_version),
        weights=weights, weights_sha256=sha, n_channels=n_channels, channels=channels, classes=classes,
        n_classes=n_classes, input_size=input_size, size_rule=size_rule, normalize=normalize,
        normalize_problem=problem, preprocessing=ops, postprocessing=post, notes=notes,
        test_tensors=_test_tensors(inp, out))


def _errors(descr: Any, n: int = 4) -> str:
    errors = getattr(descr.validation_summary, "errors", None) or []
    if not errors:
        details = [d for d in getattr(descr.validation_summary, "details", []) if d.status == "failed"]
        return "; ".join(str(d.name) for d in details[:n]) or "see `bioimageio validate`"
    shown = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:n])
    return shown + (f" (and {len(errors) - n} more)" if len(errors) > n else "")


def _one(tensors: Sequence[Any], kind: str, where: str) -> Any:
    if len(tensors) != 1:
        names = ", ".join(str(t.id) for t in tensors)
        raise PackageError(f"{where} has {len(tensors)} {kind} tensors ({names}); pcim explains models with one "
                           f"image in and one vector of class logits out")
    return tensors[0]


def _weights(descr: Any, where: str) -> tuple[Path, str]:
    """The TorchScript weights as a local file, and their sha256."""
    entry = descr.weights.torchscript
    if entry is None:
        given = [name for name in type(descr.weights).model_fields if getattr(descr.weights, name) is not None]
        raise PackageError(f"{where} has {', '.join(given)} weights; pcim runs {', '.join(SUPPORTED_WEIGHTS)} "
                           "weights only: add them to the package (bioimageio.core converts pytorch_state_dict "
                           "weights to torchscript) or export the model with torch.jit.script and give that file")
    src = entry.source
    local = None
    if hasattr(src, "absolute"):
        try:
            local = Path(src.absolute())
        except Exception:  # noqa: BLE001 - a path inside a zip has no local form
            local = None
    if local is not None and local.is_file():
        sha = _sha256(local.read_bytes())
        _check_sha(entry, sha, where)
        return local, sha
    if str(src).startswith(("http://", "https://")):
        raise PackageError(f"{where}: its weights are at {src}; pcim reads no URLs: download the package as a "
                           ".zip (bioimage.io: Download) and give that")
    try:
        data = entry.get_reader().read()
    except Exception as exc:  # noqa: BLE001 - a member missing from the zip
        raise PackageError(f"{where}: cannot read its weights {src} ({type(exc).__name__}: {exc})") from exc
    sha = _sha256(data)
    _check_sha(entry, sha, where)
    target = cache_dir() / "bioimageio" / sha / Path(str(src)).name
    if not target.is_file() or _sha256(target.read_bytes()) != sha:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(target)
        logger.info("%s: weights extracted to %s", where, target)
    return target, sha


def _check_sha(entry: Any, sha: str, where: str) -> None:
    stated = getattr(entry, "sha256", None)
    if stated is not None and str(stated) != sha:
        raise PackageError(f"{where}: its weights {entry.source} have sha256 {sha}, but the package states "
                           f"{stated}: the file was changed or damaged; download the package again")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _test_tensors(inp: Any, out: Any) -> tuple[bytes, bytes] | None:
    try:
        return inp.test_tensor.get_reader().read(), out.test_tensor.get_reader().read()
    except Exception:  # noqa: BLE001 - a package without readable test tensors: no self check
        return None


def _names(axis: Any) -> list[str] | None:
    names = [str(n) for n in getattr(axis, "channel_names", None) or []]
    if not names or all(_GENERIC_NAME.fullmatch(n) for n in names):
        return None
    return names


def _input_axes(inp: Any, where: str):
    """(channels, channel names, fixed size, size rule) from the input's axes batch, channel, y, x."""
    types = [a.type for a in inp.axes]
    if types != ["batch", "channel", "space", "space"]:
        described = ", ".join(f"{a.id} ({a.type})" for a in inp.axes)
        raise PackageError(f"{where}: its input axes are {described}; pcim feeds 2-D multi-channel images as "
                           "batch, channel, y, x (a 3-D, time-series or channel-last model is not supported)")
    batch, channel, y, x = inp.axes
    if getattr(batch, "size", None) == 1:
        raise PackageError(f"{where}: its input's batch size is fixed to 1; pcim scores several images per "
                           "model call")
    sizes = []
    rule = {}
    for axis in (y, x):
        size = axis.size
        if isinstance(size, int):
            sizes.append(size)
        elif hasattr(size, "min") and hasattr(size, "step"):
            rule[str(axis.id)] = {"min": int(size.min), "step": int(size.step)}
        else:
            raise PackageError(f"{where}: its input axis {axis.id} has a size given relative to another axis "
                               f"({size}); pcim supports fixed sizes and min + n * step")
    if len(sizes) == 2:
        return channel.size, _names(channel), (sizes[0], sizes[1]), None
    if sizes:
        raise PackageError(f"{where}: one spatial input axis has a fixed size and the other a range; pcim needs "
                           "both fixed or both min + n * step")
    return channel.size, _names(channel), None, {"y": rule[str(y.id)], "x": rule[str(x.id)]}


def _output_axes(out: Any, where: str) -> tuple[int | None, list[str] | None]:
    types = [a.type for a in out.axes]
    if types not in (["batch", "channel"], ["batch", "index"]):
        described = ", ".join(f"{a.id} ({a.type})" for a in out.axes)
        raise PackageError(f"{where}: its output axes are {described}; pcim explains classifiers, whose output "
                           "is batch x classes (a segmentation or restoration model is not supported)")
    axis = out.axes[1]
    if axis.type == "channel":
        return axis.size, _names(axis)
    size = axis.size
    return (size if isinstance(size, int) else None), None


def _op_dict(op: Any) -> dict[str, Any]:
    kwargs = getattr(op, "kwargs", None)
    data = kwargs.model_dump(mode="json", exclude_none=True) if kwargs is not None else {}
    return {"id": str(op.id), "kwargs": data}


# ---------------------------------------------------------------- preprocessing -> model.normalize


def map_preprocessing(ops: Sequence[Mapping[str, Any]], n_channels: int,
                      axis_types: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The model.normalize that reproduces a package's input preprocessing, and notes on what differs.

    Supported (ensure_dtype to float32/float64 dropped anywhere): nothing (none); scale_range per sample
    and channel (percentile, clip false), followed by clip 0..1 (percentile); zero_mean_unit_variance per
    sample and channel (zscore); fixed_zero_mean_unit_variance and scale_linear, one value or one per
    channel (fixed, clip false). Raises PackageError with the reason for anything else.
    """
    steps = []
    for op in ops:
        if op["id"] == "ensure_dtype":
            if op["kwargs"].get("dtype") not in ("float32", "float64"):
                raise PackageError(f"preprocessing ensure_dtype {op['kwargs'].get('dtype')} (pcim feeds float32)")
            continue
        steps.append(op)
    notes: list[str] = []
    ids = [s["id"] for s in steps]
    if not steps:
        return {"method": "none"}, notes
    first, kw = steps[0]["id"], steps[0]["kwargs"]
    if ids == ["scale_range"] or (ids == ["scale_range", "clip"] and _clips_unit(steps[1]["kwargs"])):
        _per_channel(kw, n_channels, axis_types, "scale_range")
        if kw.get("reference_tensor") not in (None, ""):
            raise PackageError(f"scale_range takes its percentiles from tensor {kw['reference_tensor']!r}")
        notes.append(f"scale_range eps {kw.get('eps', 1e-6)} not added to the range (a relative difference below "
                     "eps / (high - low))")
        return {"method": "percentile", "low": float(kw.get("min_percentile", 0.0)),
                "high": float(kw.get("max_percentile", 100.0)), "clip": len(steps) == 2}, notes
    if ids == ["zero_mean_unit_variance"]:
        _per_channel(kw, n_channels, axis_types, "zero_mean_unit_variance")
        return {"method": "zscore", "eps": float(kw.get("eps", 1e-6))}, notes
    if ids == ["fixed_zero_mean_unit_variance"]:
        mean, std = _along_channel(kw, ("mean", "std"), n_channels, axis_types, first)
        return {"method": "fixed", "min": _one_or_all(mean),
                "max": _one_or_all([m + s for m, s in zip(mean, std, strict=True)]), "clip": False}, notes
    if ids == ["scale_linear"]:
        gain, offset = _along_channel({"gain": 1.0, "offset": 0.0, **kw}, ("gain", "offset"), n_channels,
                                      axis_types, first)
        if any(g == 0 for g in gain):
            raise PackageError("preprocessing scale_linear with gain 0 (a constant input)")
        lo = [-o / g for g, o in zip(gain, offset, strict=True)]
        hi = [(1 - o) / g for g, o in zip(gain, offset, strict=True)]
        if any(g < 0 for g in gain):
            raise PackageError("preprocessing scale_linear with a negative gain (an inverted image)")
        return {"method": "fixed", "min": _one_or_all(lo), "max": _one_or_all(hi), "clip": False}, notes
    raise PackageError(
        f"preprocessing {' -> '.join(ids)} has no pcim equivalent; pcim reproduces: none, scale_range (with or "
        "without a clip to 0..1), zero_mean_unit_variance, fixed_zero_mean_unit_variance, scale_linear, each per "
        "channel; set model.normalize and list normalize in model.override_package to run with your own"
    )


def _clips_unit(kw: Mapping[str, Any]) -> bool:
    return kw.get("min") == 0 and kw.get("max") == 1 and "min_percentile" not in kw and "max_percentile" not in kw


def _per_channel(kw: Mapping[str, Any], n_channels: int, axis_types: Mapping[str, str], op: str) -> None:
    """Statistics over y and x of each image and channel (the batch axis joins nothing in pcim: one field
    at a time); across channels only for a one-channel model."""
    axes = kw.get("axes")
    types = {axis_types.get(a, "?") for a in axes} if axes is not None else set(axis_types.values())
    if "channel" in types and n_channels > 1:
        raise PackageError(f"preprocessing {op} computes its statistics over all channels together; pcim "
                           "normalises each channel on its own")
    if not types <= {"space", "batch", "channel"}:
        raise PackageError(f"preprocessing {op} over axes {list(axes or [])}")


def _along_channel(kw: Mapping[str, Any], keys: tuple[str, str], n_channels: int, axis_types: Mapping[str, str],
                   op: str) -> tuple[list[float], list[float]]:
    axis = kw.get("axis")
    if axis is not None and axis_types.get(axis) != "channel":
        raise PackageError(f"preprocessing {op} varies along axis {axis!r}; pcim has one value per channel")
    out = []
    for key in keys:
        value = kw[key]
        values = [float(v) for v in value] if isinstance(value, list) else [float(value)] * n_channels
        if len(values) != n_channels:
            raise PackageError(f"preprocessing {op} gives {len(values)} {key} values for {n_channels} channels")
        out.append(values)
    return out[0], out[1]


def _one_or_all(values: list[float]) -> float | list[float]:
    return values[0] if len(set(values)) == 1 else values
