"""`pcim validate`: every problem `pcim explain` would hit, found without fitting or writing (issue 13),
through the installed console script."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cli_runner import run_pcim
from PIL import Image
from plates import DEMO, make_plate


def out(plate: Path) -> tuple[Path, Path]:
    return plate.parent / "out" / "P1.zarr", plate.parent / "out" / "P1.csv"


# --------------------------------------------------------------------------------------------------
# validate opens the images


def _damage_for_validate(images: Path) -> None:
    (images / "A01_s1_w2.tif").write_bytes(b"")  # 0 bytes
    data = (images / "A02_s1_w2.tif").read_bytes()
    (images / "A02_s1_w2.tif").write_bytes(data[: len(data) // 3])  # truncated
    Image.fromarray(tifffile.imread(images / "A03_s1_w2.tif").astype(np.uint8)).save(images / "A03_s1_w2.tif",
                                                                                  format="PNG")
    for c in (1, 2, 3):  # a field of another size than its siblings
        tifffile.imwrite(images / f"B01_s1_w{c}.tif", tifffile.imread(images / f"B01_s1_w{c}.tif")[:100])
    plane = tifffile.imread(images / "B02_s1_w2.tif").astype(np.float32)
    plane[3:5, 3:5] = np.nan
    tifffile.imwrite(images / "B02_s1_w2.tif", plane)  # NaN pixels


@pytest.mark.slow
def test_validate_lists_every_problem_explain_would_hit_with_the_same_messages(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "A03", "B01", "B02", "B03"), steps=2)
    _damage_for_validate(tmp_path / "images")
    checked = run_pcim("validate", str(plate), "--json")
    assert checked.returncode == 3, checked.stderr[-2000:]
    found = json.loads(checked.stdout)
    assert not (tmp_path / "out").exists()

    ran = run_pcim("explain", str(plate))
    assert ran.returncode == 3
    table = pd.read_csv(out(plate)[1])
    failed = table[table["PCIM_Status"] == "failed"]
    assert sorted(failed["Metadata_Well"]) == ["A01", "A02", "A03", "B01", "B02"]
    for error in failed["PCIM_Error"]:
        assert error in found["problems"], f"validate did not report: {error}"


@pytest.mark.slow
def test_validate_exits_65_when_no_field_is_usable(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    for path in (tmp_path / "images").glob("*_w2.tif"):
        path.write_bytes(b"")
    proc = run_pcim("validate", str(plate))
    assert proc.returncode == 65, proc.stdout + proc.stderr
    assert "A01_s1_w2.tif is empty" in proc.stdout and "A01_s2_w2.tif is empty" in proc.stdout


@pytest.mark.slow
def test_validate_reports_the_demo_plate_and_writes_nothing(tmp_path):
    plate = tmp_path / "plate"
    shutil.copytree(DEMO, plate, ignore=shutil.ignore_patterns("out", "*.py"))
    proc = run_pcim("validate", str(plate / "plate.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "24 wells, 48 fields" in proc.stdout and "negative, mitotic" in proc.stdout
    assert not (plate / "out").exists()


def test_validate_json_lists_problems_and_exits_3(tmp_path):
    (tmp_path / "images").mkdir()
    for f in (DEMO / "images").glob("A01_*"):
        shutil.copy(f, tmp_path / "images" / f.name)
    (tmp_path / "images" / "A01_s2_w2.tif").unlink()  # field 2 of A01 loses its PH3 channel
    cfg = (DEMO / "plate.yaml").read_text().replace("layout: layout.csv", "layout: null")
    (tmp_path / "plate.yaml").write_text(cfg.replace("path: classifier.ts", f"path: {DEMO / 'classifier.ts'}"))
    proc = run_pcim("validate", str(tmp_path / "plate.yaml"), "--json")
    assert proc.returncode == 3, proc.stderr
    found = json.loads(proc.stdout)
    assert found["wells"] == 1 and found["fields"] == 1
    assert any("A01 field 2" in p and "PH3" in p for p in found["problems"])


def test_validate_refuses_a_bad_config_with_78(tmp_path):
    proc = run_pcim("validate", str(DEMO / "plate.yaml"), "--set", "compute.batch_size=0")
    assert proc.returncode == 78
    assert "compute.batch_size" in proc.stderr


@pytest.mark.parametrize("key", ["model.path", "explain.explainer"])
def test_validate_names_a_missing_model_or_explainer_file_with_78(tmp_path: Path, key: str) -> None:
    """A model.path or explain.explainer that does not exist is the documented configuration error (78)
    naming the file, never an internal error from hashing it (regression: both crashed in run/device.py)."""
    yaml_path = make_plate(tmp_path, wells=("A01",))
    extra = ["--set", "explain.method=pcim-amortised"] if key == "explain.explainer" else []
    proc = run_pcim("validate", str(yaml_path), "--set", f"{key}={tmp_path / 'nope.pt'}", *extra)
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "nope.pt" in proc.stderr and "internal error" not in proc.stderr
