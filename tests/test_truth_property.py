"""A property of the whole tool: whatever a plate goes through — runs, subsets, changed settings, damaged
and restored files, damaged map arrays, retries, forced reruns, SIGTERM and kill -9 at random moments,
output paths that collide with the plate's inputs or with each other — the CSV, the store's records and
`pcim status` agree after every run that ends, no field counted done has a stale or damaged map, and a
refused run changes no file at all.

Every step runs the installed `pcim` on a small real plate (2 wells, 4 fields, 3 Adam steps).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from cli_runner import run_pcim, start_pcim
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from plates import make_plate
from truth import assert_consistent, field_record, record_states

OPS = ("run", "only A01", "plate.wells A02", "other steps", "damage a file", "restore the file", "retry-failed",
       "force", "SIGTERM", "kill -9")
DAMAGED = "A02_s1_w2.tif"


def _stale(zarr_path: Path, images: Path, steps: int) -> list[str]:
    """Fields counted done whose record was made with other steps or other input files than now."""
    out = []
    for rel, state in record_states(zarr_path).items():
        if state != "done":
            continue
        record = field_record(zarr_path, rel)
        if record["settings"]["engine"]["steps"] != steps:
            out.append(f"{rel}: made with {record['settings']['engine']['steps']} steps, not {steps}")
        for entry in record["inputs"]["stat"]:
            st_ = os.stat(images / entry["name"])
            if (entry["size"], entry["mtime_ns"]) != (st_.st_size, st_.st_mtime_ns):
                out.append(f"{rel}: {entry['name']} changed since its map was made")
    return out


#: output paths that are an input of the plate or another output: refused (65 / 78), nothing written
COLLISIONS = ("output.csv=layout.csv", "output.csv=plate.yaml", "output.csv=classifier.ts",
              "output.csv=images/A01_s1_w1.tif", "output.csv=out/../images/../layout.csv",
              "output.csv=out/P1.zarr/summary.csv", "output.zarr=out/P1.csv", "output.csv=out/P1.zarr")
#: a field's level-0 map array damaged: its metadata, or its chunk files
MAP_DAMAGE = tuple(f"damage map {rel} {how}" for rel in ("A/1/0", "A/1/1", "A/2/0", "A/2/1")
                   for how in ("metadata", "chunks"))


@st.composite
def sequences(draw) -> list[str]:
    """A few operations in random order, always with a file damaged, a subset run, a run stopped by a
    signal, a damaged map array and output paths on an input or on another output."""
    ops = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=3))
    ops += [draw(st.sampled_from(("SIGTERM", "kill -9"))), "damage a file",
            draw(st.sampled_from(("only A01", "plate.wells A02"))), draw(st.sampled_from(MAP_DAMAGE)),
            "collide " + draw(st.sampled_from(COLLISIONS))]
    return draw(st.permutations(ops))


def _damage_map(zarr_path: Path, op: str) -> None:
    """`damage map A/2/0 metadata|chunks`: the field's level-0 map array loses its metadata or its chunks."""
    _, _, rel, how = op.split()
    array = zarr_path / rel / "0"
    if not array.is_dir():
        return  # never written: nothing to damage
    if how == "metadata":
        (array / "zarr.json").write_text("xx\n")
    else:
        for chunk in [p for p in array.rglob("*") if p.is_file() and p.name != "zarr.json"]:
            chunk.unlink()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=sequences(), delays=st.lists(st.floats(min_value=0.5, max_value=12.0), min_size=6, max_size=6))
def test_csv_records_and_status_agree_after_any_sequence_of_runs(tmp_path_factory, ops, delays) -> None:
    root = tmp_path_factory.mktemp("plate")
    plate = make_plate(root, wells=("A01", "A02"), steps=3)
    images, zarr_path, csv_path = root / "images", root / "out" / "P1.zarr", root / "out" / "P1.csv"
    good = (images / DAMAGED).read_bytes()
    steps = 3
    history = []
    event(" > ".join(["run", *ops]))  # shown with --hypothesis-show-statistics
    for op, delay in zip(["run", *ops], [0.0, *delays, *delays], strict=False):
        history.append(op)
        args = ["explain", str(plate), "--set", f"explain.steps={steps}"]
        if op == "other steps":
            steps = 7 - steps  # 3 <-> 4
            args[-1] = f"explain.steps={steps}"
        elif op == "damage a file":
            (images / DAMAGED).write_bytes(b"")
        elif op == "restore the file":
            (images / DAMAGED).write_bytes(good)
        elif op.startswith("damage map"):
            _damage_map(zarr_path, op)
        elif op.startswith("collide"):  # refused before anything runs: every file as it was
            before = _tree(root)
            refused = run_pcim(*args, "--set", op.split(" ", 1)[1])
            assert refused.returncode in (65, 78), (history, refused.stderr[-3000:])
            assert "Traceback" not in refused.stderr, (history, refused.stderr[-3000:])
            assert _tree(root) == before, history
            continue
        extra = {"only A01": ["--only", "A01"], "plate.wells A02": ["--set", "plate.wells=[A02]"],
                 "retry-failed": ["--retry-failed"], "force": ["--force"]}.get(op, [])
        if op in ("SIGTERM", "kill -9"):
            proc = start_pcim(*args)
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM if op == "SIGTERM" else signal.SIGKILL)
            _, err = proc.communicate(timeout=300)
            code = proc.returncode
            if op == "kill -9":
                continue  # the CSV lags until the next run ends; status and records still agree
        else:
            done = run_pcim(*args, *extra)
            code, err = done.returncode, done.stderr
        assert code in (0, 3, 65, 75) or (op == "SIGTERM" and code == -signal.SIGTERM), (history, err[-3000:])
        assert "Traceback" not in err, (history, err[-3000:])
        if not zarr_path.exists() or "stopped before anything was written" in err or code < 0:
            continue  # nothing written by this run: the store and CSV are as the last finished run left them
        assert_consistent(zarr_path, csv_path)
        assert len(pd.read_csv(csv_path)) >= 4, history  # the whole plate, whatever the run touched
        assert not _stale(zarr_path, images, steps), (history, _stale(zarr_path, images, steps))
