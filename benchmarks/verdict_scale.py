"""The stain verdict before and after issue 26, on every evaluation set and every class.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verdict_scale.py --n 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verdict_scale.py --sets ihc --adaptive 0.32
    .venv/bin/python benchmarks/verdict_scale.py --table

Per set, pcim's default maps of the evidence class on the positive fields and of the absence class
(negative / low) on the evidence-free twins (ihc: the `low` fields too), scored as `pcim evaluate`
scores them (fields larger than the model through their tiles), then:

- before: the verdict of pcim before issue 26: deletion AUC over the top 0-2 % and 0-20 % of pixels of
  the best trivial map against pcim's, share = the smaller ratio of the decision explained, every map
  judged whatever its fit (reproduced here from the release's report/verdict.py);
- after: report/verdict.py `judge`: the share of pixels whose deletion halves p(target), pcim's map
  against each trivial map, only maps whose PCIM_Fit holds evidence (ok / weak), no verdict otherwise.

Rows: benchmarks/results/verdict_scale[_<tag>].csv (one per set and class); the markdown table the docs
show: verdict_scale[_<tag>].md.
"""

from __future__ import annotations

import argparse
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

from pcim_cli.engine import budget, trivial  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.report import verdict  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FINE, COARSE = torch.linspace(0.0, 0.02, 21), torch.linspace(0.0, 0.2, 41)  # pcim evaluate's grids


def before(p0: float, ref: tuple[float, float], cands: dict[str, tuple[float, float]]) -> tuple[str, float, str]:
    """(level, share, best) of the verdict before issue 26 (report/verdict.py `decide` of the release)."""
    best = min(cands, key=lambda k: (cands[k][0] + cands[k][1]) / 2)
    e_ref = [p0 - ref[0], p0 - ref[1]]
    e_t = [p0 - cands[best][0], p0 - cands[best][1]]
    if max(*e_ref, *e_t) < 0.05:
        return "none", float("nan"), best
    share = min(t / max(r, 1e-9) for t, r in zip(e_t, e_ref, strict=True))
    return ("detector" if share >= 0.9 else "partly" if share >= 0.5 else "more"), share, best


def run_set(set_name: str, n: int, batch: int, adaptive: float | None) -> list[dict]:
    data = load_fields(set_name, n)
    model = data["model"]
    scorer = TiledModel(model, data["tile"]) if data.get("tile") is not None else model
    absence = ABSENCE_CLASS.get(set_name, 0)
    x = data["fields"]
    # the evidence class on its fields, the absence class on the evidence-free / low fields
    target = torch.tensor([c if k == "positive" else absence for c, k in zip(data["field_class"], data["kinds"],
                                                                                 strict=True)])
    opts = PcimOptions()
    labels, maps = [], []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        xb, tb = x[i:i + batch], target[i:i + batch]
        seeds = torch.arange(i, i + len(xb))
        if adaptive:
            r, _ = budget.fit_adaptive(scorer, xb, tb, opts, seeds=seeds, max_budget=adaptive)
        else:
            r = attribute(scorer, xb, tb, "pcim", opts, seeds=seeds)
        full = budget.full_deletion_probs(scorer, xb, opts).gather(1, tb.view(-1, 1))[:, 0]
        labels += [budget.fit_quality(*(float(v) for v in vals)) for vals in
                   zip(r.prob_original, r.prob_mixed, r.prob_deleted, full, strict=True)]
        maps.append(r.maps)
    maps = torch.cat(maps)
    cands = trivial.candidate_maps(x, opts, data["channels"])
    curves = trivial.deletion_curves(scorer, x, {"map": maps, **cands}, target)
    aucs = trivial.deletion_aucs(scorer, x, {"map": maps, **cands}, target, FINE, COARSE)
    with torch.no_grad():
        p0 = torch.cat([torch.softmax(scorer(x[i:i + batch]), 1) for i in range(0, len(x), batch)])
    p0 = p0.gather(1, target.view(-1, 1))[:, 0]
    rows = []
    for t in sorted(set(target.tolist())):
        idx = [i for i in range(len(x)) if int(target[i]) == t]
        sel = torch.tensor(idx)
        old = before(float(p0[sel].mean()), tuple(float(a[sel].mean()) for a in aucs["map"]),
                     {k: tuple(float(a[sel].mean()) for a in v) for k, v in aucs.items() if k != "map"})
        fits = Counter(labels[i] for i in idx)
        checks = [verdict.check_from_curves(float(p0[i]), trivial.HALVING, {k: c[i] for k, c in curves.items()})
                  for i in idx if labels[i] in budget.JUDGED]
        checks = [c for c in checks if c is not None]
        new = verdict.judge(data["classes"][t], "pcim", checks, fits)
        rows.append({"set": set_name, "class": data["classes"][t], "maps": len(idx),
                     "fits": ", ".join(f"{k} {v}" for k, v in fits.most_common()),
                     "before": old[0], "before_share": old[1], "before_best": old[2],
                     "after": new.level, "after_share": new.share, "after_best": new.trivial,
                     "after_reason": new.reason, "after_sentence": new.sentence,
                     "halving_pcim": new.halving.get("reference", float("nan")),
                     "halving_trivial": new.halving.get("trivial", float("nan")),
                     "adaptive": adaptive or "", "minutes": (time.perf_counter() - t0) / 60})
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
    if not args.table:
        old = pd.read_csv(path, keep_default_na=False) if path.exists() else pd.DataFrame()
        for s in args.sets.split(","):
            rows = pd.DataFrame(run_set(s, args.n, args.batch, args.adaptive))
            old = pd.concat([old[old["set"] != s] if len(old) else old, rows])
            old.to_csv(path, index=False)
            print(f"{s}: {rows['minutes'].iloc[-1]:.1f} min", file=sys.stderr, flush=True)
    df = pd.read_csv(path, keep_default_na=False)
    for col in ("before_share", "after_share", "halving_pcim", "halving_trivial"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    text = table(df)
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


