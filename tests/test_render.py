"""`pcim render` on a real store: PNG overlays, plate montage, report.html (checked in headless Chromium),
and the store opening as a plate grid in napari-ome-zarr's reader (and ome-zarr's, which napari used to call)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cli_runner import run_pcim
from PIL import Image
from plates import DEMO, explain_demo

from pcim_cli.errors import ConfigError, InputDataError
from pcim_cli.io import store
from pcim_cli.report import drawing, render
from pcim_cli.report import objects as report_objects

WELLS = ["A01", "B03", "C02"]  # on a 12-well grid (3 x 4): the montage shows 9 empty wells
FIELD = 128  # demo fields are 128 x 128 px
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """Three demo wells (two fields each), 20 steps, NGFF 0.5; the CSV lies beside it as demo.csv."""
    return explain_demo(tmp_path_factory.mktemp("render"), WELLS)


@pytest.fixture(scope="module")
def rendered(demo_store, tmp_path_factory) -> render.RenderResult:
    return render.render(demo_store, out_dir=tmp_path_factory.mktemp("pictures"), plate_yaml=DEMO / "plate.yaml")


def overlay_size(n_panels: int) -> tuple[int, int]:
    """A 128 px field is drawn at 2x (MIN_PANEL) with a colour bar, under two text lines."""
    panel = drawing.MIN_PANEL + drawing.BAR + drawing.BAR_TEXT + 2 * drawing.GAP
    return drawing.GAP + n_panels * panel, drawing.MIN_PANEL + 2 * drawing.LINE + 3 * drawing.GAP


# --------------------------------------------------------------------------------------------------
# files


@pytest.mark.slow
def test_render_writes_one_overlay_per_field_montage_and_report(rendered):
    names = sorted(p.name for p in rendered.overlays)
    assert names == sorted(f"{w}_s{s}.png" for w in WELLS for s in (1, 2))
    assert rendered.montage.is_file() and rendered.report.is_file()
    assert rendered.csv is not None and rendered.csv.name == "demo.csv"  # found beside the store
    assert rendered.skipped == []


@pytest.mark.slow
def test_overlays_read_back_at_the_expected_size_with_a_map_over_the_cells(rendered):
    for png in rendered.overlays:
        with Image.open(png) as img:
            assert img.mode == "RGB" and img.size == overlay_size(1)
            pixels = np.asarray(img)
        top = 2 * drawing.LINE + 2 * drawing.GAP
        field = pixels[top: top + drawing.MIN_PANEL, drawing.GAP: drawing.GAP + drawing.MIN_PANEL]
        assert field.std() > 5  # not blank
        colourful = np.ptp(field.astype(int), axis=2) > 40  # the heat map's colours; the cells are grey
        assert 0 < colourful.mean() < 0.9


def test_per_channel_draws_one_panel_per_raw_channel(demo_store, tmp_path):
    result = render.render(demo_store, out_dir=tmp_path, wells=["B03"], plate_yaml=DEMO / "plate.yaml",
                           per_channel=True)
    assert [p.name for p in result.overlays] == ["B03_s1.png", "B03_s2.png"]
    with Image.open(result.overlays[0]) as img:
        assert img.size == overlay_size(3)  # DNA, PH3, Actin


def test_without_plate_yaml_the_map_is_drawn_alone(demo_store, tmp_path):
    result = render.render(demo_store, out_dir=tmp_path, wells=["a1"])
    with Image.open(result.overlays[0]) as img:
        field = np.asarray(img)[2 * drawing.LINE + 2 * drawing.GAP:, drawing.GAP: drawing.GAP + drawing.MIN_PANEL]
    lut = {tuple(c) for c in drawing.heat_lut()}
    field = field[: drawing.MIN_PANEL]
    in_lut = np.array([[tuple(c) in lut for c in line] for line in field])
    # the demo's plate.objects: its top nuclei are outlined and numbered; nothing else is off the colour map
    outline = np.zeros(field.shape[:2], bool)
    for colour in report_objects.OUTLINE_COLOURS:
        outline |= np.all(field == colour, axis=-1)
    ys, xs = np.nonzero(outline)
    near = np.zeros_like(outline)
    for y, x in zip(ys, xs, strict=True):
        near[max(0, y - 12): y + 13, max(0, x - 12): x + 13] = True
    assert not (~in_lut & ~near).any()  # every pixel is a colour of the map, no grey cells
    assert in_lut.mean() > 0.95


@pytest.mark.slow
def test_montage_is_the_plate_grid_with_empty_wells_grey(rendered):
    with Image.open(rendered.montage) as img:
        pixels = np.asarray(img)
        width, height = img.size
    rows, cols = 3, 4  # A01, B03, C02 -> smallest standard plate holding them: 12 wells
    assert height == 40 + rows * (drawing.CELL + 2) + 2 + drawing.GAP
    assert width > 28 + cols * (drawing.CELL + 2)

    def cell_centre(row: int, col: int) -> tuple[int, int, int]:
        y = 40 + 2 + row * (drawing.CELL + 2) + drawing.CELL // 2
        x = 28 + 2 + col * (drawing.CELL + 2) + drawing.CELL // 2
        return tuple(int(v) for v in pixels[y - 10: y + 10, x - 10: x + 10].reshape(-1, 3).mean(axis=0).round())

    assert cell_centre(0, 1) == drawing.EMPTY_GREY  # A02: not in the store
    assert cell_centre(3 - 1, 3) == drawing.EMPTY_GREY  # C04
    assert cell_centre(0, 0) != drawing.EMPTY_GREY  # A01 has a map


@pytest.mark.slow
def test_report_has_the_csv_numbers_settings_and_relative_images(rendered):
    text = rendered.report.read_text(encoding="utf-8")
    sources = re.findall(r'<img[^>]* src="([^"]+)"', text)
    # the overlays, the montage, and shortcuts.png where the shortcut QC ran (qc on: the default)
    assert len(sources) == len(rendered.overlays) + 1 + (rendered.shortcuts is not None)
    for src in sources:
        assert not src.startswith(("/", "file:")) and (rendered.out_dir / src).is_file()
    table = pd.read_csv(rendered.csv)
    assert len(table) == 6
    for value in table["PCIM_DeletionAUC"]:
        assert f"{value:.4g}" in text
    assert "nocodazole" in text or "DMSO" in text  # layout annotation from the CSV
    assert "<td>engine.steps</td><td>20</td>" in text
    assert "<td>normalize.method</td><td>percentile</td>" in text
    assert "Plate DEMO01" in text


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: bash scripts/install_chromium.sh)")
def test_report_opens_in_headless_chromium_with_every_image_loaded(rendered):
    """A copy of the report beside it (so relative paths resolve) reports its images' state into the DOM."""
    check = rendered.out_dir / "report_check.html"
    script = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
              " const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);"
              " const d = document.createElement('div'); d.id = 'imgcheck';"
              " d.textContent = 'images ' + imgs.length + ' broken ' + bad.length + ' ' + bad.join(' ');"
              " document.body.appendChild(d); });</script>")
    check.write_text(rendered.report.read_text(encoding="utf-8").replace("</body>", script + "</body>"),
                     encoding="utf-8")
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=10000",
                           "--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<div id="imgcheck">images (\d+) broken (\d+)([^<]*)</div>', proc.stdout)
    assert found, f"no result in the DOM; chromium said: {proc.stderr[-2000:]}"
    assert int(found.group(1)) == len(rendered.overlays) + 1 + (rendered.shortcuts is not None)
    assert found.group(2) == "0", f"images that did not load: {found.group(3)}"


# --------------------------------------------------------------------------------------------------
# CLI and errors


def test_cli_render_prints_the_written_paths_as_json(demo_store, tmp_path):
    proc = run_pcim("render", str(demo_store), "--wells", "C02,A01", "--plate-yaml", str(DEMO / "plate.yaml"),
                    "--channel", "Actin", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert sorted(Path(p).name for p in doc["overlays"]) == ["A01_s1.png", "A01_s2.png", "C02_s1.png",
                                                             "C02_s2.png"]
    assert Path(doc["report"]) == tmp_path / "report.html" and (tmp_path / "montage.png").is_file()


def test_cli_unknown_well_is_a_configuration_error(demo_store, tmp_path):
    proc = run_pcim("render", str(demo_store), "--wells", "A01,D06", "--out", str(tmp_path))
    assert proc.returncode == 78
    assert "D06 is not in the store" in proc.stderr and "A01, B03, C02" in proc.stderr


def test_cli_missing_store_names_the_path_and_the_fix(tmp_path):
    proc = run_pcim("render", str(tmp_path / "nothing.zarr"))
    assert proc.returncode == 65
    assert str(tmp_path / "nothing.zarr") in proc.stderr and "pcim explain" in proc.stderr


def test_a_folder_that_is_no_pcim_plate_is_an_input_error(tmp_path):
    with pytest.raises(InputDataError, match="not a Zarr group"):
        render.render(tmp_path)
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(InputDataError, match="not an OME-Zarr HCS plate"):
        render.render(tmp_path / "g.zarr")
    store.create_plate(tmp_path / "empty.zarr", "P1", {"A01": 1})  # a plate whose fields were never written
    with pytest.raises(InputDataError, match="no well of .*empty.zarr has a complete pcim map"):
        render.render(tmp_path / "empty.zarr", out_dir=tmp_path / "pics")
    assert not (tmp_path / "pics").exists()


def test_channel_needs_the_plate_yaml_and_must_be_a_plate_channel(demo_store, tmp_path):
    with pytest.raises(ConfigError, match="--plate-yaml"):
        render.render(demo_store, out_dir=tmp_path, wells=["A01"], channel="DNA")
    with pytest.raises(ConfigError, match="DNA, PH3, Actin"):
        render.render(demo_store, out_dir=tmp_path, wells=["A01"], plate_yaml=DEMO / "plate.yaml", channel="GFP")


def test_without_a_csv_the_report_takes_the_numbers_from_the_records(demo_store, tmp_path):
    assert render.find_csv(tmp_path / "x.zarr", "P1", None) is None
    beside = demo_store.with_suffix(".csv")
    assert render.find_csv(tmp_path / "x.zarr", "P1", None, suggested=beside) == beside  # plate.yaml's output.csv
    with pytest.raises(InputDataError, match="--csv"):
        render.find_csv(demo_store, "DEMO01", tmp_path / "missing.csv")
    plate = render.open_plate(demo_store)
    fields = [render.read_level(plate, "A01", rel, level=2) for rel in render.field_paths(plate, "A01")]
    assert [f.maps.shape for f in fields] == [(1, FIELD // 4, FIELD // 4)] * 2
    rows = render.records_table(plate, fields)
    assert list(rows["Metadata_Site"]) == [1, 2] and rows["PCIM_DeletionAUC"].between(0, 1).all()
    # the same record -> row mapping as the CSV (io/summary.py): every CSV column but the layout's
    csv_columns = pd.read_csv(demo_store.with_suffix(".csv")).columns
    assert [c for c in csv_columns if not c.startswith("Metadata_") or c in rows.columns] == list(rows.columns)
    assert {"PCIM_Share_DNA", "PCIM_Share_PH3", "PCIM_Share_Actin"} <= set(rows.columns)


def test_levels_match_the_full_resolution_maps(demo_store):
    plate = render.open_plate(demo_store)
    full, _, record = store.read_field(demo_store, "B03", 1)
    fld = render.read_level(plate, "B03", "B/3/1", level=1)
    assert fld.record == record and fld.site == record["site"]
    # the store keeps MAP_MANTISSA_BITS (6) of every level: each stored value is within 2^-7 of its exact
    # value, so a level and the mean of the stored full-resolution pixels differ by at most ~2 x 2^-7
    rtol = 2.0 ** -store.MAP_MANTISSA_BITS
    np.testing.assert_allclose(fld.maps, full.reshape(1, 64, 2, 64, 2).mean(axis=(2, 4)), rtol=rtol, atol=1e-7)


def oklab_lightness(rgb: np.ndarray) -> np.ndarray:
    """OKLab lightness (Björn Ottosson's matrices) of sRGB colours in [0, 1]: a perceptual scale, so the
    test checks what a reader sees, whichever library makes the colour map."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    lms = np.cbrt(linear @ np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                                     [0.2119034982, 0.6806995451, 0.1073969566],
                                     [0.0883024619, 0.2817188376, 0.6299787005]]).T)
    return lms @ np.array([0.2104542553, 0.7936177850, -0.0040720468])


def test_heat_lut_rises_in_lightness():
    lut = drawing.heat_lut()
    lightness = oklab_lightness(lut / 255.0)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert np.all(np.diff(lightness) > -1e-3) and lightness[-1] - lightness[0] > 0.7


# --------------------------------------------------------------------------------------------------
# viewers


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # napari / npe2 on pydantic 2
def test_store_opens_as_a_plate_in_napari_ome_zarr(demo_store):
    """napari-ome-zarr's reader (what `napari --plugin napari-ome-zarr` calls), no GUI needed."""
    reader_mod = pytest.importorskip("napari_ome_zarr._reader",
                                     reason="napari-ome-zarr is not installed (pip install -e '.[test]')")
    reader = reader_mod.napari_get_reader(str(demo_store))
    assert reader is not None
    layers = reader(str(demo_store))
    assert [kind for _, _, kind in layers] == ["image", "labels"]  # the maps, and the demo's plate.objects nuclei
    data, meta, kind = layers[0]
    assert kind == "image" and meta["channel_axis"] == 0 and meta["name"] == ["0: mitotic"]
    # rows A-C and columns 1-3 of the plate metadata, one 128 px field per well, 3 pyramid levels
    assert [d.shape for d in data] == [(1, 3 * FIELD, 3 * FIELD), (1, 3 * FIELD // 2, 3 * FIELD // 2),
                                       (1, 3 * FIELD // 4, 3 * FIELD // 4)]
    grid = np.asarray(data[0])
    a01, _, _ = store.read_field(demo_store, "A01", 0)
    np.testing.assert_array_equal(grid[:, :FIELD, :FIELD], a01)  # A01 top left
    c02, _, _ = store.read_field(demo_store, "C02", 0)
    np.testing.assert_array_equal(grid[:, 2 * FIELD:, FIELD: 2 * FIELD], c02)
    assert not grid[:, :FIELD, FIELD: 2 * FIELD].any()  # A02: empty well
    nuclei = np.asarray(layers[1][0][0])  # the nuclei label images on the same plate grid
    assert nuclei.shape == (3 * FIELD, 3 * FIELD)
    np.testing.assert_array_equal(nuclei[:FIELD, :FIELD], tifffile.imread(DEMO / "labels" / "A01_s1_nuclei.tif"))


@pytest.mark.slow
def test_store_opens_as_a_plate_in_ome_zarr_reader(demo_store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader

    nodes = list(Reader(parse_url(str(demo_store)))())
    assert any(isinstance(spec, Plate) for spec in nodes[0].specs)
    assert nodes[0].data[0].shape == (1, 3 * FIELD, 3 * FIELD)
    assert nodes[0].metadata["channel_names"] == ["mitotic"]


@pytest.mark.slow
def test_render_reads_an_ngff_04_store(tmp_path):
    zarr_path = explain_demo(tmp_path, ["D06"], "--set", "output.format=0.4")
    assert (zarr_path / ".zgroup").is_file()
    result = render.render(zarr_path, out_dir=tmp_path / "pics")
    assert [p.name for p in result.overlays] == ["D06_s1.png", "D06_s2.png"]
    with Image.open(result.montage) as img:
        assert img.size[1] == 40 + 4 * (drawing.CELL + 2) + 2 + drawing.GAP  # D06: a 24-well grid
