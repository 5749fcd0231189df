"""Find a plate's fields (TIFF files, or an OME-Zarr HCS store), read one as a (C, H, W) float32 array,
and normalise it.

File names are matched against `plate.pattern` (docs/reference/plate-yaml.md): `{well}` (or `{row}` and
`{col}`), `{field}`, `{channel}` and `*` (anything, e.g. a vendor GUID). Matching ignores case, so
`A01_s1_w1.TIF` matches `{well}_s{field}_w{channel}.tif`. With `{channel}`, a field is one 2-D file
per channel; without it, each file is one multi-channel stack (TIFF pages, an RGB image, or an
OME-TIFF / ImageJ hyperstack with a C axis; a Z axis is max-projected; of a T axis, `plate.timepoint`
picks one). A `plate.images` that is an OME-Zarr HCS plate is read by io/ome_zarr_plate.py instead; its
fields are FieldSources too (with `zarr` set), so everything downstream reads both the same way.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pcim_cli.errors import InputDataError
from pcim_cli.io import ome_zarr_plate
from pcim_cli.io.fields import FieldSource, Problem
from pcim_cli.io.patterns import compile_pattern
from pcim_cli.io.plate import Well, WellIdError, parse_well

logger = logging.getLogger(__name__)

#: images with more pixels than this are subsampled (strided) for percentile estimation
PERCENTILE_SAMPLE_PIXELS = 1024 * 1024
NORMALIZE_METHODS = ("percentile", "fixed", "zscore", "none")


def _list_files(images_dir: Path, recursive: bool) -> list[Path]:
    walker = images_dir.rglob("*") if recursive else images_dir.iterdir()
    return sorted(p for p in walker if p.is_file() and not p.name.startswith("."))


def discover_fields(
    images_dir: Path,
    pattern: str,
    channels: Mapping[str, str],
    wells: Iterable[str] | None = None,
    timepoint: int | None = None,
) -> tuple[dict[str, list[FieldSource]], list[Problem]]:
    """Group the image files of a plate into fields (an OME-Zarr plate: its fields, `pattern` unused).

    `channels` maps channel name -> file-name token, in the model's channel order. Returns
    `({well: [FieldSource, ...] sorted by field}, problems)`: fields with a missing or ambiguous
    channel file are left out and described in `problems`, as are requested `wells` with no file.
    Wells are canonical names (A01). A pattern with '/' matches paths below `images_dir`.
    Raises InputDataError when `images_dir` is not a folder, ConfigError for a bad pattern.
    """
    images_dir = Path(images_dir)
    if ome_zarr_plate.is_zarr(images_dir):
        return ome_zarr_plate.discover_fields(images_dir, channels, wells, timepoint)
    if not images_dir.is_dir():
        raise InputDataError(f"image folder {images_dir} does not exist or is not a folder: fix plate.images")
    names = list(channels)
    tokens = [channels[n] for n in names]
    regex = compile_pattern(pattern, tokens)
    per_channel = "channel" in regex.groupindex
    by_token = {t.lower(): t for t in tokens}
    wanted = None if wells is None else {parse_well(w).name for w in wells}

    found: dict[tuple[Well, int], dict[str | None, list[Path]]] = defaultdict(lambda: defaultdict(list))
    problems: list[Problem] = []
    files = _list_files(images_dir, recursive="/" in pattern)
    n_matched = 0
    for path in files:
        rel = path.relative_to(images_dir).as_posix()
        match = regex.fullmatch(rel)
        if not match:
            continue
        n_matched += 1
        groups = match.groupdict()
        text = groups["well"] if "well" in groups else f"{groups['row']}{groups['col']}"
        try:
            well = parse_well(text)
        except WellIdError as exc:
            problems.append(Problem(f"{rel}: {exc}"))
            continue
        if wanted is not None and well.name not in wanted:
            continue
        field = int(groups["field"]) if "field" in groups else 1
        token = by_token[groups["channel"].lower()] if per_channel else None
        found[(well, field)][token].append(path)

    if n_matched == 0:
        examples = ", ".join(p.relative_to(images_dir).as_posix() for p in files[:3]) or "none"
        problems.append(Problem(
            f"no file in {images_dir} matches plate.pattern {pattern!r} "
            f"(channel tokens: {', '.join(tokens)}); files there look like: {examples}"
        ))

    result: dict[str, list[FieldSource]] = {}
    for (well, field), by_key in sorted(found.items()):
        where = f"{well.name} field {field}"
        chosen: list[Path] = []
        keys: list[tuple[str | None, str]] = (
            [(t, n) for n, t in zip(names, tokens, strict=True)] if per_channel else [(None, "")]
        )
        for token, name in keys:
            paths = by_key.get(token, [])
            label = "" if token is None else f" for channel {name}" + (f" (token {token})" if token != name else "")
            if not paths:
                problems.append(Problem(f"{where}: no file{label}; restore it under {images_dir}",
                                        well.name, field))
            elif len(paths) > 1:
                listed = ", ".join(p.name for p in paths)
                problems.append(Problem(f"{where}: {len(paths)} files{label} ({listed}); make plate.pattern more "
                                        "specific", well.name, field))
            else:
                chosen.append(paths[0])
        if len(chosen) == len(keys):
            result.setdefault(well.name, []).append(FieldSource(well.name, field, tuple(chosen), timepoint=timepoint))

    if wanted is not None:
        for name in sorted(wanted - set(result), key=parse_well):
            if not any(w.name == name for w, _ in found):
                problems.append(Problem(f"{name}: no image file matches plate.pattern {pattern!r}", name))
    logger.debug("discovered %d fields in %d wells under %s", sum(map(len, result.values())), len(result),
                 images_dir)
    return result, problems


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """The first image series of a TIFF and its axes; plain multi-series files are stacked as pages."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        if not series:
            raise ValueError("no image in the file")
        first = series[0]
        same = all(s.shape == first.shape and s.axes == first.axes for s in series)
        if len(series) > 1 and same and not (tif.is_ome or tif.is_imagej) and first.axes == "YX":
            return np.stack([s.asarray() for s in series]), "I" + first.axes
        if len(series) > 1:
            logger.warning("%s holds %d image series; reading the first only", path, len(series))
        return first.asarray(), first.axes


def _to_cyx(arr: np.ndarray, axes: str, path: Path, timepoint: int | None = None) -> np.ndarray:
    """Reorder a TIFF series to (C, Y, X): one time point, Z max-projected, singleton axes dropped."""
    if "Y" not in axes or "X" not in axes:
        raise InputDataError(f"{path}: no Y/X image axes (axes {axes}, shape {arr.shape})")
    n_t = arr.shape[axes.index("T")] if "T" in axes else 1
    if timepoint is not None and timepoint >= n_t:
        raise InputDataError(f"{path} has {n_t} time point(s); plate.timepoint {timepoint} is past them "
                             "(it counts from 0)")
    if "T" in axes and (n_t > 1 or timepoint is not None):
        if timepoint is None:
            raise InputDataError(
                f"{path} is a time series ({n_t} time points, axes {axes}); choose one with plate.timepoint "
                f"(0 to {n_t - 1}), or export one time point per file"
            )
        arr = np.take(arr, timepoint, axis=axes.index("T"))
        axes = axes.replace("T", "")
    if "Z" in axes:
        arr = arr.max(axis=axes.index("Z"))
        axes = axes.replace("Z", "")
    others = [(i, a) for i, a in enumerate(axes) if a not in "YX" and arr.shape[i] > 1]
    if len(others) > 1:
        desc = ", ".join(f"{a}={arr.shape[i]}" for i, a in others)
        raise InputDataError(
            f"{path}: cannot tell which axis holds the channels ({desc}; axes {axes}); "
            "save one axis of channels (C) and at most a Z axis"
        )
    order = [i for i, _ in others] + [axes.index("Y"), axes.index("X")]
    squeeze = tuple(i for i, a in enumerate(axes) if a not in "YX" and arr.shape[i] == 1)
    arr = np.squeeze(arr, axis=squeeze) if squeeze else arr
    kept = [i for i in range(len(axes)) if i not in squeeze]
    arr = np.transpose(arr, [kept.index(i) for i in order])
    return arr if arr.ndim == 3 else arr[np.newaxis]


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputDataError(f"image file {path} is missing (moved or deleted?); restore it or rerun discovery")
    if path.stat().st_size == 0:
        raise InputDataError(f"image file {path} is empty (0 bytes): the copy failed; copy it again")


def _unreadable(path: Path, exc: BaseException) -> InputDataError:
    return InputDataError(
        f"cannot read image file {path} ({type(exc).__name__}: {exc}); "
        "it is truncated or not a TIFF: copy or export it again"
    )


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        raise InputDataError(f"image file {path} has pixel type {dtype}; use uint8, uint16 or float32")


def _read_cyx(path: Path, timepoint: int | None = None) -> np.ndarray:
    _check_file(path)
    try:
        arr, axes = _read_tiff(path)
    except MemoryError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise _unreadable(path, exc) from exc
    _check_dtype(path, arr.dtype)
    cyx = _to_cyx(arr, axes, path, timepoint).astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(cyx))) if np.issubdtype(arr.dtype, np.floating) else 0
    if bad:
        raise InputDataError(f"image file {path} has {bad} NaN or infinite pixels; replace them (e.g. with 0)")
    return cyx


def _header_cyx(path: Path, timepoint: int | None = None) -> np.ndarray:
    """A zero-stride stand-in of the (C, Y, X) image, from the TIFF header alone (no pixel data read)."""
    _check_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            if not series:
                raise ValueError("no image in the file")
            first = series[0]
            shape, axes, dtype = first.shape, first.axes, first.dtype
            same = all(s.shape == first.shape and s.axes == first.axes for s in series)
            if len(series) > 1 and same and not (tif.is_ome or tif.is_imagej) and first.axes == "YX":
                shape, axes = (len(series), *shape), "I" + axes
    except Exception as exc:  # noqa: BLE001 - as _read_cyx
        raise _unreadable(path, exc) from exc
    _check_dtype(path, np.dtype(dtype))
    arr = np.broadcast_to(np.zeros((), np.float32), shape)
    if "Z" in axes:  # a view of the first plane: the shape _to_cyx gives after its max projection
        arr = arr[(slice(None),) * axes.index("Z") + (0,)]
        axes = axes.replace("Z", "")
    return _to_cyx(arr, axes, path, timepoint)


def read_field(src: FieldSource, n_channels: int, pixels: bool = True) -> np.ndarray:
    """Read one field as float32 (C, H, W), C == n_channels. Raises InputDataError naming the file.

    pixels=False checks the same from the TIFF headers (the Zarr metadata) only (no NaN check) and
    returns a zero-stride array of the field's shape (`pcim validate` on large plates). Of a T axis,
    src.timepoint is read.
    """
    timepoint = src.timepoint
    where = f"{src.well} field {src.field}"
    if src.zarr is not None:
        img = ome_zarr_plate.read_field(src.zarr, f"{where} ({src.where})", pixels)
        if img.shape[0] != n_channels:  # discovery matched one index per channel: only a changed store
            raise InputDataError(f"{where}: {src.where} gives {img.shape[0]} channel(s) for {n_channels}")
        return img

    def read(path: Path) -> np.ndarray:
        return _read_cyx(path, timepoint) if pixels else _header_cyx(path, timepoint)

    if len(src.files) == 1:
        img = read(src.files[0])
        if img.shape[0] != n_channels:
            raise InputDataError(
                f"{where}: {src.files[0]} holds {img.shape[0]} channel(s) but plate.channels lists "
                f"{n_channels}; list every channel of the stack in plate.channels, in order"
            )
        return img
    if len(src.files) != n_channels:
        raise InputDataError(f"{where}: {len(src.files)} files for {n_channels} channels")
    planes = []
    for path in src.files:
        img = read(path)
        if img.shape[0] != 1:
            raise InputDataError(
                f"{where}: {path} holds {img.shape[0]} planes, expected one 2-D image per channel file; "
                "remove {channel} from plate.pattern if each file is a multi-channel stack"
            )
        if planes and img.shape[1:] != planes[0].shape:
            h0, w0 = planes[0].shape
            raise InputDataError(
                f"{where}: {path} is {img.shape[1]}x{img.shape[2]} pixels but {src.files[0]} is "
                f"{h0}x{w0}; all channels of a field must have the same size"
            )
        planes.append(img[0])
    if not pixels:
        return np.broadcast_to(np.zeros((), np.float32), (n_channels, *planes[0].shape))
    return np.stack(planes)


def read_normalized(src: FieldSource, n_channels: int, settings: Mapping[str, Any]) -> np.ndarray:
    """read_field, then normalize with the keys of `model.normalize` (a dict with its `method`)."""
    norm = dict(settings)
    method = norm.pop("method", "percentile")
    return normalize(read_field(src, n_channels), method, **norm)


def size_problem(well: str, site: int, size: tuple[int, int], expected: tuple[int, int], file: Path | str) -> str:
    """The message of a field whose size differs from its siblings' (explain and validate say the same)."""
    return (f"{well} site {site}: the field is {size[0]}x{size[1]} px but the plate's fields are "
            f"{expected[0]}x{expected[1]} ({file}); a field whose size differs from its siblings is a wrong or "
            "damaged export: export it again")


def field_size(src: FieldSource) -> tuple[int, int] | None:
    """(H, W) of a field from its first file's TIFF header (its Zarr metadata), without reading pixels;
    None if unreadable."""
    if src.zarr is not None:
        return src.zarr.size
    try:
        with tifffile.TiffFile(src.files[0]) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    except Exception:  # noqa: BLE001 - a damaged file is reported when the field is read
        return None


def typical_size(fields: Iterable[FieldSource], sample: int = 24) -> tuple[int, int] | None:
    """The (H, W) most fields have, from the headers of up to `sample` fields spread over the plate."""
    fields = list(fields)
    step = max(1, len(fields) // sample)
    sizes = Counter(s for s in (field_size(f) for f in fields[::step][:sample]) if s is not None)
    if not sizes:
        return None
    (size, count), *rest = sizes.most_common()
    return size if not rest or count > rest[0][1] else None


def _percentiles(channel: np.ndarray, low: float, high: float) -> tuple[float, float]:
    h, w = channel.shape
    stride = max(1, math.ceil(math.sqrt(h * w / PERCENTILE_SAMPLE_PIXELS)))
    lo, hi = np.percentile(channel[::stride, ::stride], [low, high])
    return float(lo), float(hi)


def normalize(
    img: np.ndarray,
    method: str = "percentile",
    low: float = 1.0,
    high: float = 99.8,
    vmin: float | Sequence[float] | None = None,
    vmax: float | Sequence[float] | None = None,
    *,
    min: float | Sequence[float] | None = None,  # noqa: A002 - the config's names: normalize(**dump)
    max: float | Sequence[float] | None = None,  # noqa: A002
    clip: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """Scale a (C, H, W) image per channel to float32 (by default in [0, 1]).

    Takes the keys of `model.normalize` as they are (`normalize(img, **settings)`), so `min` / `max`
    are accepted for `vmin` / `vmax`.

    percentile: the channel's `low` / `high` percentiles map to 0 / 1 (estimated on a strided
    subsample of about 1 Mpixel for larger images); fixed: `vmin` / `vmax` (a number, or one per
    channel) map to 0 / 1; zscore: (value - the channel's mean) / (its standard deviation + eps) (a
    bioimage.io package's zero_mean_unit_variance); none: values unchanged. percentile and fixed clip to
    [0, 1] unless `clip` is False (a bioimage.io package whose scale_range is not followed by a clip), so
    bright outliers cannot dominate the model's input; a constant channel becomes 0.
    """
    if method not in NORMALIZE_METHODS:
        raise ValueError(f"unknown normalisation {method!r} (use one of {', '.join(NORMALIZE_METHODS)})")
    if img.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {img.shape}")
    vmin = min if vmin is None else vmin
    vmax = max if vmax is None else vmax
    out = img.astype(np.float32, copy=True)
    if method == "none":
        return out
    n = img.shape[0]
    if method == "zscore":
        for c in range(n):
            mean, std = float(out[c].mean(dtype=np.float64)), float(out[c].std(dtype=np.float64))
            np.subtract(out[c], mean, out=out[c])
            np.multiply(out[c], 1.0 / (std + eps) if std + eps > 0 else 0.0, out=out[c])
        return out
    if method == "percentile":
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
        bounds = [_percentiles(out[c], low, high) for c in range(n)]
    else:
        if vmin is None or vmax is None:
            raise ValueError("fixed normalisation needs vmin and vmax")
        los = np.broadcast_to(np.asarray(vmin, dtype=np.float64), (n,))
        his = np.broadcast_to(np.asarray(vmax, dtype=np.float64), (n,))
        bounds = list(zip(los.tolist(), his.tolist(), strict=True))
    for c, (lo, hi) in enumerate(bounds):
        scale = 1.0 / (hi - lo) if hi > lo else 0.0
        np.subtract(out[c], lo, out=out[c])
        np.multiply(out[c], scale, out=out[c])
    return np.clip(out, 0.0, 1.0, out=out) if clip else out
