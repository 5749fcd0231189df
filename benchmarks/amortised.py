"""Amortised PCIM against the per-image fit on the evaluation sets (benchmarks/evalsets), in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortised.py                       # every set, ~1 h here
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amortised.py --sets demo --train-steps 100 --n 8   # minutes

For every set an explainer is trained (engine.explainer.Trainer, the code `pcim train-explainer` runs)
on fields the evaluation never sees: the demo generator with another seed for demo / demo-resnet, crops
of the training region (left 3/4 of the image) for the nuclei sets, 176 px fields of the training region
for ihc (64 px crops: the model's input), every class. The set's own 16
evaluation fields (positive, with masks of the true evidence) are then explained by

- the per-image fit: 300 steps at lr 0.1 (the default until issue 14) and PcimOptions() (today's default);
- the explainer alone (pcim-amortised) and refined by N steps (`refine_steps`, at `refine_lr`);
- the per-image fit with as many steps as the largest refine, from zero (same cost, no explainer);
- the untrained explainer (control: is the learning real?); optionally saliency and integrated gradients;

and every map is scored as `pcim evaluate` scores it (ihc: tile by tile, stitched, scored on the whole
field with the tiles' mean probability, evalsets.tiled) (pointing, relevance mass, pixel AUROC, deletion AUC
over the top 20 % in 0.5 % steps, ...). Seconds per map are measured in the same run, batch 8, one thread.
`--plate-explainer` also trains on the bundled demo plate (sample_plates/demo, 19 of its 24 wells,
through run.train: the CLI's code path) and scores that explainer on the demo set: another plate.

Goals (issue 14): amortised >= 50x fewer seconds per map than the per-image default at >= 90 % of its
quality (deletion AUC, relevance mass, pixel AUROC; for deletion, lower is better, so the ratio is
per-image / amortised), and with refine <= 20 steps at least its quality at >= 10x less cost. Writes
benchmarks/results/amortised_<set>.csv and benchmarks/results/amortised.json; prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evalsets  # noqa: E402
from compare_formulations import SETS  # noqa: E402
from evalsets import _common  # noqa: E402
from evalsets.tiled import TiledModel, per_tile_maps  # noqa: E402

from pcim_cli.engine import explainer as ex  # noqa: E402
from pcim_cli.engine import metrics  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.report import evaluate as evaluate_report  # noqa: E402
from pcim_cli.run import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUALITY = ("deletion_auc", "relevance_mass", "pixel_auroc")
#: deletion AUC over the top 2 % only (0.5 % steps): is the evidence deleted first? (the 0-20 % AUC also
#: scores what the map ranks after the evidence; broad low-level support can bring p(target) back there)
FINE = torch.linspace(0.0, 0.02, 5)
evaluate.COLUMNS = {**{k: v for k, v in evaluate.COLUMNS.items() if k != "s_per_map"},
                    "deletion_2pct": "deletion 2%", "s_per_map": "s/map"}
evaluate.DIRECTIONS = {**evaluate.DIRECTIONS, "deletion_2pct": "lower"}


def training_images(set_name: str, n: int, size: int = 128) -> torch.Tensor:
    """Fields the evaluation never sees, every class (the explainer trains on whatever the plate holds)."""
    base = SETS[set_name].get("base", SETS[set_name]["name"])
    if base == "demo":
        x, _, _ = _common.demo_module().make_dataset(n, 11, size)
        return x
    if base == "ihc":  # whole 176 px fields of the training region; the trainer cuts 64 px crops
        from evalsets.ihc import FIELD, make_set

        return make_set(n, 31, FIELD, "train", classes=(0, 1, 2))[0]
    from evalsets.nuclei import make_set

    return make_set(n, 21, size, "train")[0]


def maps_of(model, x, target, method, opts, batch, explainer=None, tile=None):
    """Maps of every field; with a `tile`, explained tile by tile and stitched (as pcim's worker does)."""
    if tile is not None:
        return per_tile_maps(lambda m, xs, ts: attribute(m, xs, ts, method, opts, explainer=explainer).maps,
                             model, x, target, tile, batch)
    return torch.cat([attribute(model, x[i : i + batch], target[i : i + batch], method, opts,
                                seeds=torch.arange(i, min(i + batch, len(x))), explainer=explainer).maps
                      for i in range(0, len(x), batch)])


def plate_explainer(steps: int, out: Path) -> dict:
    """An explainer trained on the bundled demo plate through run.train (what the CLI runs), written to out."""
    from pcim_cli.config import load_config
    from pcim_cli.run import train

    cfg = load_config(_common.DEMO_DIR / "plate.yaml")
    result = train.train_explainer([cfg], out, train.settings({"steps": steps}, {}), fresh=True)
    return result.meta


def run_set(set_name: str, args, net: torch.nn.Module | None = None, net_label: str = "") -> tuple[pd.DataFrame, dict]:
    """The comparison on one set; `net`: use this explainer (e.g. trained on the demo plate) instead of
    training one on the set's training images."""
    spec = dict(SETS[set_name])
    data = evalsets.load(spec.pop("name"), n=args.n, **spec)
    model, x, target, tile = data["model"], data["x"], data["target"], data.get("tile")
    fields = [evaluate.EvalField("-", i, x[i], data["mask"][i]) for i in range(len(x))]
    scorer = TiledModel(model, tile) if tile is not None else model  # whole fields: tiles' mean probability
    opts = PcimOptions()
    info = {"set": set_name, "model": data["name"], "fields": len(x), "train_steps": args.train_steps}
    if net is None:
        topts = ex.TrainOptions(steps=args.train_steps)
        images = list(training_images(set_name, args.train_n))
        t0 = time.perf_counter()
        trainer = ex.Trainer(model, images, len(data["classes"]), opts, topts, crop=tile or tuple(x.shape[-2:]))
        for _ in range(topts.steps):
            trainer.step()
        net = trainer.net.eval()
        torch.save(net.state_dict(), RESULTS / f"amortised_{set_name}_explainer.pt")  # to look at later
        info.update(train_images=len(images), train_seconds=round(time.perf_counter() - t0, 1),
                    train_objective_first_last=[trainer.losses[0], float(sum(trainer.losses[-20:]) / 20)])
    else:
        info.update(explainer=net_label)
    untrained = ex.make_explainer(x.shape[1], len(data["classes"]), opts, net.width, seed=ex.TrainOptions().seed).eval()
    refine = [int(n) for n in args.refine.split(",") if n]
    old = dataclasses.replace(opts, steps=300, lr=0.1)
    methods: list[tuple[str, str, PcimOptions, object]] = [("per-image 300 steps, lr 0.1", "pcim", old, None)]
    if opts != old:
        methods.append((f"per-image default ({opts.steps} steps)", "pcim", opts, None))
    methods.append(("amortised", "pcim-amortised", opts, net))
    methods += [(f"amortised + {n} refine", "pcim-amortised",
                 dataclasses.replace(opts, refine_steps=n, refine_lr=args.refine_lr), net) for n in refine]
    if refine:
        methods.append((f"per-image {max(refine)} steps from zero", "pcim",
                        dataclasses.replace(opts, steps=max(refine), lr=args.refine_lr), None))
    methods.append(("untrained explainer (control)", "pcim-amortised", opts, untrained))
    if getattr(args, "plate_explainer", False) and set_name == "demo":
        from pcim_cli.io.explainer import load_explainer

        meta = plate_explainer(args.train_steps, RESULTS / "demo_plate_explainer.pt")
        plate_net = load_explainer(RESULTS / "demo_plate_explainer.pt").module
        info["plate_explainer_train_seconds"] = meta["training"]["train_seconds"]
        methods.append(("amortised, trained on the demo plate", "pcim-amortised", opts, plate_net))
    if args.baselines:
        methods += [("saliency", "saliency", opts, None), ("integrated-gradients", "integrated-gradients", opts, None)]
    rows = []
    for label, method, o, explainer in methods:
        t1 = time.perf_counter()
        maps = maps_of(model, x, target, method, o, args.batch, explainer, tile)
        seconds = (time.perf_counter() - t1) / len(x)
        scores, _ = evaluate.score_maps(scorer, x, target, maps, fields)
        fine = metrics.perturbation_curve(scorer, x, maps, target, "deletion", fractions=FINE)
        scores["deletion_2pct"] = metrics.curve_auc(fine, FINE).tolist()
        rows += [{"method": label, **{k: v[i] for k, v in scores.items()}, "s_per_map": seconds} for i in range(len(x))]
        print(f"{set_name}: {label}: {seconds:.3f} s/map", file=sys.stderr, flush=True)
    table = evaluate.mean_table(pd.DataFrame(rows), [m[0] for m in methods])
    return table, info


def goals(table: pd.DataFrame) -> list[dict]:
    """Speed-up and quality ratios of each amortised row against the per-image default."""
    ref_label = next(m for m in table["method"] if m.startswith("per-image default")) \
        if any(m.startswith("per-image default") for m in table["method"]) else "per-image 300 steps, lr 0.1"
    ref = table.set_index("method").loc[ref_label]
    out = []
    for _, row in table.iterrows():
        if not row["method"].startswith("amortised"):
            continue
        ratio = {"deletion_auc": ref["deletion_auc"] / row["deletion_auc"],
                 "relevance_mass": row["relevance_mass"] / ref["relevance_mass"],
                 "pixel_auroc": row["pixel_auroc"] / ref["pixel_auroc"]}
        out.append({"method": row["method"], "vs": ref_label, "speedup": ref["s_per_map"] / row["s_per_map"],
                    **{f"quality_{k}": v for k, v in ratio.items()}, "min_quality": min(ratio.values())})
    return out


def describe(info: dict, table: pd.DataFrame, goal_rows: list[dict]) -> str:
    how = (f"explainer trained {info['train_steps']} steps on {info['train_images']} other fields in "
           f"{info['train_seconds']:.0f} s" if "train_seconds" in info else f"explainer: {info.get('explainer')}")
    lines = [f"\n**{info['set']}** ({info['model']}, {info['fields']} fields; {how})\n",
             evaluate_report.markdown_table(table)]
    for g in goal_rows:
        lines.append(f"  {g['method']}: {g['speedup']:.0f}x faster than {g['vs']}, quality ratios deletion "
                     f"{g['quality_deletion_auc']:.2f} mass {g['quality_relevance_mass']:.2f} AUROC "
                     f"{g['quality_pixel_auroc']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="demo,demo-resnet,nuclei,nuclei-resnet,nuclei-confident,ihc")
    ap.add_argument("--n", type=int, default=16, help="evaluation fields per set")
    ap.add_argument("--train-steps", type=int, default=ex.TrainOptions().steps)
    ap.add_argument("--train-n", type=int, default=256, help="training fields per set")
    ap.add_argument("--refine", default="5,10,20", help="refine steps to compare (comma-separated)")
    ap.add_argument("--refine-lr", type=float, default=PcimOptions().refine_lr)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--baselines", action="store_true", help="also saliency and integrated gradients")
    ap.add_argument("--plate-explainer", action="store_true", help="also an explainer trained on the demo plate")
    ap.add_argument("--out", default=str(RESULTS / "amortised.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args), "torch": torch.__version__, "sets": {}}
    for set_name in args.sets.split(","):
        table, info = run_set(set_name, args)
        table.to_csv(RESULTS / f"amortised_{set_name}.csv", index=False)
        report["sets"][set_name] = {**info, "table": json.loads(table.to_json(orient="records")),
                                    "goals": goals(table)}
        print(describe(info, table, report["sets"][set_name]["goals"]), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
