"""Does smoothing the final PCIM map move its peak off object edges without costing fidelity?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/map_smoothing.py [--sets demo,demo-resnet,nuclei,nuclei-resnet]
        [--n 16] [--sigmas 0,1,2,4] [--variants default]

Fits PCIM once per image (maps cached in benchmarks/.cache/smoothing/), then scores the map after a
Gaussian blur of sigma px (0 = as reported today) and after a 3x3 box average on the grid of the mixing
weights, against integrated gradients. Scores as in compare_formulations.py. Writes a markdown table to
stdout and a CSV to benchmarks/results/map_smoothing.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare_formulations as cf  # noqa: E402

from pcim_cli.engine import baselines, mixing  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions, fit_pcim  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "smoothing"
VARIANTS = {
    # the raw map (before the contrast became the default); x-contrast below is today's default map
    "default": PcimOptions(map_contrast=False),
    "noise0.02": PcimOptions(noise=0.02, map_contrast=False),
}


def grid_box(maps: torch.Tensor, resolution: int) -> torch.Tensor:
    """3x3 box average at the resolution of the mixing weights (a cell of `resolution` px)."""
    k = 3 * resolution
    return F.avg_pool2d(maps, k, stride=1, padding=k // 2, count_include_pad=False)[..., : maps.shape[-2],
                                                                                    : maps.shape[-1]]


def pcim_maps(set_name: str, variant: str, data: dict, batch: int) -> tuple[torch.Tensor, float]:
    path = CACHE / f"{set_name}_{variant}_{len(data['x'])}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["maps"], saved["s"]
    t0 = time.perf_counter()
    maps = torch.cat([fit_pcim(data["model"], data["x"][i : i + batch], data["target"][i : i + batch],
                               VARIANTS[variant]).maps for i in range(0, len(data["x"]), batch)])
    s = (time.perf_counter() - t0) / len(data["x"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"maps": maps, "s": s}, path)
    return maps, s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="demo,demo-resnet,nuclei,nuclei-resnet")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sigmas", default="0,1,2,4")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/map_smoothing.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for set_name in args.sets.split(","):
        data = cf.load_set(set_name, args.n)
        model, x, target, mask = data["model"], data["x"], data["target"], data["mask"]
        ig = torch.cat([baselines.integrated_gradients(model, x[i : i + args.batch], target[i : i + args.batch])
                        for i in range(0, len(x), args.batch)])
        rows.append({"set": set_name, "method": "integrated-gradients", **cf.score(model, x, mask, target, ig)})
        for variant in args.variants.split(","):
            maps, s = pcim_maps(set_name, variant, data, args.batch)
            res = dataclasses.replace(VARIANTS[variant]).resolution
            post = {f"sigma{s_}": mixing.gaussian_blur(maps, float(s_)) for s_ in args.sigmas.split(",")}
            post["grid-box3"] = grid_box(maps, res)
            contrast = (x - mixing.substrate(x, "mean", 8.0)).abs().sum(1, keepdim=True)
            post["x-contrast"] = maps * contrast
            post["x-contrast-sigma1"] = mixing.gaussian_blur(maps, 1.0) * contrast
            for name, m in post.items():
                r = {"set": set_name, "method": f"pcim-{variant}-{name}", **cf.score(model, x, mask, target, m),
                     "s_per_map": s}
                rows.append(r)
                print(f"{set_name:14s} {r['method']:28s} " + " ".join(
                    f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)), flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
