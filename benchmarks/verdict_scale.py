"""The stain verdict before and after issue 26, on every evaluation set and every class.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verdict_scale.py --n 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verdict_scale.py --sets ihc --adaptive 0.32
    .venv/bin/python benchmarks/verdict_scale.py --table

Per set, pcim's default maps of the evidence class on the positive fields and of the absence class
(negative / low) on the evidence-free twins (ihc: the `low` fields too), scored as `pcim evaluate`
scores them (fields larger than the model through their tiles), then:

- before: the verdict of pcim before issue 26: deletion AUC over the top 0-2 % and 0-20 % of pixels of
  the best trivial map against pcim's, share = the smaller ratio of the decision explained, every map
  judged whatever its fit (reproduced here from the release's engine/verdict.py);
- after: engine/verdict.py `judge`: the share of pixels whose deletion halves p(target), pcim's map
  against each trivial map, only maps whose PCIM_Fit holds evidence (ok / weak), no verdict otherwise.

Per-map numbers (labels, deletion curves, AUCs): benchmarks/results/verdict_scale[_<tag>].json, from which
`--table` makes the verdicts again without refitting; rows: verdict_scale[_<tag>].csv (one per set and
class); the markdown table the docs show: verdict_scale[_<tag>].md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absence_labels import ABSENCE_CLASS, SETS, load_fields  # noqa: E402
from evalsets.tiled import TiledModel  # noqa: E402

from pcim_cli.engine import absence as full_deletion  # noqa: E402
from pcim_cli.engine import budget, trivial, verdict  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FINE, COARSE = torch.linspace(0.0, 0.02, 21), torch.linspace(0.0, 0.2, 41)  # pcim evaluate's grids


def before(p0: float, ref: tuple[float, float], cands: dict[str, tuple[float, float]]) -> tuple[str, float, str]:
    """(level, share, best) of the verdict before issue 26 (engine/verdict.py `decide` of the release)."""
    best = min(cands, key=lambda k: (cands[k][0] + cands[k][1]) / 2)
    e_ref = [p0 - ref[0], p0 - ref[1]]
    e_t = [p0 - cands[best][0], p0 - cands[best][1]]
    if max(*e_ref, *e_t) < 0.05:
        return "none", float("nan"), best
    share = min(t / max(r, 1e-9) for t, r in zip(e_t, e_ref, strict=True))
    return ("detector" if share >= 0.9 else "partly" if share >= 0.5 else "more"), share, best


def run_set(set_name: str, n: int, batch: int, adaptive: float | None) -> list[dict]:
    """Per map: its class, PCIM_Fit label, budget, p(target), the deletion curves on trivial.HALVING of pcim's
    map and of every map without a model, and their deletion AUCs on pcim evaluate's grids (the verdict
    before issue 26). The verdicts are made from these in `judge_set`."""
    data = load_fields(set_name, n)
    model = data["model"]
    scorer = TiledModel(model, data["tile"]) if data.get("tile") is not None else model
    absence = ABSENCE_CLASS.get(set_name, 0)
    x = data["fields"]
    # the evidence class on its fields, the absence class on the evidence-free / low fields
    target = torch.tensor([c if k == "positive" else absence for c, k in zip(data["field_class"], data["kinds"],
                                                                                 strict=True)])
    opts = PcimOptions()
    labels, maps, budgets = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        xb, tb = x[i:i + batch], target[i:i + batch]
        seeds = torch.arange(i, i + len(xb))
        if adaptive:
            r, grown = budget.fit_adaptive(scorer, xb, tb, opts, seeds=seeds, max_budget=adaptive)
            budgets += [float(b) for b in grown]
        else:
            r = attribute(scorer, xb, tb, "pcim", opts, seeds=seeds)
            budgets += [float(b) for b in r.budget] if getattr(r, "budget", None) is not None else [None] * len(xb)
        full = full_deletion.full_deletion_probs(scorer, xb).gather(1, tb.view(-1, 1))[:, 0]
        labels += [verdict.fit_quality(*(float(v) for v in vals)) for vals in
                   zip(r.prob_original, r.prob_mixed, r.prob_deleted, full, strict=True)]
        maps.append(r.maps)
    maps = torch.cat(maps)
    cands = trivial.candidate_maps(x, opts, data["channels"])
    curves = trivial.deletion_curves(scorer, x, {"map": maps, **cands}, target, substrate=opts.delete_substrate,
                                     blur_sigma=opts.blur_sigma)
    aucs = trivial.deletion_aucs(scorer, x, {"map": maps, **cands}, target, FINE, COARSE)
    return [{"set": set_name, "class": data["classes"][int(target[i])], "label": labels[i], "budget": budgets[i],
             "prob_original": float(curves["map"][i, 0]), "adaptive": adaptive or "",
             "curves": {k: [float(v) for v in c[i]] for k, c in curves.items()},
             "aucs": {k: [float(a[0][i]), float(a[1][i])] for k, a in aucs.items()},
             "minutes": (time.perf_counter() - t0) / 60} for i in range(len(x))]


def judge_set(maps: list[dict]) -> list[dict]:
    """The verdicts before and after issue 26 of each class, from the per-map rows of `run_set`."""
    rows = []
    for cls in dict.fromkeys(m["class"] for m in maps):
        group = [m for m in maps if m["class"] == cls]
        names = [k for k in group[0]["aucs"] if k != "map"]
        mean = {k: tuple(sum(m["aucs"][k][j] for m in group) / len(group) for j in (0, 1)) for k in group[0]["aucs"]}
        p0 = sum(m["prob_original"] for m in group) / len(group)
        old = before(p0, mean["map"], {k: mean[k] for k in names})
        fits = Counter(m["label"] for m in group)
        checks = [verdict.check_from_curves(m["prob_original"], trivial.HALVING, m["curves"], m["budget"])
                  for m in group if m["label"] in verdict.JUDGED]
        new = verdict.judge(cls, "pcim", [c for c in checks if c is not None], fits)
        rows.append({"set": group[0]["set"], "class": cls, "maps": len(group),
                     "fits": ", ".join(f"{k} {v}" for k, v in fits.most_common()),
                     "before": old[0], "before_share": old[1], "before_best": old[2],
                     "after": new.level, "after_share": new.share, "after_best": new.trivial,
                     "after_reason": new.reason, "after_sentence": new.sentence,
                     "halving_pcim": new.halving.get("reference", float("nan")),
                     "halving_trivial": new.halving.get("trivial", float("nan")), "adaptive": group[0]["adaptive"]})
    return rows


def table(df: pd.DataFrame) -> str:
    out = ["| set | class | maps | PCIM_Fit | before: level (share, best trivial) | after: level (share, best trivial) "
           "| pixels to halve p: pcim / trivial (median) |", "|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        b = f"{r.before}" + (f" ({math.floor(100 * r.before_share)} %, {r.before_best})"
                             if r.before_share == r.before_share else "")
        a = (f"{r.after} ({r.after_share:.2f}, {r.after_best})" if r.after != "none"
             else f"no verdict ({r.after_reason})")
        h = (f"{100 * r.halving_pcim:.2g} % / {100 * r.halving_trivial:.2g} %" if r.after != "none" else "–")
        tag = f" (adaptive {r.adaptive})" if r.adaptive else ""
        out.append(f"| {r.set}{tag} | {r._2} | {r.maps} | {r.fits} | {b} | {a} | {h} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--adaptive", type=float, default=None, help="explain.adaptive_budget for pcim's maps")
    ap.add_argument("--tag", default="")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"verdict_scale{'_' + args.tag if args.tag else ''}.csv"
    raw_path = path.with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    if not args.table:
        for s in args.sets.split(","):
            raw[s] = run_set(s, args.n, args.batch, args.adaptive)
            raw_path.write_text(json.dumps(raw))
            print(f"{s}: {raw[s][-1]['minutes']:.1f} min", file=sys.stderr, flush=True)
    df = pd.DataFrame([row for maps in raw.values() for row in judge_set(maps)])
    df.to_csv(path, index=False)
    text = table(df)
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


