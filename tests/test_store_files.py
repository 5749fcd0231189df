"""Zarr groups and arrays written as files (io/zarr_files.py, issue 28): zarr-python reads back exactly what
was written, in both store formats (v3 for NGFF 0.5, v2 for 0.4), edge and empty chunks included; attribute
updates keep the other keys; a missing group is None and a damaged one an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pcim_cli.io import zarr_files


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_arrays_and_attributes_read_back_through_zarr(tmp_path: Path, zarr_format: int) -> None:
    rng = np.random.default_rng(0)
    data = rng.random((2, 1100, 1030), dtype=np.float32)
    data[1] = 0  # an all-zero channel: its chunks are not written, zarr fills them in
    data[0, :1024, :1024] = 0  # one whole chunk of channel 0
    zarr_files.write_group(tmp_path / "g", zarr_format, {"ome": {"x": 1}})
    names = ("c", "y", "x") if zarr_format == 3 else None
    zarr_files.write_array(tmp_path / "g" / "0", zarr_format, data, (1, 1024, 1024), names)
    zarr_files.update_attributes(tmp_path / "g", {"pcim": {"status": "done", "n": [1, 2]}})
    group = zarr.open_group(str(tmp_path / "g"), mode="r")
    assert group.metadata.zarr_format == zarr_format
    arr = group["0"]
    assert arr.dtype == np.float32 and arr.shape == data.shape and arr.chunks == (1, 1024, 1024)
    np.testing.assert_array_equal(arr[...], data)
    assert dict(group.attrs) == {"ome": {"x": 1}, "pcim": {"status": "done", "n": [1, 2]}}
    assert zarr_files.read_attributes(tmp_path / "g") == dict(group.attrs)
    # every chunk is on disk, empty ones included: a missing chunk file means damage
    assert zarr_files.missing_chunks(tmp_path / "g" / "0") == (8, [])
    (tmp_path / "g" / "0" / ("c/1/0/1" if zarr_format == 3 else "1/0/1")).unlink()
    assert zarr_files.missing_chunks(tmp_path / "g" / "0") == (8, ["c/1/0/1" if zarr_format == 3 else "1/0/1"])


def test_missing_and_damaged_groups(tmp_path: Path) -> None:
    assert zarr_files.read_attributes(tmp_path / "nothing") is None
    zarr_files.write_group(tmp_path / "g", 3, {})
    (tmp_path / "g" / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError):
        zarr_files.read_attributes(tmp_path / "g")
    zarr_files.write_array(tmp_path / "a", 3, np.ones((1, 2, 2), np.float32), (1, 2, 2))
    with pytest.raises(ValueError):  # an array is no group
        zarr_files.read_attributes(tmp_path / "a")


def test_mantissa_rounding_bounds_the_relative_error_and_keeps_zeros() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(100_000, dtype=np.float32) * 10.0 ** rng.integers(-8, 3, 100_000)).astype(np.float32)
    a[::7] = 0
    for bits in (7, 10):
        r = zarr_files.round_mantissa(a, bits)
        assert r.dtype == np.float32
        nz = a != 0
        assert np.all(r[~nz] == 0) and np.all(r[nz] > 0)
        assert float(np.max(np.abs(r[nz] - a[nz]) / a[nz])) <= 2.0 ** -(bits + 1)
        assert np.all(zarr_files.round_mantissa(r, bits) == r)  # rounding twice changes nothing
