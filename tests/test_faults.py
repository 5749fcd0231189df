"""Fault injection through the installed `pcim`: foreign stores, damaged metadata, signals at several moments
of a run, kill -9 of the driver and of a worker, a full disk.

After every fault the store, the CSV and `pcim status` must agree (tests/truth.py), the run lock must be
gone (or taken over), and the same command must finish the plate without redoing what was done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import zarr
from cli_runner import PCIM, StderrLines, pcim_env, run_pcim, start_pcim, wait_for
from plates import make_plate
from truth import assert_consistent, field_record, record_states

from pcim_cli.io.lock import LOCK_NAME

WELLS = ("A01", "A02")


def out(plate: Path) -> tuple[Path, Path]:
    return plate.parent / "out" / "P1.zarr", plate.parent / "out" / "P1.csv"


def tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. stores pcim did not write


def _raw_hcs_store(path: Path) -> None:
    """An OME-Zarr HCS plate of raw images, as an acquisition or conversion tool writes it."""
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    root = zarr.open_group(str(path), mode="w")
    write_plate_metadata(root, ["A"], ["1"], ["A/1"], name="RAW-SCREEN")
    well = root.require_group("A").require_group("1")
    write_well_metadata(well, [{"path": "0"}])
    image = well.require_group("0")
    write_image(np.arange(3 * 64 * 64, dtype=np.uint16).reshape(3, 64, 64), image, axes="cyx")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raw OME-Zarr plate", "folder with files", "a file"])
def test_explain_never_writes_into_a_path_it_did_not_create(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "existing"
    if kind == "raw OME-Zarr plate":
        _raw_hcs_store(target)
    elif kind == "folder with files":
        target.mkdir()
        (target / "notes.txt").write_text("a user's notes\n")
    else:
        target.write_text("a file\n")
    before = tree_digest(target) if target.is_dir() else target.read_bytes()
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    proc = run_pcim("explain", str(plate), "--set", f"output.zarr={target}", "--force")
    assert proc.returncode == 65, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("pcim: error:") and str(target) in line, proc.stderr[-2000:]
    assert (tree_digest(target) if target.is_dir() else target.read_bytes()) == before
    assert not (tmp_path / "out").exists()  # no CSV either
    if kind == "raw OME-Zarr plate":  # status and render refuse it too
        assert run_pcim("status", str(target)).returncode == 65
        assert run_pcim("render", str(target), "--out", str(tmp_path / "pictures")).returncode == 65
        assert tree_digest(target) == before


@pytest.mark.slow
def test_an_empty_folder_is_used_as_a_new_store(tmp_path: Path) -> None:
    target = tmp_path / "made-by-the-user"
    target.mkdir()
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    proc = run_pcim("explain", str(plate), "--set", f"output.zarr={target}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_consistent(target, tmp_path / "out" / "P1.csv")


# --------------------------------------------------------------------------------------------------
# 11. damaged metadata


@pytest.mark.slow
def test_a_damaged_field_metadata_is_shown_and_redone_never_a_crash(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    zarr_path, csv_path = out(plate)
    assert run_pcim("explain", str(plate)).returncode == 0
    damaged = zarr_path / "A" / "2" / "1" / "zarr.json"
    damaged.write_text(damaged.read_text()[:40])  # cut off mid-write

    status = run_pcim("status", str(zarr_path), "--json")
    assert status.returncode == 3, status.stderr[-2000:]
    fields = {f["path"]: f for f in json.loads(status.stdout)["fields"]}
    assert fields["A/2/1"]["state"] == "damaged" and "A/2/1/zarr.json" in fields["A/2/1"]["error"]
    assert "A/2/1" in run_pcim("status", str(zarr_path)).stdout

    render = run_pcim("render", str(zarr_path), "--out", str(tmp_path / "pictures"))
    assert render.returncode == 0, render.stderr[-2000:]

    rerun = run_pcim("explain", str(plate))
    assert rerun.returncode == 0 and "(1 fitted by this run)" in rerun.stderr, rerun.stderr[-2000:]
    assert set(assert_consistent(zarr_path, csv_path).values()) == {"done"}


# --------------------------------------------------------------------------------------------------
# 9. signals at several moments


def _fifo_layout(plate: Path) -> tuple[Path, str]:
    """Replace the layout by a named pipe: pcim's planning blocks on it until the test writes the table."""
    layout = plate.parent / "layout.csv"
    text = layout.read_text()
    layout.unlink()
    os.mkfifo(layout)
    return layout, text


def _feed(fifo: Path, text: str) -> threading.Thread:
    def write() -> None:
        with contextlib.suppress(OSError), open(fifo, "w") as handle:
            handle.write(text)
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_planning_exits_75_writes_nothing_and_releases_the_lock(tmp_path: Path, sig) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    zarr_path, csv_path = out(plate)
    fifo, layout = _fifo_layout(plate)
    proc = start_pcim("explain", str(plate), "--json")
    lines = StderrLines(proc)
    try:
        wait_for(lambda: lines.has("loaded torchscript model") or proc.poll() is not None, what="planning")
        proc.send_signal(sig)
        time.sleep(0.5)
        _feed(fifo, layout)  # planning goes on to its end, then the run stops before writing
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = lines.text
    assert proc.returncode == 75, err[-3000:]
    assert sig.name in err and "Traceback" not in err, err[-3000:]
    assert json.loads(proc.stdout.read())["status"] == "interrupted"
    assert not zarr_path.exists() and not csv_path.exists()  # nothing written, no lock left behind

    fifo.unlink()
    fifo.write_text(layout)
    again = run_pcim("explain", str(plate))
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(assert_consistent(zarr_path, csv_path).values()) == {"done"}


@pytest.mark.slow
def test_a_second_signal_while_planning_stops_at_once(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    assert run_pcim("explain", str(plate), "--only", "A01").returncode == 0  # an earlier run's store and CSV
    zarr_path, csv_path = out(plate)
    before = tree_digest(zarr_path), csv_path.read_bytes()
    fifo, _ = _fifo_layout(plate)  # never fed: planning blocks until pcim gives up
    proc = start_pcim("explain", str(plate))
    lines = StderrLines(proc)
    try:
        wait_for(lambda: (zarr_path / LOCK_NAME).exists() or proc.poll() is not None, what="the lock")
        wait_for(lambda: lines.has("loaded torchscript model") or proc.poll() is not None, what="planning")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, lines.text[-3000:]
    assert not (zarr_path / LOCK_NAME).exists()
    assert (tree_digest(zarr_path), csv_path.read_bytes()) == before  # nothing changed


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_cluster_starts_exits_75_with_store_and_csv_consistent(tmp_path: Path, sig) -> None:
    """SIGTERM to pcim, or Ctrl-C to its whole process group (the worker processes being started get it too)."""
    plate = make_plate(tmp_path, wells=WELLS, steps=2, compute={"cluster": "local", "workers": 2})
    zarr_path, csv_path = out(plate)
    proc = subprocess.Popen([*PCIM, "explain", str(plate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=pcim_env(), start_new_session=True)
    lines = StderrLines(proc)
    try:
        wait_for(lambda: lines.has("fields to fit") or proc.poll() is not None, what="the end of planning")
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does
        else:
            proc.send_signal(sig)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = lines.text
    assert proc.returncode == 75, err[-3000:]
    # no traceback of pcim's own; Ctrl-C to the process group also reaches worker interpreters still
    # starting, and Python prints their interrupted start-up ("Fatal Python error: init_import_site"):
    # theirs, not pcim's, which cannot hold the signal back from them without losing it itself
    tracebacks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+", err + "\n")
    # (a spawned worker interpreter runs `python -c "from multiprocessing.spawn import spawn_main; ..."`: its
    # traceback starts in "<string>", and it may import pcim_cli as its __main__; pcim's own never does)
    spawned = ('File "<string>", line 1, in <module>', "spawn_main")
    assert not [t for t in tracebacks if "pcim_cli" in t and "_editable_" not in t
                and not any(s in t for s in spawned)], err[-3000:]
    if sig == signal.SIGTERM:
        assert "Traceback" not in err, err[-3000:]
    assert not (zarr_path / LOCK_NAME).exists()
    states = assert_consistent(zarr_path, csv_path)
    assert len(states) == 4
    again = run_pcim("explain", str(plate), "--set", "compute.cluster=none")
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(assert_consistent(zarr_path, csv_path).values()) == {"done"}


# --------------------------------------------------------------------------------------------------
# kill -9


def _worker_processes(driver: int) -> list[psutil.Process]:
    """The Dask worker processes a `pcim explain` started (its descendants running a spawned interpreter)."""
    try:
        children = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


@pytest.mark.slow
def test_kill_9_of_a_worker_reruns_its_well_and_the_plate_completes(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01"), steps=60,
                       compute={"cluster": "local", "workers": 1, "batch_size": 1})
    zarr_path, csv_path = out(plate)
    proc = start_pcim("explain", str(plate))
    lines = StderrLines(proc)
    try:
        wait_for(lambda: _worker_processes(proc.pid) or proc.poll() is not None, what="a worker process")
        wait_for(lambda: (zarr_path / "A" / "1" / "0" / "zarr.json").exists() or proc.poll() is not None,
                 what="the first field")
        victims = _worker_processes(proc.pid)
        assert victims, "no worker to kill"
        for victim in victims:
            victim.kill()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, lines.text[-3000:]
    assert set(assert_consistent(zarr_path, csv_path).values()) == {"done"}


@pytest.mark.slow
def test_kill_9_of_the_driver_on_a_local_cluster_then_the_same_command_finishes(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01"), steps=60,
                       compute={"cluster": "local", "workers": 1, "batch_size": 1})
    zarr_path, csv_path = out(plate)
    proc = start_pcim("explain", str(plate))
    try:
        wait_for(lambda: (zarr_path / "A" / "1" / "0" / "zarr.json").exists() or proc.poll() is not None,
                 what="the first field")
        workers = _worker_processes(proc.pid)
        proc.kill()
        proc.wait()
        done_before = {k: field_record(zarr_path, k) for k, v in record_states(zarr_path).items()
                       if field_record(zarr_path, k)}
        # orphaned workers notice that their nanny is gone and exit
        wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
                 timeout=120, what="the orphaned workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    again = run_pcim("explain", str(plate))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "taking over the lock" in again.stderr
    assert set(assert_consistent(zarr_path, csv_path).values()) == {"done"}
    assert all(field_record(zarr_path, k) == r for k, r in done_before.items())  # nothing redone


# --------------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (needs root and a kernel that lets this container mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root, or not allowed in this container): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_says_so_loses_nothing_and_the_rerun_finishes(tmp_path: Path, small_disk: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01", "B02"), steps=2,
                       output={"zarr": str(small_disk / "P1.zarr"), "csv": str(small_disk / "P1.csv")})
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 160 * 1024))  # leaves room for a few fields only
    proc = run_pcim("explain", str(plate))
    assert proc.returncode in (3, 65), proc.stderr[-3000:]
    assert "disk is full" in proc.stderr, proc.stderr[-3000:]
    zarr_path = small_disk / "P1.zarr"
    done = {k: field_record(zarr_path, k) for k, v in record_states(zarr_path).items() if v == "done"}
    assert 0 < len(done) < 8

    filler.unlink()  # the user frees space
    again = run_pcim("explain", str(plate))
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(assert_consistent(zarr_path, small_disk / "P1.csv").values()) == {"done"}
    assert all(field_record(zarr_path, k) == r for k, r in done.items())  # nothing done was lost or redone
    assert len(pd.read_csv(small_disk / "P1.csv")) == 8
