"""The Dask clusters pcim runs wells on, and how their worker processes run them.

- ``compute.cluster: local``: a `distributed.LocalCluster` of worker *processes*, one thread each: one per
  visible GPU (each pinned to its GPU through CUDA_VISIBLE_DEVICES), or ``compute.workers`` CPU workers
  (auto: 1) that share the CPUs of this machine or of this SLURM allocation.
- ``address`` / ``scheduler-file``: attach to a running scheduler (``dask scheduler`` + ``dask worker``,
  e.g. started with srun inside an sbatch job); its workers must see the same files.
- ``slurm``: a `dask_jobqueue.SLURMCluster` whose worker jobs pcim submits (``compute.slurm``).

`client_for(compute, n)` opens the client (and the cluster pcim starts) and closes them afterwards; on the
worker side `explain_on_worker` sets the process's torch threads (run/threads.py) and device, then runs
`worker.explain_well`. The dispatch loop is run/scheduler.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

from pcim_cli.config import DASK_ADDRESS, ComputeConfig
from pcim_cli.errors import ConfigError, TemporaryFailure, short
from pcim_cli.run import threads
from pcim_cli.run.task import WellTask
from pcim_cli.run.worker import explain_well

__all__ = ["MALLOC_VAR", "DefaultMalloc", "IgnoreSigint", "WorkerOptions", "client_for", "explain_on_worker",
           "read_scheduler_file", "visible_gpus", "worker_device"]

logger = logging.getLogger(__name__)

#: seconds to wait for a scheduler named by compute.address / compute.scheduler_file
CONNECT_TIMEOUT_S = 20
#: Dask settings for the clusters pcim starts: a worker gets a new well only when a thread is free
#: (so "stop dispatching" leaves queued wells on the scheduler), a dead worker's wells are rerun
_DASK_CONFIG = {
    "distributed.scheduler.worker-saturation": 1.0,
    "distributed.scheduler.allowed-failures": 2,
}



def read_scheduler_file(path: Any) -> str:
    """The scheduler address in a Dask scheduler file, checked."""
    fix = (f"point compute.scheduler_file at the JSON file that `dask scheduler --scheduler-file {path}` "
           "writes")
    if not path.is_file():
        raise TemporaryFailure(f"scheduler file {path} does not exist (yet): start "
                               f"`dask scheduler --scheduler-file {path}` first, then retry")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"compute.scheduler_file: cannot read {path} ({exc}); {fix}") from None
    if not text.strip():
        raise TemporaryFailure(f"scheduler file {path} is empty: the scheduler may still be writing it; retry")
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"compute.scheduler_file: {path} is not a Dask scheduler file (not JSON: starts "
                          f"{short(text[:40])}); {fix}") from None
    address = doc.get("address") if isinstance(doc, dict) else None
    if not isinstance(address, str) or not DASK_ADDRESS.fullmatch(address):
        raise ConfigError(f"compute.scheduler_file: {path} holds no scheduler address (its 'address' is "
                          f"{short(address)}); {fix}")
    return address


# --------------------------------------------------------------------------------------------------
# worker side


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker process runs its wells: device setting, torch threads, GPU slots per job."""

    device: str = "auto"  # compute.device, resolved on the worker (the driver may have no GPU)
    threads: int | None = None  # torch intra-op threads; None: leave the worker's setting
    threads_auto: bool = False  # compute.threads: auto: the first fit steps decide between `threads` and 1
    gpu_slots: int = 0  # >1: several worker processes share a SLURM job's GPUs, one each by name suffix
    resources: dict[str, float] | None = None  # Dask resources each well asks for (e.g. {"GPU": 1})


def explain_on_worker(task: dict[str, Any], opts: WorkerOptions) -> list[dict[str, Any]]:
    """What a Dask worker runs: the task with this worker's own device, then `explain_well`."""
    threads.apply(opts.threads, opts.threads_auto)
    return explain_well(WellTask.model_validate({**task, "device": worker_device(opts)}))


def worker_device(opts: WorkerOptions) -> str:
    """This worker's device: auto -> cuda when it sees a GPU; cuda -> its own GPU when several share a job."""
    import torch

    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" or opts.gpu_slots <= 1:
        return device
    from distributed import get_worker

    match = re.search(r"-(\d+)$", str(get_worker().name))
    slot = int(match.group(1)) if match else 0
    return f"cuda:{slot % max(1, torch.cuda.device_count())}"


#: Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 for their workers; with torch's many large tensors
#: that makes a fit about 3x slower (every free goes back to the OS, every allocation faults pages in)
MALLOC_VAR = "MALLOC_TRIM_THRESHOLD_"


def _spawn_environ() -> dict[str, Any]:
    """Dask config for the nannies pcim starts in this process: their default environment, less MALLOC_VAR."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop(MALLOC_VAR, None)
    return {"distributed.nanny.pre-spawn-environ": env}


class DefaultMalloc(NannyPlugin):
    """Nanny plugin: restart the worker without MALLOC_VAR (for nannies on other hosts, e.g. SLURM jobs)."""

    name = "pcim-default-malloc"
    restart = True

    def setup(self, nanny: Any) -> None:
        for env in (nanny.pre_spawn_env, nanny.env):
            env.pop(MALLOC_VAR, None)


class IgnoreSigint(WorkerPlugin):
    """Dask worker plugin: the worker process ignores SIGINT (the driver decides how a Ctrl-C stops)."""

    name = "pcim-ignore-sigint"

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------
# clusters


def visible_gpus() -> list[str]:
    """IDs of the GPUs this process may use (CUDA_VISIBLE_DEVICES entries, else 0..n-1)."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def client_for(compute: ComputeConfig, n_tasks: int) -> Iterator[tuple[Any, WorkerOptions]]:
    """A Dask client for compute.cluster, and how its workers must run; closes what pcim started."""
    import dask
    import distributed  # noqa: F401 - loads its config defaults first: config.set below must not own them

    starters = {"local": _local_cluster, "slurm": _slurm_cluster}
    with dask.config.set(_DASK_CONFIG), dask.config.set(_spawn_environ()):
        if compute.cluster in starters:
            with starters[compute.cluster](compute, n_tasks) as (cluster, opts), _connect(cluster) as client:
                if compute.cluster == "local":  # a terminal's Ctrl-C reaches the workers too: they ignore it
                    client.register_plugin(IgnoreSigint())
                else:  # remote nannies read their own Dask config: drop the malloc setting there
                    client.register_plugin(DefaultMalloc())
                logger.info("Dask dashboard: %s", _dashboard_link(client))
                yield client, opts
        else:
            with _connect(_scheduler_of(compute)) as client:
                n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
                logger.info("attached to Dask scheduler %s (%d workers now); dashboard: %s",
                            client.scheduler.address, n, _dashboard_link(client))
                # their processes were started by others (dask worker --nthreads, OMP_NUM_THREADS=1 by Dask):
                # pcim sets their threads only when compute.threads is a number
                fixed = compute.threads if compute.threads != "auto" else None
                yield client, WorkerOptions(device=compute.device, threads=fixed)


def _scheduler_of(compute: ComputeConfig) -> dict[str, Any]:
    """Client arguments for compute.cluster: address / scheduler-file, checked."""
    if compute.cluster == "address":
        if not compute.address:
            raise ConfigError("compute.cluster: address needs compute.address (e.g. tcp://node12:8786) or "
                              "the environment variable DASK_SCHEDULER_ADDRESS")
        return {"address": compute.address}
    if compute.scheduler_file is None:
        raise ConfigError("compute.cluster: scheduler-file needs compute.scheduler_file, the JSON file "
                          "written by `dask scheduler --scheduler-file PATH`")
    read_scheduler_file(compute.scheduler_file)
    return {"scheduler_file": str(compute.scheduler_file)}


@contextlib.contextmanager
def _connect(target: Any) -> Iterator[Any]:
    """A Client for a cluster object or for {address | scheduler_file}; unreachable -> TemporaryFailure."""
    from distributed import Client

    kwargs = dict(target) if isinstance(target, dict) else {"address": target}
    where = kwargs.get("address") or kwargs.get("scheduler_file")
    try:
        client = Client(**kwargs, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise TemporaryFailure(f"cannot reach the Dask scheduler {where} within {CONNECT_TIMEOUT_S} s "
                               f"({type(exc).__name__}: {exc}); check that it runs and that this host can "
                               "connect to it, then retry") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=10)


@contextlib.contextmanager
def _local_cluster(compute: ComputeConfig, n_tasks: int) -> Iterator[tuple[Any, WorkerOptions]]:
    """LocalCluster: one worker process per visible GPU (pinned), else `compute.workers` CPU workers."""
    from distributed import LocalCluster, Nanny

    gpus = visible_gpus() if compute.device in ("auto", "cuda") else []
    n = (len(gpus) or 1) if compute.workers == "auto" else compute.workers
    limits = threads.read_limits()
    n_threads = threads.threads_per_process(compute.threads, n, limits)
    resources = {"GPU": 1} if gpus else None
    # CRITICAL: a worker whose heartbeat meets a scheduler being closed (a run stopped while its cluster
    # starts) logs a traceback at ERROR; what a well's worker raises comes back through its future
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=_dashboard(),
                           silence_logs=logging.CRITICAL)
    try:
        base = cluster.new_spec["options"]
        for i in range(n):
            options = {**base, "name": i}
            if gpus:
                options.update(resources=dict(resources), env={"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]})
            cluster.worker_spec[i] = {"cls": Nanny, "options": options}
        cluster.scale(n)  # starts the workers of worker_spec
        what = f"GPU {', '.join(gpus)}" if gpus else f"CPU, {n_threads} torch thread(s) each"
        logger.info("started a local Dask cluster: %d worker process(es) (%s; %s) for %d wells", n, what,
                    limits.describe(), n_tasks)
        yield cluster, WorkerOptions(device=compute.device, threads=n_threads, resources=resources,
                                     threads_auto=compute.threads == "auto")
    finally:
        cluster.close(timeout=30)


@contextlib.contextmanager
def _slurm_cluster(compute: ComputeConfig, n_tasks: int) -> Iterator[tuple[Any, WorkerOptions]]:
    """SLURMCluster: `compute.slurm.jobs` jobs, each one worker process per GPU (else one), one thread each."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ConfigError("compute.cluster: slurm needs dask-jobqueue: pip install dask-jobqueue") from exc
    s = compute.slurm
    processes = max(1, s.gpus)
    directives = ([f"--gres=gpu:{s.gpus}"] if s.gpus else []) + list(s.job_extra)
    resources = {"GPU": 1} if s.gpus else None
    try:
        cluster = SLURMCluster(
            queue=s.queue, account=s.account, walltime=s.walltime, cores=processes, job_cpu=s.cores,
            processes=processes, memory=s.memory, job_extra_directives=directives,
            worker_extra_args=["--resources", "GPU=1"] if resources else [], python=sys.executable,
            job_name="pcim-worker", scheduler_options={"dashboard_address": _dashboard()},
            silence_logs="error",
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"compute.slurm: {exc}") from exc
    try:
        logger.debug("SLURM worker job script:\n%s", cluster.job_script())
        cluster.scale(jobs=s.jobs)
        logger.info("submitted %d SLURM worker job(s) (%d CPUs, %s, %s GPU(s) each) for %d wells; they start "
                    "when SLURM schedules them (squeue --me)", s.jobs, s.cores, s.memory, s.gpus, n_tasks)
        n_threads = compute.threads if compute.threads != "auto" else max(1, s.cores // processes)
        yield cluster, WorkerOptions(device=compute.device, threads=n_threads, gpu_slots=processes,
                                     resources=resources, threads_auto=compute.threads == "auto")
    finally:
        cluster.close(timeout=30)


def _dashboard_link(client: Any) -> str:
    """The scheduler's dashboard URL, or why there is none (its pages need bokeh)."""
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
        return "none (pip install 'bokeh>=3.1' for one)"
    return str(client.dashboard_link)


def _dashboard() -> str:
    """A free port for the scheduler's web server (two runs on one node must not clash on 8787)."""
    return ":0"
