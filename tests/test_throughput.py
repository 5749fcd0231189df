"""Issue 28 (screen throughput), behaviour not timings: which fields get explain.fidelity's measures
(run/sampling.py), an amortised run's CSV and records with a fidelity sample, the thread policy deciding
for a run without fit steps, and the field prediction reused as p(target | x) without changing maps.

Runs the real plate path (demo TIFFs, the demo TorchScript classifier, an explainer file of pcim's
format, explain.run in this process) and reads the store back with zarr-python.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
import zarr
from plates import make_plate

from pcim_cli.config import load_config
from pcim_cli.engine.explainer import amortised_pcim, make_explainer
from pcim_cli.engine.pcim import PcimOptions, target_log_probs
from pcim_cli.engine.verdict import JUDGED
from pcim_cli.io import explainer as explainer_file
from pcim_cli.io import store
from pcim_cli.io.model import file_sha256
from pcim_cli.run import device, explain, sampling, threads

WELLS = ("A01", "A02", "B01")  # two fields each: plate order A01 s1, s2, A02 s1, s2, B01 s1, s2


def test_fidelity_every_auto_samples_amortised_runs_only() -> None:
    assert sampling.fidelity_every(True, "auto", "pcim") == 1
    assert sampling.fidelity_every(True, "auto", "saliency") == 1
    assert sampling.fidelity_every(True, "auto", "pcim-amortised") == sampling.AMORTISED_EVERY
    assert sampling.fidelity_every(True, 3, "pcim") == 3
    assert sampling.fidelity_every(False, "auto", "pcim-amortised") == 0


def test_fidelity_flags_follow_plate_order() -> None:
    every_field = [sampling.fidelity_flags(i, i % 2, 1) for i in range(4)]
    assert all(f["fidelity"] for f in every_field)
    # every field measured: the stain check on each well's first field, as before sampling existed
    assert [f["stain_check"] for f in every_field] == [True, False, True, False]
    sampled = [sampling.fidelity_flags(i, i % 2, 4) for i in range(9)]
    assert [f["fidelity"] for f in sampled] == [i % 4 == 0 for i in range(9)]
    assert [f["stain_check"] for f in sampled] == [i % 4 == 0 for i in range(9)]  # every sampled field
    assert sampling.fidelity_flags(0, 0, 0) == {"fidelity": False, "stain_check": False}


def _explainer(root: Path, plate: Path) -> Path:
    """An (untrained) explainer file of pcim's format for the demo classifier: a map's cost and the run's
    bookkeeping do not depend on its weights."""
    opts = PcimOptions()
    out = root / "explainer.pt"
    cfg = load_config(plate)
    explainer_file.save_explainer(make_explainer(3, 2, opts), out, {
        "classifier_sha256": file_sha256(root / "classifier.ts"), "channels": list(cfg.plate.channels),
        "classes": ["negative", "mitotic"], "normalize": cfg.model.normalize.model_dump(),
        "engine": explainer_file.engine_record(opts)})
    return out


@pytest.fixture(scope="module")
def amortised_run(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("amortised")
    plate = make_plate(root, WELLS)
    cfg = load_config(plate, overrides=["explain.method=pcim-amortised", f"explain.explainer={_explainer(root, plate)}",
                                        "explain.fidelity_every=4"])
    result = explain.run(cfg)
    assert result.exit_code == 0
    return Path(cfg.output.zarr), pd.read_csv(cfg.output.csv)


def test_amortised_run_measures_fidelity_on_its_sample_and_fit_columns_everywhere(amortised_run) -> None:
    path, csv = amortised_run
    assert len(csv) == 6 and (csv["PCIM_Status"] == "done").all()
    for column in ("PCIM_ProbMixed", "PCIM_ProbDeleted", "PCIM_Fit"):
        assert csv[column].notna().all(), column
    measured = csv[csv["PCIM_DeletionAUC"].notna()]
    # fields 0 and 4 in plate order: A01's first, B01's first
    assert sorted(zip(measured["Metadata_Well"], measured["Metadata_Site"], strict=True)) == [("A01", 1), ("B01", 1)]
    assert measured["PCIM_InsertionAUC"].notna().all()
    assert csv["PCIM_InsertionAUC"].notna().sum() == 2
    for well, index in ((w, i) for w in WELLS for i in (0, 1)):
        record = store.read_record(path, well, index)
        sampled = (well, index) in {("A01", 0), ("B01", 0)}
        assert record["fidelity"] == ("measured" if sampled else "not sampled")
        results = next(iter(record["results"].values()))
        row = csv[(csv["Metadata_Well"] == well) & (csv["Metadata_Site"] == index + 1)].iloc[0]
        # the verdict's checks ride on the sample, on the maps that hold evidence (PCIM_Fit ok / weak)
        assert ("stain_check" in results) == (sampled and row["PCIM_Fit"] in JUDGED)
    # the store is an OME-Zarr zarr-python reads: the map at full size, rounded as io/store keeps maps
    group = zarr.open_group(str(path / "A" / "1" / "0"), mode="r")
    maps, _, _ = store.read_field(path, "A01", 0)
    assert group["0"].shape == maps.shape and (group["0"][:] == maps).all()


def test_amortised_run_decides_its_threads(tmp_path: Path, monkeypatch, caplog) -> None:
    """A run without fit steps times whole wells and decides (before: it never decided and kept n
    threads, the count that collapses beside other CPU work)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if threads.read_limits().usable < 2:
        pytest.skip("one usable CPU: no thread count to choose")
    # a warm-up well and up to 3 rounds of one well at each count decide at the next well's start
    plate = make_plate(tmp_path, ("A01", "A02", "A03", "A04", "A05", "B01", "B02", "B03", "B04"))
    cfg = load_config(plate, overrides=["explain.method=pcim-amortised",
                                        f"explain.explainer={_explainer(tmp_path, plate)}", "explain.fidelity=false"])
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="pcim_cli.run.threads"):
            assert explain.run(cfg).exit_code == 0
    finally:
        threads.apply(None, False)
        torch.set_num_threads(before)
    decided = [r.getMessage() for r in caplog.records if "a well took" in r.getMessage()]
    assert len(decided) == 1, [r.getMessage() for r in caplog.records]


def test_known_prediction_leaves_amortised_maps_unchanged() -> None:
    """The worker passes the field's prediction as p(target | x) (no second forward): maps, kept and
    deleted probabilities are those computed without it."""
    torch.manual_seed(0)
    model = torch.jit.load(str(Path(__file__).resolve().parents[1] / "sample_plates/demo/classifier.ts")).eval()
    net = make_explainer(3, 2, PcimOptions()).eval()
    x, target = torch.rand(3, 3, 64, 64), torch.tensor([1, 0, 1])
    with torch.no_grad():
        known = target_log_probs(model(x), target)[0].exp()
    plain = amortised_pcim(model, net, x, target, PcimOptions())
    given = amortised_pcim(model, net, x, target, PcimOptions(), prob_original=known)
    torch.testing.assert_close(given.maps, plain.maps, rtol=0, atol=0)
    torch.testing.assert_close(given.prob_mixed, plain.prob_mixed, rtol=0, atol=0)
    torch.testing.assert_close(given.prob_original, plain.prob_original)


def test_status_of_a_large_plate_lists_only_its_incomplete_wells(tmp_path: Path) -> None:
    """A 1536-well table took seconds to draw: past 96 wells `pcim status` lists the wells with something
    left to do, says how many complete ones it left out, and --json still lists every well."""
    import json

    import numpy as np
    from cli_runner import run_pcim

    wells = {f"{r}{c:02d}": 1 for r in "ABCDEFGHIJ" for c in range(1, 11)}  # 100 wells, one field each
    path = tmp_path / "big.zarr"
    store.create_plate(path, "BIG", wells, record={"fingerprint": "f"})
    maps = np.ones((1, 4, 4), dtype=np.float32)
    for well in wells:
        if well != "C07":  # one well left without its map
            store.write_field(path, well, 0, maps, ["t"], {"status": "done", "site": 1, "targets": ["t"],
                                                          "fingerprint": "f", "results": {}})
    proc = run_pcim("status", str(path), COLUMNS="200")
    assert proc.returncode == 3, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    listed = [line.split("│")[1].strip() for line in rows]
    assert "C07" in listed and "A01" not in listed and "J10" not in listed
    assert any("99 complete wells not listed" in line for line in rows)
    full = json.loads(run_pcim("status", str(path), "--json").stdout)
    assert len(full["wells"]) == 100


def test_a_plate_whose_model_copy_another_plate_loaded_first_runs_from_its_own_file(tmp_path: Path) -> None:
    """The process caches models (and explainers) by contents: a second plate folder with its own copy of
    the same classifier (and explainer) must run from its own files, also when the first plate's folder
    is gone (a screen of plates each with their copy, a library caller running plate after plate)."""
    first = make_plate(tmp_path / "first", WELLS[:1], steps=2)
    cfg = load_config(first, overrides=["explain.method=pcim-amortised",
                                        f"explain.explainer={_explainer(tmp_path / 'first', first)}"])
    assert explain.run(cfg).exit_code == 0
    second = make_plate(tmp_path / "second", WELLS[:1], steps=2)
    (tmp_path / "second" / "explainer.pt").write_bytes((tmp_path / "first" / "explainer.pt").read_bytes())
    for name in ("classifier.ts", "explainer.pt"):
        (tmp_path / "first" / name).unlink()
    cfg = load_config(second, overrides=["explain.method=pcim-amortised",
                                         f"explain.explainer={tmp_path / 'second' / 'explainer.pt'}"])
    result = explain.run(cfg)
    assert result.exit_code == 0, result.summary["PCIM_Error"].tolist()
    assert (result.summary["PCIM_Status"] == "done").all()
    own = tmp_path / "second" / "classifier.ts"
    assert device.model(own, 3, None, "cpu").path == own  # the cached model, named by the file asked for
