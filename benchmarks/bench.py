"""How fast is pcim on the machine at hand? One run, ratios measured within it.

    .venv/bin/python benchmarks/bench.py [--quick] [--only bound,batch,baselines,tiled,demo,workers,screens]
    .venv/bin/python benchmarks/bench.py --only early-stopping [--n 12]   # the patience study (slow)

Sections (one torch thread, OMP_NUM_THREADS=1, so figures from a busy shared machine stay comparable):
  bound      the classifier's own cost, T x (forward + backward) at the batch a PCIM step sends (2B
             images for the keep-delete objective), vs fit_pcim on B images at the same T: the ratio
             is PCIM's overhead (mixing, Adam, bookkeeping); also the mixing ops alone (a free model)
  batch      maps per second vs batch size (1, 4, 16, 64), without and with channels_last inputs
  levers     engine.pcim.FastForward (autocast bfloat16, channels_last; meant for GPUs) vs float32:
             time and how much the maps change
  baselines  the same images through integrated gradients (50 steps) and occlusion (Captum when
             installed, else pcim_cli.engine.baselines), and saliency, for scale
  tiled      one 5-channel 2160x2160 field through the worker with a fixed 256x256 model (100 tiles,
             2 Adam steps, one map over the field): wall time, share spent cutting / stitching, peak
             memory of the process, at compute.batch_size 16 (the field's 200 tile images of a step go
             through the model in checkpointed calls of 32) and 128 (all 200 in one call, as before)
  demo       `pcim explain` (explain.run, in-process) on 4 wells (8 fields) of the demo plate at the
             shipped settings: fields per minute and the share of wall time reading TIFFs, fitting,
             writing the store
  workers    benchmarks/bench_workers.py (wells/min with 1 vs 2 local Dask workers), when it exists
  screens    benchmarks/bench_screens.py: two plates in one command vs two commands (wall-time ratio on a
             2-worker local cluster), and the no-op rerun of 20 complete plates (seconds, cluster started?)
  busy       a busy machine: `pcim explain` (a subprocess, cluster none, no OMP_NUM_THREADS) on demo wells
             while two other torch jobs with torch's default threads run beside it, with
             compute.threads auto and with as many threads as CPUs (what torch takes by itself), vs
             the one-thread bound measured under the same load (steps x fwd+bwd of the same batch)
  objects    plate.objects: the demo wells of `demo` with and without their nuclei tables (wall time
             ratio, and the object seconds the records hold), and one dense 512x512 field of the demo
             generator (~200 nuclei, untiled) at the shipped settings: the share of its time spent on
             the object table (per-object deletions in batches of compute.batch_size)
Writes benchmarks/results/bench.json (and early_stopping.json) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pcim_cli.engine import attribute as attribute_mod  # noqa: E402
from pcim_cli.engine import metrics  # noqa: E402
from pcim_cli.engine.pcim import FastForward, PcimOptions, fit_pcim  # noqa: E402

DEMO = ROOT / "sample_plates" / "demo"
RESULTS = ROOT / "benchmarks" / "results"
#: classifier steps per map of the default fit, and of the default before issue 14 (for comparison)
DEFAULT_T = PcimOptions().steps
OLD_T = 300
SECTIONS = ("bound", "batch", "levers", "baselines", "tiled", "demo", "workers", "objects", "busy", "screens")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _demo_model() -> torch.jit.ScriptModule:
    model = torch.jit.load(str(DEMO / "classifier.ts")).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _demo_images(b: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g), torch.ones(b, dtype=torch.long)


def _fwd_bwd(model, x: torch.Tensor) -> None:
    xx = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx)[:, 1].sum(), xx)


# --------------------------------------------------------------------------------------------------


def bench_bound(steps: int, batch: int, repeats: int) -> dict:
    """T x fwd+bwd of the classifier at 2B vs fit_pcim on B maps, interleaved `repeats` times."""
    model = _demo_model()
    x, target = _demo_images(batch)
    opts = PcimOptions(steps=steps)
    fit_pcim(model, x[:2], target[:2], dataclasses.replace(opts, steps=2))  # warm up
    pairs = torch.cat([x, x])
    bounds, fits, frees = [], [], []
    for _ in range(repeats):
        bounds.append(_timed(lambda: [_fwd_bwd(model, pairs) for _ in range(steps)]))
        fits.append(_timed(lambda: fit_pcim(model, x, target, opts)))
    free = lambda z: z.mean(dim=(2, 3))[:, :2] * 1.0  # noqa: E731 - a model that costs nothing
    for _ in range(repeats):
        frees.append(_timed(lambda: fit_pcim(free, x, target, opts)))
    ratios = [f / b for f, b in zip(fits, bounds, strict=True)]
    return {
        "model": "sample_plates/demo/classifier.ts", "image": [3, 128, 128], "steps": steps, "batch": batch,
        "bound_s": float(np.median(bounds)), "pcim_s": float(np.median(fits)),
        "bound_s_per_map": float(np.median(bounds)) / batch, "pcim_s_per_map": float(np.median(fits)) / batch,
        "ratio": float(np.median(ratios)), "ratios": ratios,
        "mixing_only_s": float(np.median(frees)),
        "mixing_share_of_bound": float(np.median(frees) / np.median(bounds)),
    }


def bench_batch(steps: int, sizes: tuple[int, ...]) -> list[dict]:
    model = _demo_model()
    out = []
    for b in sizes:
        x, target = _demo_images(b)
        fit_pcim(model, x, target, PcimOptions(steps=1))  # warm up: kernels are chosen per input shape
        for cl in (False, True):
            fwd = FastForward(model, channels_last=cl)
            secs = _timed(lambda x=x, target=target, fwd=fwd: fit_pcim(fwd, x, target, PcimOptions(steps=steps)))
            out.append({"batch": b, "channels_last": cl, "steps": steps, "s": secs, "maps_per_s": b / secs,
                        "s_per_map_at_default_steps": secs / b * DEFAULT_T / steps})
    return out


def bench_levers(steps: int, batch: int) -> list[dict]:
    """FastForward (autocast precision, channels_last) vs plain float32: time and map change."""
    model = _demo_model()
    x, target = _demo_images(batch)
    opts = PcimOptions(steps=steps)
    out, ref = [], None
    for precision, cl in (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)):
        fwd = FastForward(model, precision, channels_last=cl)
        fit_pcim(fwd, x[:2], target[:2], dataclasses.replace(opts, steps=2))  # warm up (kernel choice)
        t0 = time.perf_counter()
        r = fit_pcim(fwd, x, target, opts)
        secs = time.perf_counter() - t0
        ref = r if ref is None else ref
        rel = (r.maps - ref.maps).abs().sum((1, 2, 3)) / ref.maps.abs().sum((1, 2, 3)).clamp(min=1e-12)
        out.append({"precision": precision, "channels_last": cl, "steps": steps, "batch": batch, "s": secs,
                    "time_vs_float32": secs / out[0]["s"] if out else 1.0, "map_rel_l1_vs_float32": float(rel.mean()),
                    "map_max_abs_diff": float((r.maps - ref.maps).abs().max())})
    return out


def bench_baselines(batch: int, pcim_s_per_step_per_map: float) -> dict:
    model = _demo_model()
    x, target = _demo_images(batch)
    backend = "captum" if attribute_mod.captum_available() else "torch (pcim_cli.engine.baselines)"
    opts = PcimOptions()
    pcim_default, pcim_old = pcim_s_per_step_per_map * DEFAULT_T, pcim_s_per_step_per_map * OLD_T
    out = {"backend": backend, "batch": batch, "pcim_default_steps": DEFAULT_T, "pcim_s_per_map": pcim_default,
           "pcim_s_per_map_old_300_steps": pcim_old, "methods": {}}
    for method in ("saliency", "integrated-gradients", "occlusion"):
        secs = _timed(lambda m=method: attribute_mod.attribute(model, x, target, m, opts))
        out["methods"][method] = {"s_per_map": secs / batch,
                                  "pcim_over_method": pcim_default / (secs / batch),
                                  "pcim_old_over_method": pcim_old / (secs / batch)}
    out["methods"]["integrated-gradients"]["steps"] = opts.ig_steps
    out["methods"]["occlusion"]["window_stride"] = [opts.occlusion_window, opts.occlusion_stride]
    return out


class _TileNet(torch.nn.Module):
    """A 5-channel classifier that needs exactly 256x256 inputs (DemoNet-like body, linear head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(5, 16, 5, stride=2, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32 * 32 * 32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def bench_tiled(steps: int, batch: int, method: str = "pcim", explainer: str | None = None) -> dict:
    """One 2160x2160x5 field, 256 px tiles, through the worker (in this process): time and peak memory.
    method pcim-amortised takes the explainer file `explainer` (benchmarks/bench_amortised.py)."""
    import tifffile

    from pcim_cli.engine import tiling
    from pcim_cli.io import store
    from pcim_cli.io.model import file_sha256
    from pcim_cli.run import device, worker
    from pcim_cli.run.task import FieldFiles, WellTask

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = tmp / "tile256.ts"
        torch.jit.trace(_TileNet().eval(), torch.rand(2, 5, 256, 256)).save(str(model_path))
        rng = np.random.default_rng(0)
        files = []
        for c in range(5):
            files.append(str(tmp / f"A01_s1_w{c + 1}.tif"))
            tifffile.imwrite(files[-1], rng.integers(0, 4000, size=(2160, 2160), dtype=np.uint16))
        store.create_plate(tmp / "out.zarr", "BIG", {"A01": 1})
        task = WellTask(
            plate="BIG", well="A01", fields=(FieldFiles(site=1, index=0, files=tuple(files)),),
            channels=tuple("abcde"), classes=("neg", "pos"), targets=None,
            normalize={"method": "percentile", "low": 1.0, "high": 99.8}, model_path=str(model_path),
            model_sha256=file_sha256(model_path), input_size=(256, 256),
            engine=dataclasses.asdict(PcimOptions(steps=steps)), batch_size=batch, fidelity=False,
            store_path=str(tmp / "out.zarr"), fingerprint="bench", method=method, explainer_path=explainer,
            explainer_sha256=None if explainer is None else file_sha256(explainer))
        rss_before = device.peak_memory_mib()["rss"]
        wall = _timed(lambda: worker.explain_well(task))
        _, _, record = store.read_field(tmp / "out.zarr", "A01", 0)
        grid = tiling.plan_tiles((2160, 2160), (256, 256))
        field = torch.rand(5, 2160, 2160)
        cut_s = _timed(lambda: [tiling.cut(field, grid, range(i, min(i + batch, grid.n_tiles)))
                                for i in range(0, grid.n_tiles, batch)])
        stitch_s = _timed(lambda: tiling.stitch(grid, torch.rand(grid.n_tiles, 1, 256, 256)))
    return {
        "field": [5, 2160, 2160], "tile": [256, 256], "steps": steps, "batch": batch,
        "tiling": record["tiling"], "wall_s": wall, "timings_s": record["timings_s"],
        "cut_plus_stitch_s": cut_s + stitch_s, "cut_plus_stitch_share": (cut_s + stitch_s) / wall,
        "peak_rss_mib_before": rss_before, "peak_memory_mib": record["peak_memory_mib"],
        "field_mib": 5 * 2160 * 2160 * 4 / 2**20,
    }


def bench_demo(wells: list[str], overrides: tuple[str, ...] = ()) -> dict:
    """`pcim explain` (in this process: explain.run) on some demo wells at the shipped settings (plus
    `overrides`, --set style), in a fresh store, with the store writes timed; reading and fitting come from
    the field records."""
    from pcim_cli import config
    from pcim_cli.io import store
    from pcim_cli.run import explain

    writes: list[float] = []
    write_field = store.write_field

    def timed_write(*args, **kw):
        t0 = time.perf_counter()
        try:
            return write_field(*args, **kw)
        finally:
            writes.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load_config(DEMO / "plate.yaml", overrides=[
            f"output.zarr={tmp}/d.zarr", f"output.csv={tmp}/d.csv", f"plate.wells=[{','.join(wells)}]",
            "compute.cluster=none", *overrides])
        store.write_field = timed_write
        try:
            t0 = time.perf_counter()
            result = explain.run(cfg)
            wall = time.perf_counter() - t0
        finally:
            store.write_field = write_field
        read = fit = 0.0
        n = 0
        for path in result.summary["PCIM_ZarrPath"]:
            row, col, index = str(path).split("/")
            rec = store.read_record(Path(f"{tmp}/d.zarr"), f"{row}{int(col):02d}", int(index))
            read, fit, n = read + rec["timings_s"]["read"], fit + rec["timings_s"]["fit"], n + 1
    write = sum(writes)
    return {
        "wells": wells, "fields": n, "steps": PcimOptions().steps, "batch_size": cfg.compute.batch_size,
        "maps_per_chunk": 2, "wall_s": wall,  # a chunk never spans wells: the demo's 2 fields per well
        "fields_per_min": 60 * n / wall, "fields_per_min_fitting_only": 60 * n / fit,
        "read_s": read, "fit_s": fit, "write_s": write,
        "share_read": read / wall, "share_fit": fit / wall, "share_write": write / wall,
        "share_other": 1 - (read + fit + write) / wall,
    }


def _objects_run(tmp: str, name: str, overrides: list[str]) -> tuple[float, list[dict]]:
    """Wall time of explain.run on the demo plate with these overrides, and the records it wrote."""
    from pcim_cli import config
    from pcim_cli.io import store
    from pcim_cli.run import explain

    cfg = config.load_config(DEMO / "plate.yaml", overrides=[
        f"output.zarr={tmp}/{name}.zarr", f"output.csv={tmp}/{name}.csv", "compute.cluster=none", *overrides])
    t0 = time.perf_counter()
    result = explain.run(cfg)
    wall = time.perf_counter() - t0
    records = []
    for path in result.summary["PCIM_ZarrPath"]:
        row, col, index = str(path).split("/")
        records.append(store.read_record(Path(cfg.output.zarr), f"{row}{int(col):02d}", int(index)))
    return wall, records


def bench_objects(wells: list[str], dense_size: int = 512) -> dict:
    """Object tables' cost: demo wells with / without plate.objects (same process, alternating), and a
    dense field."""
    import tifffile

    sys.path.insert(0, str(DEMO))
    import make_demo

    out: dict = {"wells": wells}
    with tempfile.TemporaryDirectory() as tmp:
        walls: dict[str, list[float]] = {"with": [], "without": []}
        objects_s = fit_s = 0.0
        for rep in range(2):  # alternate, so that load changes on a shared machine hit both alike
            for kind in (("without", "with") if rep == 0 else ("with", "without")):
                extra = [f"plate.wells=[{','.join(wells)}]"] + (["plate.objects=null"] if kind == "without" else [])
                wall, records = _objects_run(tmp, f"{kind}{rep}", extra)
                walls[kind].append(wall)
                if kind == "with":
                    objects_s += sum(r["timings_s"].get("objects", 0.0) for r in records)
                    fit_s += sum(r["timings_s"]["fit"] for r in records)
        out.update(walls=walls, wall_ratio=sum(walls["with"]) / sum(walls["without"]),
                   objects_s=objects_s, objects_share_of_fit=objects_s / fit_s,
                   objects_share_of_wall=objects_s / sum(walls["with"]))
        # one dense field: the generator at dense_size px keeps the nuclei density (~200 at 512 px)
        plate = Path(tmp) / "dense"
        (plate / "images").mkdir(parents=True)
        (plate / "labels").mkdir()
        img, _, lab = make_demo.make_field(np.random.default_rng([7, dense_size]), True, dense_size,
                                           return_labels=True)
        for c in range(3):
            tifffile.imwrite(plate / "images" / f"A01_s1_w{c + 1}.tif", img[c])
        tifffile.imwrite(plate / "labels" / "A01_s1_nuclei.tif", lab)
        text = (DEMO / "plate.yaml").read_text().replace("images: images/", f"images: {plate / 'images'}")
        text = text.replace("labels/{well}", f"{plate / 'labels'}/{{well}}").replace("path: classifier.ts",
                                                                                     f"path: {DEMO / 'classifier.ts'}")
        (plate / "plate.yaml").write_text(text.replace("layout: layout.csv", "layout: null"))
        from pcim_cli import config
        from pcim_cli.io import store
        from pcim_cli.run import explain

        cfg = config.load_config(plate / "plate.yaml", overrides=["compute.cluster=none"])
        explain.run(cfg)
        record = store.read_record(Path(cfg.output.zarr), "A01", 0)
        t = record["timings_s"]
        out["dense"] = {"size": dense_size, "objects": record["objects"]["Nuclei"]["count"],
                        "batch_size": cfg.compute.batch_size, "fit_s": t["fit"], "objects_s": t["objects"],
                        "objects_share": t["objects"] / (t["fit"] + t["objects"] + t["read"])}
    return out


def bench_workers(name: str = "bench_workers.py") -> dict:
    """Run benchmarks/`name` (its own JSON document on stdout)."""
    script = ROOT / "benchmarks" / name
    if not script.exists():
        return {"skipped": f"benchmarks/{name} does not exist"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    result: dict = {"returncode": proc.returncode, "output": proc.stdout[-4000:]}
    if proc.returncode != 0:
        result["stderr"] = proc.stderr[-2000:]
    return result


# --------------------------------------------------------------------------------------------------
# a busy machine: the plate beside two other torch jobs

_COMPETITOR = """
import torch
conv = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.rand(16, 3, 128, 128, requires_grad=True)
while True:
    conv(x).sum().backward()
"""


def _free_env() -> dict:
    """This environment without OMP_NUM_THREADS: torch and pcim choose their threads themselves."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def _pair_bound(model, x: torch.Tensor, steps: int, repeats: int = 3) -> float:
    """Seconds for `steps` fwd+bwd of the kept+deleted batch of x at one thread (median of repeats)."""
    pairs = torch.cat([x, x])
    _fwd_bwd(model, pairs)
    return float(np.median([_timed(lambda: [_fwd_bwd(model, pairs) for _ in range(steps)])
                            for _ in range(repeats)]))


def bench_busy(wells: list[str], steps: int, settings: tuple[str, ...] = ("auto", "cpus")) -> dict:
    """The demo wells through `pcim explain` beside two torch jobs, vs the one-thread bound under that load."""
    from pcim_cli.io import store
    from pcim_cli.run import threads

    cpus = threads.read_limits(_free_env()).usable
    model = _demo_model()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))  # a chunk: the 2 fields of a well
    torch.set_num_threads(1)
    quiet_step = _pair_bound(model, x, steps) / steps
    jobs = [subprocess.Popen([sys.executable, "-c", _COMPETITOR], env=_free_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(2)]
    out: dict = {"wells": wells, "steps": steps, "cpus": cpus, "competitors": 2, "runs": {},
                 "quiet_step_s": quiet_step}
    try:
        time.sleep(3)  # let them start
        bound_before = _pair_bound(model, x, steps)
        for setting in (str(cpus) if s == "cpus" else s for s in settings):
            with tempfile.TemporaryDirectory() as tmp:
                log = Path(tmp) / "run.log"
                proc = subprocess.run(
                    [sys.executable, "-m", "pcim_cli.cli", "explain", str(DEMO / "plate.yaml"), "-q",
                     "--log-file", str(log), "--set", "compute.cluster=none", "--set", "explain.fidelity=false",
                     "--set", f"explain.steps={steps}", "--set", f"compute.threads={setting}",
                     "--set", f"plate.wells=[{','.join(wells)}]", "--set", f"output.zarr={tmp}/b.zarr",
                     "--set", f"output.csv={tmp}/b.csv"], cwd=ROOT, env=_free_env(), capture_output=True, text=True)
                fit = sum(store.read_record(Path(tmp) / "b.zarr", w, i)["timings_s"]["fit"]
                          for w in wells for i in range(2)) if proc.returncode == 0 else float("nan")
                chosen = [line.split("torch threads: ", 1)[1] for line in log.read_text().splitlines()
                          if "torch threads: " in line] if log.exists() else []
            out["runs"][setting] = {"returncode": proc.returncode, "fit_s": fit, "threads_log": chosen,
                                    "stderr": proc.stderr[-500:]}
        bound_after = _pair_bound(model, x, steps)
    finally:
        for job in jobs:
            job.kill()
            job.wait()
    # one chunk (2 maps) per well; the default fit's gradient init adds one pass of the 2 images (half a pair)
    passes = (steps + 0.5 * (PcimOptions().init == "gradient")) / steps
    bound = len(wells) * (bound_before + bound_after) / 2 * passes
    out.update(bound_s=bound, bound_before_s=bound_before * len(wells), bound_after_s=bound_after * len(wells),
               load_slowdown_of_one_thread=(bound_before + bound_after) / 2 / steps / quiet_step)
    for r in out["runs"].values():
        r["ratio_to_bound"] = r["fit_s"] / bound
    return out


# --------------------------------------------------------------------------------------------------
# early stopping: is a nonzero default patience worth it?


def _top_overlap(a: torch.Tensor, b: torch.Tensor, share: float = 0.01) -> float:
    a, b = a.sum(1).flatten(1), b.sum(1).flatten(1)
    k = max(1, int(share * a.shape[1]))
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb, strict=True)]))


def bench_early_stopping(n: int, patiences: list[int], tol: float) -> list[dict]:
    from benchmarks import evalsets

    rows = []
    for name in ("demo", "nuclei"):
        ev = evalsets.load(name, n=n)
        x, target, mask, model = ev["x"], ev["target"], ev["mask"], ev["model"]
        ref = None
        for p in patiences:
            opts = PcimOptions(patience=p, tol=tol)
            t0 = time.perf_counter()
            r = fit_pcim(model, x, target, opts)
            secs = (time.perf_counter() - t0) / len(x)
            ref = r if ref is None else ref
            rel = (r.maps - ref.maps).abs().sum((1, 2, 3)) / ref.maps.abs().sum((1, 2, 3)).clamp(min=1e-12)
            fr = metrics.default_fractions(0.2, 40)
            rows.append({
                "set": ev["name"], "patience": p, "tol": tol, "s_per_map": secs,
                "mean_steps": float(r.steps.float().mean()),
                "map_rel_l1_vs_p0": float(rel.mean()), "map_rel_l1_max": float(rel.max()),
                "top1pct_overlap_vs_p0": _top_overlap(r.maps, ref.maps),
                "pixel_auroc": float(metrics.pixel_auroc(r.maps, mask).nanmean()),
                "deletion_auc_top20": float(metrics.deletion_auc(model, x, r.maps, target, fractions=fr).mean()),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_1min": os.getloadavg()[0]}


def table(res: dict) -> str:
    lines = ["| what | figure |", "|---|---|"]
    if "bound" in res:
        b = res["bound"]
        lines += [
            f"| classifier bound, T x fwd+bwd (T={b['steps']}, {2 * b['batch']} images of 3x128x128) "
            f"| {b['bound_s_per_map'] * DEFAULT_T / b['steps']:.2f} s per map at T={DEFAULT_T} |",
            f"| PCIM fit (B={b['batch']}, same T) | {b['pcim_s_per_map'] * DEFAULT_T / b['steps']:.2f} s per map at "
            f"T={DEFAULT_T} |",
            f"| PCIM / bound | {b['ratio']:.3f} (runs: {', '.join(f'{r:.3f}' for r in b['ratios'])}) |",
            f"| mixing + Adam alone (free model) / bound | {b['mixing_share_of_bound']:.3f} |",
        ]
    for r in res.get("batch", []):
        lines.append(f"| batch {r['batch']}{' + channels_last' if r['channels_last'] else ''}: maps per second "
                     f"(T={r['steps']}) | {r['maps_per_s']:.2f} ({r['s_per_map_at_default_steps']:.2f} s per map "
                     f"at T={DEFAULT_T}) |")
    for r in res.get("levers", []):
        lines.append(f"| {r['precision']}{' + channels_last' if r['channels_last'] else ''} "
                     f"(B={r['batch']}, T={r['steps']}) | time x{r['time_vs_float32']:.2f} of float32; "
                     f"maps differ by {100 * r['map_rel_l1_vs_float32']:.1f} % (relative L1) |")
    if "baselines" in res:
        bl = res["baselines"]
        for m, r in bl["methods"].items():
            lines.append(f"| {m} ({bl['backend']}) | {r['s_per_map']:.3f} s per map; PCIM at T={DEFAULT_T} is "
                         f"{r['pcim_over_method']:.1f}x slower (at the old T={OLD_T}: "
                         f"{r['pcim_old_over_method']:.0f}x) |")
    for t in [r for r in res.get("tiled", []) if "error" not in r]:
        calls = min(2 * t["batch"], 2 * t["tiling"]["n_tiles"])
        lines += [
            f"| 5x2160x2160 field, 256 px tiles ({t['tiling']['n_tiles']} tiles, T={t['steps']}, "
            f"B={t['batch']}: {calls} tiles per model call) | {t['wall_s']:.1f} s; cut + stitch "
            f"{100 * t['cut_plus_stitch_share']:.1f} % |",
            f"| peak RSS of that process (after start-up / after the field; the field itself is "
            f"{t['field_mib']:.0f} MiB) | {t['peak_rss_mib_before']:.0f} / {t['peak_memory_mib']['rss']:.0f} MiB |",
        ]
    if "demo" in res and "error" not in res["demo"]:
        d = res["demo"]
        lines += [
            f"| demo plate end to end ({d['fields']} fields, T={d['steps']}) | {d['fields_per_min']:.2f} fields/min "
            f"({d['fields_per_min_fitting_only']:.2f} counting fitting only) |",
            f"| share of wall time: read TIFFs / fit / write store / other | {100 * d['share_read']:.1f} / "
            f"{100 * d['share_fit']:.1f} / {100 * d['share_write']:.1f} / {100 * d['share_other']:.1f} % |",
        ]
    if "busy" in res:
        b = res["busy"]
        for setting, r in b["runs"].items():
            what = "compute.threads auto" if setting == "auto" else f"{setting} threads (torch's own choice)"
            lines.append(f"| busy machine: demo plate ({len(b['wells'])} wells, T={b['steps']}) beside 2 torch jobs, "
                         f"{what} | {r['ratio_to_bound']:.2f}x the one-thread bound under the same load "
                         f"({r['fit_s']:.1f} s vs {b['bound_s']:.1f} s) |")
        lines.append(f"| the load itself: one thread's step under it / quiet | "
                     f"{b['load_slowdown_of_one_thread']:.2f}x |")
    if "objects" in res:
        o = res["objects"]
        lines.append(f"| object tables (plate.objects, demo {len(o['wells'])} wells, ~12 nuclei per 128 px field): "
                     f"wall time with / without | x{o['wall_ratio']:.3f} (object seconds in the records: "
                     f"{100 * o['objects_share_of_wall']:.2f} % of the wall time) |")
        d = o["dense"]
        lines.append(f"| one dense {d['size']}x{d['size']} field, {d['objects']} nuclei, untiled (B={d['batch_size']}) "
                     f"| object table {d['objects_s']:.1f} s = {100 * d['objects_share']:.1f} % of the field's time |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated, or early-stopping")
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    ap.add_argument("--busy-threads", default="auto,cpus",
                    help="busy: compute.threads settings to run beside the load (cpus = as many as CPUs)")
    ap.add_argument("--n", type=int, default=12, help="images per eval set (early-stopping)")
    ap.add_argument("--patience", default="0,20,50", help="patience values (early-stopping)")
    ap.add_argument("--child-tiled", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child_tiled:
        print(json.dumps(bench_tiled(steps=args.child_tiled, batch=args.child_batch)))
        return
    only = args.only.split(",")
    q = args.quick
    if only == ["early-stopping"]:
        rows = bench_early_stopping(args.n, [int(p) for p in args.patience.split(",")], 1e-3)
        (RESULTS / "early_stopping.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
        return
    res: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "bound" in only:
        res["bound"] = bench_bound(steps=5 if q else 30, batch=16, repeats=2 if q else 3)
    if "batch" in only:
        res["batch"] = bench_batch(steps=3 if q else 10, sizes=(1, 4, 16, 64))
    if "levers" in only:
        res["levers"] = bench_levers(steps=3 if q else 10, batch=16)
    if "baselines" in only:
        per_step = res["bound"]["pcim_s_per_map"] / res["bound"]["steps"] if "bound" in res else float("nan")
        res["baselines"] = bench_baselines(4 if q else 16, per_step)
    if "tiled" in only:  # each in a fresh process, so that its peak memory is its own
        res["tiled"] = []
        for batch in (16, 128):
            proc = subprocess.run([sys.executable, __file__, "--child-tiled", str(1 if q else 2), "--child-batch",
                                   str(batch)], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            res["tiled"].append(json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]})
    if "demo" in only:
        res["demo"] = bench_demo(["A01"] if q else ["A01", "A02", "B01", "B02"])
    if "workers" in only:
        res["workers"] = bench_workers()
    if "busy" in only:
        res["busy"] = bench_busy(["A01"] if q else ["A01", "A02", "B01", "B02"], steps=20 if q else PcimOptions().steps,
                                 settings=tuple(args.busy_threads.split(",")))
    if "objects" in only:
        res["objects"] = bench_objects(["A01"] if q else ["A01", "A02", "B01", "B02"], 256 if q else 512)
    if "screens" in only:
        res["screens"] = bench_workers("bench_screens.py")
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    if "workers" in res:
        print("\nbench_workers.py:", res["workers"].get("output") or res["workers"])
    if "screens" in res:
        print("\nbench_screens.py:", res["screens"].get("output") or res["screens"])
    print(f"\nmachine: {res['machine']}; written to {RESULTS / 'bench.json'}")


if __name__ == "__main__":
    main()
