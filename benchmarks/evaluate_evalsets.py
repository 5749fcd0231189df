"""The `pcim evaluate` comparison on the evaluation sets with known evidence (benchmarks/evalsets).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate_evalsets.py --sets nuclei,nuclei-resnet --n 16

Every method of `explain.method` with its default settings, scored exactly as `pcim evaluate` scores a
plate (pcim_cli/report/evaluate.py), including the randomised-model sanity check (`--no-sanity` skips it)
and, since every set has object labels, the object ranking of plate.objects (report/object_ranking.py).
Prints one markdown table per set and writes benchmarks/results/evaluate_<set>.csv.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate_evalsets.py --sets demo,demo-resnet,nuclei,nuclei-resnet \
        --n 16 --no-sanity --tag objects                     # the object ranking figures of the README
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evalsets  # noqa: E402
from compare_formulations import SETS  # noqa: E402
from evalsets.tiled import TiledModel, field_maps  # noqa: E402

from pcim_cli.engine import metrics  # noqa: E402
from pcim_cli.engine.attribute import METHODS, attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.report import evaluate, object_ranking  # noqa: E402


def maps_of(model, x, target, method, opts, batch, tile=None):
    """Maps of every field; with a `tile`, one map per field through its tiles (as pcim explain does)."""
    if tile is not None:
        return field_maps(lambda m, xs, ts: attribute(m, xs, ts, method, opts).maps, model, x, target, tile)
    return torch.cat([attribute(model, x[i : i + batch], target[i : i + batch], method, opts,
                                seeds=torch.arange(i, min(i + batch, len(x)))).maps
                      for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="nuclei,nuclei-resnet")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-sanity", action="store_true", help="skip the randomised-model check (half the time)")
    ap.add_argument("--tag", default="", help="suffix of the result files, evaluate_<set>[_<tag>].csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    opts = PcimOptions()
    for set_name in args.sets.split(","):
        spec = dict(SETS[set_name])
        data = evalsets.load(spec.pop("name"), n=args.n, **spec)
        model, x, target, tile = data["model"], data["x"], data["target"], data.get("tile")
        fields = [evaluate._Field("-", i, x[i], data["mask"][i]) for i in range(len(x))]
        rand = None if args.no_sanity else evaluate.randomized_copy(model, seed=0)
        scorer = TiledModel(model, tile) if tile is not None else model  # whole fields through their tiles
        objects = None
        if "labels" in data:
            objects = object_ranking.ObjectScorer(scorer, x, target, list(data["labels"]), list(data["mask"]), opts,
                                                  batch_size=args.batch)
        rows = []
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            maps = maps_of(model, x, target, method, opts, args.batch, tile)
            seconds = (time.perf_counter() - t0) / len(x)
            scores, _ = evaluate._score(scorer, x, target, maps, fields)
            if rand is not None:
                scores["randomisation_spearman"] = metrics.spearman(
                    maps, maps_of(rand, x, target, method, opts, args.batch, tile), support="union").tolist()
            if objects is not None:
                scores.update(objects.scores(maps))
            rows += [{"method": method, **{k: v[i] for k, v in scores.items()}, "s_per_map": seconds}
                     for i in range(len(x))]
            print(f"{set_name} {method} done ({seconds:.2f} s/map)", file=sys.stderr, flush=True)
        table = evaluate._table(pd.DataFrame(rows), args.methods.split(","))
        Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
        table.to_csv(f"benchmarks/results/evaluate_{set_name}{'_' + args.tag if args.tag else ''}.csv", index=False)
        print(f"\n**{set_name}** ({data['name']}, {len(x)} fields)\n\n{evaluate.markdown_table(table)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
