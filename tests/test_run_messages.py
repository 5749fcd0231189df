"""Issue 22 (trust, round 2), the messages: a field's failure line names the field once; `pcim status`
cuts long errors at a word; a screen names the compute keys a plate asks for differently, gives each
plate its place in the screen ("plate P2 (2/2)"), and reports an interrupted plate as interrupted, not
as "0 field(s) failed".
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml
from cli_runner import run_pcim, start_pcim
from plates import make_plate

from pcim_cli.io import store


def test_a_failed_fields_line_names_the_field_once(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"), steps=2)
    for c in (1, 2, 3):  # A02 site 1 at another size than the plate's other fields
        path = tmp_path / "images" / f"A02_s1_w{c}.tif"
        tifffile.imwrite(path, tifffile.imread(path)[:96, :96])
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "  failed A02 site 1: the field is 96x96 px" in proc.stderr, proc.stderr[-2000:]
    assert "A02 site 1: A02 site 1" not in proc.stderr


def _cell(text: str, well: str, column: int) -> str:
    """The text of one cell of a Rich table (its wrapped lines joined) in the row of `well`."""
    parts, inside = [], False
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) <= column:
            inside = False
            continue
        if cells[1]:
            inside = cells[1] == well
        if inside:
            parts.append(cells[column])
    return " ".join(p for p in parts if p)


def test_status_cuts_a_long_error_at_a_word(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"), steps=2)
    assert run_pcim("explain", str(plate)).returncode == 0
    (tmp_path / "out" / "P1.zarr" / "A" / "2" / "0" / "0" / "zarr.json").write_text("xx\n")
    status = run_pcim("status", "out/P1.zarr", cwd=tmp_path)
    assert status.returncode == 3, status.stderr[-2000:]
    full = " ".join(next(line for line in status.stdout.splitlines() if line.startswith("damaged A/2/0"))
                    .split(": ", 1)[1].split())
    shown = " ".join(_cell(status.stdout, "A02", 6).split())
    assert shown.endswith("…"), shown
    head = shown[:-1].removeprefix("A/2/0 damaged: ")
    assert full.startswith(head) and not full[len(head)].isalnum(), (head, full)


def _screen(root: Path, workers: int = 2, steps: int = 2, **compute) -> Path:
    for name in ("P1", "P2"):
        make_plate(root / name, wells=("A01",), steps=steps, plate={"name": name})
    plates = [{"config": "P1/plate.yaml", "compute": {"workers": 2}},
              {"config": "P2/plate.yaml", "compute": {"workers": workers}}]
    screen = root / "screen.yaml"
    screen.write_text(yaml.safe_dump({"compute": {"cluster": "none", **compute}, "plates": plates}))
    return screen


def test_a_screen_names_the_keys_a_plate_asks_for_and_each_plates_place(tmp_path: Path) -> None:
    screen = _screen(tmp_path, workers=3)
    first = run_pcim("explain", str(screen))
    assert first.returncode == 0, first.stderr[-2000:]
    warning = next(line for line in first.stderr.splitlines() if "WARNING" in line and "P2" in line)
    assert "compute.workers 3 (not 2)" in warning and "compute.cluster" not in warning, warning

    shutil.rmtree(tmp_path / "P1" / "out")  # P1 is fitted again; P2 is complete and finishes first
    second = run_pcim("explain", str(screen))
    assert second.returncode == 0, second.stderr[-2000:]
    finished = re.findall(r"plate (P\d) \(([^)]*)\):", second.stderr)
    assert finished == [("P2", "2/2"), ("P1", "1/2")], finished


def test_an_interrupted_plate_is_reported_as_interrupted(tmp_path: Path) -> None:
    screen = _screen(tmp_path, steps=150, batch_size=1)
    zarr_path = tmp_path / "P1" / "out" / "P1.zarr"
    proc = start_pcim("explain", str(screen), "--max-plates-in-flight", "1", PCIM_GRACE_SECONDS="0")
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if zarr_path.exists() and store.read_record(zarr_path, "A01", 0) is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    line = next((line for line in err.splitlines() if line.startswith("  plate P1: exit 75")), err[-3000:])
    assert "interrupted" in line and "0 field(s) failed" not in line, line
    assert np.isfinite(store.read_field(zarr_path, "A01", 0)[0]).all()
