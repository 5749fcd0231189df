"""The default fit against candidates on every evaluation set, every class's maps (issue 26).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_budget.py run --n 16                 # ~hours on 1 CPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_budget.py run --sets density --n 8 --variants default,x
    .venv/bin/python benchmarks/quality_budget.py table [--ref old-fixed]                      # tables only

`run` calls compare_formulations.py with `--targets all` once per set (each set's fields of every class,
each field explained for every class; results/quality_budget_<set>.images.csv), `table` pairs every
variant with the reference on the same (field, class) maps and prints, per set and target class (own:
fields of that class; other: fields of another class), the mean of each score, and for the other variants
the paired mean difference ± its standard error: **bold** better by more than two standard errors, ⚠ worse
by more than two (and by more than 0.005). Localisation scores exist only where a mask marks the class's
evidence. p(del)/p(orig): p(target) of the deleted image over that of the field, for the maps whose class
is present (p(original) >= 0.01). `ok / weak / failed` counts the PCIM_Fit labels (engine/budget.py) of
the maps (others, e.g. `absent`, are listed after them); `budget` is the mean share the maps ended with.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
#: p(original) below which a class is absent from a field (PCIM_Fit `absent`; engine/schedule.GROW_MIN_P)
ABSENT = 0.01
#: the sets of the decision, in table order
SETS = ("demo", "demo-resnet", "nuclei", "nuclei-resnet", "nuclei-confident", "ihc", "ihc-whole", "demo-tiled",
        "density", "density-whole", "distractor")
#: the variants (compare_formulations names or key=value overrides of the current default)
VARIANTS = ("previous-default", "default")
#: score -> (label, higher is better)
SCORES = {
    "relevance_mass": ("mass", True),
    "pixel_auroc": ("AUROC", True),
    "pointing_game_3px": ("pointing 3px", True),
    "deletion_auc": ("deletion", False),
    "deletion_fine": ("deletion 2%", False),
    "deletion_median": ("deletion (median)", False),
    "insertion_auc": ("insertion", True),
}


def run(sets: list[str], variants: list[str], n: int, batch: int, results: Path) -> None:
    import compare_formulations as cf

    for s in sets:
        out = results / f"quality_budget_{s}.csv"
        cf.main(["--sets", s, "--variants", ",".join(variants), "--baselines", "", "--n", str(n),
                 "--batch", str(batch), "--targets", "all", "--out", str(out)])


def _cell(ref: pd.Series, other: pd.Series, higher: bool) -> str:
    pair = pd.concat([ref, other], axis=1, keys=["r", "o"]).dropna()
    if pair.empty:
        return "–"
    d = pair["o"] - pair["r"]
    sem = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    text = f"{pair['o'].mean():.3f} ({d.mean():+.3f}±{sem:.3f})"
    if sem == sem and abs(d.mean()) > 2 * sem and abs(d.mean()) > 0.005:
        better = (d.mean() > 0) == higher
        text = f"**{text}**" if better else f"{text} ⚠"
    return text


def _share(rows: pd.DataFrame) -> pd.Series | None:
    """p(deleted) / p(original) of the maps whose class is not absent (p(original) >= 0.01: below, the
    ratio of two tiny probabilities says nothing); None without fit statistics."""
    if "prob_deleted" not in rows:
        return None
    return (rows["prob_deleted"] / rows["prob_original"]).where(rows["prob_original"] >= ABSENT)


def _fit_counts(rows: pd.DataFrame) -> str:
    if "fit" not in rows:
        return "–"
    counts = rows["fit"].fillna("").value_counts()
    return " / ".join(f"{int(counts.get(k, 0))}" for k in ("ok", "weak", "failed")) + "".join(
        f" +{int(v)} {k}" for k, v in counts.items() if k not in ("ok", "weak", "failed", ""))


def table(results: Path, ref: str, sets: list[str] | None = None, variants: list[str] | None = None,
          own: bool | None = None) -> str:
    """The paired table; own True / False: only the maps of the fields' own class / of the other classes."""
    frames = []
    for s in sets or SETS:
        path = results / f"quality_budget_{s}.images.csv"
        if path.exists():
            frames.append(pd.read_csv(path))
    if not frames:
        return "no results: run `quality_budget.py run` first\n"
    df = pd.concat(frames, ignore_index=True)
    methods = [m for m in (variants or df["method"].unique()) if m in set(df["method"])]
    if ref not in methods:
        raise SystemExit(f"reference {ref!r} not in the results ({', '.join(methods)})")
    others = [m for m in methods if m != ref]
    scores = [c for c in SCORES if c in df]
    head = ("| set | class (fields) | fit | maps | " + " | ".join(
        f"{SCORES[c][0]} {'↑' if SCORES[c][1] else '↓'}" for c in scores)
        + " | p(del)/p(orig) ↓ | ok / weak / failed | budget |")
    lines = [head, "|" + "---|" * (len(scores) + 7)]
    for s in dict.fromkeys(df["set"]):
        d = df[df["set"] == s]
        for target in sorted(d["target"].unique()):
            for is_own in (True, False) if own is None else (own,):
                g = d[(d["target"] == target) & ((d["y"] == target) == is_own)]
                if g.empty:
                    continue
                cls = g["class"].iloc[0]
                label = f"{cls} ({'own' if is_own else 'other'})"
                r = g[g["method"] == ref].set_index(["image"])
                r_share = _share(r)
                cells = [f"{r[c].mean():.3f}" if r[c].notna().any() else "–" for c in scores]
                share = "–" if r_share is None or r_share.isna().all() else f"{r_share.mean():.3f}"
                budget = f"{r['budget'].mean():.3f}" if "budget" in r and r["budget"].notna().any() else "–"
                lines.append(f"| {s} | {label} | {ref} | {len(r)} | " + " | ".join(cells)
                             + f" | {share} | {_fit_counts(r)} | {budget} |")
                for m in others:
                    o = g[g["method"] == m].set_index(["image"])
                    cells = [_cell(r[c], o[c], SCORES[c][1]) if r[c].notna().any() else "–" for c in scores]
                    o_share = _share(o)
                    share = "–" if o_share is None or r_share is None else _cell(r_share, o_share, False)
                    budget = f"{o['budget'].mean():.3f}" if "budget" in o and o["budget"].notna().any() else "–"
                    lines.append(f"| | | {m} | {len(o)} | " + " | ".join(cells)
                                 + f" | {share} | {_fit_counts(o)} | {budget} |")
    return "\n".join(lines) + "\n"


def summary(results: Path, ref: str, new: str, sets: list[str] | None = None) -> str:
    """One row per (set, class) of the maps of the fields' own class: ref -> new for the PCIM_Fit counts, the
    relevance mass, the deletion AUC to the median and p(deleted) / p(original), and the new budget."""
    frames = [pd.read_csv(p) for s in sets or SETS if (p := results / f"quality_budget_{s}.images.csv").exists()]
    if not frames:
        return "no results\n"
    df = pd.concat(frames, ignore_index=True)
    lines = ["| set | class (fields) | ok / weak / failed | mass ↑ | deletion (median) ↓ | p(del)/p(orig) ↓ | budget |",
             "|---|---|---|---|---|---|---|"]
    for s in dict.fromkeys(df["set"]):
        d = df[(df["set"] == s) & (df["y"] == df["target"])]
        for target in sorted(d["target"].unique()):
            g = d[d["target"] == target]
            r, o = g[g["method"] == ref], g[g["method"] == new]
            if r.empty or o.empty:
                continue

            def pair(col, rows_r=r, rows_o=o):
                a, b = rows_r[col].mean(), rows_o[col].mean()
                return "–" if a != a else f"{a:.2f} → {b:.2f}"

            shares = [_share(x).mean() for x in (r, o)]
            share = "–" if shares[0] != shares[0] else f"{shares[0]:.2f} → {shares[1]:.2f}"
            lines.append(f"| {s} | {g['class'].iloc[0]} ({len(o)}) | {_fit_counts(r)} → {_fit_counts(o)} | "
                         f"{pair('relevance_mass')} | {pair('deletion_median')} | {share} | "
                         f"{o['budget'].mean():.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("run", "table"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ref", default=VARIANTS[0], help="the variant the others are paired with")
    ap.add_argument("--n", type=int, default=16, help="fields per set (cycling through its classes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    if args.what == "run":
        import torch

        torch.set_num_threads(1)
        args.results.mkdir(parents=True, exist_ok=True)
        run(sets, variants, args.n, args.batch, args.results)
    text = (f"## Summary: the fields' own class, {args.ref} -> {variants[-1]}\n\n"
            + summary(args.results, args.ref, variants[-1], sets)
            + "\n## The fields' own class (explain.target: predicted)\n\n"
            + table(args.results, args.ref, sets, variants, True)
            + "\n## The other classes (explain.target: all)\n\n"
            + table(args.results, args.ref, sets, variants, False))
    (args.results / "quality_budget.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
