"""benchmarks/gpu_bench.py runs where only torch and numpy are installed (the lent GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: what the GPU machine lacks; importing any of them there fails
ABSENT = ("zarr", "dask", "distributed", "pydantic", "typer", "rich", "yaml", "pandas", "tifffile", "captum")

BLOCKER = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
        return None
sys.meta_path.insert(0, _Absent())
"""


def _run(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_the_engine_imports_nothing_but_torch_and_numpy():
    modules = sorted(p.stem for p in (REPO / "pcim_cli" / "engine").glob("*.py") if p.stem != "__init__")
    assert {"explainer", "pcim", "field", "tiling", "attribute"} <= set(modules)
    proc = _run("import " + ", ".join(f"pcim_cli.engine.{m}" for m in modules) + "; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    blocked = _run("import pcim_cli.config")  # the blocker works: config needs pydantic
    assert blocked.returncode != 0 and "absent on the GPU machine" in blocked.stderr


@pytest.mark.slow
def test_gpu_bench_quick_runs_without_the_cli_dependencies(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("import runpy, sys; sys.argv = ['gpu_bench.py', *sys.argv[1:]]; "
                "runpy.run_path('benchmarks/gpu_bench.py', run_name='__main__')", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["plate"]["tiles"] == 384 * 9 * 100
    models = {r["model"] for r in report["rows"]}
    assert len(models) == 2 and {r["precision"] for r in report["rows"]} == {"float32", "bfloat16"}
    for r in report["rows"]:
        assert r["amortised_maps_s"] > r["per_image_default_maps_s"] > 0
    assert all(0 <= v < 1 for v in report["bf16_map_change"].values()) and report["bf16_map_change"]
    assert "| model |" in proc.stdout
