"""The shortcut verdict on the `shortcut` evaluation set, through the installed `pcim` (docs/shortcuts.md).

A 48-well plate of benchmarks/evalsets/shortcut.py whose outer ring carries saturated specks (the raw
uint16 counts, nuclei label images), written as TIFFs. A small classifier trained where the specks mark
`mitotic` (`small_model`) is flagged: its shortcut wells (the call flips when the specks are removed:
the set's counterfactual truth) are named by the saturated rule. The bundled demo classifier (the same
architecture trained on clean fields) on the same plate: no finding for `mitotic`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from cli_runner import run_pcim
from plates import DEMO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evalsets import shortcut as S  # noqa: E402


def _write_plate(root: Path, data: dict, model_path: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, well in enumerate(data["wells"]):
        for c in range(data["raw"].shape[1]):
            tifffile.imwrite(root / "images" / f"{well}_s1_w{c + 1}.tif", data["raw"][i, c])
        tifffile.imwrite(root / "labels" / f"{well}_s1_nuclei.tif", data["labels"][i].numpy().astype(np.uint16))
    config = {
        "plate": {"name": "SPECKS", "images": "images", "pattern": "{well}_s{field}_w{channel}.tif",
                  "channels": {name: str(c + 1) for c, name in enumerate(data["channels"])},
                  "objects": {"Nuclei": "labels/{well}_s{field}_nuclei.tif"}},
        "model": {"path": str(model_path), "classes": data["classes"],
                  "normalize": {"method": "percentile", "low": 1.0, "high": 99.8}},
        "explain": {"fidelity": False},
        "compute": {"cluster": "none"},
        "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"},
    }
    (root / "plate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "plate.yaml"


def _verdict(root: Path, data: dict, model_path: Path) -> dict:
    proc = run_pcim("explain", str(_write_plate(root, data, model_path)), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"json": json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


@pytest.mark.slow
def test_the_shortcut_model_is_flagged_and_the_clean_one_is_quiet(tmp_path):
    data = S.plate("specks", "edge")
    shortcut_model = S.small_model("specks")
    truth = S.truth(shortcut_model, data)
    shortcut_wells = {w for w, t in zip(data["wells"], truth["truth"], strict=True) if t == "shortcut"}
    assert len(shortcut_wells) >= 8  # the small model does use the specks on this plate
    torch.jit.save(shortcut_model, str(tmp_path / "shortcut.ts"))

    cut = _verdict(tmp_path / "shortcut", data, tmp_path / "shortcut.ts")
    findings = cut["json"]["shortcuts"]["findings"]
    saturated = [f for f in findings if f["rule"] == "saturated" and f["target"] == "mitotic"]
    assert saturated, findings
    flagged = {w for f in findings if f["target"] == "mitotic" and f["rule"] != "plate-edge" for w in f["wells"]}
    recall = len(flagged & shortcut_wells) / len(shortcut_wells)
    assert recall >= 0.8, (recall, sorted(shortcut_wells - flagged))
    assert flagged <= {w for w, a in zip(data["wells"], data["artefact"].tolist(), strict=True) if a}
    assert f"shortcut: {saturated[0]['sentence']}" in cut["stderr"]

    clean = _verdict(tmp_path / "clean", data, DEMO / "classifier.ts")
    assert [f for f in clean["json"]["shortcuts"]["findings"] if f["target"] == "mitotic"] == []
    assert clean["json"]["shortcuts"]["judged"]["mitotic"] >= 10
