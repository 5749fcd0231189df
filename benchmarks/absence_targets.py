"""What does a user learn from the map of a class that is an absence? (issue 26, item 2)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/absence_targets.py --n 8
    .venv/bin/python benchmarks/absence_targets.py --table

A field called `negative` (ihc: `low`) rests on what is missing. Its user asks "why negative?", and a
useful answer shows the candidates the model looked at and found wanting: above all a positive cell the
model missed. So this measures, on fields that the model calls negative but that hold WEAK true evidence
(near misses: the evidence-free twin plus a share t of the evidence, `x_null + t (x - x_null)`, the
largest t of 0.7, 0.5, 0.35, 0.25 that the model still calls negative; ihc: `low` fields and their
islands of DAB), how well each candidate map points at that evidence:

- `own`: pcim's map of the class called (negative / low): what explain.target: predicted makes today;
- `contrastive`: pcim's map of the runner-up class (mitotic / medium) on the same field: "why negative
  and not mitotic": the positive class's evidence and where it is missing;
- `contrast`: |x - channel mean| (no model), for scale.

Scores: pointing game and relevance mass on the weak evidence's mask, and the maps' PCIM_Fit labels.
Rows: benchmarks/results/absence_targets.csv; table: absence_targets.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evalsets  # noqa: E402
from absence_labels import SETS  # noqa: E402
from evalsets.tiled import TiledModel  # noqa: E402

from pcim_cli.engine import metrics, verdict  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHARES = (0.7, 0.5, 0.35, 0.25)


@torch.no_grad()
def _probs(model, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([torch.softmax(model(x[i:i + batch]), 1) for i in range(0, len(x), batch)])


def near_misses(set_name: str, n: int):
    """(fields, masks, absence class, runner-up class, scorer, t per field) of fields called negative that hold
    weak evidence."""
    spec = dict(SETS[set_name])
    name = spec.pop("name")
    if set_name == "ihc":
        data = evalsets.load("ihc", n=n, classes=(0,))
        scorer = TiledModel(data["model"], data["tile"])
        p = _probs(scorer, data["x"])
        keep = (p.argmax(1) == 0) & data["mask"].flatten(1).any(1)
        return data["x"][keep], data["mask"][keep], 0, 1, scorer, torch.zeros(int(keep.sum()))
    data = evalsets.load(name, n=n, **spec)
    scorer = data["model"]
    x, xn = data["x"], data["x_null"]
    chosen = torch.full((len(x),), float("nan"))
    out = xn.clone()
    for t in sorted(SHARES):  # the largest share still called negative wins
        xt = xn + t * (x - xn)
        neg = _probs(scorer, xt).argmax(1) == 0
        out[neg] = xt[neg]
        chosen[neg] = t
    keep = ~torch.isnan(chosen)
    return out[keep], data["mask"][keep], 0, 1, scorer, chosen[keep]


def run_set(set_name: str, n: int, batch: int) -> pd.DataFrame:
    x, mask, absence, runner_up, scorer, shares = near_misses(set_name, n)
    opts = PcimOptions()
    rows = []
    if not len(x):
        return pd.DataFrame()
    full = torch.cat([absence.full_deletion_probs(scorer, x[i:i + batch]) for i in range(0, len(x), batch)])
    for kind, cls in (("own", absence), ("contrastive", runner_up), ("contrast", runner_up)):
        target = torch.full((len(x),), cls, dtype=torch.long)
        for i in range(0, len(x), batch):
            sl = slice(i, i + batch)
            method = "contrast" if kind == "contrast" else "pcim"
            r = attribute(scorer, x[sl], target[sl], method, opts, seeds=torch.arange(i, min(i + batch, len(x))))
            point = metrics.pointing_game(r.maps, mask[sl])
            mass = metrics.relevance_mass(r.maps, mask[sl])
            for j in range(len(r.maps)):
                f = i + j
                label = verdict.fit_quality(float(r.prob_original[j]), float(r.prob_mixed[j]),
                                           float(r.prob_deleted[j]), float(full[f, cls]))
                rows.append({"set": set_name, "field": f, "t": float(shares[f]), "map": kind,
                             "target_index": cls, "prob_original": float(r.prob_original[j]),
                             "pointing": float(point[j]), "mass": float(mass[j]), "label": label,
                             "mask_share": float(mask[f].float().mean())})
    print(f"{set_name}: {len(x)} near misses", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> str:
    out = ["| set | near misses | map | pointing | mass | mask share | labels |", "|---|---|---|---|---|---|---|"]
    for (s, kind), g in df.groupby(["set", "map"], sort=False):
        labels = ", ".join(f"{k} {v}" for k, v in g["label"].value_counts().items() if k)
        out.append(f"| {s} | {len(g)} | {kind} | {g['pointing'].mean():.2f} | {g['mass'].mean():.3f} | "
                   f"{g['mask_share'].mean():.3f} | {labels or '–'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "absence_targets.csv"
    if not args.table:
        old = pd.read_csv(path) if path.exists() else pd.DataFrame()
        for s in args.sets.split(","):
            df = run_set(s, args.n, args.batch)
            old = pd.concat([old[old["set"] != s] if len(old) else old, df])
            old.to_csv(path, index=False)
    text = table(pd.read_csv(path))
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
