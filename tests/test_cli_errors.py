"""What the CLI refuses and reports before anything is written (issue 13): a malformed scheduler address
or file, a bad PCIM_GRACE_SECONDS or CSV path; --json prints a document for every exit; an internal error
is one line naming where its traceback is.
"""

from __future__ import annotations

import json
import re
import resource
from pathlib import Path

import pytest
from cli_runner import run_pcim
from plates import make_plate

WELLS = ("A01", "A02")


def _limited(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


# --------------------------------------------------------------------------------------------------
# a scheduler address and file


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
    proc = run_pcim("explain", str(plate), *args, timeout=120)
    # 78 = refused while reading the setting, before any connection is tried: waiting for a scheduler
    # that cannot answer ends in 75 after cluster.CONNECT_TIMEOUT_S (no wall-clock assert: a loaded
    # machine is slower, not wrong)
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "cannot reach the Dask scheduler" not in proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written


# --------------------------------------------------------------------------------------------------
# errors before anything is written, --json for every exit, internal errors


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

    from cli_runner import PCIM, pcim_env

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
