"""Zarr groups and arrays as files: the metadata JSON and the compressed chunks pcim writes and reads itself.

zarr-python's synchronous API hands every call to its event-loop thread; a field group of the store
(its group, three pyramid levels and the completion record) took ~12 such hand-offs, 40-80 ms per field
on a loaded machine, more than an amortised map costs (issue 28). The store's layouts are simple and
fixed (Zarr v3 for NGFF 0.5, v2 for NGFF 0.4; float32 (C, Y, X) arrays in chunks of 1 x 1024 x 1024), so
pcim writes and reads these files directly, in the formats the specifications define and zarr-python
reads (tests/test_store_files.py reads every array and attribute back through zarr):

- v3 (https://zarr-specs.readthedocs.io/en/latest/v3/core/): `zarr.json` per node ({"zarr_format": 3,
  "node_type": "group" | "array", "attributes": ...}); an array's chunks at `c/<i>/<j>/<k>`, each the
  full chunk shape (edge chunks padded with the fill value), codecs `bytes` (little endian) then `zstd`;
- v2 (https://zarr-specs.readthedocs.io/en/latest/v2/v2.0.html): `.zgroup` / `.zarray` / `.zattrs`;
  chunks at `<i>/<j>/<k>` (dimension separator "/"), compressor zstd.

Every chunk is written, empty ones included (a zero chunk compresses to a few bytes), so a missing chunk
file always means damage (`missing_chunks`, io/store.py). Metadata files are replaced atomically
(written beside, then renamed), so a reader or a crash never sees half a file. Reading is json.loads of
the one file: no zarr import.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: zstd level of the map chunks: on maps rounded to 6 mantissa bits, level 3 encodes a 1024 x 1024 chunk
#: 1.8x faster than 5 (19 vs 33 ms of CPU) for 9 % more bytes on a 2160 px field, and 2.6x faster on the
#: small fields of a screen, where the write is a share of an amortised map's cost
ZSTD_LEVEL = 3


def _meta_file(folder: Path, zarr_format: int) -> Path:
    return folder / ("zarr.json" if zarr_format == 3 else ".zattrs")


def read_attributes(folder: str | Path) -> dict[str, Any] | None:
    """The attributes of the group at `folder` (v3 `zarr.json`, else v2 `.zattrs`); None when there is no
    group there. Raises ValueError when its metadata is not a group's (damaged: not JSON, wrong types)."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        if not os.path.isfile(os.path.join(folder, ".zgroup")):
            return None
        try:
            with open(os.path.join(folder, ".zattrs"), "rb") as fh:
                doc = json.loads(fh.read())
        except FileNotFoundError:
            return {}
        if not isinstance(doc, dict):
            raise ValueError(f"{folder}/.zattrs is no JSON object") from None
        return doc
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or not isinstance(doc.get("attributes", {}), dict):
        raise ValueError(f"{folder}/zarr.json is no zarr group's metadata")
    return dict(doc.get("attributes", {}))


def zarr_format_at(folder: str | Path) -> int | None:
    """3 or 2 for the group at `folder`, None when there is none."""
    folder = Path(folder)
    if (folder / "zarr.json").is_file():
        return 3
    return 2 if (folder / ".zgroup").is_file() else None


def write_group(folder: str | Path, zarr_format: int, attributes: Mapping[str, Any]) -> None:
    """Create (or replace the metadata of) a group with these attributes; its members are left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if zarr_format == 3:
        _write_json(folder / "zarr.json", {"attributes": dict(attributes), "zarr_format": 3, "node_type": "group"})
    else:
        _write_json(folder / ".zgroup", {"zarr_format": 2})
        _write_json(folder / ".zattrs", dict(attributes))


def update_attributes(folder: str | Path, changes: Mapping[str, Any]) -> None:
    """Set keys of a group's attributes, keeping the others (atomic replace of its metadata file)."""
    folder = Path(folder)
    zarr_format = zarr_format_at(folder)
    if zarr_format is None:
        raise FileNotFoundError(f"no zarr group at {folder}")
    attrs = read_attributes(folder) or {}
    attrs.update(changes)
    if zarr_format == 3:
        _write_json(folder / "zarr.json", {"attributes": attrs, "zarr_format": 3, "node_type": "group"})
    else:
        _write_json(folder / ".zattrs", attrs)


def write_array(folder: str | Path, zarr_format: int, data: np.ndarray, chunks: Sequence[int],
                dimension_names: Sequence[str] | None = None, level: int = ZSTD_LEVEL) -> None:
    """Write `data` as a new array at `folder` (the folder must not hold one already): its chunks, then its
    metadata (so an array whose metadata exists is whole)."""
    import numcodecs

    folder = Path(folder)
    data = np.ascontiguousarray(data)
    if data.dtype != np.float32:
        raise TypeError(f"only float32 arrays are written here, got {data.dtype}")
    codec = numcodecs.Zstd(level=level)
    chunks = tuple(int(c) for c in chunks)
    grid = [range(-(-n // c)) for n, c in zip(data.shape, chunks, strict=True)]
    made: set[str] = set()
    root = os.path.join(os.fspath(folder), "c") if zarr_format == 3 else os.fspath(folder)
    for index in itertools.product(*grid):
        block = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))]
        if block.shape != chunks:  # an edge chunk is stored at the full chunk shape
            block = np.pad(block, [(0, c - n) for n, c in zip(block.shape, chunks, strict=True)])
        parent = os.path.join(root, *map(str, index[:-1]))
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        with open(os.path.join(parent, str(index[-1])), "wb") as fh:
            fh.write(codec.encode(np.ascontiguousarray(block, dtype="<f4")))
    if zarr_format == 3:
        meta: dict[str, Any] = {
            "shape": list(data.shape), "data_type": "float32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0.0,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": level, "checksum": False}}],
            "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": [],
        }
        if dimension_names is not None:
            meta["dimension_names"] = list(dimension_names)
        _write_json(folder / "zarr.json", meta)
    else:
        _write_json(folder / ".zarray", {
            "shape": list(data.shape), "chunks": list(chunks), "dtype": "<f4", "fill_value": 0.0, "order": "C",
            "filters": None, "dimension_separator": "/", "compressor": codec.get_config(), "zarr_format": 2})


def array_metadata(folder: str | Path) -> tuple[int, list[int], list[int]]:
    """(zarr format, shape, chunk shape) of the array at `folder`. Raises FileNotFoundError when there is
    no array there, ValueError when its metadata is damaged."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as fh:
            doc = json.loads(fh.read())
        if not isinstance(doc, dict) or doc.get("node_type") != "array":
            raise ValueError(f"{folder}/zarr.json is no zarr array's metadata")
        return 3, list(doc["shape"]), list(doc["chunk_grid"]["configuration"]["chunk_shape"])
    except FileNotFoundError:
        with open(os.path.join(folder, ".zarray"), "rb") as fh:
            doc = json.loads(fh.read())
        if not isinstance(doc, dict):
            raise ValueError(f"{folder}/.zarray is no zarr array's metadata") from None
        return 2, list(doc["shape"]), list(doc["chunks"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{folder}/zarr.json is no zarr array's metadata ({exc})") from None


def missing_chunks(folder: str | Path) -> tuple[int, list[str]]:
    """(number of chunks the array at `folder` has, the keys of those without a file), from its metadata
    and one existence check per chunk (no chunk is read). pcim's arrays use "/"-separated chunk keys."""
    folder = os.fspath(folder)
    zarr_format, shape, chunks = array_metadata(folder)
    prefix = "c/" if zarr_format == 3 else ""
    expected = [prefix + "/".join(map(str, idx))
                for idx in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks, strict=True)))]
    return len(expected), [k for k in expected if not os.path.isfile(os.path.join(folder, k))]


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False))  # compact: the C encoder
    os.replace(tmp, path)


def round_mantissa(a: np.ndarray, bits: int) -> np.ndarray:
    """float32 values with `bits` of their 23 mantissa bits kept, rounded to nearest (ties away from zero):
    relative error <= 2**-(bits + 1), zeros stay zeros, the array stays float32 for every reader. The
    dropped bits are zeros, which the compressor then stores in almost nothing (numcodecs' BitRound does
    the same as a codec; done here on the values so that the stored arrays need no extra codec)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if bits >= 23:
        return a
    if bits < 1:
        raise ValueError(f"keep at least 1 mantissa bit, got {bits}")
    drop = 23 - bits
    raw = a.view(np.uint32)
    rounded = (raw + np.uint32(1 << (drop - 1))) & np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    return rounded.view(np.float32)
