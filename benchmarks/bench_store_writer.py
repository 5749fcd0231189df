"""zarr-python or pcim's own file writer for a field group (issue 28): seconds per field, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store_writer.py [--sizes 128,2160] [--reps 30]

A field group as io/store.write_field writes it: the group with its NGFF attributes, three pyramid levels
(float32, chunks of 1 x <=1024 x <=1024, every chunk written, mantissa rounded, zstd 5), then the
completion record. Writers compared on the same maps, alternating:

- `zarr`: zarr-python's synchronous API, as the store used it (create_group, create_array x 3,
  update_attributes), with the same zstd codec;
- `zarr-batched`: zarr-python's asynchronous API, every array of the field in one event-loop hand-off
  (`zarr.core.sync.sync(asyncio.gather(...))`), then the record;
- `files`: io/zarr_files (the metadata JSON and the chunks written directly).

And the reads of a no-op rerun: one field's record through `zarr.open_group(...).attrs` against
`zarr_files.read_attributes`. Prints one JSON document (median seconds per field, CPU and wall).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import BytesCodec, ZstdCodec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pcim_cli.io import ngff, zarr_files  # noqa: E402
from pcim_cli.io.store import MAP_MANTISSA_BITS  # noqa: E402

LEVEL = zarr_files.ZSTD_LEVEL


def field_maps(size: int, seed: int) -> np.ndarray:
    """An explainer-like map: a smooth positive field, most values small, rounded as the store rounds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    m = np.exp(-40 * ((yy - rng.random()) ** 2 + (xx - rng.random()) ** 2)) + 1e-4 * rng.random((size, size))
    return zarr_files.round_mantissa(m[None].astype(np.float32), MAP_MANTISSA_BITS)


def _opts(shape: tuple[int, ...]) -> dict:
    opts = ngff.array_options(shape, 3, every_chunk=True)
    return {**opts, "compressors": None, "serializer": BytesCodec(), "filters": None} | {
        "compressors": [ZstdCodec(level=LEVEL)]}


def write_zarr(path: Path, rel: str, levels: list[np.ndarray], attrs: dict, record: dict) -> None:
    group = zarr.create_group(str(path), path=rel, zarr_format=3, attributes=attrs)
    for i, data in enumerate(levels):
        opts = _opts(data.shape)
        opts.pop("serializer")
        group.create_array(str(i), data=data, **opts)
    group.update_attributes({"pcim": record})


def write_zarr_batched(path: Path, rel: str, levels: list[np.ndarray], attrs: dict, record: dict) -> None:
    from zarr.api import asynchronous as az
    from zarr.core.sync import sync

    async def arrays() -> None:
        async def one(i: int, data: np.ndarray) -> None:
            opts = _opts(data.shape)
            opts.pop("serializer")
            arr = await az.create_array(str(path), name=f"{rel}/{i}", shape=data.shape, dtype=data.dtype,
                                        zarr_format=3, **opts)
            await arr.setitem(slice(None), data)
        await az.group(store=str(path), path=rel, zarr_format=3, attributes=attrs)
        await asyncio.gather(*(one(i, d) for i, d in enumerate(levels)))

    sync(arrays())
    zarr.open_group(str(path), path=rel, mode="r+").update_attributes({"pcim": record})


def write_files(path: Path, rel: str, levels: list[np.ndarray], attrs: dict, record: dict) -> None:
    folder = path / rel
    zarr_files.write_group(folder, 3, attrs)
    for i, data in enumerate(levels):
        zarr_files.write_array(folder / str(i), 3, data, ngff.array_options(data.shape, 3)["chunks"], ("c", "y", "x"))
    zarr_files.update_attributes(folder, {"pcim": record})


WRITERS = {"zarr": write_zarr, "zarr-batched": write_zarr_batched, "files": write_files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,2160")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    out: dict = {"load_avg_1min": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(int, args.sizes.split(",")):
            reps = args.reps if size <= 512 else max(2, args.reps // 10)
            maps = field_maps(size, 0)
            levels = [zarr_files.round_mantissa(lv, MAP_MANTISSA_BITS) for lv in ngff.pyramid(maps)]
            attrs = ngff.image_attrs("0.5", "A/1/0", maps, ["t"], len(levels))
            record = {"status": "done", "target": "t"}
            times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in WRITERS}
            for rep in range(reps + 1):
                for name, writer in WRITERS.items():
                    path = Path(tmp) / f"{name}.zarr"
                    rel = f"A/1/{rep}"
                    w0, c0 = time.perf_counter(), time.process_time()
                    writer(path, rel, levels, attrs, record)
                    if rep:  # the first is a warm-up
                        times[name]["wall"].append(time.perf_counter() - w0)
                        times[name]["cpu"].append(time.process_time() - c0)
            for name in WRITERS:  # every writer's field reads back the same through zarr-python
                got = zarr.open_group(str(Path(tmp) / f"{name}.zarr"), path="A/1/1", mode="r")
                np.testing.assert_array_equal(got["0"][:], levels[0])
                assert got.attrs["pcim"] == record
            row = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")} for k, v in times.items()}
            row["zarr_over_files_wall"] = row["zarr"]["wall"] / row["files"]["wall"]
            row["batched_over_files_wall"] = row["zarr-batched"]["wall"] / row["files"]["wall"]
            row["bytes_level0"] = sum(f.stat().st_size for f in (Path(tmp) / "files.zarr/A/1/1/0").rglob("c/*/*/*"))
            # reads of a no-op rerun: a field's record
            r = {"zarr": [], "files": []}
            path = Path(tmp) / "files.zarr"
            for rep in range(1, reps + 1):
                w0 = time.perf_counter()
                zarr.open_group(str(path), path=f"A/1/{rep}", mode="r").attrs.get("pcim")
                r["zarr"].append(time.perf_counter() - w0)
                w0 = time.perf_counter()
                zarr_files.read_attributes(path / f"A/1/{rep}").get("pcim")
                r["files"].append(time.perf_counter() - w0)
            row["record_read_wall"] = {k: statistics.median(v) for k, v in r.items()}
            out[str(size)] = row
            for name in WRITERS:
                shutil.rmtree(Path(tmp) / f"{name}.zarr")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
