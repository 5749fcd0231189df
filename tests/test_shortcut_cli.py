"""The shortcut QC through the installed `pcim` on real plates (docs/shortcuts.md): a classifier that calls
wells for a glare spot at the field edge is flagged (CSV shares, the run's sentences, --json, the plate
record, render's shortcuts.png and report.html); the bundled classifier on the clean plate is quiet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from model_factory import make_model
from plates import make_plate

from pcim_cli.io import store

GLARE_WELLS = ("A04", "A05", "B04")  # DMSO (negative) wells: only the glare can make them mitotic
MITOTIC_WELLS = ("A01", "A02", "B01")
SHARES = ["PCIM_Share_OnObjects", "PCIM_Share_Background", "PCIM_Share_Border", "PCIM_Share_Saturated"]


def _glare(root: Path) -> None:
    """A 5 x 6 px spot at the detector's ceiling in every channel, 1 px from the top edge, off the nuclei."""
    for well in GLARE_WELLS:
        for path in (root / "images").glob(f"{well}_s*_w*.tif"):
            image = tifffile.imread(path)
            image[1:6, 60:66] = 65535
            tifffile.imwrite(path, image)


def _explain(pcim, yaml: Path, *extra: str) -> dict:
    proc = pcim("explain", str(yaml), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return {"json": json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


@pytest.mark.slow
def test_a_classifier_that_looks_at_an_edge_glare_is_flagged(pcim, tmp_path):
    yaml = make_plate(tmp_path, wells=(*MITOTIC_WELLS, *GLARE_WELLS), steps=49, objects=True,
                      model={"path": "glare.ts"})
    _glare(tmp_path)
    make_model("edge-glare", tmp_path / "glare.ts")
    # the demo's own fields never reach EdgeGlare's threshold at the edge (its docstring): only the spot does
    run = _explain(pcim, yaml)

    table = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert set(SHARES) <= set(table.columns) and "PCIM_Share_Seams" not in table.columns  # untiled fields
    glare = table[table["Metadata_Well"].isin(GLARE_WELLS)]
    assert (glare["PCIM_PredictedClass"] == "mitotic").all()  # the glare makes the DMSO wells mitotic
    assert (glare["PCIM_Share_Border"] > 0.8).all() and (glare["PCIM_Share_Saturated"] > 0.8).all()
    assert np.allclose(table["PCIM_Share_OnObjects"] + table["PCIM_Share_Background"], 1, atol=1e-5)
    clean = table[table["Metadata_Well"].isin(MITOTIC_WELLS)]
    assert (clean["PCIM_Share_OnObjects"] > 0.8).all()  # the real mitotic cells: on the nuclei

    findings = run["json"]["shortcuts"]["findings"]
    rules = {f["rule"]: f for f in findings}
    assert {"off-objects", "border", "saturated"} <= set(rules)
    for rule in ("off-objects", "border", "saturated"):
        assert sorted(rules[rule]["wells"]) == sorted(GLARE_WELLS) and rules[rule]["target"] == "mitotic"
    assert "shortcut: mitotic: in 3 of 6 wells more than 40 % of the map lies within 6 px of the field edge" \
        in run["stderr"]
    last = store.read_plate_record(tmp_path / "out" / "P1.zarr")["last_run"]
    assert last["shortcuts"] == run["json"]["shortcuts"]
    record = store.read_record(tmp_path / "out" / "P1.zarr", "A04", 0)
    assert record["qc"]["objects"] == {"source": "labels", "kind": "Nuclei", "dilate_px": 3}
    assert record["qc"]["border_px"] == 6 and record["qc"]["saturation_levels"][0] == 65535.0

    proc = pcim("render", str(tmp_path / "out" / "P1.zarr"), "--plate-yaml", str(yaml), "--json")
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(rendered["shortcuts"]).is_file()
    assert {f["rule"] for f in rendered["shortcut_findings"]} == set(rules)
    page = (tmp_path / "out" / "P1_render" / "report.html").read_text()
    assert "shortcuts.png" in page and "shortcut: mitotic: in 3 of 6 wells" in page


@pytest.mark.slow
def test_the_clean_classifier_on_a_clean_plate_is_quiet(pcim, tmp_path):
    yaml = make_plate(tmp_path, wells=(*MITOTIC_WELLS, *GLARE_WELLS), steps=49, objects=True)
    run = _explain(pcim, yaml)
    shortcuts = run["json"]["shortcuts"]
    # the hit class: its maps lie on the nuclei. (The DMSO wells' `negative` maps are an absence class's:
    # docs/shortcuts.md "Limits" says why the verdict may report them.)
    assert [f for f in shortcuts["findings"] if f["target"] == "mitotic"] == []
    assert "shortcut: mitotic" not in run["stderr"]
    assert shortcuts["judged"]["mitotic"] >= 3  # quiet because nothing is wrong, not because nothing was judged
    table = pd.read_csv(tmp_path / "out" / "P1.csv")
    mitotic = table[table["PCIM_Target"] == "mitotic"]
    assert len(mitotic) == 6 and (mitotic["PCIM_Share_OnObjects"] > 0.8).all()
    assert (mitotic["PCIM_Share_Saturated"] == 0).all()  # the demo's images have no flat top


@pytest.mark.slow
def test_a_screen_prints_each_plates_shortcut_verdict(pcim, tmp_path):
    """`pcim explain a.yaml b.yaml` (a screen): the glare plate's sentences on stderr, named by plate, and
    each plate's verdict in --json; the clean plate says nothing."""
    glare = make_plate(tmp_path / "glare", wells=(*GLARE_WELLS, "A01"), steps=49, objects=True,
                       plate={"name": "GLARE"}, model={"path": "glare.ts"})
    _glare(tmp_path / "glare")
    make_model("edge-glare", tmp_path / "glare" / "glare.ts")
    clean = make_plate(tmp_path / "clean", wells=("A01", "A02"), steps=49, objects=True, plate={"name": "CLEAN"})
    proc = pcim("explain", str(glare), str(clean), "--json")
    assert proc.returncode == 0, proc.stderr
    plates = {p["plate"]: p for p in json.loads(proc.stdout.strip().splitlines()[-1])["plates"]}
    found = plates["GLARE"]["shortcuts"]["findings"]
    assert {"off-objects", "border", "saturated"} <= {f["rule"] for f in found}
    assert all(sorted(f["wells"]) == sorted(GLARE_WELLS) for f in found if f["rule"] != "plate-edge")
    assert plates["CLEAN"]["shortcuts"]["findings"] == [] and plates["CLEAN"]["shortcuts"]["judged"]["mitotic"] >= 1
    for f in found:
        assert f"  plate GLARE: shortcut: {f['sentence']}" in proc.stderr
    assert "plate CLEAN: shortcut" not in proc.stderr
    quiet = pcim("explain", str(glare), str(clean), "-q")
    assert quiet.returncode == 0 and "shortcut:" not in quiet.stderr


def test_changed_qc_settings_measure_the_shares_again_without_a_refit(pcim, tmp_path):
    """qc changes no map (not part of the fingerprint), but the shares follow it: a rerun with another
    qc.border, or with the QC turned on for a store made without it, measures the done fields' shares
    again from their stored maps; nothing is fitted, the maps are untouched."""
    yaml = make_plate(tmp_path, wells=("A01", "A04"), steps=3, objects=True, qc={"enabled": False})
    first = _explain(pcim, yaml)
    assert first["json"]["shortcuts"] is None and first["json"]["fitted"] == 4
    maps_before = store.read_field(tmp_path / "out" / "P1.zarr", "A01", 0)[0]
    on = _explain(pcim, yaml, "--set", "qc.enabled=true")
    assert on["json"]["fitted"] == 0 and on["json"]["shortcuts"] is not None  # (3-step fits: none judged)
    table = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert set(SHARES) <= set(table.columns) and table["PCIM_Share_Border"].notna().all()
    record = store.read_record(tmp_path / "out" / "P1.zarr", "A01", 0)
    assert record["qc"]["border_px"] == 6 and record["qc"]["objects"]["kind"] == "Nuclei"

    wide = _explain(pcim, yaml, "--set", "qc.enabled=true", "--set", "qc.border=0.25")
    assert wide["json"]["fitted"] == 0
    record = store.read_record(tmp_path / "out" / "P1.zarr", "A01", 0)
    assert record["qc"]["border"] == 0.25 and record["qc"]["border_px"] == 32
    wider = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert (wider["PCIM_Share_Border"] >= table["PCIM_Share_Border"] - 1e-6).all()
    assert (wider["PCIM_Share_Border"] > table["PCIM_Share_Border"] + 0.01).any()
    assert np.allclose(wider["PCIM_Share_Background"], table["PCIM_Share_Background"], atol=1e-6)
    np.testing.assert_array_equal(store.read_field(tmp_path / "out" / "P1.zarr", "A01", 0)[0], maps_before)
    # the same settings again: nothing to measure
    dry = pcim("explain", str(yaml), "--set", "qc.enabled=true", "--set", "qc.border=0.25", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout.strip().splitlines()[-1])["counts"]["qc"] == 0


def test_qc_keys_are_checked_before_anything_runs(pcim, tmp_path):
    yaml = make_plate(tmp_path, wells=("A01",), objects=True, qc={"objects": "Cells"})
    proc = pcim("explain", str(yaml))
    assert proc.returncode == 78
    assert "qc.objects" in proc.stderr and "Nuclei" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_qc_off_leaves_no_columns_and_no_verdict(pcim, tmp_path):
    yaml = make_plate(tmp_path, wells=("A01",), steps=3, qc={"enabled": False})
    run = _explain(pcim, yaml)
    assert run["json"]["shortcuts"] is None
    table = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert not set(SHARES) & set(table.columns)
