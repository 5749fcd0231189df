"""The per-plate shortcut verdict: in which wells does the classifier call a class for the wrong reason?

Numbers in, findings (data with their sentence) out; no I/O. The numbers are the shares of each field's
map (engine/shares.py; `PCIM_Share_*` in the CSV): on objects, on the background (off objects), within
the field border, on saturated pixels, on tile seams. Per target class and well (the mean over the
well's fields explained for that class; a field whose PCIM_Fit is `absent` or `no-local-evidence` is
not judged: no local region carries the class; `failed` maps are, see UNJUDGED_FITS):

- off objects: more than OFF_OBJECTS of the map lies off the objects (labels or the automatic
  foreground mask);
- border: more than BORDER of the map lies within the field border;
- saturated: more than SATURATED of the map lies on saturated pixels;
- seams: more than SEAMS of the map lies on tile seams, and SEAM_ENRICHMENT times the seams' area;
- plate position: the wells of the plate's outer ring hold EDGE_RATIO times more of a share (off
  objects, border, saturated) than the inner wells, by at least EDGE_DIFFERENCE, and a one-sided
  Mann-Whitney test says so at p < EDGE_P (at least EDGE_MIN_WELLS wells on each side): an artefact
  that follows the plate position, as evaporation does.

Each rule that fires is one `Finding`
with the wells it concerns; a plate where none fires has no findings (the run says nothing). The
thresholds were chosen on the `shortcut` evaluation sets (benchmarks/shortcut_qc.py; docs/shortcuts.md
has the measurement).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OFF_OBJECTS = 0.5
BORDER = 0.4
SATURATED = 0.25
SEAMS = 0.6  # clean tiled maps (demo at 64 px tiles): at most 0.49 on seams covering 18 % of the field
SEAM_ENRICHMENT = 2.0
EDGE_RATIO = 2.0
EDGE_DIFFERENCE = 0.1
EDGE_P = 0.01
EDGE_MIN_WELLS = 3
#: PCIM_Fit labels whose maps are not judged: the class was not called (absent), or no local region
#: carries it. `failed` maps are judged: deleting them did not remove the class (evidence larger than the
#: budget, e.g. a border band), but they lie where the classifier looks: on the evaluation sets judging
#: them raised recall from 0.22-0.65 to 0.84-1.00 on border and debris shortcuts, while the clean
#: models' hit-class maps stayed quiet (benchmarks/shortcut_qc.py; docs/shortcuts.md)
UNJUDGED_FITS = frozenset({"absent", "no-local-evidence"})
LISTED = 12  # wells named in a sentence; the finding keeps them all

#: region -> (rule name, threshold, what "more than X of the map lies ..." says)
RULES: dict[str, tuple[str, float]] = {
    "background": ("off-objects", OFF_OBJECTS),
    "border": ("border", BORDER),
    "saturated": ("saturated", SATURATED),
    "seams": ("seams", SEAMS),
}
EDGE_REGIONS = ("background", "border", "saturated")
AREA_NAMES = {"border": "the border", "saturated": "saturated pixels", "seams": "the seams"}


@dataclass
class Finding:
    """One rule that fired for one target class on a plate."""

    rule: str  # off-objects | border | saturated | seams | plate-edge
    target: str
    sentence: str
    wells: list[str]  # the wells concerned (plate-edge: the outer ring's wells)
    judged: int  # wells judged for this target
    threshold: float
    region: str  # the share it is about: background | border | saturated | seams
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FieldShares:
    """The shares of one field's map for one target (None: the field has no such region)."""

    well: str
    site: int
    target: str
    shares: dict[str, float | None]  # region -> share of the map
    areas: dict[str, float | None] = field(default_factory=dict)  # region -> share of the field
    fit: str | None = None  # PCIM_Fit: ok | weak | failed | None (methods that fit nothing)


@dataclass
class Report:
    """The plate's findings, and the wells judged per target class."""

    findings: list[Finding] = field(default_factory=list)
    judged: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings], "judged": dict(self.judged)}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %" if 0 < v < 0.01 else f"{100 * v:.0f} %"


def well_means(fields: Iterable[FieldShares]) -> dict[str, dict[str, dict[str, float]]]:
    """target -> well -> region -> mean share over the well's judged fields (also `area:<region>`);
    fields whose PCIM_Fit is in UNJUDGED_FITS are left out."""
    sums: dict[str, dict[str, dict[str, list[float]]]] = {}
    for f in fields:
        if f.fit in UNJUDGED_FITS:
            continue
        per = sums.setdefault(f.target, {}).setdefault(f.well, {})
        for region, v in f.shares.items():
            if _finite(v):
                per.setdefault(region, []).append(float(v))
        for region, v in f.areas.items():
            if _finite(v):
                per.setdefault(f"area:{region}", []).append(float(v))
    return {t: {w: {r: sum(v) / len(v) for r, v in regions.items()} for w, regions in wells.items()}
            for t, wells in sums.items()}


def _listed(wells: Sequence[str]) -> str:
    shown = ", ".join(wells[:LISTED])
    return shown + (f" and {len(wells) - LISTED} more" if len(wells) > LISTED else "")


def _where(region: str, objects: str, border_px: int | None) -> str:
    if region == "background":
        return f"off {objects}"
    if region == "border":
        return "within " + (f"{border_px} px of" if border_px else "the border of") + " the field edge"
    if region == "saturated":
        return "on saturated pixels"
    return "on tile seams"


def _well_rule(target: str, region: str, wells: Mapping[str, Mapping[str, float]], objects: str,
               border_px: int | None) -> Finding | None:
    rule, threshold = RULES[region]
    judged = {w: v for w, v in wells.items() if region in v}
    if not judged:
        return None
    hit = [w for w, v in judged.items() if v[region] > threshold
           and (region != "seams" or v[region] > SEAM_ENRICHMENT * v.get(f"area:{region}", 0.0))]
    if not hit:
        return None
    hit = sorted(hit, key=lambda w: -judged[w][region])
    area = [v[f"area:{region}"] for v in judged.values() if f"area:{region}" in v]
    area_note = (f" ({AREA_NAMES[region]}: {_pct(sum(area) / len(area))} of the field)"
                 if area and region in AREA_NAMES else "")
    sentence = (f"{target}: in {len(hit)} of {len(judged)} wells more than {_pct(threshold)} of the map lies "
                f"{_where(region, objects, border_px)}{area_note}: {_listed(hit)}")
    return Finding(rule, target, sentence, hit, len(judged), threshold, region,
                   {"shares": {w: round(judged[w][region], 4) for w in hit}})


def mann_whitney_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided p-value that values of `a` tend to exceed those of `b` (normal approximation with the
    tie correction; exact enough from about 3 values per side for a screening decision)."""
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        return 1.0
    allv = sorted((v, i) for i, v in enumerate([*a, *b]))
    ranks = [0.0] * (n1 + n2)
    ties = 0.0
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[allv[k][1]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)  # continuity correction
    return 0.5 * math.erfc(z / math.sqrt(2))


def _edge_rule(target: str, region: str, wells: Mapping[str, Mapping[str, float]], edge: set[str],
               objects: str, border_px: int | None) -> Finding | None:
    outer = {w: v[region] for w, v in wells.items() if region in v and w in edge}
    inner = {w: v[region] for w, v in wells.items() if region in v and w not in edge}
    if len(outer) < EDGE_MIN_WELLS or len(inner) < EDGE_MIN_WELLS:
        return None
    m_out = sum(outer.values()) / len(outer)
    m_in = sum(inner.values()) / len(inner)
    ratio = m_out / m_in if m_in > 0 else math.inf
    p = mann_whitney_greater(list(outer.values()), list(inner.values()))
    if not (ratio >= EDGE_RATIO and m_out - m_in >= EDGE_DIFFERENCE and p < EDGE_P):
        return None
    what = {"background": f"share off {objects}", "border": "border share", "saturated": "share on saturated pixels"}
    times = "more than 100x" if not math.isfinite(ratio) or ratio > 100 else f"{ratio:.1f}x"
    sentence = (f"{target}: maps of edge wells (outer ring, {len(outer)} wells) hold {times} more "
                f"{what[region]} than inner wells ({len(inner)} wells): mean {_pct(m_out)} vs {_pct(m_in)} "
                f"(one-sided Mann-Whitney p = {p:.1g}); an artefact that follows the plate position, as "
                "evaporation does, may drive these calls")
    return Finding("plate-edge", target, sentence, sorted(outer, key=lambda w: -outer[w]), len(outer) + len(inner),
                   EDGE_RATIO, region, {"edge_mean": m_out, "inner_mean": m_in, "ratio": ratio, "p": p})


def decide(fields: Iterable[FieldShares], edge_wells: Iterable[str] = (), objects: str = "the objects",
           border_px: int | None = None) -> Report:
    """The plate's findings, per target class (most judged wells first) and rule; none when nothing is
    wrong.

    edge_wells: the wells of the plate's outer ring (io/plate.py `edge_wells`); objects: how the
    objects are named in sentences ("the Nuclei objects", "the DNA foreground"); border_px: the
    border's width."""
    fields = list(fields)
    means = well_means(fields)
    edge = set(edge_wells)
    out: list[Finding] = []
    for target, wells in sorted(means.items(), key=lambda kv: -len(kv[1])):
        for region in RULES:
            found = _well_rule(target, region, wells, objects, border_px)
            if found is not None:
                out.append(found)
        for region in EDGE_REGIONS:
            found = _edge_rule(target, region, wells, edge, objects, border_px)
            if found is not None:
                out.append(found)
    return Report(out, {t: len(w) for t, w in means.items()})


def flagged_wells(findings: Iterable[Finding]) -> dict[str, list[str]]:
    """well -> the rules that flag it (plate-edge flags no single well)."""
    out: dict[str, list[str]] = {}
    for f in findings:
        if f.rule == "plate-edge":
            continue
        for w in f.wells:
            out.setdefault(w, [])
            if f.rule not in out[w]:
                out[w].append(f.rule)
    return out


def objects_phrase(source: Mapping[str, Any] | None) -> str:
    """How sentences name the objects of a record's `qc.objects` entry."""
    source = source or {}
    if source.get("source") == "labels":
        return f"the {source.get('kind', '')} objects".replace("the  objects", "the objects")
    if source.get("source") == "foreground":
        return f"the {source.get('channel', '')} foreground (automatic mask)"
    return "the objects"


def fields_from_records(records: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[list[FieldShares], str,
                                                                                    int | None]:
    """The FieldShares of the (well, completion record) pairs of a plate's done fields (records without a
    `qc` entry are left out), how sentences name the objects, and the border width (when one)."""
    fields: list[FieldShares] = []
    phrases: set[str] = set()
    borders: set[int] = set()
    for well, record in records:
        qc = record.get("qc")
        if not isinstance(qc, Mapping) or "error" in qc:
            continue
        phrases.add(objects_phrase(qc.get("objects")))
        if isinstance(qc.get("border_px"), int):
            borders.add(qc["border_px"])
        site = record.get("site")
        for target, result in (record.get("results") or {}).items():
            found = result.get("shares") if isinstance(result, Mapping) else None
            if isinstance(found, Mapping):
                fields.append(FieldShares(well, site if isinstance(site, int) else 0, target, dict(found),
                                          dict(qc.get("areas") or {}), result.get("fit") or None))
    phrase = phrases.pop() if len(phrases) == 1 else "the objects"
    return fields, phrase, borders.pop() if len(borders) == 1 else None


def from_records(records: Iterable[tuple[str, Mapping[str, Any]]], edge_wells: Iterable[str] = ()) -> Report:
    """The plate's findings from the (well, completion record) pairs of its done fields: each record's
    `qc` entry (objects source, border width, region areas) and its targets' `shares`."""
    fields, phrase, border_px = fields_from_records(records)
    return decide(fields, edge_wells, objects=phrase, border_px=border_px)
