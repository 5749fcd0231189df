"""`pcim validate` and `pcim schema` through the installed console script."""

from __future__ import annotations

import json
import shutil

from test_demo_end_to_end import DEMO, run_pcim


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


def test_schema_is_json_schema_that_rejects_unknown_keys():
    proc = run_pcim("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert set(schema["properties"]) == {"plate", "model", "explain", "compute", "output"}
    assert schema["additionalProperties"] is False


def test_init_writes_a_commented_template_that_validates_once_filled_in(tmp_path):
    target = tmp_path / "new" / "plate.yaml"
    proc = run_pcim("init", str(target))
    assert proc.returncode == 0, proc.stderr
    text = target.read_text()
    assert text.count("FILL IN") == 3 and "# tokens: {well}" in text
    filled = run_pcim("validate", str(target), "--set", f"plate.images={DEMO / 'images'}",
                      "--set", "plate.pattern={well}_s{field}_w{channel}.tif",
                      "--set", f"model.path={DEMO / 'classifier.ts'}")
    assert filled.returncode == 0, filled.stderr
    assert "24 wells, 48 fields, channels DNA, PH3, Actin" in filled.stdout
    again = run_pcim("init", str(target))  # never overwrites silently
    assert again.returncode == 65 and "exists" in again.stderr and "--force" in again.stderr
    assert run_pcim("init", str(target), "--force").returncode == 0
