"""engine/shortcuts.py: numbers in, findings out (hand-made shares; the thresholds are the module's)."""

from __future__ import annotations

import math

import pytest

from pcim_cli.engine import shortcuts as sc


def _f(well, background=0.1, border=0.1, saturated=0.0, target="mitotic", fit="ok", seams=None, site=1):
    shares = {"objects": 1 - background, "background": background, "border": border, "saturated": saturated,
              "seams": seams}
    return sc.FieldShares(well, site, target, shares, {"border": 0.18, "saturated": 0.001, "seams": 0.2}, fit)


def _wells(n_rows=4, n_cols=6):
    return [f"{'ABCDEFGH'[r]}{c + 1:02d}" for r in range(n_rows) for c in range(n_cols)]


def _edge(n_rows=4, n_cols=6):
    return [f"{'ABCDEFGH'[r]}{c + 1:02d}" for r in range(n_rows) for c in range(n_cols)
            if r in (0, n_rows - 1) or c in (0, n_cols - 1)]


def test_a_clean_plate_is_quiet():
    fields = [_f(w, background=0.2 + 0.01 * i, border=0.15) for i, w in enumerate(_wells())]
    assert sc.decide(fields, _edge()).findings == []


def test_off_object_wells_are_named_most_off_first():
    fields = [_f(w) for w in _wells()]
    fields[3] = _f("A04", background=0.7)
    fields[10] = _f("B05", background=0.9)
    fields += [_f("B05", background=0.9, site=2)]
    found = sc.decide(fields, _edge(), objects="the Nuclei objects").findings
    assert [f.rule for f in found] == ["off-objects"]
    assert found[0].wells == ["B05", "A04"] and found[0].judged == 24
    assert found[0].sentence.startswith("mitotic: in 2 of 24 wells more than 50 % of the map lies off the Nuclei "
                                        "objects: B05, A04")


def test_the_mean_over_a_wells_fields_decides_and_absent_maps_are_not_judged():
    fields = [_f("A01", background=0.9), _f("A01", background=0.0, site=2),  # mean 0.45: not flagged
              _f("A02", background=0.9, fit="absent"), _f("A04", background=0.9, fit="no-local-evidence"),
              _f("A03", background=0.6), _f("A05", background=0.8, fit="failed")]  # failed maps are judged
    found = sc.decide(fields).findings
    assert found[0].wells == ["A05", "A03"] and found[0].judged == 3
    assert sc.well_means(fields)["mitotic"]["A01"]["background"] == pytest.approx(0.45)


def test_each_target_class_is_judged_on_its_own():
    fields = [_f("A01", background=0.9, target="negative"), _f("A02", background=0.9, target="mitotic"),
              _f("A03", target="mitotic")]
    found = sc.decide(fields).findings
    assert {(f.target, tuple(f.wells)) for f in found} == {("negative", ("A01",)), ("mitotic", ("A02",))}
    assert found[0].target == "mitotic"  # most judged wells first


def test_border_saturated_and_seam_rules():
    fields = [_f("A01", border=0.5), _f("A02", saturated=0.3), _f("A03", seams=0.7), _f("A04", seams=0.5)]
    found = {f.rule: f for f in sc.decide(fields, border_px=6).findings}
    assert set(found) == {"border", "saturated", "seams"}
    assert found["border"].wells == ["A01"] and "within 6 px of the field edge" in found["border"].sentence
    assert "within 6 px of the field edge (the border: 18 % of the field): A01" in found["border"].sentence
    assert "on saturated pixels (saturated pixels: 0.1 % of the field): A02" in found["saturated"].sentence
    assert found["saturated"].wells == ["A02"]
    assert found["seams"].wells == ["A03"]
    # seams must also be SEAM_ENRICHMENT x their area: 0.7 on seams covering 40 % of the field is not enough
    wide = sc.FieldShares("A05", 1, "mitotic", {"seams": 0.7}, {"seams": 0.4}, "ok")
    assert sc.decide([wide]).findings == []


def test_edge_wells_holding_more_border_share_are_reported():
    edge = set(_edge(8, 12))
    fields = [_f(w, border=0.3 if w in edge else 0.1) for w in _wells(8, 12)]
    found = sc.decide(fields, edge).findings
    assert [f.rule for f in found] == ["plate-edge"]
    f = found[0]
    assert f.region == "border" and len(f.wells) == 36 and f.judged == 96
    assert f.numbers["ratio"] == pytest.approx(3.0)
    assert "maps of edge wells (outer ring, 36 wells) hold 3.0x more border share than inner wells (60 wells)" \
        in f.sentence
    # the same numbers without plate positions: no edge finding
    assert sc.decide(fields).findings == []
    # a difference too small to matter is not reported, however consistent
    small = [_f(w, border=(0.06 if w in edge else 0.02)) for w in _wells(8, 12)]
    assert sc.decide(small, edge).findings == []


def test_mann_whitney_p_values():
    assert sc.mann_whitney_greater([5, 6, 7, 8, 9], [0, 1, 2, 3, 4]) < 0.01
    assert sc.mann_whitney_greater([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]) > 0.99
    assert 0.3 < sc.mann_whitney_greater([1, 1, 1], [1, 1, 1]) <= 1.0
    assert sc.mann_whitney_greater([], [1.0]) == 1.0


def test_flagged_wells_and_nan_shares():
    fields = [_f("A01", background=0.8, border=0.5), _f("A02", background=math.nan)]
    found = sc.decide(fields).findings
    assert sc.flagged_wells(found) == {"A01": ["off-objects", "border"]}
    assert all("A02" not in f.wells for f in found)


def test_the_report_counts_the_wells_judged_per_class():
    fields = [_f("A01", target="negative"), _f("A02", target="negative", fit="absent"),
              _f("A03", target="negative", fit="no-local-evidence"), _f("A04"), _f("A04", site=2)]
    report = sc.decide(fields)
    assert report.judged == {"negative": 1, "mitotic": 1}
    assert report.to_dict() == {"findings": [], "judged": {"negative": 1, "mitotic": 1}}
