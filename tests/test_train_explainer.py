"""`pcim train-explainer` and `explain.method: pcim-amortised` through the installed CLI, on demo wells.

An explainer is trained on some wells of a small real plate (the demo's TIFFs and TorchScript
classifier) and explains the others; refusals and a resumed run after SIGKILL are checked as a user
meets them.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from cli_runner import run_pcim, start_pcim
from plates import DEMO, make_plate

from pcim_cli.io import explainer as explainer_file
from pcim_cli.io import store
from pcim_cli.io.model import file_sha256
from pcim_cli.run import progress

TRAIN = ("A01", "A02", "A04", "A05", "B01", "B04", "C02", "C04", "D01", "D04")
HELD = ("A03", "B02", "B05", "C01", "D03")  # never trained on: validation wells, explained and scored below
MASKS = str(DEMO / "masks" / "{well}_s{field}.tif")
STEPS = "60"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("amortised")
    yaml_path = make_plate(root, TRAIN + HELD)
    out = root / "explainer.pt"
    proc = run_pcim("train-explainer", str(yaml_path), "--out", str(out), "--steps", STEPS, "--val-wells",
                    ",".join(HELD), "--checkpoint-every", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation tiles" in proc.stderr
    return yaml_path, out, json.loads(explainer_file.sidecar_path(out).read_text())


@pytest.mark.slow
def test_train_explainer_writes_torchscript_and_its_record(trained):
    yaml_path, out, meta = trained
    assert meta["classifier_sha256"] == file_sha256(yaml_path.parent / "classifier.ts")
    assert meta["channels"] == ["DNA", "PH3", "Actin"] and meta["classes"] == ["negative", "mitotic"]
    assert meta["normalize"]["method"] == "percentile" and meta["engine"]["budget"] == 0.02
    assert meta["plates"][0]["validation_wells"] == sorted(HELD)
    assert meta["plates"][0]["train_wells"] == sorted(TRAIN)
    training = meta["training"]
    assert training["steps"] == int(STEPS) and training["validation_tiles"] == 2 * len(HELD)
    # the held-out objective fell well below the untrained explainer's
    assert training["validation_objective"] < 0.7 * training["validation_objective_untrained"], training
    assert meta["sha256"] == file_sha256(out) and meta["pcim_version"]
    module = torch.jit.load(str(out))
    assert tuple(module(torch.rand(1, 3, 128, 128)).shape) == (1, 2, 32, 32)  # logits of both classes at 1/4
    assert not out.with_name(out.name + ".ckpt").exists()
    again = run_pcim("train-explainer", str(yaml_path), "--out", str(out), "--steps", STEPS, "--val-wells",
                     ",".join(HELD), "--checkpoint-every", "20")
    assert again.returncode == 0 and "already trained" in again.stderr
    assert file_sha256(out) == meta["sha256"]


@pytest.mark.slow
def test_explainer_explains_held_out_wells_with_the_stated_quality(trained):
    """Stated quality (60 training steps on 10 wells): on the held-out mitotic fields, relevance mass
    >= 0.7, pixel AUROC >= 0.97, pointing >= 0.8, and a lower deletion AUC than saliency.

    Measured (issue 27: 0.8 sat inside the distribution and failed as 0.797) with this test's plate and
    command, --seed 0-4 at one torch thread and seeds 0-1 at two: relevance mass 0.793-0.907 (seed 0:
    0.797 at one thread, 0.793 at two), pixel AUROC 0.998-0.999, pointing 1.0, deletion AUC 0.32-0.38
    against saliency's 0.60. The bounds sit clear of that: mass by 0.09 (the untrained explainer's is
    near 0.1), AUROC by 0.028, pointing by 0.2, deletion by 0.2."""
    yaml_path, out, _ = trained
    proc = run_pcim("evaluate", str(yaml_path), "--masks", MASKS, "--wells", ",".join(HELD), "--methods",
                    "pcim-amortised,saliency", "--set", "explain.target=mitotic", "--set", f"explain.explainer={out}",
                    "--no-sanity", "--json", "-q", "--out", str(yaml_path.parent / "evaluate"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {row["method"]: row for row in json.loads(proc.stdout)["table"]}
    amortised, saliency = table["pcim-amortised"], table["saliency"]
    assert amortised["relevance_mass"] >= 0.7 and amortised["pixel_auroc"] >= 0.97, amortised
    assert amortised["pointing_game"] >= 0.8, amortised
    assert amortised["deletion_auc"] < saliency["deletion_auc"], (amortised, saliency)


@pytest.mark.slow
def test_pcim_explain_with_the_explainer_writes_every_target_and_reruns_by_fingerprint(trained):
    yaml_path, out, meta = trained
    sets = ["--set", "explain.method=pcim-amortised", "--set", f"explain.explainer={out}",
            "--set", "explain.target=all", "--only", ",".join(HELD[:2])]
    proc = run_pcim("explain", str(yaml_path), *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(yaml_path.parent / "out" / "P1.csv")
    done = df[df["PCIM_Status"] == "done"]
    assert len(done) == 2 * 2 * 2 and set(done["Metadata_Well"]) == set(HELD[:2])  # 2 wells x 2 fields x 2 classes
    assert done["PCIM_ProbMixed"].between(0, 1).all()
    for index in (0, 1):
        maps, labels, record = store.read_field(yaml_path.parent / "out" / "P1.zarr", HELD[0], index)
        assert maps.shape == (2, 128, 128) and labels == ["negative", "mitotic"]
        assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
        assert record["explainer_sha256"] == meta["sha256"]
        assert record["results"]["mitotic"]["steps"] == 0
    again = run_pcim("explain", str(yaml_path), *sets, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["fitted"] == 0  # same fingerprint: skipped
    refined = run_pcim("explain", str(yaml_path), *sets, "--set", "explain.refine_steps=2", "--json")
    assert refined.returncode == 0 and json.loads(refined.stdout)["fitted"] == 8  # refine changes the maps
    _, _, record = store.read_field(yaml_path.parent / "out" / "P1.zarr", HELD[0], 0)
    assert record["results"]["mitotic"]["steps"] == 2


def _relevance_mass(zarr: Path, well: str, index: int) -> float:
    """Share of the field's (first) map on the demo's mask of the field's true evidence."""
    maps, _, record = store.read_field(zarr, well, index)
    mask = tifffile.imread(DEMO / "masks" / f"{well}_s{record['site']}.tif") > 0
    return float(maps[0][mask].sum() / maps[0].sum())


@pytest.mark.slow
def test_tiled_plate_explainer_on_the_field_or_on_each_tile(tmp_path):
    """model.input_size 64 on the demo's 128 px fields (4 overlapping tiles): the explainer trains on 64 px
    crops; explain.tile_maps: field runs it once over the whole field (fully convolutional) and refines
    through the tiles, per-tile runs it on each tile and stitches. Measured with 60 steps: mass 0.98-1.0
    (field) and 0.76-0.86 (per-tile) on the held-out wells' mitotic fields (evidence ~1.5 % of a field)."""
    yaml_path = make_plate(tmp_path, TRAIN + HELD[:2], model={"input_size": [64, 64]})
    out = tmp_path / "tiled.pt"
    proc = run_pcim("train-explainer", str(yaml_path), "--out", str(out), "--steps", STEPS, "--val-wells",
                    ",".join(HELD[:2]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "crops 64x64" in proc.stderr
    assert json.loads(explainer_file.sidecar_path(out).read_text())["input_size"] == [64, 64]
    masses = {}
    for mode, refine in (("field", 0), ("per-tile", 0), ("field", 2)):
        zarr = tmp_path / f"{mode}{refine}.zarr"
        proc = run_pcim("explain", str(yaml_path), "--only", ",".join(HELD[:2]), "--json", "-q",
                        "--set", "explain.method=pcim-amortised", "--set", f"explain.explainer={out}",
                        "--set", "explain.target=mitotic", "--set", f"explain.tile_maps={mode}",
                        "--set", f"explain.refine_steps={refine}", "--set", f"output.zarr={zarr}",
                        "--set", f"output.csv={tmp_path}/{mode}{refine}.csv")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["counts"]["done"] == 4
        for well in HELD[:2]:
            for index in (0, 1):
                maps, _, record = store.read_field(zarr, well, index)
                assert maps.shape == (1, 128, 128) and np.isfinite(maps).all()
                assert record["results"]["mitotic"]["steps"] == refine
        masses[mode, refine] = np.mean([_relevance_mass(zarr, w, i) for w in HELD[:2] for i in (0, 1)])
    assert masses["field", 0] >= 0.9 and masses["per-tile", 0] >= 0.6, masses
    assert masses["field", 2] >= 0.85, masses


def _other_classifier(path: Path) -> Path:
    """The demo classifier with one weight changed: another model, another sha256."""
    model = torch.jit.load(str(DEMO / "classifier.ts"))
    with torch.no_grad():
        next(iter(model.parameters())).mul_(1.01)
    model.save(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["classifier", "channels", "normalize", "missing", "unset"])
def test_explainer_for_another_setup_is_refused_with_the_fix(trained, tmp_path, case):
    yaml_path, out, meta = trained
    sets = {"classifier": [f"model.path={_other_classifier(tmp_path / 'other.ts')}"],
            "channels": ['plate.channels={PH3: "2", DNA: "1", Actin: "3"}'],
            "normalize": ["model.normalize={method: percentile, low: 1.0, high: 99.0}"],
            "missing": [f"explain.explainer={tmp_path / 'nope.pt'}"],
            "unset": ["explain.explainer=null"]}[case]
    args = ["explain", str(yaml_path), "--set", "explain.method=pcim-amortised", "--set", f"explain.explainer={out}",
            "--set", f"output.zarr={tmp_path}/o.zarr", "--set", f"output.csv={tmp_path}/o.csv"]
    for s in sets:
        args += ["--set", s]
    proc = run_pcim(*args)
    assert proc.returncode == 78, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pcim: error:")]
    assert len(errors) == 1 and "explain.explainer" in proc.stderr[proc.stderr.index("pcim: error:"):]
    assert "pcim train-explainer" in proc.stderr  # the fix
    expected = {"classifier": [meta["classifier_sha256"], file_sha256(tmp_path / "other.ts")],
                "channels": ["DNA, PH3, Actin", "PH3, DNA, Actin"], "normalize": ["99.8", "99.0"],
                "missing": ["nope.pt", "does not exist"], "unset": ["required with explain.method: pcim-amortised"]}
    assert all(word in proc.stderr for word in expected[case]), proc.stderr
    assert not (tmp_path / "o.csv").exists()  # nothing was run


@pytest.mark.slow
def test_a_killed_training_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    yaml_path = make_plate(tmp_path, TRAIN[:4] + HELD[:1])
    args = ["train-explainer", str(yaml_path), "--steps", "40", "--checkpoint-every", "4", "--val-wells", HELD[0]]
    out = tmp_path / "killed.pt"
    ckpt = out.with_name(out.name + ".ckpt")
    proc = start_pcim(*args, "--out", str(out))
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a node lost, an OOM kill
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists() and not out.exists(), "the run ended before it could be killed mid-way"
    step = torch.load(ckpt, weights_only=False)["trainer"]["done"]
    assert 4 <= step < 40
    resumed = run_pcim(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stderr and not ckpt.exists()
    straight = run_pcim(*args, "--out", str(tmp_path / "straight.pt"))
    assert straight.returncode == 0 and "resumed" not in straight.stderr
    a = torch.jit.load(str(out)).state_dict()
    b = torch.jit.load(str(tmp_path / "straight.pt")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads(explainer_file.sidecar_path(p).read_text())["training"]
              for p in (out, tmp_path / "straight.pt"))
    assert ma["objective_curve"] == mb["objective_curve"]
    assert ma["validation_objective"] == mb["validation_objective"]


@pytest.mark.slow
def test_sigterm_stops_training_with_a_checkpoint_and_exit_75(tmp_path):
    yaml_path = make_plate(tmp_path, TRAIN[:2] + HELD[:1])
    out = tmp_path / "e.pt"
    ckpt = out.with_name(out.name + ".ckpt")
    proc = start_pcim("train-explainer", str(yaml_path), "--out", str(out), "--steps", "200",
                      "--checkpoint-every", "2", "--val-wells", HELD[0])
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "rerun the same command to resume" in err and "pcim: error:" in err
    assert ckpt.exists() and not out.exists()
    assert torch.load(ckpt, weights_only=False)["trainer"]["done"] < 200


def test_plain_training_progress_lines(caplog):
    caplog.set_level(logging.INFO, logger="pcim_cli")
    with progress.StepProgress(fancy=False, every_s=3600) as bar:
        bar.start(10, done=4)
        for step in range(5, 11):
            bar.update(step, 0.5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("explainer steps")]
    assert lines == ["explainer steps 10/10, objective 0.5000, ETA 00:00"]


def test_plates_with_another_setup_are_refused_before_any_training(tmp_path):
    """In-process and cheap (no step is trained): an explainer serves one classifier and one setup."""
    from pcim_cli.config import load_config
    from pcim_cli.errors import ConfigError
    from pcim_cli.run import train

    a = make_plate(tmp_path / "a", wells=("A01",), steps=2)
    b = make_plate(tmp_path / "b", wells=("A02",), steps=2, model={"normalize": {"method": "none"}})
    out = tmp_path / "explainer.pt"
    with pytest.raises(ConfigError, match="model.normalize") as info:
        train.train_explainer([load_config(a), load_config(b)], out, train.TrainSettings())
    assert "train one per setup" in str(info.value) and not out.exists()
