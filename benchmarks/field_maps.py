"""One map per field across tiles, and an adaptive budget: the measurements behind their defaults.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/field_maps.py [--part tiles,budget] [--n 16]
        [--sets ihc,demo-tiled,nuclei-resnet-256] [--budget-sets demo,demo-resnet,nuclei,nuclei-resnet,ihc]
        [--device cpu|cuda] [--out benchmarks/results]

Part `tiles` (docs/tiles.md, "The field's map"): fields larger than the model's input are cut into
tiles (pcim_cli/engine/tiling.py) and explained three ways with the same fit settings (PcimOptions'
defaults): `per-tile` (every tile fitted alone, its own budget), `evidence` (the same maps, each tile's
weighted by its measured evidence p(target | tile) - p(target | tile without its map's pixels)), and
`field` (one mixing layer over the field: one softmax over all its pixels, the budget spent over the
field, the objective on the field's mean tile probability; pcim_cli/engine/field.py); `whole-field`
(the model run on the untiled field, possible for these fully convolutional models) for reference.
Every map is scored on the WHOLE stitched field against the evidence mask, with the field's prediction
made by --aggregate (default mean-logit, the measured default of model.aggregate; the `field` fit
explains that prediction): deletion AUC (top 20 % in 0.5 % steps), fine deletion (top 2 %
in 0.1 % steps), relevance mass, pixel AUROC, pointing game, and `tile r`: the Pearson correlation,
over a field's tiles, of each tile's share of the map with its share of the evidence (mean over fields).

Part `budget` (docs/verdicts.md, "An adaptive budget"): the fixed budget against one that doubles, per
image, until deleting the map's pixels removes at least half of p(target) (at most 0.32;
pcim_cli/engine/budget.py), on every set (tiled sets through the `field` fit), with the fit verdicts
ok / weak / failed of each.

Part `aggregate` (docs/tiles.md, "The field's prediction"): field accuracy on labelled fields of
both (all) classes when the tiles' outputs are combined by model.aggregate (mean-prob, mean-logit,
max) and when the model runs on the whole field (whole-field).

Sets: `ihc` (real bright-field RGB, 176 px fields, 64 px model input, 3 classes), `demo-tiled` (demo
fields 128 px, the bundled max-pool CNN on 64 px tiles), `nuclei-resnet-256` (real nuclei 256 px, the
ResNet on 128 px tiles), `nuclei-256` (the max-pool CNN on 128 px tiles). Writes field_maps.csv and
adaptive_budget.csv (means) and *_fields.csv (one row per field) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evalsets  # noqa: E402
import evalsets._common  # noqa: E402

from pcim_cli.engine import metrics, tiling  # noqa: E402
from pcim_cli.engine.budget import fit_adaptive  # noqa: E402
from pcim_cli.engine.field import TiledForward, evidence_weights  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions, fit_pcim  # noqa: E402
from pcim_cli.engine.verdict import fit_quality  # noqa: E402

TILED_SETS = {
    "ihc": ({"name": "ihc"}, None),
    "demo-tiled": ({"name": "demo"}, (64, 64)),
    "nuclei-resnet-256": ({"name": "nuclei", "size": 256, "arch": "resnet"}, (128, 128)),
    "nuclei-256": ({"name": "nuclei", "size": 256}, (128, 128)),
}
BUDGET_SETS = {
    "demo": {"name": "demo"},
    "demo-resnet": {"name": "demo", "arch": "resnet"},
    "nuclei": {"name": "nuclei"},
    "nuclei-resnet": {"name": "nuclei", "arch": "resnet"},
    "ihc": {"name": "ihc"},
}
FINE = torch.linspace(0, 0.02, 21)
DELETION = torch.linspace(0, 0.2, 41)


def load(spec: dict, n: int, device: str) -> dict:
    spec = dict(spec)
    data = evalsets.load(spec.pop("name"), n=n, **spec)
    data["model"] = data["model"].to(device)
    for k in ("x", "mask", "target"):
        data[k] = data[k].to(device)
    return data


def tile_correlation(maps: torch.Tensor, mask: torch.Tensor, grid: tiling.TileGrid) -> torch.Tensor:
    """(B,) Pearson r over tiles of (tile's blended share of the map, tile's blended share of the mask)."""
    m = metrics._joint(maps).float().cpu()
    k = mask.float().cpu()
    out = []
    for b in range(m.shape[0]):
        mass, ev = [], []
        for i in range(grid.n_tiles):
            y0, x0 = grid.origin(i)
            w = grid.weight(i)
            th, tw = grid.tile
            mass.append(float((m[b, y0 : y0 + th, x0 : x0 + tw] * w).sum()))
            ev.append(float((k[b, y0 : y0 + th, x0 : x0 + tw] * w).sum()))
        a, e = torch.tensor(mass), torch.tensor(ev)
        a, e = a - a.mean(), e - e.mean()
        den = float((a.square().sum() * e.square().sum()).sqrt())
        out.append(float((a * e).sum()) / den if den > 0 else float("nan"))
    return torch.tensor(out)


def score(scorer, x, mask, target, maps, grid=None) -> dict[str, torch.Tensor]:
    values = {
        "deletion_auc": metrics.deletion_auc(scorer, x, maps, target, fractions=DELETION),
        "fine_deletion_auc": metrics.deletion_auc(scorer, x, maps, target, fractions=FINE),
        "relevance_mass": metrics.relevance_mass(maps, mask),
        "pixel_auroc": metrics.pixel_auroc(maps, mask),
        "pointing_game": metrics.pointing_game(maps, mask),
    }
    if grid is not None and grid.n_tiles > 1:
        values["tile_r"] = tile_correlation(maps, mask, grid)
    return {k: v.float().cpu() for k, v in values.items()}


def per_tile(model, x, target, grid, opts, batch):
    """Per-tile fits stitched, and the same maps with each tile weighted by its measured evidence."""
    tiles = torch.cat([tiling.cut(f, grid, range(grid.n_tiles)) for f in x])
    tt = target.repeat_interleave(grid.n_tiles)
    maps, weights = [], []
    for i in range(0, len(tiles), batch):
        r = fit_pcim(model, tiles[i : i + batch], tt[i : i + batch], opts)
        maps.append(r.maps)
        weights.append(evidence_weights(r.prob_original, r.prob_deleted))
    maps = torch.cat(maps).view(x.shape[0], grid.n_tiles, *maps[0].shape[1:]).cpu()
    weights = torch.cat(weights).view(x.shape[0], grid.n_tiles).cpu()
    plain = torch.stack([tiling.stitch(grid, m) for m in maps])
    weighted = torch.stack([tiling.stitch(grid, m * w.view(-1, 1, 1, 1)) for m, w in zip(maps, weights, strict=True)])
    return plain.to(x.device), weighted.to(x.device)


def run_tiles(args, opts, rows, field_rows):
    for set_name in args.sets.split(","):
        spec, tile = TILED_SETS[set_name]
        data = load(spec, args.n, args.device)
        model, x, mask, target = data["model"], data["x"], data["mask"], data["target"]
        tile = tuple(data.get("tile") or tile)
        grid = tiling.plan_tiles(tuple(x.shape[-2:]), tile)
        scorer = TiledForward(model, grid, args.aggregate)
        timings, maps = {}, {}
        t0 = time.perf_counter()
        maps["per-tile"], maps["evidence"] = per_tile(model, x, target, grid, opts, args.batch * grid.n_tiles)
        timings["per-tile"] = timings["evidence"] = (time.perf_counter() - t0) / len(x)
        for mode, fwd in (("field", scorer), ("whole-field", model)):
            t0 = time.perf_counter()
            maps[mode] = torch.cat([fit_pcim(fwd, x[i : i + args.batch], target[i : i + args.batch], opts).maps
                                    for i in range(0, len(x), args.batch)])
            timings[mode] = (time.perf_counter() - t0) / len(x)
        for mode, m in maps.items():
            s = score(scorer, x, mask, target, m, grid)
            row = {"set": set_name, "mode": mode, "tiles": grid.n_tiles,
                   **{k: float(torch.nanmean(v)) for k, v in s.items()}, "s_per_field": timings[mode]}
            rows.append(row)
            field_rows += [{"set": set_name, "mode": mode, "field": i, **{k: float(v[i]) for k, v in s.items()}}
                           for i in range(len(x))]
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)


def run_budget(args, opts, rows, field_rows):
    for set_name in args.budget_sets.split(","):
        data = load(BUDGET_SETS[set_name], args.n, args.device)
        model, x, mask, target = data["model"], data["x"], data["mask"], data["target"]
        fwd, grid = model, None
        if "tile" in data:
            grid = tiling.plan_tiles(tuple(x.shape[-2:]), tuple(data["tile"]))
            fwd = TiledForward(model, grid, args.aggregate)
        for mode in ("fixed", "adaptive"):
            t0 = time.perf_counter()
            parts, budgets = [], []
            for i in range(0, len(x), args.batch):
                xs, ts = x[i : i + args.batch], target[i : i + args.batch]
                if mode == "fixed":
                    r, b = fit_pcim(fwd, xs, ts, opts), torch.full((len(xs),), float(opts.budget))
                else:
                    r, b = fit_adaptive(fwd, xs, ts, opts)
                parts.append(r)
                budgets.append(b)
            seconds = (time.perf_counter() - t0) / len(x)
            maps = torch.cat([r.maps for r in parts])
            po, pk, pd_ = (torch.cat([getattr(r, k) for r in parts]).cpu() for k in
                           ("prob_original", "prob_mixed", "prob_deleted"))
            verdicts = [fit_quality(float(a), float(b_), float(c)) for a, b_, c in zip(po, pk, pd_, strict=True)]
            s = score(fwd, x, mask, target, maps, grid)
            budget = torch.cat(budgets).float()
            row = {"set": set_name, "mode": mode, **{k: float(torch.nanmean(v)) for k, v in s.items()},
                   "p_keep": float(pk.mean()), "p_delete": float(pd_.mean()), "mean_budget": float(budget.mean()),
                   **{f"fit_{v}": verdicts.count(v) / len(verdicts) for v in ("ok", "weak", "failed")},
                   "s_per_map": seconds}
            rows.append(row)
            field_rows += [{"set": set_name, "mode": mode, "field": i, "budget": float(budget[i]),
                            "p_original": float(po[i]), "p_keep": float(pk[i]), "p_delete": float(pd_[i]),
                            "fit": verdicts[i], **{k: float(v[i]) for k, v in s.items()}} for i in range(len(x))]
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)


def labelled_fields(set_name: str, n: int):
    """(x, y, model, tile) for field accuracy: fields of every class of a tiled set."""
    import importlib

    spec, tile = TILED_SETS[set_name]
    data = load(spec, 2, "cpu")
    if set_name == "ihc":
        x, y = importlib.import_module("evalsets.ihc").make_set(n, 121, 176, "eval")[:2]
    elif set_name == "demo-tiled":
        x, y = evalsets._common.demo_module().make_dataset(n, 5)[:2]
    else:
        x, y = importlib.import_module("evalsets.nuclei").make_set(n, 111, 256, "eval")[:2]
    return x, y, data["model"], tuple(data.get("tile") or tile)


@torch.no_grad()
def run_aggregate(args, opts, rows, field_rows):
    for set_name in args.sets.split(","):
        x, y, model, tile = labelled_fields(set_name, max(args.n, 60))
        model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
        grid = tiling.plan_tiles(tuple(x.shape[-2:]), tile)
        row = {"set": set_name, "fields": len(x), "tiles": grid.n_tiles}
        for how in ("mean-prob", "mean-logit", "max", "whole-field"):
            fwd = TiledForward(model, grid, how)
            pred = torch.cat([fwd(x[i : i + 8]).argmax(1) for i in range(0, len(x), 8)])
            row[how] = float((pred == y).float().mean())
        rows.append(row)
        print(row, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="aggregate,tiles,budget")
    ap.add_argument("--sets", default="ihc,demo-tiled,nuclei-resnet-256")
    ap.add_argument("--budget-sets", default=",".join(BUDGET_SETS))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="fields per fit")
    ap.add_argument("--steps", type=int, default=None, help="override PcimOptions().steps (exploration only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--aggregate", default="mean-logit", help="the field's prediction (fit and scores)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    opts = PcimOptions() if args.steps is None else dataclasses.replace(PcimOptions(), steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"aggregate": (run_aggregate, "aggregate"), "tiles": (run_tiles, "field_maps"),
             "budget": (run_budget, "adaptive_budget")}
    for part, (fn, name) in parts.items():
        if part not in args.part.split(","):
            continue
        rows, field_rows = [], []
        fn(args, opts, rows, field_rows)
        pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)
        pd.DataFrame(field_rows).to_csv(out / f"{name}_fields.csv", index=False)
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
