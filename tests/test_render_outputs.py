"""Issue 22 (trust, round 2): `pcim render --out DIR` never replaces a file it did not write and never
writes into an input folder (the plate's image folder, a folder of TIFFs, the store); it replaces its own
pictures and report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import run_pcim
from PIL import Image
from plates import make_plate


@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("render")
    plate = make_plate(root, wells=("A01",), steps=2)
    assert run_pcim("explain", str(plate)).returncode == 0
    return plate, root / "out" / "P1.zarr"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_never_replaces_a_users_report_or_picture(explained, tmp_path: Path) -> None:
    _, zarr_path = explained
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "report.html").write_text("<html><body>my own report of last week</body></html>\n")
    before = tree(folder)
    proc = run_pcim("render", str(zarr_path), "--out", str(folder))
    assert proc.returncode == 65, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "--out" in line and str(folder / "report.html") in line, line
    assert tree(folder) == before  # no montage, no wells/ either

    mine = tmp_path / "mine"  # pcim's own render folder: drawn again; a user's picture in it is kept
    assert run_pcim("render", str(zarr_path), "--out", str(mine)).returncode == 0
    again = run_pcim("render", str(zarr_path), "--out", str(mine))
    assert again.returncode == 0, again.stderr[-2000:]
    Image.new("RGB", (8, 8), "red").save(mine / "wells" / "A01_s1.png")  # the user's own picture
    user = tree(mine)
    refused = run_pcim("render", str(zarr_path), "--out", str(mine))
    assert refused.returncode == 65 and "A01_s1.png" in refused.stderr, refused.stderr[-2000:]
    assert tree(mine) == user


@pytest.mark.parametrize("where", ["the image folder", "a folder of TIFFs", "inside the store"])
def test_render_never_writes_into_an_input_folder(explained, tmp_path: Path, where: str) -> None:
    plate, zarr_path = explained
    if where == "the image folder":
        folder, extra = plate.parent / "images", ["--plate-yaml", str(plate)]
    elif where == "a folder of TIFFs":
        folder, extra = plate.parent / "images", []
    else:
        folder, extra = zarr_path / "A", []
    before = tree(folder)
    proc = run_pcim("render", str(zarr_path), "--out", str(folder), *extra)
    assert proc.returncode == 65, proc.stderr[-2000:]
    assert "input folder" in proc.stderr.strip().splitlines()[-1]
    assert tree(folder) == before
