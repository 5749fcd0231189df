"""Issue 13: never serve a stale map, never lose a row, refuse bad settings at once.

Each test reproduces a defect reported by a demanding first user, through the installed `pcim` on real
TIFFs, real TorchScript models (tests/model_factory.py) and a real Zarr store read back afterwards.
Signals, kills, disk-full, damaged metadata and foreign stores are in test_faults.py.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from model_factory import make_model
from PIL import Image
from plate_factory import make_plate, run_pcim
from truth import assert_consistent, field_record, plate_record

WELLS = ("A01", "A02")


def fitted(proc) -> int:
    """Maps computed by a run, from its summary line."""
    match = re.search(r"\((\d+) fitted by this run\)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return int(match.group(1))


def out(plate: Path) -> tuple[Path, Path]:
    return plate.parent / "out" / "P1.zarr", plate.parent / "out" / "P1.csv"


def tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 2. stale or mixed-up maps


def test_swapped_channel_tokens_redo_every_field(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    assert run_pcim("explain", str(plate)).returncode == 0
    swapped = run_pcim("explain", str(plate), "--set", 'plate.channels={DNA: "3", PH3: "2", Actin: "1"}')
    assert swapped.returncode == 0, swapped.stderr[-2000:]
    assert fitted(swapped) == 4
    assert_consistent(*out(plate))


def test_changed_input_files_redo_their_fields_and_identical_copies_do_not(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01"), steps=2)
    zarr_path, csv_path = out(plate)
    assert run_pcim("explain", str(plate)).returncode == 0
    images = tmp_path / "images"

    copy = tmp_path / "copy"  # the same pixels in a new folder, new modification times
    copy.mkdir()
    for path in images.iterdir():
        shutil.copyfile(path, copy / path.name)
    same = run_pcim("explain", str(plate), "--set", "plate.images=copy")
    assert same.returncode == 0 and fitted(same) == 0, same.stderr[-2000:]

    # A02 site 1's PH3 plane is exported again, with other pixels, under the same name
    replaced = copy / "A02_s1_w2.tif"
    tifffile.imwrite(replaced, np.flipud(tifffile.imread(replaced)))
    one = run_pcim("explain", str(plate), "--set", "plate.images=copy")
    assert one.returncode == 0 and fitted(one) == 1, one.stderr[-2000:]
    assert field_record(zarr_path, "A/2/0")["fingerprint"] == plate_record(zarr_path)["fingerprint"]

    other = tmp_path / "other"  # another plate's images under the same names: every field is redone
    other.mkdir()
    for path in images.iterdir():
        donor = path.name.replace("A0", "C0").replace("B0", "D0")
        shutil.copyfile(Path(__file__).resolve().parents[1] / "sample_plates/demo/images" / donor, other / path.name)
    redo = run_pcim("explain", str(plate), "--set", "plate.images=other")
    assert redo.returncode == 0 and fitted(redo) == 6, redo.stderr[-2000:]
    assert_consistent(zarr_path, csv_path)


def test_a_second_plate_is_refused_in_another_plates_store_unless_forced(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, output={"zarr": "out/maps.zarr"})
    zarr_path = tmp_path / "out" / "maps.zarr"
    assert run_pcim("explain", str(plate)).returncode == 0
    before = tree_digest(zarr_path)

    second = run_pcim("explain", str(plate), "--set", "plate.name=P2")
    assert second.returncode == 65, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith("pcim: error:") and str(zarr_path) in line and "P1" in line and "--force" in line
    assert tree_digest(zarr_path) == before and not (tmp_path / "out" / "P2.csv").exists()

    forced = run_pcim("explain", str(plate), "--set", "plate.name=P2", "--force")
    assert forced.returncode == 0 and fitted(forced) == 4, forced.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "P2.csv")
    assert (table["Metadata_Plate"] == "P2").all() and len(table) == 4
    assert plate_record(zarr_path)["plate"] == "P2"
    assert_consistent(zarr_path, tmp_path / "out" / "P2.csv")


def test_renamed_classes_never_leave_old_names_in_the_csv(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, explain={"target": "all"})
    assert run_pcim("explain", str(plate)).returncode == 0
    renamed = run_pcim("explain", str(plate), "--set", "model.classes=[neg, mit]")
    assert renamed.returncode == 0, renamed.stderr[-2000:]
    table = pd.read_csv(out(plate)[1])
    assert set(table["PCIM_Target"]) == {"neg", "mit"} and set(table["PCIM_PredictedClass"]) <= {"neg", "mit"}


# --------------------------------------------------------------------------------------------------
# 3, 4 and exit 78: fields the model cannot score


def _blank(images: Path, stem: str, value: int = 0) -> None:
    for c in (1, 2, 3):
        path = images / f"{stem}_w{c}.tif"
        tifffile.imwrite(path, np.full_like(tifffile.imread(path), value))


def test_a_blank_field_the_model_cannot_score_fails_alone_and_the_csv_agrees_with_the_store(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, compute={"batch_size": 1},
                       model={"path": "standardise.ts"})
    make_model("standardise", tmp_path / "standardise.ts")
    _blank(tmp_path / "images", "A02_s1")
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 3, proc.stderr[-2000:]
    table = pd.read_csv(out(plate)[1])
    bad = table[(table["Metadata_Well"] == "A02") & (table["Metadata_Site"] == 1)]
    assert list(bad["PCIM_Status"]) == ["failed"]
    error = bad["PCIM_Error"].iloc[0]
    assert "standardise.ts" in error and "non-finite" in error and "blank or constant" in error
    assert (table.drop(bad.index)["PCIM_Status"] == "done").all() and len(table) == 4
    states = assert_consistent(*out(plate))
    assert states == {"A/1/0": "done", "A/1/1": "done", "A/2/0": "failed", "A/2/1": "done"}


def test_nan_logits_fail_the_fields_naming_the_model_and_exit_78_when_all_fail(tmp_path: Path) -> None:
    """A model with a statistic across the batch: NaN logits for one image, finite for two (the probe)."""
    plate = make_plate(tmp_path, wells=WELLS, steps=2, model={"path": "batch-std.ts"})
    make_model("batch-std", tmp_path / "batch-std.ts")
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 78, proc.stderr[-2000:]
    table = pd.read_csv(out(plate)[1])
    assert (table["PCIM_Status"] == "failed").all() and len(table) == 4
    assert table["PCIM_Error"].str.contains("batch-std.ts").all()
    assert table["PCIM_Error"].str.contains("non-finite").all()
    assert set(assert_consistent(*out(plate)).values()) == {"failed"}


def test_a_model_returning_nan_is_refused_when_it_is_loaded(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, model={"path": "nan.ts"})
    make_model("always-nan", tmp_path / "nan.ts")
    proc = run_pcim("validate", str(plate))
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "nan.ts" in proc.stderr and "non-finite" in proc.stderr


@pytest.mark.parametrize("cause", ["model raises", "input_size larger than the fields"])
def test_exit_78_when_every_field_failed_because_of_the_model(tmp_path: Path, cause: str) -> None:
    if cause == "model raises":
        plate = make_plate(tmp_path, wells=WELLS, steps=2, model={"path": "only64.ts"})
        make_model("only-64", tmp_path / "only64.ts")
        proc = run_pcim("explain", str(plate))
        assert "exported for 64 x 64 inputs" in proc.stderr
    else:
        plate = make_plate(tmp_path, wells=WELLS, steps=2)
        proc = run_pcim("explain", str(plate), "--set", "model.input_size=[256, 256]")
        assert "set model.input_size to at most the field size" in proc.stderr
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert (pd.read_csv(out(plate)[1])["PCIM_Status"] == "failed").all()


def test_a_constant_field_gets_a_warning_in_its_row(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    _blank(tmp_path / "images", "A01_s2", value=300)
    proc = run_pcim("explain", str(plate))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out(plate)[1], keep_default_na=False)
    row = table[(table["Metadata_Well"] == "A01") & (table["Metadata_Site"] == 2)].iloc[0]
    assert row["PCIM_Status"] == "done" and row["PCIM_Error"].startswith("warning:")
    assert "constant" in row["PCIM_Error"] and "A01_s2_w1.tif" in row["PCIM_Error"]
    others = table.drop(row.name)
    assert (others["PCIM_Error"] == "").all()


# --------------------------------------------------------------------------------------------------
# 5. a plate.wells subset keeps the whole plate


def test_a_plate_wells_subset_keeps_every_row_and_failure_of_the_store(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01"), steps=2)
    (tmp_path / "images" / "A02_s1_w2.tif").write_bytes(b"")
    (tmp_path / "images" / "B01_s2_w1.tif").write_bytes(b"not a tiff")
    zarr_path, csv_path = out(plate)
    assert run_pcim("explain", str(plate)).returncode == 3
    before = pd.read_csv(csv_path, keep_default_na=False)
    assert len(before) == 6 and (before["PCIM_Status"] == "failed").sum() == 2

    subset = run_pcim("explain", str(plate), "--set", "plate.wells=[A01]")
    assert subset.returncode == 3, subset.stderr[-2000:]
    after = pd.read_csv(csv_path, keep_default_na=False)
    assert len(after) == 6
    cols = ["Metadata_Well", "Metadata_Site", "PCIM_Status"]
    assert after[cols].equals(before[cols])
    failed = after[after["PCIM_Status"] == "failed"]
    assert failed["PCIM_Error"].str.contains("A02_s1_w2.tif is empty").any()
    assert failed["PCIM_Error"].str.contains("B01_s2_w1.tif").any()
    status = json.loads(run_pcim("status", str(zarr_path), "--json").stdout)
    assert status["totals"]["failed"] == 2 and status["totals"]["done"] == 4
    assert_consistent(zarr_path, csv_path)


# --------------------------------------------------------------------------------------------------
# 6, 7. YAML: leading zeros, alias bombs, deep nesting


def test_plate_names_with_leading_zeros_stay_text_and_numbers_are_decimal(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    plate.write_text(plate.read_text().replace("name: P1", "name: 0012345"))
    proc = run_pcim("explain", str(plate), "--set", "explain.steps=010")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "0012345.csv", dtype=str)
    assert (table["Metadata_Plate"] == "0012345").all()
    record = field_record(tmp_path / "out" / "0012345.zarr", "A/1/0")
    assert record["settings"]["engine"]["steps"] == 10
    by_set = run_pcim("validate", str(plate), "--json", "--set", "plate.name=0012345")
    assert json.loads(by_set.stdout)["plate"] == "0012345"
    by_env = run_pcim("validate", str(plate), "--json", PCIM_PLATE__NAME="0012345")
    assert json.loads(by_env.stdout)["plate"] == "0012345"


def test_yaml_booleans_do_not_turn_class_names_into_true_and_false(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    plate.write_text(plate.read_text().replace("- negative\n  - mitotic", "- no\n  - yes"))
    proc = run_pcim("validate", str(plate))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "classes no, yes" in proc.stdout


def _limited(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


BOMB = """plate:
  images: images
  channels: [DNA, PH3, Actin]
  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  name: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  wells: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
model: {path: classifier.ts}
"""


@pytest.mark.parametrize("text", [BOMB, "plate: " + "[" * 100_000 + "]" * 100_000 + "\n"],
                         ids=["alias bomb", "100k nested brackets"])
def test_hostile_yaml_exits_78_at_once_with_a_short_message(tmp_path: Path, text: str) -> None:
    plate = make_plate(tmp_path, wells=("A01",))
    plate.write_text(text)
    import subprocess

    from plate_factory import PCIM, pcim_env

    t0 = time.monotonic()
    proc = subprocess.run([*PCIM, "validate", str(plate)], capture_output=True, text=True, env=pcim_env(),
                          timeout=120, preexec_fn=_limited(4 << 30))  # a 4 GiB address space
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert len(proc.stderr) < 4000 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("pcim: error:") and "plate.yaml" in proc.stderr


# --------------------------------------------------------------------------------------------------
# 8. scheduler address and file


@pytest.mark.parametrize("kind", ["address", "scheduler-file"])
def test_a_malformed_scheduler_address_or_file_is_exit_78_naming_the_key(tmp_path: Path, kind: str) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    if kind == "address":
        args = ["--set", "compute.cluster=address", "--set", "compute.address=nonsense"]
        key = "compute.address"
    else:
        (tmp_path / "scheduler.json").write_text("garbage, not what dask scheduler --scheduler-file writes\n")
        args = ["--set", "compute.cluster=scheduler-file", "--set", "compute.scheduler_file=scheduler.json"]
        key = "compute.scheduler_file"
    t0 = time.monotonic()
    proc = run_pcim("explain", str(plate), *args, timeout=120)
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written


# --------------------------------------------------------------------------------------------------
# 10. validate opens the images


def _damage_for_validate(images: Path) -> None:
    (images / "A01_s1_w2.tif").write_bytes(b"")  # 0 bytes
    data = (images / "A02_s1_w2.tif").read_bytes()
    (images / "A02_s1_w2.tif").write_bytes(data[: len(data) // 3])  # truncated
    Image.fromarray(tifffile.imread(images / "A03_s1_w2.tif").astype(np.uint8)).save(images / "A03_s1_w2.tif",
                                                                                  format="PNG")
    for c in (1, 2, 3):  # a field of another size than its siblings
        tifffile.imwrite(images / f"B01_s1_w{c}.tif", tifffile.imread(images / f"B01_s1_w{c}.tif")[:100])
    plane = tifffile.imread(images / "B02_s1_w2.tif").astype(np.float32)
    plane[3:5, 3:5] = np.nan
    tifffile.imwrite(images / "B02_s1_w2.tif", plane)  # NaN pixels


def test_validate_lists_every_problem_explain_would_hit_with_the_same_messages(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "A03", "B01", "B02", "B03"), steps=2)
    _damage_for_validate(tmp_path / "images")
    checked = run_pcim("validate", str(plate), "--json")
    assert checked.returncode == 3, checked.stderr[-2000:]
    found = json.loads(checked.stdout)
    assert not (tmp_path / "out").exists()

    ran = run_pcim("explain", str(plate))
    assert ran.returncode == 3
    table = pd.read_csv(out(plate)[1])
    failed = table[table["PCIM_Status"] == "failed"]
    assert sorted(failed["Metadata_Well"]) == ["A01", "A02", "A03", "B01", "B02"]
    for error in failed["PCIM_Error"]:
        assert error in found["problems"], f"validate did not report: {error}"


def test_validate_exits_65_when_no_field_is_usable(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2)
    for path in (tmp_path / "images").glob("*_w2.tif"):
        path.write_bytes(b"")
    proc = run_pcim("validate", str(plate))
    assert proc.returncode == 65, proc.stdout + proc.stderr
    assert "A01_s1_w2.tif is empty" in proc.stdout and "A01_s2_w2.tif is empty" in proc.stdout


# --------------------------------------------------------------------------------------------------
# smaller: errors before anything is written, --json for every exit, internal errors


def test_a_bad_grace_period_or_csv_path_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    grace = run_pcim("explain", str(plate), PCIM_GRACE_SECONDS="soon")
    assert grace.returncode == 78 and "PCIM_GRACE_SECONDS" in grace.stderr, grace.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    (tmp_path / "summary.csv").mkdir()  # output.csv names a folder
    csv = run_pcim("explain", str(plate), "--set", "output.csv=summary.csv")
    assert csv.returncode == 65 and str(tmp_path / "summary.csv") in csv.stderr, csv.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["bad config", "usage", "not a store", "interrupted before planning"])
def test_json_prints_a_document_for_every_exit(tmp_path: Path, case: str) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    if case == "bad config":
        proc, code = run_pcim("explain", str(plate), "--json", "--set", "explain.steps=0"), 78
    elif case == "usage":
        proc, code = run_pcim("explain", "--json", "--no-such-flag", str(plate)), 2
    elif case == "not a store":
        proc, code = run_pcim("status", str(tmp_path / "nowhere.zarr"), "--json"), 65
    else:
        proc, code = run_pcim("validate", str(plate), "--json", "--set", "compute.address=tcp://"), 78
    assert proc.returncode == code, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["status"] == "error" and doc["exit_code"] == code and doc["message"]


def test_an_internal_error_is_one_line_and_the_log_path(tmp_path: Path) -> None:
    """The machine runs out of memory while pcim loads torch (a real fault, from a small address space)."""
    import subprocess

    from plate_factory import PCIM, pcim_env

    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    proc = subprocess.run([*PCIM, "explain", str(plate)], capture_output=True, text=True, env=pcim_env(),
                          timeout=300, preexec_fn=_limited(300 << 20))
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcim: error: internal error"), proc.stderr[-3000:]
    log = Path(re.search(r"traceback in (\S+\.log)", lines[0]).group(1))
    assert "Traceback" in log.read_text()
    verbose = subprocess.run([*PCIM, "explain", str(plate), "-v"], capture_output=True, text=True, env=pcim_env(),
                             timeout=300, preexec_fn=_limited(300 << 20))
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
