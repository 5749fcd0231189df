"""Compare PCIM formulations and baselines on images whose true evidence is known.

    .venv/bin/python benchmarks/compare_formulations.py [--sets demo,nuclei] [--n 24] [--variants a,b]
    .venv/bin/python benchmarks/compare_formulations.py --variants old-default,default,steps=50/lr=0.5

For every evaluation set (benchmarks/evalsets) and every method, reports the mean over images of
pointing game, relevance mass, pixel AUROC (localisation; higher is better), deletion AUC over the top
20% of pixels in 0.5% steps (fidelity; lower is better; fine steps because the evidence is small),
fine deletion AUC over the top 2% in 0.1% steps (the coarse curve saturates on small evidence),
insertion AUC over all pixels (higher is better), classifier passes per map (forward + backward of one
image; a keep-delete step is two) and seconds per map. The baselines include the maps without a model
(`intensity`: the channel whose intensity deletes the class fastest on the set; `contrast`: |x - channel
mean| over channels; engine/trivial.py). A variant is a name of VARIANTS or PcimOptions
overrides on the current default joined by '/': `steps=50/lr=0.5/schedule=cosine`. Writes a markdown
table to stdout and a CSV to benchmarks/results/.
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
from pcim_cli.engine.budget import fit_adaptive  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions, fit_pcim  # noqa: E402
from pcim_cli.engine.verdict import fit_quality  # noqa: E402

DEFAULT = PcimOptions()
#: the default before issue 14 (300 steps at a constant lr 0.1 from zero logits); the dual-* variants and
#: the first sweep of docs/defaults.md are built on it
OLD_DEFAULT = dataclasses.replace(DEFAULT, steps=300, lr=0.1, schedule="constant", warmup=0, coarse=0,
                                  init="zero", noise=0.0, beta1=0.9, beta2=0.999)

#: the default before issue 26 (49 steps at lr 0.3 from gradient-init logits, noise 0.02, a FIXED 2 % budget,
#: deleted pixels set to the channel mean)
PREVIOUS_DEFAULT = dataclasses.replace(DEFAULT, budget=0.02, adaptive_budget=None, delete_substrate="mean")

#: refits (engine/budget.fit_adaptive: the fixed-budget fit, then each map whose deleted image still holds the
#: class refitted with twice the budget, up to 0.32): the opt-in of issue 15, up to 5 fits per map
REFITS = {"refit-0.32": (PREVIOUS_DEFAULT, 0.32)}

LADDER = (0.02, 0.05, 0.15)

VARIANTS: dict[str, PcimOptions] = {
    # the paper's reconstruction: un-clamped n*alpha, plain CE on the kept image, zero background
    "paper-softmax": PcimOptions(budget=None, objective="keep", keep_substrate="none", resolution=1),
    "paper-softmax-logit": PcimOptions(budget=None, objective="keep", keep_substrate="none",
                                       resolution=1, loss="logit"),
    "paper-softmax-r4": PcimOptions(budget=None, objective="keep", keep_substrate="none", resolution=4),
    # a budget, keep-only (no deletion half)
    "clamped-keep-blur": PcimOptions(budget=0.05, objective="keep", keep_substrate="blur"),
    "old-default": OLD_DEFAULT,
    "previous-default": PREVIOUS_DEFAULT,
    "default": DEFAULT,
    # budget + keep-delete, one budget
    "dual-b02": dataclasses.replace(OLD_DEFAULT, budget=0.02),
    "dual-b05": dataclasses.replace(OLD_DEFAULT, budget=0.05),
    "dual-b15": dataclasses.replace(OLD_DEFAULT, budget=0.15),
    "dual-b02-r2": dataclasses.replace(OLD_DEFAULT, budget=0.02, resolution=2),
    "dual-b02-r8": dataclasses.replace(OLD_DEFAULT, budget=0.02, resolution=8),
    "dual-b02-100x0.3": dataclasses.replace(OLD_DEFAULT, budget=0.02, steps=100, lr=0.3),
    "dual-b02-es": dataclasses.replace(OLD_DEFAULT, budget=0.02, patience=20, tol=1e-2),
    # budget ladder: one fit per budget, maps averaged
    "ladder": dataclasses.replace(OLD_DEFAULT, budget=LADDER),
    "ladder-r2": dataclasses.replace(OLD_DEFAULT, budget=LADDER, resolution=2),
    "ladder-r8": dataclasses.replace(OLD_DEFAULT, budget=LADDER, resolution=8),
    "ladder-100x0.3": dataclasses.replace(OLD_DEFAULT, budget=LADDER, steps=100, lr=0.3),
    "ladder-es": dataclasses.replace(OLD_DEFAULT, budget=LADDER, patience=20, tol=1e-2),
    "ladder-tv": dataclasses.replace(OLD_DEFAULT, budget=LADDER, tv=1.0),
}


def variant(name: str) -> PcimOptions:
    """A named variant, or `key=value/key=value` overrides of the current default."""
    if name in VARIANTS:
        return VARIANTS[name]
    if "=" not in name:
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, or key=value/key=value")
    fields = {f.name for f in dataclasses.fields(PcimOptions)}
    kw: dict = {}
    for part in name.split("/"):
        key, _, text = part.partition("=")
        if key not in fields:
            raise SystemExit(f"variant {name!r}: {key!r} is not a PcimOptions field")
        default = getattr(DEFAULT, key)
        if text.lower() in ("none", "null") and not isinstance(default, str):
            kw[key] = None
        elif isinstance(default, bool):
            kw[key] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)):
            kw[key] = type(default)(text)
        else:
            kw[key] = text if isinstance(default, str) else float(text)
    return dataclasses.replace(DEFAULT, **kw)


def passes_per_map(opts: PcimOptions, steps_used: float) -> float:
    """Classifier passes (forward + backward of one image) per map: two per keep-delete step, one for the
    gradient init; the final no-grad evaluation and p(target | x) are not counted."""
    per_step = 2 if opts.objective == "keep-delete" else 1
    return per_step * steps_used * max(1, len(opts.budgets)) + (opts.init == "gradient")

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
    # the demo's 128 px fields through the max-pool CNN on 64 px tiles (3 x 3 tiles; benchmarks/field_maps.py)
    "demo-tiled": {"name": "demo", "tile": (64, 64)},
    # real nuclei, nuclear density in 3 classes (evidence = every nucleus, 5-30 % of a field), 160 px fields
    # tiled for a 64 px BatchNorm ResNet (mean-logit), and the same fields with the model on the whole field
    "density": {"name": "density"},
    "density-whole": {"name": "density", "whole": True},
    # demo fields with decoys that light every channel, which the classifier ignores (a MaxPoolNet trained on them)
    "distractor": {"name": "distractor"},
    # the same model on 256 px fields with 3-5 decoys: evidence 0.2-0.4 % of a field, decoys about twice that
    "distractor-256": {"name": "distractor", "size": 256, "decoys": (3, 5)},
    # ihc's fields with its (fully convolutional) model on the whole untiled field (model.aggregate: whole-field)
    "ihc-whole": {"name": "ihc", "tile": None},
}

#: --targets: `evidence` explains each field for the class its mask marks (the sets' positives);
#: `all` explains every field of every class (the sets' other classes join) for every class
TARGETS = ("evidence", "all")
#: the classes of each loader's fields with --targets all (a `confident` set: those of its base)
ALL_CLASSES = {"demo": (0, 1), "nuclei": (0, 1), "ihc": (0, 1, 2), "density": (0, 1, 2), "distractor": (0, 1)}


def load_set(name: str, n: int, targets: str = "evidence") -> dict:
    """The evaluation set `name` of SETS (n images); a `tile` in SETS cuts its fields into tiles of that
    size, explained and scored per field as pcim explain does (evalsets.tiled). targets `all`: n fields
    cycling through every class of the set, each explained for every class (`every_class`)."""
    spec = dict(SETS[name])
    untiled = "tile" in spec and spec["tile"] is None  # a tiled set's fields through the model untiled
    tile = spec.pop("tile", None)
    loader = spec.pop("name")
    if targets == "all":
        spec["classes"] = ALL_CLASSES[spec.get("base", "demo") if loader == "confident" else loader]
    data = evalsets.load(loader, n=n, **spec)
    if tile is not None:
        data["tile"] = tile
    if untiled:
        data.pop("tile", None)
        data["name"] += "-whole"
    return every_class(data) if targets == "all" else data


def every_class(data: dict) -> dict:
    """The set with each field once per class (field-major): x, y (the field's class), target, field (its
    index), and mask = the field's evidence mask where the target is one of the set's `evidence_classes`,
    empty otherwise (localisation scores are then NaN: nothing marks that class's evidence)."""
    k, b = len(data["classes"]), len(data["x"])
    y = data.get("y", data["target"])
    field = torch.arange(b).repeat_interleave(k)
    target = torch.arange(k).repeat(b)
    evidence = torch.tensor([int(t) in data.get("evidence_classes", [1]) for t in target])
    mask = data["mask"][field] & evidence[:, None, None]
    out = {**data, "x": data["x"][field], "target": target, "y": y[field], "field": field, "mask": mask}
    for key in ("labels", "x_null"):
        if key in data:
            out[key] = data[key][field]
    return out


def score_images(model, x, mask, target, maps) -> dict[str, torch.Tensor]:
    fine = torch.linspace(0, 0.2, 41)
    finest = torch.linspace(0, 0.02, 21)
    values = {
        "pointing_game": metrics.pointing_game(maps, mask),
        "pointing_game_3px": metrics.pointing_game(maps, mask, tolerance=3),
        "relevance_mass": metrics.relevance_mass(maps, mask),
        "pixel_auroc": metrics.pixel_auroc(maps, mask),
        "deletion_auc": metrics.deletion_auc(model, x, maps, target, fractions=fine),
        "deletion_fine": metrics.deletion_auc(model, x, maps, target, fractions=finest),
        # the same curve with pixels set to the channel's median (the background while the evidence covers
        # less than half of the field; the mean drifts towards large evidence: density)
        "deletion_median": metrics.deletion_auc(model, x, maps, target, fractions=fine, substrate="median"),
        "insertion_auc": metrics.insertion_auc(model, x, maps, target, substrate="blur"),
    }
    return values


def score(model, x, mask, target, maps) -> dict[str, float]:
    return metrics.summarize(score_images(model, x, mask, target, maps))


def run_method(name: str, data: dict, batch: int, per_image: list | None = None) -> dict[str, float]:
    """Mean scores of one method on one set; with `per_image`, one dict per image is appended to it. A set
    with a `tile` is explained and scored on the whole field through its tiles, as pcim explain does
    (evalsets.tiled)."""
    model, x, target = data["model"], data["x"], data["target"]
    t0 = time.perf_counter()
    extra = {}
    stats = []
    refit = REFITS.get(name)
    opts = None if name in BASELINES else refit[0] if refit else variant(name)
    scorer = TiledModel(model, data["tile"]) if "tile" in data else model
    channel = None
    if name == "intensity":  # one channel for the set, as pcim evaluate chooses it (on whole fields)
        channel = int(trivial.best_channel(scorer, x, target, per_image=False))

    def fit(m, xs, ts):
        if name in trivial.TRIVIAL:
            return attribute(m, xs, ts, name, dataclasses.replace(DEFAULT, intensity_channel=channel)).maps
        if name in BASELINES:
            return baselines.METHODS[name](m, xs, ts)
        if refit:
            res, budgets = fit_adaptive(m, xs, ts, opts, max_budget=refit[1])
            res.budget = budgets.to(res.prob_original.dtype)
            stats.append(res)
        else:
            stats.append(fit_pcim(m, xs, ts, opts))
        return stats[-1].maps

    if "tile" in data:  # as pcim explain does: one map per field through its tiles
        maps = field_maps(fit, model, x, target, data["tile"])
    else:
        maps = torch.cat([fit(model, x[i : i + batch], target[i : i + batch]) for i in range(0, len(x), batch)])
    seconds = (time.perf_counter() - t0) / len(x)
    values = score_images(scorer, x, data["mask"], target, maps)
    with torch.no_grad():
        p_orig = torch.cat([torch.softmax(scorer(x[i : i + batch]), 1).gather(1, target[i : i + batch, None])[:, 0]
                            for i in range(0, len(x), batch)])
    fit_rows = {"prob_original": p_orig}
    if stats:
        fit_rows.update(prob_kept=torch.cat([r.prob_mixed for r in stats]),
                        prob_deleted=torch.cat([r.prob_deleted for r in stats]),
                        steps=torch.cat([r.steps for r in stats]).float())
        if all(r.budget is not None for r in stats):
            fit_rows["budget"] = torch.cat([r.budget for r in stats])
        extra = {"p_keep": float(fit_rows["prob_kept"].mean()), "p_delete": float(fit_rows["prob_deleted"].mean()),
                 "steps_used": float(fit_rows["steps"].mean())}
        extra["passes"] = passes_per_map(opts, extra["steps_used"])
        fit_rows["zeros"] = (maps.sum(1).flatten(1) <= 0).float().mean(1)  # share of tied (zero) pixels
    if per_image is not None:
        y = data.get("y", target)
        for i in range(len(x)):
            row = {"image": i, "field": int(data["field"][i]) if "field" in data else i, "target": int(target[i]),
                   "class": data["classes"][int(target[i])], "y": int(y[i]), "evidence": bool(data["mask"][i].any()),
                   **{k: float(v[i]) for k, v in values.items()}, **{k: float(v[i]) for k, v in fit_rows.items()}}
            if stats:
                row["fit"] = fit_quality(row["prob_original"], row["prob_kept"], row["prob_deleted"])
            per_image.append(row)
    return {**metrics.summarize(values), "s_per_map": seconds, **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/formulations.csv")
    ap.add_argument("--targets", choices=TARGETS, default="evidence",
                    help="evidence: each field for its marked class; all: fields of every class, each for every "
                         "class (localisation scores only where a mask marks that class's evidence)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows, images = [], []
    for set_name in args.sets.split(","):
        data = load_set(set_name, args.n, args.targets)
        methods = [m for m in args.baselines.split(",") if m] + [v for v in args.variants.split(",") if v]
        for method in methods:
            per_image: list = []
            res = run_method(method, data, args.batch, per_image)
            rows.append({"set": set_name, "method": method, **res})
            images += [{"set": set_name, "method": method, **r} for r in per_image]
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # as it goes: long runs can be read early
            pd.DataFrame(images).to_csv(Path(args.out).with_suffix(".images.csv"), index=False)
            print(f"{set_name:18s} {method:24s} " + " ".join(
                f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    pd.DataFrame(images).to_csv(Path(args.out).with_suffix(".images.csv"), index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
