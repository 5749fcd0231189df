"""Maps of classes that are an absence, and a stain verdict that judges only what it can (issue 26).

Toy TorchScript classifiers with answers that follow from their definition:

- `SpotDetector` calls class 1 (`spot`) when channel 1 has a bright pixel anywhere (max pooling) and
  class 0 (`none`) otherwise. `none` rests on what is missing: no deletion of a region lowers it
  (deleting sets pixels to the channel mean, never brighter than the spot threshold), and the fully
  deleted field is still `none` -> PCIM_Fit `no-local-evidence`. On a field with a spot, p(none) is
  about 2e-9 -> `absent`. The spot itself is local evidence -> `ok`; a bright block of 100 px is evidence
  larger than the 2 % budget (the maximum survives any 15 px) -> `failed`, not no-local-evidence (the
  fully deleted field loses the class).
- `CheckerDetector` calls class 1 when channel 1 holds a small checkerboard (a texture), and ignores
  smooth blobs brighter than it (decoys): the intensity and contrast maps rank the decoys first and need
  more than twice the pixels of PCIM's map to remove the class; the verdict must not call it a stain
  detector (before issue 26, the deletion AUC over the top 0-2 % and 0-20 % did: "partly").
- `FlatIsNegative` is the demo classifier, except that a featureless field (every channel constant,
  i.e. fully deleted) is `negative`: through the installed `pcim` on demo wells, every negative map
  whose fit does not remove the class is `no-local-evidence`, never `failed`; explain.target:
  contrastive adds the runner-up's (mitotic) map to the fields called negative, `predicted` does not.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_runner import run_pcim
from model_factory import make_model
from plates import make_plate

from pcim_cli.engine import absence, trivial, verdict
from pcim_cli.engine.attribute import attribute
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.io import store, summary
from pcim_cli.report import fits as fit_words
from pcim_cli.run import evaluate

DEMO_MODEL = Path(__file__).resolve().parents[1] / "sample_plates" / "demo" / "classifier.ts"
H, W = 24, 32
OPTS = PcimOptions(steps=40, lr=0.3, resolution=2)


class SpotDetector(torch.nn.Module):
    """Logits (-s, s), s = 20 * (max of channel 1 - 0.5): `spot` when a pixel of channel 1 exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 20.0 * (torch.amax(x[:, 1], dim=(1, 2)) - 0.5)
        return torch.stack([-s, s], dim=1)


class CheckerDetector(torch.nn.Module):
    """Logits (-s, s), s = 40 * (max |2x2 checker filter| of channel 1 - 0.6): a texture, not a brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, 1:2]
        k = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]], dtype=x.dtype, device=x.device)
        r = torch.nn.functional.conv2d(c, k).abs()
        s = 40.0 * (torch.amax(r, dim=(1, 2, 3)) - 0.6)
        return torch.stack([-s, s], dim=1)


def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module.eval())


def _fields(n: int, spot: bool, block: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H, W, generator=gen) * 0.3
    if spot:
        x[:, 1, 10 : 10 + block, 12 : 12 + block] = 1.0
    return x


def _labels(model, x: torch.Tensor, target: int) -> list[str]:
    t = torch.full((len(x),), target, dtype=torch.long)
    r = attribute(model, x, t, "pcim", OPTS)
    full = absence.full_deletion_probs(model, x)[:, target]
    return [verdict.fit_quality(*(float(v) for v in vals))
            for vals in zip(r.prob_original, r.prob_mixed, r.prob_deleted, full, strict=True)]


# --- PCIM_Fit's labels, through the engine -------------------------------------------------------------


def test_a_class_resting_on_what_is_missing_is_no_local_evidence_and_one_not_in_the_field_is_absent():
    model = _script(SpotDetector())
    empty, spotted = _fields(3, spot=False), _fields(3, spot=True)
    assert _labels(model, empty, 0) == ["no-local-evidence"] * 3  # `none`: nothing to delete, the whole field keeps it
    assert _labels(model, spotted, 0) == ["absent"] * 3  # p(none) ~ 2e-9: not in the field
    assert _labels(model, spotted, 1) == ["ok"] * 3  # the spot is local evidence
    # evidence larger than the budget: a 10 x 10 block survives any 15 deleted pixels, but not the whole
    # field's deletion: the fit failed (it is pcim's to fix), it is not an absence
    assert _labels(model, _fields(2, spot=True, block=10), 1) == ["failed"] * 2


def test_fit_quality_thresholds_and_records_without_the_full_deletion():
    assert verdict.fit_quality(0.009, 0.9, 0.001, 1.0) == "absent"
    assert verdict.fit_quality(0.05, 0.9, 0.04, 0.01) == "absent"  # faint, and its map removes nothing
    assert verdict.fit_quality(0.05, 0.9, 0.001, 0.01) == "ok"  # faint, but its map holds it: a near miss
    assert verdict.fit_quality(0.99, 0.99, 0.98, 0.99) == "no-local-evidence"
    assert verdict.fit_quality(0.99, 0.99, 0.98, 0.5) == "failed"  # a featureless field at chance: not kept
    assert verdict.fit_quality(0.99, 0.99, 0.98) == "failed"  # a record made before issue 26
    assert verdict.fit_quality(0.99, 0.99, 0.98, float("nan")) == "failed"  # the model failed on it
    assert verdict.fit_quality(0.99, 0.99, 0.6, 0.99) == "no-local-evidence"  # a third, the whole field keeps it
    assert verdict.fit_quality(0.99, 0.99, 0.6, 0.1) == "weak"  # a third, and the whole field loses it
    assert verdict.fit_quality(0.99, 0.99, 0.01, 0.99) == "ok"  # a region removes it: local evidence
    assert verdict.fit_quality(0.99, float("nan"), float("nan"), 0.99) == ""  # a method that fits nothing
    assert summary.FITS == verdict.FIT_LABELS and set(verdict.JUDGED) < set(verdict.FIT_LABELS)


def test_the_runner_up_explains_a_call_without_local_evidence():
    model = _script(SpotDetector())
    empty = _fields(1, spot=False)
    probs = torch.softmax(model(empty), 1)[0]
    full = absence.full_deletion_probs(model, empty)[0]
    assert absence.contrastive_class(probs, full) == 1  # `none` kept by the featureless field -> `spot`'s map
    spotted = _fields(1, spot=True)
    assert absence.contrastive_class(torch.softmax(model(spotted), 1)[0],
                                    absence.full_deletion_probs(model, spotted)[0]) is None
    three = torch.tensor([0.7, 0.1, 0.2])
    assert absence.contrastive_class(three, torch.tensor([0.9, 0.05, 0.05])) == 2
    assert absence.contrastive_class(three, torch.tensor([float("nan")] * 3)) is None


# --- the verdict judges only what it can -----------------------------------------------------------------


def test_a_class_whose_maps_remove_nothing_gets_no_verdict_and_the_sentence_says_why():
    fr = trivial.HALVING.tolist()
    stain = {"map": [0.9] * len(fr), "intensity:PH3": [0.9, 0.8] + [0.05] * (len(fr) - 2), "contrast": [0.9] * len(fr)}

    def rec(target, fit):
        return {"status": "done", "results": {target: {"prob_original": 0.9, "fit": fit,
                                                       "stain_check": {"fractions": fr, "curves": stain}}}}

    (neg,) = verdict.from_records([rec("negative", "no-local-evidence")] * 8, "pcim")
    assert neg.level == "none" and neg.reason == "no-local-evidence" and neg.fits == {"no-local-evidence": 8}
    assert neg.sentence.startswith("negative: no verdict — its maps hold no local evidence")
    assert "(8 of 8 maps no-local-evidence)" in neg.sentence and "detector" not in neg.sentence
    (failed,) = verdict.from_records([rec("mitotic", "failed")] * 5 + [rec("mitotic", "ok")] * 3, "pcim")
    assert failed.level == "none" and failed.reason == "failed" and "(5 of 8 maps failed)" in failed.sentence
    (absent,) = verdict.from_records([rec("mitotic", "absent")] * 4, "pcim")
    assert absent.reason == "absent" and "absent from its fields" in absent.sentence
    # maps of fields where the class is absent (the runner-up's maps on a screen of negatives) veto nothing
    pos = {"status": "done", "results": {"mitotic": {"prob_original": 0.99, "fit": "ok", "stain_check": {
        "fractions": fr, "curves": {"map": [0.99, 0.9] + [0.01] * (len(fr) - 2), "contrast": [0.99] * len(fr)}}}}}
    (judged,) = verdict.from_records([pos] * 2 + [rec("mitotic", "absent")] * 9, "pcim")
    assert judged.level == "more" and judged.maps == 2 and judged.fits == {"ok": 2, "absent": 9}
    # `ok` maps whose own ranking needs 16 % of the pixels (8x a 2 % budget) to remove the class: the soft
    # mask deleted it, the map's top pixels do not; such maps are no reference for the stain
    diffuse = {"status": "done", "results": {"negative": {"prob_original": 0.99, "fit": "ok", "stain_check": {
        "fractions": fr, "curves": {"map": [0.99] * 8 + [0.01] * (len(fr) - 8),
                                    "intensity:PH3": [0.99, 0.01] + [0.01] * (len(fr) - 2)}}}}}
    (v,) = verdict.from_records([diffuse] * 3, "pcim")
    assert v.level == "none" and v.reason == "diffuse" and "does not remove it" in v.sentence
    grown = {"status": "done", "results": {"negative": {**diffuse["results"]["negative"], "budget": 0.08}}}
    assert verdict.from_records([grown] * 3, "pcim")[0].level == "detector"  # within 4x its own (grown) budget


def _checker_images(n: int = 3, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4 x 4 checkerboard (0 / 0.7) in channel 1 (the evidence, 0.17 % of the field) and two smooth
    Gaussian decoys peaking at 1.0 (about 1.7x the evidence's area above 0.7) in every channel."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=gen) * 0.05
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        y0, x0 = 20 + 8 * i, 60 - 6 * i
        board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 0.7
        x[i, 1, y0 : y0 + 4, x0 : x0 + 4] = board
        mask[i, y0 : y0 + 4, x0 : x0 + 4] = True
        for cy, cx in ((70.0, 20.0 + 5 * i), (30.0 + 4 * i, 25.0)):
            x[i] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.6**2))[None]
    return x.clamp(0, 1), mask


def test_a_stain_that_also_lights_decoys_is_not_as_good_as_a_map_of_the_evidence():
    x, mask = _checker_images()
    model = _script(CheckerDetector())
    target = torch.ones(len(x), dtype=torch.long)
    assert float(torch.softmax(model(x), 1)[:, 1].min()) > 0.99
    fields = [evaluate.EvalField("A01", i + 1, x[i], mask[i]) for i in range(len(x))]
    comp = evaluate.compare(model, x, target, fields, ["pcim", "intensity", "contrast"],
                            PcimOptions(steps=60, lr=0.3, resolution=2), 4, ["a", "b", "c"], ["no", "yes"])
    (v,) = comp.verdicts
    # the decoys come first in every map without a model: they need more than twice pcim's pixels
    assert v.level == "more" and v.share < verdict.PARTLY, v.sentence
    assert v.halving["trivial"] > 2 * v.halving["reference"]


# --- through the installed pcim -----------------------------------------------------------------------------


def _flat_is_negative_plate(tmp_path: Path, **explain) -> Path:
    make_model("flat-is-negative", tmp_path / "flat_is_negative.ts")
    return make_plate(tmp_path, wells=("A01", "A04", "A05", "B04"), steps=5, model={"path": "flat_is_negative.ts"},
                      explain=explain)


def test_pcim_labels_absence_maps_in_the_csv_json_and_summary(tmp_path):
    yaml_path = _flat_is_negative_plate(tmp_path, target="all")
    proc = run_pcim("explain", str(yaml_path), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert set(df["PCIM_Fit"]) <= set(verdict.FIT_LABELS)
    assert doc["fits"] == {k: int((df["PCIM_Fit"] == k).sum()) for k in verdict.FIT_LABELS}
    negative = df[df["PCIM_Target"] == "negative"]
    called_negative = negative[negative["PCIM_PredictedClass"] == "negative"]
    # the fully deleted field is negative: a negative map that removes nothing is no-local-evidence, never failed
    assert not called_negative["PCIM_Fit"].isin(["failed", "weak"]).any()
    assert (called_negative["PCIM_Fit"] == "no-local-evidence").any()
    assert (negative.loc[negative["PCIM_ProbOriginal"] < 0.01, "PCIM_Fit"] == "absent").all()
    assert (df.loc[df["PCIM_ProbOriginal"] < 0.01, "PCIM_Fit"] == "absent").all()
    # the summary line counts them, the note says it is no failure of pcim
    assert fit_words.counts_phrase(doc["fits"]) in doc["message"] and "no-local-evidence" in doc["message"]
    assert "Not a failure of pcim" in proc.stderr
    _, _, record = store.read_field(tmp_path / "out" / "P1.zarr", "A01", 0)
    assert all(0 <= r["prob_full_deleted"] <= 1 for r in record["results"].values())
    # no verdict for a class whose maps removed nothing, and the sentence says why
    by_target = {v["target"]: v for v in doc["verdicts"]}
    negative_fits = negative["PCIM_Fit"].value_counts()
    assert negative_fits.get("no-local-evidence", 0) * 2 > len(negative)  # most negative maps: no local evidence
    v = by_target["negative"]
    assert v["level"] == "none" and v["reason"] == "no-local-evidence" and v["trivial"] == ""
    assert v["sentence"].startswith("negative: no verdict — its maps hold no local evidence")
    assert f"verdict: {v['sentence']}" in proc.stderr
    # pcim status reads the same counts and the last run's verdicts back from the store alone
    status = run_pcim("status", str(tmp_path / "out" / "P1.zarr"), "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["fits"] == doc["fits"]
    shown = run_pcim("status", str(tmp_path / "out" / "P1.zarr")).stdout
    assert f"{doc['fits']['no-local-evidence']} no-local-evidence" in shown and f"verdict: {v['sentence']}" in shown


def test_pcim_contrastive_adds_the_runner_up_map_where_the_call_rests_on_what_is_missing(tmp_path):
    yaml_path = _flat_is_negative_plate(tmp_path, target="predicted")
    plain = run_pcim("explain", str(yaml_path), "--set", "explain.fidelity=false", "--set", "output.csv=plain.csv",
                     "--set", "output.zarr=plain.zarr")
    assert plain.returncode == 0, plain.stderr[-3000:]
    one = pd.read_csv(tmp_path / "plain.csv")  # predicted: one map per field, whatever its label
    assert len(one) == len(one[["Metadata_Well", "Metadata_Site"]].drop_duplicates())
    proc = run_pcim("explain", str(yaml_path), "--json", "--set", "explain.fidelity=false",
                    "--set", "explain.target=contrastive")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    for (_, _), rows in df.groupby(["Metadata_Well", "Metadata_Site"]):
        predicted = rows["PCIM_PredictedClass"].iloc[0]
        if predicted == "negative":  # featureless -> negative: the mitotic map answers "why not mitotic"
            assert sorted(rows["PCIM_Target"]) == ["mitotic", "negative"]
        else:
            assert list(rows["PCIM_Target"]) == ["mitotic"]
    assert (df["PCIM_PredictedClass"] == "negative").any() and (df["PCIM_PredictedClass"] == "mitotic").any()
    called = df[df["PCIM_PredictedClass"] == "negative"]
    site = called.iloc[0]
    maps, labels, record = store.read_field(tmp_path / "out" / "P1.zarr", site["Metadata_Well"],
                                            int(site["Metadata_Site"]) - 1)
    assert labels == ["negative", "mitotic"] and maps.shape[0] == 2 and record["contrastive"] == "mitotic"


@pytest.mark.parametrize("fits, words", [
    ({"ok": 3}, []),
    ({"ok": 1, "failed": 2}, ["weak (0) or failed (2)"]),
    ({"ok": 1, "no-local-evidence": 4, "absent": 2}, ["4 of 7 maps are no-local-evidence", "2 of 7 maps are absent"]),
])
def test_fit_advice_warns_only_for_fits_that_failed(fits, words):
    out = fit_words.advice(fits, "out.csv", 0.32)
    assert [w for w in words if not any(w in text for _, text in out)] == []
    levels = {text.split(" ")[3]: level for level, text in out}
    assert all(level == 20 for key, level in levels.items() if key in ("no-local-evidence", "absent"))
    assert len(out) == len(words)
