"""`pcim render`'s colour composites, montage labels and text, through the installed `pcim` on a real store."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_pcim
from PIL import Image
from plates import DEMO, explain_demo

from pcim_cli.errors import ConfigError
from pcim_cli.report import composite, drawing, render

WELLS = ["A01", "A04"]  # layout targets: A01 mitotic, A04 negative


@pytest.fixture(scope="module")
def layout_store(tmp_path_factory) -> Path:
    return explain_demo(tmp_path_factory.mktemp("colour"), WELLS, "--set", "explain.target=layout:expected_class")


def _overlay(store: Path, out: Path, *args: str) -> np.ndarray:
    proc = run_pcim("render", str(store), "--plate-yaml", str(DEMO / "plate.yaml"), "--wells", "A01",
                    "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.asarray(Image.open(out / "wells" / "A01_s1.png").convert("RGB")).astype(int)


def _colourful(img: np.ndarray) -> float:
    """Share of pixels whose channels differ by more than 30 (not grey)."""
    return float(((img.max(2) - img.min(2)) > 30).mean())


@pytest.mark.slow
def test_composites_draw_the_maps_over_colour(layout_store, tmp_path):
    grey = _overlay(layout_store, tmp_path / "grey", "--channel", "DNA")
    rgb = _overlay(layout_store, tmp_path / "rgb", "--channel", "rgb")
    fluo = _overlay(layout_store, tmp_path / "fluo", "--channel", "DNA=blue,PH3=green")
    assert grey.shape == rgb.shape == fluo.shape
    # under a weak map the base shows: grey stays grey (only the heat map has colour), composites do not
    assert _colourful(rgb) > _colourful(grey) + 0.05 and _colourful(fluo) > _colourful(grey) + 0.05
    panel = fluo[40:200, 10:200]  # inside the image panel: DNA drawn blue, so blue dominates red there
    assert panel[..., 2].mean() > panel[..., 0].mean()


@pytest.mark.slow
def test_a_bad_composite_is_refused_naming_the_channel(layout_store, tmp_path):
    proc = run_pcim("render", str(layout_store), "--plate-yaml", str(DEMO / "plate.yaml"), "--channel",
                    "DNA,GFP", "--out", str(tmp_path / "x"))
    assert proc.returncode == 78 and "'GFP' is not one of plate.channels" in proc.stderr
    with pytest.raises(ConfigError, match="not a colour"):
        composite.parse_spec("DNA=teal", ["DNA", "PH3"])
    with pytest.raises(ConfigError, match="needs 3 channels"):
        composite.parse_spec("rgb", ["DNA", "PH3"])


@pytest.mark.slow
def test_a_montage_of_wells_with_different_targets_labels_each_well(layout_store, tmp_path):
    plate = render.open_plate(layout_store)
    thumbs, shown = render.montage_thumbs(plate)
    assert shown == {"A01": "mitotic", "A04": "negative"}
    plain = np.asarray(drawing.draw_montage(plate, thumbs, "x"), dtype=int)
    labelled = np.asarray(drawing.draw_montage(plate, thumbs, "x", labels=shown), dtype=int)
    cell = drawing.CELL
    # the labels are written at the foot of A01's and A04's cells, nothing else changes
    changed = np.argwhere((plain != labelled).any(2))
    assert len(changed) > 20 and changed[:, 0].min() > 40 + cell // 2 and changed[:, 0].max() < 40 + cell + 2
    proc = run_pcim("render", str(layout_store), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def _space(font) -> int:
    def width(text: str) -> int:
        left, _, right, _ = font.getbbox(text)
        return right - left

    return (width("C04 site 1") - width("C04site1")) // 2


def test_titles_keep_their_spaces():
    assert composite.font_path() is not None  # matplotlib (test extra) ships DejaVu Sans
    assert _space(composite.font()) >= 3


def test_without_matplotlib_a_font_with_spaces_is_still_found(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    composite.font.cache_clear()
    try:
        path = composite.font_path()
        assert path is None or "matplotlib" not in str(path)  # the system's DejaVu, if installed
        monkeypatch.setattr(composite, "SYSTEM_FONT_DIRS", ())
        assert composite.font_path() is None
        assert _space(composite.font()) >= 2  # Pillow's own scalable font at the same size
    finally:
        composite.font.cache_clear()
