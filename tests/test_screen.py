"""Screens: many plates in one `pcim explain` (plate.yaml files, quoted globs, a screen file), on one
cluster, with per-plate locks, exit codes, CSVs and a screen CSV; `pcim status` over a screen.

Everything runs the installed `pcim` on real TIFFs copied from the demo, the real TorchScript
classifier, real Dask worker processes and real Zarr stores read back afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cli_runner import run_pcim, start_pcim
from plates import DEMO, STORE_RTOL, make_plate

from pcim_cli.config.screen import load_screen
from pcim_cli.io import store
from pcim_cli.io.lock import LOCK_NAME
from pcim_cli.run.screen import combine_exit_codes

#: three plates with different names, wells and layouts
PLATES = {"PA": ("A01", "A02", "B01"), "PB": ("A03", "B02"), "PC": ("B03", "A04", "B04")}
VOLATILE = ["PCIM_Runtime_s"]


def _make_plates(root: Path, steps: int = 5, **sections) -> dict[str, Path]:
    out = {}
    for name, wells in PLATES.items():
        plate = make_plate(root / name, wells=wells, steps=steps, plate={"name": name}, **sections)
        if name == "PB":  # another plate map: its own annotation column
            pd.DataFrame({"Well": list(wells), "compound": ["DMSO", "nocodazole"]}).to_csv(
                plate.parent / "layout.csv", index=False)
        out[name] = plate
    return out


def _csv(plate: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(plate.parent / "out" / f"{name}.csv").drop(columns=VOLATILE)


def _maps(plate: Path, name: str) -> dict[tuple[str, int], np.ndarray]:
    zarr_path = plate.parent / "out" / f"{name}.zarr"
    return {(w, i): store.read_field(zarr_path, w, i)[0] for w in PLATES[name] for i in (0, 1)}


@pytest.mark.slow
def test_three_plates_on_one_local_cluster_match_three_separate_runs(tmp_path: Path) -> None:
    alone = _make_plates(tmp_path / "alone")
    for plate in alone.values():
        proc = run_pcim("explain", str(plate))
        assert proc.returncode == 0, proc.stderr[-2000:]
    together = _make_plates(tmp_path / "screen")
    proc = run_pcim("explain", *map(str, together.values()), "--set", "compute.cluster=local",
                    "--set", "compute.workers=2", "--json", "--set", f"output.screen_csv={tmp_path}/screen.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("started a local Dask cluster: 2 worker process(es)") == 1  # one cluster for all
    for name in PLATES:
        assert f"plate {name} (" in proc.stderr  # a line per plate as it completes
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == 0 and [p["plate"] for p in doc["plates"]] == list(PLATES)
    assert doc["fitted"] == 2 * sum(map(len, PLATES.values()))
    for name in PLATES:
        pd.testing.assert_frame_equal(_csv(together[name], name), _csv(alone[name], name))
        a, b = _maps(alone[name], name), _maps(together[name], name)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=STORE_RTOL, atol=1e-7)
        assert not (together[name].parent / "out" / f"{name}.zarr" / LOCK_NAME).exists()
    assert "Metadata_compound" in _csv(together["PB"], "PB").columns  # each plate keeps its own layout
    screen = pd.read_csv(tmp_path / "screen.csv")  # the screen CSV: every plate's rows
    assert len(screen) == sum(len(_csv(p, n)) for n, p in together.items())
    assert list(screen["Metadata_Plate"].unique()) == list(PLATES)
    assert screen.columns.get_loc("Metadata_compound") < screen.columns.get_loc("PCIM_Target")


def test_an_invalid_plate_is_skipped_with_its_message_and_the_others_are_done(tmp_path: Path) -> None:
    plates = _make_plates(tmp_path)
    bad = yaml.safe_load(plates["PB"].read_text())
    bad["explain"]["stepz"] = 3
    plates["PB"].write_text(yaml.safe_dump(bad))
    proc = run_pcim("explain", str(tmp_path / "P*" / "plate.yaml"))  # a quoted glob, expanded by pcim
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert f"invalid configuration {plates['PB']}" in proc.stderr and "explain.stepz: unknown key" in proc.stderr
    assert "plate PB: exit 78" in proc.stderr
    for name in ("PA", "PC"):
        df = _csv(plates[name], name)
        assert len(df) == 2 * len(PLATES[name]) and (df["PCIM_Status"] == "done").all()
    assert not (plates["PB"].parent / "out").exists()


@pytest.mark.slow
def test_a_locked_plate_exits_75_for_it_and_the_others_are_done(tmp_path: Path) -> None:
    plates = _make_plates(tmp_path)
    assert run_pcim("explain", str(plates["PB"])).returncode == 0
    lock = plates["PB"].parent / "out" / "PB.zarr" / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "user": "ana",
                                "started": "2026-11-30 01:00:00+0000"}))  # this test's process: alive
    before = _csv(plates["PB"], "PB")
    proc = run_pcim("explain", *map(str, plates.values()), "--json")
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "PB.zarr is locked by another pcim run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    doc = json.loads(proc.stdout)
    assert {p["plate"]: p["exit_code"] for p in doc["plates"]} == {"PA": 0, "PB": 75, "PC": 0}
    assert lock.exists()  # not ours: left alone
    pd.testing.assert_frame_equal(_csv(plates["PB"], "PB"), before)
    for name in ("PA", "PC"):
        assert (_csv(plates[name], name)["PCIM_Status"] == "done").all()


@pytest.mark.slow
def test_kill_9_mid_screen_then_rerun_fits_exactly_the_missing_fields(tmp_path: Path) -> None:
    plates = _make_plates(tmp_path, steps=150, compute={"batch_size": 1})
    total = 2 * sum(map(len, PLATES.values()))

    def done() -> dict[tuple[str, str, int], dict]:
        out = {}
        for name, wells in PLATES.items():
            zarr_path = plates[name].parent / "out" / f"{name}.zarr"
            for w in wells:
                for i in (0, 1):
                    record = store.read_record(zarr_path, w, i) if zarr_path.exists() else None
                    if record is not None and record.get("status") == "done":
                        out[(name, w, i)] = record
        return out

    proc = start_pcim("explain", *map(str, plates.values()))
    deadline = time.monotonic() + 300
    while len(done()) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = done()
    assert 4 <= len(before) < total, "the screen finished before it could be killed: raise steps"
    rerun = run_pcim("explain", *map(str, plates.values()), "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["fitted"] == total - len(before)
    after = done()
    assert len(after) == total and {k: after[k] for k in before} == before  # done fields not touched
    for name in PLATES:
        df = _csv(plates[name], name)
        assert len(df) == 2 * len(PLATES[name]) and (df["PCIM_Status"] == "done").all()


def _screen_tree(root: Path) -> Path:
    """screen.yaml with shared sections, a plate.yaml, an entry with overrides and an inline plate."""
    plates = _make_plates(root / "plates")
    (root / "models").mkdir()
    (root / "models" / "classifier.ts").write_bytes((DEMO / "classifier.ts").read_bytes())
    screen = {
        "model": {"path": "models/classifier.ts", "classes": ["negative", "mitotic"]},  # relative to screen.yaml
        "explain": {"steps": 5},
        "compute": {"cluster": "none"},
        "output": {"zarr": "results/{plate}.zarr", "csv": "results/{plate}_pcim.csv",
                   "screen_csv": "results/screen_pcim.csv"},
        "plates": [
            "plates/PA/plate.yaml",
            {"config": "plates/PB/plate.yaml", "explain": {"target": "all"}},  # per-plate override
            {"plate": {"name": "PC", "images": "plates/PC/images", "channels": {"DNA": "1", "PH3": "2", "Actin": "3"},
                       "layout": "plates/PC/layout.csv"}},  # inline, relative to screen.yaml
        ],
    }
    for name in ("PA", "PB"):  # the plate.yaml files' own output and model keys give way to the screen's
        cfg = yaml.safe_load(plates[name].read_text())
        del cfg["output"], cfg["model"], cfg["compute"]
        plates[name].write_text(yaml.safe_dump(cfg))
    path = root / "screen.yaml"
    path.write_text(yaml.safe_dump(screen, sort_keys=False))
    return path


@pytest.mark.slow
def test_screen_file_with_overrides_and_relative_paths_from_another_directory(tmp_path: Path) -> None:
    screen = _screen_tree(tmp_path / "site")
    elsewhere = tmp_path / "cron-home"
    elsewhere.mkdir()
    status = run_pcim("status", str(screen), "--json", cwd=elsewhere)  # before any run: nothing complete
    assert status.returncode == 3 and all(not p["complete"] for p in json.loads(status.stdout)["plates"])

    dry = run_pcim("explain", str(screen), "--dry-run", "--json", cwd=elsewhere)  # writes nothing
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert [p["counts"]["run"] for p in json.loads(dry.stdout)["plates"]] == [2 * len(w) for w in PLATES.values()]
    assert not (tmp_path / "site" / "results").exists()

    proc = run_pcim("explain", str(screen), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "site" / "results"
    for name in PLATES:
        assert (results / f"{name}.zarr").is_dir() and (results / f"{name}_pcim.csv").is_file()
    pb = pd.read_csv(results / "PB_pcim.csv")
    assert set(pb["PCIM_Target"]) == {"negative", "mitotic"} and len(pb) == 2 * 2 * len(PLATES["PB"])
    assert set(pd.read_csv(results / "PA_pcim.csv")["PCIM_Target"]) <= {"negative", "mitotic"}
    assert len(pd.read_csv(results / "PA_pcim.csv")) == 2 * len(PLATES["PA"])  # target: predicted
    screen_csv = pd.read_csv(results / "screen_pcim.csv")
    assert len(screen_csv) == sum(len(pd.read_csv(results / f"{n}_pcim.csv")) for n in PLATES)
    assert not elsewhere.joinpath("results").exists() and not list(elsewhere.iterdir())

    status = run_pcim("status", str(screen), "--json", cwd=elsewhere)
    assert status.returncode == 0, status.stdout
    doc = json.loads(status.stdout)
    assert [p["plate"] for p in doc["plates"]] == list(PLATES) and all(p["complete"] for p in doc["plates"])
    assert doc["totals"]["done"] == 2 * sum(map(len, PLATES.values())) == screen_csv[
        ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].drop_duplicates().shape[0]  # fields, not rows
    table = run_pcim("status", str(results / "PA.zarr"), str(results / "PB.zarr"), cwd=elsewhere)
    assert table.returncode == 0 and "PA" in table.stdout and "PB" in table.stdout
    again = run_pcim("explain", str(screen), "--json", cwd=elsewhere)  # a no-op rerun starts nothing
    assert again.returncode == 0 and json.loads(again.stdout)["fitted"] == 0


def test_screen_loader_precedence_duplicates_and_the_exit_code_order(tmp_path: Path) -> None:
    screen = _screen_tree(tmp_path)
    loaded = load_screen([screen], ["explain.seed=7"], environ={"PCIM_EXPLAIN__STEPS": "9"})
    assert [c.plate.name for c in loaded.configs] == list(PLATES)
    pa, pb, pc = loaded.configs
    assert pa.model.path == tmp_path / "models" / "classifier.ts"
    assert pa.plate.images == tmp_path / "plates" / "PA" / "images"  # relative to its plate.yaml
    assert pc.plate.images == tmp_path / "plates" / "PC" / "images"  # relative to screen.yaml
    assert pb.explain.target == "all" and pa.explain.target == "predicted"
    assert all(c.explain.steps == 9 and c.explain.seed == 7 for c in loaded.configs)  # env, --set on top
    assert pa.output.zarr == tmp_path / "results" / "PA.zarr" and loaded.screen_csv == tmp_path / "results" / \
        "screen_pcim.csv"
    doc = yaml.safe_load(screen.read_text())
    doc["plates"].append("plates/PA/plate.yaml")  # the same plate twice
    doc["plates"].append({"plate": {"images": "x"}})  # inline without a name
    screen.write_text(yaml.safe_dump(doc))
    again = load_screen([screen])
    assert len(again.configs) == 3 and len(again.problems) == 2
    assert "plate name 'PA' is also the name of" in again.problems[0].problem
    assert "plates[4]" in again.problems[1].problem and "plate.name: required" in again.problems[1].problem
    assert combine_exit_codes([0, 3, 75]) == 75 and combine_exit_codes([3, 78, 65]) == 78
    assert combine_exit_codes([0, 0]) == 0 and combine_exit_codes([1, 78]) == 1
    with pytest.raises(Exception, match="no file matches"):
        load_screen([str(tmp_path / "nothing-*" / "plate.yaml")])


@pytest.mark.slow
def test_sigterm_mid_screen_records_the_open_plate_and_leaves_the_unopened_ones_untouched(tmp_path: Path) -> None:
    plates = _make_plates(tmp_path, steps=150, compute={"batch_size": 1})
    zarr_a = plates["PA"].parent / "out" / "PA.zarr"
    proc = start_pcim("explain", *map(str, plates.values()), "--max-plates-in-flight", "1", "--json",
                      PCIM_GRACE_SECONDS="30")
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if zarr_a.exists() and store.read_record(zarr_a, "A01", 0) is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    doc = json.loads(out)
    assert {p["plate"]: p["exit_code"] for p in doc["plates"]} == {"PA": 75, "PB": 75, "PC": 75}
    assert "not run (interrupted)" in err
    df = pd.read_csv(plates["PA"].parent / "out" / "PA.csv")  # the open plate: what was done is recorded
    assert len(df) == 2 * len(PLATES["PA"]) and (df["PCIM_Status"] == "done").any()
    assert (df["PCIM_Status"] == "skipped").any()
    assert not (zarr_a / LOCK_NAME).exists()
    for name in ("PB", "PC"):  # one plate in flight: the others were never opened, nothing written
        assert not (plates[name].parent / "out").exists()


def test_screen_progress_counts_plates_and_grows_its_total_as_plates_are_planned(caplog) -> None:
    from pcim_cli.run.progress import ScreenProgress

    caplog.set_level("INFO", logger="pcim_cli")
    with ScreenProgress(fancy=False, plates=2, every_s=0) as progress:
        progress.start()
        progress.add(2)
        progress.on_well("A01", [{"site": 1, "status": "done"}])
        progress.on_well("A02", [{"site": 1, "status": "failed"}])
        progress.plate_finished("P1", "2 maps done", position=1)
        progress.add(1)
        assert progress.counter.total == 3
        progress.on_well("B01", [{"site": 1, "status": "done"}])
    lines = [r.getMessage() for r in caplog.records]
    assert "plate P1 (1/2): 2 maps done" in lines
    assert any(line.startswith("plates 1/2 done; wells 3/3 done, 1 failed, ETA") for line in lines)


@pytest.mark.slow
def test_a_plate_whose_store_pcim_did_not_create_is_refused_alone(tmp_path: Path) -> None:
    plates = _make_plates(tmp_path)
    foreign = plates["PB"].parent / "out" / "PB.zarr"
    foreign.mkdir(parents=True)
    (foreign / "raw_image.tif").write_bytes(b"the microscope's")
    proc = run_pcim("explain", *map(str, plates.values()), "--json")
    assert proc.returncode == 65, proc.stderr[-3000:]  # 65 beats 0 (and 75, 3)
    assert {p["plate"]: p["exit_code"] for p in json.loads(proc.stdout)["plates"]} == {"PA": 0, "PB": 65, "PC": 0}
    assert sorted(p.name for p in foreign.iterdir()) == ["raw_image.tif"]  # nothing written, not even a lock
    for name in ("PA", "PC"):
        assert (_csv(plates[name], name)["PCIM_Status"] == "done").all()
