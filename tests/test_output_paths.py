"""Issue 22 (trust, round 2), defects 1 and 2 and the output-path items: every path a run (or a screen)
writes is known before it starts; an output may only be absent or a file pcim wrote itself, never an
input of the plate; two outputs on one path are a configuration error; unusable paths are found before
anything is fitted, and a refused run leaves nothing behind — not even an empty out/ folder.

Everything runs the installed `pcim` on copies of the demo's TIFFs and classifier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_runner import run_pcim
from plates import make_plate


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (symlinks as their target path) with its bytes: nothing may change."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = str(p.readlink()).encode()
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


#: output.csv values that name an input of the plate or a user's file (relative to the plate folder)
DESTROYED = {
    "layout": "layout.csv",
    "plate.yaml": "plate.yaml",
    "model": "classifier.ts",
    "image": "images/A01_s1_w1.tif",
    "a user's Image.csv": "Image.csv",
    "a symlink to the layout": "shortcut.csv",
    "the layout through ..": "out/../images/../layout.csv",
}


@pytest.mark.parametrize("case", DESTROYED)
def test_output_csv_never_replaces_an_input_of_the_plate_or_a_users_file(tmp_path: Path, case: str) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    (tmp_path / "Image.csv").write_text("ImageNumber,Metadata_Well,Count_Nuclei\n1,A01,12\n")
    (tmp_path / "shortcut.csv").symlink_to("layout.csv")
    before = tree(tmp_path)
    proc = run_pcim("explain", str(plate), "--set", f"output.csv={DESTROYED[case]}", "--force")
    assert proc.returncode == 65, proc.stderr[-2000:]
    line = last_line(proc)
    assert line.startswith("pcim: error: output.csv ") and DESTROYED[case] in line, line
    assert ("input" in line) == (case != "a user's Image.csv"), line
    assert tree(tmp_path) == before  # nothing replaced, nothing written (no store, no out/)


def test_two_outputs_on_one_path_are_refused_naming_both_keys(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2, objects=True)
    before = tree(tmp_path)
    on_object_csv = run_pcim("explain", str(plate), "--set", "output.csv=out/P1_pcim_Nuclei.csv")
    assert on_object_csv.returncode == 78, on_object_csv.stderr[-2000:]
    line = last_line(on_object_csv)
    assert "output.csv" in line and "plate.objects.Nuclei" in line and "P1_pcim_Nuclei.csv" in line, line

    in_store = run_pcim("explain", str(plate), "--set", "output.csv=out/P1.zarr/summary.csv")
    assert in_store.returncode == 78, in_store.stderr[-2000:]
    line = last_line(in_store)
    assert "output.csv" in line and "output.zarr" in line, line
    assert tree(tmp_path) == before


def _screen(root: Path, output: dict) -> Path:
    """Two plates (P1, P2: one well each) under `root` and a screen file whose shared output section is
    `output` (the plate.yaml files have none, so it applies)."""
    for name in ("P1", "P2"):
        plate = make_plate(root / name, wells=("A01",), steps=2, plate={"name": name})
        config = yaml.safe_load(plate.read_text())
        del config["output"]
        plate.write_text(yaml.safe_dump(config, sort_keys=False))
    screen = root / "screen.yaml"
    screen.write_text(yaml.safe_dump({"output": output, "plates": ["P1/plate.yaml", "P2/plate.yaml"]}))
    return screen


def test_a_screen_csv_on_a_plates_own_csv_is_refused_before_any_plate_runs(tmp_path: Path) -> None:
    screen = _screen(tmp_path, {"zarr": "out/{plate}.zarr", "csv": "out/{plate}_pcim.csv",
                                "screen_csv": "out/P1_pcim.csv"})
    before = tree(tmp_path)
    proc = run_pcim("explain", str(screen))
    assert proc.returncode == 78, proc.stderr[-2000:]
    line = last_line(proc)
    assert "output.csv of plate P1" in line and "output.screen_csv" in line and "P1_pcim.csv" in line, line
    assert tree(tmp_path) == before

    dry = run_pcim("explain", str(screen), "--dry-run")  # the plan says so too
    assert dry.returncode == 78, dry.stderr[-2000:]


@pytest.mark.parametrize("key", ["output.csv", "output.screen_csv"])
def test_an_unusable_output_path_is_found_before_anything_is_fitted(tmp_path: Path, key: str) -> None:
    if key == "output.csv":
        plate = make_plate(tmp_path, wells=("A01",), steps=2)
        proc = run_pcim("explain", str(plate), "--set", "output.csv=/proc/pcim-test/P1.csv")
    else:
        screen = _screen(tmp_path, {"zarr": "out/{plate}.zarr", "csv": "out/{plate}_pcim.csv",
                                    "screen_csv": "/proc/pcim-test/screen.csv"})
        proc = run_pcim("explain", str(screen))
    assert proc.returncode == 65, proc.stderr[-2000:]
    line = last_line(proc)
    assert key in line and "/proc" in line, line
    assert "fitted" not in proc.stderr  # refused at once, not after the maps
    assert not list(tmp_path.rglob("*.zarr")) and not list(tmp_path.rglob("out"))


def test_an_invalid_config_leaves_no_empty_out_folder(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    proc = run_pcim("explain", str(plate), "--set", "explain.target=layout:no_such_column")
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "no_such_column" in last_line(proc)
    assert not (tmp_path / "out").exists()


def test_an_empty_file_or_pcims_own_csv_is_replaced(tmp_path: Path) -> None:
    """The rule's other side: an empty file (made by mktemp for pcim to fill) and pcim's own CSV are outputs
    pcim may write."""
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    (tmp_path / "empty.csv").write_bytes(b"")
    first = run_pcim("explain", str(plate), "--set", "output.csv=empty.csv")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "empty.csv").read_text().startswith("Metadata_Plate,Metadata_Well,Metadata_Site")
    again = run_pcim("explain", str(plate), "--set", "output.csv=empty.csv")
    assert again.returncode == 0, again.stderr[-2000:]
