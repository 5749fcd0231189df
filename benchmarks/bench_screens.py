"""Screens: what one command for many plates saves, measured through the installed `pcim` in one run.

    .venv/bin/python benchmarks/bench_screens.py [--wells 2] [--steps 20] [--plates 20] [--out ...]

- `two_plates`: two demo plates (`--wells` wells each, `--steps` fit steps) on a 2-worker local Dask
  cluster, (a) as two `pcim explain` commands back to back, (b) as one `pcim explain P1 P2`; wall
  times and the ratio b / a (cluster start, model loading and interpreter start-up are paid once).
- `noop`: `--plates` complete plates (1 well each, fitted once beforehand with compute.cluster none), then a
  no-op rerun of all of them in one command: its wall time, and whether it started a cluster (it must
  not: nothing needs fitting).
Prints one JSON document and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sample_plates" / "demo"
PCIM = [str(Path(sys.executable).parent / "pcim")]
WELLS = ["A01", "A02", "B01", "B02", "A03", "B03"]


def make_plate(root: Path, name: str, wells: list[str], steps: int, cluster: dict) -> Path:
    """A copy of the demo's `wells` with its own plate.yaml (as tests/plate_factory.py does)."""
    (root / "images").mkdir(parents=True)
    for well in wells:
        for path in DEMO.glob(f"images/{well}_s*_w*.tif"):
            shutil.copy(path, root / "images" / path.name)
    config = {
        "plate": {"name": name, "images": "images", "pattern": "{well}_s{field}_w{channel}.tif",
                  "channels": {"DNA": "1", "PH3": "2", "Actin": "3"}, "layout": str(DEMO / "layout.csv")},
        "model": {"path": str(DEMO / "classifier.ts"), "classes": ["negative", "mitotic"]},
        "explain": {"steps": steps},
        "compute": cluster,
        "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"},
    }
    path = root / "plate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pcim(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([*PCIM, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pcim {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc


def two_plates(tmp: Path, wells: int, steps: int) -> dict:
    cluster = {"cluster": "local", "workers": 2}
    apart = [make_plate(tmp / "apart" / n, n, WELLS[:wells], steps, cluster) for n in ("P1", "P2")]
    together = [make_plate(tmp / "together" / n, n, WELLS[:wells], steps, cluster) for n in ("P1", "P2")]
    t_apart = sum(pcim("explain", str(p), "-q")[0] for p in apart)
    t_together, _ = pcim("explain", *map(str, together), "-q")
    return {"plates": 2, "wells_per_plate": wells, "steps": steps, "two_commands_s": round(t_apart, 2),
            "one_command_s": round(t_together, 2), "ratio_one_over_two": round(t_together / t_apart, 3)}


def noop(tmp: Path, plates: int) -> dict:
    paths = [make_plate(tmp / "noop" / f"P{i:03d}", f"P{i:03d}", WELLS[:1], 5, {"cluster": "none"})
             for i in range(plates)]
    t_first, _ = pcim("explain", *map(str, paths), "-q")
    t_noop, proc = pcim("explain", *map(str, paths), "--set", "compute.cluster=local", "--json")
    doc = json.loads(proc.stdout)
    return {"plates": plates, "first_run_s": round(t_first, 2), "noop_rerun_s": round(t_noop, 2),
            "fitted_by_rerun": doc["fitted"], "cluster_started": "started a local Dask cluster" in proc.stderr,
            "models_loaded_by_rerun": proc.stderr.count("loaded torchscript model")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wells", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--plates", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_screens.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"machine": f"{platform.node()} {os.cpu_count()} CPUs (shared while measured)",
               "two_plates": two_plates(Path(tmp), args.wells, args.steps), "noop": noop(Path(tmp), args.plates)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
