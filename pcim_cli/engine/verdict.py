"""Verdicts: numbers in, verdicts out (torch-free). Did a fit achieve its objective, and the per-plate
stain verdict: does a map without a model explain the classifier's calls as well?

## A fit's verdict (`fit_quality`, the CSV's PCIM_Fit)

A PCIM fit asks two things of its map (docs/method.md): the kept image (only the map's pixels) keeps
the target class, and the deleted image (everything but them) loses it. The record has both
probabilities, so every map says how well it did, relative to the original p(target):

    keep = p(kept) / p(original)          delete = 1 - p(deleted) / p(original)

and, with one more forward pass per field, p(target) of the FULLY deleted field (every pixel at its
channel's mean, and every pixel at its channel's median: the smaller of the two; engine/absence.py):
does the class survive deleting everything? Labels (docs/verdicts.md; thresholds measured on every
class of every evaluation set):

- `absent`: p(original) < P_ABSENT (0.01), or < P_FAINT (0.1) with a fit that did not remove it
  (delete < FIT_OK): the class is not in the field; there is nothing to delete, and the keep / delete
  shares of so small a probability mean nothing. (A faint class whose map does remove it, a near miss,
  keeps the fit's label: its map holds the weak evidence.)
- `no-local-evidence`: the fit did not remove the class (delete < FIT_OK) and the fully deleted image
  still gives it (p(full deletion) >= FULL_KEEP * p(original)): the class rests on what is missing
  (a "negative" call: no mitotic cell), not on pixels a map could hold. Not a failure of the fit;
- `ok`: delete >= 0.5 and keep >= 0.5 (deleting the map's pixels removes at least half of the class
  probability, and they alone keep at least half of it);
- `failed`: delete < 0.25 (deleting the map's pixels leaves more than 3/4 of the class probability
  although deleting everything removes it: evidence larger than the budget, or a model that reads
  the evidence poorly);
- `weak`: anything between.

## The stain verdict

Compared at the evidence's own scale: for each checked map, the smallest share of pixels whose
deletion (set to the fit's deletion substrate, explain.delete_substrate: the channel median by
default) halves p(target) (`halving_share`), for the
method's map (s_M) and for every trivial map T (one channel's intensity, or the contrast |x - deleted
value|; s_T). The ratio r = s_M / s_T says how the stain does against the method's map: 1 = it needs
as many pixels, 0.5 = twice as many. Over a class's maps the ratios are pooled as a geometric mean, and
the best trivial map is the one with the largest. A deletion curve that never halves p(target) within
the grid (32 % of the pixels) counts as needing twice the grid's last share. Levels:

- r >= DETECTOR (0.9): "detector": the stain removes the calls with as few pixels as the method's maps;
- PARTLY (0.5) <= r < 0.9: "partly";
- r < 0.5: "more": the stain needs more than twice the pixels: the classifier uses more than any stain;
- "none": no verdict, with the reason. A class is judged only from maps whose fit holds evidence
  (PCIM_Fit ok or weak, `JUDGED`); when fewer than half of its maps on the fields where it is
  present do (they failed, or it rests on what is missing: no-local-evidence), when it is absent from
  every field, or when none of its checked maps holds evidence, the sentence says so instead of
  comparing maps that removed nothing. A checked map is a reference only where its own top pixels
  remove the class (halving share <= SUPPORT x its budget): a soft mask can delete a class through
  small changes to many pixels that its ranking does not reproduce; when most checked maps are not,
  no verdict either ("diffuse").

Why not the deletion AUC over the top 0-20 %: there, any map that covers every bright blob deletes a
small evidence too (a marker that also lights debris the classifier ignores, at 45x the evidence's
area, "explained 79 %" of the calls); the halving share asks how many pixels each map needs.

One verdict per target class (a classifier can be a PH3 detector for `mitotic` and something else for
`negative`). `pcim evaluate` computes it from its scores, `pcim explain` (explain.fidelity on) from
the field records' `stain_check` entries. Numbers in, `Verdict`s (data with their sentence) out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

FIT_OK = 0.5  # keep and delete shares at or above which a fit is ok
FIT_FAILED = 0.25  # delete share below which a fit failed
P_ABSENT = 0.01  # p(original) below which the class is absent from the field
P_FAINT = 0.1  # p(original) below which a class whose map removes nothing is absent (not failed)
FULL_KEEP = 0.75  # share of p(original) the fully deleted image keeps for a class without local evidence
#: every PCIM_Fit label; the first three judge the fit, the last two say what the class is
FIT_LABELS = ("ok", "weak", "failed", "absent", "no-local-evidence")
#: the labels of maps that hold evidence (a stain verdict may judge them)
JUDGED = ("ok", "weak")

DETECTOR = 0.9
PARTLY = 0.5
#: the stain check's grid (engine/trivial.py): no deletion, then doubling shares of the pixels from
#: 0.125 % to 32 %: 10 forward passes per map, a share read to within a factor of 2 at every scale
HALVING = (0.0, 0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
GRID_END = HALVING[-1]  # the last share of the stain check's grid (32 %)
MIN_REMOVABLE = 0.1  # a map is compared only where some deletion removes this share of p(target)
#: a map is a reference only where its own top pixels, within this many times its budget, remove half of
#: what deletion can remove: a fit can be `ok` through the soft mixing of many pixels while the map's
#: ranking deletes nothing (measured on negative classes of max-pooling models: 17-64 % of the pixels)
SUPPORT = 4.0
BUDGET = 0.02  # the budget a record without one was fitted with (PcimOptions' default)
#: why a class gets no verdict, by the PCIM_Fit label most of its maps carry
REASONS = {
    "no-local-evidence": "its maps hold no local evidence (the class rests on what is missing: deleting "
                         "any region, or the whole field, leaves it), so there is no map to compare",
    "absent": f"the class is absent from its fields (p below {P_ABSENT:g}): there is nothing to delete",
    "failed": "its maps failed (deleting their pixels left the class: see PCIM_Fit), so there is no "
              "faithful map to compare the stain with",
    "diffuse": "deleting the top pixels of its maps does not remove it (they need more than "
               f"{SUPPORT:g} times their budget to halve what deletion can remove), so there is no "
               "faithful map to compare the stain with",
}

def fit_quality(prob_original: float, prob_mixed: float, prob_deleted: float,
                prob_full_deleted: float | None = None) -> str:
    """PCIM_Fit of one map (see the module's doc); '' when the method fits nothing (NaN probabilities).

    Without `prob_full_deleted` (a record from before issue 26, or a model that gave no finite
    probability for the fully deleted image) the class is never called `no-local-evidence`.
    """
    values = (prob_original, prob_mixed, prob_deleted)
    if any(v is None or v != v for v in values) or prob_original <= 0:  # NaN: a baseline, no fit
        return ""
    if prob_original < P_ABSENT:
        return "absent"
    keep = prob_mixed / prob_original
    delete = 1.0 - prob_deleted / prob_original
    if delete < FIT_OK and prob_original < P_FAINT:
        return "absent"
    full = prob_full_deleted
    if (delete < FIT_OK and full is not None and math.isfinite(full)
            and full >= FULL_KEEP * prob_original):
        return "no-local-evidence"
    if delete < FIT_FAILED:
        return "failed"
    return "ok" if delete >= FIT_OK and keep >= FIT_OK else "weak"


def halving_share(curve: Sequence[float], fractions: Sequence[float] = HALVING, floor: float = 0.0,
                  level: float = 0.5) -> float:
    """The smallest share of pixels whose deletion removes `level` of what deletion can remove of
    p(target): the curve falls to p0 - level * (p0 - floor), p0 its first point (share 0) and floor
    the lowest p(target) deletion reaches in the field (default 0: halving p(target); a 2-class model
    whose featureless image sits at 0.5 never goes below it). Linearly interpolated between the grid's
    points; inf where the curve never gets there. curve: probabilities at `fractions`."""
    c = [float(v) for v in curve]
    goal = c[0] - level * (c[0] - float(floor))
    for j in range(1, len(c)):
        if c[j] <= goal:
            p_hi, p_lo = c[j - 1], c[j]
            t = 1.0 if p_hi == p_lo else (p_hi - goal) / (p_hi - p_lo)
            return float(fractions[j - 1]) + min(max(t, 0.0), 1.0) * float(fractions[j] - fractions[j - 1])
    return float("inf")


@dataclass
class Verdict:
    """The verdict of one class on a plate, with the numbers behind it."""

    level: str  # detector | partly | more | none (no verdict)
    sentence: str
    target: str  # the class whose maps were compared
    reference: str  # the method whose maps are compared (pcim)
    trivial: str  # the best trivial map: "intensity:<channel>" or "contrast"; "" without a verdict
    share: float  # r = s_reference / s_trivial (geometric mean over maps); NaN without a verdict
    prob_original: float  # mean p(target) of the maps compared (NaN without a verdict)
    halving: dict[str, float] = field(default_factory=dict)  # {reference, trivial}: geometric mean share to halve p
    candidates: dict[str, float] = field(default_factory=dict)  # every trivial map's r
    maps: int = 0  # maps compared
    fits: dict[str, int] = field(default_factory=dict)  # PCIM_Fit labels of all the class's maps
    reason: str = ""  # no verdict: the PCIM_Fit label that rules it out (failed, absent, ...) or "unchecked"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MapCheck:
    """One checked map: p(target) and the shares of pixels whose deletion halves it, per map."""

    prob_original: float
    reference: float  # halving share of the method's map (inf: never within the grid)
    candidates: dict[str, float]  # trivial map name -> halving share
    budget: float = BUDGET  # the share of the field the method's map could keep

    @property
    def faithful(self) -> bool:
        """Do the map's own top pixels (within SUPPORT x its budget) remove the class?"""
        return self.reference <= SUPPORT * self.budget


def _percent(share: float) -> str:
    """Rounded down, so that a share just under a threshold never reads as the threshold (89.9 % -> 89 %)."""
    return f"{math.floor(max(share, 0.0) * 100)} %"


def _pixels(share: float) -> str:
    """A share of pixels, or 'more than 32 %' for a curve that never halved p."""
    if not math.isfinite(share):
        return f"> {GRID_END * 100:g} %"
    return f"{share * 100:.2g} %" if share < 0.1 else f"{share * 100:.0f} %"


def describe(trivial: str) -> str:
    """'intensity:PH3' -> 'the PH3 channel'; 'contrast' -> a phrase for |x - deleted value|."""
    if trivial.startswith("intensity:"):
        return f"the {trivial.split(':', 1)[1]} channel"
    return "the contrast map (|x - deleted value| over all channels, no model)"


def _capped(share: float) -> float:
    return share if math.isfinite(share) else 2 * GRID_END


def _geomean(values: Sequence[float]) -> float:
    """The geometric mean of shares (a curve that never halved p counts as twice the grid's last share):
    over the same maps, gm(s_M) / gm(s_T) is the pooled ratio r, so the sentence's figures give its level."""
    v = [math.log(_capped(x)) for x in values]
    return math.exp(sum(v) / len(v)) if v else float("nan")


def no_verdict(target: str, reference: str, fits: Mapping[str, int], reason: str, count: int | None = None) -> Verdict:
    """The 'no verdict' of a class, with the count of its maps that rule it out (`count`, default: its
    maps with that PCIM_Fit label)."""
    total = sum(fits.values())
    if reason == "diffuse":
        why = f"{REASONS[reason]} ({count} of the {total} maps' checks)"
    elif reason in REASONS:
        why = f"{REASONS[reason]} ({fits.get(reason, 0) if count is None else count} of {total} maps {reason})"
    else:  # judged maps exist, but none was checked (fidelity off, or only later fields)
        why = "none of its maps that hold evidence had a stain check (the first field of each well is checked)"
    return Verdict("none", f"{target}: no verdict — {why}", target=target, reference=reference, trivial="",
                   share=float("nan"), prob_original=float("nan"), fits=dict(fits), reason=reason)


def judge(target: str, reference: str, checks: Sequence[MapCheck], fits: Mapping[str, int] | None = None) -> Verdict:
    """The verdict of one class from its checked maps (those whose fit holds evidence) and the PCIM_Fit
    labels of all its maps (`fits`; default: every check counts as ok)."""
    fits = dict(fits) if fits else {"ok": len(checks)}
    total = sum(fits.values())
    judged = sum(fits.get(k, 0) for k in JUDGED)
    present = total - fits.get("absent", 0)  # a class absent from a field says nothing about its maps elsewhere
    if total and present == 0:
        return no_verdict(target, reference, fits, "absent")
    if judged * 2 < present:
        unjudged = Counter({k: v for k, v in fits.items() if k not in (*JUDGED, "absent")})
        return no_verdict(target, reference, fits, unjudged.most_common(1)[0][0] if unjudged else "failed")
    names = sorted({n for c in checks for n in c.candidates})
    ratios: dict[str, list[float]] = {n: [] for n in names}
    used = []
    for c in checks:
        if not c.faithful:
            continue  # the map's ranking does not remove the class: no reference to compare the stain with
        used.append(c)
        for n in names:
            s_t = c.candidates.get(n, float("inf"))
            ratios[n].append(_capped(c.reference) / _capped(s_t))
    if not used or not names or len(used) * 2 < len(checks):
        return no_verdict(target, reference, fits, "diffuse" if checks else "unchecked", len(checks) - len(used))
    score = {n: math.exp(sum(math.log(r) for r in v) / len(v)) for n, v in ratios.items() if v}
    best = max(score, key=lambda n: score[n])
    share = score[best]
    s_ref = _geomean([c.reference for c in used])
    s_t = _geomean([c.candidates.get(best, float("inf")) for c in used])
    p0 = sum(c.prob_original for c in used) / len(used)
    skipped = total - judged
    shown = (f"pixels whose deletion halves p({target}), geometric mean over maps: {_pixels(s_t)} for the stain, "
             f"{_pixels(s_ref)} for {reference}'s maps; {len(used)} maps" + (f"; {skipped} of {total} maps not judged "
                                                             "(PCIM_Fit)" if skipped else ""))
    what = describe(best)
    common = {"target": target, "reference": reference, "trivial": best, "prob_original": p0,
              "halving": {"reference": s_ref, "trivial": s_t}, "maps": len(used), "fits": fits,
              "candidates": score}
    if share >= DETECTOR:
        detector = (f"a {best.split(':', 1)[1]} detector" if best.startswith("intensity:")
                    else "a contrast detector (it keys on where the field differs from its background)")
        sentence = (f"on this plate, {what} alone explains the classifier's {target} calls as well as "
                    f"{reference}'s maps: the classifier behaves as {detector}")
        level = "detector"
    elif share >= PARTLY:
        sentence = (f"on this plate, {what} alone needs {1 / share:.1f}x the pixels of {reference}'s maps to "
                    f"remove the classifier's {target} calls (it explains {_percent(share)} as well): the classifier "
                    "relies on the stain in part")
        level = "partly"
    else:
        sentence = (f"on this plate, {reference}'s maps explain the classifier's {target} calls better than any "
                    f"map without a model (best: {what}, which needs {1 / share:.1f}x the pixels to remove them): "
                    "the classifier uses more than the stain")
        level = "more"
    return Verdict(level, f"{sentence} ({shown})", share=share, **common)


def from_records(records: Iterable[Mapping[str, Any]], reference: str) -> list[Verdict]:
    """The plate's verdicts (one per target class, most maps first) from the completion records of its
    done fields: their PCIM_Fit labels (`fit`) and `stain_check` entries (written by `pcim explain`
    with explain.fidelity on, for the maps of each well's first field). A class none of whose maps
    was checked gets no entry, unless its labels alone rule a verdict out."""
    fits: dict[str, Counter] = {}
    checks: dict[str, list[MapCheck]] = {}
    for record in records:
        for target, result in (record.get("results") or {}).items():
            if not isinstance(result, Mapping):
                continue
            label = result.get("fit") or ""
            if label:
                fits.setdefault(target, Counter())[label] += 1
            check = _map_check(result)
            if check is not None and label in (*JUDGED, ""):  # "": a method that fits nothing
                checks.setdefault(target, []).append(check)
    out = []
    for target in sorted({*fits, *checks}, key=lambda t: -sum(fits.get(t, {}).values()) - len(checks.get(t, []))):
        v = judge(target, reference, checks.get(target, []), fits.get(target))
        if v.level != "none" or v.reason != "unchecked":
            out.append(v)
    return out


def check_from_curves(prob_original: float, fractions: Sequence[float],
                      curves: Mapping[str, Sequence[float]], budget: float | None = None) -> MapCheck | None:
    """The MapCheck of one map from its deletion curves ("map": the method's, the others trivial maps'):
    each map's share of pixels that removes half of what deletion can remove of p(target) in this field
    (from p(target) without deletion down to the lowest point of any curve: a 2-class model's
    featureless image may sit at 0.5, which no deletion goes below). None when the curves are not
    usable (not finite, wrong length) or when no deletion removes at least MIN_REMOVABLE of p(target)."""
    fr = [float(f) for f in fractions]
    if "map" not in curves:
        return None
    flat = {}
    for name, curve in curves.items():
        c = list(curve.tolist() if hasattr(curve, "tolist") else curve)  # a sequence, or a tensor / array
        c = [float(v) for v in (c[0] if len(c) == 1 and isinstance(c[0], (list, tuple)) else c)]
        if len(c) != len(fr) or not all(math.isfinite(v) for v in c):
            return None
        flat[name] = c
    p0 = flat["map"][0]
    floor = min(min(c) for c in flat.values())
    if p0 - floor < MIN_REMOVABLE * max(p0, 1e-12):
        return None
    shares = {name: halving_share(c, fr, floor) for name, c in flat.items()}
    ref = shares.pop("map")
    return MapCheck(float(prob_original), ref, shares, BUDGET if budget is None else float(budget))


def _map_check(result: Mapping[str, Any]) -> MapCheck | None:
    """The MapCheck of a record's result, or None (no check, or one made before issue 26)."""
    check = result.get("stain_check")
    p0 = result.get("prob_original")
    if not isinstance(check, Mapping) or "curves" not in check or not isinstance(p0, (int, float)):
        return None
    budget = result.get("budget")
    return check_from_curves(p0, check["fractions"], check["curves"],
                             budget if isinstance(budget, (int, float)) and budget > 0 else None)
