"""The suite's shared scaffolding; read this first (docs/development.md, "Tests").

Helpers, importable by name from any test (the tests folder is on sys.path):

- cli_runner.py: `run_pcim` / `start_pcim`: the installed `pcim` in a subprocess, as a user runs it, under
  the suite's one environment policy;
- plates.py: `DEMO` (the bundled demo plate), `make_plate` (a few real demo wells under tmp_path with a
  plate.yaml), `explain_demo` (a small demo store);
- toy_models.py: `BlockReader` (a classifier whose evidence is one known block) and its images;
- model_factory.py: real TorchScript classifiers that misbehave the way users' models do;
- truth.py: what a store, its CSV and `pcim status` must agree on; real_data.py: public data sets.

Fixtures: `pcim` (= cli_runner.run_pcim), `demo` (= plates.DEMO), `block_model` (a scripted BlockReader).

Determinism (issue 27): a result may not depend on the machine or its load. This process and every
`pcim` a test starts fit with one torch thread (OMP_NUM_THREADS=1, set here before torch is imported,
and torch.set_num_threads(1)): float32 sums then run in one order everywhere, so maps compared across
processes agree to float32 rounding, and compute.threads: auto never times steps to choose a thread
count. Seeds are fixed in the tests (and per map in pcim, run/task.py `field_seed`); Hypothesis draws the
same examples on every run (derandomized, no example database) and has no per-example deadline (a loaded
machine is slower, not wrong). Tests of the thread policy itself give their own environment.

Markers (pyproject.toml): `slow` marks the long end-to-end runs; `make test-fast` (-m "not slow") runs the
rest, which still touches every module; `slurm` needs a real sbatch.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the suite's one thread (see above)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from cli_runner import run_pcim  # noqa: E402
from hypothesis import settings  # noqa: E402
from plates import DEMO  # noqa: E402
from toy_models import BlockReader, scripted  # noqa: E402

torch.set_num_threads(1)
settings.register_profile("pcim", derandomize=True, database=None, deadline=None)
settings.load_profile("pcim")


@pytest.fixture(scope="session")
def pcim():
    """`pcim(*args, cwd=None, timeout=600, **env)`: the installed pcim in a subprocess (cli_runner.py)."""
    return run_pcim


@pytest.fixture(scope="session")
def demo() -> Path:
    """The bundled demo plate's folder (plate.yaml, images, masks, labels, classifier.ts)."""
    return DEMO


@pytest.fixture(scope="module")
def block_model() -> torch.jit.ScriptModule:
    """The default BlockReader (toy_models.py), scripted: its evidence is the block toy_models.BLOCK."""
    return scripted(BlockReader())
