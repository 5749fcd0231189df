"""`pcim evaluate`: every method on a few demo wells, scored against the demo's masks; the sanity check."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from cli_runner import run_pcim
from plates import DEMO

from pcim_cli.config import load_config
from pcim_cli.engine import metrics
from pcim_cli.engine.attribute import attribute
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.errors import ConfigError
from pcim_cli.report import evaluate as evaluate_report
from pcim_cli.run import evaluate

MASKS = str(DEMO / "masks" / "{well}_s{field}.tif")
# small settings so that five methods and their sanity check run in about a minute on one core
FAST = ("explain.steps=100", "explain.lr=0.3", "explain.ig_steps=16", "explain.rise_masks=200",
        "explain.occlusion_stride=16")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("evaluate")
    args = ["evaluate", str(DEMO / "plate.yaml"), "--masks", MASKS, "--wells", "A01,A02", "--out", str(out),
            "--json", "--set", "explain.target=mitotic"]
    for s in FAST:
        args += ["--set", s]
    proc = run_pcim(*args, timeout=1200)
    return {"proc": proc, "out": out}


@pytest.mark.slow
def test_evaluate_writes_tables_and_plots(run):
    proc, out = run["proc"], run["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["fields"] == ["A01 s1", "A01 s2", "A02 s1", "A02 s2"]
    table = pd.read_csv(out / "comparison.csv")
    assert table["method"].tolist() == ["pcim", "saliency", "integrated-gradients", "occlusion", "rise",
                                        "intensity", "contrast"]
    for col in ("pointing_game", "pointing_game_3px", "relevance_mass", "rank_accuracy", "pixel_auroc",
                "deletion_auc", "fine_deletion_auc", "insertion_auc", "sparseness", "randomisation_spearman",
                "share_off_objects", "share_border", "s_per_map"):
        assert table[col].notna().all(), col
    assert (table["maps"] == 4).all()
    md = (out / "comparison.md").read_text()
    assert "| pcim | 4 |" in md and "deletion ↓" in md and "deletion 2% ↓" in md and "pointing 3px ↑" in md
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["directions"]["deletion_auc"] == "lower" and len(saved["curves"]["pcim"]["deletion"]) == 41
    assert len(saved["curves"]["contrast"]["fine_deletion"]) == 21
    assert saved["intensity_channel"] in ("DNA", "PH3", "Actin")
    assert doc["intensity_channel"] == saved["intensity_channel"]
    (v,) = doc["verdicts"]  # one target class: mitotic
    assert v["target"] == "mitotic" and v["reference"] == "pcim" and v["sentence"] in md
    assert len(pd.read_csv(out / "scores.csv")) == 7 * 4
    import matplotlib.image

    for name in ("curves.png", "overlays.png"):
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert np.ptp(img[..., :3]) > 0.5, name  # not a blank canvas


@pytest.mark.slow
def test_pcim_is_at_least_as_good_as_every_baseline_on_the_demo(run):
    """Against the gradient and perturbation baselines; the trivial maps are compared in measured tables
    (docs/method.md), not asserted on 4 fields at test settings."""
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    table = pd.read_csv(run["out"] / "comparison.csv").set_index("method")
    pcim = table.loc["pcim"]
    for method in table.index.drop(["pcim", "intensity", "contrast"]):
        assert pcim["deletion_auc"] <= table.loc[method, "deletion_auc"], method
        assert pcim["pointing_game_3px"] >= table.loc[method, "pointing_game_3px"], method
        assert pcim["pointing_game"] >= table.loc[method, "pointing_game"], method


def test_shortcut_shares_per_method_as_explain_measures_them():
    """evaluate's shares (docs/shortcuts.md) on hand-made maps: labels when the field has them, else the
    automatic foreground of qc.foreground_channel; the border as qc.border says."""
    from pcim_cli.run.task import QcTask

    x = torch.zeros(2, 2, 32, 32)
    x[:, 1, 10:20, 10:20] = 1.0  # the foreground of channel 1
    labels = torch.zeros(32, 32, dtype=torch.int64)
    labels[0:2, 0:2] = 1  # field 0's labelled object: the corner
    fields = [evaluate.EvalField("A01", 1, x[0], None, labels), evaluate.EvalField("A01", 2, x[1], None, None)]
    maps = torch.zeros(2, 1, 32, 32)
    maps[:, 0, 15, 15] = 3.0  # on the square
    maps[:, 0, 0, 0] = 1.0  # in the corner
    found = evaluate.shortcut_shares(maps, x, fields, QcTask(foreground_channel=1, border=0.1))
    assert found["share_off_objects"] == pytest.approx([0.75, 0.25])  # labels: the corner; foreground: the square
    assert found["share_border"] == pytest.approx([0.25, 0.25])


def test_randomised_model_changes_the_maps():
    """Adebayo et al. 2018: maps of a model with redrawn parameters must not look like the trained model's."""
    cfg = load_config(DEMO / "plate.yaml")
    model = torch.jit.load(str(DEMO / "classifier.ts")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = evaluate.randomized_copy(model, seed=1)
    for k, v in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in rand.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and len(changed) == len(list(model.parameters()))
    for (name, p), q in zip(model.named_parameters(), rand.parameters(), strict=True):
        if p.numel() > 8:
            assert float(q.detach().std()) == pytest.approx(float(p.detach().std()), rel=0.5), name
    fields = evaluate.read_fields(cfg, _found(cfg), ["A01"], MASKS)
    x = torch.stack([f.x for f in fields])
    target = torch.ones(len(x), dtype=torch.long)
    opts = PcimOptions(steps=60, lr=0.3, ig_steps=16)
    for method in ("pcim", "integrated-gradients", "saliency"):
        trained = attribute(model, x, target, method, opts).maps
        randomised = attribute(rand, x, target, method, opts).maps
        rho = metrics.spearman(trained, randomised, support="union")
        assert (rho < 0.5).all(), (method, rho)  # not alike (a negative rho: even less alike)


def _found(cfg):
    from pcim_cli.io import images

    found, _ = images.discover_fields(cfg.plate.images, cfg.plate.pattern, cfg.plate.channels, ["A01"])
    return found


def test_wells_sample_prefers_wells_with_evidence():
    from pcim_cli.io import images

    cfg = load_config(DEMO / "plate.yaml")
    found, _ = images.discover_fields(cfg.plate.images, cfg.plate.pattern, cfg.plate.channels, None)
    chosen = evaluate.choose_wells(found, MASKS, 3)
    assert len(chosen) == 3
    assert all(any(evaluate.has_evidence(MASKS, w, src.field) for src in found[w]) for w in chosen)
    assert evaluate.choose_wells(found, MASKS, ["a1", "B02"]) == ["A01", "B02"]
    with pytest.raises(ConfigError, match="H12"):
        evaluate.choose_wells(found, MASKS, ["H12"])


def test_mask_pattern_accepts_padded_and_unpadded_wells(tmp_path):
    (tmp_path / "A1_s2.tif").write_bytes(b"")
    assert evaluate.mask_path(str(tmp_path / "{well}_s{field}.tif"), "A01", 2) == tmp_path / "A1_s2.tif"
    assert evaluate.mask_path(str(tmp_path / "{row}{col}_{field}.tif"), "A01", 2) is None


def test_unknown_method_and_target_all_are_refused_before_any_work():
    cfg = load_config(DEMO / "plate.yaml")
    with pytest.raises(ConfigError, match="gradcam"):
        evaluate.score_plate(cfg, MASKS, ["pcim", "gradcam"])
    cfg = load_config(DEMO / "plate.yaml", ["explain.target=all"])
    with pytest.raises(ConfigError, match="explain.target"):
        evaluate.score_plate(cfg, MASKS, ["pcim"])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pcim-cli\[evaluate\]"):
        evaluate_report.pyplot()


def test_evaluate_cli_exits_78_on_a_bad_method(tmp_path):
    proc = run_pcim("evaluate", str(DEMO / "plate.yaml"), "--masks", MASKS, "--methods", "pcim,lrp",
                    "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 78 and "lrp" in proc.stderr
