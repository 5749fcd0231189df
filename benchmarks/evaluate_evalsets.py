"""The `pcim evaluate` comparison on every evaluation set with known evidence (benchmarks/evalsets).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate_evalsets.py                 # every set
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate_evalsets.py --sets nuclei,nuclei-resnet --n 16
    .venv/bin/python benchmarks/evaluate_evalsets.py --combine                          # tables only

Every method of `explain.method` (PCIM, the gradient and perturbation baselines, the trivial maps
`intensity` and `contrast`) with its default settings, scored exactly as `pcim evaluate` scores a plate
(pcim_cli/run/evaluate.py `compare`): deletion over the top 0-20 % and the top 0-2 % of pixels, the
randomised-model sanity check for every method (`--no-sanity` skips it), `intensity_channel: auto`
resolved per set, the stain verdict and, where a set has object labels, the object ranking of
plate.objects (engine/object_ranking.py). Fixed-input models get one map per field through its tiles,
as pcim explain does. Per set: benchmarks/results/evaluate_<set>[_<tag>].{csv,json}. Then every per-set
result present is combined into benchmarks/results/evaluate_evalsets[_<tag>].md (the tables of
docs/quality.md and docs/verdicts.md), in the order of the sets, with one line per set saying whether PCIM beats the
best trivial map on fine and coarse deletion. Sets can run in separate processes (e.g. in parallel);
`--combine` rebuilds the tables alone.
`pcim-old` is PCIM with the default before issue 14 (300 steps at a constant lr 0.1 from zero logits),
`pcim-previous` the default before issue 26 (a fixed 2 % budget, deleted pixels to the channel mean).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate_evalsets.py --sets demo,demo-resnet,nuclei,nuclei-resnet \
        --n 16 --no-sanity --tag objects                     # the object ranking figures of docs/objects.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_formulations import OLD_DEFAULT, PREVIOUS_DEFAULT, SETS, TARGETS, load_set  # noqa: E402
from evalsets.tiled import TiledModel, field_maps  # noqa: E402

from pcim_cli.engine import object_ranking  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.engine.trivial import TRIVIAL  # noqa: E402
from pcim_cli.report import evaluate as evaluate_report  # noqa: E402
from pcim_cli.run import evaluate  # noqa: E402

#: method names of this script that are PCIM with other settings
PRESETS = {"pcim-old": ("pcim", OLD_DEFAULT), "pcim-previous": ("pcim", PREVIOUS_DEFAULT)}
RESULTS = Path(__file__).resolve().parent / "results"



def run_set(set_name: str, methods: list[str], n: int, batch: int, device: str = "cpu",
            results: Path = RESULTS, sanity: bool = True, tag: str = "", targets: str = "evidence") -> dict:
    data = load_set(set_name, n, targets)
    model, x, target = data["model"].to(device), data["x"].to(device), data["target"].to(device)
    fields = [evaluate.EvalField("-", i, x[i], data["mask"][i].to(device)) for i in range(len(x))]
    opts, tile = PcimOptions(), data.get("tile")

    def maps_fn(m, xs, ts, method, o, b):
        """Every method's maps, PRESETS included; a fixed-input model: one map per field through its tiles."""
        method, o = PRESETS.get(method, (method, o))
        if tile is not None:
            return field_maps(lambda mm, xt, tt: attribute(mm, xt, tt, method, o).maps, m, xs, ts, tile)
        return evaluate.maps_in_batches(m, xs, ts, method, o, b)

    kw = {"maps_fn": maps_fn, **({"scorer": TiledModel(model, tile)} if tile is not None else {})}
    if "labels" in data:
        kw["objects_scorer"] = object_ranking.ObjectScorer(kw.get("scorer", model), x, target,
                                                           [lab.to(device) for lab in data["labels"]],
                                                           [m.to(device) for m in data["mask"]], opts, batch_size=batch)
    t0 = time.perf_counter()
    comp = evaluate.compare(model, x, target, fields, methods, opts, batch, data["channels"], data["classes"],
                            evaluate.randomized_copy(model, seed=0) if sanity else None, **kw)
    results.mkdir(parents=True, exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    comp.table.to_csv(results / f"evaluate_{set_name}{suffix}.csv", index=False)
    y = data.get("y", data["target"])
    scores = comp.scores.assign(**{"class": [data["classes"][t] for t in comp.scores["target"]],
                                   "y": [int(y[i % len(x)]) for i in range(len(comp.scores))]})
    scores.to_csv(results / f"evaluate_{set_name}{suffix}.scores.csv", index=False)  # one row per (method, map)
    doc = {"set": set_name, "name": data["name"], "fields": len(x), "targets": targets, "channels": data["channels"],
           "intensity_channel": comp.intensity_channel, "verdicts": [v.to_dict() for v in comp.verdicts],
           "minutes": (time.perf_counter() - t0) / 60, "torch_threads": torch.get_num_threads(), "device": device,
           "finished": time.strftime("%Y-%m-%d %H:%M")}
    (results / f"evaluate_{set_name}{suffix}.json").write_text(json.dumps(doc, indent=1))
    return doc


def beats_trivial(table: pd.DataFrame, reference: str = "pcim") -> str:
    """One line: does the reference beat every trivial map on fine and coarse deletion (lower is better)?"""
    t = table.set_index("method")
    if reference not in t.index or not any(m in t.index for m in TRIVIAL):
        return ""
    parts = []
    for col, label in (("fine_deletion_auc", "top 2 %"), ("deletion_auc", "top 20 %")):
        best = t.loc[[m for m in TRIVIAL if m in t.index], col]
        ok = t.loc[reference, col] < best.min()
        parts.append(f"{label}: {reference} {t.loc[reference, col]:.3f} vs best trivial {best.min():.3f} "
                     f"({best.idxmin()}) — {'beats it' if ok else 'does NOT beat it'}")
    return "; ".join(parts)


def combine(set_names: list[str], results: Path = RESULTS, tag: str = "") -> str:
    """The per-set results present, as one markdown table (a set column) plus verdict lines."""
    head, rows, notes, summary = None, [], [], []
    suffix = f"_{tag}" if tag else ""
    tables = {s: pd.read_csv(results / f"evaluate_{s}{suffix}.csv") for s in set_names
              if (results / f"evaluate_{s}{suffix}.csv").exists()}
    # one header for every set: the score columns any set has (the object ranking has its own table)
    cols = [c for c in evaluate.COLUMNS if c not in object_ranking.COLUMNS and any(c in t for t in tables.values())]
    for set_name, table in tables.items():
        table = table.reindex(columns=["method", "maps", *cols])
        js = results / f"evaluate_{set_name}{suffix}.json"
        doc = json.loads(js.read_text()) if js.exists() else {"fields": "?", "verdicts": []}
        lines = evaluate_report.markdown_table(table).splitlines()
        head = head or ["| set " + lines[0], "|---" + lines[1]]
        label = f"{set_name} ({doc['fields']} fields)"
        rows += [f"| {label if i == 0 else ''} " + line for i, line in enumerate(lines[2:])]
        parts = [f"`intensity` = {doc['intensity_channel']}" if doc.get("intensity_channel") else "",
                 beats_trivial(table)] + [f"verdict ({v['target']}): {v['sentence']}" for v in doc["verdicts"]]
        notes.append(f"- **{set_name}**: " + "; ".join(p for p in parts if p) + ".")
        summary.append(_summary_row(set_name, doc, table))
    if head is None:
        return ""
    summary_head = ["| set | fields | `intensity` channel | top 2 %: pcim / best trivial | top 20 %: pcim / best "
                    "trivial | verdict (target: level, share) |", "|---|---|---|---|---|---|"]
    return ("\n".join([*head, *rows]) + "\n\n" + "\n".join(notes) + "\n\nPCIM against the best map without a "
            "model (deletion AUC, lower is better):\n\n" + "\n".join([*summary_head, *summary]) + "\n")


def _summary_row(set_name: str, doc: dict, table: pd.DataFrame) -> str:
    """One line of the pcim-vs-trivial summary: both deletion AUCs, the best trivial map, the verdicts."""
    t = table.set_index("method")
    cells = []
    for col in ("fine_deletion_auc", "deletion_auc"):
        trivial = [m for m in TRIVIAL if m in t.index]
        if "pcim" not in t.index or not trivial:
            cells.append("–")
            continue
        best = t.loc[trivial, col]
        mark = "**" if t.loc["pcim", col] < best.min() else ""
        cells.append(f"{mark}{t.loc['pcim', col]:.3f}{mark} / {best.min():.3f} ({best.idxmin()})")
    verdicts = "; ".join(f"{v['target']}: {v['level']}" + (f", {math.floor(100 * v['share'])} %"
                                                          if v["share"] == v["share"] else "")
                         for v in doc["verdicts"])
    return (f"| {set_name} | {doc['fields']} | {doc.get('intensity_channel') or '–'} | {cells[0]} | {cells[1]} | "
            f"{verdicts or '–'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    ap.add_argument("--methods", default=",".join(["pcim-old", *evaluate.DEFAULT_METHODS]))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the maps differ by float rounding only)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the per-set results")
    ap.add_argument("--combine", action="store_true", help="only rebuild evaluate_evalsets.md from the results")
    ap.add_argument("--no-sanity", action="store_true", help="skip the randomised-model check (half the time)")
    ap.add_argument("--tag", default="", help="suffix of the result files, evaluate_<set>[_<tag>].csv")
    ap.add_argument("--targets", choices=TARGETS, default="evidence",
                    help="evidence: each field for its marked class; all: fields of every class, each explained "
                         "for every class (`fields` then counts maps; evaluate_<set>.scores.csv: one row per map, "
                         "with its target and its field's class)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    if not args.combine:
        for set_name in args.sets.split(","):
            doc = run_set(set_name, methods, args.n, args.batch, args.device, args.results, not args.no_sanity,
                          args.tag, args.targets)
            print(f"{set_name}: done in {doc['minutes']:.1f} min", file=sys.stderr, flush=True)
    text = combine(list(SETS), args.results, args.tag)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"evaluate_evalsets{'_' + args.tag if args.tag else ''}.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
