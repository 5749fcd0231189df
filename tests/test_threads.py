"""The thread policy (run/threads.py): CPU limits from real cgroup-like files, the per-process share,
the probe that times a real fit's steps, and `compute.threads` through the installed CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cli_runner import PCIM, pcim_env, run_pcim
from plates import make_plate

from pcim_cli.engine.pcim import PcimOptions, fit_pcim
from pcim_cli.run import threads


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------------- cgroups


def test_cgroup_v2_quota_is_the_tightest_level_of_the_path(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/user.slice/job7\n")
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "cpu.max", "150000 100000\n")  # a parent's quota binds the child
    _write(root / "user.slice" / "job7" / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_quota(proc, root) == pytest.approx(1.5)
    limits = threads.read_limits({}, proc, root, affinity=8)
    assert limits.quota == pytest.approx(1.5)
    assert limits.usable == 1  # 1.5 CPUs: one thread never waits for its quota
    assert threads.threads_per_process("auto", 1, limits) == 1


def test_cgroup_v1_cpu_controller_and_unlimited_quotas(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/x\n3:cpu,cpuacct:/slurm/uid_0/job_12\n0::/\n")
    root = tmp_path / "cgroup"
    job = root / "cpu,cpuacct" / "slurm" / "uid_0" / "job_12"
    _write(job / "cpu.cfs_quota_us", "400000\n")
    _write(job / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # the root: unlimited
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_quota(proc, root) == pytest.approx(4.0)
    limits = threads.read_limits({}, proc, root, affinity=64)
    assert threads.threads_per_process("auto", 2, limits) == 2  # 4 CPUs shared by 2 workers

    _write(job / "cpu.cfs_quota_us", "-1\n")
    assert threads.cgroup_cpu_quota(proc, root) is None
    assert threads.read_limits({}, proc, root, affinity=64).usable == 64


def test_container_cgroup_seen_as_the_mount_root(tmp_path: Path) -> None:
    """In a container /proc/self/cgroup names a path the container cannot see: the mount root's file counts."""
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/docker/4f2a\n")
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "200000 100000\n")
    assert threads.cgroup_cpu_quota(proc, root) == pytest.approx(2.0)
    assert threads.cgroup_cpu_quota(tmp_path / "missing", root) is None


def test_slurm_omp_and_affinity_bound_the_threads(tmp_path: Path) -> None:
    none = tmp_path / "none"
    limits = threads.read_limits({"SLURM_CPUS_PER_TASK": "6", "SLURM_CPUS_ON_NODE": "32"}, none, none, affinity=32)
    assert (limits.slurm, limits.usable) == (6, 6)
    assert threads.threads_per_process("auto", 1, limits) == 6
    assert threads.threads_per_process("auto", 4, limits) == 1  # 6 // 4
    capped = threads.read_limits({"SLURM_CPUS_PER_TASK": "6", "OMP_NUM_THREADS": "2"}, none, none, affinity=32)
    assert threads.threads_per_process("auto", 1, capped) == 2
    assert threads.threads_per_process("auto", 1, threads.read_limits({}, none, none, affinity=3)) == 3
    assert threads.threads_per_process(5, 4, capped) == 5  # a number is taken as it is
    assert "OMP_NUM_THREADS 2" in capped.describe()


def test_read_limits_of_this_process_matches_its_affinity() -> None:
    limits = threads.read_limits()
    assert 1 <= limits.usable <= len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------- the probe


def test_decide_keeps_more_threads_only_when_clearly_faster() -> None:
    assert threads.decide({2: [0.50, 0.52, 0.48], 1: [1.0, 0.9, 1.1]}) == 2
    assert threads.decide({2: [0.95, 0.90, 1.00], 1: [1.0, 1.0, 1.0]}) == 1  # < MARGIN faster: not worth it
    assert threads.decide({2: [13.0, 12.0, 14.0], 1: [1.0, 1.1, 0.9]}) == 1  # a busy machine: thrashing
    assert threads.decide({4: [0.3], 2: [0.4], 1: [1.0]}) == 4
    assert threads.decide({2: [0.1], 1: []}) == 1


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).amax(dim=(2, 3)))


def test_probe_times_the_fits_own_steps_and_sets_the_faster_count() -> None:
    model = _Conv().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 0])
    opts = PcimOptions(steps=12)
    before = torch.get_num_threads()
    try:
        threads.apply(2, auto=True)
        probe = threads.probing(model, "cpu")
        assert isinstance(probe, threads.ThreadProbe)
        probed = fit_pcim(probe, x, target, opts)
        assert probe.done
        # a warm-up step at one thread, then 1 to PROBE_ROUNDS timed steps at each count, alternating: the
        # fit's own steps
        counts = {n: len(t) for n, t in probe.timings.items()}
        assert counts[1] == counts[2] + 1 and 1 <= counts[2] <= threads.PROBE_ROUNDS
        chosen = torch.get_num_threads()
        assert chosen in (1, 2)
        assert chosen == threads.decide({2: probe.timings[2], 1: probe.timings[1][1:]})
        assert threads.probing(model, "cpu") is model  # decided: no new probe until REPROBE_S
        assert threads.probing(model, "cuda") is model
        plain = fit_pcim(model, x, target, opts)
        torch.testing.assert_close(probed.maps, plain.maps, rtol=1e-4, atol=1e-6)  # the fit is unchanged
    finally:
        threads.apply(None, False)
        torch.set_num_threads(before)


def test_no_probe_with_one_thread_or_a_fixed_number() -> None:
    model = _Conv().eval()
    before = torch.get_num_threads()
    try:
        threads.apply(1, auto=True)
        assert threads.probing(model, "cpu") is model
        threads.apply(2, auto=False)
        assert torch.get_num_threads() == 2
        assert threads.probing(model, "cpu") is model
    finally:
        threads.apply(None, False)
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_compute_threads_through_the_cli(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=12)
    log = tmp_path / "run.log"
    env = {k: v for k, v in pcim_env().items() if k != "OMP_NUM_THREADS"}  # no cap: the policy decides
    import subprocess

    proc = subprocess.run([*PCIM, "explain", str(plate), "-q", "--log-file", str(log)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    usable = threads.read_limits(env).usable
    assert f"torch threads: {usable}" in text
    if usable > 1:  # the first fit steps chose between `usable` threads and 1
        assert "a fit step took" in text

    fixed = run_pcim("explain", str(plate), "-q", "--force", "--set", "compute.threads=1", "--log-file", str(log))
    assert fixed.returncode == 0, fixed.stderr
    assert "torch threads: 1 (compute.threads: 1)" in log.read_text()

    bad = run_pcim("explain", str(plate), "--set", "compute.threads=many")
    assert bad.returncode == 78
    assert "compute.threads" in bad.stderr and "'auto' or a positive whole number" in bad.stderr


@pytest.mark.parametrize(("well_s", "expected"), [({2: 3.0, 1: 1.0}, 1), ({2: 1.0, 1: 1.6}, 2),
                                                   ({2: 1.0, 1: 1.1}, 1)])
def test_a_run_without_fit_steps_times_whole_wells_and_decides(well_s, expected) -> None:
    """pcim-amortised without refine calls the model forward only: the probe times whole wells of the
    process (a probe per well, as a worker makes them: from one well's first model call to the next's),
    alternating n threads and one after a warm-up well at one, and keeps n only when clearly faster."""
    model = _Conv().eval()
    before = torch.get_num_threads()
    now = [0.0]
    counts: list[int] = []
    try:
        threads.apply(2, auto=True)
        x = torch.rand(2, 3, 16, 16)
        for _ in range(10):
            probe = threads.probing(model, "cpu", clock=lambda: now[0], steps=False)
            if probe is model:  # decided: later wells get the model itself
                break
            assert isinstance(probe, threads.WellProbe)
            with torch.no_grad():
                for _ in range(3):  # a well's calls: the count is set at its first
                    torch.testing.assert_close(probe(x), model(x))
            counts.append(torch.get_num_threads())
            if probe.done:
                break
            now[0] += well_s[counts[-1]]  # the well's work at the count it ran with
        assert counts[:3] == [1, 2, 1] and counts[-1] == expected == torch.get_num_threads()
        timed = len(counts) - 1  # the last probe decided at its well's start
        assert 3 <= timed <= 1 + 2 * threads.PROBE_ROUNDS
        assert threads.probing(model, "cpu", clock=lambda: now[0], steps=False) is model  # decided
        now[0] += threads.REPROBE_S + 1
        assert isinstance(threads.probing(model, "cpu", clock=lambda: now[0], steps=False), threads.WellProbe)
    finally:
        threads.apply(None, False)
        torch.set_num_threads(before)
