"""How to store attribution maps: size, speed and what lossy rounding does to the CSV metrics, in one run.

    .venv/bin/python benchmarks/bench_store.py [--maps store.zarr:A01:0 ...] [--n 16]

Two questions (issue 28: <= 4 MB per 2160 x 2160 field per target, readers unchanged):

1. size and speed: every candidate encoding of one field's map levels (level 0 + the 2x and 4x
   mean-pooled pyramid, as io/store.py writes them), chunked as the store chunks them (1 x 1024 x 1024):
   zstd at several levels (the store's default: level 0), blosc-zstd with byte or bit shuffle, after
   rounding the float32 mantissa to k bits (round to nearest, as numcodecs.BitRound: the values stay
   float32 for every reader), and float16. The maps: a real field's map from a store (`--maps`), or a
   synthetic 2160 x 2160 map made the way pcim makes one (a per-image fit of benchmarks/evalsets' demo
   fields mosaicked to 2160 px would take minutes; instead the fit's structure: bilinearly upsampled 1/4
   resolution weights, median-subtracted and clipped, times the |x - mean| contrast of a real mosaic);
2. what the rounding does to the metrics the CSV and `pcim evaluate` report: deletion and insertion AUC,
   pointing game, relevance mass and pixel AUROC of per-image default maps on the demo and nuclei
   evaluation sets, computed on the float32 maps and on the rounded ones.

Prints a table per question; writes benchmarks/results/bench_store.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pcim_cli.io import ngff, store  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def bitround(a: np.ndarray, keep: int) -> np.ndarray:
    """float32 values with `keep` mantissa bits (of 23), rounded to nearest (ties away), as float32."""
    if keep >= 23:
        return a
    bits = a.astype(np.float32).view(np.uint32)
    drop = 23 - keep
    half = np.uint32(1 << (drop - 1))
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return ((bits + half) & mask).view(np.float32)


def flushed(a: np.ndarray, keep: int, below: int) -> np.ndarray:
    """bitround(a, keep), with every value under max(plane) * 2**-below set to 0 (per map plane)."""
    out = bitround(a, keep).copy()
    for plane in out.reshape(-1, *out.shape[-2:]):
        plane[plane < float(plane.max()) * 2.0**-below] = 0
    return out


def codecs() -> dict[str, tuple[callable, numcodecs.abc.Codec]]:
    """name -> (value transform, bytes codec)."""
    same = lambda a: a  # noqa: E731
    out = {
        "zstd-0 (today)": (same, numcodecs.Zstd(level=0)),
        "zstd-3": (same, numcodecs.Zstd(level=3)),
        "zstd-9": (same, numcodecs.Zstd(level=9)),
        "blosc-zstd-5 shuffle": (same, numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE)),
        "blosc-zstd-5 bitshuffle": (same, numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE)),
        "float16 + zstd-3": (lambda a: a.astype(np.float16), numcodecs.Zstd(level=3)),
    }
    for k in (7, 10, 12, 16):
        out[f"round {k} bits + zstd-3"] = (lambda a, k=k: bitround(a, k), numcodecs.Zstd(level=3))
        out[f"round {k} bits + blosc-zstd-5 bitshuffle"] = (lambda a, k=k: bitround(a, k),
                                                            numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE))
        out[f"round {k} bits + blosc-zstd-5 shuffle"] = (lambda a, k=k: bitround(a, k),
                                                         numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE))
    for k, m in ((8, 16), (8, 20), (10, 16), (10, 20)):
        out[f"round {k} bits, 0 below max/2^{m} + zstd-3"] = (lambda a, k=k, m=m: flushed(a, k, m),
                                                              numcodecs.Zstd(level=3))
    return out


def chunks(level: np.ndarray, size: int = ngff.MAX_CHUNK):
    for c in range(level.shape[0]):
        for y in range(0, level.shape[1], size):
            for x in range(0, level.shape[2], size):
                yield np.ascontiguousarray(level[c, y : y + size, x : x + size])


def encode_study(maps: np.ndarray, repeats: int = 2) -> list[dict]:
    """Size (MB, all levels) and encode / decode seconds of each candidate for maps (T, H, W)."""
    rows = []
    for name, (transform, codec) in codecs().items():
        enc_s, dec_s, size, err = [], [], 0, 0.0
        for _ in range(repeats):
            size, t_enc, t_dec = 0, 0.0, 0.0
            t0 = time.perf_counter()
            values = transform(maps)
            levels = ngff.pyramid(np.asarray(values, dtype=np.float32))
            levels = [transform(lv) for lv in levels]
            t_enc += time.perf_counter() - t0
            for lv in levels:
                for ch in chunks(lv):
                    t0 = time.perf_counter()
                    blob = codec.encode(ch)
                    t_enc += time.perf_counter() - t0
                    size += len(blob)
                    t0 = time.perf_counter()
                    codec.decode(blob)
                    t_dec += time.perf_counter() - t0
            enc_s.append(t_enc)
            dec_s.append(t_dec)
        back = np.asarray(transform(maps), dtype=np.float32)
        nz = maps > 0
        rel = np.abs(back[nz] - maps[nz]) / maps[nz] if nz.any() else np.zeros(1)
        err = float(rel.max())
        rows.append({"codec": name, "mb_per_target": size / 1e6 / maps.shape[0], "encode_s": min(enc_s),
                     "decode_s": min(dec_s), "max_rel_error": err,
                     "zeros_kept": bool(np.array_equal(back == 0, maps == 0))})
        print(f"  {name:45s} {rows[-1]['mb_per_target']:7.2f} MB  enc {min(enc_s):.3f} s  dec {min(dec_s):.3f} s  "
              f"max rel err {err:.1e}", flush=True)
    return rows


def synthetic_map(size: int = 2160, seed: int = 0) -> np.ndarray:
    """A map with the structure of a PCIM map of a 2160 px field of demo-like images (see the docstring)."""
    import tifffile

    from pcim_cli.engine import mixing
    from pcim_cli.engine.pcim import PcimOptions, attribution_map, deletion_contrast
    from pcim_cli.io.images import normalize

    demo = sorted((ROOT / "sample_plates" / "demo" / "images").glob("*_w1.tif"))
    tiles = [np.stack([tifffile.imread(str(p).replace("_w1", f"_w{c}")) for c in (1, 2, 3)]) for p in demo]
    n = -(-size // 128)
    big = np.zeros((3, n * 128, n * 128), np.uint16)
    k = 0
    for i in range(n):
        for j in range(n):
            big[:, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = tiles[k % len(tiles)]
            k += 7
    x = torch.from_numpy(normalize(big[:, :size, :size], "percentile", low=1.0, high=99.8))[None]
    g = torch.Generator().manual_seed(seed)
    opts = PcimOptions()
    h = size // opts.resolution
    w = torch.randn(1, 1, h, h, generator=g) * 0.5
    w = mixing.gaussian_blur(w, 2.0) * 6  # smooth logits with a few strong cells, as a fit leaves them
    maps = attribution_map(w, (size, size), torch.tensor([opts.budgets[0]])) * deletion_contrast(x, opts)
    return maps[0].numpy().astype(np.float32)


def metric_study(n: int, keeps: tuple[int, ...] = (7, 10, 12)) -> list[dict]:
    """The CSV / evaluate metrics of per-image default maps, float32 vs rounded to k bits (and float16)."""
    import evalsets

    from pcim_cli.engine import metrics
    from pcim_cli.engine.pcim import PcimOptions, fit_pcim

    rows = []
    for name, kw in (("demo", {}), ("nuclei", {"arch": "resnet"})):
        ev = evalsets.load(name, n=n, **kw)
        x, target, mask, model = ev["x"], ev["target"], ev["mask"], ev["model"]
        maps = fit_pcim(model, x, target, PcimOptions()).maps
        variants = {"float32": maps, "float16": maps.half().float()}
        for k in keeps:
            variants[f"round {k} bits"] = torch.from_numpy(bitround(maps.numpy(), k))
        for k, b in ((8, 16), (8, 20), (10, 16)):
            variants[f"round {k} bits, 0 below max/2^{b}"] = torch.from_numpy(
                np.stack([flushed(m, k, b) for m in maps.numpy()]))
        fine = torch.linspace(0, 0.2, 41)
        for label, m in variants.items():
            row = {"set": ev["name"], "maps": label, "n": len(x),
                   "deletion_auc": float(metrics.deletion_auc(model, x, m, target).mean()),
                   "insertion_auc": float(metrics.insertion_auc(model, x, m, target, substrate="blur").mean()),
                   "deletion_auc_top20": float(metrics.deletion_auc(model, x, m, target, fractions=fine).mean()),
                   "pointing": float(metrics.pointing_game(m, mask).nanmean()),
                   "mass": float(metrics.relevance_mass(m, mask).nanmean()),
                   "auroc": float(metrics.pixel_auroc(m, mask).nanmean())}
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", nargs="*", default=[], help="store.zarr:WELL:FIELD of real maps to study")
    ap.add_argument("--n", type=int, default=16, help="fields per evaluation set (metric study)")
    ap.add_argument("--skip-metrics", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {"sizes": {}}
    sources = {}
    for spec in args.maps:
        path, well, field = spec.rsplit(":", 2)
        sources[spec] = store.read_field(Path(path), well, int(field))[0].astype(np.float32)
    if not sources:
        sources["synthetic 2160 px PCIM-like map"] = synthetic_map()
    for label, maps in sources.items():
        print(f"{label}: {maps.shape}, {100 * float((maps == 0).mean()):.0f} % zeros", flush=True)
        res["sizes"][label] = encode_study(maps)
    if not args.skip_metrics:
        print("metrics of rounded maps:", flush=True)
        res["metrics"] = metric_study(args.n)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_store.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
