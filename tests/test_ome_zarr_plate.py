"""OME-Zarr HCS plates as plate.images: stores written by ome-zarr-py and iohub (NGFF 0.4 and 0.5) from the
demo's TIFFs, read back field by field and compared with the TIFFs exactly."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from ome_zarr_factory import CHANNELS, demo_fields, write_iohub, write_ome_zarr
from plates import CHANNEL_TOKENS, DEMO

from pcim_cli.errors import InputDataError
from pcim_cli.io import images, ome_zarr_plate, signature
from pcim_cli.io.images import FieldSource

WELLS = ("A01", "A02", "B01")
BY_NAME = {c: c for c in CHANNELS}
WRITERS = {"ome-zarr-py": write_ome_zarr, "iohub": write_iohub}


def _tiff_field(well: str, site: int) -> np.ndarray:
    files = tuple(DEMO / "images" / f"{well}_s{site}_w{CHANNEL_TOKENS[c]}.tif" for c in CHANNELS)
    return images.read_field(FieldSource(well, site, files), 3)


def _tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file below root: size, mtime and sha256 (the store must come out of pcim untouched)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_fields_of_a_converted_plate_equal_its_tiffs(tmp_path: Path, writer: str, version: str) -> None:
    root = WRITERS[writer](tmp_path / "plate.zarr", demo_fields(WELLS), version=version)
    before = _tree_state(root)
    found, problems = images.discover_fields(root, "{well}_s{field}_w{channel}.tif", BY_NAME)
    assert problems == []
    assert sorted(found) == list(WELLS)
    for well in WELLS:
        assert [src.field for src in found[well]] == [1, 2]
        for src in found[well]:
            assert src.zarr is not None and images.field_size(src) == (128, 128)
            got = images.read_field(src, 3)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, _tiff_field(well, src.field))
            header = images.read_field(src, 3, pixels=False)
            assert header.shape == (3, 128, 128) and header.strides == (0, 0, 0)
    assert _tree_state(root) == before  # read-only: not one byte or date changed


def test_pyramid_full_resolution_level_is_read(tmp_path: Path) -> None:
    """ome-zarr-py with three levels (its datasets are named s0, s1, s2) and iohub with compute_pyramid."""
    fields = demo_fields(["A01"])
    omz = write_ome_zarr(tmp_path / "omz.zarr", fields, version="0.5", pyramid=(2, 4))
    ioh = write_iohub(tmp_path / "ioh.zarr", fields, version="0.4", pyramid_levels=3)
    for root in (omz, ioh):
        found, problems = images.discover_fields(root, "", BY_NAME)
        assert problems == []
        src = found["A01"][0]
        assert images.field_size(src) == (128, 128)
        np.testing.assert_array_equal(images.read_field(src, 3), _tiff_field("A01", 1))
    assert Path(found["A01"][0].zarr.array).name == "0"  # iohub's level 0
    levels = sorted(p.name for p in (omz / "A" / "1" / "0").iterdir() if p.is_dir())
    assert levels == ["s0", "s1", "s2"]


def test_z_stack_is_max_projected_a_block_of_planes_at_a_time(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 4000, (3, 5, 40, 48), dtype=np.uint16)  # c, z, y, x
    root = write_iohub(tmp_path / "z.zarr", {"C03": {1: stack}}, version="0.5", chunks=(1, 1, 1, 40, 48))
    monkeypatch.setattr(ome_zarr_plate, "_ZBLOCK_BYTES", 2 * 40 * 48 * 2)  # two planes per read
    found, problems = images.discover_fields(root, "", BY_NAME)
    assert problems == [] and found["C03"][0].zarr.axes == "tczyx"
    np.testing.assert_array_equal(images.read_field(found["C03"][0], 3), stack.max(axis=1).astype(np.float32))
    omz = write_ome_zarr(tmp_path / "z2.zarr", {"C03": {1: stack}}, version="0.4", pyramid=())
    found, _ = images.discover_fields(omz, "", BY_NAME)
    assert found["C03"][0].zarr.axes == "czyx"
    np.testing.assert_array_equal(images.read_field(found["C03"][0], 3), stack.max(axis=1).astype(np.float32))


def test_time_series_needs_a_timepoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    movie = rng.integers(0, 4000, (2, 3, 1, 32, 32), dtype=np.uint16)  # t, c, z, y, x
    root = write_iohub(tmp_path / "t.zarr", {"A01": {1: movie}}, version="0.4")
    found, problems = images.discover_fields(root, "", BY_NAME)
    assert found == {}
    assert len(problems) == 1 and "time series (2 time points)" in problems[0] and "plate.timepoint" in problems[0]
    found, problems = images.discover_fields(root, "", BY_NAME, timepoint=1)
    assert problems == []
    np.testing.assert_array_equal(images.read_field(found["A01"][0], 3), movie[1, :, 0].astype(np.float32))
    _, problems = images.discover_fields(root, "", BY_NAME, timepoint=2)
    assert "2 time point(s); plate.timepoint 2 is past them" in problems[0]


def test_ome_tiff_time_series_takes_the_timepoint(tmp_path: Path) -> None:
    movie = np.random.default_rng(5).integers(0, 4000, (3, 2, 24, 24), dtype=np.uint16)  # t, c, y, x
    path = tmp_path / "A01_s1.ome.tif"
    tifffile.imwrite(path, movie, metadata={"axes": "TCYX"}, ome=True)
    with pytest.raises(InputDataError, match="time series .*plate.timepoint"):
        images.read_field(FieldSource("A01", 1, (path,)), 2)
    found, problems = images.discover_fields(tmp_path, "{well}_s{field}.ome.tif", {"DNA": "DNA", "PH3": "PH3"},
                                             timepoint=2)
    assert problems == [] and found["A01"][0].timepoint == 2
    np.testing.assert_array_equal(images.read_field(found["A01"][0], 2), movie[2].astype(np.float32))
    assert images.read_field(FieldSource("A01", 1, (path,), timepoint=0), 2, pixels=False).shape == (2, 24, 24)
    with pytest.raises(InputDataError, match="past them"):
        images.read_field(FieldSource("A01", 1, (path,), timepoint=3), 2)


def test_missing_fields_and_wells_are_problems_of_their_own(tmp_path: Path) -> None:
    fields = demo_fields(WELLS)
    fields["B01"].pop(2)  # a well imaged at one site only: not a problem
    root = write_ome_zarr(tmp_path / "p.zarr", fields, version="0.5")
    shutil.rmtree(root / "A" / "2" / "1")  # A02 field 2 lost in a copy
    shutil.rmtree(root / "A" / "1" / "0" / "s0")  # A01 field 1: its full-resolution array lost
    found, problems = images.discover_fields(root, "", BY_NAME, wells=["A01", "A02", "B01", "H12"])
    assert {w: [s.field for s in v] for w, v in found.items()} == {"A01": [2], "A02": [1], "B01": [1]}
    by_place = {(p.well, p.field): str(p) for p in problems}
    assert set(by_place) == {("A01", 1), ("A02", 2), ("H12", None)}
    assert "full-resolution array 's0' is missing" in by_place[("A01", 1)]
    assert "A02 field 2 (p.zarr/A/2/1): listed in the well metadata but missing" in by_place[("A02", 2)]
    assert "H12: not a well of the plate" in by_place[("H12", None)]
    shutil.rmtree(root / "B")
    _, problems = images.discover_fields(root, "", BY_NAME)
    assert any(p.well == "B01" and "listed in the plate metadata but missing" in p for p in problems)


def test_channels_by_label_in_any_order_or_by_index_without_labels(tmp_path: Path) -> None:
    fields = demo_fields(["A01"])
    root = write_iohub(tmp_path / "p.zarr", fields, version="0.5")
    found, _ = images.discover_fields(root, "", {"Actin": "actin", "DNA": "DNA"})  # case folded, reordered
    expected = _tiff_field("A01", 1)[[2, 0]]
    np.testing.assert_array_equal(images.read_field(found["A01"][0], 2), expected)
    assert found["A01"][0].zarr.labels == ("Actin", "DNA")
    _, problems = images.discover_fields(root, "", {"DNA": "0", "PH3": "1"})  # labels there: no index guess
    assert len(problems) == 1 and "no channel labelled '0' (the store's channels: DNA, PH3, Actin)" in problems[0]
    bare = write_ome_zarr(tmp_path / "bare.zarr", fields, version="0.4", labels=None)
    found, problems = images.discover_fields(bare, "", {"Actin": "2", "DNA": "0"})
    assert problems == []
    np.testing.assert_array_equal(images.read_field(found["A01"][0], 2), expected)
    _, problems = images.discover_fields(bare, "", {"DNA": "3"})
    assert "channel index 3 is past the field's 3 channel(s)" in problems[0]
    _, problems = images.discover_fields(bare, "", {"DNA": "DNA"})
    assert "the store names no channels" in problems[0]


def test_padded_column_names_are_wells(tmp_path: Path) -> None:
    root = write_ome_zarr(tmp_path / "p.zarr", demo_fields(["B01"]), version="0.4", columns="padded")
    assert (root / "B" / "01").is_dir()
    found, problems = images.discover_fields(root, "", BY_NAME, wells=["b1"])
    assert problems == [] and list(found) == ["B01"]


def test_not_a_plate_says_where_the_plate_is(tmp_path: Path) -> None:
    root = write_iohub(tmp_path / "p.zarr", demo_fields(["A01"]), version="0.5")
    with pytest.raises(InputDataError, match="an OME-Zarr well, not a plate: point plate.images at the plate's root"):
        images.discover_fields(root / "A" / "1", "", BY_NAME)
    with pytest.raises(InputDataError, match="an OME-Zarr image .one field., not a plate"):
        images.discover_fields(root / "A" / "1" / "0", "", BY_NAME)


def test_nan_pixels_name_the_array(tmp_path: Path) -> None:
    field = demo_fields(["A01"])["A01"][1].astype(np.float32)
    field[1, 5, 7] = np.nan
    root = write_ome_zarr(tmp_path / "p.zarr", {"A01": {1: field}}, version="0.5", pyramid=())
    found, _ = images.discover_fields(root, "", BY_NAME)
    with pytest.raises(InputDataError, match=r"A01 field 1 .*: 1 NaN or infinite pixels in .*p.zarr/A/1/0/s0"):
        images.read_field(found["A01"][0], 3)


def test_signature_covers_the_arrays_read(tmp_path: Path) -> None:
    """A rewritten chunk changes the stat tier and the content; a copy changes only the stat tier; a change
    of a pyramid level that is not read changes nothing."""
    import zarr

    root = write_ome_zarr(tmp_path / "p.zarr", demo_fields(["A01"]), version="0.4", pyramid=(2,))
    found, _ = images.discover_fields(root, "", BY_NAME)
    src = found["A01"][0]
    stat, content = signature.stat_signature(src.files), signature.content_digest(src.files)
    assert stat[1]["files"] >= 2 and stat[1]["size"] > 0
    low = zarr.open_array(str(root / "A" / "1" / "0" / "s1"), mode="r+")
    low[0, 0, 0] = 1 + low[0, 0, 0]
    assert signature.stat_signature(src.files) == stat
    copy = shutil.copytree(root, tmp_path / "copy.zarr", copy_function=shutil.copy)  # new file dates
    found_copy, _ = images.discover_fields(copy, "", BY_NAME)
    copied = found_copy["A01"][0].files
    assert signature.stat_signature(copied) != stat and signature.content_digest(copied) == content
    recorded = signature.signature(src.files)
    assert signature.same_inputs(recorded, copied, signature.stat_signature(copied)) == (True, True)
    full = zarr.open_array(str(root / "A" / "1" / "0" / "s0"), mode="r+")
    full[2, 100, 100] = 1 + full[2, 100, 100]
    assert signature.stat_signature(src.files) != stat and signature.content_digest(src.files) != content
    assert signature.same_inputs({"stat": stat, "content": content}, src.files,
                                 signature.stat_signature(src.files)) == (False, False)


def test_sharded_field_written_by_iohub(tmp_path: Path) -> None:
    """Zarr v3 sharding (one shard file holding 3 x 16 chunks): read exactly, the shard in the signature."""
    field = demo_fields(["A01"])["A01"][1]
    root = write_iohub(tmp_path / "p.zarr", {"A01": {1: field}}, version="0.5", chunks=(1, 1, 1, 32, 32),
                       shards_ratio=(1, 3, 1, 4, 4))
    found, problems = images.discover_fields(root, "", BY_NAME)
    assert problems == []
    np.testing.assert_array_equal(images.read_field(found["A01"][0], 3), field.astype(np.float32))
    assert signature.stat_signature(found["A01"][0].files)[1]["files"] == 2  # zarr.json and the one shard


def test_plate_keys_for_stores(tmp_path: Path) -> None:
    from pcim_cli.config import load_config
    from pcim_cli.errors import ConfigError

    path = tmp_path / "plate.yaml"
    path.write_text("plate: {images: s3://bucket/plate.zarr, channels: [DNA], timepoint: -1}\nmodel: {path: m.ts}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "plate.images: 's3://bucket/plate.zarr': remote stores are not read yet" in str(info.value)
    assert "plate.timepoint: input should be greater than or equal to 0" in str(info.value)
    path.write_text("plate: {images: plate.zarr, channels: [DNA], timepoint: 3}\nmodel: {path: m.ts}\n")
    cfg = load_config(path)
    assert cfg.plate.timepoint == 3 and cfg.plate.images == tmp_path / "plate.zarr"
