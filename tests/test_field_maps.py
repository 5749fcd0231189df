"""Tiled fields through the installed `pcim`: one map per field, model.aggregate, fit verdicts, adaptive budget.

The model is a toy with a hand-derived answer: it counts bright pixels (a density classifier, like
confluence or DAB area), logit(pos) = 300 * mean(relu(x - 0.5)) - 1.5 over its input. Fields are
real single-channel TIFFs of 120 x 120 px with bright round objects; model.input_size 64 cuts them
into 2 x 2 tiles (8 px overlap) by the real tiling code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from cli_runner import run_pcim

from pcim_cli.io import store

SIZE, TILE = 120, 64


class Counter(torch.nn.Module):
    """logits (neg, pos) = (0, 300 * mean(relu(x - 0.5)) - 1.5): more bright pixels, more `pos`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(x[:, 0] - 0.5).mean(dim=(1, 2))
        pos = 300.0 * s - 1.5
        return torch.stack([torch.zeros_like(pos), pos], 1)


def objects_field(centres, radius: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = np.full((SIZE, SIZE), 100, dtype=np.uint16)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius] = 1000
    return img


#: three objects in the top-left tile, one in the bottom-right tile, none in the other two
THREE_AND_ONE = [(16, 16), (16, 40), (40, 28), (90, 90)]


def make_plate(root: Path, fields: dict[str, np.ndarray], **sections) -> Path:
    (root / "images").mkdir(parents=True)
    for well, img in fields.items():
        tifffile.imwrite(root / "images" / f"{well}_s1.tif", img)
    model = root / "counter.ts"
    torch.jit.script(Counter().eval()).save(str(model))
    config = {
        "plate": {"name": "TILED", "images": "images", "pattern": "{well}_s{field}.tif", "channels": ["dye"]},
        "model": {"path": "counter.ts", "classes": ["neg", "pos"], "input_size": [TILE, TILE],
                  "normalize": {"method": "fixed", "min": 0, "max": 1000}},
        "explain": {"steps": 100, "target": "pos"},
        "compute": {"cluster": "none"},
        "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"},
    }
    for key, value in sections.items():
        config[key].update(value)
    path = root / "plate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def quadrant_mass(maps: np.ndarray) -> tuple[float, float]:
    """Map mass in the top-left (3 objects) and bottom-right (1 object) quarters of the field."""
    m = maps.sum(0)
    h = SIZE // 2
    return float(m[:h, :h].sum()), float(m[h:, h:].sum())


@pytest.mark.slow
def test_one_map_per_field_gives_the_tile_with_three_objects_more_mass_than_the_tile_with_one(tmp_path):
    plate = make_plate(tmp_path, {"A01": objects_field(THREE_AND_ONE)})
    proc = run_pcim("explain", str(plate), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    maps, _, record = store.read_field(tmp_path / "out" / "TILED.zarr", "A01", 0)
    assert record["tiling"]["n_tiles"] == 4 and record["tiling"]["maps"] == "field"
    three, one = quadrant_mass(maps)
    assert three > 2 * one > 0, (three, one)  # 3 objects vs 1: the field's budget follows the evidence

    # the same field explained tile by tile: each tile spends its own budget, so the masses level out
    # (with a fixed budget: a budget that grows per tile follows each tile's evidence too)
    per_tile = run_pcim("explain", str(plate), "--set", "explain.tile_maps=per-tile",
                        "--set", "explain.adaptive_budget=null",
                        "--set", "output.zarr=out/per_tile.zarr", "--set", "output.csv=out/per_tile.csv")
    assert per_tile.returncode == 0, per_tile.stderr[-2000:]
    maps_pt, _, record_pt = store.read_field(tmp_path / "out" / "per_tile.zarr", "A01", 0)
    assert record_pt["tiling"]["maps"] == "per-tile"
    three_pt, one_pt = quadrant_mass(maps_pt)
    assert three_pt < 2 * one_pt, (three_pt, one_pt)


@pytest.mark.slow
def test_model_aggregate_decides_the_field_prediction_and_the_record_keeps_every_tile(tmp_path):
    # tile logits: 3 objects ~ +3.9 (p 0.98), 1 object ~ +0.3 (p 0.57), empty -1.5 (p 0.18) twice:
    # mean probability 0.48 -> neg; mean logit +0.3 -> pos
    plate = make_plate(tmp_path, {"A01": objects_field(THREE_AND_ONE)}, explain={"target": "predicted"},
                       model={"aggregate": "mean-prob"})
    first = run_pcim("explain", str(plate))
    assert first.returncode == 0, first.stderr[-2000:]
    df = pd.read_csv(tmp_path / "out" / "TILED.csv")
    # explain.target predicted: one map, the predicted class's (`contrastive` would add the runner-up's here:
    # `neg` is also what the featureless field gives; tests/test_absence.py)
    assert df["PCIM_PredictedClass"].tolist() == ["neg"] and df["PCIM_Target"].tolist() == ["neg"]
    _, _, record = store.read_field(tmp_path / "out" / "TILED.zarr", "A01", 0)
    tiles = np.array(record["tiling"]["tile_probabilities"])
    assert tiles.shape == (4, 2) and record["tiling"]["aggregate"] == "mean-prob"
    np.testing.assert_allclose(tiles.mean(0), [record["class_probabilities"][c] for c in ("neg", "pos")], atol=1e-5)
    assert tiles[0, 1] > 0.9 and tiles[3, 1] > 0.5 > tiles[1, 1]  # what the model said about each tile

    again = run_pcim("explain", str(plate), "--set", "model.aggregate=mean-logit", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["fitted"] == 1  # the aggregate is in the fingerprint: redone
    df = pd.read_csv(tmp_path / "out" / "TILED.csv")
    assert df["PCIM_PredictedClass"].tolist() == ["pos"] and df["PCIM_Target"].tolist() == ["pos"]


def test_validate_rejects_an_unknown_aggregate(tmp_path):
    plate = make_plate(tmp_path, {"A01": objects_field(THREE_AND_ONE)})
    proc = run_pcim("validate", str(plate), "--set", "model.aggregate=median")
    assert proc.returncode == 78 and "model.aggregate" in proc.stderr and "mean-logit" in proc.stderr


DENSE = [(y, x) for y in range(8, SIZE, 16) for x in range(8, SIZE, 16)]  # 49 objects, ~11 % of the field


#: the default before issue 26: a fixed 2 % budget, deleted pixels set to the channel mean
PREVIOUS = ("--set", "explain.adaptive_budget=null", "--set", "explain.delete_substrate=mean")


@pytest.mark.slow
def test_the_budget_grows_until_deleting_the_map_removes_dense_evidence(tmp_path):
    """A dense field (49 objects, ~11 % of it): the default fit's budget grows within the fit until deleting
    the map's pixels removes the class; the previous default (--set line) fails on it and says why, once."""
    plate = make_plate(tmp_path, {"A01": objects_field(DENSE), "A02": objects_field(THREE_AND_ONE)})
    old = run_pcim("explain", str(plate), *PREVIOUS, "--json")
    assert old.returncode == 0, old.stderr[-2000:]
    df = pd.read_csv(tmp_path / "out" / "TILED.csv").set_index("Metadata_Well")
    # dense field: deleting 2 % of the pixels leaves the class, the verdict says so
    assert df.loc["A01", "PCIM_ProbDeleted"] > 0.75 * df.loc["A01", "PCIM_ProbOriginal"]
    assert df.loc["A01", "PCIM_Fit"] == "failed"
    assert df.loc["A02", "PCIM_Fit"] == "ok" and df.loc["A02", "PCIM_ProbDeleted"] < df.loc["A02", "PCIM_ProbOriginal"]
    assert json.loads(old.stdout)["fits"] == {"ok": 1, "weak": 0, "failed": 1, "absent": 0, "no-local-evidence": 0}
    warnings = [ln for ln in old.stderr.splitlines() if "weak (0) or failed (1) fits" in ln]
    assert len(warnings) == 1 and "explain.adaptive_budget: 0.32" in warnings[0] and "explain.target" in warnings[0]
    assert "1 failed fits: see PCIM_Fit" in old.stderr
    _, _, record = store.read_field(tmp_path / "out" / "TILED.zarr", "A01", 0)
    assert record["results"]["pos"]["budget"] == pytest.approx(0.02)  # fixed

    new = run_pcim("explain", str(plate), "--json")  # the default: other settings, both fields redone
    assert new.returncode == 0, new.stderr[-2000:]
    assert "(2 fitted by this run)" in new.stderr, new.stderr[-2000:]
    df = pd.read_csv(tmp_path / "out" / "TILED.csv").set_index("Metadata_Well")
    assert df.loc["A01", "PCIM_Fit"] == "ok" and json.loads(new.stdout)["fits"]["failed"] == 0
    assert df.loc["A01", "PCIM_ProbDeleted"] < 0.5 * df.loc["A01", "PCIM_ProbOriginal"]
    dense, _, record = store.read_field(tmp_path / "out" / "TILED.zarr", "A01", 0)
    assert record["results"]["pos"]["budget"] > 0.1  # grew from 0.02 past the ~11 % of evidence
    sparse = store.read_field(tmp_path / "out" / "TILED.zarr", "A02", 0)[2]["results"]["pos"]
    assert sparse["budget"] == pytest.approx(0.02)  # 3 + 1 objects: deleting 2 % removes the class, no growth
    objects = objects_field(DENSE) > 500
    assert dense.sum(0)[objects].sum() > 0.9 * dense.sum()  # the grown map is on the objects


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["whole-field"])
def test_whole_field_runs_the_model_on_the_untiled_field(tmp_path, aggregate):
    plate = make_plate(tmp_path, {"A01": objects_field(THREE_AND_ONE)}, model={"aggregate": aggregate},
                       explain={"target": "predicted"})
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 0, proc.stderr[-2000:]
    maps, _, record = store.read_field(tmp_path / "out" / "TILED.zarr", "A01", 0)
    # the whole field: 4 objects of ~49 px over 14400 px -> logit 300 * 0.0061 - 1.5 > 0 -> pos
    assert record["predicted_class"] == "pos" and maps.shape == (1, SIZE, SIZE) and maps.max() > 0


@pytest.mark.slow
def test_validate_says_what_explain_will_do(tmp_path):
    plate = make_plate(tmp_path, {"A01": objects_field(THREE_AND_ONE), "A02": objects_field(DENSE)},
                       explain={"target": "layout:expected"}, model={"aggregate": "mean-logit"})
    (tmp_path / "layout.csv").write_text("well,expected\nA01,pos\nA02,neg\n")
    config = yaml.safe_load(plate.read_text())
    config["plate"]["layout"] = "layout.csv"
    plate.write_text(yaml.safe_dump(config))
    proc = run_pcim("validate", str(plate), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)["plan"]
    (size,) = plan["sizes"]
    assert size["field"] == [SIZE, SIZE] and size["fields"] == 2 and size["n_tiles"] == 4
    assert size["grid"] == [2, 2] and size["tile"] == [TILE, TILE] and size["overlap"] == [8, 8]
    assert size["whole_field_accepted"] is True  # the toy model pools globally: any size
    assert plan["targets"] == {"A01": "pos", "A02": "neg"} and plan["aggregate"] == "mean-logit"
    # 2 maps x (4 tiles x 100 steps x kept + deleted + 42 fidelity passes x 4 tiles) + 2 fields x 4 tiles
    assert plan["maps"] == 2 and plan["model_passes"] == 2 * (2 * 4 * 100 + 42 * 4) + 2 * 4
    assert plan["seconds_per_pass"] > 0
    assert plan["eta_s"] == pytest.approx(plan["model_passes"] * plan["seconds_per_pass"])

    text = run_pcim("validate", str(plate), "--no-probe")
    assert text.returncode == 0, text.stderr[-2000:]
    assert "2 field(s) of 120x120 px: 4 tiles of 64x64 px (2 x 2, overlap 8x8 px)" in text.stdout
    assert "model.aggregate mean-logit" in text.stdout and "accepts the untiled field" in text.stdout
    assert "target pos: A01" in text.stdout and "target neg: A02" in text.stdout
    assert "cost: 2 maps, 1,944 model passes" in text.stdout


def test_validate_help_lists_validates_exit_codes():
    proc = run_pcim("validate", "--help", COLUMNS="200")
    assert proc.returncode == 0
    assert "3 problems found" in proc.stdout and "every unit done" not in proc.stdout
