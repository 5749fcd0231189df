"""Issue 22 (trust, round 2), defects 3 and 4 and the train-explainer items: an explainer whose bytes
changed is refused when loaded (explain and validate, exit 78 naming the file); `train-explainer --out`
(and its sidecar and checkpoint) replaces only pcim's explainer files; an early signal exits 75; a
one-well run writes strict JSON and says it has no validation tiles; two runs on one --out are locked.

Everything runs the installed `pcim` on copies of the demo's TIFFs and classifier.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_runner import StderrLines, run_pcim, start_pcim, wait_for
from plates import make_plate

from pcim_cli.io import explainer as explainer_file

WELLS = ("A01", "A02", "A03")
AMORTISED = ("--set", "explain.method=pcim-amortised")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("integrity")
    plate = make_plate(root, WELLS, steps=2)
    out = root / "explainer.pt"
    proc = run_pcim("train-explainer", str(plate), "--out", str(out), "--steps", "3", "--val-wells", "A03")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return plate, out


def _copy_plate(trained, tmp_path: Path) -> Path:
    plate, _ = trained
    for name in ("images", "layout.csv", "classifier.ts", "plate.yaml"):
        source = plate.parent / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    return tmp_path / "plate.yaml"


def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _repack_with_other_weights(source: Path, target: Path) -> None:
    """The same archive record inside, other weights: every CRC holds (a re-saved, tampered explainer)."""
    extra = {explainer_file.META_NAME: ""}
    module = torch.jit.load(str(source), _extra_files=extra)
    with torch.no_grad():
        next(iter(module.parameters())).mul_(1.5)
    torch.jit.save(module, str(target), _extra_files=extra)


@pytest.mark.parametrize("how", ["64 bytes flipped", "weights re-packed", "flipped, beside its sidecar"])
def test_an_altered_explainer_is_refused_by_explain_and_validate(trained, tmp_path: Path, how: str) -> None:
    plate = _copy_plate(trained, tmp_path)
    _, good = trained
    altered = tmp_path / "explainer.pt"
    if how == "weights re-packed":
        _repack_with_other_weights(good, altered)
    else:
        shutil.copy(good, altered)
        _flip_middle(altered)
        if how == "flipped, beside its sidecar":
            shutil.copy(explainer_file.sidecar_path(good), explainer_file.sidecar_path(altered))
    args = (*AMORTISED, "--set", f"explain.explainer={altered}")
    proc = run_pcim("explain", str(plate), *args)
    assert proc.returncode == 78, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("pcim: error: explain.explainer:") and str(altered) in line and "altered" in line, line
    assert not (tmp_path / "out").exists()

    validate = run_pcim("validate", str(plate), *args, "--no-probe")
    assert validate.returncode == 78, validate.stderr[-2000:]
    assert validate.stderr.strip().splitlines()[-1] == line


def test_the_explainer_as_written_is_accepted(trained, tmp_path: Path) -> None:
    plate = _copy_plate(trained, tmp_path)
    _, good = trained
    validate = run_pcim("validate", str(plate), *AMORTISED, "--set", f"explain.explainer={good}", "--no-probe")
    assert validate.returncode == 0, validate.stderr[-2000:] + validate.stdout
    assert f"explainer {good}" in validate.stdout


@pytest.mark.parametrize("target", ["classifier.ts", "layout.csv", "notes.txt", "sidecar", "checkpoint"])
def test_train_explainer_out_never_replaces_another_file(trained, tmp_path: Path, target: str) -> None:
    plate = _copy_plate(trained, tmp_path)
    (tmp_path / "notes.txt").write_text("a user's notes\n")
    out = {"sidecar": "notes", "checkpoint": "run"}.get(target, target)
    if target == "sidecar":  # --out notes: its sidecar would be notes.json, a user's file
        (tmp_path / "notes.json").write_text('{"mine": true}\n')
    if target == "checkpoint":  # --out run: its checkpoint would be run.ckpt, a user's file
        (tmp_path / "run.ckpt").write_bytes(b"a user's checkpoint of another tool")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    proc = run_pcim("train-explainer", str(plate), "--out", str(tmp_path / out), "--steps", "2")
    assert proc.returncode == 65, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("pcim: error: --out") and str(tmp_path) in line, line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_an_explainer_pcim_wrote_may_be_written_again(trained, tmp_path: Path) -> None:
    plate = _copy_plate(trained, tmp_path)
    _, good = trained
    out = tmp_path / "explainer.pt"
    shutil.copy(good, out)
    shutil.copy(explainer_file.sidecar_path(good), explainer_file.sidecar_path(out))
    proc = run_pcim("train-explainer", str(plate), "--out", str(out), "--steps", "3", "--val-wells", "A03")
    assert proc.returncode == 0, proc.stderr[-2000:]  # retrained in place (its plates are other files)
    meta = json.loads(explainer_file.sidecar_path(out).read_text())
    assert meta["sha256"] == explainer_file.file_sha256(out) != explainer_file.file_sha256(good)


def test_sigterm_in_the_first_seconds_exits_75_and_writes_nothing(trained, tmp_path: Path) -> None:
    plate = _copy_plate(trained, tmp_path)
    out = tmp_path / "explainer.pt"
    proc = start_pcim("train-explainer", str(plate), "--out", str(out), "--steps", "50")
    lines = StderrLines(proc)
    wait_for(lambda: lines.has("loaded torchscript model"), what="the classifier loaded")  # before the steps
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = lines.text
    assert proc.returncode == 75, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("pcim: error:") and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*lock"))


def test_a_one_well_run_writes_strict_json_and_warns_of_no_validation_tiles(trained, tmp_path: Path) -> None:
    plate = _copy_plate(trained, tmp_path)
    out = tmp_path / "explainer.pt"
    proc = run_pcim("train-explainer", str(plate), "--out", str(out), "--steps", "2", "--set", "plate.wells=[A01]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no validation tiles" in proc.stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in the sidecar: not JSON")

    meta = json.loads(explainer_file.sidecar_path(out).read_text(), parse_constant=refuse)
    assert meta["training"]["validation_tiles"] == 0 and meta["training"]["validation_objective"] is None


def test_two_trainings_on_one_out_are_locked(trained, tmp_path: Path) -> None:
    plate = _copy_plate(trained, tmp_path)
    out = tmp_path / "explainer.pt"
    first = start_pcim("train-explainer", str(plate), "--out", str(out), "--steps", "400", "--checkpoint-every", "1")
    try:
        deadline = time.monotonic() + 240
        while not out.with_name(out.name + ".ckpt").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.2)
        second = run_pcim("train-explainer", str(plate), "--out", str(out), "--steps", "400", "--checkpoint-every",
                          "1", timeout=180)
        assert second.returncode == 75, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert "locked by another pcim run" in line and f"pid {first.pid}" in line and str(out) in line, line
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=180)
    assert first.returncode == 75, err[-2000:]
