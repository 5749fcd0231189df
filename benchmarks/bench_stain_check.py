"""What does the stain check cost `pcim explain`? One run, ratios measured within it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_stain_check.py [--sets demo] [--n 16] [--steps 300]

With explain.fidelity on, the worker computes for every batch of maps (run/batching.py `Batcher._fit`): the fit
(engine.attribute), the CSV's deletion and insertion AUCs (metrics), and the stain check
(engine/trivial.py: the deletion curve on a doubling grid, 0.125 % to 32 % of the pixels, of the map and of
every channel's intensity and the contrast), and PCIM_Fit's label test (engine/absence.py: the field fully
deleted, at two levels, one forward pass of 2 images per map). This times the four in the worker's order
and batch sizes, on the evaluation sets
(benchmarks/evalsets), with the engine's default settings unless --steps is given, and reports the
stain check's time as a share of the fit's and of the whole, for a map that is checked. The worker
checks the maps of the first field of each well only: on a plate of F fields per well, the check
costs 1/F of that. Writes benchmarks/results/stain_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evalsets  # noqa: E402
from compare_formulations import SETS  # noqa: E402

from pcim_cli.engine import absence, metrics, trivial  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(data: dict, opts: PcimOptions, batch: int, device: str = "cpu") -> dict[str, float]:
    model, x, target = data["model"], data["x"], data["target"]
    t = {"fit": 0.0, "label_test": 0.0, "fidelity": 0.0, "stain_check": 0.0}
    for i in range(0, len(x), batch):
        xb, tb = x[i : i + batch], target[i : i + batch]
        kw = {"chunk": min(64, 2 * len(xb))}  # as run/batching.py
        t0 = _sync(device)
        maps = attribute(model, xb, tb, "pcim", opts).maps
        tl = _sync(device)
        absence.full_deletion_probs(model, xb)
        t1 = _sync(device)
        metrics.deletion_auc(model, xb, maps, tb, **kw)
        metrics.insertion_auc(model, xb, maps, tb, substrate="blur", **kw)
        t2 = _sync(device)
        trivial.stain_check(model, xb, maps, tb, opts, data.get("channels"), **kw)
        t3 = _sync(device)
        t["fit"] += tl - t0
        t["label_test"] += t1 - tl
        t["fidelity"] += t2 - t1
        t["stain_check"] += t3 - t2
    n = len(x)
    return {"maps": n, "channels": int(x.shape[1]), "steps": opts.steps,
            **{f"{k}_s_per_map": v / n for k, v in t.items()},
            "stain_check_vs_fit": t["stain_check"] / t["fit"], "label_test_vs_fit": t["label_test"] / t["fit"],
            "stain_check_share_of_total": t["stain_check"] / sum(t.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="demo")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="compute.batch_size")
    ap.add_argument("--steps", type=int, default=None, help="explain.steps (default: the engine's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    opts = PcimOptions() if args.steps is None else dataclasses.replace(PcimOptions(), steps=args.steps)
    out = {}
    for set_name in args.sets.split(","):
        spec = dict(SETS[set_name])
        data = evalsets.load(spec.pop("name"), n=args.n, **spec)
        data.update(model=data["model"].to(args.device), x=data["x"].to(args.device),
                    target=data["target"].to(args.device))
        out[set_name] = {**measure(data, opts, args.batch, args.device), "device": args.device}
        r = out[set_name]
        print(f"{set_name}: fit {r['fit_s_per_map']:.3f} s/map, fidelity {r['fidelity_s_per_map']:.3f}, stain check "
              f"{r['stain_check_s_per_map']:.3f} = {r['stain_check_vs_fit']:.1%} of the fit, "
              f"{r['stain_check_share_of_total']:.1%} of the whole; label test {r['label_test_vs_fit']:.1%} of the fit "
              f"({r['channels']} channels, {r['steps']} steps)",
              flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stain_check.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
