"""Compare PCIM formulations and baselines on images whose true evidence is known.

    .venv/bin/python benchmarks/compare_formulations.py [--sets demo,nuclei] [--n 24] [--variants a,b]

For every evaluation set (benchmarks/evalsets) and every method, reports the mean over images of
pointing game, relevance mass, pixel AUROC (localisation; higher is better), deletion AUC over the top
20% of pixels in 0.5% steps and over the top 2% in 0.1% steps (fidelity; lower is better; fine steps
because the evidence is small), insertion AUC over all pixels (higher is better), and seconds per map.
The baselines include the maps without a model (`intensity`: the channel whose intensity deletes the
class fastest on the set; `contrast`: |x - channel mean| over channels; engine/trivial.py). Writes a
markdown table to stdout and a CSV to benchmarks/results/.
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
from evalsets.tiled import TiledModel, field_maps  # noqa: E402

from pcim_cli.engine import baselines, metrics, trivial  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions, fit_pcim  # noqa: E402

DEFAULT = PcimOptions()

LADDER = (0.02, 0.05, 0.15)

VARIANTS: dict[str, PcimOptions] = {
    # the paper's reconstruction: un-clamped n*alpha, plain CE on the kept image, zero background
    "paper-softmax": PcimOptions(budget=None, objective="keep", keep_substrate="none", resolution=1),
    "paper-softmax-logit": PcimOptions(budget=None, objective="keep", keep_substrate="none",
                                       resolution=1, loss="logit"),
    "paper-softmax-r4": PcimOptions(budget=None, objective="keep", keep_substrate="none", resolution=4),
    # a budget, keep-only (no deletion half)
    "clamped-keep-blur": PcimOptions(budget=0.05, objective="keep", keep_substrate="blur"),
    # budget + keep-delete, one budget
    "dual-b02": dataclasses.replace(DEFAULT, budget=0.02),
    "dual-b05": dataclasses.replace(DEFAULT, budget=0.05),
    "dual-b15": dataclasses.replace(DEFAULT, budget=0.15),
    "dual-b02-r2": dataclasses.replace(DEFAULT, budget=0.02, resolution=2),
    "dual-b02-r8": dataclasses.replace(DEFAULT, budget=0.02, resolution=8),
    "dual-b02-100x0.3": dataclasses.replace(DEFAULT, budget=0.02, steps=100, lr=0.3),
    "dual-b02-es": dataclasses.replace(DEFAULT, budget=0.02, patience=20, tol=1e-2),
    # budget ladder: one fit per budget, maps averaged
    "ladder": dataclasses.replace(DEFAULT, budget=LADDER),
    "ladder-r2": dataclasses.replace(DEFAULT, budget=LADDER, resolution=2),
    "ladder-r8": dataclasses.replace(DEFAULT, budget=LADDER, resolution=8),
    "ladder-100x0.3": dataclasses.replace(DEFAULT, budget=LADDER, steps=100, lr=0.3),
    "ladder-es": dataclasses.replace(DEFAULT, budget=LADDER, patience=20, tol=1e-2),
    "ladder-tv": dataclasses.replace(DEFAULT, budget=LADDER, tv=1.0),
}

BASELINES = ("random", "saliency", "integrated-gradients", "occlusion", *trivial.TRIVIAL)

# evaluation sets: two datasets x two architectures, a saturated (confident) model, a larger image
SETS = {
    "demo": {"name": "demo"},
    "demo-resnet": {"name": "demo", "arch": "resnet"},
    "nuclei": {"name": "nuclei"},
    "nuclei-resnet": {"name": "nuclei", "arch": "resnet"},
    "nuclei-confident": {"name": "confident", "base": "nuclei", "temperature": 0.05, "arch": "resnet"},
    "nuclei-256": {"name": "nuclei", "size": 256},
    # real bright-field RGB, 3 classes, evidence 6-45 % of a field, 176 px fields tiled for a 64 px model
    "ihc": {"name": "ihc"},
}


def score(model, x, mask, target, maps) -> dict[str, float]:
    values = {
        "pointing_game": metrics.pointing_game(maps, mask),
        "pointing_game_3px": metrics.pointing_game(maps, mask, tolerance=3),
        "relevance_mass": metrics.relevance_mass(maps, mask),
        "pixel_auroc": metrics.pixel_auroc(maps, mask),
        "deletion_auc": metrics.deletion_auc(model, x, maps, target, fractions=torch.linspace(0, 0.2, 41)),
        "fine_deletion_auc": metrics.deletion_auc(model, x, maps, target, fractions=torch.linspace(0, 0.02, 21)),
        "insertion_auc": metrics.insertion_auc(model, x, maps, target, substrate="blur"),
    }
    return metrics.summarize(values)


def run_method(name: str, data: dict, batch: int) -> dict[str, float]:
    """Maps of one method on a set, scored; a set with a `tile` is explained and scored on the whole field
    through its tiles, as pcim explain does (evalsets.tiled)."""
    model, x, target = data["model"], data["x"], data["target"]
    t0 = time.perf_counter()
    extra = {}
    stats = []
    scorer = TiledModel(model, data["tile"]) if "tile" in data else model
    channel = None
    if name == "intensity":  # one channel for the set, as pcim evaluate chooses it (on whole fields)
        channel = int(trivial.best_channel(scorer, x, target, per_image=False))

    def fit(m, xs, ts):
        if name in trivial.TRIVIAL:
            return attribute(m, xs, ts, name, dataclasses.replace(DEFAULT, intensity_channel=channel)).maps
        if name in BASELINES:
            return baselines.METHODS[name](m, xs, ts)
        stats.append(fit_pcim(m, xs, ts, VARIANTS[name]))
        return stats[-1].maps

    if "tile" in data:  # as pcim explain does: one map per field through its tiles
        maps = field_maps(fit, model, x, target, data["tile"])
    else:
        maps = torch.cat([fit(model, x[i : i + batch], target[i : i + batch]) for i in range(0, len(x), batch)])
    if stats:
        extra = {
            "p_keep": float(torch.cat([r.prob_mixed for r in stats]).mean()),
            "p_delete": float(torch.cat([r.prob_deleted for r in stats]).mean()),
            "steps_used": float(torch.cat([r.steps for r in stats]).float().mean()),
        }
    seconds = (time.perf_counter() - t0) / len(x)
    return {**score(scorer, x, data["mask"], target, maps), "s_per_map": seconds, **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/formulations.csv")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for set_name in args.sets.split(","):
        spec = dict(SETS[set_name])
        data = evalsets.load(spec.pop("name"), n=args.n, **spec)
        methods = [m for m in args.baselines.split(",") if m] + [v for v in args.variants.split(",") if v]
        for method in methods:
            res = run_method(method, data, args.batch)
            rows.append({"set": set_name, "method": method, **res})
            print(f"{set_name:18s} {method:24s} " + " ".join(
                f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
