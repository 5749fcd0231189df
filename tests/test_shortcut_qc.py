"""run/shortcut_qc.py: a field's shares and `qc` record entry from its map, image, labels and raw counts."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from pcim_cli.engine import tiling
from pcim_cli.io import summary
from pcim_cli.run import shortcut_qc


def _field():
    x = torch.zeros(2, 32, 32)
    x[0, 10:20, 10:20] = 1.0  # one bright square in channel 0: the automatic foreground
    maps = torch.zeros(1, 32, 32)
    maps[0, 15, 15] = 3.0  # on the square
    maps[0, 0, 0] = 1.0  # in the corner: border, background
    return x, maps


def test_measure_with_the_automatic_foreground():
    x, maps = _field()
    qc = shortcut_qc.QcTask(foreground_channel=0, foreground_name="DNA", border=0.1)
    grid = tiling.plan_tiles((32, 32), None)
    found, entry = shortcut_qc.measure(maps, ["mitotic"], x, None, None, grid, qc, label_files={}, labels={},
                                       where="A01 site 1")
    assert found == {"mitotic": {"objects": 0.75, "background": 0.25, "border": 0.25, "saturated": None,
                                 "seams": None}}
    assert entry["objects"]["source"] == "foreground" and entry["objects"]["channel"] == "DNA"
    assert "Otsu" in entry["objects"]["method"]
    assert entry["border_px"] == 3 and entry["areas"]["seams"] is None


def test_measure_with_labels_saturation_and_seams(tmp_path):
    x, maps = _field()
    lab = np.zeros((32, 32), np.uint16)
    lab[0, 0] = 5  # the labelled object is the corner pixel, not the square
    path = tmp_path / "A01_s1_nuclei.tif"
    tifffile.imwrite(path, lab)
    raw = np.full((2, 32, 32), 100, np.float32)
    raw[1, 15, 15] = raw[1, 15, 16] = 4095  # a flat top at the 12-bit ceiling
    qc = shortcut_qc.QcTask(objects="Nuclei", foreground_name="DNA", border=0.1)
    saturated, levels = shortcut_qc.saturation_mask(raw, qc)
    assert levels == [None, 4095.0] and int(saturated.sum()) == 2
    grid = tiling.plan_tiles((32, 32), (16, 16), (0, 0))  # 2 x 2 tiles without overlap: seams at 14-17
    found, entry = shortcut_qc.measure(maps, ["mitotic"], x, saturated, levels, grid, qc,
                                       label_files={"Nuclei": str(path)}, labels={}, where="A01 site 1")
    shares = found["mitotic"]
    assert shares["objects"] == 0.25  # the corner pixel, dilated 3 px, does not reach (15, 15)
    assert shares["saturated"] == 0.75 and shares["seams"] == 0.75
    assert entry["objects"] == {"source": "labels", "kind": "Nuclei", "dilate_px": 3}
    assert entry["saturation_levels"] == [None, 4095.0]


def test_a_missing_label_image_falls_back_to_the_foreground(tmp_path, caplog):
    x, maps = _field()
    qc = shortcut_qc.QcTask(objects="Nuclei", foreground_name="DNA")
    found, entry = shortcut_qc.measure(maps, ["mitotic"], x, None, None, tiling.plan_tiles((32, 32), None), qc,
                                       label_files={"Nuclei": str(tmp_path / "gone.tif")}, labels={},
                                       where="A01 site 1")
    assert entry["objects"]["source"] == "foreground"
    assert "gone.tif" in entry["objects"]["note"] and "gone.tif" in caplog.text
    assert found["mitotic"]["objects"] == pytest.approx(0.75)


def test_record_and_csv_cells():
    record = {"site": 1, "results": {"mitotic": {"fit": "ok"}}}
    shortcut_qc.update_record(record, {"mitotic": {"objects": 0.6, "background": 0.4, "border": 0.1,
                                                   "saturated": 0.0, "seams": None}}, {"border_px": 6})
    assert record["qc"] == {"border_px": 6}
    (row,) = summary.rows_from_record("P1", "A01", "A/1/0", record)
    cells = {k: v for k, v in row.items() if k in summary.SHORTCUT_COLUMNS.values()}
    assert list(cells) == ["PCIM_Share_OnObjects", "PCIM_Share_Background", "PCIM_Share_Border",
                           "PCIM_Share_Saturated"]  # Seams only for tiled fields
    assert cells["PCIM_Share_Background"] == 0.4
    (plain,) = summary.rows_from_record("P1", "A01", "A/1/0", {"site": 1, "results": {"mitotic": {"fit": "ok"}}})
    assert not set(plain) & set(summary.SHORTCUT_COLUMNS.values())  # qc off: no columns


def test_qc_task_from_plate_yaml(tmp_path):
    from pcim_cli.config import config_from_data

    data = {"plate": {"name": "P", "images": ".", "channels": ["DNA", "PH3"],
                      "objects": {"Nuclei": "labels/{well}_s{field}.tif"}},
            "model": {"path": "m.ts", "normalize": {"method": "fixed", "min": 0, "max": 4000}},
            "qc": {"foreground_channel": "PH3", "border": 0.1, "saturation": [4095, None]}}
    qc = shortcut_qc.qc_task(config_from_data(data, tmp_path / "plate.yaml"))
    assert qc.objects == "Nuclei" and qc.foreground_channel == 1 and qc.foreground_name == "PH3"
    assert qc.border == 0.1 and qc.saturation == (4095.0, None) and qc.clip_at == (4000.0, 4000.0)
    off = config_from_data({**data, "qc": {"enabled": False}}, tmp_path / "plate.yaml")
    assert shortcut_qc.qc_task(off) is None


@pytest.mark.parametrize(("normalize", "clip_at"), [
    ({"method": "fixed", "min": [0, 10], "max": [4000, 900]}, (4000.0, 900.0)),  # one max per channel
    ({"method": "fixed", "min": 0, "max": 4000, "clip": False}, None),  # a bioimage.io scale: nothing clipped
    ({"method": "zscore"}, None),
])
def test_qc_clip_level_follows_the_normalisation(tmp_path, normalize, clip_at):
    from pcim_cli.config import config_from_data

    data = {"plate": {"name": "P", "images": ".", "channels": ["DNA", "PH3"]},
            "model": {"path": "m.ts", "normalize": normalize}}
    assert shortcut_qc.qc_task(config_from_data(data, tmp_path / "plate.yaml")).clip_at == clip_at


@pytest.mark.parametrize(("qc", "channels", "path", "says"), [
    ({"objects": "Cells"}, ["DNA"], "qc.objects", "Nuclei"),
    ({"foreground_channel": "DAPI"}, ["DNA"], "qc.foreground_channel", "DNA"),
    ({"saturation": [4095]}, ["DNA", "PH3"], "qc.saturation", "one per channel"),
    ({}, ["DNA", "Border"], "plate.channels", "rename the channel"),
])
def test_qc_keys_are_checked_against_the_plate(tmp_path, qc, channels, path, says):
    from pcim_cli.config import config_from_data
    from pcim_cli.errors import ConfigError

    data = {"plate": {"name": "P", "images": ".", "channels": channels,
                      "objects": {"Nuclei": "labels/{well}_s{field}.tif"}},
            "model": {"path": "m.ts"}, "qc": qc}
    with pytest.raises(ConfigError) as err:
        config_from_data(data, tmp_path / "plate.yaml")
    assert path in str(err.value) and says in str(err.value)
