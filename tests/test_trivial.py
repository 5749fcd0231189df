"""The trivial baselines (`intensity`, `contrast`) and the stain verdict (issue 18).

A toy classifier that reads one channel (its score is a sum of a monotone function of that channel's
pixels) is a stain detector by construction: deleting its channel's brightest pixels first lowers its
score as fast as any deletion order can, so the intensity map of that channel is as faithful as the
model allows, and the verdict must say the classifier is a detector of that channel. A classifier that
reads a fixed region, with brighter distractors elsewhere in the same channel, is not: PCIM's maps must
then explain its calls better than the stain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from cli_runner import run_pcim
from ome_zarr_models import v05
from ome_zarr_models.exceptions import ValidationWarning
from plates import DEMO, make_plate

from pcim_cli.config import load_config
from pcim_cli.engine import baselines, fidelity, metrics, trivial, verdict
from pcim_cli.engine.attribute import METHODS, attribute, method_settings
from pcim_cli.engine.pcim import PcimOptions, deletion_contrast
from pcim_cli.errors import ConfigError
from pcim_cli.io import images, store
from pcim_cli.run import evaluate, inventory

H, W = 24, 32
FAST_PCIM = PcimOptions(steps=60, lr=0.3, resolution=2, ig_steps=16, occlusion_window=4, occlusion_stride=4,
                        rise_masks=200, rise_cell=4)


class ChannelReader(torch.nn.Module):
    """Logits (-s, s) with s = gain * (mean over pixels of relu(x[channel] - threshold)) - bias: reads one
    channel only, additively and monotonically per pixel."""

    def __init__(self, channel: int, gain: float, threshold: float = 0.5, bias: float = 0.0):
        super().__init__()
        self.channel, self.gain, self.threshold, self.bias = channel, gain, threshold, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gain * torch.relu(x[:, self.channel] - self.threshold).mean(dim=(1, 2)) - self.bias
        return torch.stack([-s, s], dim=1)


class RegionReader(torch.nn.Module):
    """Logits (-s, s), s = 8 * (mean of channel 1 in a fixed block - 0.5): the evidence is where, not how bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 8.0 * (x[:, 1, 8:14, 18:24].mean(dim=(1, 2)) - 0.5)
        return torch.stack([-s, s], dim=1)


def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module.eval())


def _stain_images(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-channel images: noise, blobs of different brightness in channel 1 (the one read), other blobs in 0 and 2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H, W, generator=gen) * 0.3
    mask = torch.zeros(n, H, W, dtype=torch.bool)
    for i in range(n):
        for level, (y0, x0) in zip((1.0, 0.8, 0.65), ((3, 4), (14, 20), (16, 6)), strict=True):
            x[i, 1, y0 : y0 + 4, x0 : x0 + 4] = level + 0.02 * torch.rand(4, 4, generator=gen)
            mask[i, y0 : y0 + 4, x0 : x0 + 4] = True
        x[i, 0, 8:14, 10:16] = 1.0  # bright, but never read
        x[i, 2, 2:6, 24:30] = 0.9
    return x.clamp(0, 1), mask


def _fields(x: torch.Tensor, mask: torch.Tensor) -> list:
    return [evaluate.EvalField("A01", i + 1, x[i], mask[i]) for i in range(len(x))]


# --- the maps -------------------------------------------------------------------------------------


def test_intensity_and_contrast_maps_are_the_stain_itself():
    x, _ = _stain_images(2)
    x[0, 0, 0, 0] = -0.2  # below zero after a fixed normalisation: clipped
    model = _script(ChannelReader(1, 40.0))
    target = torch.ones(2, dtype=torch.long)
    fixed = attribute(model, x, target, "intensity", dataclasses.replace(FAST_PCIM, intensity_channel=2))
    assert fixed.maps.shape == (2, 1, H, W) and fixed.channel.tolist() == [2, 2]
    torch.testing.assert_close(fixed.maps[:, 0], x[:, 2].clamp(min=0))
    per_channel = attribute(model, x, target, "intensity", dataclasses.replace(FAST_PCIM, per_channel=True))
    torch.testing.assert_close(per_channel.maps, x.clamp(min=0))
    assert float(per_channel.maps.min()) == 0.0
    contrast = attribute(model, x, target, "contrast", FAST_PCIM)
    median = x.flatten(2).median(dim=2).values[..., None, None]  # explain.delete_substrate: median (the default)
    torch.testing.assert_close(contrast.maps, (x - median).abs().sum(1, keepdim=True))
    torch.testing.assert_close(contrast.maps, deletion_contrast(x, FAST_PCIM))
    assert torch.isnan(contrast.prob_mixed).all() and (contrast.steps == 0).all()


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_auto_picks_the_channel_the_model_reads(channel):
    x, _ = _stain_images(3)
    x[:, channel, 18:22, 26:30] = 0.95  # the read channel has bright pixels wherever it is
    model = _script(ChannelReader(channel, 40.0))
    r = attribute(model, x, torch.ones(3, dtype=torch.long), "intensity", FAST_PCIM)
    assert r.channel.tolist() == [channel] * 3
    torch.testing.assert_close(r.maps[:, 0], x[:, channel])
    assert int(trivial.best_channel(model, x, torch.ones(3, dtype=torch.long), per_image=False)) == channel


def test_trivial_methods_are_in_every_method_list_with_their_settings():
    assert {"intensity", "contrast"} <= set(METHODS) and set(trivial.TRIVIAL) <= set(METHODS)
    assert method_settings("intensity", PcimOptions()) == {"per_channel": False, "intensity_channel": None}
    assert method_settings("contrast", PcimOptions()) == {"per_channel": False, "delete_substrate": "median",
                                                          "blur_sigma": 8.0}
    assert "intensity_channel" not in method_settings("pcim", PcimOptions())  # PCIM fingerprints unchanged


def test_intensity_channel_is_a_channel_name_or_auto():
    cfg = load_config(DEMO / "plate.yaml", ["explain.method=intensity", "explain.intensity_channel=PH3"])
    assert inventory.engine_options(cfg).intensity_channel == 1
    assert inventory.engine_options(load_config(DEMO / "plate.yaml")).intensity_channel is None
    with pytest.raises(ConfigError, match=r"explain.intensity_channel: 'PH' is not in plate.channels.*'PH3'"):
        load_config(DEMO / "plate.yaml", ["explain.intensity_channel=PH"])

    def fp(*sets: str) -> str:
        return inventory.fingerprint(load_config(DEMO / "plate.yaml", sets), "0" * 64)

    assert fp("explain.method=intensity", "explain.intensity_channel=DNA") != fp("explain.method=intensity")
    assert fp("explain.intensity_channel=DNA") == fp()  # PCIM's maps do not depend on it


# --- faithfulness and the verdict --------------------------------------------------------------------


def test_the_read_channel_is_as_faithful_as_the_model_allows_and_the_verdict_says_so():
    x, mask = _stain_images(4)
    model = _script(ChannelReader(1, 200.0, bias=2.0))
    target = torch.ones(4, dtype=torch.long)
    comp = evaluate.compare(model, x, target, _fields(x, mask), evaluate.DEFAULT_METHODS, FAST_PCIM, 4,
                            ["DNA", "PH3", "Actin"], ["negative", "mitotic"])
    assert comp.intensity_channel == "PH3"
    # no deletion order lowers p(target) faster than the read channel's brightest pixels first: every
    # method's curve (PCIM's included) and random orders lie on or above the intensity map's, at every step
    fr = torch.linspace(0, 0.3, 31)
    best = metrics.perturbation_curve(model, x, baselines.intensity(x, 1), target, fractions=fr)
    others = {m: attribute(model, x, target, m, FAST_PCIM).maps for m in evaluate.DEFAULT_METHODS if m != "intensity"}
    others.update({f"random{s}": baselines.random_map(model, x, target, seed=s) for s in range(5)})
    for name, maps in others.items():
        curve = metrics.perturbation_curve(model, x, maps, target, fractions=fr)
        assert (curve >= best - 1e-6).all(), name
    table = comp.table.set_index("method")
    for col in ("fine_deletion_auc", "deletion_auc"):
        assert table.loc["intensity", col] <= table[col].min() + 1e-6, col
    (v,) = comp.verdicts
    assert v.level == "detector" and v.trivial == "intensity:PH3" and v.share >= 1.0 - 1e-6
    assert ("the PH3 channel alone explains the classifier's mitotic calls as well as pcim's maps: "
            "the classifier behaves as a PH3 detector") in v.sentence
    # the sanity check flags the maps that do not depend on the model at all
    rand = evaluate.randomized_copy(model, seed=1)
    with_sanity = evaluate.compare(model, x, target, _fields(x, mask), ["intensity", "contrast", "saliency"],
                                   FAST_PCIM, 4, ["DNA", "PH3", "Actin"], ["negative", "mitotic"], rand)
    rho = with_sanity.table.set_index("method")["randomisation_spearman"]
    assert rho["intensity"] == pytest.approx(1.0) and rho["contrast"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["median", "mean"])
def test_the_stain_check_deletes_as_the_fit_does(kind):
    """The verdict's deletion curves set deleted pixels to explain.delete_substrate (the median by
    default), as the fit and PCIM_Fit do: deleted to the channel mean, a nucleus stays a flat disk above
    the background that a model can read as something."""
    x, _ = _stain_images(2)
    x[:, 1, :, : x.shape[-1] // 3] = 0.45  # a third of the read channel above the threshold: mean > median
    model = _script(ChannelReader(1, 200.0, threshold=0.2, bias=25.0))
    target = torch.ones(2, dtype=torch.long)
    opts = dataclasses.replace(FAST_PCIM, delete_substrate=kind)
    maps = attribute(model, x, target, "pcim", opts).maps
    curves = trivial.stain_check(model, x, maps, target, opts, ["DNA", "PH3", "Actin"])
    for name, m in {"map": maps, "intensity:PH3": baselines.intensity(x, 1)}.items():
        want = metrics.perturbation_curve(model, x, m, target, substrate=kind, fractions=trivial.HALVING)
        torch.testing.assert_close(curves[name], want)
    other = metrics.perturbation_curve(model, x, maps, target, substrate="mean" if kind == "median" else "median",
                                       fractions=trivial.HALVING)
    assert not torch.allclose(curves["map"], other)  # the two substrates give other curves on these fields
    rows = fidelity.stain_check_rows(model, x, maps, target, curves["map"][:, 0], opts, ["DNA", "PH3", "Actin"],
                                     [True, True])
    torch.testing.assert_close(torch.tensor(rows[0]["curves"]["map"]), curves["map"][0].float(), rtol=0, atol=1e-5)


def test_a_classifier_that_reads_a_region_is_not_called_a_stain_detector():
    x, _ = _stain_images(4, seed=1)
    x[:, 1, 8:14, 18:24] = 0.6 + 0.02 * torch.rand(4, 6, 6)  # the evidence: dimmer than the distractors
    mask = torch.zeros(4, H, W, dtype=torch.bool)
    mask[:, 8:14, 18:24] = True
    model = _script(RegionReader())
    target = torch.ones(4, dtype=torch.long)
    comp = evaluate.compare(model, x, target, _fields(x, mask), ["pcim", "intensity", "contrast"], FAST_PCIM, 4,
                            ["a", "b", "c"], ["no", "yes"])
    (v,) = comp.verdicts
    assert v.level == "more", v.sentence
    assert "pcim's maps explain the classifier's yes calls better than any map without a model" in v.sentence
    table = comp.table.set_index("method")
    assert table.loc["pcim", "fine_deletion_auc"] < table.loc[["intensity", "contrast"], "fine_deletion_auc"].min()


def _curve(share: float, p0: float = 1.0, floor: float = 0.0, fractions=None) -> list[float]:
    """A deletion curve (on trivial.HALVING by default) that falls from p0 to floor at `share` of the pixels."""
    fr = trivial.HALVING.tolist() if fractions is None else fractions
    return [p0 if f < share else floor for f in fr]


def test_verdict_levels_follow_the_pixels_each_map_needs_to_remove_the_class():
    fr = [i * 0.0005 for i in range(81)]  # a fine grid: shares read to 0.05 %

    def check(ref: float, **cands: float) -> verdict.MapCheck:
        return verdict.check_from_curves(1.0, fr, {"map": _curve(ref, fractions=fr),
                                                   **{k: _curve(v, fractions=fr) for k, v in cands.items()}})

    # the stain needs 1.6x the pixels of pcim's maps (0.8 % vs 0.5 %)
    v = verdict.judge("mitotic", "pcim", [check(0.0051, **{"intensity:PH3": 0.0081, "contrast": 0.04})] * 8)
    assert v.level == "partly" and v.trivial == "intensity:PH3" and 0.5 <= v.share < 0.9, v
    assert "the PH3 channel alone needs 1." in v.sentence and "8 maps" in v.sentence
    # as few pixels -> detector; more than twice -> more
    assert verdict.judge("m", "pcim", [check(0.0051, contrast=0.0051)]).level == "detector"
    more = verdict.judge("m", "pcim", [check(0.0031, contrast=0.0201)])
    assert more.level == "more" and more.trivial == "contrast" and more.share < 0.5
    assert "pcim's maps explain the classifier's m calls better than any map without a model" in more.sentence
    # a stain curve that never halves p within the grid counts as needing twice its last share
    grid = trivial.HALVING.tolist()
    never = verdict.judge("m", "pcim", [verdict.check_from_curves(1.0, grid, {"map": _curve(0.011),
                                                                              "contrast": _curve(1.0)})])
    assert never.level == "more" and never.share == pytest.approx(0.015 / 0.64, rel=0.01)
    # a 2-class model whose featureless image sits at 0.5: half of what deletion CAN remove (0.99 -> 0.5)
    two = verdict.check_from_curves(0.99, grid, {"map": _curve(0.006, 0.99, 0.5), "contrast": _curve(0.006, 0.99, 0.5)})
    assert two is not None and math.isfinite(two.reference) and verdict.judge("m", "pcim", [two]).level == "detector"
    # nothing removable: no check
    assert verdict.check_from_curves(0.9, grid, {"map": [0.9] * len(grid), "contrast": [0.89] * len(grid)}) is None


def test_verdict_from_records_pools_each_target_over_the_plate():
    fr = trivial.HALVING.tolist()

    def rec(target, p0, fit, ref=None, **cands):
        result = {"prob_original": p0, "fit": fit}
        if ref is not None:
            result["stain_check"] = {"fractions": fr, "curves": {"map": _curve(ref, p0),
                                                                 **{k: _curve(v, p0) for k, v in cands.items()}}}
        return {"status": "done", "results": {target: result}}

    records = [rec("mitotic", 1.0, "ok", 0.004, **{"intensity:PH3": 0.004, "contrast": 0.05}),
               rec("mitotic", 0.8, "weak", 0.003, **{"intensity:PH3": 0.003, "contrast": 0.05}),
               rec("mitotic", 0.9, "ok"),  # a later field: labelled, not checked
               rec("negative", 0.9, "ok", 0.002, **{"intensity:PH3": 0.1, "contrast": 0.01}),
               rec("negative", 0.9, "ok"),
               {"status": "done", "results": {"mitotic": {"prob_original": 0.9}}}]  # made before fits were judged
    mitotic, negative = verdict.from_records(records, "pcim")
    assert (mitotic.target, mitotic.maps, mitotic.level, mitotic.trivial) == ("mitotic", 2, "detector", "intensity:PH3")
    assert mitotic.prob_original == pytest.approx(0.9) and mitotic.fits == {"ok": 2, "weak": 1}
    assert (negative.target, negative.level, negative.trivial) == ("negative", "more", "contrast")
    assert verdict.from_records(records[5:], "pcim") == []
    # a stain check of an older release (fine / coarse AUCs) is not read: no verdict, no error
    old = {"status": "done", "results": {"m": {"prob_original": 0.9, "fit": "ok",
                                               "stain_check": {"map": [0.4, 0.1], "contrast": [0.9, 0.9]}}}}
    assert verdict.from_records([old], "pcim") == []


# --- through the CLI -----------------------------------------------------------------------------------


def _ph3_reader_plate(tmp_path: Path, **explain_keys) -> Path:
    """Demo wells A01 (mitotic) with a TorchScript model that reads PH3 only."""
    _script(ChannelReader(1, 1000.0)).save(str(tmp_path / "ph3_reader.ts"))
    return make_plate(tmp_path, wells=("A01",), model={"path": "ph3_reader.ts"},
                      explain={"target": "mitotic", **explain_keys})


def _normalised(tmp_path: Path, site: int) -> np.ndarray:
    cfg = load_config(tmp_path / "plate.yaml")
    found, _ = images.discover_fields(cfg.plate.images, cfg.plate.pattern, cfg.plate.channels, None)
    src = next(s for s in found["A01"] if s.field == site)
    return images.normalize(images.read_field(src, 3), "percentile", low=1.0, high=99.8)


def _validate_store(path: Path) -> None:
    root = zarr.open_group(str(path), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)
        v05.HCS.from_zarr(root)
        v05.Image.from_zarr(root["A/1/0"])


#: the store keeps maps with 6 mantissa bits (io/store.py): a relative rounding of at most 2^-7
STORED = 2.0**-7


@pytest.mark.slow
@pytest.mark.parametrize("method", ["intensity", "contrast"])
def test_pcim_explain_writes_trivial_maps_into_a_valid_store(tmp_path, method):
    yaml_path = _ph3_reader_plate(tmp_path)
    proc = run_pcim("explain", str(yaml_path), "--set", f"explain.method={method}", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["counts"]["done"] == 2 and doc["verdicts"] == []  # trivial maps get no verdict against themselves
    _validate_store(tmp_path / "out" / "P1.zarr")
    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert (df["PCIM_Status"] == "done").all() and df["PCIM_DeletionAUC"].between(0, 1).all()
    for index in (0, 1):
        maps, labels, record = store.read_field(tmp_path / "out" / "P1.zarr", "A01", index)
        x = _normalised(tmp_path, record["site"])
        assert maps.shape == (1, 128, 128) and labels == ["mitotic"]
        if method == "intensity":  # auto: the channel the model reads, recorded
            assert record["results"]["mitotic"]["intensity_channel"] == "PH3"
            np.testing.assert_allclose(maps[0], np.clip(x[1], 0, None), rtol=STORED, atol=1e-6)
        else:
            flat = np.sort(x.reshape(len(x), -1), axis=1)
            median = flat[:, (flat.shape[1] - 1) // 2][:, None, None]  # torch's median: the lower middle value
            np.testing.assert_allclose(maps[0], np.abs(x - median).sum(0), rtol=STORED, atol=1e-6)
        assert record["settings"]["engine"]["intensity_channel"] is None


@pytest.mark.slow
def test_pcim_explain_says_when_the_classifier_is_a_stain_detector(tmp_path):
    yaml_path = _ph3_reader_plate(tmp_path, steps=30, lr=0.3)
    proc = run_pcim("explain", str(yaml_path), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (v,) = json.loads(proc.stdout)["verdicts"]
    assert v["level"] == "detector" and v["trivial"] == "intensity:PH3" and v["maps"] == 1  # first field of A01
    assert "the PH3 channel alone explains the classifier's mitotic calls as well as pcim's maps" in v["sentence"]
    assert f"verdict: {v['sentence']}" in proc.stderr
    _, _, record = store.read_field(tmp_path / "out" / "P1.zarr", "A01", 0)
    check = record["results"]["mitotic"]["stain_check"]
    assert check["fractions"] == pytest.approx(trivial.HALVING.tolist())
    curves = check["curves"]
    assert set(curves) == {"map", "intensity:DNA", "intensity:PH3", "intensity:Actin", "contrast"}
    # no map deletes faster than the read channel
    assert all(a <= b + 1e-6 for a, b in zip(curves["intensity:PH3"], curves["map"], strict=True))
    assert "stain_check" not in store.read_field(tmp_path / "out" / "P1.zarr", "A01", 1)[2]["results"]["mitotic"]
    plate_record = store.read_plate_record(tmp_path / "out" / "P1.zarr")
    assert plate_record["last_run"]["verdicts"][0]["level"] == "detector"
    # fidelity off: no stain check, no verdict
    quiet = run_pcim("explain", str(yaml_path), "--json", "--force", "--set", "explain.fidelity=false")
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["verdicts"] == []
    assert "stain_check" not in store.read_field(tmp_path / "out" / "P1.zarr", "A01", 0)[2]["results"]["mitotic"]


@pytest.mark.slow
def test_pcim_evaluate_reports_the_trivial_rows_the_channel_and_the_verdict(tmp_path):
    yaml_path = _ph3_reader_plate(tmp_path, steps=30, lr=0.3)
    masks = str(DEMO / "masks" / "{well}_s{field}.tif")
    proc = run_pcim("evaluate", str(yaml_path), "--masks", masks, "--methods", "pcim,saliency,intensity,contrast",
                    "--out", str(tmp_path / "ev"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["intensity_channel"] == "PH3"
    (v,) = doc["verdicts"]
    assert v["level"] == "detector" and "behaves as a PH3 detector" in v["sentence"]
    table = pd.read_csv(tmp_path / "ev" / "comparison.csv").set_index("method")
    assert list(table.index) == ["pcim", "saliency", "intensity", "contrast"]
    assert table["fine_deletion_auc"].between(0, 1).all()
    assert table.loc["intensity", "randomisation_spearman"] == pytest.approx(1.0)
    md = (tmp_path / "ev" / "comparison.md").read_text()
    assert "deletion 2% ↓" in md and "| intensity | 2 |" in md and v["sentence"] in md
    assert "explain.intensity_channel: PH3" in md
