"""What it costs to tell whether a field's input files changed (pcim_cli/io/signature.py), on 2160 x 2160 fields.

Writes `--fields` fields of 5 uncompressed uint16 2160 x 2160 planes (an instrument's export, 9.3 MB a
plane) under a temporary folder, then times per field, with the files' pages in the page cache (warm)
and dropped from it with posix_fadvise (cold; only these files' pages, nothing else on the machine):

- stat signature (name, size, mtime of each file): what a plain rerun reads;
- content digest (head, tail and 16 sampled blocks of each file): read only when the stat changed;
- a full sha256 of every byte, for comparison;
- reading and normalising the field (what explaining it costs before any fitting).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/input_signature.py --fields 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from pcim_cli.io import images, signature

CHANNELS = 5
SIZE = 2160


def _drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _full_sha(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _read(files: list[Path]) -> np.ndarray:
    img = images.read_field(images.FieldSource("A01", 1, tuple(files)), CHANNELS)
    return images.normalize(img, "percentile")


def _time(fn, fields: list[list[Path]], cold: bool) -> float:
    """Median seconds per field."""
    times = []
    for files in fields:
        if cold:
            _drop_cache(files)
        t0 = time.perf_counter()
        fn(files)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "input_signature.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("PCIM_BENCH_TMP")) as tmp:
        fields = []
        for f in range(args.fields):
            files = []
            for c in range(CHANNELS):
                path = Path(tmp) / f"A01_s{f + 1}_w{c + 1}.tif"
                tifffile.imwrite(path, rng.integers(100, 4000, (SIZE, SIZE), dtype=np.uint16))
                files.append(path)
            fields.append(files)
        results = {}
        for name, fn in [("stat", signature.stat_signature), ("content", signature.content_digest),
                         ("full_sha256", _full_sha), ("read_normalise", _read)]:
            results[name] = {"warm_s": _time(fn, fields, cold=False), "cold_s": _time(fn, fields, cold=True)}
    doc = {"field": f"{CHANNELS} x {SIZE} x {SIZE} uint16, uncompressed", "fields": args.fields,
           "per_field_median_s": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"per field ({doc['field']}), median of {args.fields}:")
    for name, r in results.items():
        print(f"  {name:15s} warm {r['warm_s'] * 1e3:9.3f} ms   cold {r['cold_s'] * 1e3:9.3f} ms")


if __name__ == "__main__":
    main()
