"""Amortised PCIM in `make bench`: training time, plate throughput and quality, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_amortised.py [--quick]

Sections (one torch thread; ratios measured within the run):
  train     `pcim train-explainer` on the demo plate (run.train; 19 wells, 5 held out): seconds
  demo      `pcim explain` (in-process) on 4 demo wells (8 fields): the per-image default vs pcim-amortised
            (no refine, and 20 refine steps), fields per minute, with and without explain.fidelity (the
            deletion / insertion AUC of every map, which costs far more than an amortised map)
  tiled     one 5-channel 2160x2160 field, 256 px tiles (100), through the worker: the per-image fit (time
            of 2 and 4 steps, projected to the default) vs pcim-amortised (an untrained explainer: speed only)
  quality   benchmarks/amortised.py's comparison on the demo evaluation set (fields of another plate of the
            same generator) with the explainer trained on the demo plate: per-image, amortised, refined
Writes benchmarks/results/bench_amortised.json and prints a table. The full comparison on every
evaluation set is benchmarks/amortised.py (docs/amortised.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import amortised  # noqa: E402
import bench  # noqa: E402

from pcim_cli.engine.explainer import TrainOptions, make_explainer  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.io.explainer import engine_record, load_explainer, save_explainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WELLS = ["A01", "A02", "B01", "B02"]


def bench_train(steps: int, out: Path) -> dict:
    meta = amortised.plate_explainer(steps, out)
    t = meta["training"]
    return {"steps": t["steps"], "batch_size": t["batch_size"], "train_s": t["train_seconds"],
            "total_s": t["total_seconds"], "s_per_step": t["train_seconds"] / t["steps"],
            "train_fields": t["train_fields"], "validation_objective": t["validation_objective"],
            "validation_objective_untrained": t["validation_objective_untrained"], "explainer": str(out)}


def bench_plate(explainer: Path, wells: list[str]) -> list[dict]:
    rows = []
    for label, sets in [("per-image default", ()),
                        ("pcim-amortised", ("explain.method=pcim-amortised", f"explain.explainer={explainer}")),
                        ("pcim-amortised + 20 refine", ("explain.method=pcim-amortised",
                                                        f"explain.explainer={explainer}", "explain.refine_steps=20"))]:
        for fidelity in (True, False):
            r = bench.bench_demo(wells, (*sets, f"explain.fidelity={str(fidelity).lower()}"))
            rows.append({"method": label, "fidelity": fidelity, **{k: r[k] for k in (
                "fields", "wall_s", "fields_per_min", "fields_per_min_fitting_only", "share_fit")}})
            print(f"demo plate: {label}, fidelity {fidelity}: {r['fields_per_min']:.1f} fields/min", file=sys.stderr,
                  flush=True)
    return rows


def bench_tiled_field() -> dict:
    """Per-image (2 and 4 steps, projected to the default) vs amortised on one 2160x2160 field."""
    t2 = bench.bench_tiled(steps=2, batch=16)
    t4 = bench.bench_tiled(steps=4, batch=16)
    per_step = (t4["timings_s"]["fit"] - t2["timings_s"]["fit"]) / 2
    default = PcimOptions()
    projected = t2["timings_s"]["fit"] + (default.steps - 2) * per_step
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tile_explainer.pt"
        save_explainer(make_explainer(5, 2, default), path, {
            "classifier_sha256": "-", "channels": list("abcde"), "classes": ["neg", "pos"],
            "normalize": {"method": "percentile", "low": 1.0, "high": 99.8}, "engine": engine_record(default)})
        am = bench.bench_tiled(steps=1, batch=16, method="pcim-amortised", explainer=str(path))
    return {"tiles": am["tiling"]["n_tiles"], "per_image_step_s": per_step, "per_image_default_fit_s": projected,
            "amortised_fit_s": am["timings_s"]["fit"], "amortised_wall_s": am["wall_s"],
            "speedup_fit": projected / am["timings_s"]["fit"], "default_steps": default.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, wells and fields (a smoke run)")
    ap.add_argument("--only", default="train,demo,tiled,quality")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = args.only.split(",")
    q = args.quick
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": bench.machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    explainer = RESULTS / "demo_plate_explainer.pt"
    if "train" in only or not explainer.exists():
        res["train"] = bench_train(30 if q else TrainOptions().steps, explainer)
    if "demo" in only:
        res["demo"] = bench_plate(explainer, WELLS[:1] if q else WELLS)
    if "tiled" in only:
        res["tiled"] = bench_tiled_field()
    if "quality" in only:
        ns = SimpleNamespace(n=4 if q else 16, train_steps=0, refine="20", refine_lr=PcimOptions().refine_lr,
                             batch=8, baselines=False)
        table, info = amortised.run_set("demo", ns, load_explainer(explainer).module,
                                        "trained on the demo plate (sample_plates/demo)")
        res["quality"] = {**info, "table": json.loads(table.to_json(orient="records")),
                          "goals": amortised.goals(table)}
        print(amortised.describe(info, table, res["quality"]["goals"]), flush=True)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (RESULTS / "bench_amortised.json").write_text(json.dumps(res, indent=1, default=str))
    print(table_of(res))
    print(f"\nmachine: {res['machine']}; written to {RESULTS / 'bench_amortised.json'}")


def table_of(res: dict) -> str:
    lines = ["| what | figure |", "|---|---|"]
    if "train" in res:
        t = res["train"]
        lines.append(f"| pcim train-explainer, demo plate ({t['train_fields']} fields, {t['steps']} steps of "
                     f"{t['batch_size']}) | {t['train_s']:.0f} s ({t['s_per_step']:.2f} s/step); validation objective "
                     f"{t['validation_objective']:.3f} (untrained {t['validation_objective_untrained']:.3f}) |")
    for r in res.get("demo", []):
        lines.append(f"| demo plate, {r['fields']} fields: {r['method']}, fidelity {'on' if r['fidelity'] else 'off'} "
                     f"| {r['fields_per_min']:.1f} fields/min ({r['share_fit']:.0%} of the wall time in the worker's "
                     "fit + fidelity) |")
    if "tiled" in res:
        t = res["tiled"]
        lines.append(f"| one 2160x2160 field, {t['tiles']} tiles of 256 px: per-image default ({t['default_steps']} "
                     f"steps, projected) vs amortised | {t['per_image_default_fit_s']:.1f} s vs "
                     f"{t['amortised_fit_s']:.2f} s: {t['speedup_fit']:.0f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
