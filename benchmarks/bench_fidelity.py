"""Which grid for the CSV's deletion / insertion AUCs: accuracy against a dense curve, and forwards per map.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fidelity.py [--n 16] [--sets demo,nuclei-resnet]

`explain.fidelity` puts a deletion and an insertion AUC of every map into the CSV; each point of a curve
is one classifier forward of the perturbed field, so the grid is the cost. For the maps of the per-image
default fit, of the intensity baseline (a map that is not sparse) and of a map of noise (a bad map), on
the evaluation sets, the curves are measured on a dense grid (0.25 % steps over the top 0-20 %, then 2.5 %
steps to 100 %); every candidate grid's AUC (trapezoid, normalised to the axis length) is compared with
the dense curve's AUC over the same range: mean and largest absolute error, and Spearman rank
correlation over the maps (does the cheap AUC order maps as the dense one does?). Forwards per map: the
grid's points less those known without a forward (deletion at 0 = p(target | x), at 100 % the
all-substrate image shared by every map of a field; insertion at 0 the blurred field, shared, at 100 % x).

Prints a table; writes benchmarks/results/bench_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evalsets  # noqa: E402
from evalsets.tiled import TiledModel, per_tile_maps  # noqa: E402, F401

from pcim_cli.engine import baselines, metrics  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions, fit_pcim  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

DENSE = torch.unique(torch.cat([torch.linspace(0, 0.2, 81), torch.linspace(0.2, 1.0, 33)]))
STAIN = torch.tensor([0, 0.004, 0.008, 0.012, 0.016, 0.02, 0.04, 0.08, 0.12, 0.16, 0.2])
GRIDS = {
    # the range the AUC is taken over -> candidate grids
    "0-100 %": {
        "uniform 21 (today)": torch.linspace(0, 1, 21),
        "uniform 11": torch.linspace(0, 1, 11),
        "stain grid + 0.35, 0.5, 0.75, 1": torch.cat([STAIN, torch.tensor([0.35, 0.5, 0.75, 1.0])]),
        "0, 1, 2, 5, 10, 20, 35, 50, 75, 100 %": torch.tensor([0, .01, .02, .05, .1, .2, .35, .5, .75, 1.0]),
        "0, 2, 5, 10, 20, 50, 100 %": torch.tensor([0, .02, .05, .1, .2, .5, 1.0]),
    },
    "0-20 %": {
        "0.5 % steps (pcim evaluate)": torch.linspace(0, 0.2, 41),
        "stain grid (0.4 % to 2 %, 4 % to 20 %)": STAIN,
        "uniform 2 % steps": torch.linspace(0, 0.2, 11),
        "0, 0.5, 1, 2, 4, 8, 12, 16, 20 %": torch.tensor([0, .005, .01, .02, .04, .08, .12, .16, .2]),
        "0, 1, 2, 5, 10, 20 %": torch.tensor([0, .01, .02, .05, .1, .2]),
    },
}


def auc_on(curve: torch.Tensor, fractions: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The AUC over grid[0]..grid[-1] of a curve measured at `fractions`, read at the grid's points
    (every grid point is one of the dense fractions)."""
    idx = [int(torch.argmin((fractions - g).abs())) for g in grid]
    return metrics.curve_auc(curve[:, idx], fractions[idx])


def forwards(grid: torch.Tensor, mode: str) -> int:
    """Classifier forwards per map for a grid: points not known without one (see the docstring)."""
    n = len(grid)
    known = int(float(grid[0]) == 0.0 and mode == "deletion")  # p(target | x)
    known += int(float(grid[-1]) == 1.0 and mode == "insertion")  # x itself
    return n - known


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def study(name: str, n: int) -> list[dict]:
    ev = evalsets.load(name.replace("-resnet", ""), **({"arch": "resnet"} if name.endswith("-resnet") else {}), n=n)
    x, target, model = ev["x"], ev["target"], ev["model"]
    g = torch.Generator().manual_seed(0)
    maps = {"per-image default": fit_pcim(model, x, target, PcimOptions()).maps,
            "intensity (channel 0)": baselines.intensity(x, torch.zeros(len(x), dtype=torch.long)),
            "noise": torch.rand(x.shape[0], 1, *x.shape[-2:], generator=g)}
    curves = {}
    for label, m in maps.items():
        for mode in ("deletion", "insertion"):
            sub = "mean" if mode == "deletion" else "blur"
            curves[(label, mode)] = metrics.perturbation_curve(model, x, m, target, mode, substrate=sub,
                                                               fractions=DENSE, chunk=32)
    rows = []
    for mode in ("deletion", "insertion"):
        for rng, grids in GRIDS.items():
            lo, hi = (0.0, 1.0) if rng == "0-100 %" else (0.0, 0.2)
            ref_grid = DENSE[(DENSE >= lo - 1e-9) & (DENSE <= hi + 1e-9)]
            for gname, grid in grids.items():
                errs, ref_all, got_all = [], [], []
                for label in maps:
                    c = curves[(label, mode)]
                    ref, got = auc_on(c, DENSE, ref_grid), auc_on(c, DENSE, grid)
                    errs.append((got - ref).abs())
                    ref_all.append(ref)
                    got_all.append(got)
                err = torch.cat(errs)
                rows.append({"set": ev["name"], "mode": mode, "range": rng, "grid": gname, "points": len(grid),
                             "forwards_per_map": forwards(grid, mode), "mean_abs_error": float(err.mean()),
                             "max_abs_error": float(err.max()),
                             "spearman_vs_dense": spearman(torch.cat(ref_all).numpy(), torch.cat(got_all).numpy()),
                             "mean_auc_dense": float(torch.cat(ref_all).mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sets", default="demo,nuclei-resnet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.sets.split(","):
        rows += study(name, args.n)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_fidelity.json").write_text(json.dumps(rows, indent=1))
    print("| set | curve | range | grid | forwards/map | mean abs err | max abs err | Spearman vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['mode']} | {r['range']} | {r['grid']} | {r['forwards_per_map']} | "
              f"{r['mean_abs_error']:.4f} | {r['max_abs_error']:.4f} | {r['spearman_vs_dense']:.3f} |")


if __name__ == "__main__":
    main()
