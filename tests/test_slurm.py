"""pcim on a real SLURM cluster: inside an sbatch job, and submitting its own Dask worker jobs.

Needs a working `sbatch` (`make test-slurm` starts a one-node cluster with scripts/slurm_up.sh);
skipped otherwise. Run with `pytest -m slurm`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from cli_runner import PCIM, pcim_env, run_pcim
from plates import DEMO

from pcim_cli.io import store

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

WELLS = ["A01", "B02"]


def _slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when sbatch works and a node is up."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch / sinfo not found: run scripts/slurm_up.sh (make test-slurm) for a one-node cluster"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer ({exc}): start slurmctld / slurmd (scripts/slurm_up.sh)"
    usable = {"idle", "mixed", "allocated", "completing"}
    if states.returncode != 0 or not usable & set(states.stdout.split()):
        return f"no SLURM node up (sinfo: {states.stdout.strip() or states.stderr.strip()}): run scripts/slurm_up.sh"
    return None


@pytest.fixture(scope="module", autouse=True)
def _need_slurm() -> None:
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)


def pcim_args(out: Path, *overrides: str) -> list[str]:
    return [*PCIM, "explain", str(DEMO / "plate.yaml"), "--set", f"plate.wells=[{','.join(WELLS)}]",
            "--set", "explain.steps=10", "--set", f"output.zarr={out}/p.zarr", "--set", f"output.csv={out}/p.csv",
            *[a for o in overrides for a in ("--set", o)]]


def check_outputs(out: Path) -> None:
    """The CSV has every field done, and each has its complete map in the store."""
    table = pd.read_csv(out / "p.csv")
    assert sorted(table["Metadata_Well"].unique()) == WELLS and len(table) == 2 * len(WELLS)
    assert (table["PCIM_Status"] == "done").all(), table[["Metadata_Well", "PCIM_Status", "PCIM_Error"]]
    for row in table.itertuples():
        maps, _, record = store.read_field(out / "p.zarr", row.Metadata_Well, int(row.PCIM_ZarrPath.rsplit("/", 1)[1]))
        assert record is not None and record["status"] == "done" and maps.shape == (1, 128, 128)


def test_pcim_inside_an_sbatch_job_with_a_local_cluster(tmp_path) -> None:
    args = " ".join(f"'{a}'" for a in pcim_args(tmp_path, "compute.cluster=local", "compute.workers=2"))
    job = tmp_path / "job.sh"
    job.write_text(f"""#!/bin/bash
#SBATCH --job-name=pcim-test
#SBATCH --cpus-per-task=2
#SBATCH --output={tmp_path}/job.out
#SBATCH --time=00:10:00
export OMP_NUM_THREADS=1
cd {tmp_path}
{args}
""")
    done = subprocess.run(["sbatch", "--wait", str(job)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{log[-3000:]}"
    assert "started a local Dask cluster: 2 worker process(es)" in log
    check_outputs(tmp_path)


def test_pcim_submits_its_own_slurm_worker_jobs(tmp_path) -> None:
    args = pcim_args(tmp_path, "compute.cluster=slurm", "compute.slurm.cores=1", "compute.slurm.memory=2GB",
                     "compute.slurm.gpus=0", "compute.slurm.jobs=1", "compute.slurm.walltime=00:10:00")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=pcim_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted 1 SLURM worker job(s)" in proc.stderr
    check_outputs(tmp_path)
    assert list(tmp_path.glob("slurm-*.out"))  # the worker job ran (its log lands in the working directory)


def test_a_two_plate_screen_runs_on_its_own_slurm_worker_jobs(tmp_path) -> None:
    """`pcim explain screen.yaml` with cluster: slurm: the wells of both plates on one set of worker jobs."""
    shared = {"model": {"path": str(DEMO / "classifier.ts"), "classes": ["negative", "mitotic"]},
              "explain": {"steps": 10},
              "compute": {"cluster": "slurm", "slurm": {"cores": 1, "memory": "2GB", "gpus": 0, "jobs": 1,
                                                        "walltime": "00:10:00"}},
              "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv", "screen_csv": "out/screen.csv"},
              "plates": [{"plate": {"name": name, "images": str(DEMO / "images"), "wells": [well],
                                    "channels": {"DNA": "1", "PH3": "2", "Actin": "3"}}}
                         for name, well in (("S1", "A01"), ("S2", "B02"))]}
    (tmp_path / "screen.yaml").write_text(json.dumps(shared))  # JSON is YAML
    proc = run_pcim("explain", "screen.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("submitted 1 SLURM worker job(s)") == 1  # one cluster for both plates
    table = pd.read_csv(tmp_path / "out" / "screen.csv")
    assert list(table["Metadata_Plate"].unique()) == ["S1", "S2"] and len(table) == 4
    assert (table["PCIM_Status"] == "done").all(), table[["Metadata_Plate", "PCIM_Status", "PCIM_Error"]]
    for row in table.itertuples():
        index = int(row.PCIM_ZarrPath.rsplit("/", 1)[1])
        _, _, record = store.read_field(tmp_path / "out" / f"{row.Metadata_Plate}.zarr", row.Metadata_Well, index)
        assert record is not None and record["status"] == "done"
