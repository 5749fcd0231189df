"""Screen throughput (issue 28): the goal table, every figure measured in this run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_throughput.py [--quick] [--only sets,busy,bound,field,driver]

Sections (one torch thread unless said; wall seconds and process CPU seconds, whose ratios a loaded
machine disturbs far less than wall times):

  sets    every evaluation set (benchmarks/evalsets: demo, demo-resnet, nuclei, nuclei-resnet, ihc) as a
          plate of `--fields` fields (TIFFs, its model, an explainer of the pcim format: untrained, since
          a map's cost does not depend on the explainer's weights): `pcim explain` (in-process) with the
          per-image default on `--per-image` of its fields and pcim-amortised on all of them, both at the
          shipped settings (explain.fidelity: auto = every map for the per-image fit, a sample for
          pcim-amortised), seconds per map end to end and the ratio. Goal: >= 100x.
  busy    the thread policy beside other CPU work: the demo set's plate through the `pcim` command with
          compute.threads auto (no OMP_NUM_THREADS), quiet and beside one and two `python -c "while 1: pass"`
          processes, for pcim-amortised and the per-image default: busy / quiet (goal: <= 1.3x), and
          auto against `compute.threads: 1` beside the same load (what the policy itself costs).
  bound   the per-image default end to end (fidelity on every map, and on one field in 8) against
          T x (forward + backward) of the same batches through the same model call (channels-last when the
          worker uses it), in CPU seconds, on the demo and nuclei-resnet sets and on the demo plate with a
          ~3x heavier classifier (demo-wide). Goal: <= 1.10x.
  field   one 3 x 2160 x 2160 field (a mosaic of the demo plate's fields, the demo classifier on 256 px
          tiles, 100 tiles): pcim-amortised (the demo-plate explainer of bench_amortised.py when it exists,
          else an untrained one); its record's timings: fixed costs (read + normalise, blur substrate,
          object and channel shares, store write) against the map (explainer and forwards). Goal: <= 10 %.
          And the stored map's size per target against the same map stored as before (float32, zstd 0).
          Goal: <= 4 MB.
  driver  benchmarks/bench_driver.py: a 1536-well x 2-field plate, no-op rerun and `pcim status`.
          Goals: <= 5 s, <= 3 s, peak memory <= 1 GiB.

Writes benchmarks/results/bench_throughput.json and prints the goal table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evalsets  # noqa: E402

from pcim_cli.engine.explainer import make_explainer  # noqa: E402
from pcim_cli.engine.pcim import FastForward, PcimOptions  # noqa: E402
from pcim_cli.io.explainer import engine_record, save_explainer  # noqa: E402
from pcim_cli.io.model import file_sha256  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEMO = ROOT / "sample_plates" / "demo"
BIN = Path(sys.executable).parent
SETS = {"demo": ("demo", {}), "demo-resnet": ("demo", {"arch": "resnet"}), "nuclei": ("nuclei", {}),
        "nuclei-resnet": ("nuclei", {"arch": "resnet"}), "ihc": ("ihc", {})}
ROWS = "ABCDEFGHIJKLMNOP"


# --------------------------------------------------------------------------------------------------
# plates of the evaluation sets


def well_names(n: int) -> list[str]:
    """The first n wells of a 384-well plate, row by row."""
    return [f"{ROWS[i // 24]}{i % 24 + 1:02d}" for i in range(n)]


def make_set_plate(root: Path, set_name: str, fields: int) -> tuple[Path, dict]:
    """The set's first `fields` fields as a plate of 2-field wells (float32 TIFFs, normalize: none), its model
    and an (untrained) explainer; returns plate.yaml and facts about the set."""
    name, kw = SETS[set_name]
    ev = evalsets.load(name, n=fields, **kw)
    x = ev["x"].numpy().astype(np.float32)
    (root / "images").mkdir(parents=True, exist_ok=True)
    wells = well_names((len(x) + 1) // 2)
    for i in range(len(x)):
        for c in range(x.shape[1]):
            tifffile.imwrite(root / "images" / f"{wells[i // 2]}_s{i % 2 + 1}_w{c + 1}.tif", x[i, c])
    torch.jit.save(ev["model"], str(root / "model.ts"))
    channels = {str(n): str(c + 1) for c, n in enumerate(ev["channels"])}
    config = {
        "plate": {"name": set_name.upper().replace("-", ""), "images": "images",
                  "pattern": "{well}_s{field}_w{channel}.tif", "channels": channels},
        "model": {"path": "model.ts", "classes": list(ev["classes"]), "normalize": {"method": "none"},
                  "input_size": list(ev["tile"]) if ev.get("tile") else None},
        "explain": {"method": "pcim"},
        "compute": {"cluster": "none"},
        "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"},
    }
    (root / "plate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    opts = PcimOptions()
    save_explainer(make_explainer(x.shape[1], len(ev["classes"]), opts), root / "explainer.pt", {
        "classifier_sha256": file_sha256(root / "model.ts"), "channels": list(channels),
        "classes": list(ev["classes"]), "normalize": _normalize_of(root / "plate.yaml"),
        "engine": engine_record(opts)})
    return root / "plate.yaml", {"set": set_name, "model": ev["name"], "fields": len(x), "wells": wells,
                                  "size": list(x.shape[1:]), "tile": ev.get("tile")}


def _normalize_of(plate: Path) -> dict:
    from pcim_cli.config import load_config

    return load_config(plate).model.normalize.model_dump()


def explain_in_process(plate: Path, out: Path, overrides: list[str]) -> dict:
    """explain.run on a plate in this process: wall and CPU seconds, maps, the run's records."""
    from pcim_cli.config import load_config
    from pcim_cli.run import explain

    cfg = load_config(plate, overrides=[f"output.zarr={out}.zarr", f"output.csv={out}.csv", *overrides])
    w0, c0 = time.perf_counter(), time.process_time()
    result = explain.run(cfg)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    done = result.summary[result.summary["PCIM_Status"] == "done"]
    return {"wall_s": wall, "cpu_s": cpu, "maps": len(done), "exit": result.exit_code,
            "wall_per_map": wall / max(1, len(done)), "cpu_per_map": cpu / max(1, len(done)),
            "fidelity_maps": int(done["PCIM_DeletionAUC"].notna().sum()),
            "statuses": result.summary["PCIM_Status"].value_counts().to_dict(),
            "errors": sorted(set(result.summary["PCIM_Error"].dropna().astype(str)) - {""})[:3]}


def bench_sets(names: list[str], fields: int, per_image: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for set_name in names:
            root = Path(tmp) / set_name
            try:
                plate, facts = make_set_plate(root, set_name, fields)
            except evalsets.DataUnavailableError as exc:
                rows.append({"set": set_name, "skipped": str(exc)})
                continue
            subset = facts["wells"][: max(1, per_image // 2)]
            explain_in_process(plate, root / "warm", ["plate.wells=[" + subset[0] + "]", "explain.steps=1"])
            pi = explain_in_process(plate, root / "pi", [f"plate.wells=[{','.join(subset)}]"])
            am = explain_in_process(plate, root / "am", ["explain.method=pcim-amortised",
                                                         f"explain.explainer={root / 'explainer.pt'}"])
            row = {**facts, "wells": len(facts["wells"]), "per_image": pi, "amortised": am,
                   "ratio_wall": pi["wall_per_map"] / am["wall_per_map"],
                   "ratio_cpu": pi["cpu_per_map"] / am["cpu_per_map"]}
            rows.append(row)
            print(f"{set_name}: per-image {pi['wall_per_map']:.3f} s/map, "
                  f"amortised {am['wall_per_map'] * 1e3:.1f} ms/map"
                  f": {row['ratio_wall']:.0f}x wall, {row['ratio_cpu']:.0f}x CPU", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# busy machine


LOAD = "while 1: pass"


def _pcim_subprocess(args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the policy decides
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "pcim"), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"pcim {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return time.perf_counter() - t0


def bench_busy(fields: int, per_image: int) -> dict:
    """`pcim explain` (threads auto) quiet and beside `load` busy processes (1: one core of 2 left, 2: none),
    and beside the same load with `compute.threads: 1` forced (the best a policy can do there: one
    thread loses nothing to a busy neighbour). Runs alternate; ratios of summed wall seconds."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        plate, facts = make_set_plate(Path(tmp) / "demo", "demo", fields)
        wells = facts["wells"]
        runs = {"pcim-amortised": ["--set", "explain.method=pcim-amortised",
                                   "--set", f"explain.explainer={Path(tmp) / 'demo' / 'explainer.pt'}"],
                "per-image default": ["--set", f"plate.wells=[{','.join(wells[: max(1, per_image // 2)])}]"]}
        plan = [("quiet", 0, []), ("busy1", 1, []), ("busy1-t1", 1, ["--set", "compute.threads=1"]),
                ("busy2", 2, []), ("busy2-t1", 2, ["--set", "compute.threads=1"])]
        for label, extra in runs.items():
            times: dict[str, list[float]] = {mode: [] for mode, _, _ in plan}
            threads: dict[str, list[str]] = {}
            for rep, (mode, load, forced) in enumerate(plan + plan[::-1]):
                jobs = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(load)]
                try:
                    time.sleep(1 if jobs else 0)
                    log = Path(tmp) / f"{label[:3]}{rep}.log"
                    times[mode].append(_pcim_subprocess(
                        ["explain", str(plate), "-q", "--log-file", str(log), "--set", f"output.zarr={tmp}/{rep}.zarr",
                         "--set", f"output.csv={tmp}/{rep}.csv", "--force", *extra, *forced]))
                    threads.setdefault(mode, []).extend(
                        line.split("torch threads: ", 1)[1] for line in log.read_text().splitlines()
                        if "torch threads: " in line)
                finally:
                    for job in jobs:
                        job.kill()
                        job.wait()
            total = {mode: sum(v) for mode, v in times.items()}
            out[label] = {"seconds": times, "threads": threads,
                          "busy1_over_quiet": total["busy1"] / total["quiet"],
                          "busy_over_quiet": total["busy2"] / total["quiet"],
                          "auto_over_one_thread_busy1": total["busy1"] / total["busy1-t1"],
                          "auto_over_one_thread_busy2": total["busy2"] / total["busy2-t1"]}
            o = out[label]
            print(f"busy: {label}: beside 1 busy {o['busy1_over_quiet']:.2f}x quiet, beside 2 "
                  f"{o['busy_over_quiet']:.2f}x; auto / 1 thread: {o['auto_over_one_thread_busy1']:.2f}x, "
                  f"{o['auto_over_one_thread_busy2']:.2f}x", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# per-image against the classifier's own bound


def _same_with_channels_last(model, x: torch.Tensor) -> bool:
    with torch.no_grad():
        ref = model(x[None])
        try:
            got = model(x[None].contiguous(memory_format=torch.channels_last))
        except Exception:  # noqa: BLE001 - as the worker: any failure means NCHW
            return False
    return bool(got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=1e-5))


def wide_classifier(channels: int, classes: int) -> torch.jit.ScriptModule:
    """A heavier classifier than the evaluation sets' (BatchNorm CNN 32-64-128-128 channels, average
    pooling, ~0.24 M parameters, ~3x a demo forward): untrained, since a step's cost does not depend on
    the weights (the fit takes its 49 steps whatever it finds)."""
    def block(i: int, o: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU())

    torch.manual_seed(0)
    net = torch.nn.Sequential(block(channels, 32), torch.nn.MaxPool2d(2), block(32, 64), torch.nn.MaxPool2d(2),
                              block(64, 128), block(128, 128), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(128, classes))
    return torch.jit.script(net.eval())


#: bound rows: (row name, evaluation set whose plate is used, replace its model by wide_classifier?)
BOUND_ROWS = {"demo": ("demo", False), "nuclei-resnet": ("nuclei-resnet", False), "demo-wide": ("demo", True)}


def bench_bound(names: list[str], per_image: int) -> list[dict]:
    """CPU seconds of the per-image default end to end (fidelity on every map, and on one field in 8)
    against (steps + 0.5) x forward + backward of the fit's batches (kept + deleted of a well's 2 fields; the
    gradient init is one pass of the 2 fields, half a batch) through the same model call."""
    rows = []
    opts = PcimOptions()
    with tempfile.TemporaryDirectory() as tmp:
        for row_name in names:
            set_name, wide = BOUND_ROWS[row_name]
            root = Path(tmp) / row_name
            plate, facts = make_set_plate(root, set_name, per_image)
            name, kw = SETS[set_name]
            ev = evalsets.load(name, n=2, **kw)
            if wide:
                torch.jit.save(wide_classifier(ev["x"].shape[1], len(ev["classes"])), str(root / "model.ts"))
            model = torch.jit.load(str(root / "model.ts")).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            x = ev["x"]
            nhwc = _same_with_channels_last(model, x[0])
            forward = FastForward(model, channels_last=True) if nhwc else model
            pairs = torch.cat([x, x])

            def step(forward=forward, pairs=pairs) -> None:
                xx = pairs.detach().requires_grad_(True)
                torch.autograd.grad(forward(xx)[:, 0].sum(), xx)

            def bound(step=step) -> float:
                step()
                c0 = time.process_time()
                for _ in range(opts.steps):
                    step()
                return (time.process_time() - c0) * (opts.steps + 0.5) / opts.steps

            explain_in_process(plate, root / "warm", [f"plate.wells=[{facts['wells'][0]}]", "explain.steps=1"])
            before = bound()
            run = explain_in_process(plate, root / "pi", [])
            middle = bound()
            sampled = explain_in_process(plate, root / "pi8", ["explain.fidelity_every=8"])
            after = bound()
            per_map = (before + 2 * middle + after) / 4 / 2  # a bound per well of 2 fields
            for r in (run, sampled):
                if r["maps"] == 0:  # a ratio of nothing: say why instead
                    print(f"bound: {row_name}: a run made no map (exit {r['exit']}): {r['statuses']} "
                          f"{r['errors']}", file=sys.stderr, flush=True)
            rows.append({"set": row_name, "maps": run["maps"], "exit": run["exit"], "errors": run["errors"],
                         "channels_last": nhwc, "bound_cpu_per_map": per_map,
                         "run_cpu_per_map": run["cpu_per_map"], "ratio": run["cpu_per_map"] / per_map,
                         "sampled_cpu_per_map": sampled["cpu_per_map"],
                         "ratio_fidelity_every_8": sampled["cpu_per_map"] / per_map,
                         "bound_before_middle_after": [before, middle, after]})
            print(f"bound: {row_name}: {rows[-1]['ratio']:.3f}x (fidelity on one field in 8: "
                  f"{rows[-1]['ratio_fidelity_every_8']:.3f}x)", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# one 2160 x 2160 field: fixed costs against the map, and the store's size


#: functions whose time is a field's fixed cost (read + normalise, substrates incl. the blur, object and
#: channel shares, store write, the record); the rest of the run is the map (explainer + model forwards)
FIXED = {"read + normalise": ("worker.py", "_read_checked"), "blur / substrates": ("mixing.py", "substrate"),
         "object + channel shares": ("objects.py", "measure_field"), "store write": ("store.py", "write_field"),
         "planning + CSV": ("explain.py", "plan")}


def make_big_field(root: Path, size: int = 2160) -> Path:
    """One well, one 3 x size x size field: the demo plate's fields tiled (uint16), the demo classifier on
    256 px tiles, an untrained explainer (a dense map: the store's worst case)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    tiles = [[tifffile.imread(DEMO / "images" / f"{w}_s1_w{c}.tif") for c in (1, 2, 3)]
             for w in ("A01", "A02", "B01", "B02", "C03", "D04")]
    reps = -(-size // tiles[0][0].shape[0])
    for c in range(3):
        rows = [np.concatenate([tiles[(i + j) % len(tiles)][c] for j in range(reps)], 1) for i in range(reps)]
        tifffile.imwrite(root / "images" / f"A01_s1_w{c + 1}.tif", np.concatenate(rows, 0)[:size, :size])
    config = yaml.safe_load((DEMO / "plate.yaml").read_text())
    config["plate"].update(images="images", layout=None, wells=None, objects=None)
    config["model"].update(path=str(DEMO / "classifier.ts"), input_size=[256, 256])
    config["compute"].update(cluster="none")
    config["output"] = {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"}
    (root / "plate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    opts = PcimOptions()
    save_explainer(make_explainer(3, 2, opts), root / "explainer.pt", {
        "classifier_sha256": file_sha256(DEMO / "classifier.ts"), "channels": ["DNA", "PH3", "Actin"],
        "classes": ["negative", "mitotic"], "normalize": _normalize_of(root / "plate.yaml"),
        "engine": engine_record(opts)})
    return root / "plate.yaml"


def bench_field(size: int = 2160) -> dict:
    """pcim-amortised on one size x size field under cProfile: the fixed costs' share of its CPU time, and
    the bytes of its stored map (all levels, per target)."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory() as tmp:
        plate = make_big_field(Path(tmp) / "big", size)
        over = ["explain.method=pcim-amortised", f"explain.explainer={Path(tmp) / 'big' / 'explainer.pt'}",
                "explain.fidelity=false"]
        prof = cProfile.Profile(time.process_time)  # CPU seconds: what the load of other jobs disturbs least
        prof.enable()
        run = explain_in_process(plate, Path(tmp) / "f", over)
        prof.disable()
        stats = pstats.Stats(prof).stats
        shares = {}
        for label, (file, func) in FIXED.items():
            shares[label] = sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == func)
        total = sum(v[3] for k, v in stats.items() if k[2] == "explain_in_process")
        store_dir = Path(f"{Path(tmp) / 'f'}.zarr") / "A" / "1" / "0"
        levels = sorted(p for p in store_dir.iterdir() if p.name.isdigit())
        size_b = sum(f.stat().st_size for lv in levels for f in lv.rglob("*") if f.is_file() and "c" in f.parts)
    fixed = sum(shares.values())
    out = {"field": [3, size, size], "run": run, "profiled_cpu_s": total,
           "fixed_s": shares, "fixed_share": fixed / total, "store_mb_per_target": size_b / 1e6 / max(1, run["maps"])}
    print(f"field: fixed costs {100 * out['fixed_share']:.1f} % of the field; map "
          f"{out['store_mb_per_target']:.2f} MB per target", file=sys.stderr, flush=True)
    return out


def bench_driver(quick: bool) -> dict:
    """benchmarks/bench_driver.py in a subprocess (a 1536-well x 2-field plate, or 384 x 2 with --quick)."""
    args = ["--rows", "16", "--cols", "24"] if quick else []
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_driver.py"), *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"skipped": proc.stderr[-400:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"driver: no-op rerun {res['noop_rerun']['wall_s']} s, status {res['status']['wall_s']} s",
          file=sys.stderr, flush=True)
    return res


# --------------------------------------------------------------------------------------------------


def goal_table(res: dict) -> str:
    lines = ["| goal (issue 28) | measured in this run | met |", "|---|---|---|"]
    for r in res.get("sets", []):
        if "skipped" in r:
            lines.append(f"| amortised >= 100x per-image, {r['set']} | skipped: {r['skipped'][:80]} | - |")
            continue
        lines.append(f"| amortised >= 100x per-image per map, {r['set']} ({r['fields']} fields of "
                     f"{'x'.join(map(str, r['size']))}) | {r['per_image']['wall_per_map']:.3f} s vs "
                     f"{r['amortised']['wall_per_map'] * 1e3:.1f} ms: **{r['ratio_wall']:.0f}x** wall, "
                     f"{r['ratio_cpu']:.0f}x CPU | {'yes' if r['ratio_wall'] >= 100 else 'no'} |")
    for label, b in res.get("busy", {}).items():
        for n, key in ((1, "busy1_over_quiet"), (2, "busy_over_quiet")):
            if key in b:
                lines.append(f"| {label} beside {n} busy process(es) <= 1.3x quiet (threads auto) | "
                             f"**{b[key]:.2f}x** | {'yes' if b[key] <= 1.3 else 'no'} |")
        for n in (1, 2):
            if f"auto_over_one_thread_busy{n}" in b:
                r = b[f"auto_over_one_thread_busy{n}"]
                lines.append(f"| {label} beside {n} busy: threads auto / threads 1 (the policy's own cost) | "
                             f"**{r:.2f}x** | {'yes' if r <= 1.3 else 'no'} |")
    for b in res.get("bound", []):
        lines.append(f"| per-image end to end <= 1.10x T x (fwd + bwd), {b['set']} (fidelity on, CPU s) | "
                     f"**{b['ratio']:.3f}x**" + (f" (fidelity on one field in 8: {b['ratio_fidelity_every_8']:.3f}x)"
                                                if "ratio_fidelity_every_8" in b else "")
                     + f" | {'yes' if b['ratio'] <= 1.10 else 'no'} |")
    f = res.get("field")
    if f:
        lines.append(f"| fixed costs of a {f['field'][1]}² field <= 10 % of its amortised map (CPU, profiled) | "
                     f"**{100 * f['fixed_share']:.1f} %** ("
                     + ", ".join(f"{k} {v:.2f} s" for k, v in f["fixed_s"].items())
                     + f" of {f['profiled_cpu_s']:.1f} s) | {'yes' if f['fixed_share'] <= 0.10 else 'no'} |")
        lines.append(f"| store <= 4 MB per {f['field'][1]}² field per target (untrained explainer: a dense map) | "
                     f"**{f['store_mb_per_target']:.2f} MB** | {'yes' if f['store_mb_per_target'] <= 4 else 'no'} |")
    d = res.get("driver")
    if d and "skipped" not in d:
        plate = f"{d['wells']} wells x {d['fields_per_well']}"
        peak = max(d["noop_rerun"]["peak_rss_mib"], d["status"]["peak_rss_mib"])
        lines.append(f"| driver, {plate}: no-op rerun <= 5 s | **{d['noop_rerun']['wall_s']} s** "
                     f"(chunk files opened: {d['noop_rerun'].get('chunk_files_opened')}) | "
                     f"{'yes' if d['noop_rerun']['wall_s'] <= 5 else 'no'} |")
        lines.append(f"| driver, {plate}: status <= 3 s | **{d['status']['wall_s']} s** | "
                     f"{'yes' if d['status']['wall_s'] <= 3 else 'no'} |")
        lines.append(f"| driver, {plate}: peak memory <= 1 GiB | **{peak} MiB** | {'yes' if peak <= 1024 else 'no'} |")
    elif d:
        lines.append(f"| driver | skipped: {d['skipped'][-80:]} | - |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="sets,busy,bound,field,driver")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--fields", type=int, default=128, help="fields per evaluation-set plate (amortised)")
    ap.add_argument("--per-image", type=int, default=8, help="fields the per-image default explains")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = args.only.split(",")
    if args.quick:
        args.fields, args.per_image = 32, 4
    res: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg_1min": os.getloadavg()[0]}
    names = args.sets.split(",")
    if "sets" in only:
        res["sets"] = bench_sets(names, args.fields, args.per_image)
    if "busy" in only:
        res["busy"] = bench_busy(args.fields, args.per_image)
    if "bound" in only:
        res["bound"] = bench_bound([n for n in BOUND_ROWS if BOUND_ROWS[n][0] in names], args.per_image)
    if "field" in only:
        res["field"] = bench_field(1080 if args.quick else 2160)
    if "driver" in only:
        res["driver"] = bench_driver(args.quick)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_throughput.json"
    if set(only) != {"sets", "busy", "bound", "field", "driver"} and path.exists():
        # a partial run (--only) replaces its own sections and keeps the others (with their dates)
        kept = json.loads(path.read_text())
        dates = {k: res[k] for k in ("started", "finished", "load_avg_1min")}
        kept.setdefault("runs", []).append(dates | {"only": only})
        res = kept | {k: v for k, v in res.items() if k not in ("started", "finished", "load_avg_1min")}
    path.write_text(json.dumps(res, indent=1, default=str))
    print(goal_table(res))


if __name__ == "__main__":
    main()
