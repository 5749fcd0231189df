"""`pcim` end to end on what the ecosystem writes: a demo plate converted to OME-Zarr by ome-zarr-py and by
iohub, and the demo classifier (and a fixed-input one) packaged by bioimageio.spec. The maps must be the
maps of the TIFF plate and of the bare TorchScript file, to the bit."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from bioimageio_factory import build_package
from cli_runner import run_pcim
from model_factory import DEMO_MODEL, make_model
from ome_zarr_factory import CHANNELS, demo_fields, write_iohub, write_ome_zarr
from PIL import Image
from plates import make_plate

from pcim_cli.io import store

WELLS = ("A01", "A02", "B01")


def _edit(path: Path, **sections: dict) -> Path:
    config = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        for k, v in value.items():
            if v is None:
                config.setdefault(key, {}).pop(k, None)
            else:
                config.setdefault(key, {})[k] = v
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _explain(plate: Path, *args: str) -> dict:
    proc = run_pcim("explain", str(plate), "--json", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _maps(zarr_path: Path, wells=WELLS) -> dict[tuple[str, int], tuple[np.ndarray, dict]]:
    out = {}
    for well in wells:
        for index in (0, 1):
            maps, _, record = store.read_field(zarr_path, well, index)
            out[(well, index)] = (maps, record)
    return out


def _same_maps(a: dict, b: dict) -> None:
    assert a.keys() - {"render"} == b.keys() - {"render"}
    for key in a.keys() - {"render"}:
        np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=str(key))
        for k in ("site", "targets", "predicted_class", "class_probabilities", "results"):
            assert a[key][1][k] == b[key][1][k], (key, k)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiff_maps(tmp_path_factory) -> dict:
    """The maps of the TIFF plate: the reference every converted plate must reproduce."""
    root = tmp_path_factory.mktemp("tiff")
    plate = make_plate(root, wells=WELLS, steps=5)
    _explain(plate)
    return {**_maps(root / "out" / "P1.zarr"), "render": _render(plate)}


def _render(plate: Path) -> dict[str, np.ndarray]:
    """The PNGs `pcim render --plate-yaml` draws for well A01 (maps over the raw images), by file name."""
    out = plate.parent / "render"
    proc = run_pcim("render", str(plate.parent / "out" / "P1.zarr"), "--plate-yaml", str(plate), "--wells", "A01",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "wells").glob("*.png"))}


def _zarr_plate(root: Path, writer, version: str, **kw) -> Path:
    plate = make_plate(root, wells=(), steps=5)
    writer(root / "plate.zarr", demo_fields(WELLS), version=version, **kw)
    return _edit(plate, plate={"images": "plate.zarr", "channels": list(CHANNELS)})


@pytest.mark.slow
@pytest.mark.parametrize("writer, version", [(write_ome_zarr, "0.5"), (write_iohub, "0.4")],
                         ids=["ome-zarr-py-0.5", "iohub-0.4"])
def test_maps_of_a_converted_plate_equal_the_tiff_plate(tmp_path: Path, tiff_maps: dict, writer, version) -> None:
    plate = _zarr_plate(tmp_path, writer, version)
    before = _tree_digest(tmp_path / "plate.zarr")
    doc = _explain(plate)
    assert doc["counts"]["done"] == 6 and doc["fitted"] == 6
    maps = _maps(tmp_path / "out" / "P1.zarr")
    _same_maps(maps, tiff_maps)
    record = maps[("A01", 1)][1]
    assert record["site"] == 2 and record["inputs"]["stat"][1]["files"] >= 2  # the array folder, summed
    drawn = _render(plate)  # the raw images under the maps read from the store: the same pictures
    assert sorted(drawn) == ["A01_s1.png", "A01_s2.png"] and sorted(tiff_maps["render"]) == sorted(drawn)
    for name, pixels in drawn.items():
        np.testing.assert_array_equal(pixels, tiff_maps["render"][name], err_msg=name)
    assert _tree_digest(tmp_path / "plate.zarr") == before  # never written


@pytest.mark.slow
def test_rerun_redoes_only_the_field_whose_chunks_changed_on_dask_workers(tmp_path: Path) -> None:
    plate = _zarr_plate(tmp_path, write_iohub, "0.5")
    _edit(plate, compute={"cluster": "local", "workers": 1})  # field descriptors travel to a worker process
    first = _explain(plate)
    assert first["counts"]["done"] == 6 and first["fitted"] == 6
    assert _explain(plate)["fitted"] == 0
    array = zarr.open_array(str(tmp_path / "plate.zarr" / "A" / "2" / "1" / "0"), mode="r+")
    array[0, 1, 0, 60:70, 60:70] = 4000  # A02 site 2 exported again with other pixels
    again = _explain(plate)
    assert again["fitted"] == 1 and again["counts"]["done"] == 6
    record = store.read_record(tmp_path / "out" / "P1.zarr", "A02", 1)
    assert record["site"] == 2 and record["status"] == "done"


@pytest.mark.slow
def test_validate_lists_the_store_problems_like_tiff_problems(tmp_path: Path) -> None:
    fields = demo_fields(WELLS)
    fields["B01"][2] = fields["B01"][2].astype(np.float32)
    fields["B01"][2][0, 3, 3] = np.nan
    plate = make_plate(tmp_path, wells=(), steps=5)
    cropped = {1: demo_fields(["B01"])["B01"][1][:, :96, :96], 2: demo_fields(["B01"])["B01"][2]}
    write_ome_zarr(tmp_path / "plate.zarr", {"A01": fields["A01"], "A02": fields["A02"], "B01": cropped},
                   version="0.4")
    write_ome_zarr(tmp_path / "nan.zarr", {"B01": fields["B01"]}, version="0.4")
    shutil.rmtree(tmp_path / "plate.zarr" / "A" / "2" / "0")  # A02 site 1 lost in a copy
    _edit(plate, plate={"images": "plate.zarr", "channels": list(CHANNELS)})
    proc = run_pcim("validate", str(plate), "--json", "--no-probe")
    found = json.loads(proc.stdout)
    assert proc.returncode == 3, proc.stderr
    assert found["usable"] == 4 and any("A02 field 1" in p and "missing" in p for p in found["problems"])
    assert any("B01 site 1: the field is 96x96 px but the plate's fields are 128x128" in p and "B/1/0" in p
               for p in found["problems"]), found["problems"]
    _edit(plate, plate={"images": "nan.zarr"})
    proc = run_pcim("validate", str(plate), "--json", "--no-probe")
    found = json.loads(proc.stdout)
    assert proc.returncode == 3 and any("1 NaN or infinite pixels" in p for p in found["problems"]), found
    _edit(plate, plate={"channels": ["DNA", "GFP", "Actin"]})
    proc = run_pcim("validate", str(plate), "--no-probe")
    assert proc.returncode == 65 and "no channel labelled 'GFP' (the store's channels: DNA, PH3, Actin)" in proc.stderr


def test_the_input_store_is_never_an_output(tmp_path: Path) -> None:
    plate = _zarr_plate(tmp_path, write_ome_zarr, "0.5")
    _edit(plate, output={"zarr": "plate.zarr"})
    before = _tree_digest(tmp_path / "plate.zarr")
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 65 and "plate.zarr" in proc.stderr
    assert _tree_digest(tmp_path / "plate.zarr") == before


# ---------------------------------------------------------------- bioimage.io packages


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PCIM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
def test_package_gives_the_maps_of_its_torchscript(tmp_path: Path, tiff_maps: dict) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=5)
    build_package(tmp_path / "pkg", DEMO_MODEL, zip_name="demo.zip")
    _edit(plate, model={"path": "demo.zip", "classes": None})  # classes, normalisation from the package
    doc = _explain(plate)
    assert doc["counts"]["done"] == 6
    maps = _maps(tmp_path / "out" / "P1.zarr")
    _same_maps(maps, tiff_maps)
    taken = maps[("A01", 0)][1]["model_package"]
    assert taken["name"] == "pcim test classifier" and taken["weights"] == "torchscript"
    assert taken["decided"] == {"channels": "package", "normalize": "package", "classes": "package",
                                "input_size": "package size rule: whole 128x128 fields"}
    assert taken["normalize"] == {"method": "percentile", "low": 1.0, "high": 99.8, "clip": True}
    proc = run_pcim("validate", str(plate), "--no-probe")
    assert proc.returncode == 0, proc.stderr
    assert "bioimage.io package" in proc.stdout and "normalize from the package" in proc.stdout


@pytest.mark.slow
def test_tiled_package_gives_the_maps_of_its_torchscript_with_input_size(tmp_path: Path) -> None:
    weights = make_model("only-64", tmp_path / "only64.ts")
    build_package(tmp_path / "pkg", weights, size=64, test_size=64, zip_name="tiled.zip")
    ts = make_plate(tmp_path / "ts", wells=("A01",), steps=3, model={"path": str(weights), "input_size": [64, 64]})
    _explain(ts)
    pkg = make_plate(tmp_path / "pk", wells=("A01",), steps=3, model={"path": str(tmp_path / "tiled.zip")})
    _explain(pkg)
    a, b = _maps(tmp_path / "ts" / "out" / "P1.zarr", ["A01"]), _maps(tmp_path / "pk" / "out" / "P1.zarr", ["A01"])
    _same_maps(a, b)
    assert b[("A01", 0)][1]["tiling"]["n_tiles"] > 1 and b[("A01", 0)][1]["model_package"]["input_size"] == [64, 64]


def test_size_rule_tiles_fields_it_does_not_allow(tmp_path: Path) -> None:
    """min 48, step 32 allows 112 but not 128: 128 x 128 fields are tiled with 112 x 112."""
    build_package(tmp_path / "pkg", DEMO_MODEL, size=(48, 32), test_size=112, zip_name="rule.zip")
    plate = make_plate(tmp_path, wells=("A01",), steps=3, model={"path": "rule.zip", "classes": None})
    proc = run_pcim("validate", str(plate), "--json", "--no-probe")
    assert proc.returncode == 0, proc.stderr
    sizes = json.loads(proc.stdout)["plan"]["sizes"]
    assert sizes[0]["tile"] == [112, 112] and sizes[0]["n_tiles"] == 4


@pytest.mark.slow
def test_plate_yaml_disagreeing_with_the_package_exits_78_unless_overridden(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=3)
    build_package(tmp_path / "pkg", DEMO_MODEL, zip_name="demo.zip")
    _edit(plate, model={"path": "demo.zip", "normalize": {"method": "percentile", "low": 0.5, "high": 99.5}})
    proc = run_pcim("validate", str(plate), "--no-probe")
    assert proc.returncode == 78
    assert "model.normalize: normalize percentile (low: 0.5, high: 99.5) but model package" in proc.stderr
    assert "normalize percentile (low: 1.0, high: 99.8, clip: True)" in proc.stderr
    _edit(plate, model={"override_package": ["normalize"]})
    doc = _explain(plate)
    record = store.read_record(tmp_path / "out" / "P1.zarr", "A01", 0)
    assert doc["counts"]["done"] == 2 and record["model_package"]["decided"]["normalize"] == "plate.yaml (override)"
    assert record["settings"]["normalize"] == {"method": "percentile", "low": 0.5, "high": 99.5}
    _edit(plate, model={"override_package": None}, plate={"channels": {"PH3": "2", "DNA": "1", "Actin": "3"}})
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 78 and "plate.channels: PH3, DNA, Actin but model package" in proc.stderr


# ---------------------------------------------------------------- bad inputs through the installed CLI


@pytest.mark.slow
def test_bad_packages_exit_78_naming_the_package(tmp_path: Path) -> None:
    """What a user meets with a package pcim cannot use: exit 78, the file named, nothing written."""
    plate = make_plate(tmp_path, wells=("A01",), steps=3)
    (tmp_path / "broken.zip").write_bytes(b"this was a download that stopped half way")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "rdf.yaml").write_text("type: model\nformat_version: 0.5.4\nname: half a package\n")
    folder = build_package(tmp_path / "pkg", DEMO_MODEL, zip_name=None)
    with open(folder.parent / "weights.ts", "ab") as fh:  # weights replaced after the package was made
        fh.write(b"\0")
    cases = {"broken.zip": "broken.zip is not a zip archive", "half/rdf.yaml": "not a valid bioimage.io description",
             str(folder): "sha256"}
    for path, says in cases.items():
        _edit(plate, model={"path": path, "classes": None})
        proc = run_pcim("explain", str(plate))
        assert proc.returncode == 78, (path, proc.stderr[-2000:])
        assert says in proc.stderr and "Traceback" not in proc.stderr, (path, proc.stderr[-2000:])
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_stores_exit_65_or_fail_the_field_naming_the_array(tmp_path: Path) -> None:
    """A folder that is not a plate: exit 65 with the fix; a damaged chunk: that field fails (exit 3), the
    others are explained, and its message names the array."""
    plate = _zarr_plate(tmp_path, write_ome_zarr, "0.4")
    _edit(plate, plate={"images": "plate.zarr/A/1"})  # a well, not the plate
    proc = run_pcim("validate", str(plate), "--no-probe")
    assert proc.returncode == 65 and "plate.images" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    _edit(plate, plate={"images": "nothing-here.zarr"})
    proc = run_pcim("validate", str(plate), "--no-probe")
    assert proc.returncode == 65 and "nothing-here.zarr" in proc.stderr, proc.stderr
    array = tmp_path / "plate.zarr" / "B" / "1" / "1" / "s0"  # ome-zarr-py names its levels s0, s1, ...
    chunks = [p for p in array.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"\x00garbage")
    _edit(plate, plate={"images": "plate.zarr", "layout": None})  # the plate metadata gives the wells
    proc = run_pcim("explain", str(plate), "--json", "--only", "A01,B01")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert doc["counts"]["done"] == 3 and doc["counts"]["failed"] == 1, doc["counts"]
    rows = pd.read_csv(tmp_path / "out" / "P1.csv")
    failed = rows[rows["PCIM_Status"] == "failed"]
    assert list(zip(failed["Metadata_Well"], failed["Metadata_Site"], strict=True)) == [("B01", 2)]
    assert "B/1/1/s0" in failed["PCIM_Error"].iloc[0], failed["PCIM_Error"].iloc[0]
