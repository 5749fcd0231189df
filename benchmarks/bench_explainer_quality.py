"""Levers on the amortised explainer's quality that keep its cost, on the evaluation sets, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_explainer_quality.py [--sets demo,nuclei-resnet,ihc]
        [--n 16] [--train-steps 300]

The explainer's maps lag the per-image fit in the finest ranking (deletion of the top 2 %) and in
pointing on some plates (issue 28). For every set an explainer is trained as benchmarks/amortised.py
trains it (fields the evaluation never sees, Trainer = what `pcim train-explainer` runs), and compared
with the per-image default on the set's evaluation fields:

- the explainer as trained;
- temperature: its logits multiplied by t (2, 4) before the maps are made (free at use; the objective
  was trained at t = 1, so this only reweighs the map against the contrast it is multiplied by);
- trained on the evaluation fields themselves ("the screen's own wells": `pcim train-explainer` on the
  plate it will explain), same steps;
- + 2 refine steps (for scale: each refine step costs about 6 classifier forwards, the amortised map 3).

Scores as benchmarks/amortised.py: pointing, relevance mass, pixel AUROC, deletion AUC (0-20 %, 0.5 %
steps) and fine deletion (top 2 %). Prints one table per set; writes
benchmarks/results/bench_explainer_quality.json.
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

import amortised  # noqa: E402
import evalsets  # noqa: E402
from compare_formulations import SETS  # noqa: E402
from evalsets.tiled import TiledModel  # noqa: E402

from pcim_cli.engine import explainer as ex  # noqa: E402
from pcim_cli.engine import metrics  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.report import evaluate as report_evaluate  # noqa: E402
from pcim_cli.run import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Tempered(torch.nn.Module):
    """An explainer whose logits are multiplied by t."""

    def __init__(self, net: torch.nn.Module, t: float):
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.t


def train(model, images, n_classes, opts, steps, crop, seed=0) -> tuple[torch.nn.Module, float]:
    t0 = time.perf_counter()
    trainer = ex.Trainer(model, images, n_classes, opts, ex.TrainOptions(steps=steps, seed=seed), crop=crop)
    for _ in range(steps):
        trainer.step()
    return trainer.net.eval(), time.perf_counter() - t0


def run_set(set_name: str, args) -> tuple[pd.DataFrame, dict]:
    spec = dict(SETS[set_name])
    data = evalsets.load(spec.pop("name"), n=args.n, **spec)
    model, x, target, tile = data["model"], data["x"], data["target"], data.get("tile")
    fields = [evaluate.EvalField("-", i, x[i], data["mask"][i]) for i in range(len(x))]
    scorer = TiledModel(model, tile) if tile is not None else model
    opts = PcimOptions()
    crop = tile or tuple(x.shape[-2:])
    k = len(data["classes"])
    held_out = list(amortised.training_images(set_name, args.train_n))
    net, secs = train(model, held_out, k, opts, args.train_steps, crop, args.seed)
    own, own_secs = train(model, list(x), k, opts, args.train_steps, crop, args.seed)
    info = {"set": set_name, "model": data["name"], "fields": len(x), "train_steps": args.train_steps,
            "train_seconds": round(secs, 1), "own_train_seconds": round(own_secs, 1)}
    methods = [(f"per-image default ({opts.steps} steps)", "pcim", opts, None),
               ("amortised", "pcim-amortised", opts, net),
               ("amortised, t = 2", "pcim-amortised", opts, Tempered(net, 2.0)),
               ("amortised, t = 4", "pcim-amortised", opts, Tempered(net, 4.0)),
               ("amortised, trained on these fields", "pcim-amortised", opts, own),
               ("amortised + 2 refine", "pcim-amortised", dataclasses.replace(opts, refine_steps=2), net)]
    rows = []
    for label, method, o, explainer in methods:
        t1 = time.process_time()
        maps = amortised.maps_of(model, x, target, method, o, args.batch, explainer, tile)
        cpu = (time.process_time() - t1) / len(x)
        scores, _ = evaluate.score_maps(scorer, x, target, maps, fields)
        fine = metrics.perturbation_curve(scorer, x, maps, target, "deletion", fractions=amortised.FINE)
        scores["deletion_2pct"] = metrics.curve_auc(fine, amortised.FINE).tolist()
        rows += [{"method": label, **{k2: v[i] for k2, v in scores.items()}, "s_per_map": cpu} for i in range(len(x))]
        print(f"{set_name}: {label}: {cpu:.3f} CPU s/map", file=sys.stderr, flush=True)
    return evaluate.mean_table(pd.DataFrame(rows), [m[0] for m in methods]), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="demo,nuclei-resnet,ihc")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=ex.TrainOptions().steps, help="as `pcim train-explainer`")
    ap.add_argument("--train-n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="the explainers' training seed (initial weights, crops)")
    ap.add_argument("--out", default="bench_explainer_quality.json", help="file name under benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict = {"settings": vars(args), "sets": {}}
    for name in args.sets.split(","):
        table, info = run_set(name, args)
        report["sets"][name] = {**info, "table": json.loads(table.to_json(orient="records"))}
        print(f"\n**{name}** ({info['model']}, {info['fields']} fields; explainers trained {info['train_steps']} "
              f"steps: {info['train_seconds']:.0f} s, on these fields {info['own_train_seconds']:.0f} s)\n", flush=True)
        print(report_evaluate.markdown_table(table), flush=True)
        (RESULTS / args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
