"""Where the wells run: in-process, on a local Dask cluster, an existing scheduler, or SLURM.

`run_wells` is the one entry point the driver uses: tasks in, summary rows out (each well's rows
reported through `on_well` as it finishes). Only `compute.cluster: none` is implemented here so far.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pcim_cli.config import ComputeConfig
from pcim_cli.worker import WellTask, explain_well

logger = logging.getLogger(__name__)

OnWell = Callable[[str, list[dict[str, Any]]], None]


@dataclass
class Dispatch:
    """What the scheduler did: every row it got back, and whether it was interrupted (SIGTERM/SIGINT)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def run_wells(tasks: Sequence[WellTask], compute: ComputeConfig, on_well: OnWell | None = None) -> Dispatch:
    """Explain every task; each finished well's rows go to `on_well` and into the result."""
    out = Dispatch()
    for task in tasks:
        rows = explain_well(task)
        out.rows += rows
        if on_well is not None:
            on_well(task.well, rows)
    return out
