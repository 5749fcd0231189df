"""Bad input through `pcim explain`: the damaged well fails with a message naming the file and the fix,
the other wells complete, the run ends with exit 3 — and nothing already written is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cli_runner import run_pcim
from plates import make_plate

from pcim_cli.io import store

GOOD = ("A01", "B01")


def _damage_missing(images: Path) -> tuple[str, str]:
    (images / "A02_s1_w2.tif").unlink()
    return "A02 field 1: no file for channel PH3", "restore it"


def _damage_empty(images: Path) -> tuple[str, str]:
    (images / "A02_s1_w2.tif").write_bytes(b"")
    return "A02_s1_w2.tif is empty (0 bytes)", "copy it again"


def _damage_truncated(images: Path) -> tuple[str, str]:
    path = images / "A02_s1_w2.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return "cannot read image file", "A02_s1_w2.tif"


def _damage_stack_in_channel_file(images: Path) -> tuple[str, str]:
    plane = tifffile.imread(images / "A02_s1_w2.tif")
    tifffile.imwrite(images / "A02_s1_w2.tif", np.stack([plane, plane]))
    return "A02_s1_w2.tif holds 2 planes", "remove {channel} from plate.pattern"


def _damage_shape(images: Path) -> tuple[str, str]:
    plane = tifffile.imread(images / "A02_s1_w2.tif")
    tifffile.imwrite(images / "A02_s1_w2.tif", plane[:100])
    return "A02_s1_w2.tif is 100x128 pixels", "all channels of a field must have the same size"


def _damage_field_size(images: Path) -> tuple[str, str]:
    for c in (1, 2, 3):
        plane = tifffile.imread(images / f"A02_s1_w{c}.tif")
        tifffile.imwrite(images / f"A02_s1_w{c}.tif", plane[:100])
    return "A02 site 1: the field is 100x128 px but the plate's fields are 128x128", "export it again"


def _damage_nan(images: Path) -> tuple[str, str]:
    plane = tifffile.imread(images / "A02_s1_w2.tif").astype(np.float32)
    plane[5:9, 5:9] = np.nan
    tifffile.imwrite(images / "A02_s1_w2.tif", plane)
    return "A02_s1_w2.tif has 16 NaN or infinite pixels", "replace them"


DAMAGES = {
    "missing file": _damage_missing,
    "zero-byte TIFF": _damage_empty,
    "truncated TIFF": _damage_truncated,
    "stack where one plane belongs": _damage_stack_in_channel_file,
    "channel shape differs": _damage_shape,
    "field size differs from its siblings": _damage_field_size,
    "NaN pixels": _damage_nan,
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_field_fails_alone_with_a_message_naming_file_and_fix(tmp_path: Path, damage: str) -> None:
    plate_yaml = make_plate(tmp_path, wells=("A01", "A02", "B01"))
    what, fix = DAMAGES[damage](tmp_path / "images")
    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert what in proc.stderr and fix in proc.stderr, proc.stderr[-2000:]

    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    bad = df[(df["Metadata_Well"] == "A02") & (df["Metadata_Site"] == 1)]
    assert len(bad) == 1 and bad["PCIM_Status"].iloc[0] == "failed" and what in bad["PCIM_Error"].iloc[0]
    others = df.drop(bad.index)
    assert len(others) == 5 and (others["PCIM_Status"] == "done").all()  # A01, B01 and A02 site 2
    for well in GOOD:
        for index in (0, 1):
            maps, _, record = store.read_field(tmp_path / "out" / "P1.zarr", well, index)
            assert record["status"] == "done" and maps.shape == (1, 128, 128)


@pytest.mark.slow
def test_wrong_channel_count_in_stacks(tmp_path: Path) -> None:
    """One multi-channel stack per field; one stack holds 2 channels where the model needs 3."""
    plate_yaml = make_plate(tmp_path, wells=("A01", "A02"))
    images = tmp_path / "images"
    for path in sorted(images.glob("*_w1.tif")):
        stem = path.name[: -len("_w1.tif")]
        planes = [tifffile.imread(images / f"{stem}_w{c}.tif") for c in (1, 2, 3)]
        if stem == "A02_s2":
            planes = planes[:2]
        tifffile.imwrite(images / f"{stem}.ome.tif", np.stack(planes), metadata={"axes": "CYX"})
    for path in images.glob("*_w*.tif"):
        path.unlink()
    text = plate_yaml.read_text().replace("{well}_s{field}_w{channel}.tif", "{well}_s{field}.ome.tif")
    plate_yaml.write_text(text.replace("channels:\n    DNA: '1'\n    PH3: '2'\n    Actin: '3'",
                                       "channels: [DNA, PH3, Actin]"))
    proc = run_pcim("explain", str(plate_yaml))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "A02_s2.ome.tif holds 2 channel(s) but plate.channels lists 3" in proc.stderr
    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert df.groupby("PCIM_Status").size().to_dict() == {"done": 3, "failed": 1}


def test_unreadable_layout_is_named_with_exit_65_and_touches_nothing(tmp_path: Path) -> None:
    plate_yaml = make_plate(tmp_path, wells=("A01",))
    assert run_pcim("explain", str(plate_yaml)).returncode == 0
    before = store.read_record(tmp_path / "out" / "P1.zarr", "A01", 0)
    (tmp_path / "layout.csv").write_bytes(b"\x00\x01\xff\xfe binary garbage \x00")
    proc = run_pcim("explain", str(plate_yaml), "--force")
    assert proc.returncode == 65, proc.stderr[-2000:]
    assert "layout.csv" in proc.stderr
    assert store.read_record(tmp_path / "out" / "P1.zarr", "A01", 0) == before  # nothing lost


@pytest.mark.slow
def test_fixed_file_is_retried_on_the_next_run_and_done_fields_are_kept(tmp_path: Path) -> None:
    plate_yaml = make_plate(tmp_path, wells=("A01", "A02"))
    good_copy = (tmp_path / "images" / "A02_s1_w2.tif").read_bytes()
    (tmp_path / "images" / "A02_s1_w2.tif").write_bytes(b"")
    assert run_pcim("explain", str(plate_yaml)).returncode == 3
    zarr_path = tmp_path / "out" / "P1.zarr"
    kept = {(w, i): store.read_record(zarr_path, w, i) for w, i in (("A01", 0), ("A01", 1), ("A02", 1))}

    again = run_pcim("explain", str(plate_yaml))  # same input: the failure stands, nothing refitted
    assert again.returncode == 3 and "rerun with --retry-failed" in again.stderr

    (tmp_path / "images" / "A02_s1_w2.tif").write_bytes(good_copy)  # the user copies the file again
    fixed = run_pcim("explain", str(plate_yaml))
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "1 fitted by this run" in fixed.stderr
    assert {k: store.read_record(zarr_path, *k) for k in kept} == kept  # earlier maps untouched
    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert len(df) == 4 and (df["PCIM_Status"] == "done").all()
