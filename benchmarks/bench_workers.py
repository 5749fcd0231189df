"""Wells per minute with 1 and with 2 local Dask worker processes, on the same demo wells, in one run.

    .venv/bin/python benchmarks/bench_workers.py [--wells 8] [--steps 100] [--out benchmarks/results/bench_workers.json]

Each setting runs `explain.run` on a fresh store (cluster none as the in-process reference, then
`compute.cluster: local` with `compute.workers` 1 and 2; torch threads per worker as pcim sets them
(pcim_cli/run/threads.py: CPUs / workers, capped by OMP_NUM_THREADS, which this script sets to 1 unless
given). Figures per
setting: `wells_per_min` over the dispatch (cluster start-up included, up to the last well back),
`steady_wells_per_min` between the first and the last well back (start-up excluded), and
`wells_per_min_end_to_end` over the whole run (planning, shutdown, CSV included).
Prints one JSON document on stdout and writes it to --out. On a 2-core machine the 2-worker ratio is
bounded by 2 and by whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sample_plates" / "demo"
ALL_WELLS = [f"{r}{c:02d}" for r in "ABCD" for c in range(1, 7)]


def run_once(wells: list[str], steps: int, cluster: str, workers: int) -> dict:
    """One explain.run on a fresh store; timings and counts."""
    from pcim_cli.config import load_config
    from pcim_cli.run import explain

    marks: dict[str, float] = {}

    def on_start(total: int) -> None:
        marks["start"] = time.perf_counter()

    def on_well(well: str, rows: list[dict]) -> None:
        marks.setdefault("first", time.perf_counter())
        marks["last"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as out:
        cfg = load_config(DEMO / "plate.yaml", [
            f"plate.wells=[{', '.join(wells)}]", f"explain.steps={steps}", f"output.zarr={out}/p.zarr",
            f"output.csv={out}/p.csv", f"compute.cluster={cluster}", f"compute.workers={workers}",
        ], environ={})
        t0 = time.perf_counter()
        result = explain.run(cfg, on_well=on_well, on_start=on_start)
        total = time.perf_counter() - t0
    from pcim_cli.run import threads

    dispatch = marks["last"] - marks["start"]
    steady = marks["last"] - marks["first"]
    return {
        "cluster": cluster, "workers": workers if cluster != "none" else 0, "wells": len(wells),
        "torch_threads_per_worker": threads.threads_per_process(cfg.compute.threads, workers if cluster != "none"
                                                                else 1, threads.read_limits()),
        "fields_done": result.counts["done"], "exit_code": result.exit_code,
        "dispatch_s": round(dispatch, 2), "total_s": round(total, 2),
        "first_well_s": round(marks["first"] - marks["start"], 2),  # cluster start-up + one well
        "wells_per_min": round(len(wells) / dispatch * 60, 2),
        "steady_wells_per_min": round((len(wells) - 1) / steady * 60, 2) if steady > 0 else None,
        "wells_per_min_end_to_end": round(len(wells) / total * 60, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wells", type=int, default=8, help="how many demo wells (of 24)")
    parser.add_argument("--steps", type=int, default=100, help="explain.steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_workers.json")
    args = parser.parse_args(argv)
    wells = ALL_WELLS[: max(1, min(args.wells, len(ALL_WELLS)))]

    sys.path.insert(0, str(ROOT))
    runs = [run_once(wells, args.steps, "none", 1), run_once(wells, args.steps, "local", 1),
            run_once(wells, args.steps, "local", 2)]
    one, two = runs[1], runs[2]
    doc = {
        "benchmark": "wells per minute, 1 vs 2 local Dask worker processes",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"wells": len(wells), "fields": 2 * len(wells), "steps": args.steps, "plate": "demo"},
        "runs": runs,
        "ratio_2_vs_1_workers": round(two["wells_per_min"] / one["wells_per_min"], 2),
        "ratio_2_vs_1_workers_end_to_end": round(two["wells_per_min_end_to_end"] / one["wells_per_min_end_to_end"], 2),
        "ratio_2_vs_1_workers_steady": (round(two["steady_wells_per_min"] / one["steady_wells_per_min"], 2)
                                        if two["steady_wells_per_min"] and one["steady_wells_per_min"] else None),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":  # the guard matters: Dask starts worker processes with spawn
    main()
