"""Small real plates for tests: a few demo wells copied (or damaged) under tmp_path, with a plate.yaml.

The copies are the bundled demo's real TIFFs and its TorchScript classifier, so tests run the real
reading, fitting and writing paths, only on fewer wells and with fewer optimisation steps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[1] / "sample_plates" / "demo"
CHANNEL_TOKENS = {"DNA": "1", "PH3": "2", "Actin": "3"}


def make_plate(root: Path, wells: Iterable[str] = ("A01", "A02", "B01"), steps: int = 5, objects: bool = False,
               **sections: dict) -> Path:
    """Copy the demo fields of `wells` into root/images and write root/plate.yaml; returns its path.

    `sections` are merged into the YAML's sections (e.g. explain={"target": "all"}). With `objects`, the
    demo's nuclei label images come along (root/labels) as plate.objects.Nuclei.
    """
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for well in wells:
        for path in DEMO.glob(f"images/{well}_s*_w*.tif"):
            shutil.copy(path, images / path.name)
        if objects:
            (root / "labels").mkdir(exist_ok=True)
            for path in DEMO.glob(f"labels/{well}_s*_nuclei.tif"):
                shutil.copy(path, root / "labels" / path.name)
    shutil.copy(DEMO / "layout.csv", root / "layout.csv")
    shutil.copy(DEMO / "classifier.ts", root / "classifier.ts")
    config = {
        "plate": {"name": "P1", "images": "images", "pattern": "{well}_s{field}_w{channel}.tif",
                  "channels": dict(CHANNEL_TOKENS), "layout": "layout.csv"},
        "model": {"path": "classifier.ts", "classes": ["negative", "mitotic"]},
        "explain": {"steps": steps},
        "compute": {"cluster": "none"},
        "output": {"zarr": "out/{plate}.zarr", "csv": "out/{plate}.csv"},
    }
    if objects:
        config["plate"]["objects"] = {"Nuclei": "labels/{well}_s{field}_nuclei.tif"}
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    path = root / "plate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


_SCRIPT = Path(sys.executable).parent / "pcim"  # the installed console script
PCIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pcim_cli.cli"]


def pcim_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_pcim(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`pcim ARGS` as a user runs it (a subprocess of the installed console script)."""
    return subprocess.run([*PCIM, *args], capture_output=True, text=True, cwd=cwd, env=pcim_env(**env),
                          timeout=timeout)


def start_pcim(*args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """`pcim ARGS` started in the background (its output in pipes)."""
    return subprocess.Popen([*PCIM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=pcim_env(**env))
