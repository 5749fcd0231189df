"""Issue 22 (trust, round 2), `pcim validate`: it finds the label images `pcim explain` rejects (float
labels with fractions, negative values, a 2-page stack), with the message explain writes; its plan counts
only the fields it found usable; and it accepts a screen file, as explain does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
import yaml
from cli_runner import run_pcim
from plates import make_plate

from pcim_cli.io import store


def _break_labels(labels: Path) -> dict[tuple[str, int], str]:
    """Three label images explain refuses; returns (well, site) -> the file."""
    good = tifffile.imread(labels / "A01_s1_nuclei.tif").astype(np.int32)
    tifffile.imwrite(labels / "A01_s1_nuclei.tif", good.astype(np.float32) + 0.5)  # fractions: a probability map
    negative = good.copy()
    negative[0, 0] = -3
    tifffile.imwrite(labels / "A01_s2_nuclei.tif", negative)
    tifffile.imwrite(labels / "A02_s1_nuclei.tif", np.stack([good, good]).astype(np.uint16))  # 2 pages
    return {("A01", 1): "A01_s1_nuclei.tif", ("A01", 2): "A01_s2_nuclei.tif", ("A02", 1): "A02_s1_nuclei.tif"}


def test_validate_finds_the_label_images_explain_rejects_with_explains_message(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"), steps=2, objects=True)
    broken = _break_labels(tmp_path / "labels")
    proc = run_pcim("validate", str(plate), "--json", "--no-probe")
    assert proc.returncode == 3, proc.stderr[-2000:]
    problems = json.loads(proc.stdout)["problems"]
    assert json.loads(proc.stdout)["objects"] == {"Nuclei": 4}  # label files found for every field
    assert "truncated" not in " ".join(problems)

    run = run_pcim("explain", str(plate))
    assert run.returncode == 3, run.stderr[-2000:]
    for (well, site), name in broken.items():
        record = store.read_record(tmp_path / "out" / "P1.zarr", well, site - 1)
        error = record["objects"]["Nuclei"]["error"]  # what explain wrote
        assert name in error
        assert any(p.startswith(error) for p in problems), (error, problems)


def test_validates_plan_counts_only_the_usable_fields(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"), steps=2)
    image = tmp_path / "images" / "A02_s2_w1.tif"
    image.write_bytes(image.read_bytes()[:300])  # truncated
    proc = run_pcim("validate", str(plate), "--json", "--no-probe")
    assert proc.returncode == 3, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["usable"] == 3 and len(doc["problems"]) == 1
    assert doc["plan"]["maps"] == 3 and sum(s["fields"] for s in doc["plan"]["sizes"]) == 3


def test_validate_accepts_a_screen_file(tmp_path: Path) -> None:
    for name in ("P1", "P2"):
        make_plate(tmp_path / name, wells=("A01",), steps=2, plate={"name": name})
    screen = tmp_path / "screen.yaml"
    screen.write_text(yaml.safe_dump({"explain": {"steps": 3}, "plates": ["P1/plate.yaml", "P2/plate.yaml"]}))
    proc = run_pcim("validate", str(screen), "--json", "--no-probe")
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout
    doc = json.loads(proc.stdout)
    assert [(p["plate"], p["exit_code"], p["usable"]) for p in doc["plates"]] == [("P1", 0, 2), ("P2", 0, 2)]
    text = run_pcim("validate", str(screen), "--no-probe")
    assert text.returncode == 0 and "plate P1" in text.stdout and "plate P2" in text.stdout
    assert not (tmp_path / "P1" / "out").exists()  # validate wrote nothing
