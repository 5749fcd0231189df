"""Fields the model cannot score (issue 13): blank fields, NaN logits, a model that raises or needs a
larger input, exit 78 when every failure is the model's; real TorchScript models (tests/model_factory.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cli_runner import run_pcim
from model_factory import make_model
from plates import make_plate
from truth import assert_consistent

WELLS = ("A01", "A02")


def out(plate: Path) -> tuple[Path, Path]:
    return plate.parent / "out" / "P1.zarr", plate.parent / "out" / "P1.csv"


# --------------------------------------------------------------------------------------------------
# fields the model cannot score


def _blank(images: Path, stem: str, value: int = 0) -> None:
    for c in (1, 2, 3):
        path = images / f"{stem}_w{c}.tif"
        tifffile.imwrite(path, np.full_like(tifffile.imread(path), value))


@pytest.mark.slow
def test_a_blank_field_the_model_cannot_score_fails_alone_and_the_csv_agrees_with_the_store(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, compute={"batch_size": 1},
                       model={"path": "standardise.ts"})
    make_model("standardise", tmp_path / "standardise.ts")
    _blank(tmp_path / "images", "A02_s1")
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 3, proc.stderr[-2000:]
    table = pd.read_csv(out(plate)[1])
    bad = table[(table["Metadata_Well"] == "A02") & (table["Metadata_Site"] == 1)]
    assert list(bad["PCIM_Status"]) == ["failed"]
    error = bad["PCIM_Error"].iloc[0]
    assert "standardise.ts" in error and "non-finite" in error and "blank or constant" in error
    assert (table.drop(bad.index)["PCIM_Status"] == "done").all() and len(table) == 4
    states = assert_consistent(*out(plate))
    assert states == {"A/1/0": "done", "A/1/1": "done", "A/2/0": "failed", "A/2/1": "done"}


@pytest.mark.slow
def test_nan_logits_fail_the_fields_naming_the_model_and_exit_78_when_all_fail(tmp_path: Path) -> None:
    """A model with a statistic across the batch: NaN logits for one image, finite for two (the probe)."""
    plate = make_plate(tmp_path, wells=WELLS, steps=2, model={"path": "batch-std.ts"})
    make_model("batch-std", tmp_path / "batch-std.ts")
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 78, proc.stderr[-2000:]
    table = pd.read_csv(out(plate)[1])
    assert (table["PCIM_Status"] == "failed").all() and len(table) == 4
    assert table["PCIM_Error"].str.contains("batch-std.ts").all()
    assert table["PCIM_Error"].str.contains("non-finite").all()
    assert set(assert_consistent(*out(plate)).values()) == {"failed"}


def test_a_model_returning_nan_is_refused_when_it_is_loaded(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, model={"path": "nan.ts"})
    make_model("always-nan", tmp_path / "nan.ts")
    proc = run_pcim("validate", str(plate))
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "nan.ts" in proc.stderr and "non-finite" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["model raises", "input_size larger than the fields"])
def test_exit_78_when_every_field_failed_because_of_the_model(tmp_path: Path, cause: str) -> None:
    if cause == "model raises":
        plate = make_plate(tmp_path, wells=WELLS, steps=2, model={"path": "only64.ts"})
        make_model("only-64", tmp_path / "only64.ts")
        proc = run_pcim("explain", str(plate))
        assert "exported for 64 x 64 inputs" in proc.stderr
    else:
        plate = make_plate(tmp_path, wells=WELLS, steps=2)
        proc = run_pcim("explain", str(plate), "--set", "model.input_size=[256, 256]")
        assert "set model.input_size to at most the field size" in proc.stderr
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert (pd.read_csv(out(plate)[1])["PCIM_Status"] == "failed").all()


@pytest.mark.slow
def test_a_constant_field_gets_a_warning_in_its_row(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    _blank(tmp_path / "images", "A01_s2", value=300)
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out(plate)[1], keep_default_na=False)
    row = table[(table["Metadata_Well"] == "A01") & (table["Metadata_Site"] == 2)].iloc[0]
    assert row["PCIM_Status"] == "done" and row["PCIM_Error"].startswith("warning:")
    assert "constant" in row["PCIM_Error"] and "A01_s2_w1.tif" in row["PCIM_Error"]
    others = table.drop(row.name)
    assert (others["PCIM_Error"] == "").all()
