"""Object label images: find them (`plate.objects`), read them, and keep them in the store as NGFF labels.

A label image is a 2-D integer TIFF the size of its field: 0 = background, 1..N = objects (the value is
CellProfiler's ObjectNumber). CellProfiler's SaveImages "objects" output, cellpose `_masks` and StarDist
labels are all uint8 / uint16 / uint32 (or non-negative int32). `plate.objects` maps an object name to a
file pattern with the tokens of `plate.pattern` ({well} or {row}/{col}, {field}, `*`), anchored at the
YAML file's folder (config.py resolves it).

In the store, each field's label images live under ``{field}/labels/{Object}/{level}`` as an NGFF
``labels`` group with ``image-label`` metadata (axes y, x; the maps' pyramid levels, subsampled by
nearest neighbour so values stay object numbers), so napari shows the objects over the maps. Label
images of other names in that group (a layer a user drew in napari) are kept and stay listed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr

from pcim_cli.errors import InputDataError
from pcim_cli.io import ngff
from pcim_cli.io.patterns import compile_pattern
from pcim_cli.io.plate import WellIdError, parse_well

logger = logging.getLogger(__name__)

LABELS_GROUP = "labels"
LABEL_DTYPE = np.uint32  # every accepted input type fits


class LabelError(InputDataError):
    """A label image that cannot be used: missing, unreadable, of another size or type. Fails that field's
    object table only; the map is still made."""


# --------------------------------------------------------------------------------------------------
# finding label files


def split_pattern(pattern: str) -> tuple[Path, str]:
    """(fixed folder, the rest): the longest leading folder of the pattern without tokens or '*'."""
    parts = pattern.split("/")
    fixed: list[str] = []
    for part in parts[:-1]:
        if "{" in part or "*" in part:
            break
        fixed.append(part)
    root = "/".join(fixed) or ("/" if pattern.startswith("/") else ".")
    if pattern.startswith("/") and not root.startswith("/"):
        root = "/" + root
    return Path(root), "/".join(parts[len(fixed):])


@dataclass
class LabelFiles:
    """The label files found for one object kind: (well, site) -> path; ambiguities by (well, site)."""

    name: str
    pattern: str
    found: dict[tuple[str, int], Path]
    ambiguous: dict[tuple[str, int], list[Path]]

    def path(self, well: str, site: int) -> Path | None:
        return self.found.get((well, site))

    def expected(self, well: str, site: int) -> str:
        """The file name the pattern asks for, for messages (A01 spelt as in the pattern's examples)."""
        w = parse_well(well)
        text = re.sub(r"\{well\}", w.name, self.pattern)
        text = re.sub(r"\{row\}", w.row_letter, text)
        text = re.sub(r"\{col\}", f"{w.col_number:02d}", text)
        return re.sub(r"\{field\}", str(site), text)

    def problem(self, well: str, site: int) -> str | None:
        """Why the field has no usable label file of this kind (None when it has one)."""
        key = (well, site)
        if key in self.ambiguous:
            listed = ", ".join(p.name for p in self.ambiguous[key])
            return (f"{well} site {site}: {len(self.ambiguous[key])} label images match plate.objects.{self.name} "
                    f"({listed}); make the pattern more specific")
        if key not in self.found:
            return (f"{well} site {site}: no label image for plate.objects.{self.name} (expected "
                    f"{self.expected(well, site)}); write the {self.name} labels there or fix the pattern")
        return None


def discover_labels(name: str, pattern: str) -> LabelFiles:
    """Every file matching an object pattern (an absolute path pattern, as config.py leaves it)."""
    root, rest = split_pattern(pattern)
    regex = compile_pattern(rest)
    found: dict[tuple[str, int], list[Path]] = {}
    if root.is_dir():
        walker = root.rglob("*") if "/" in rest else root.iterdir()
        for path in sorted(p for p in walker if p.is_file() and not p.name.startswith(".")):
            match = regex.fullmatch(path.relative_to(root).as_posix())
            if not match:
                continue
            groups = match.groupdict()
            text = groups["well"] if "well" in groups else f"{groups['row']}{groups['col']}"
            try:
                well = parse_well(text).name
            except WellIdError:
                continue
            site = int(groups["field"]) if "field" in groups else 1
            found.setdefault((well, site), []).append(path)
    else:
        logger.warning("plate.objects.%s: folder %s does not exist; no label images found", name, root)
    single = {k: v[0] for k, v in found.items() if len(v) == 1}
    ambiguous = {k: v for k, v in found.items() if len(v) > 1}
    logger.debug("plate.objects.%s: %d label images under %s", name, len(single), root)
    return LabelFiles(name, pattern, single, ambiguous)


# --------------------------------------------------------------------------------------------------
# reading


def _fix(name: str) -> str:
    return f"write the {name} label image again (or fix plate.objects.{name})"


def _form_problem(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Not one 2-D plane of whole numbers: the message of read_labels (and of validate, from the header)."""
    if len(shape) != 2:
        return (f"label image {path} has shape {tuple(shape)}; a label image is one 2-D plane (0 = background, "
                "1..N = objects): save one plane per field")
    if not np.issubdtype(dtype, np.integer):
        return (f"label image {path} has pixel type {dtype}; labels must be whole numbers (uint8, uint16 or "
                "uint32): save the objects as a label image, not a probability map")
    return None


def _size_problem(path: Path, got: tuple[int, ...], shape: tuple[int, int], name: str) -> str | None:
    if tuple(got) == tuple(shape):
        return None
    return (f"label image {path} is {got[0]}x{got[1]} px but its field is {shape[0]}x{shape[1]}: the labels were "
            f"made from other images; segment these fields again (or fix plate.objects.{name})")


def header_problem(path: Path, shape: tuple[int, int] | None, name: str = "objects") -> str | None:
    """What `read_labels` would refuse that the TIFF header already tells (missing, empty, unreadable, not
    one 2-D plane, not whole numbers, another size), with its message; None when the header is fine."""
    if not path.is_file():
        return f"label image {path} is missing: {_fix(name)}"
    if path.stat().st_size == 0:
        return f"label image {path} is empty (0 bytes): the copy failed; copy it again"
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            got, dtype = tuple(s for s in series.shape if s != 1), np.dtype(series.dtype)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for damaged files
        return (f"cannot read label image {path} ({type(exc).__name__}: {exc}); it is truncated or not a TIFF: "
                f"{_fix(name)}")
    return _form_problem(path, got, dtype) or (_size_problem(path, got, shape, name) if shape else None)


def read_labels(path: Path, shape: tuple[int, int], name: str = "objects") -> np.ndarray:
    """The label image at `path` as uint32 (H, W), checked against the field's `shape`.

    Raises LabelError naming the file and the fix: missing, empty, unreadable, not 2-D, not an integer
    type, negative values, or a size unlike the field's.
    """
    fix = _fix(name)
    if not path.is_file():
        raise LabelError(f"label image {path} is missing: {fix}")
    if path.stat().st_size == 0:
        raise LabelError(f"label image {path} is empty (0 bytes): the copy failed; copy it again")
    try:
        arr = np.asarray(tifffile.imread(path))
    except MemoryError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise LabelError(f"cannot read label image {path} ({type(exc).__name__}: {exc}); it is truncated or "
                         f"not a TIFF: {fix}") from exc
    if arr.size == 0:
        raise LabelError(f"cannot read label image {path} (no pixels in it); it is truncated or not a TIFF: {fix}")
    arr = np.squeeze(arr)
    problem = _form_problem(path, arr.shape, arr.dtype)
    if problem is not None:
        raise LabelError(problem)
    if arr.size and int(arr.min()) < 0:
        raise LabelError(f"label image {path} has negative values; labels are 0 (background) and 1..N")
    if arr.size and int(arr.max()) > np.iinfo(LABEL_DTYPE).max:
        raise LabelError(f"label image {path} has object numbers above {np.iinfo(LABEL_DTYPE).max}")
    problem = _size_problem(path, arr.shape, shape, name)
    if problem is not None:
        raise LabelError(problem)
    return arr.astype(LABEL_DTYPE, copy=False)


def file_signature(path: Path | None) -> str:
    """Name, size and modification time of a label file ('missing' when absent): changes when it is replaced."""
    if path is None:
        return "none"
    try:
        st = path.stat()
    except OSError:
        return f"{path.name}:missing"
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------
# the NGFF labels group of a field


def _levels(labels: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """The maps' pyramid for a label image: every 2nd / 4th pixel (nearest), cropped like the maps."""
    out = [labels]
    for _ in ngff.PYRAMID_FACTORS[1:n_levels]:
        prev = out[-1]
        out.append(prev[: prev.shape[0] // 2 * 2 : 2, : prev.shape[1] // 2 * 2 : 2])
    return out


def _label_attrs(format: str, name: str, n_levels: int) -> dict:
    multiscale = {
        "name": name,
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [float(f), float(f)]}]}
            for level, f in enumerate(ngff.PYRAMID_FACTORS[:n_levels])],
    }
    image_label = {"source": {"image": "../../"}}
    if format == "0.5":
        return {"ome": {"version": "0.5", "image-label": image_label, "multiscales": [multiscale]}}
    return {"image-label": {**image_label, "version": "0.4"}, "multiscales": [{**multiscale, "version": "0.4"}]}


def write_labels(field_group: zarr.Group, labels: Mapping[str, np.ndarray], n_levels: int, format: str) -> None:
    """Write these label images (name -> (H, W)) into the field group's ``labels`` group, replacing those
    of the same names; label images of other names (a layer drawn in napari) stay listed."""
    remove_labels(field_group, labels)
    if not labels:
        return
    names = [*label_names(field_group), *labels]
    attrs = {"ome": {"version": "0.5", "labels": names}} if format == "0.5" else {"labels": names}
    group = field_group.require_group(LABELS_GROUP)
    group.update_attributes(attrs)
    version = ngff.zarr_version(format)
    for name, image in labels.items():
        sub = group.create_group(name, attributes=_label_attrs(format, name, n_levels))
        for level, data in enumerate(_levels(np.asarray(image, dtype=LABEL_DTYPE), n_levels)):
            sub.create_array(str(level), data=data, **ngff.array_options(data.shape, version, axes="yx"))


def remove_labels(field_group: zarr.Group, names: Iterable[str]) -> None:
    """Remove the label images `names` from a field group; the ``labels`` group keeps listing the others
    that are there (and goes when none is left)."""
    if LABELS_GROUP not in field_group:
        return
    group = field_group[LABELS_GROUP]
    names = set(names)
    for name in names:
        if name in group:
            del group[name]
    try:
        listed = ngff.ome_metadata(group.attrs.asdict()).get("labels", [])
    except ngff.DAMAGE_ERRORS:
        listed = []
    keep = [n for n in listed if n not in names and n in group]
    if not keep and not list(group.keys()):
        del field_group[LABELS_GROUP]
        return
    if "ome" in group.attrs:
        group.update_attributes({"ome": {**dict(group.attrs["ome"]), "labels": keep}})
    else:
        group.update_attributes({"labels": keep})


def read_labels_level(field_group: zarr.Group, name: str, level: int = 0) -> np.ndarray | None:
    """One object kind's label image at a pyramid level (clamped); None when the field has none."""
    path = f"{LABELS_GROUP}/{name}"
    if path not in field_group:
        return None
    sub = field_group[path]
    datasets = ngff.ome_metadata(sub.attrs.asdict()).get("multiscales", [{}])[0].get("datasets", [])
    if not datasets:
        return None
    chosen = datasets[max(0, min(level, len(datasets) - 1))]["path"]
    return np.asarray(sub[chosen][...])


def label_names(field_group: zarr.Group) -> list[str]:
    """The object kinds stored with a field (the ``labels`` group's list)."""
    if LABELS_GROUP not in field_group:
        return []
    return list(ngff.ome_metadata(field_group[LABELS_GROUP].attrs.asdict()).get("labels", []))


def problems_for(files: Iterable[LabelFiles], fields: Mapping[str, list], size: tuple[int, int] | None,
                 check_size: bool = True, pixels: bool = False) -> list[str]:
    """`pcim validate`: every field without a usable label image of each kind, with the message `pcim
    explain` writes for it: missing or ambiguous; with `pixels`, every reason `read_labels` refuses (the
    file is read, as explain reads it: negative values too); else what the TIFF header tells (not one
    2-D plane, not whole numbers, another size than the plate's fields)."""
    out = []
    for kind in files:
        for well, sources in fields.items():
            for src in sources:
                problem = kind.problem(well, src.field)
                if problem is None and check_size and size is not None:
                    path = kind.path(well, src.field)
                    if pixels:
                        try:
                            read_labels(path, tuple(size), kind.name)
                        except LabelError as exc:
                            problem = f"{well} site {src.field}: {exc}"
                    else:
                        found = header_problem(path, tuple(size), kind.name)
                        problem = None if found is None else f"{well} site {src.field}: {found}"
                if problem is not None:
                    out.append(f"{problem} (that field's {kind.name} table fails; its map is still made)")
    return out
