"""Distributed execution: in-process vs a real LocalCluster, faults, stop signals, progress output.

Everything runs for real on a few wells of the bundled demo plate: worker processes are started,
killed by pid and signalled; nothing is mocked. The cluster tests are marked slow.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_runner import PCIM, pcim_env
from plates import DEMO, STORE_RTOL

from pcim_cli.config import ComputeConfig, load_config, settings
from pcim_cli.errors import EXIT_TEMPFAIL, ConfigError, TemporaryFailure
from pcim_cli.io import store
from pcim_cli.run import cluster, explain, progress, scheduler

WELLS = ["A01", "A02", "B01", "B02"]


def demo_config(tmp_path: Path, *overrides: str, wells: list[str] = WELLS, steps: int = 30):
    return load_config(DEMO / "plate.yaml", [
        f"plate.wells=[{', '.join(wells)}]", f"explain.steps={steps}",
        f"output.zarr={tmp_path}/p.zarr", f"output.csv={tmp_path}/p.csv", *overrides,
    ], environ={})


def csv_without_timings(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=["PCIM_Runtime_s"])


def all_maps(zarr: Path, table: pd.DataFrame) -> dict[str, np.ndarray]:
    out = {}
    for row in table.itertuples():
        index = int(row.PCIM_ZarrPath.rsplit("/", 1)[1])
        out[row.PCIM_ZarrPath] = store.read_field(zarr, row.Metadata_Well, index)[0]
    return out


def broken(task):
    """A well whose task raises on the worker (an engine setting the engine does not know)."""
    return task.model_copy(update={"engine": {**task.engine, "no_such_setting": 1}})


# --------------------------------------------------------------------------------------------------
# progress and settings (fast)


def test_clock_and_progress_line() -> None:
    assert progress.clock(41) == "00:41" and progress.clock(3725) == "1:02:05" and progress.clock(None) == "--:--"
    counter = progress.WellCounter(total=384, now=0.0)
    for i in range(120):
        counter.add([{"status": "failed" if i < 2 else "done"}])
    assert counter.line(now=60.0) == "wells 120/384 done, 2 failed, ETA 02:12"


def test_plain_progress_logs_at_most_every_n_seconds_and_at_the_end(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pcim_cli")
    with progress.WellProgress(fancy=False, every_s=3600) as bar:
        bar.start(3)
        for well in ("A01", "A02", "A03"):
            bar.on_well(well, [{"site": 1, "status": "done"}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wells ")]
    assert lines == ["wells 0/3 done, 0 failed, ETA --:--", "wells 3/3 done, 0 failed, ETA 00:00"]


def test_plain_progress_logs_failed_wells_and_the_end_of_an_interrupted_run(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pcim_cli")
    with progress.WellProgress(fancy=False, every_s=3600) as bar:
        bar.start(5)
        bar.on_well("A01", [{"site": 1, "status": "failed"}])
    messages = [r.getMessage() for r in caplog.records]
    assert "A01: site 1 failed" in messages
    assert messages[-1].startswith("wells 1/5 done, 1 failed, ETA ")


def test_quiet_progress_says_nothing(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pcim_cli")
    with progress.WellProgress(fancy=True, quiet=True, every_s=0) as bar:
        bar.start(2)
        bar.on_well("A01", [{"site": 1, "status": "done"}])
    assert not [r for r in caplog.records if r.getMessage().startswith("wells ")]


def test_grace_period_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(settings.GRACE_ENV, raising=False)
    assert settings.read_settings().grace_seconds == settings.Settings().grace_seconds == 60
    monkeypatch.setenv(settings.GRACE_ENV, "5")
    assert settings.read_settings().grace_seconds == 5.0
    monkeypatch.setenv(settings.GRACE_ENV, "soon")
    with pytest.raises(ConfigError, match="PCIM_GRACE_SECONDS"):
        settings.read_settings()


@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    return explain.plan(demo_config(out, steps=5, wells=["A01", "B02"])).tasks


def test_address_without_an_address_is_a_config_error(demo_tasks) -> None:
    with pytest.raises(ConfigError, match="DASK_SCHEDULER_ADDRESS"):
        scheduler.run_wells(demo_tasks, ComputeConfig(cluster="address"))


def test_missing_scheduler_file_is_a_temporary_failure(demo_tasks, tmp_path) -> None:
    compute = ComputeConfig(cluster="scheduler-file", scheduler_file=tmp_path / "scheduler.json")
    with pytest.raises(TemporaryFailure, match="dask scheduler --scheduler-file") as info:
        scheduler.run_wells(demo_tasks, compute)
    assert info.value.exit_code == EXIT_TEMPFAIL


def test_unreachable_scheduler_is_a_temporary_failure(demo_tasks, monkeypatch) -> None:
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    with pytest.raises(TemporaryFailure, match="cannot reach the Dask scheduler tcp://127.0.0.1:9"):
        scheduler.run_wells(demo_tasks, ComputeConfig(cluster="address", address="tcp://127.0.0.1:9"))


def test_in_process_a_well_that_raises_is_failed_and_the_run_goes_on(demo_tasks) -> None:
    seen = []
    out = scheduler.run_wells([broken(demo_tasks[0]), demo_tasks[1]], ComputeConfig(cluster="none"),
                              on_well=lambda well, rows: seen.append(well))
    assert seen == ["A01", "B02"] and not out.interrupted
    bad = [r for r in out.rows if r["well"] == "A01"]
    assert [r["status"] for r in bad] == ["failed", "failed"]
    assert "TypeError" in bad[0]["error"] and "no_such_setting" in bad[0]["error"]
    assert {r["status"] for r in out.rows if r["well"] == "B02"} == {"done"}


# --------------------------------------------------------------------------------------------------
# real clusters (slow)


@pytest.mark.slow
def test_local_cluster_gives_the_same_maps_and_rows_as_in_process(tmp_path) -> None:
    # One torch thread in this process and in each worker (compute.threads=1; the suite also sets
    # OMP_NUM_THREADS=1): the same float32 operations in the same order, so the maps agree whatever the
    # machine and its load. (With compute.threads: auto, each process chose its own count by timing its
    # first steps, and a sum over another number of threads rounds differently: 2.5e-6 relative was seen.)
    one = explain.run(demo_config(tmp_path / "none", "compute.cluster=none", "compute.threads=1"))
    two = explain.run(demo_config(tmp_path / "local", "compute.cluster=local", "compute.workers=2",
                                  "compute.threads=1"))
    assert one.exit_code == two.exit_code == 0 and one.counts["done"] == 2 * len(WELLS)
    a, b = csv_without_timings(one.csv), csv_without_timings(two.csv)
    # relative tolerances of float32 arithmetic: 1e-5 is about 80 ulp (float32 eps 1.2e-7) of a value,
    # whatever its size (the maps reach ~5, probabilities ~1e-3)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-7)
    maps_a, maps_b = all_maps(one.store, a), all_maps(two.store, b)
    assert maps_a.keys() == maps_b.keys()
    for key, value in maps_a.items():
        np.testing.assert_allclose(maps_b[key], value, rtol=STORE_RTOL, atol=1e-7, err_msg=key)
    hosts = {store.read_record(two.store, w, 0)["host"] for w in WELLS}
    assert hosts  # written by the workers, with their record


class Killer(threading.Thread):
    """Kills (SIGKILL, by pid) the worker process that runs a given well, `times` times."""

    def __init__(self, client, well: str, times: int):
        super().__init__(daemon=True)
        self.client, self.well, self.times, self.kills = client, well, times, 0
        self.halt = threading.Event()

    def run(self) -> None:
        last = None
        while self.kills < self.times and not self.halt.is_set():
            for addr, keys in self.client.processing().items():
                if any(f"-{self.well}-" in str(k) for k in keys) and addr != last:
                    pid = self.client.run(os.getpid, workers=[addr]).get(addr)
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        self.kills, last = self.kills + 1, addr
                    break
            time.sleep(0.2)


@pytest.mark.slow
def test_killed_workers_rerun_their_wells_and_a_well_that_keeps_killing_them_fails(tmp_path) -> None:
    import dask
    from distributed import Client, LocalCluster

    cfg = demo_config(tmp_path, steps=60)
    tasks = explain.plan(cfg).tasks
    settings = {"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(settings), LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.wait_for_workers(2, timeout=120)
        # B02 loses its worker once (rerun elsewhere); A01's workers die twice (> allowed-failures)
        killers = [Killer(client, "B02", 1), Killer(client, "A01", 2)]
        for k in killers:
            k.start()
        compute = ComputeConfig(cluster="address", address=lc.scheduler_address)
        out = scheduler.run_wells(tasks, compute)
        for k in killers:
            k.halt.set()
            k.join(5)
    assert [k.kills for k in killers] == [1, 2]
    status = {(r["well"], r["site"]): r["status"] for r in out.rows}
    assert len(status) == 2 * len(WELLS) and not out.interrupted
    assert status[("A01", 1)] == status[("A01", 2)] == "failed"
    assert all(s == "done" for (w, _), s in status.items() if w != "A01")
    error = next(r["error"] for r in out.rows if r["well"] == "A01")
    assert "worker processes died" in error


# --------------------------------------------------------------------------------------------------
# SIGTERM to a running `pcim explain`


def _wait_for_first_field(zarr: Path, wells: list[str], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(store.read_record(zarr, w, i) for w in wells for i in (0, 1)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no field finished within {timeout} s (exit {proc.poll()})")


def _wells_complete(zarr: Path, wells: list[str]) -> int:
    return sum(all(store.read_record(zarr, w, i) for i in (0, 1)) for w in wells)


@pytest.mark.slow
@pytest.mark.parametrize(("cluster", "sig"), [("none", signal.SIGTERM), ("local", signal.SIGINT)])
def test_a_stop_signal_ends_the_run_with_exit_75_and_a_csv_of_the_wells_done(tmp_path, cluster, sig) -> None:
    """SIGTERM to pcim (in-process run); Ctrl-C to the whole process group (local cluster: the workers
    get it too, ignore it, and finish their running wells)."""
    wells = ["A01", "A02", "A03", "B01", "B02", "B03"]
    zarr, csv = tmp_path / "p.zarr", tmp_path / "p.csv"
    args = [*PCIM, "explain", str(DEMO / "plate.yaml"), "--set", f"plate.wells=[{','.join(wells)}]",
            "--set", "explain.steps=80", "--set", f"output.zarr={zarr}", "--set", f"output.csv={csv}",
            "--set", f"compute.cluster={cluster}", "--set", "compute.workers=2"]
    env = pcim_env()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        _wait_for_first_field(zarr, wells, proc)
        complete_at_signal = _wells_complete(zarr, wells)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TEMPFAIL, err[-3000:]
    assert sig.name in err
    table = pd.read_csv(csv)
    assert len(table) == 2 * len(wells)  # one row per field: done, or not run
    done = table[table["PCIM_Status"] == "done"]
    assert 1 <= len(done) < len(table), table[["Metadata_Well", "PCIM_Status"]]
    assert set(table["PCIM_Status"]) <= {"done", "skipped"}
    for row in done.itertuples():  # every done row has its complete map in the store
        maps, _, record = store.read_field(zarr, row.Metadata_Well, int(row.PCIM_ZarrPath.rsplit("/", 1)[1]))
        assert record is not None and record["status"] == "done" and maps.shape == (1, 128, 128)
    if cluster == "local":  # the wells running at the signal were finished
        assert _wells_complete(zarr, wells) > complete_at_signal, err[-3000:]
        return
    # the store is intact: a second run finishes the rest and exits 0
    rerun = subprocess.run([*args[:-4], "--set", "compute.cluster=none"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (pd.read_csv(csv)["PCIM_Status"] == "done").all()
