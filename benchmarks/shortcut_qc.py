"""Does the shortcut QC find the wells a classifier calls for the wrong reason, and stay quiet otherwise?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shortcut_qc.py                  # measure (maxpool), then analyse
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shortcut_qc.py --arch resnet    # the held-out architecture
    .venv/bin/python benchmarks/shortcut_qc.py --analyse                          # tables and figures only

On the `shortcut` evaluation sets (benchmarks/evalsets/shortcut.py): for each artefact kind (debris,
border, gradient, specks) and plate layout (artefact in a random third of the wells, or in the outer
ring), the shortcut model (trained where the artefact marks `mitotic`) and the clean model (artefacts
independent of the class) are explained on the same 48-well plate with pcim's defaults (the predicted
class, as `pcim explain` does) and with saliency (`--methods` adds integrated-gradients ...). Every
map's shares are computed as `pcim explain` computes them (engine/shares.py): objects = the nuclei
labels (plate.objects) or the automatic foreground mask of the DNA channel, border 5 %, saturated
pixels found in the raw counts (auto). Per field: the truth (shortcut / clean / mixed, from the
counterfactual without the artefact).

Per-field rows go to benchmarks/results/shortcut_qc_rows_<arch>_<kind>.csv. The analysis (every CSV
present) sweeps each rule's threshold (recall on `shortcut` fields, false alarms on `clean` fields), applies the
verdict of pcim_cli/engine/shortcuts.py with its thresholds (recall / false alarms per artefact kind;
is each plate of the clean model quiet; is the edge layout found), and writes
benchmarks/results/shortcut_qc.md and the figures of docs/shortcuts.md (docs/images/shortcuts_*.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evalsets import shortcut as S  # noqa: E402
from pcim_cli.engine import absence, shares, shortcuts, tiling  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.engine.verdict import fit_quality  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "images"
METHODS = ("pcim", "saliency")
REGIONS = ("background", "border", "saturated")
TOP = 0.02  # the top-pixel variant of the shares: the map's top 2 % of pixels
#: the shortcut pictures of docs/shortcuts.md: file -> (kind, layout, model)
DOC_FIGURES = {"shortcuts_specks_edge.png": ("specks", "edge", "shortcut:specks"),
               "shortcuts_specks_edge_clean.png": ("specks", "edge", "clean")}
MAPS: dict[tuple[str, str, str, str], np.ndarray] = {}  # (kind, layout, model, method) -> maps (B, H, W) float16
#: the rule each artefact kind is expected to trip (the analysis reports every rule for every kind)
EXPECTED = {"debris": "background", "border": "border", "gradient": "background", "specks": "saturated"}


def field_rows(data: dict, model, model_name: str, methods, batch: int, arch: str) -> list[dict]:
    tr = S.truth(model, data)
    x, raw = data["x"], torch.from_numpy(data["raw"].astype(np.float32))
    n, _, h, w = x.shape
    border = shares.border_mask((h, w), shares.border_margin((h, w)))
    rows = []
    opts = PcimOptions()
    # p(predicted class | every pixel deleted), as `pcim explain` measures it: is the call an absence?
    p_full = torch.cat([absence.full_deletion_probs(model, x[i : i + batch]) for i in range(0, n, batch)])
    p_full = p_full.gather(1, tr["pred"][:, None])[:, 0]
    for method in methods:
        maps, fits = [], []
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            res = attribute(model, x[sl], tr["pred"][sl], method, opts, seeds=torch.arange(i, min(i + batch, n)))
            maps.append(res.maps.sum(1).float())
            fits += [fit_quality(float(a), float(b), float(c), float(d)) for a, b, c, d in
                     zip(res.prob_original, res.prob_mixed, res.prob_deleted, p_full[sl], strict=True)]
        maps = torch.cat(maps)
        seconds = (time.perf_counter() - t0) / n
        MAPS[(data["kind"], data["layout"], model_name, method)] = maps.half().numpy()
        for i in range(n):
            labelled = shares.object_mask(data["labels"][i])
            auto = shares.foreground_mask(x[i, 0])
            saturated = shares.saturated_mask(raw[i], shares.saturation_levels(raw[i], "auto"))
            m = maps[i : i + 1]
            fs = shares.field_shares(m, labelled, border, saturated)
            row = {"arch": arch, "kind": data["kind"], "layout": data["layout"], "model": model_name,
                   "method": method, "well": data["wells"][i], "edge": S.edge_well(i // data["cols"], i % data["cols"]),
                   "artefact": bool(data["artefact"][i]), "mitotic": bool(data["mitotic"][i]),
                   "pred": data["classes"][int(tr["pred"][i])], "p_pred": float(tr["p_pred"][i]),
                   "p_clean": float(tr["p_clean"][i]), "truth": tr["truth"][i], "fit": fits[i],
                   "s_per_map": seconds}
            row.update({f"share_{r}": v for r, v in fs.target(0).items() if v is not None})
            row.update({f"area_{r}": v for r, v in fs.areas.items() if v is not None})
            row["share_background_auto"] = float(shares.region_shares(m, ~auto)[0])
            for r, mask in (("background", ~labelled), ("background_auto", ~auto), ("border", border),
                            ("saturated", saturated), ("artefact", data["artefact_mask"][i])):
                row[f"top_{r}"] = float(shares.region_shares(m, mask, top=TOP)[0])
            row["p_full"] = float(p_full[i])
            row["area_background_auto"] = float((~auto).double().mean())
            row["share_artefact"] = float(shares.region_shares(m, data["artefact_mask"][i])[0])
            rows.append(row)
    return rows


def measure(arch: str, kinds, layouts, methods, batch: int, demo: bool = True) -> list[Path]:
    """Every plate with the shortcut and the clean model (and, with `demo`, the bundled demo classifier:
    another clean model, trained on clean demo fields only). One CSV per artefact kind, written when its
    plates are done; a kind whose CSV exists is skipped (delete it to measure again)."""
    written = []
    clean, _ = S.model("clean", arch)
    for kind in kinds:
        out = RESULTS / f"shortcut_qc_rows_{arch}_{kind}.csv"
        written.append(out)
        if out.exists():
            continue
        cut, _ = S.model(f"shortcut:{kind}", arch)
        models = [(f"shortcut:{kind}", cut), ("clean", clean)] + ([("demo-classifier", S.demo_classifier())]
                                                                   if demo and arch == "maxpool" else [])
        rows = []
        for layout in layouts:
            data = S.plate(kind, layout)
            for name, model in models:
                t0 = time.perf_counter()
                rows += field_rows(data, model, name, methods, batch, arch)
                print(f"{arch} {kind} {layout} {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(RESULTS / f"shortcut_qc_maps_{arch}_{kind}.npz",
                            **{"|".join(k): v for k, v in MAPS.items() if k[0] == kind})
        pd.DataFrame(rows).to_csv(out, index=False)
    return written


# --------------------------------------------------------------------------------------------------
# analysis


def _fields(df: pd.DataFrame, objects: str = "labels") -> list[shortcuts.FieldShares]:
    bg = "share_background" if objects == "labels" else "share_background_auto"
    out = []
    for r in df.itertuples():
        out.append(shortcuts.FieldShares(r.well, 1, r.pred, {"background": getattr(r, bg), "border": r.share_border,
                                                              "saturated": r.share_saturated},
                                         {"border": r.area_border, "saturated": r.area_saturated},
                                         fit=r.fit if isinstance(r.fit, str) and r.fit else None))
    return out


def rates(flagged: pd.Series, truth: pd.Series) -> tuple[float, int, float, int]:
    """(recall on shortcut fields, their number, false-alarm rate on clean fields, their number)."""
    pos, neg = truth == "shortcut", truth == "clean"
    return (float(flagged[pos].mean()) if pos.any() else float("nan"), int(pos.sum()),
            float(flagged[neg].mean()) if neg.any() else float("nan"), int(neg.sum()))


def sweep(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and rule region: recall / false alarms of `share > t` over a grid of t (fit not gated)."""
    out = []
    for method, d in df.groupby("method"):
        for region in (*REGIONS, "background_auto"):
            col = f"share_{region}"
            for t in np.round(np.arange(0.05, 0.96, 0.05), 2):
                flagged = d[col].fillna(0) > t
                rec, npos, fa, nneg = rates(flagged, d.truth)
                kinds = {k: rates(flagged[d.kind == k], d.truth[d.kind == k])[0] for k in S.KINDS}
                out.append({"method": method, "region": region, "threshold": t, "recall": rec, "false_alarms": fa,
                            "n_shortcut": npos, "n_clean": nneg, **{f"recall_{k}": v for k, v in kinds.items()}})
    return pd.DataFrame(out)


def verdicts(df: pd.DataFrame, objects: str = "labels") -> tuple[pd.DataFrame, list[dict]]:
    """The verdict of engine/shortcuts.py on every plate: per field flagged or not; the plate's findings."""
    flagged_rows, plates = [], []
    for key, d in df.groupby(["arch", "method", "kind", "layout", "model"]):
        edge = [w for w, e in zip(d.well, d.edge, strict=True) if e]
        report = shortcuts.decide(_fields(d, objects), edge, objects="the nuclei", border_px=6)
        flags = shortcuts.flagged_wells(report.findings)
        plates.append(dict(zip(("arch", "method", "kind", "layout", "model"), key, strict=True))
                      | {"findings": [f.sentence for f in report.findings],
                         "rules": sorted({f.rule for f in report.findings})})
        flagged_rows.append(d.assign(flagged=[w in flags for w in d.well], objects=objects))
    return pd.concat(flagged_rows), plates


def summary_table(flagged: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (arch, method, objects, kind), d in flagged.groupby(["arch", "method", "objects", "kind"]):
        cut = d[d.model.str.startswith("shortcut")]
        clean = d[~d.model.str.startswith("shortcut")]
        rec, npos, _, _ = rates(cut.flagged, cut.truth)
        _, _, fa_cut, n_cut = rates(cut.flagged, cut.truth)
        _, _, fa_clean, n_clean = rates(clean.flagged, clean.truth)
        out.append({"arch": arch, "method": method, "objects": objects, "kind": kind, "shortcut fields": npos,
                    "recall": rec, "false alarms (clean models)": fa_clean, "clean-model fields": n_clean,
                    "false alarms (shortcut model, artefact-free or ignored)": fa_cut, "their fields": n_cut,
                    "mixed (not scored)": int((d.truth == "mixed").sum())})
    return pd.DataFrame(out)


def class_table(flagged: pd.DataFrame) -> pd.DataFrame:
    """The clean models' false alarms per predicted class (pcim, nuclei labels): which class raises them."""
    d = flagged[(flagged.method == "pcim") & (flagged.objects == "labels") & ~flagged.model.str.startswith("shortcut")
                & (flagged.truth == "clean")]
    out = []
    for (arch, model, pred), g in d.groupby(["arch", "model", "pred"]):
        out.append({"arch": arch, "clean model": model, "class": pred, "fields": len(g),
                    "flagged": float(g.flagged.mean())})
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame) -> str:
    """A markdown table (floats to 2 decimals) without the optional `tabulate` dependency."""
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(map(str, table.columns)) + " |", "|---" * len(table.columns) + "|",
                      *("| " + " | ".join(r) + " |" for r in cells)])


def analyse() -> str:
    frames = [pd.read_csv(p) for p in sorted(RESULTS.glob("shortcut_qc_rows_*.csv"))]
    if not frames:
        raise SystemExit("no benchmarks/results/shortcut_qc_rows_<arch>_<kind>.csv yet: run the measurement first")
    df = pd.concat(frames, ignore_index=True)
    sw = sweep(df)
    sw.to_csv(RESULTS / "shortcut_qc_sweep.csv", index=False)
    flagged, plates = [], []
    for objects in ("labels", "auto"):
        f, p = verdicts(df, objects)
        flagged.append(f)
        plates += [x | {"objects": objects} for x in p]
    flagged = pd.concat(flagged)
    table = summary_table(flagged)
    table.to_csv(RESULTS / "shortcut_qc_summary.csv", index=False)
    (RESULTS / "shortcut_qc_plates.json").write_text(json.dumps(plates, indent=1))
    lines = ["# Shortcut QC on the shortcut evaluation sets", "",
             "Recall: share of `shortcut` fields (the call changes without the artefact) whose well is flagged; "
             "false alarms: share of `clean` fields (no artefact, or the call does not depend on it) flagged.", "",
             markdown(table), "", "## The clean models' false alarms per class", "",
             markdown(class_table(flagged)), "", "## Plates (findings)", ""]
    for p in plates:
        if p["method"] != "pcim":
            continue
        lines.append(f"- {p['arch']} {p['objects']} {p['kind']} {p['layout']} {p['model']}: "
                     + ("; ".join(p["findings"]) if p["findings"] else "quiet"))
    text = "\n".join(lines) + "\n"
    (RESULTS / "shortcut_qc.md").write_text(text)
    rates_figure(table, FIGURES / "shortcuts_rates.png")
    for arch, kind, layout, model in df[["arch", "kind", "layout", "model"]].drop_duplicates().itertuples(index=False):
        if (RESULTS / f"shortcut_qc_maps_{arch}_{kind}.npz").exists():
            plate_figure(df, arch, kind, layout, model,
                         RESULTS / "figures" / f"{arch}_{kind}_{layout}_{model.replace(':', '-')}.png")
    for name, (kind, layout, model) in DOC_FIGURES.items():
        if (RESULTS / f"shortcut_qc_maps_maxpool_{kind}.npz").exists():
            plate_figure(df, "maxpool", kind, layout, model, FIGURES / name)
    return text


def plate_figure(df: pd.DataFrame, arch: str, kind: str, layout: str, model: str, path: Path,
                 objects: str = "labels", thumbs: int = 6) -> list[str]:
    """The shortcut picture of one evaluation plate (pcim's maps), as `pcim render` draws it; its findings."""
    from pcim_cli.report import shortcut_figure as fig

    d = df[(df.arch == arch) & (df.kind == kind) & (df.layout == layout) & (df.model == model) & (df.method == "pcim")]
    data = S.plate(kind, layout)
    maps = np.load(RESULTS / f"shortcut_qc_maps_{arch}_{kind}.npz")["|".join((kind, layout, model, "pcim"))]
    fields = _fields(d, objects)
    edge = [w for w, e in zip(d.well, d.edge, strict=True) if e]
    report = shortcuts.decide(fields, edge, objects="the nuclei", border_px=6)
    means = shortcuts.well_means(fields)
    flags = shortcuts.flagged_wells(report.findings)
    blocks = []
    for target in sorted(means, key=lambda t: -len(means[t])):
        shown = []
        for f in report.findings:
            if f.target != target or f.rule == "plate-edge":
                continue
            for w in f.wells:
                if w not in [t.well for t in shown] and len(shown) < thumbs:
                    i = data["wells"].index(w)
                    x = data["x"][i].numpy()
                    v = means[target][w]
                    caption = f"{w}: " + ", ".join(f"{100 * v[r]:.0f} % {fig.TITLES[r]}" for r in
                                                  ("background", "border", "saturated")
                                                  if fig.RULE_OF[r] in flags.get(w, []))
                    shown.append(fig.Thumb(w, 1, caption, maps[i].astype(np.float32),
                                           np.stack([x[1], x[2], x[0]], -1).clip(0, 1),
                                           shares.object_mask(data["labels"][i]).numpy()))
        blocks.append(fig.TargetBlock(target, means[target], [f for f in report.findings if f.target == target],
                                      shown))
    title = f"{kind} artefact, {layout} layout, {model}"
    image = fig.draw(title, data["rows"], data["cols"], blocks)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return [f.sentence for f in report.findings]


def rates_figure(table: pd.DataFrame, path: Path) -> None:
    """Recall (shortcut models) and false alarms (clean models) per artefact kind, pcim and saliency
    (the max-pool CNNs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[(table.objects == "labels") & (table.arch == "maxpool")]  # the held-out architecture: its table
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    width = 0.38
    for ax, col, title in ((axes[0], "recall", "found: wells called for the artefact"),
                           (axes[1], "false alarms (clean models)", "false alarms: clean models' wells")):
        for k, (method, colour) in enumerate((("pcim", "#c2185b"), ("saliency", "#888888"))):
            d = t[t.method == method].set_index("kind").reindex(list(S.KINDS))
            xs = np.arange(len(S.KINDS)) + (k - 0.5) * width
            ax.bar(xs, d[col].fillna(0).to_numpy(), width, label=method, color=colour)
        ax.set_xticks(np.arange(len(S.KINDS)), list(S.KINDS))
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of wells")
    axes[0].legend(frameon=False, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_seams(n: int = 12, tile: int = 64) -> pd.DataFrame:
    """The seam share of tiled fields' maps: the demo's 128 px fields through the bundled classifier cut
    into 64 px tiles (3 x 3, as `model.input_size: [64, 64]` makes pcim cut them), one map per field
    (`explain.tile_maps: field`, the default) and one per tile stitched (`per-tile`), PCIM and saliency;
    the seams' area for scale. -> benchmarks/results/shortcut_qc_seams.csv"""
    from benchmarks.evalsets import load
    from benchmarks.evalsets.tiled import field_maps, per_tile_maps

    ev = load("demo", n=n)
    x, target = ev["x"], ev["target"]
    grid = tiling.plan_tiles(tuple(x.shape[-2:]), (tile, tile))
    seams = shares.seam_mask(grid.field, grid.tile, grid.starts_y, grid.starts_x)
    border = shares.border_mask(x.shape[-2:], shares.border_margin(x.shape[-2:]))
    rows = []
    for method in ("pcim", "saliency"):
        def fn(model, xs, ts, method=method):
            return attribute(model, xs, ts, method, PcimOptions()).maps
        for mode, make in (("field", field_maps), ("per-tile", per_tile_maps)):
            maps = make(fn, ev["model"], x, target, (tile, tile))
            for i in range(len(x)):
                m = maps[i : i + 1].sum(1)
                rows.append({"method": method, "tile_maps": mode, "field": i,
                             "area_seams": float(seams.double().mean()),
                             "share_seams": float(shares.region_shares(m, seams)[0]),
                             "share_border": float(shares.region_shares(m, border)[0]),
                             "share_evidence": float(shares.region_shares(m, ev["mask"][i])[0])})
    df = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS / "shortcut_qc_seams.csv", index=False)
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="maxpool", choices=sorted(S.RECIPES))
    ap.add_argument("--kinds", default=",".join(S.KINDS))
    ap.add_argument("--layouts", default=",".join(S.LAYOUTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--analyse", action="store_true", help="only the analysis of the CSVs present")
    ap.add_argument("--no-demo", action="store_true", help="without the bundled demo classifier as a clean model")
    ap.add_argument("--seams", action="store_true", help="only the seam shares of tiled demo fields")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.seams:
        print(measure_seams().groupby(["method", "tile_maps"]).mean(numeric_only=True).round(3))
        return 0
    if not args.analyse:
        measure(args.arch, args.kinds.split(","), args.layouts.split(","), args.methods.split(","), args.batch,
                not args.no_demo)
    print(analyse())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
