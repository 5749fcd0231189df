"""Where the wells run: in-process, or on a Dask cluster (run/cluster.py starts or attaches to it).

`run_wells` is the entry point of a plate's run: tasks in, summary rows out (each well's rows
reported through `on_well` as it finishes); `run_stream` is the same with the wells handed out as it
goes (a screen's plates, one after the other, on one cluster). The unit of work is one well
(run/task.py `WellTask`, explained by `worker.explain_well`).

- ``compute.cluster: none``: one well after the other in this process;
- ``local``, ``address``, ``scheduler-file``, ``slurm``: one future per well on a Dask cluster.

Torch threads per fitting process follow ``compute.threads`` (run/threads.py: the CPUs the process may
really use, shared among the workers of a host, and on a busy CPU only as many as pay).

Faults: a well whose task raises becomes failed rows (one per field) with the message; the run goes
on. A worker process that dies has its wells rerun elsewhere; a well that kills
``distributed.scheduler.allowed-failures`` + 1 workers (KilledWorker) is marked failed. SIGTERM / SIGINT
(run/signals.py `StopSignals`, installed by the driver for the whole run, planning included) stop
dispatching: running wells get the grace period (PCIM_GRACE_SECONDS) to finish, then the result says
``interrupted`` with the rows done (a second signal stops at once). `check_compute` checks the settings
a run needs (the scheduler file) before anything is written.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pcim_cli.config import ComputeConfig
from pcim_cli.config.settings import read_settings
from pcim_cli.run import threads
from pcim_cli.run.cluster import WorkerOptions, client_for, explain_on_worker, read_scheduler_file
from pcim_cli.run.signals import StopSignals
from pcim_cli.run.task import WellTask, task_failed_rows
from pcim_cli.run.worker import explain_well

__all__ = ["Dispatch", "check_compute", "run_stream", "run_wells"]

logger = logging.getLogger(__name__)

OnWell = Callable[[str, list[dict[str, Any]]], None]
#: more wells to explain, asked for at the start and after each finished well (run_stream)
Feed = Callable[[], Sequence[WellTask]]

#: how often the dispatch loop wakes up to look at signals and deadlines
POLL_S = 0.5

@dataclass
class Dispatch:
    """What the scheduler did: every row it got back, and whether it was interrupted (SIGTERM/SIGINT)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def check_compute(compute: ComputeConfig) -> None:
    """What can be checked before a run writes anything: the scheduler file.

    A scheduler file that does not exist yet, or is empty (the scheduler is still writing it), is a
    TemporaryFailure (retry later); one that is not what `dask scheduler --scheduler-file` writes is a
    ConfigError naming compute.scheduler_file.
    """
    if compute.cluster == "scheduler-file" and compute.scheduler_file is not None:
        read_scheduler_file(compute.scheduler_file)


def run_wells(tasks: Sequence[WellTask], compute: ComputeConfig, on_well: OnWell | None = None,
              stop: StopSignals | None = None) -> Dispatch:
    """Explain every task where `compute` says; each finished well's rows go to `on_well` and into the result.

    `stop`: the driver's signal handlers (installed here for the dispatch when None).
    """
    handed = [False]

    def once() -> list[WellTask]:
        first = [] if handed[0] else list(tasks)
        handed[0] = True
        return first

    return run_stream(compute, once, on_well, stop)


def run_stream(compute: ComputeConfig, feed: Feed, on_well: OnWell | None = None,
               stop: StopSignals | None = None) -> Dispatch:
    """Explain the wells `feed` hands out, on one cluster: it is called once at the start and again after
    every finished well, and returns the wells to add (none: nothing more for now). The run ends when no
    well is left and `feed` has none; no cluster is started when its first answer is none. A screen
    feeds plate after plate through here, so workers never wait between plates."""
    if stop is None:
        with StopSignals(read_settings().grace_seconds) as own:
            return run_stream(compute, feed, on_well, own)
    if stop.requested:
        return Dispatch(interrupted=True)
    tasks = list(feed())
    if not tasks or stop.requested:
        return Dispatch(interrupted=stop.requested)
    if compute.cluster == "none":
        with threads.in_process(compute.threads):
            return _run_in_process(tasks, feed, on_well, stop)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(stop.deferred())  # left last: polling and closing the cluster are not interrupted
            stop.raise_on_force = True  # ... but a second signal while the cluster starts stops at once
            client, opts = stack.enter_context(client_for(compute, len(tasks)))
            stop.raise_on_force = False
            if stop.requested:  # a signal while the cluster started: nothing is sent to it
                logger.warning("stopping before any well was sent to the cluster")
                return Dispatch(interrupted=True)
            return _run_on_cluster(client, tasks, feed, opts, on_well, stop)
    except Exception as exc:  # noqa: BLE001 - e.g. worker processes killed by the same Ctrl-C while starting
        if not stop.requested:
            raise
        logger.warning("stopped while the cluster started (%s: %s)", type(exc).__name__, exc)
        return Dispatch(interrupted=True)


# --------------------------------------------------------------------------------------------------
# compute.cluster: none


def _run_in_process(tasks: Sequence[WellTask], feed: Feed, on_well: OnWell | None, stop: StopSignals) -> Dispatch:
    out = Dispatch()
    queue = collections.deque(tasks)
    try:
        while queue:
            if stop.requested:
                break
            task = queue.popleft()
            _report(out, task, _explain_guarded(task), on_well)
            if not stop.requested:
                queue.extend(feed())
    except KeyboardInterrupt:
        if not stop.requested:
            raise
        logger.warning("stopped in the middle of a well; its fields stay incomplete in the store")
    out.interrupted = stop.requested
    return out


def _explain_guarded(task: WellTask) -> list[dict[str, Any]]:
    """explain_well, with an unexpected error turned into failed rows (the run goes on)."""
    try:
        return explain_well(task)
    except Exception as exc:  # noqa: BLE001 - one bad well must not stop the plate
        logger.warning("%s: %s: %s", task.well, type(exc).__name__, exc)
        return task_failed_rows(task, f"{task.well}: {type(exc).__name__}: {exc}")


def _report(out: Dispatch, task: WellTask, rows: list[dict[str, Any]], on_well: OnWell | None) -> None:
    out.rows += rows
    if on_well is not None:
        on_well(task.well, rows)


# --------------------------------------------------------------------------------------------------
# dispatch on a Dask cluster


def _run_on_cluster(client: Any, tasks: Sequence[WellTask], feed: Feed, opts: WorkerOptions,
                    on_well: OnWell | None, stop: StopSignals) -> Dispatch:
    """Submit one future per well (more as `feed` hands them out); collect as they finish; on a stop
    signal let the running ones finish."""
    from distributed import wait

    run_id = uuid.uuid4().hex[:8]
    futures: dict[Any, WellTask] = {}

    def submit(more: Sequence[WellTask]) -> set[Any]:
        new = {client.submit(explain_on_worker, task.model_dump(), opts, key=f"pcim-{task.plate}-{task.well}-{run_id}",
                             pure=False, resources=opts.resources): task for task in more}
        futures.update(new)
        return set(new)

    out = Dispatch()
    pending = submit(tasks)
    stopping = False
    while pending:
        try:
            with client.as_current():  # `wait` finds its client there
                done, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        for fut in done:
            rows = _rows_of(fut, futures[fut])
            if rows is None:  # cancelled: by us (stopping) or the scheduler went away
                out.interrupted = True
                continue
            _report(out, futures[fut], rows, on_well)
        if done and not stop.requested:
            pending |= submit(feed())
        if stop.requested and not stopping:
            stopping = True
            pending = _keep_running(client, pending)
        if stopping and pending and stop.overdue:
            logger.warning("%d well(s) still running %s: cancelled, their fields stay incomplete in the store",
                           len(pending), "after a second signal" if stop.forced else "after the grace period")
            client.cancel(list(pending), force=True)
            pending = set()
    out.interrupted = out.interrupted or stop.requested
    return out


def _keep_running(client: Any, pending: set[Any]) -> set[Any]:
    """Cancel the wells not yet started; return the futures of those running on a worker now."""
    running_keys = {key for keys in client.processing().values() for key in keys}
    running = {f for f in pending if f.key in running_keys}
    queued = [f for f in pending if f not in running]
    if queued:
        client.cancel(queued)
    logger.warning("stopping: %d well(s) not started are dropped, waiting for %d running", len(queued), len(running))
    return running


def _rows_of(fut: Any, task: WellTask) -> list[dict[str, Any]] | None:
    """A finished future's rows: its result, failed rows for an error, None when it was cancelled."""
    from distributed import KilledWorker

    if fut.status == "finished":
        return fut.result()
    if fut.status in ("cancelled", "lost"):
        return None
    exc = fut.exception()
    if isinstance(exc, KilledWorker):
        msg = (f"{task.well}: worker processes died each time they explained this well (out of memory, or "
               "a crash in the model?); see the Dask worker logs, or lower compute.batch_size")
    else:
        msg = f"{task.well}: {type(exc).__name__}: {exc}"
    logger.warning("%s", msg)
    return task_failed_rows(task, msg)
