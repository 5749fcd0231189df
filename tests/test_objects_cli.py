"""plate.objects through the installed `pcim` CLI on small real plates: the per-object CSV, the NGFF labels
group (ome-zarr-models, napari-ome-zarr), joins with CellProfiler and pycytominer tables, bad label images,
reruns, tiling, per-channel shares, render and validate."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
import zarr
from cli_runner import run_pcim
from ome_zarr_models import v04, v05
from ome_zarr_models.exceptions import ValidationWarning
from PIL import Image
from plates import DEMO, make_plate

from pcim_cli.engine import field as field_maps
from pcim_cli.engine import mixing, tiling
from pcim_cli.io import images, store
from pcim_cli.report import drawing

WELLS = ("A01", "A02", "A04")  # nocodazole (mitotic) x 2, DMSO (negative)
KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "ObjectNumber"]


def label_image(well: str, site: int) -> np.ndarray:
    return tifffile.imread(DEMO / "labels" / f"{well}_s{site}_nuclei.tif")


def positive_objects(well: str, site: int) -> set[int]:
    """The nuclei lying mostly inside the demo's evidence mask (the PH3-positive ones)."""
    lab, mask = label_image(well, site), tifffile.imread(DEMO / "masks" / f"{well}_s{site}.tif") > 0
    return {int(v) for v in np.unique(lab)[1:] if mask[lab == v].mean() >= 0.5}


def field_x(root: Path, well: str, site: int) -> torch.Tensor:
    img = np.stack([tifffile.imread(root / "images" / f"{well}_s{site}_w{c}.tif") for c in (1, 2, 3)])
    return torch.from_numpy(images.normalize(img.astype(np.float32)))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Three demo wells with their nuclei labels, 50 steps, NGFF 0.5."""
    root = tmp_path_factory.mktemp("objects")
    plate_yaml = make_plate(root, WELLS, steps=50, objects=True)
    proc = run_pcim("explain", str(plate_yaml), "--json")
    out = root / "out"
    return {"root": root, "yaml": plate_yaml, "proc": proc, "store": out / "P1.zarr", "csv": out / "P1.csv",
            "objects": out / "P1_pcim_Nuclei.csv"}


@pytest.mark.slow
def test_the_run_writes_one_object_row_per_labelled_nucleus(run) -> None:
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    doc = json.loads(run["proc"].stdout)
    assert doc["object_csvs"] == {"Nuclei": str(run["objects"])} and doc["object_failures"] == []
    table = pd.read_csv(run["objects"])
    assert list(table.columns[:7]) == [*KEYS, "Location_Center_X", "Location_Center_Y", "AreaShape_Area"]
    assert [c for c in table.columns if c.startswith("PCIM_mitotic")] == [
        f"PCIM_mitotic_{m}" for m in ("Sum", "Mean", "Max", "Share", "Rank", "DeltaP", "Share_DNA", "Share_PH3",
                                      "Share_Actin")]
    assert not table.duplicated(KEYS).any()
    for well in WELLS:
        for site in (1, 2):
            lab = label_image(well, site)
            rows = table[(table.Metadata_Well == well) & (table.Metadata_Site == site)].set_index("ObjectNumber")
            values = np.unique(lab)[1:]
            assert sorted(rows.index) == values.tolist()
            for v in values:
                ys, xs = np.nonzero(lab == v)
                assert rows.loc[v, "AreaShape_Area"] == len(ys)
                assert rows.loc[v, "Location_Center_X"] == pytest.approx(xs.mean())
                assert rows.loc[v, "Location_Center_Y"] == pytest.approx(ys.mean())


@pytest.mark.slow
def test_the_planted_evidence_nuclei_rank_first_in_mitotic_fields(run) -> None:
    table = pd.read_csv(run["objects"])
    for well in ("A01", "A02"):
        for site in (1, 2):
            rows = table[(table.Metadata_Well == well) & (table.Metadata_Site == site)].set_index("ObjectNumber")
            positive = positive_objects(well, site)
            assert positive
            assert set(rows["PCIM_mitotic_Rank"].nsmallest(len(positive)).index) == positive, (well, site)
            assert rows["PCIM_mitotic_Share"].sum() <= 1 + 1e-9
            assert sorted(rows["PCIM_mitotic_Rank"]) == list(range(1, len(rows) + 1))
            assert rows.loc[list(positive), "PCIM_mitotic_Share"].sum() > 0.5


@pytest.mark.slow
def test_delta_p_is_the_drop_when_the_object_alone_is_deleted(run) -> None:
    table = pd.read_csv(run["objects"])
    model = torch.jit.load(str(run["root"] / "classifier.ts")).eval()
    x = field_x(run["root"], "A01", 1)
    lab = torch.from_numpy(label_image("A01", 1).astype(np.int64))
    mean = x.mean(dim=(1, 2), keepdim=True)  # explain.delete_substrate: mean
    with torch.no_grad():
        p0 = torch.softmax(model(x[None]), 1)[0, 1]
        rows = table[(table.Metadata_Well == "A01") & (table.Metadata_Site == 1)]
        for row in rows.itertuples():
            gone = torch.where((lab == row.ObjectNumber)[None], mean.expand_as(x), x)
            drop = float(p0 - torch.softmax(model(gone[None]), 1)[0, 1])
            assert row.PCIM_mitotic_DeltaP == pytest.approx(drop, abs=1e-5)


@pytest.mark.slow
def test_the_main_csv_gets_channel_shares_object_counts_and_the_top_k_drop(run) -> None:
    main = pd.read_csv(run["csv"])
    shares = main[["PCIM_Share_DNA", "PCIM_Share_PH3", "PCIM_Share_Actin"]]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-5)
    counts = main.set_index(["Metadata_Well", "Metadata_Site"])["PCIM_Nuclei_Count"]
    for (well, site), n in counts.items():
        assert n == len(np.unique(label_image(well, site))) - 1
    assert main["PCIM_Nuclei_TopDeltaP"].between(-1, 1).all()
    mitotic = main[main.PCIM_Target == "mitotic"]
    assert (mitotic["PCIM_Nuclei_TopDeltaP"] > 0.3).mean() >= 0.75  # deleting the top 3 nuclei matters
    assert main["PCIM_Error"].isna().all()


@pytest.mark.slow
def test_the_store_holds_the_labels_as_a_valid_ngff_labels_group(run) -> None:
    root = zarr.open_group(str(run["store"]), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)
        image = v05.Image.from_zarr(root["A/1/0"])
        label = v05.ImageLabel.from_zarr(root["A/1/0/labels/Nuclei"])
        v05.HCS.from_zarr(root)
    assert image.labels.attributes.ome.labels == ["Nuclei"]
    assert label.attributes.ome.image_label.source.image == "../../"
    np.testing.assert_array_equal(root["A/1/0/labels/Nuclei/0"][...], label_image("A01", 1))
    np.testing.assert_array_equal(root["A/1/0/labels/Nuclei/1"][...], label_image("A01", 1)[::2, ::2])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_napari_ome_zarr_opens_the_field_with_its_nuclei_as_a_labels_layer(run) -> None:
    reader_mod = pytest.importorskip("napari_ome_zarr._reader", reason="napari-ome-zarr is not installed")
    path = str(run["store"] / "A" / "2" / "1")
    layers = reader_mod.napari_get_reader(path)(path)
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels"]
    data, _, _ = layers[1]
    assert [d.shape for d in data] == [(128, 128), (64, 64), (32, 32)]
    np.testing.assert_array_equal(np.asarray(data[0]), label_image("A02", 2))


@pytest.mark.slow
def test_object_csvs_are_rebuilt_from_the_store_alone(run) -> None:
    before = run["objects"].read_bytes()
    run["objects"].unlink()
    run["csv"].unlink()
    proc = run_pcim("explain", str(run["yaml"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(0 fitted by this run)" in proc.stderr
    assert run["objects"].read_bytes() == before


@pytest.mark.slow
def test_joins_with_cellprofiler_image_and_nuclei_tables_exactly(run, tmp_path) -> None:
    """CellProfiler's export: Image.csv (ImageNumber -> well, site) and Nuclei.csv (ImageNumber, ObjectNumber)."""
    images_rows, nuclei_rows = [], []
    for number, (well, site) in enumerate(((w, s) for w in WELLS for s in (1, 2)), start=1):
        lab = label_image(well, site)
        images_rows.append({"ImageNumber": number, "Metadata_Plate": "P1", "Metadata_Well": well,
                            "Metadata_Site": site, "Count_Nuclei": len(np.unique(lab)) - 1})
        for v in np.unique(lab)[1:]:
            ys, xs = np.nonzero(lab == v)
            nuclei_rows.append({"ImageNumber": number, "ObjectNumber": int(v), "AreaShape_Area": len(ys),
                                "Intensity_MeanIntensity_PH3": float(v) / 100})
    pd.DataFrame(images_rows).to_csv(tmp_path / "Image.csv", index=False)
    pd.DataFrame(nuclei_rows).to_csv(tmp_path / "Nuclei.csv", index=False)

    # the README's five lines
    pcim = pd.read_csv(run["objects"])
    image = pd.read_csv(tmp_path / "Image.csv")[["ImageNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]]
    nuclei = pd.read_csv(tmp_path / "Nuclei.csv").merge(image, on="ImageNumber")
    cells = nuclei.merge(pcim, on=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "ObjectNumber"],
                         suffixes=("", "_pcim"), validate="one_to_one")
    assert len(cells) == len(nuclei) == len(pcim)
    assert (cells["AreaShape_Area"] == cells["AreaShape_Area_pcim"]).all()
    assert cells.groupby(["Metadata_Well", "Metadata_Site"]).size().tolist() == \
        pd.DataFrame(images_rows)["Count_Nuclei"].tolist()


@pytest.mark.slow
def test_joins_with_a_pycytominer_single_cell_table_exactly(run) -> None:
    """pycytominer's single cells: Metadata_ObjectNumber and compartment-prefixed features."""
    pcim = pd.read_csv(run["objects"])
    sc = pcim[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "ObjectNumber", "AreaShape_Area"]].rename(
        columns={"ObjectNumber": "Metadata_ObjectNumber", "AreaShape_Area": "Nuclei_AreaShape_Area"})
    sc = sc.sample(frac=1.0, random_state=0).reset_index(drop=True)  # another row order
    features = pcim.rename(columns=lambda c: f"Nuclei_{c}" if c.startswith("PCIM_") else
                           {"ObjectNumber": "Metadata_ObjectNumber"}.get(c, c))
    merged = sc.merge(features, on=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"],
                      validate="one_to_one")
    assert len(merged) == len(sc) == len(pcim)
    assert (merged["Nuclei_AreaShape_Area"] == merged["AreaShape_Area"]).all()
    assert "Nuclei_PCIM_mitotic_Share" in merged.columns


@pytest.mark.slow
def test_render_outlines_the_top_objects_and_lists_them(run, tmp_path) -> None:
    proc = run_pcim("render", str(run["store"]), "--plate-yaml", str(run["yaml"]), "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(run["objects"])
    top = table[(table.Metadata_Well == "A01") & (table.Metadata_Site == 1)].nsmallest(1, "PCIM_mitotic_Rank").iloc[0]
    report = (tmp_path / "report.html").read_text()
    assert f"Nuclei {int(top.ObjectNumber)}: share {top.PCIM_mitotic_Share:.3g}" in report
    with Image.open(tmp_path / "wells" / "A01_s1.png") as img:
        pixels = np.asarray(img.convert("RGB"))
    cyan = np.all(pixels == (0, 255, 255), axis=-1)
    lab = label_image("A01", 1)
    left, top_px = drawing.GAP, 2 * drawing.GAP + 2 * drawing.LINE  # the panel's corner; drawn at 2x

    def cyan_inside(number: int) -> int:
        ys, xs = np.nonzero(lab == number)
        return int(cyan[top_px + 2 * ys.min(): top_px + 2 * ys.max() + 2, left + 2 * xs.min(): left + 2 * xs.max() + 2]
                   .sum())

    ranked = table[(table.Metadata_Well == "A01") & (table.Metadata_Site == 1)].sort_values("PCIM_mitotic_Rank")
    assert cyan_inside(int(ranked.ObjectNumber.iloc[0])) > 20  # the top nucleus is outlined
    assert cyan_inside(int(ranked.ObjectNumber.iloc[-1])) == 0  # the last one is not


# --------------------------------------------------------------------------------------------------
# bad label images, reruns


@pytest.mark.slow
def test_bad_label_images_fail_their_object_tables_only_and_come_back_when_fixed(tmp_path) -> None:
    plate_yaml = make_plate(tmp_path, ("A01", "A02", "A03"), steps=5, objects=True)
    labels = tmp_path / "labels"
    keep = tmp_path / "keep"
    shutil.copytree(labels, keep)
    (labels / "A01_s1_nuclei.tif").unlink()
    tifffile.imwrite(labels / "A02_s1_nuclei.tif", np.zeros((64, 64), np.uint16))
    (labels / "A03_s2_nuclei.tif").write_bytes((keep / "A03_s2_nuclei.tif").read_bytes()[:60])

    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr
    assert "Nuclei table failed A01 site 1 (map done)" in err and str(labels / "A01_s1_nuclei.tif") in err
    assert "A02 site 1: label image" in err and "64x64 px but its field is 128x128" in err
    assert str(labels / "A03_s2_nuclei.tif") in err and "copy it again" not in err
    main = pd.read_csv(tmp_path / "out" / "P1.csv").set_index(["Metadata_Well", "Metadata_Site"])
    assert (main["PCIM_Status"] == "done").all()  # every map is done
    bad = [("A01", 1), ("A02", 1), ("A03", 2)]
    assert main.loc[bad, "PCIM_Error"].str.startswith("Nuclei table:").all()
    assert main.loc[bad, "PCIM_Nuclei_Count"].isna().all()
    objects = pd.read_csv(tmp_path / "out" / "P1_pcim_Nuclei.csv")
    assert set(zip(objects.Metadata_Well, objects.Metadata_Site, strict=True)) == \
        {(w, s) for w in ("A01", "A02", "A03") for s in (1, 2)} - set(bad)
    maps_before = store.read_field(tmp_path / "out" / "P1.zarr", "A02", 0)

    shutil.rmtree(labels)
    shutil.copytree(keep, labels)
    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(0 fitted by this run)" in proc.stderr and "object tables (re)made" in proc.stderr
    objects = pd.read_csv(tmp_path / "out" / "P1_pcim_Nuclei.csv")
    assert len(set(zip(objects.Metadata_Well, objects.Metadata_Site, strict=True))) == 6
    maps_after = store.read_field(tmp_path / "out" / "P1.zarr", "A02", 0)
    np.testing.assert_array_equal(maps_after[0], maps_before[0])  # the map was not fitted again
    assert maps_after[2]["finished"] == maps_before[2]["finished"]
    assert maps_after[2]["objects"]["Nuclei"]["status"] == "done"

    proc = run_pcim("explain", str(plate_yaml), "--set", "explain.top_objects=1")
    assert proc.returncode == 0 and "(0 fitted by this run)" in proc.stderr
    record = store.read_record(tmp_path / "out" / "P1.zarr", "A01", 0)
    nuclei = record["objects"]["Nuclei"]
    assert nuclei["top_k"] == 1 and len(nuclei["top"]["mitotic"]["objects"]) == 1


@pytest.mark.slow
def test_validate_lists_label_images_that_fail_and_how_many_are_there(tmp_path) -> None:
    plate_yaml = make_plate(tmp_path, ("A01", "B01"), objects=True)
    (tmp_path / "labels" / "B01_s2_nuclei.tif").unlink()
    tifffile.imwrite(tmp_path / "labels" / "A01_s2_nuclei.tif", np.zeros((100, 128), np.uint16))
    proc = run_pcim("validate", str(plate_yaml))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "objects Nuclei: label images for 3 of 4 fields" in proc.stdout
    assert "B01 site 2: no label image for plate.objects.Nuclei" in proc.stdout
    assert "A01 site 2: label image" in proc.stdout and "100x128 px but its field is 128x128" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_a_bad_object_name_is_a_configuration_error(tmp_path) -> None:
    plate_yaml = make_plate(tmp_path, ("A01",))
    proc = run_pcim("explain", str(plate_yaml), "--set", "plate.objects={nu clei: 'l/{well}.tif'}")
    assert proc.returncode == 78
    assert "plate.objects: object name 'nu clei'" in proc.stderr


# --------------------------------------------------------------------------------------------------
# tiling, per-channel maps, several targets, NGFF 0.4


@pytest.mark.slow
def test_tiled_fields_cut_and_stitch_the_objects_consistently(tmp_path) -> None:
    plate_yaml = make_plate(tmp_path, ("A01",), steps=20, objects=True, model={"input_size": [64, 64]})
    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 0, proc.stderr[-3000:]
    zarr_path = tmp_path / "out" / "P1.zarr"
    record = store.read_record(zarr_path, "A01", 0)
    assert record["tiling"]["n_tiles"] == 9 and record["tiling"]["aggregate"] == "mean-logit"
    np.testing.assert_array_equal(zarr.open_group(str(zarr_path), mode="r")["A/1/0/labels/Nuclei/0"][...],
                                  label_image("A01", 1))
    table = pd.read_csv(tmp_path / "out" / "P1_pcim_Nuclei.csv")
    rows = table[(table.Metadata_Well == "A01") & (table.Metadata_Site == 1)]
    # ΔP as the issue defines it on a tiled field: delete the object in the field, run the tiles, aggregate
    model = torch.jit.load(str(tmp_path / "classifier.ts")).eval()
    x = field_x(tmp_path, "A01", 1)
    lab = torch.from_numpy(label_image("A01", 1).astype(np.int64))
    grid = tiling.plan_tiles((128, 128), (64, 64))
    deleted = mixing.substrate(x[None], "mean", 8.0)[0]

    field_model = field_maps.TiledForward(model, grid, record["tiling"]["aggregate"])  # model.aggregate

    def p_mitotic(img: torch.Tensor) -> float:
        with torch.no_grad():
            return float(torch.softmax(field_model(img[None]), 1)[0, 1])

    assert record["results"]["mitotic"]["prob_original"] == pytest.approx(p_mitotic(x), abs=1e-5)
    for row in rows.itertuples():
        gone = torch.where((lab == row.ObjectNumber)[None], deleted, x)
        assert row.PCIM_mitotic_DeltaP == pytest.approx(p_mitotic(x) - p_mitotic(gone), abs=1e-5)
    assert set(rows.nsmallest(2, "PCIM_mitotic_Rank").ObjectNumber) == positive_objects("A01", 1)


@pytest.mark.slow
def test_per_channel_maps_for_every_target_in_an_ngff_04_store(tmp_path) -> None:
    plate_yaml = make_plate(tmp_path, ("A01",), steps=10, objects=True,
                            explain={"per_channel": True, "target": "all"}, output={"format": "0.4"})
    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 0, proc.stderr[-3000:]
    zarr_path = tmp_path / "out" / "P1.zarr"
    root = zarr.open_group(str(zarr_path), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)
        image = v04.Image.from_zarr(root["A/1/1"])
        v04.ImageLabel.from_zarr(root["A/1/1/labels/Nuclei"])
    assert image.labels.attributes.labels == ["Nuclei"]
    maps, names, _ = store.read_field(zarr_path, "A01", 1)
    # the CSV's shares come from the maps in memory, the store keeps MAP_MANTISSA_BITS of each value (within
    # 2^-7 of it): a sum of stored values is within 2^-7 of the exact sum, relative
    rounded = 2.0 ** -(store.MAP_MANTISSA_BITS + 1)
    main = pd.read_csv(tmp_path / "out" / "P1.csv").set_index(["Metadata_Site", "PCIM_Target"])
    for target in ("negative", "mitotic"):
        planes = [names.index(f"{target}:{c}") for c in ("DNA", "PH3", "Actin")]
        sums = maps[planes].sum(axis=(1, 2))
        got = main.loc[(2, target), ["PCIM_Share_DNA", "PCIM_Share_PH3", "PCIM_Share_Actin"]].to_numpy(float)
        np.testing.assert_allclose(got, sums / sums.sum(), rtol=rounded)
    table = pd.read_csv(tmp_path / "out" / "P1_pcim_Nuclei.csv")
    site2 = table[table.Metadata_Site == 2]
    lab = label_image("A01", 2)
    for target in ("negative", "mitotic"):
        assert site2[f"PCIM_{target}_Rank"].notna().all()  # both targets are column groups of every row
        planes = [names.index(f"{target}:{c}") for c in ("DNA", "PH3", "Actin")]
        first = site2.nsmallest(1, f"PCIM_{target}_Rank").iloc[0]
        inside = maps[planes][:, lab == first.ObjectNumber].sum(axis=1)
        np.testing.assert_allclose(first[[f"PCIM_{target}_Share_{c}" for c in ("DNA", "PH3", "Actin")]]
                                   .to_numpy(float), inside / inside.sum(), rtol=rounded)
        assert first[f"PCIM_{target}_Sum"] == pytest.approx(inside.sum(), rel=rounded)


@pytest.mark.slow
def test_a_plate_without_objects_writes_no_object_tables(tmp_path) -> None:
    plate_yaml = make_plate(tmp_path, ("A04",), steps=5)
    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["P1.csv", "P1.zarr"]
    assert "labels" not in zarr.open_group(str(tmp_path / "out" / "P1.zarr"), mode="r")["A/4/0"]
    main = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert {"PCIM_Share_DNA", "PCIM_Share_PH3", "PCIM_Share_Actin"} <= set(main.columns)
    assert not any(c.startswith("PCIM_Nuclei") for c in main.columns)
    assert yaml.safe_load(plate_yaml.read_text())["plate"].get("objects") is None
