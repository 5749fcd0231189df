"""Every class's map of every field, on every evaluation set: the numbers behind PCIM_Fit's labels.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/absence_labels.py --n 8            # every set
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/absence_labels.py --sets demo --n 16
    .venv/bin/python benchmarks/absence_labels.py --table                            # tables only

For each set: its positive fields (`x`) and the same fields with the evidence removed (`x_null`, a field
of the other class; ihc: also `low` fields with their few islands), explained with pcim's default fit
for EVERY class of the model (explain.target: all), fields larger than the model through their tiles
(evalsets.tiled) as pcim explain does. Per map: p(target) of the field, of the kept and the deleted
image (the fit's record), of the fully deleted image (every pixel at the deletion substrate: the
channel mean; the label test of engine/absence.py) and, for comparison, of the fully blurred image; the
label PCIM_Fit gives (engine/verdict.py `fit_quality`) and the one it gave before issue 26 (ok / weak /
failed); and the truth of the map:

- `evidence`: the class the field's evidence supports (mitotic on a positive field; ihc: the field's
  own class when medium or high): deleting the evidence removes the class;
- `absence`: the class that means "no evidence" (negative, ihc low) on any field: it rests on what is
  missing;
- `other`: a class the field does not belong to that is not the absence class (mitotic on a negative
  field; ihc: medium on a high field, high on a low one, ...).

Per-map rows go to benchmarks/results/absence_labels.csv, the label-by-truth tables (every set, every
class) to absence_labels.md (docs/verdicts.md shows them).
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
from compare_formulations import SETS as BASE_SETS  # noqa: E402
from evalsets.tiled import TiledModel  # noqa: E402

from pcim_cli.engine import mixing, verdict  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions, deletion_contrast  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: the sets scored: compare_formulations' sets with their models, plus the distractor set
SETS = {k: v for k, v in BASE_SETS.items() if k not in ("nuclei-256", "demo-tiled")}
#: the class that means "no evidence" in every set (index)
ABSENCE_CLASS = {"ihc": 0}


def load_fields(set_name: str, n: int) -> dict:
    """The set's positive fields, their evidence-free twins and (ihc) low fields, with a truth per field."""
    spec = dict(SETS[set_name])
    name = spec.pop("name")
    data = evalsets.load(name, n=n, **spec)
    x = [data["x"], data["x_null"]]
    kinds = ["positive"] * len(data["x"]) + ["evidence-free"] * len(data["x_null"])
    field_class = data["target"].tolist() + [ABSENCE_CLASS.get(set_name, 0)] * len(data["x_null"])
    if set_name == "ihc":  # low fields keep a few islands of DAB
        low = evalsets.load("ihc", n=max(2, n // 2), classes=(0,))
        x.append(low["x"])
        kinds += ["low"] * len(low["x"])
        field_class += [0] * len(low["x"])
    data["fields"] = torch.cat(x)
    data["kinds"] = kinds
    data["field_class"] = field_class
    return data


def truth(set_name: str, field_class: int, target: int) -> str:
    absence = ABSENCE_CLASS.get(set_name, 0)
    if target == absence:
        return "absence"
    return "evidence" if target == field_class else "other"


#: the label tests compared: the fully deleted image (every pixel at the channel mean: PCIM_Fit's test), the
#: field at its per-channel median, the fully blurred one, and the field with its top 16 / 32 / 50 % of
#: pixels by contrast |x - mean| deleted
TESTS = ("full_mean", "full_median", "full_blur", "contrast16", "contrast32", "contrast50")


@torch.no_grad()
def test_probs(model, x: torch.Tensor, opts: PcimOptions) -> dict[str, torch.Tensor]:
    """Class probabilities (B, K) of each label test's image."""
    out = {kind: torch.softmax(model(mixing.substrate(x, sub, opts.blur_sigma).contiguous()), 1)
           for kind, sub in (("full_mean", "mean"), ("full_blur", "blur"))}
    median = x.flatten(2).median(dim=2).values[..., None, None].expand_as(x).contiguous()
    out["full_median"] = torch.softmax(model(median), 1)
    contrast = deletion_contrast(x, opts)
    for share in (16, 32, 50):
        curve_x = _delete_top(x, contrast, share / 100)
        out[f"contrast{share}"] = torch.softmax(model(curve_x), 1)
    return out


def _delete_top(x: torch.Tensor, score: torch.Tensor, share: float) -> torch.Tensor:
    """x with its top `share` of pixels by score (B, 1, H, W) set to the channel mean."""
    flat = score.flatten(1)
    k = max(1, int(round(share * flat.shape[1])))
    thresh = flat.topk(k, dim=1).values[:, -1:]
    top = (flat >= thresh).view_as(score).to(x.dtype)
    return x * (1 - top) + x.mean(dim=(2, 3), keepdim=True) * top


def run_set(set_name: str, n: int, batch: int) -> pd.DataFrame:
    data = load_fields(set_name, n)
    model = data["model"]
    scorer = TiledModel(model, data["tile"]) if data.get("tile") is not None else model
    opts = PcimOptions()
    x = data["fields"]
    with torch.no_grad():
        probs = torch.cat([torch.softmax(scorer(x[i:i + batch]), 1) for i in range(0, len(x), batch)])
    full = [test_probs(scorer, x[i:i + batch], opts) for i in range(0, len(x), batch)]
    full = {k: torch.cat([f[k] for f in full]) for k in TESTS}
    k = probs.shape[1]
    rows = []
    t0 = time.perf_counter()
    for t in range(k):
        target = torch.full((len(x),), t, dtype=torch.long)
        for i in range(0, len(x), batch):
            sl = slice(i, i + batch)
            seeds = torch.arange(i, min(i + batch, len(x))) + 1000 * t
            r = attribute(scorer, x[sl], target[sl], "pcim", opts, seeds=seeds)
            for j in range(len(r.prob_original)):
                f = i + j
                p0, pk, pd_ = (float(r.prob_original[j]), float(r.prob_mixed[j]), float(r.prob_deleted[j]))
                rows.append({
                    "set": set_name, "field": f, "kind": data["kinds"][f], "field_class": data["field_class"][f],
                    "target": data["classes"][t], "target_index": t,
                    "predicted": data["classes"][int(probs[f].argmax())], "classes": k,
                    "truth": truth(set_name, data["field_class"][f], t),
                    "prob_original": p0, "prob_mixed": pk, "prob_deleted": pd_,
                    **{f"prob_{k}": float(full[k][f, t]) for k in TESTS},
                    "label": verdict.fit_quality(p0, pk, pd_, min(float(full["full_mean"][f, t]),
                                                                 float(full["full_median"][f, t]))),
                    "label_before": _label_before(p0, pk, pd_),
                })
    print(f"{set_name}: {len(rows)} maps in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def _label_before(p0: float, pk: float, pd_: float) -> str:
    """PCIM_Fit before issue 26: ok / weak / failed from the kept and deleted shares only."""
    keep, delete = pk / p0, 1 - pd_ / p0
    if delete < 0.25:
        return "failed"
    return "ok" if delete >= 0.5 and keep >= 0.5 else "weak"


def tables(df: pd.DataFrame) -> str:
    """Markdown: per set and truth, the labels (today's fit_quality on the stored probabilities, and the
    labels before issue 26) as counts; then the choice of FULL_KEEP: among the maps whose fit did not
    remove the class and whose class is present (p >= P_ABSENT), how many each threshold calls
    no-local-evidence, by truth."""
    df = df.copy()
    if "prob_full_median" in df:  # PCIM_Fit's test: the smaller of the two featureless fields
        df["prob_full_min"] = df[["prob_full_mean", "prob_full_median"]].min(axis=1)
    df["label"] = [verdict.fit_quality(r.prob_original, r.prob_mixed, r.prob_deleted,
                                      getattr(r, "prob_full_min", r.prob_full_mean)) for r in df.itertuples()]
    out = []
    for col, title in (("label", "PCIM_Fit"), ("label_before", "PCIM_Fit before issue 26")):
        counts = df.groupby(["set", "truth", col]).size().unstack(col, fill_value=0)
        labels = [c for c in verdict.FIT_LABELS if c in counts.columns]
        counts = counts.reindex(columns=labels, fill_value=0)
        out.append(f"{title} by the truth of the map (maps of every class of every field):\n")
        out.append("| set | truth | " + " | ".join(labels) + " |")
        out.append("|---|---|" + "---|" * len(labels))
        for (s, tr), row in counts.iterrows():
            out.append(f"| {s} | {tr} | " + " | ".join(str(int(row[c])) for c in labels) + " |")
        out.append("")
    cand = df[(df["prob_original"] >= verdict.P_ABSENT)
              & (1 - df["prob_deleted"] / df["prob_original"] < verdict.FIT_OK)].copy()
    out.append("The label test's threshold: maps whose fit removed less than half of p(target), class present "
               "(p >= 0.01); each cell: maps called no-local-evidence / maps, by the test image's kept share "
               "p(test image) / p(original) >= threshold:\n")
    tests = [t for t in ("full_min", *TESTS) if f"prob_{t}" in cand.columns]
    thresholds = (0.5, 0.6, 0.75, 0.9)
    out.append("| set | truth | maps | " + " | ".join(f"{t} {k}" for t in tests for k in thresholds) + " |")
    out.append("|---|---|---|" + "---|" * (len(tests) * len(thresholds)))
    for (s, tr), g in cand.groupby(["set", "truth"]):
        cells = [str(int((g[f"prob_{t}"] / g["prob_original"] >= k).sum())) for t in tests for k in thresholds]
        out.append(f"| {s} | {tr} | {len(g)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--table", action="store_true", help="only rebuild the tables from the CSV")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"absence_labels{'_' + args.tag if args.tag else ''}.csv"
    if not args.table:
        old = pd.read_csv(path) if path.exists() else pd.DataFrame()
        for set_name in args.sets.split(","):
            df = run_set(set_name, args.n, args.batch)
            old = pd.concat([old[old["set"] != set_name] if len(old) else old, df])
            old.to_csv(path, index=False)
    df = pd.read_csv(path)
    text = tables(df)
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
