"""OME-Zarr HCS plates written by the libraries facilities use (ome-zarr-py, iohub), from the demo's TIFFs.

Both writers come with the test extra (pyproject.toml); a test that needs one skips with the reason when
it is not installed. The plates hold the demo's real pixels, so a field read from the store can be
compared exactly with the same field read from its TIFF files.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile
from plates import CHANNEL_TOKENS, DEMO

CHANNELS = tuple(CHANNEL_TOKENS)  # DNA, PH3, Actin: the demo model's input order


def demo_fields(wells: Iterable[str] = ("A01", "A02", "B01")) -> dict[str, dict[int, np.ndarray]]:
    """{well: {site: (3, 128, 128) uint16}} of the demo's TIFFs, channels in model order."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for well in wells:
        sites = sorted({int(m.group(1)) for p in DEMO.glob(f"images/{well}_s*_w1.tif")
                        if (m := re.search(r"_s(\d+)_", p.name))})
        out[well] = {s: np.stack([tifffile.imread(DEMO / "images" / f"{well}_s{s}_w{CHANNEL_TOKENS[c]}.tif")
                                  for c in CHANNELS]) for s in sites}
    return out


def _split(well: str) -> tuple[str, str]:
    return well[0], str(int(well[1:]))


def write_ome_zarr(root: Path, fields: dict[str, dict[int, np.ndarray]], version: str = "0.5",
                   pyramid: Sequence[int] = (2,), labels: Sequence[str] | None = CHANNELS,
                   columns: str = "plain") -> Path:
    """A plate written by ome-zarr-py (write_plate_metadata / write_well_metadata / write_image).

    Each field's array is (c, y, x), or (c, z, y, x) / (t, c, z, y, x) as given; `pyramid`: the
    downsampling factors (() for one level); `labels`: omero channel labels (None: no omero metadata);
    columns "padded" names columns 01, 02 (as Fractal's converters do).
    """
    ome_zarr = pytest.importorskip("ome_zarr", reason="ome-zarr-py (test extra) writes the OME-Zarr fixtures")
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    del ome_zarr
    fmt = FormatV05() if version == "0.5" else FormatV04()
    rows = sorted({_split(w)[0] for w in fields})
    cols = sorted({int(_split(w)[1]) for w in fields})
    colname = (lambda c: f"{c:02d}") if columns == "padded" else str
    group = zarr.open_group(str(root), mode="w", zarr_format=fmt.zarr_format)
    paths = [f"{_split(w)[0]}/{colname(int(_split(w)[1]))}" for w in fields]
    write_plate_metadata(group, rows, [colname(c) for c in cols], paths, fmt=fmt,
                         field_count=max(len(v) for v in fields.values()), name=root.stem)
    for (_well, sites), path in zip(fields.items(), paths, strict=True):
        r, c = path.split("/")
        well_group = group.require_group(r).require_group(c)
        write_well_metadata(well_group, [{"path": str(s - 1)} for s in sorted(sites)], fmt=fmt)
        for s, data in sorted(sites.items()):
            axes = {3: "cyx", 4: "czyx", 5: "tczyx"}[data.ndim]
            extra = {}
            if labels is not None:
                extra["omero"] = {"channels": [{"label": lab, "color": "FFFFFF",
                                                "window": {"start": 0, "end": 4095, "min": 0, "max": 65535}}
                                               for lab in labels]}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_image(data, well_group.require_group(str(s - 1)), axes=axes, fmt=fmt,
                            scale_factors=list(pyramid), **extra)
    return root


def write_iohub(root: Path, fields: dict[str, dict[int, np.ndarray]], version: str = "0.5",
                channel_names: Sequence[str] = CHANNELS, pyramid_levels: int = 1,
                chunks: tuple[int, ...] | None = None, shards_ratio: tuple[int, ...] | None = None) -> Path:
    """A plate written by iohub (open_ome_zarr(layout="hcs"), create_position, create_image): 5-D
    (t, c, z, y, x) arrays; (c, y, x) fields get t = z = 1. `pyramid_levels` > 1: levels "1", "2", … of
    2x, 4x, … strided pixels written with create_image and a scale transform (iohub's compute_pyramid
    needs tensorstore)."""
    iohub = pytest.importorskip("iohub.ngff", reason="iohub (test extra) writes the OME-Zarr fixtures")
    from iohub.ngff.models import TransformationMeta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with iohub.open_ome_zarr(str(root), layout="hcs", mode="w-", channel_names=list(channel_names),
                                 version=version) as plate:
            for well, sites in fields.items():
                r, c = _split(well)
                for s, data in sorted(sites.items()):
                    data5 = {3: lambda a: a[None, :, None], 4: lambda a: a[None], 5: lambda a: a}[data.ndim](data)
                    pos = plate.create_position(r, c, str(s - 1))
                    pos.create_image("0", data5, chunks=chunks, shards_ratio=shards_ratio)
                    for level in range(1, pyramid_levels):
                        f = 2**level
                        scale = TransformationMeta(type="scale", scale=[1.0, 1.0, 1.0, float(f), float(f)])
                        pos.create_image(str(level), np.ascontiguousarray(data5[..., ::f, ::f]), transform=[scale])
    return root
