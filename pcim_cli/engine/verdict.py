"""Verdicts: numbers in, verdicts out (torch-free). Did a fit achieve its objective, and the per-plate
stain verdict: does a map without a model explain the classifier's calls as well?

## A fit's verdict (`fit_quality`, the CSV's PCIM_Fit)

A PCIM fit asks two things of its map (docs/method.md): the kept image (only the map's pixels) keeps
the target class, and the deleted image (everything but them) loses it. The record has both
probabilities, so every map says how well it did, relative to the original p(target):

    keep = p(kept) / p(original)          delete = 1 - p(deleted) / p(original)

- `ok`: delete >= 0.5 and keep >= 0.5 (deleting the map's pixels removes at least half of the class
  probability, and they alone keep at least half of it);
- `failed`: delete < 0.25 (deleting the map's pixels leaves more than 3/4 of the class probability:
  the map did not find what the model uses: evidence larger than the budget, or evidence that is an
  absence);
- `weak`: anything between.

## The stain verdict

Deletion measures how much of the decision a map explains: deleting the map's top pixels (set to the
channel mean) lowers p(target) from p0 to, on average over the deleted range, the deletion AUC D. The
decision a map explains is E = p0 - D. For the best trivial map T (engine/trivial.py: one channel's
intensity, or the contrast |x - deleted value|) and the method's maps M, the share

    share = E(T) / E(M), over the top 0-2 % (fine) and over the top 0-20 % (coarse) of pixels,

and the verdict takes the smaller of the two (the stain explains the calls only if it does so at both
scales). The best trivial map is the one with the lowest mean of its fine and coarse deletion AUCs
(the criterion that picks `intensity_channel: auto`). Levels:

- share >= 0.9: "detector": the stain alone explains the calls as well as the method's maps;
- 0.5 <= share < 0.9: "partly";
- share < 0.5: "more": the classifier uses more than any stain;
- neither the method's maps nor the trivial map lower p(target) by 0.05 at either scale: "none".

One verdict per target class (a classifier can be a PH3 detector for `mitotic` and something else for
`negative`). `pcim evaluate` computes it from its scores, `pcim explain` (explain.fidelity on) from
the field records' `stain_check` entries. Numbers in, `Verdict`s (data with their sentence) out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

DETECTOR = 0.9
PARTLY = 0.5
MIN_EXPLAINED = 0.05  # below this drop of p(target) the reference maps explain nothing to compare with

FIT_OK = 0.5  # keep and delete shares at or above which a fit is ok
FIT_FAILED = 0.25  # delete share below which a fit failed
FIT_LABELS = ("ok", "weak", "failed")


def fit_quality(prob_original: float, prob_mixed: float, prob_deleted: float) -> str:
    """'ok', 'weak' or 'failed' for one map (see the module's doc); '' when the method fits nothing."""
    values = (prob_original, prob_mixed, prob_deleted)
    if any(v is None or v != v for v in values) or prob_original <= 0:  # NaN: a baseline, no fit
        return ""
    keep = prob_mixed / prob_original
    delete = 1.0 - prob_deleted / prob_original
    if delete < FIT_FAILED:
        return "failed"
    return "ok" if delete >= FIT_OK and keep >= FIT_OK else "weak"


@dataclass
class Verdict:
    """The verdict of one plate, with the numbers behind it."""

    level: str  # detector | partly | more | none
    sentence: str
    target: str  # the class whose maps were compared
    reference: str  # the method whose maps are compared (pcim)
    trivial: str  # the best trivial map: "intensity:<channel>" or "contrast"
    share: float  # min(fine share, coarse share); NaN for level none
    prob_original: float  # mean p(target) of the maps
    deletion: dict[str, dict[str, float]] = field(default_factory=dict)  # {"fine"|"coarse": {reference, trivial}}
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)  # every trivial map: {fine, coarse}
    maps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percent(share: float) -> str:
    """Rounded down, so that a share just under a threshold never reads as the threshold (89.9 % -> 89 %)."""
    return f"{math.floor(max(share, 0.0) * 100)} %"


def describe(trivial: str) -> str:
    """'intensity:PH3' -> 'the PH3 channel'; 'contrast' -> a phrase for |x - deleted value|."""
    if trivial.startswith("intensity:"):
        return f"the {trivial.split(':', 1)[1]} channel"
    return "the contrast map (|x - deleted value| over all channels, no model)"


def decide(target: str, reference: str, prob_original: float, reference_aucs: tuple[float, float],
           candidates: Mapping[str, tuple[float, float]], maps: int = 0) -> Verdict | None:
    """The verdict from mean deletion AUCs: the reference method's (fine, coarse) and each trivial map's.

    Returns None when there is no trivial candidate.
    """
    cands = {k: v for k, v in candidates.items() if all(math.isfinite(a) for a in v)}
    if not cands or not all(math.isfinite(a) for a in (prob_original, *reference_aucs)):
        return None
    best = min(cands, key=lambda k: (cands[k][0] + cands[k][1]) / 2)
    (ref_fine, ref_coarse), (t_fine, t_coarse) = reference_aucs, cands[best]
    explained_ref = [prob_original - ref_fine, prob_original - ref_coarse]
    explained_t = [prob_original - t_fine, prob_original - t_coarse]
    numbers = {"fine": {"reference": ref_fine, "trivial": t_fine},
               "coarse": {"reference": ref_coarse, "trivial": t_coarse}}
    shown = (f"deletion AUC top 2 %: {t_fine:.3f} vs {ref_fine:.3f}, top 20 %: {t_coarse:.3f} vs "
             f"{ref_coarse:.3f}; p(target) {prob_original:.3f}" + (f"; {maps} maps" if maps else ""))
    what = describe(best)
    common = {"target": target, "reference": reference, "trivial": best, "prob_original": prob_original,
              "deletion": numbers, "maps": maps,
              "candidates": {k: {"fine": v[0], "coarse": v[1]} for k, v in cands.items()}}
    if max(*explained_ref, *explained_t) < MIN_EXPLAINED:
        return Verdict("none", f"on this plate, deleting the top pixels of neither {reference}'s maps nor the stain "
                       f"lowers p({target}) much, so there is nothing to compare ({shown})",
                       share=float("nan"), **common)
    share = min(e_t / max(e_r, 1e-9) for e_t, e_r in zip(explained_t, explained_ref, strict=True))
    if share >= DETECTOR:
        detector = (f"a {best.split(':', 1)[1]} detector" if best.startswith("intensity:")
                    else "a contrast detector (it keys on where the field differs from its background)")
        sentence = (f"on this plate, {what} alone explains the classifier's {target} calls as well as "
                    f"{reference}'s maps: the classifier behaves as {detector}")
        level = "detector"
    elif share >= PARTLY:
        sentence = (f"on this plate, {what} alone explains {_percent(share)} of what {reference}'s maps explain "
                    f"of the classifier's {target} calls: the classifier relies on the stain in part")
        level = "partly"
    else:
        sentence = (f"on this plate, {reference}'s maps explain the classifier's {target} calls better than any "
                    f"map without a model (best: {what}, {_percent(share)}): the classifier uses more than "
                    "the stain")
        level = "more"
    return Verdict(level, f"{sentence} ({shown})", share=share, **common)


def from_records(records: Iterable[Mapping[str, Any]], reference: str) -> list[Verdict]:
    """The plate's verdicts (one per target class, most maps first) from the completion records of its
    done fields: their `stain_check` entries, written by `pcim explain` with explain.fidelity on."""
    sums: dict[str, dict[str, Any]] = {}
    for record in records:
        for target, result in (record.get("results") or {}).items():
            check = result.get("stain_check") if isinstance(result, Mapping) else None
            if not check or "map" not in check:
                continue
            values = [result.get("prob_original"), *check["map"]]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                continue
            acc = sums.setdefault(target, {"n": 0, "p0": 0.0, "ref": [0.0, 0.0], "cands": {}})
            acc["n"] += 1
            acc["p0"] += values[0]
            acc["ref"] = [acc["ref"][0] + values[1], acc["ref"][1] + values[2]]
            for name, (fine, coarse) in check.items():
                if name != "map":
                    c = acc["cands"].setdefault(name, [0.0, 0.0, 0])
                    c[0], c[1], c[2] = c[0] + fine, c[1] + coarse, c[2] + 1
    out = []
    for target, acc in sorted(sums.items(), key=lambda kv: -kv[1]["n"]):
        n = acc["n"]
        means = {k: (v[0] / v[2], v[1] / v[2]) for k, v in acc["cands"].items() if v[2] == n}
        found = decide(target, reference, acc["p0"] / n, (acc["ref"][0] / n, acc["ref"][1] / n), means, maps=n)
        if found is not None:
            out.append(found)
    return out
