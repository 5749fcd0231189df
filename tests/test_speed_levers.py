"""The speed levers of `compute` through `pcim explain`: channels-last inputs (kept only when the model
gives the same logits with them) and reduced precision (part of the settings fingerprint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_pcim
from plates import STORE_RTOL, make_plate

from pcim_cli.io import store
from pcim_cli.run.device import same_with_channels_last


class ViewNet(torch.nn.Module):
    """Flattens with `.view`, as many hand-written classifiers do: impossible on channels-last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 16)
        return self.fc(h.view(h.shape[0], -1))


def _maps(zarr_path: Path) -> np.ndarray:
    return np.stack([store.read_field(zarr_path, w, i)[0] for w in ("A01", "A02") for i in (0, 1)])


@pytest.mark.slow
def test_channels_last_gives_the_same_maps_and_does_not_cause_a_redo(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"), steps=5)
    zarr_path = tmp_path / "out" / "P1.zarr"
    assert run_pcim("explain", str(plate), "--set", "compute.channels_last=false").returncode == 0
    nchw = _maps(zarr_path)
    same = run_pcim("explain", str(plate))  # channels_last: true (the default) is not a different result
    assert same.returncode == 0 and "0 fitted by this run" in same.stderr, same.stderr[-2000:]
    forced = run_pcim("explain", str(plate), "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    np.testing.assert_allclose(_maps(zarr_path), nchw, rtol=STORE_RTOL, atol=1e-5)


@pytest.mark.slow
def test_a_model_that_cannot_take_channels_last_falls_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.jit.script(ViewNet().eval())
    x = torch.rand(3, 32, 32)
    assert not same_with_channels_last(net, x)  # `.view` raises on NHWC activations
    plate = make_plate(tmp_path, wells=("A01",), steps=3)
    net.save(str(tmp_path / "classifier.ts"))
    proc = run_pcim("explain", str(plate), "-v")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "does not take channels-last inputs" in proc.stderr


@pytest.mark.slow
def test_reduced_precision_is_a_different_result(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=3)
    assert run_pcim("explain", str(plate)).returncode == 0
    bf16 = run_pcim("explain", str(plate), "--set", "compute.precision=bfloat16")
    assert bf16.returncode == 0 and "2 fitted by this run" in bf16.stderr, bf16.stderr[-2000:]
    maps, _, record = store.read_field(tmp_path / "out" / "P1.zarr", "A01", 0)
    assert np.isfinite(maps).all() and record["status"] == "done"
