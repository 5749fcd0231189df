"""plate.yaml as written (issue 13): leading zeros stay text, numbers are decimal, YAML booleans do not
turn class names into true / false, and hostile files (alias bombs, deep nesting) end at once with exit 78.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pandas as pd
import pytest
from cli_runner import run_pcim
from plates import make_plate
from truth import field_record

# --------------------------------------------------------------------------------------------------
# YAML: leading zeros, alias bombs, deep nesting


@pytest.mark.slow
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


@pytest.mark.slow
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

    from cli_runner import PCIM, pcim_env

    # an expanding bomb runs out of the 4 GiB address space or past the timeout (TimeoutExpired fails the
    # test); no wall-clock assert: a loaded machine is slower, not wrong
    proc = subprocess.run([*PCIM, "validate", str(plate)], capture_output=True, text=True, env=pcim_env(),
                          timeout=120, preexec_fn=_limited(4 << 30))  # a 4 GiB address space
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert len(proc.stderr) < 4000 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("pcim: error:") and "plate.yaml" in proc.stderr
