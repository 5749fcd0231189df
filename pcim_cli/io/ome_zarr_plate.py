"""An OME-Zarr HCS plate as `plate.images`: its fields found from the plate metadata, read one at a time.

Both NGFF 0.4 (Zarr v2: `.zattrs` / `.zarray`) and 0.5 (Zarr v3: `zarr.json`, metadata under
`attributes.ome`) are read; the store is opened read-only and never written. The hierarchy is the one
the spec fixes: plate metadata (rows, columns, wells) at the root, each well group listing its fields
(`well.images`), each field a multiscale image (`multiscales`, `omero`).

- Wells: the row name + column name (`A` + `1` -> A01, `B` + `03` -> B03); where those are not a well
  ID, the well's rowIndex / columnIndex.
- Sites: a field whose path is a number n is site n + 1 (fields `0`, `1`, … are sites 1, 2, …, as vendor
  file names count them); other paths are numbered by their place in the well's list, from 1.
- Channels: each name of `plate.channels` is looked up (its token: the name itself, or the mapped value)
  among the labels of the field's `omero.channels`; without omero labels a token is the channel's
  0-based index. A store whose fields have labels accepts labels only (no silent index guess).
- Full resolution only: the first dataset of the first multiscale. A `z` axis is max-projected (read a
  chunk of planes at a time); a `t` axis of more than one time point needs `plate.timepoint`.

Only the arrays of the full-resolution level are read, a field at a time (never the whole plate). A
field's input files (io/signature.py) are its image group's metadata file and its full-resolution array
folder: a rewritten chunk changes the field's signature, so the field is redone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcim_cli.errors import InputDataError
from pcim_cli.io.fields import FieldSource, Problem, ZarrField
from pcim_cli.io.plate import Well, WellIdError, parse_well

logger = logging.getLogger(__name__)

#: files holding a Zarr node's metadata (v3, then v2)
_V3_META = "zarr.json"
_V2_META = (".zattrs", ".zgroup", ".zarray")
#: axes of NGFF 0.1-0.3 images, which do not name theirs
_IMPLICIT_AXES = ("t", "c", "z", "y", "x")
#: a z-projection reads at most this many bytes of planes at once
_ZBLOCK_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------- metadata


def is_zarr(path: Path) -> bool:
    """A folder holding a Zarr node's metadata (a plate, or anything else in Zarr)."""
    path = Path(path)
    return path.is_dir() and ((path / _V3_META).is_file() or any((path / m).is_file() for m in _V2_META))


def node_attrs(node: Path) -> tuple[int | None, dict[str, Any]]:
    """(zarr format, OME attributes) of a group or array folder: for Zarr v3 `attributes.ome` (0.5), for
    v2 the `.zattrs` (0.4). (None, {}) when the folder holds no Zarr node. Raises InputDataError for
    metadata that is not JSON."""
    v3 = node / _V3_META
    try:
        if v3.is_file():
            meta = json.loads(v3.read_text(encoding="utf-8"))
            attrs = meta.get("attributes") or {} if isinstance(meta, dict) else {}
            ome = attrs.get("ome") if isinstance(attrs, dict) else None
            return 3, dict(ome) if isinstance(ome, dict) else dict(attrs) if isinstance(attrs, dict) else {}
        v2 = node / ".zattrs"
        if v2.is_file():
            attrs = json.loads(v2.read_text(encoding="utf-8"))
            return 2, attrs if isinstance(attrs, dict) else {}
        if (node / ".zgroup").is_file() or (node / ".zarray").is_file():
            return 2, {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"cannot read the Zarr metadata of {node} ({type(exc).__name__}: {exc}); "
                             "the store is damaged or still being copied: copy it again") from exc
    return None, {}


def _meta_file(node: Path, zarr_format: int | None) -> Path:
    """The file that holds a group's OME attributes (what a change of channel labels or axes touches)."""
    return node / (_V3_META if zarr_format == 3 else ".zattrs")


@dataclass(frozen=True)
class PlateLayout:
    """The plate metadata of a store: its wells (canonical name -> path below the root) and version."""

    root: Path
    zarr_format: int
    version: str
    name: str | None
    wells: dict[str, str]
    field_count: int | None
    acquisitions: int


def read_plate(root: Path) -> PlateLayout:
    """The plate metadata of the store at `root`. Raises InputDataError naming the store and the fix when
    it is not an OME-Zarr HCS plate (an image, a well, or no OME metadata)."""
    root = Path(root)
    zarr_format, attrs = node_attrs(root)
    if zarr_format is None:
        raise InputDataError(f"{root} is not a Zarr store (no zarr.json, .zgroup or .zattrs): fix plate.images")
    plate = attrs.get("plate")
    if not isinstance(plate, dict):
        kind = ("an OME-Zarr image (one field), not a plate" if "multiscales" in attrs
                else "an OME-Zarr well, not a plate" if "well" in attrs
                else "a Zarr group without OME-NGFF plate metadata")
        raise InputDataError(f"{root} is {kind}: point plate.images at the plate's root folder (its metadata "
                             "has 'plate': rows, columns, wells)")
    version = str(plate.get("version") or attrs.get("version") or ("0.5" if zarr_format == 3 else "0.4"))
    rows = [str(r.get("name", "")) if isinstance(r, dict) else "" for r in plate.get("rows") or []]
    cols = [str(c.get("name", "")) if isinstance(c, dict) else "" for c in plate.get("columns") or []]
    wells: dict[str, str] = {}
    for entry in plate.get("wells") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise InputDataError(f"{root}: a plate.wells entry has no path ({entry!r}); the plate metadata is "
                                 "damaged: convert the plate again")
        name = _well_name(entry, rows, cols)
        if name is None:
            raise InputDataError(f"{root}: well {entry['path']!r} has no row letter and column number that pcim "
                                 "can read (rows and columns named like A and 1, or rowIndex / columnIndex)")
        if name in wells:
            raise InputDataError(f"{root}: wells {wells[name]!r} and {entry['path']!r} are both well {name}")
        wells[name] = entry["path"]
    if not wells:
        raise InputDataError(f"{root}: the plate metadata lists no wells; the store is empty or damaged")
    count = plate.get("field_count")
    return PlateLayout(root, zarr_format, version, plate.get("name"), wells,
                       int(count) if isinstance(count, int) else None, len(plate.get("acquisitions") or []))


def _well_name(entry: Mapping[str, Any], rows: Sequence[str], cols: Sequence[str]) -> str | None:
    """Canonical well name from the row and column names, else from rowIndex / columnIndex."""
    r, c = entry.get("rowIndex"), entry.get("columnIndex")
    texts = []
    if isinstance(r, int) and isinstance(c, int) and 0 <= r < len(rows) and 0 <= c < len(cols):
        texts.append(rows[r] + cols[c])
    parts = str(entry["path"]).split("/")
    if len(parts) == 2:
        texts.append(parts[0] + parts[1])
    for text in texts:
        try:
            return parse_well(text).name
        except WellIdError:
            continue
    if isinstance(r, int) and isinstance(c, int) and r >= 0 and c >= 0:
        try:
            return parse_well(Well(r, c)).name
        except WellIdError:
            return None
    return None


# ---------------------------------------------------------------- one field's image


def _axes(multiscale: Mapping[str, Any], ndim: int) -> str:
    """One letter per dimension (t, c, z, y, x; o for any other axis) from the multiscale's axes."""
    axes = multiscale.get("axes")
    if axes is None:  # NGFF 0.1 / 0.2: always 5-D t, c, z, y, x
        names = list(_IMPLICIT_AXES[-ndim:])
        types = ["time", "channel", "space", "space", "space"][-ndim:]
    else:
        names = [str(a.get("name", "")) if isinstance(a, dict) else str(a) for a in axes]
        types = [str(a.get("type", "")) if isinstance(a, dict) else "" for a in axes]
    if len(names) != ndim:
        raise ValueError(f"the multiscale names {len(names)} axes ({', '.join(names)}) for a {ndim}-D array")
    letters = []
    spatial = [i for i, (n, t) in enumerate(zip(names, types, strict=True))
               if t == "space" or (not t and n.lower() in "zyx")]
    if len(spatial) < 2:
        raise ValueError(f"no two spatial axes (axes {', '.join(names)})")
    for i, (name, kind) in enumerate(zip(names, types, strict=True)):
        low = name.lower()
        if i in spatial:
            letters.append("x" if i == spatial[-1] else "y" if i == spatial[-2] else "z")
        elif kind == "channel" or (not kind and low == "c"):
            letters.append("c")
        elif kind == "time" or (not kind and low == "t"):
            letters.append("t")
        else:
            letters.append("o")
    if len(spatial) > 3 or letters.count("c") > 1 or letters.count("t") > 1:
        raise ValueError(f"cannot tell the axes apart (axes {', '.join(names)})")
    return "".join(letters)


def _channel_indices(tokens: Sequence[str], labels: Sequence[str], n_channels: int) -> tuple[int, ...] | str:
    """The c index of each token, or why they cannot be found (the message names the labels there)."""
    out = []
    named = any(labels)
    for token in tokens:
        exact = [i for i, lab in enumerate(labels) if lab == token]
        folded = [i for i, lab in enumerate(labels) if lab.casefold() == token.casefold()]
        if len(exact) == 1 or (not exact and len(folded) == 1):
            out.append((exact or folded)[0])
        elif exact or folded:
            return f"channel label {token!r} appears {len(exact or folded)} times in the omero metadata"
        elif not named and token.isdigit():
            if int(token) >= n_channels:
                return (f"channel index {token} is past the field's {n_channels} channel(s) (indices start at 0; the "
                        "store names no channels in its omero metadata)")
            out.append(int(token))
        elif named:
            return (f"no channel labelled {token!r} (the store's channels: {', '.join(labels)}); name them in "
                    "plate.channels, in the model's order, or map a name to a label ({name: label})")
        else:
            return (f"the store names no channels (no omero labels), so {token!r} cannot be found: give each "
                    f"channel's 0-based index instead ({{name: 0}}; the fields have {n_channels} channel(s))")
    return tuple(out)


def _field(path: Path, tokens: Sequence[str], timepoint: int | None) -> tuple[ZarrField, tuple[Path, ...]] | str:
    """One field's ZarrField and input files, or why it cannot be read (a problem, without the field's name)."""
    fmt, attrs = node_attrs(path)
    if fmt is None:
        return "listed in the well metadata but missing from the store; copy the store again"
    scales = attrs.get("multiscales")
    if not isinstance(scales, list) or not scales or not isinstance(scales[0], dict):
        return "no multiscales metadata (not an OME-Zarr image); convert the plate again"
    datasets = scales[0].get("datasets") or []
    if not datasets or not isinstance(datasets[0], dict) or not isinstance(datasets[0].get("path"), str):
        return "its multiscales metadata lists no dataset; convert the plate again"
    array = path / datasets[0]["path"]
    afmt, _ = node_attrs(array)
    meta = array / (_V3_META if afmt == 3 else ".zarray")
    if afmt is None or not meta.is_file():
        return f"the full-resolution array {datasets[0]['path']!r} is missing; copy the store again"
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        shape = tuple(int(n) for n in info["shape"])
        dtype = _dtype(info, afmt)
        axes = _axes(scales[0], len(shape))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"cannot read its array metadata ({exc}); convert the plate again"
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        return f"pixel type {dtype}; pcim reads integer and float images"
    for letter, n in zip(axes, shape, strict=True):
        if letter == "o" and n > 1:
            return f"an axis that is not t, c, z, y or x has {n} entries; pcim cannot read it"
    n_c = shape[axes.index("c")] if "c" in axes else 1
    n_t = shape[axes.index("t")] if "t" in axes else 1
    if timepoint is None:
        if n_t > 1:
            return f"a time series ({n_t} time points): choose one with plate.timepoint (0 to {n_t - 1})"
        timepoint = 0
    elif timepoint >= n_t:
        return f"{n_t} time point(s); plate.timepoint {timepoint} is past them (it counts from 0)"
    omero = attrs.get("omero") if isinstance(attrs.get("omero"), dict) else {}
    labels = [str(ch.get("label") or "") if isinstance(ch, dict) else "" for ch in omero.get("channels") or []]
    if labels and len(labels) != n_c:
        logger.debug("%s: omero lists %d channels for %d in the array; labels ignored", path, len(labels), n_c)
        labels = []
    found = _channel_indices(tokens, labels or [""] * n_c, n_c)
    if isinstance(found, str):
        return found
    zf = ZarrField(array=str(array), axes=axes, shape=shape, dtype=str(dtype), channels=found,
                   labels=tuple(labels[i] if labels else "" for i in found), timepoint=timepoint, zarr_format=afmt)
    return zf, (_meta_file(path, fmt), array)


def _dtype(info: Mapping[str, Any], zarr_format: int) -> np.dtype:
    if zarr_format == 3:
        dt = info["data_type"]
        if not isinstance(dt, str):  # an extension data type
            raise ValueError(f"data type {dt!r}")
        return np.dtype(dt)
    return np.dtype(info["dtype"])


def _sites(paths: Sequence[str]) -> list[int]:
    """Site numbers of a well's field paths: n + 1 for numeric paths, else 1, 2, … in list order."""
    if all(p.isdigit() for p in paths) and len({int(p) for p in paths}) == len(paths):
        return [int(p) + 1 for p in paths]
    return list(range(1, len(paths) + 1))


# ---------------------------------------------------------------- discovery


def discover_fields(root: Path, channels: Mapping[str, str], wells: Iterable[str] | None = None,
                    timepoint: int | None = None):
    """The plate's fields as images.discover_fields gives them for TIFFs: `({well: [FieldSource, ...]},
    problems)`. `channels` maps channel name -> label (or 0-based index) in the model's order. A field
    listed in a well's metadata but missing or unreadable, a well listed in the plate but missing, and a
    requested well that the plate does not have are problems; identical channel problems of every field
    are said once. Raises InputDataError when `root` is not an OME-Zarr plate."""
    layout = read_plate(root)
    tokens = [str(channels[name]) for name in channels]
    wanted = None if wells is None else {parse_well(w).name for w in wells}
    result: dict[str, list[FieldSource]] = {}
    problems: list[Problem] = []
    reasons: dict[str, list[tuple[str, int]]] = {}  # a field problem -> the fields it concerns
    for name in sorted(layout.wells, key=parse_well):
        if wanted is not None and name not in wanted:
            continue
        well_dir = root / layout.wells[name]
        fmt, attrs = node_attrs(well_dir)
        well_meta = attrs.get("well") if isinstance(attrs.get("well"), dict) else None
        if fmt is None:
            problems.append(Problem(f"{name}: well {layout.wells[name]} is listed in the plate metadata but "
                                    f"missing from {root}; copy the store again", name))
            continue
        images = [i for i in (well_meta or {}).get("images") or [] if isinstance(i, dict) and "path" in i]
        if not images:
            problems.append(Problem(f"{name}: well {layout.wells[name]} lists no fields (no well.images "
                                    "metadata)", name))
            continue
        paths = [str(i["path"]) for i in images]
        for site, path in zip(_sites(paths), paths, strict=True):
            got = _field(well_dir / path, tokens, timepoint)
            if isinstance(got, str):
                reasons.setdefault(got, []).append((name, site))
                where = (well_dir / path).relative_to(root).as_posix()
                problems.append(Problem(f"{name} field {site} ({root.name}/{where}): {got}", name, site))
                continue
            zf, files = got
            result.setdefault(name, []).append(FieldSource(name, site, files, zarr=zf, timepoint=timepoint))
    n_fields = sum(len(v) for v in result.values()) + sum(len(v) for v in reasons.values())
    if not result and len(reasons) == 1 and n_fields > 1:  # the same problem everywhere: say it once
        reason, where = next(iter(reasons.items()))
        problems = [p for p in problems if p.field is None]
        problems.append(Problem(f"every field ({len(where)}) of {root}: {reason}"))
    if wanted is not None:
        for name in sorted(wanted - set(layout.wells), key=parse_well):
            problems.append(Problem(f"{name}: not a well of the plate {root} (its wells: "
                                    f"{_listed(sorted(layout.wells, key=parse_well))})", name))
    logger.debug("OME-Zarr %s (NGFF %s): %d fields in %d wells", root, layout.version,
                 sum(map(len, result.values())), len(result))
    return result, problems


def _listed(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


# ---------------------------------------------------------------- reading


def _open(zf: ZarrField):
    import zarr
    from zarr.storage import LocalStore

    if not Path(zf.array).is_dir():
        raise InputDataError(f"the array {zf.array} is missing (moved or deleted?); restore the store")
    try:
        return zarr.open_array(LocalStore(zf.array, read_only=True), mode="r", zarr_format=zf.zarr_format)
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for damaged metadata
        raise InputDataError(f"cannot open the array {zf.array} ({type(exc).__name__}: {exc}); the store is "
                             "damaged: convert or copy the plate again") from exc


def read_field(zf: ZarrField, where: str, pixels: bool = True) -> np.ndarray:
    """The field as float32 (C, H, W), channels in plate.channels order, z max-projected, at zf.timepoint.

    Reads one channel at a time, and of a z-stack a block of planes at a time (at most about 256 MB), so
    memory holds the field plus one block. pixels=False returns a zero-stride array of the field's shape
    from the metadata alone. Raises InputDataError naming the array for unreadable chunks and NaN pixels.
    """
    h, w = zf.size
    if not pixels:
        return np.broadcast_to(np.zeros((), np.float32), (len(zf.channels), h, w))
    arr = _open(zf)
    if tuple(arr.shape) != tuple(zf.shape):
        raise InputDataError(f"{where}: the array {zf.array} is now {tuple(arr.shape)}, not {zf.shape} as when the "
                             "plate was inventoried; rerun pcim on the store as it is now")
    nz = zf.shape[zf.axes.index("z")] if "z" in zf.axes else 1
    plane = h * w * np.dtype(zf.dtype).itemsize
    zblock = max(1, min(nz, _ZBLOCK_BYTES // max(plane, 1)))
    out = np.empty((len(zf.channels), h, w), np.float32)
    for k, c in enumerate(zf.channels):
        best = None
        for z0 in range(0, nz, zblock):
            index = _index(zf, c, slice(z0, min(nz, z0 + zblock)))
            try:
                block = np.asarray(arr[index])
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - codec errors, truncated chunk files
                raise InputDataError(f"{where}: cannot read the array {zf.array} ({type(exc).__name__}: {exc}); a "
                                     "chunk is truncated or damaged: copy the store again") from exc
            block = block.max(axis=0) if block.ndim == 3 else block
            best = block if best is None else np.maximum(best, block)
        out[k] = best
    if np.issubdtype(np.dtype(zf.dtype), np.floating):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        if bad:
            raise InputDataError(f"{where}: {bad} NaN or infinite pixels in {zf.array}; replace them (e.g. with 0)")
    return out


def _index(zf: ZarrField, channel: int, zslice: slice) -> tuple:
    """The array index of one channel, at the time point, over a block of z planes: (z, y, x) or (y, x)."""
    out: list[Any] = []
    for letter in zf.axes:
        if letter == "t":
            out.append(zf.timepoint)
        elif letter == "c":
            out.append(channel)
        elif letter == "z":
            out.append(zslice)
        elif letter == "o":
            out.append(0)
        else:
            out.append(slice(None))
    return tuple(out)
