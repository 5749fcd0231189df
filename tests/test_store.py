"""The OME-Zarr HCS store: real stores under tmp_path, read back by zarr, ome-zarr-py and ome-zarr-models."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import v04, v05
from ome_zarr_models.exceptions import ValidationWarning

from pcim_cli.errors import OutputError
from pcim_cli.io import store, zarr_files

FIELDS = {"A01": 2, "B03": 1}
SHAPE = (2, 64, 48)


@pytest.fixture(params=["0.5", "0.4"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


def _maps(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _plate(tmp_path: Path, fmt: str) -> tuple[Path, dict[tuple[str, int], np.ndarray]]:
    """A plate with every field of FIELDS written; returns the store and what was written."""
    path = tmp_path / "plate.zarr"
    store.create_plate(path, "P001", FIELDS, format=fmt)
    written = {}
    for i, (well, count) in enumerate(FIELDS.items()):
        for field in range(count):
            maps = _maps(10 * i + field)
            record = {"status": "done", "target": "mitotic", "field": field}
            store.write_field(path, well, field, maps, ["mitotic", "mitotic:2"], record, format=fmt)
            written[(well, field)] = maps
    return path, written


def _models(fmt: str):
    return v05 if fmt == "0.5" else v04


# ---------------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    ("well", "field", "expected"),
    [("A01", 0, "A/1/0"), ("B12", 3, "B/12/3"), ("AA03", 1, "AA/3/1"), ("p24", 0, "P/24/0")],
)
def test_field_path_uses_ngff_row_and_unpadded_column(well: str, field: int, expected: str) -> None:
    assert store.field_path(well, field) == expected


@pytest.mark.parametrize("bad", ["", "A", "01", "A00", "ABC1"])
def test_bad_well_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="well"):
        store.split_well(bad)


# ---------------------------------------------------------------------------------------------------
# round trips


def stored(maps: np.ndarray) -> np.ndarray:
    """What the store keeps of float32 maps: their values with MAP_MANTISSA_BITS mantissa bits."""
    return zarr_files.round_mantissa(maps, store.MAP_MANTISSA_BITS)


def test_write_field_round_trips_through_zarr(tmp_path: Path, fmt: str) -> None:
    path, written = _plate(tmp_path, fmt)
    root = zarr.open_group(str(path), mode="r")
    assert root.metadata.zarr_format == (3 if fmt == "0.5" else 2)
    for (well, field), maps in written.items():
        image = root[store.field_path(well, field)]
        assert image["0"].dtype == np.float32
        # the stored maps: float32 with 6 mantissa bits kept (relative error <= 2^-7), rounded to nearest
        np.testing.assert_array_equal(image["0"][:], stored(maps))
        np.testing.assert_allclose(image["0"][:], maps, rtol=2.0 ** -(store.MAP_MANTISSA_BITS + 1), atol=0)
        # 2x / 4x mean-pooled levels
        assert image["1"].shape == (2, 32, 24) and image["2"].shape == (2, 16, 12)
        np.testing.assert_allclose(image["1"][:], maps.reshape(2, 32, 2, 24, 2).mean(axis=(2, 4)),
                                   rtol=2.0 ** -store.MAP_MANTISSA_BITS)
        got, labels, record = store.read_field(path, well, field)
        np.testing.assert_array_equal(got, stored(maps))
        assert labels == ["mitotic", "mitotic:2"]
        assert record == {"status": "done", "target": "mitotic", "field": field}


def test_store_reads_through_ome_zarr_reader_as_napari_does(tmp_path: Path, fmt: str) -> None:
    path, written = _plate(tmp_path, fmt)

    image_nodes = list(Reader(parse_url(str(path / "A/1/1")))())
    image = image_nodes[0]
    assert [level.shape for level in image.data] == [(2, 64, 48), (2, 32, 24), (2, 16, 12)]
    np.testing.assert_array_equal(np.asarray(image.data[0]), stored(written[("A01", 1)]))
    assert image.metadata["channel_names"] == ["mitotic", "mitotic:2"]

    plate = list(Reader(parse_url(str(path)))())[0]
    montage = np.asarray(plate.data[0])  # field 0 of each well, at its plate position (rows A-B, cols 1-3)
    y, x = SHAPE[1:]
    assert montage.shape == (2, 2 * y, 3 * x)
    np.testing.assert_array_equal(montage[:, :y, :x], stored(written[("A01", 0)]))
    np.testing.assert_array_equal(montage[:, y:, 2 * x :], stored(written[("B03", 0)]))


def test_plate_well_and_image_groups_validate_with_ome_zarr_models(tmp_path: Path, fmt: str) -> None:
    path, _ = _plate(tmp_path, fmt)
    models = _models(fmt)
    root = zarr.open_group(str(path), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)  # e.g. a missing plate version
        hcs = models.HCS.from_zarr(root)
        well = models.Well.from_zarr(root["A/1"])
        image = models.Image.from_zarr(root["A/1/0"])
    plate = hcs.ome_attributes.plate if fmt == "0.5" else hcs.attributes.plate
    assert plate.name == "P001" and plate.field_count == 2
    assert [w.path for w in plate.wells] == ["A/1", "B/3"]
    assert [r.name for r in plate.rows] == ["A", "B"] and [c.name for c in plate.columns] == ["1", "2", "3"]
    assert len(list(hcs.well_groups)) == 2
    well_meta = well.ome_attributes.well if fmt == "0.5" else well.attributes.well
    assert [im.path for im in well_meta.images] == ["0", "1"]
    multiscales = (image.ome_attributes if fmt == "0.5" else image.attributes).multiscales
    assert [a.name for a in multiscales[0].axes] == ["c", "y", "x"]
    assert [d.path for d in multiscales[0].datasets] == ["0", "1", "2"]


def test_metadata_keys_follow_the_format(tmp_path: Path, fmt: str) -> None:
    path, _ = _plate(tmp_path, fmt)
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    image_attrs = zarr.open_group(str(path / "A/1/0"), mode="r").attrs.asdict()
    if fmt == "0.5":
        assert attrs["ome"]["version"] == "0.5" and "plate" in attrs["ome"]
        assert "multiscales" in image_attrs["ome"] and "omero" in image_attrs["ome"]
    else:
        assert attrs["plate"]["version"] == "0.4" and "ome" not in attrs
        assert image_attrs["multiscales"][0]["version"] == "0.4"
    assert "pcim" in image_attrs and "pcim" not in image_attrs.get("ome", {})


def test_omero_window_spans_robust_percentiles(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1})
    maps = np.zeros((2, 100, 100), dtype=np.float32)
    maps[0] = np.linspace(0, 1, 10_000, dtype=np.float32).reshape(100, 100)
    maps[0, 50, 50] = 50.0  # one hot pixel must not set the display range
    store.write_field(path, "A01", 0, maps, ["a", "b"], {})
    channels = zarr.open_group(str(path / "A/1/0"), mode="r").attrs["ome"]["omero"]["channels"]
    window = channels[0]["window"]
    assert window["min"] == 0.0 and window["max"] == 50.0
    assert 0.0 < window["start"] < 0.01 and 0.99 < window["end"] < 1.0
    flat = channels[1]["window"]  # a constant map still gets an end above its start
    assert flat["end"] > flat["start"]
    assert channels[0]["color"] != channels[1]["color"]


def test_chunks_are_one_channel_by_at_most_1024_px(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1}, format=fmt)
    store.write_field(path, "A01", 0, np.ones((2, 1100, 20), np.float32), ["a", "b"], {}, format=fmt)
    image = zarr.open_group(str(path / "A/1/0"), mode="r")
    assert image["0"].chunks == (1, 1024, 20)
    assert image["2"].shape == (2, 275, 5)


def test_tiny_fields_skip_levels_under_one_pixel(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1})
    store.write_field(path, "A01", 0, np.ones((1, 3, 2), np.float32), ["t"], {})
    image = zarr.open_group(str(path / "A/1/0"), mode="r")
    assert sorted(image.array_keys()) == ["0", "1"]
    datasets = image.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1"]


def test_record_is_made_json_serialisable(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1})
    record = {
        "prob": np.float32(0.25),
        "steps": np.int64(300),
        "probs": np.array([0.5, 0.5]),
        "shape": (64, 48),
        "auc": float("nan"),
        "nested": {"ok": np.bool_(True)},
    }
    store.write_field(path, "A01", 0, _maps(0, (1, 8, 8)), ["t"], record)
    assert store.read_record(path, "A01", 0) == {
        "prob": 0.25,
        "steps": 300,
        "probs": [0.5, 0.5],
        "shape": [64, 48],
        "auc": None,
        "nested": {"ok": True},
    }
    with pytest.raises(TypeError, match="JSON"):
        store.write_field(path, "A01", 0, _maps(0, (1, 8, 8)), ["t"], {"bad": object()})


# ---------------------------------------------------------------------------------------------------
# reruns, completion, shared metadata


def test_rerun_replaces_a_field_cleanly(tmp_path: Path, fmt: str) -> None:
    path, _ = _plate(tmp_path, fmt)
    new = _maps(99, (1, 3, 2))  # fewer channels and levels than before
    store.write_field(path, "A01", 0, new, ["other"], {"status": "done", "run": 2}, format=fmt)
    maps, labels, record = store.read_field(path, "A01", 0)
    np.testing.assert_array_equal(maps, stored(new))
    assert labels == ["other"] and record == {"status": "done", "run": 2}
    assert sorted(zarr.open_group(str(path / "A/1/0"), mode="r").array_keys()) == ["0", "1"]
    _models(fmt).HCS.from_zarr(zarr.open_group(str(path), mode="r"))


def test_field_without_record_is_incomplete(tmp_path: Path, fmt: str) -> None:
    path, _ = _plate(tmp_path, fmt)
    assert store.read_record(path, "A01", 0) is not None
    assert store.read_record(path, "B03", 5) is None  # never written
    group = zarr.open_group(str(path / "A/1/0"), mode="a")
    del group.attrs["pcim"]  # what a crash before the last step leaves behind
    assert store.read_record(path, "A01", 0) is None
    assert store.read_field(path, "A01", 0)[2] is None


def test_write_field_touches_only_its_own_group(tmp_path: Path, fmt: str) -> None:
    path, _ = _plate(tmp_path, fmt)
    shared = [p for p in path.rglob("*") if p.is_file() and len(p.relative_to(path).parts) <= 3]
    before = {p: p.read_bytes() for p in shared}
    store.write_field(path, "B03", 0, _maps(5), ["a", "b"], {"status": "done"}, format=fmt)
    assert {p: p.read_bytes() for p in shared} == before


def test_concurrent_workers_write_their_own_fields(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "p.zarr"
    wells = {"A01": 3, "A02": 3, "B01": 2}
    store.create_plate(path, "P", wells, format=fmt)
    jobs = [(well, field) for well, count in wells.items() for field in range(count)]

    def work(job: tuple[str, int]) -> str:
        well, field = job
        seed = 100 * jobs.index(job)
        return store.write_field(path, well, field, _maps(seed), ["a", "b"], {"seed": seed}, format=fmt)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(work, jobs)) == [store.field_path(w, f) for w, f in jobs]
    for job in jobs:
        maps, _, record = store.read_field(path, *job)
        np.testing.assert_array_equal(maps, stored(_maps(100 * jobs.index(job))))
        assert record == {"seed": 100 * jobs.index(job)}
    hcs = _models(fmt).HCS.from_zarr(zarr.open_group(str(path), mode="r"))
    assert len(list(hcs.well_groups)) == 3


def test_read_field_of_a_missing_field_raises(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1})
    with pytest.raises(FileNotFoundError):
        store.read_field(path, "A01", 0)


def test_create_plate_again_keeps_fields_and_wells(tmp_path: Path, fmt: str) -> None:
    path, written = _plate(tmp_path, fmt)
    store.create_plate(path, "P001", {"B03": 1, "C02": 3}, format=fmt)  # a later run on other wells
    np.testing.assert_array_equal(store.read_field(path, "A01", 1)[0], stored(written[("A01", 1)]))
    hcs = _models(fmt).HCS.from_zarr(zarr.open_group(str(path), mode="r"))
    plate = hcs.ome_attributes.plate if fmt == "0.5" else hcs.attributes.plate
    assert [w.path for w in plate.wells] == ["A/1", "B/3", "C/2"]
    assert plate.field_count == 3


def test_plate_with_1536_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"AF48": 1, "A01": 1})
    store.write_field(path, "AF48", 0, _maps(1, (1, 4, 4)), ["t"], {})
    hcs = v05.HCS.from_zarr(zarr.open_group(str(path), mode="r"))
    plate = hcs.ome_attributes.plate
    assert len(plate.rows) == 32 and len(plate.columns) == 48
    assert plate.wells[-1].path == "AF/48" and plate.wells[-1].rowIndex == 31


# ---------------------------------------------------------------------------------------------------
# errors


def test_format_mismatch_is_an_output_error(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1}, format="0.4")
    with pytest.raises(OutputError, match="output.format"):
        store.create_plate(path, "P", {"A01": 1}, format="0.5")
    with pytest.raises(OutputError, match="output.format"):
        store.write_field(path, "A01", 0, _maps(0, (1, 4, 4)), ["t"], {}, format="0.5")
    with pytest.raises(ValueError, match="0.6"):
        store.create_plate(tmp_path / "q.zarr", "P", {"A01": 1}, format="0.6")


def test_unwritable_output_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file")  # works as root too, unlike a read-only folder
    path = blocker / "plate.zarr"
    with pytest.raises(OutputError, match=str(path)) as info:
        store.create_plate(path, "P", FIELDS)
    assert "writable" in str(info.value)
    assert isinstance(info.value, OSError)
    with pytest.raises(OutputError, match=str(path)):
        store.write_field(path, "A01", 0, _maps(0, (1, 4, 4)), ["t"], {})


@pytest.mark.parametrize(
    ("maps", "labels"),
    [
        (np.ones((4, 4), np.float32), ["t"]),
        (np.ones((2, 4, 4), np.float32), ["t"]),
        (-np.ones((1, 4, 4), np.float32), ["t"]),
        (np.full((1, 4, 4), np.nan, np.float32), ["t"]),
    ],
)
def test_bad_maps_are_rejected_before_writing(tmp_path: Path, maps: np.ndarray, labels: list[str]) -> None:
    path = tmp_path / "p.zarr"
    store.create_plate(path, "P", {"A01": 1})
    with pytest.raises(ValueError):
        store.write_field(path, "A01", 0, maps, labels, {})
    assert not (path / "A/1/0").exists()
