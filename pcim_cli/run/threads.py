"""How many torch threads a process fits with: never more than it may really run, and on a busy
machine only as many as pay.

`compute.threads` (README "Threads"):

- ``N``: N torch threads in every process that fits (the pcim process with ``cluster: none``, each
  local or SLURM worker process).
- ``auto`` (default): the CPUs this process may really use (`CpuLimits.usable`: the smallest of its
  CPU affinity, the cgroup CPU quota — v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``,
  the tightest along the process's cgroup path — and ``SLURM_CPUS_PER_TASK`` inside a SLURM job),
  shared out among the worker processes of this host, at most ``OMP_NUM_THREADS`` when that is set
  (`threads_per_process`). When that leaves more than one thread on a CPU, the first fit steps of the
  process are timed alternately at that many threads and at one (`ThreadProbe`, no extra work: the
  probe times the fit's own steps), and the faster count is kept; more threads only when clearly faster
  (`MARGIN`), since a thread that does not pay is taken from the other jobs on the node. Work without
  fit steps (pcim-amortised, occlusion, ...) times whole wells instead (`WellProbe`). The probe
  is repeated after `REPROBE_S` seconds, as the load of a shared node changes.

The functions take their sources as arguments (environment, cgroup and proc paths, affinity), so tests
run them on files they write; `read_limits()` reads this process's own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: more threads are kept only when a step at that many is this much faster than at one
MARGIN = 1.15
#: steps timed per thread count (after one warm-up step each), alternating
PROBE_ROUNDS = 3
#: ... fewer when one count is this many times faster after a round
CLEAR = 2.0
#: a process probes again when its last decision is older than this (the load of a node changes)
REPROBE_S = 600.0

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuLimits:
    """What bounds the CPUs of this process, from each source (None: that source sets no bound)."""

    affinity: int  # CPUs in the process's affinity mask (os.cpu_count() where there is none)
    quota: float | None = None  # cgroup CPU quota in CPUs (1.5 = 150 ms per 100 ms period)
    slurm: int | None = None  # SLURM_CPUS_PER_TASK (else SLURM_CPUS_ON_NODE) inside a SLURM job
    omp: int | None = None  # OMP_NUM_THREADS: a cap the user (or a launcher) chose

    @property
    def usable(self) -> int:
        """CPUs this process may really run on: the tightest bound, at least 1 (a fractional quota rounds down)."""
        bounds = [self.affinity, self.slurm, None if self.quota is None else math.floor(self.quota)]
        return max(1, min(b for b in bounds if b is not None))

    def describe(self) -> str:
        parts = [f"affinity {self.affinity}"]
        if self.quota is not None:
            parts.append(f"cgroup quota {self.quota:g}")
        if self.slurm is not None:
            parts.append(f"SLURM_CPUS_PER_TASK {self.slurm}")
        if self.omp is not None:
            parts.append(f"OMP_NUM_THREADS {self.omp}")
        return ", ".join(parts)


def _positive_int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def cgroup_cpu_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup path, v2 or v1; None when unlimited or unknown.

    A quota set on a parent cgroup binds its children too, so every level from the process's own cgroup
    up to the mount root is read. In a container the process's path is often not under the mount (the
    container sees its own cgroup as the root): then the levels that exist are read.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: cpu.max = "<quota|max> <period>"
            quotas += _levels(root, path, _read_v2)
        elif "cpu" in controllers.split(","):  # cgroup v1, cpu controller (often mounted as cpu,cpuacct)
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    quotas += _levels(mount, path, _read_v1)
                    break
    return min(quotas) if quotas else None


def _levels(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas found at each level of `path` under `mount`, the mount root included."""
    parts = [p for p in path.strip("/").split("/") if p]
    found = []
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _read_v2(folder: Path) -> float | None:
    try:
        fields = (folder / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = float(fields[0]), float(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_v1(folder: Path) -> float | None:
    try:
        quota = float((folder / "cpu.cfs_quota_us").read_text().strip())
        period = float((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def read_limits(environ: Mapping[str, str] | None = None, proc_cgroup: Path = PROC_CGROUP,
                cgroup_root: Path = CGROUP_ROOT, affinity: int | None = None) -> CpuLimits:
    """This process's CPU limits (each source may be given instead, for tests)."""
    environ = os.environ if environ is None else environ
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            affinity = os.cpu_count() or 1
    # inside a SLURM job: its CPUs per task, else the job's CPUs on this node
    slurm = _positive_int(environ.get("SLURM_CPUS_PER_TASK")) or _positive_int(environ.get("SLURM_CPUS_ON_NODE"))
    return CpuLimits(affinity=max(1, affinity), quota=cgroup_cpu_quota(proc_cgroup, cgroup_root), slurm=slurm,
                     omp=_positive_int(environ.get("OMP_NUM_THREADS")))


def threads_per_process(setting: int | str, workers: int, limits: CpuLimits) -> int:
    """torch threads for each of `workers` fitting processes on this host under `setting` (auto | N)."""
    if setting != "auto":
        return int(setting)
    share = max(1, limits.usable // max(1, workers))
    return min(share, limits.omp) if limits.omp is not None else share


# --------------------------------------------------------------------------------------------------
# the probe: time the fit's own steps at n threads and at 1, keep the faster


def decide(timings: Mapping[int, list[float]], margin: float = MARGIN) -> int:
    """The thread count to keep from step times per count: the most threads whose median step is at
    least `margin` times faster than one thread's (1 when none is, or when a count has no timing)."""
    if 1 not in timings or not timings[1]:
        return 1
    one = statistics.median(timings[1])
    best, best_time = 1, one
    for n, times in sorted(timings.items()):
        if n == 1 or not times:
            continue
        t = statistics.median(times)
        if t * margin < one and t < best_time:
            best, best_time = n, t
    return best


class _Policy:
    """This process's thread setting: the cap and whether (and when) to probe. Torch's thread count is
    per process, so is this."""

    def __init__(self) -> None:
        self.cap: int | None = None
        self.auto = False
        self.decided_at: float | None = None
        self.chosen: int | None = None
        # WellProbe's timings, kept for the process (a worker makes a probe per well): seconds per well
        # at each thread count, and the well being timed (its start, its count)
        self.well_timings: dict[int, list[float]] = {}
        self.well_open: tuple[float, int] | None = None


_POLICY = _Policy()


def apply(threads: int | None, auto: bool) -> None:
    """Use `threads` torch threads in this process from now on (None: leave torch's setting); with `auto`
    and more than one thread, the next fit's first steps decide between that many and one."""
    if threads is None:
        _POLICY.cap, _POLICY.auto = None, False
        return
    if (_POLICY.cap, _POLICY.auto) != (threads, auto):
        _POLICY.cap, _POLICY.auto, _POLICY.decided_at, _POLICY.chosen = threads, auto, None, None
        _POLICY.well_timings, _POLICY.well_open = {}, None
    current = _POLICY.chosen if _POLICY.chosen is not None else threads
    if torch.get_num_threads() != current:
        torch.set_num_threads(current)


def probing(forward: Callable[[torch.Tensor], torch.Tensor], device: str,
            clock: Callable[[], float] = time.perf_counter,
            steps: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """`forward`, wrapped in a probe when this process's policy wants a (new) decision on a CPU.

    steps: the work makes fit steps (calls with gradients): time them (ThreadProbe); False for methods
    that only call the model forward (pcim-amortised without refine steps, occlusion, ...): time whole
    wells (WellProbe).
    """
    p = _POLICY
    due = p.decided_at is None or clock() - p.decided_at > REPROBE_S
    if not p.auto or p.cap is None or p.cap <= 1 or not str(device).startswith("cpu") or not due:
        return forward
    return ThreadProbe(forward, p.cap, clock=clock) if steps else WellProbe(forward, p.cap, clock=clock)


def _keep(chosen: int, timings: Mapping[int, list[float]], n: int, what: str, clock: Callable[[], float]) -> None:
    """Set and record the process's thread count once a probe has decided."""
    torch.set_num_threads(chosen)
    _POLICY.chosen, _POLICY.decided_at = chosen, clock()
    logger.info("torch threads: %d (%s took %.3g s at %d threads, %.3g s at 1)", chosen, what,
                statistics.median(timings[n]), n, statistics.median(timings[1]))


class ThreadProbe(torch.nn.Module):
    """A forward callable that times the fit's own steps at `n` threads and at one, then keeps the faster.

    A PCIM step calls the model once with gradients on; the time from one such call to the next is one
    whole step (forward, backward, mixing, Adam) at the thread count set for it. The first step, at one
    thread, is a warm-up (a TorchScript model's profiling run, kernel choice); then `rounds` steps at
    each count, alternating, n first (fewer when one count is `CLEAR` times faster than the other after
    a round). No warm-up at n: on a busy node a step at n threads can cost 7x one at one thread, and
    starting n threads' pool costs milliseconds (what it adds to the first timed step at n only
    favours one thread, the count that takes nothing from the node's other jobs). Calls
    without gradients (p(target | x), the final evaluation, fidelity curves) and steps of another batch
    shape are not timed. Once decided, the choice is set with torch.set_num_threads and recorded for the
    process; the wrapper then only forwards.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], n: int, rounds: int = PROBE_ROUNDS,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.model, self.n, self.clock = model, n, clock
        self.plan = [1] + [n, 1] * rounds  # thread count for each timed step; the first warms up
        self.timings: dict[int, list[float]] = {n: [], 1: []}
        self._last: tuple[float, int, tuple[int, ...]] | None = None  # (time, threads, shape) of the open step
        self.done = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.done:
            return self.model(x)
        now = self.clock()
        shape = tuple(x.shape)
        if self._last is not None and self._last[2] == shape and torch.is_grad_enabled():
            started, threads, _ = self._last
            self.timings[threads].append(now - started)
        self._last = None
        if torch.is_grad_enabled():
            done_steps = sum(len(t) for t in self.timings.values())
            if done_steps < len(self.plan) and not self._clear():
                threads = self.plan[done_steps]
                torch.set_num_threads(threads)
                self._last = (self.clock(), threads, shape)
            else:
                self._finish()
        return self.model(x)

    def _clear(self) -> bool:
        """After a timed step at each count: one count already `CLEAR` times faster than the other
        (on a busy node n threads can be 10x slower: no need to pay for more such steps)."""
        return _clear(self.warm(), self.n)

    def warm(self) -> dict[int, list[float]]:
        """Step times per thread count, without the warm-up step (the first, at one thread)."""
        return {self.n: list(self.timings[self.n]), 1: self.timings[1][1:]}

    def _finish(self) -> None:
        warm = self.warm()
        _keep(decide(warm), warm, self.n, "a fit step", self.clock)
        self.done = True


class WellProbe(torch.nn.Module):
    """The probe for work without fit steps: times whole wells at `n` threads and at one.

    An amortised map calls the model forward only (the field's prediction, the kept and deleted images,
    fidelity curves): short calls among reading, writing and bookkeeping in Python. Timing the calls
    alone misleads: beside another busy process a call can be faster at n threads while the run is
    slower, since the extra thread spins after each call on the core the Python that follows needs
    (measured on 2 cores beside one busy process: calls 1.2x faster at 2 threads, the run 1.46x slower).
    So the probe times what the thread count really costs: one well of this process from its first model
    call to the next well's (a worker makes a probe per well), a first well at one thread (warm-up), then
    `rounds` wells at each count, alternating, n first (fewer when one count is `CLEAR` times faster after
    a round), and keeps the faster by the same rule as the fit's probe. Until then each well runs at the
    count the plan gives it.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], n: int, rounds: int = PROBE_ROUNDS,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.model, self.n, self.clock = model, n, clock
        self.plan = [1] + [n, 1] * rounds
        if set(_POLICY.well_timings) != {n, 1}:
            _POLICY.well_timings, _POLICY.well_open = {n: [], 1: []}, None
        self.timings = _POLICY.well_timings  # the process's wells, one probe each
        self.started = False
        self.done = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.started:
            self.started = True
            self._start_well()
        return self.model(x)

    def _start_well(self) -> None:
        """Close the process's previous well (its time at its count) and set this well's count, or decide."""
        p, now = _POLICY, self.clock()
        if p.well_open is not None:
            started, threads = p.well_open
            self.timings[threads].append(now - started)
            p.well_open = None
        warm = {self.n: list(self.timings[self.n]), 1: self.timings[1][1:]}
        timed = sum(len(t) for t in self.timings.values())
        if timed >= len(self.plan) or _clear(warm, self.n):
            _keep(decide(warm), warm, self.n, "a well", self.clock)
            self.done = True
            p.well_timings = {}  # a probe after REPROBE_S starts afresh
            return
        torch.set_num_threads(self.plan[timed])
        p.well_open = (now, self.plan[timed])


def _clear(warm: Mapping[int, list[float]], n: int) -> bool:
    """After a timed call at each count: one count already CLEAR times faster than the other."""
    a, b = warm[n], warm[1]
    if not a or not b or len(a) != len(b):
        return False
    ratio = statistics.median(a) / statistics.median(b)
    return ratio > CLEAR or ratio < 1 / CLEAR


@contextlib.contextmanager
def in_process(setting: int | str, limits: CpuLimits | None = None) -> Iterator[int]:
    """Fit in this process (`compute.cluster: none`) with the threads `setting` gives one process; torch's
    thread count is restored afterwards (a library caller's process keeps its own setting)."""
    limits = read_limits() if limits is None else limits
    n = threads_per_process(setting, 1, limits)
    old = torch.get_num_threads()
    logger.info("torch threads: %d%s (%s)", n, ", or 1 if faster on the first steps" if setting == "auto" and n > 1
                else "", limits.describe() if setting == "auto" else f"compute.threads: {setting}")
    apply(n, setting == "auto")
    try:
        yield n
    finally:
        apply(None, False)
        torch.set_num_threads(old)
