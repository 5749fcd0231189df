"""Maps per second on a GPU: per-image PCIM (300 steps and today's default) vs amortised PCIM.

    python benchmarks/gpu_bench.py                 # on the GPU machine: at most ~4 minutes, JSON to $OUT
    python benchmarks/gpu_bench.py --quick         # CPU smoke test: seconds

Imports only torch, numpy and pcim_cli.engine (the GPU machine has no zarr, dask, pydantic or typer).
For two classifiers at 256 x 256 px tiles -- the demo CNN (sample_plates/demo/classifier.ts, or an
in-script copy of its architecture with random weights if that file cannot be loaded) and a
ResNet-18-size network built here (random weights: speed does not depend on them) -- and for float32
and bfloat16 autocast (compute.precision), it measures

- per-image PCIM (engine.pcim.fit_pcim): the time of s1 and s2 steps at batch B gives the cost of one
  step and the fixed overhead, from which the time of 300 steps (the default until issue 14) and of
  PcimOptions().steps (today's default) are projected; a few batch sizes, the best kept;
- amortised PCIM (engine.explainer.amortised_pcim, an untrained explainer: its speed does not depend
  on its weights): one explainer forward per tile plus the probabilities' classifier forwards, and the
  same with 20 refine steps;
- bfloat16's effect on the maps: the relative L2 change of maps made under bfloat16 autocast against
  float32 (per-image default fit on the demo CNN; amortised on both models), on synthetic blob images;

then projects the time of a 384-well x 9-field plate of 2160 x 2160 px fields cut into 256 px tiles
(engine.tiling's default overlap: 100 tiles per field, one target per tile). A time budget (--budget-s)
skips what would not fit. Prints a compact table last; writes JSON to --out (default $OUT/gpu_bench.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcim_cli.engine import tiling  # noqa: E402
from pcim_cli.engine.explainer import amortised_pcim, make_explainer  # noqa: E402
from pcim_cli.engine.pcim import FastForward, PcimOptions, fit_pcim  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLATE = {"wells": 384, "fields": 9, "field_px": 2160, "tile_px": 256}


class DemoNetCopy(nn.Module):
    """The demo classifier's architecture (sample_plates/demo/make_demo.py DemoNet), random weights."""

    def __init__(self, in_channels: int = 3, n_classes: int = 2, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Conv2d(2 * width, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return torch.amax(self.head(x), dim=(2, 3))


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.down(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (BasicBlocks 2-2-2-2, widths w..8w, BatchNorm, global average pooling); w=64: 11 M params."""

    def __init__(self, in_channels: int = 3, n_classes: int = 2, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [Basic(cin, cout, 1 if i == 0 else 2), Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def demo_model(quick: bool) -> tuple[nn.Module, str]:
    path = REPO / "sample_plates" / "demo" / "classifier.ts"
    try:
        model = torch.jit.load(str(path), map_location="cpu")
        return model, "demo CNN (classifier.ts)"
    except Exception as exc:  # noqa: BLE001 - another torch version may not read the archive
        print(f"cannot load {path} ({type(exc).__name__}: {exc}); using an in-script copy", file=sys.stderr)
        torch.manual_seed(0)
        return DemoNetCopy(), "demo CNN (in-script copy, random weights)"


def blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Synthetic fluorescence-like tiles in [0, 1]: noise plus a few Gaussian blobs per channel."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = 0.1 * torch.rand(n, 3, size, size, generator=g)
    for i in range(n):
        for c in range(3):
            for _ in range(4):
                cy, cx = (torch.rand(2, generator=g) * size).tolist()
                r = size / 24 * (0.5 + float(torch.rand(1, generator=g)))
                x[i, c] += 0.8 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return x.clamp(0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def per_image(model, x, opts: PcimOptions, s1: int, s2: int, device) -> dict:
    """Cost of one fit step and the fixed overhead at this batch, from fits of s1 and s2 steps."""
    target = torch.ones(len(x), dtype=torch.long, device=device)
    fit_pcim(model, x, target, dataclasses.replace(opts, steps=1))  # warm-up (cuDNN autotuning, allocator)
    t1 = timed(lambda: fit_pcim(model, x, target, dataclasses.replace(opts, steps=s1)), device)
    t2 = timed(lambda: fit_pcim(model, x, target, dataclasses.replace(opts, steps=s2)), device)
    step = max((t2 - t1) / (s2 - s1), 1e-9)
    return {"step_s": step, "overhead_s": max(0.0, t1 - s1 * step)}


def amortised(model, explainer, x, opts: PcimOptions, device, repeats: int) -> float:
    target = torch.ones(len(x), dtype=torch.long, device=device)
    amortised_pcim(model, explainer, x, target, opts)  # warm-up
    return min(timed(lambda: amortised_pcim(model, explainer, x, target, opts), device) for _ in range(repeats))


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    num = (a - b).flatten(1).norm(dim=1)
    den = a.flatten(1).norm(dim=1).clamp(min=1e-12)
    return float((num / den).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on any device: a smoke test in seconds")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting measurements after this long")
    ap.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_bench.json, else benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    budget = Budget(args.budget_s)
    quick = args.quick
    tile = 64 if quick else PLATE["tile_px"]
    s1, s2 = (1, 3) if quick else (5, 15)
    default = PcimOptions()
    old = dataclasses.replace(default, steps=300, lr=0.1)
    demo, demo_name = demo_model(quick)
    torch.manual_seed(0)
    models = {demo_name: (demo, (2, 4) if quick else (512, 2048)),
              "ResNet-18 size (random weights)": (ResNet18(width=8 if quick else 64), (2, 4) if quick else (128, 512))}
    grid = tiling.plan_tiles((PLATE["field_px"],) * 2, (PLATE["tile_px"],) * 2)
    plate_tiles = PLATE["wells"] * PLATE["fields"] * grid.n_tiles
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "tile_px": tile, "quick": quick,
                    "old_steps": old.steps, "default_steps": default.steps, "default_lr": default.lr,
                    "plate": {**PLATE, "tiles_per_field": grid.n_tiles, "tiles": plate_tiles}, "rows": [],
                    "skipped": []}
    rows = report["rows"]
    for name, (base, batches) in models.items():
        base = base.to(device).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        n_params = sum(p.numel() for p in base.parameters())
        for precision in ("float32", "bfloat16"):
            model = FastForward(base, precision, channels_last=device.type == "cuda")
            explainer = make_explainer(3, 2, default).to(device).eval()
            fast_explainer = explainer if precision == "float32" else FastForward(explainer, precision)
            best: dict = {}
            for b in batches:
                if budget.left() < 20:
                    report["skipped"].append(f"{name} {precision} batch {b}: time budget")
                    continue
                x = blobs(min(b, 16), tile).to(device).repeat(math.ceil(b / min(b, 16)), 1, 1, 1)[:b]
                try:
                    cost = per_image(model, x, default, s1, s2, device)
                    am = amortised(model, fast_explainer, x, default, device, 3)
                    am_refine = amortised(model, fast_explainer, x, dataclasses.replace(default, refine_steps=20),
                                          device, 1)
                except RuntimeError as exc:
                    if not is_oom(exc):
                        raise
                    report["skipped"].append(f"{name} {precision} batch {b}: out of memory")
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                row = {"model": name, "parameters": n_params, "precision": precision, "batch": b,
                       "per_image_old_maps_s": b / (cost["overhead_s"] + old.steps * cost["step_s"]),
                       "per_image_default_maps_s": b / (cost["overhead_s"] + default.steps * cost["step_s"]),
                       "amortised_maps_s": b / am, "amortised_refine20_maps_s": b / am_refine,
                       "step_ms": 1000 * cost["step_s"],
                       "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None}
                for key in ("per_image_old", "per_image_default", "amortised", "amortised_refine20"):
                    if row[f"{key}_maps_s"] > best.get(f"{key}_maps_s", 0):
                        best[f"{key}_maps_s"], best[f"{key}_batch"] = row[f"{key}_maps_s"], b
                report.setdefault("all", []).append(row)
                print(f"{name} {precision} B={b}: per-image old {row['per_image_old_maps_s']:.1f} maps/s, default "
                      f"{row['per_image_default_maps_s']:.1f}, amortised {row['amortised_maps_s']:.0f}, +20 refine "
                      f"{row['amortised_refine20_maps_s']:.1f}", file=sys.stderr, flush=True)
            if best:
                rows.append({"model": name, "precision": precision, **best,
                             **{f"plate_h_{k}": plate_tiles / best[f"{k}_maps_s"] / 3600
                                for k in ("per_image_old", "per_image_default", "amortised", "amortised_refine20")}})
    report["bf16_map_change"] = bf16_effect(models, default, tile, device, budget, report["skipped"], quick)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT")
                                           else REPO / "benchmarks" / "results" / "gpu_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"JSON: {out}")
    return 0


def bf16_effect(models: dict, opts: PcimOptions, tile: int, device, budget: Budget, skipped: list,
                quick: bool) -> dict:
    """Relative L2 change of maps made under bfloat16 autocast against float32 (16 blob tiles)."""
    out = {}
    x = blobs(4 if quick else 16, tile, seed=1).to(device)
    target = torch.ones(len(x), dtype=torch.long, device=device)
    explainer = make_explainer(3, 2, opts).to(device).eval()
    for name, (base, _) in models.items():
        if budget.left() < 15:
            skipped.append(f"bf16 effect {name}: time budget")
            continue
        f32, b16 = FastForward(base, "float32"), FastForward(base, "bfloat16")
        a = amortised_pcim(f32, explainer, x, target, opts).maps
        b = amortised_pcim(b16, FastForward(explainer, "bfloat16"), x, target, opts).maps
        out[f"{name}: amortised"] = rel_change(a, b)
        if name.startswith("demo"):
            fit = dataclasses.replace(opts, steps=20) if quick else opts
            a = fit_pcim(f32, x, target, fit).maps
            b = fit_pcim(b16, x, target, fit).maps
            out[f"{name}: per-image default fit"] = rel_change(a, b)
    return out


def print_table(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, {report['tile_px']} px tiles; per-image: "
          f"{report['old_steps']} steps (old default) and {report['default_steps']} (default); plate: "
          f"{report['plate']['tiles']} tiles ({report['plate']['wells']} wells x {report['plate']['fields']} fields x "
          f"{report['plate']['tiles_per_field']})")
    head = ["model", "prec", "per-image old", "per-image default", "amortised", "amort.+20 refine",
            "plate h: old", "default", "amortised", "+20 refine"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in report["rows"]:
        cells = [r["model"], r["precision"][:4]]
        for k in ("per_image_old", "per_image_default", "amortised", "amortised_refine20"):
            cells.append(f"{r[f'{k}_maps_s']:.1f}/s (B {r[f'{k}_batch']})")
        cells += [f"{r[f'plate_h_{k}']:.2f}" for k in ("per_image_old", "per_image_default", "amortised",
                                                        "amortised_refine20")]
        print("| " + " | ".join(cells) + " |")
    for k, v in report["bf16_map_change"].items():
        print(f"bf16 vs fp32 maps, {k}: relative L2 change {v:.3f}")
    for s in report["skipped"]:
        print(f"skipped: {s}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
