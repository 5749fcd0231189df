"""Driver overhead at plate scale: a 1536-well x 2-field plate of tiny fields, in one run.

    .venv/bin/python benchmarks/bench_driver.py [--rows 32 --cols 48 --fields 2 --size 32] [--profile DIR]

What the driver costs when the fields cost nothing (issue 28): a plate of `rows` x `cols` wells of
`fields` tiny fields (3 channels of `size` px, uint16 TIFFs), the demo classifier, `explain.method:
contrast` (a map without a model: the fit costs nothing), fidelity off, in-process. Measured through the
installed `pcim` in subprocesses (what a user runs), each with its own peak RSS (os.wait4):

- first run: every field explained and written;
- no-op rerun: nothing to do (every field done): wall seconds, peak memory, and how many map chunk
  files it opened (a Python audit hook counts them in a second run of the same command; it must be 0);
- `pcim status` on the store: wall seconds, peak memory.

Goals (issue 28): no-op rerun <= 5 s, status <= 3 s, peak memory <= 1 GiB. `--profile DIR` also writes
cProfile files of the rerun and the status (python -m cProfile). Prints one JSON document; writes it to
benchmarks/results/bench_driver.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sample_plates" / "demo"
BIN = Path(sys.executable).parent


def row_name(i: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (1536-well plates have rows A..AF)."""
    return chr(65 + i) if i < 26 else "A" + chr(65 + i - 26)


def make_plate(root: Path, rows: int, cols: int, fields: int, size: int, name: str = "BIG1536") -> Path:
    """Tiny 3-channel fields for every well; returns plate.yaml."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(100, 4000, size=(3, size, size), dtype=np.uint16)
    for r in range(rows):
        for c in range(cols):
            well = f"{row_name(r)}{c + 1:02d}"
            for f in range(1, fields + 1):
                for ch in range(3):
                    tifffile.imwrite(images / f"{well}_s{f}_w{ch + 1}.tif", np.roll(base[ch], r * cols + c + f))
    config = {
        "plate": {"name": name, "images": "images", "pattern": "{well}_s{field}_w{channel}.tif",
                  "channels": {"DNA": "1", "PH3": "2", "Actin": "3"}},
        "model": {"path": str(DEMO / "classifier.ts"), "classes": ["negative", "mitotic"]},
        "explain": {"method": "contrast", "fidelity": False},
        "compute": {"cluster": "none"},
        "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"},
    }
    path = root / "plate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(args: list[str], profile: Path | None = None) -> dict:
    """Wall seconds, peak RSS (MiB) and exit code of one command (`pcim ...`), optionally under cProfile."""
    if profile is not None:
        cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), str(BIN / "pcim"), *args]
    else:
        cmd = [str(BIN / "pcim"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # the child's own peak RSS: wait4 on an already reaped child is not possible, so use RUSAGE of a
    # fresh wrapper below when asked; here, the VmHWM the command prints is not available: use wait4
    return {"wall_s": round(wall, 2), "returncode": proc.returncode, "stderr": err[-1500:], "stdout": out}


def run_rss(args: list[str]) -> dict:
    """As `run`, with the command's own peak RSS (os.wait4 on the child)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "pcim"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "returncode": proc.returncode, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "stderr": err[-1500:]}


#: `pcim <args>` with an audit hook that counts the map chunk files the process opens (printed last)
AUDITED = """
import os, re, sys
CHUNK = re.compile(r"\\.zarr/.*/[0-9]+/(c/)?[0-9]+/[0-9]+/[0-9]+$")
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and CHUNK.search(os.fsdecode(args[0])):
        opened.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
sys.argv = ["pcim", *sys.argv[1:]]
from pcim_cli.cli import main
try:
    main()
finally:
    print(f"chunk files opened: {len(opened)}", file=sys.stderr)
"""


def chunk_reads(args: list[str]) -> int:
    """How many map chunk files `pcim <args>` opens."""
    proc = subprocess.run([sys.executable, "-c", AUDITED, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in proc.stderr.splitlines() if x.startswith("chunk files opened: ")]
    return int(line[-1].split(": ")[1]) if line else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--cols", type=int, default=48)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--profile", type=Path, default=None, help="write cProfile files of the rerun and status here")
    ap.add_argument("--keep", type=Path, default=None, help="build the plate here and keep it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_driver.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "plate"
        plate = root / "plate.yaml"
        t0 = time.perf_counter()
        if not plate.exists():
            make_plate(root, args.rows, args.cols, args.fields, args.size)
        made = time.perf_counter() - t0
        store = root / "out" / "BIG1536.zarr"
        res: dict = {"machine": f"{platform.node()} {os.cpu_count()} CPUs (shared while measured)",
                     "wells": args.rows * args.cols, "fields_per_well": args.fields, "field_px": args.size,
                     "make_plate_s": round(made, 1)}
        if not store.exists():
            res["first_run"] = run_rss(["explain", str(plate), "-q"])
        res["noop_rerun"] = run_rss(["explain", str(plate), "-q", "--json"])
        res["status"] = run_rss(["status", str(store)])
        res["noop_rerun"]["chunk_files_opened"] = chunk_reads(["explain", str(plate), "-q"])
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            run(["explain", str(plate), "-q"], args.profile / "noop_rerun.prof")
            run(["status", str(store)], args.profile / "status.prof")
        res["import_pcim_s"] = run_import()
    res["goals"] = {"noop_rerun_s<=5": res["noop_rerun"]["wall_s"] <= 5, "status_s<=3": res["status"]["wall_s"] <= 3,
                    "peak_rss_mib<=1024": max(res["noop_rerun"]["peak_rss_mib"], res["status"]["peak_rss_mib"]) <= 1024}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items()}, default=str))


def run_import() -> float:
    """Seconds to start python and import the CLI (the floor of any pcim command)."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", "import pcim_cli.cli"], check=True, env=env)
    return round(time.perf_counter() - t0, 2)


if __name__ == "__main__":
    main()
