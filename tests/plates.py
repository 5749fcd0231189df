"""The bundled demo plate, and small real plates for tests: a few demo wells copied under tmp_path, with a
plate.yaml.

The copies are the bundled demo's real TIFFs and its TorchScript classifier, so tests run the real
reading, fitting and writing paths, only on fewer wells and with fewer optimisation steps.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[1] / "sample_plates" / "demo"
#: relative tolerance between maps read back from stores: the store keeps MAP_MANTISSA_BITS (6) of each
#: value, so two runs whose float32 arithmetic differs in the last bits can round a value to neighbouring
#: steps, 2^-7 to 2^-6 apart (relative)
STORE_RTOL = 2.0 ** -6
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


def explain_demo(out: Path, wells: Iterable[str], *extra: str, steps: int = 20) -> Path:
    """`pcim explain` of the bundled demo on some wells (NGFF 0.5, `steps` fit steps), written to
    out/demo.zarr with its CSV beside it as out/demo.csv; returns the store."""
    from cli_runner import run_pcim

    proc = run_pcim("explain", str(DEMO / "plate.yaml"), "--set", f"plate.wells=[{','.join(wells)}]",
                    "--set", f"explain.steps={steps}", "--set", f"output.zarr={out}/demo.zarr",
                    "--set", f"output.csv={out}/demo.csv", *extra, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "demo.zarr"
