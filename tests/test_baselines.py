"""The baselines behind `explain.method`: toy models with known evidence, Captum vs pure torch, the CLI."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_runner import run_pcim
from plates import DEMO
from toy_models import BlockReader as ToyBlockReader

from pcim_cli.config import load_config
from pcim_cli.engine import baselines
from pcim_cli.engine.attribute import BASELINE_KEYS, METHODS, attribute, captum_available, method_settings
from pcim_cli.engine.pcim import PcimOptions, deletion_contrast
from pcim_cli.engine.trivial import TRIVIAL
from pcim_cli.io import store
from pcim_cli.run import inventory

BASELINES = [m for m in METHODS if not m.startswith("pcim") and m not in TRIVIAL]  # trivial: tests/test_trivial.py
FAST = PcimOptions(ig_steps=16, occlusion_window=2, occlusion_stride=2, rise_masks=400, rise_cell=4)
needs_captum = pytest.mark.skipif(not captum_available(), reason="captum (pcim-cli[baselines]) not installed")

H, W = 24, 32
BLOCK = (slice(8, 14), slice(18, 24))  # the only pixels the toy model reads, in channel 1


def BlockReader() -> ToyBlockReader:  # noqa: N802 - a toy model's constructor
    """Logits (-s, s), s = 4 * (mean of channel 1 in BLOCK - 0.5): the evidence is that block of channel 1."""
    return ToyBlockReader(BLOCK, scale=4.0, offset=0.5, relative=False)


@pytest.fixture(scope="module")
def toy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.script(BlockReader().eval())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, H, W, generator=gen) * 0.5
    x[:, 1, BLOCK[0], BLOCK[1]] += 0.5  # the evidence: a brighter block
    return model, x, torch.ones(3, dtype=torch.long)


def _block_share(maps: torch.Tensor) -> torch.Tensor:
    m = maps.sum(1)
    return m[:, BLOCK[0], BLOCK[1]].sum(dim=(1, 2)) / m.sum(dim=(1, 2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("captum", marks=needs_captum)])
@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_finds_the_block_and_reports_nan_fit_stats(toy, method, backend):
    model, x, target = toy
    r = attribute(model, x, target, method, FAST, backend=backend)
    assert r.maps.shape == (3, 1, H, W)
    assert (r.maps >= 0).all() and torch.isfinite(r.maps).all()
    # the block is 4.7% of the field; RISE's masks are smooth (cells of 4 px) and random: a looser bound
    assert (_block_share(r.maps) > (0.3 if method == "rise" else 0.8)).all(), _block_share(r.maps)
    peak = r.maps.flatten(1).argmax(1)
    assert all(BLOCK[0].start <= int(p) // W < BLOCK[0].stop and BLOCK[1].start <= int(p) % W < BLOCK[1].stop
               for p in peak)
    assert torch.isnan(r.prob_mixed).all() and torch.isnan(r.prob_deleted).all() and torch.isnan(r.loss).all()
    assert (r.steps == 0).all()
    expected = torch.softmax(model(x), 1)[:, 1]
    torch.testing.assert_close(r.prob_original, expected)


@pytest.mark.parametrize("method", BASELINES)
def test_per_channel_maps_put_the_evidence_in_its_channel(toy, method):
    model, x, target = toy
    r = attribute(model, x, target, method, dataclasses.replace(FAST, per_channel=True), backend="torch")
    assert r.maps.shape == (3, 2, H, W) and (r.maps >= 0).all()
    inside = r.maps[:, :, BLOCK[0], BLOCK[1]].sum(dim=(2, 3))
    # channel 0 is never read: nothing there (RISE: only Monte Carlo noise, its masks are random)
    tol = 0.2 if method == "rise" else 1e-6
    assert (inside[:, 1] > 0).all() and (inside[:, 0] <= tol * inside[:, 1]).all(), inside


@needs_captum
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["saliency", "integrated-gradients", "occlusion"])
def test_captum_and_pure_torch_compute_the_same_maps(method, per_channel):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 20, 22)  # 22 is not a multiple of the stride: uncovered pixels score 0 in both
    target = torch.tensor([0, 2])
    opts = dataclasses.replace(FAST, per_channel=per_channel, occlusion_window=6, occlusion_stride=4)
    theirs = attribute(net, x, target, method, opts, backend="captum").maps
    ours = attribute(net, x, target, method, opts, backend="torch").maps
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6 * float(ours.abs().max()))


def test_integrated_gradients_of_a_linear_model_is_input_times_weight():
    """Completeness on a linear model: IG = (x - 0) * w exactly, for any step count."""
    w = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(1))

    def linear(z: torch.Tensor) -> torch.Tensor:
        s = (z * w).sum(dim=(1, 2, 3))
        return torch.stack([s, -s], 1)

    x = torch.rand(2, 2, 5, 5)
    got = baselines.integrated_gradients(linear, x, torch.zeros(2, dtype=torch.long), steps=3, per_channel=True)
    torch.testing.assert_close(got, (x * w).abs())


def test_occlusion_of_a_block_reader_is_the_probability_drop():
    """Occluding exactly the block (window = stride = block size, aligned) drops p by a hand-computed amount."""
    model = BlockReader()
    x = torch.full((1, 2, H, W), 0.5)
    x[0, 1, 6:18, 18:24] = 1.0  # block rows 8:14 lie in this brighter band
    m = baselines.occlusion(model, x, torch.ones(1, dtype=torch.long), window=2, stride=2)
    p0 = 1 / (1 + math.exp(-2 * 4.0 * 0.5))
    fill = float(x[0, 1].mean())
    p1 = 1 / (1 + math.exp(-2 * 4.0 * (1.0 - (1.0 - fill) * 4 / 36 - 0.5)))  # one 2x2 window of 36 block px
    assert float(m[0, 0, 8, 18]) == pytest.approx(p0 - p1, rel=1e-4)
    assert float(m[0, 0, 0, 0]) == 0.0


def test_rise_map_depends_on_the_seed_not_on_batch_companions(toy):
    model, x, target = toy
    both = baselines.rise(model, x[:2], target[:2], masks=64, cell=4, seeds=torch.tensor([5, 6]))
    alone = baselines.rise(model, x[1:2], target[1:2], masks=64, cell=4, seeds=torch.tensor([6]))
    torch.testing.assert_close(both[1:2], alone)
    other = baselines.rise(model, x[1:2], target[1:2], masks=64, cell=4, seeds=torch.tensor([7]))
    assert not torch.equal(other, alone)


def test_rise_masks_are_binary_grids_upsampled_with_the_keep_probability():
    m = baselines.rise_masks(400, (1, 40, 40), cell=8, p=0.3, generator=torch.Generator().manual_seed(0))
    assert m.shape == (400, 1, 40, 40) and m.min() >= 0 and m.max() <= 1
    assert float(m.mean()) == pytest.approx(0.3, abs=0.03)


def test_attribute_refuses_unknown_methods_and_backends(toy):
    model, x, target = toy
    with pytest.raises(ValueError, match="gradcam"):
        attribute(model, x, target, "gradcam", FAST)
    with pytest.raises(ValueError, match="backend"):
        attribute(model, x, target, "saliency", FAST, backend="jax")


def test_invalid_baseline_options_are_refused():
    with pytest.raises(ValueError) as err:
        PcimOptions(ig_steps=0, rise_p=1.0)
    assert "ig_steps" in str(err.value) and "rise_p" in str(err.value)


# --- settings fingerprint --------------------------------------------------------------------------------


def test_method_settings_hold_what_changes_each_method_and_leave_pcim_as_before():
    opts = PcimOptions()
    pcim = method_settings("pcim", opts)
    assert not set(BASELINE_KEYS) & set(pcim) and {"budget", "steps", "resolution"} <= set(pcim)
    assert method_settings("saliency", opts) == {"per_channel": False}
    assert method_settings("integrated-gradients", opts) == {"per_channel": False, "ig_steps": 50}
    assert set(method_settings("rise", opts)) == {"per_channel", "rise_masks", "rise_cell", "rise_p"}


def test_fingerprint_follows_the_method_settings():
    def fp(*sets: str) -> str:
        return inventory.fingerprint(load_config(DEMO / "plate.yaml", sets), "0" * 64)

    ig = fp("explain.method=integrated-gradients")
    assert fp("explain.method=integrated-gradients", "explain.ig_steps=10") != ig
    assert fp("explain.method=integrated-gradients", "explain.steps=10") == ig  # PCIM's steps do not matter
    assert fp("explain.method=rise", "explain.rise_masks=10") != fp("explain.method=rise")
    assert fp("explain.ig_steps=10") == fp()  # nor do baseline keys for PCIM
    assert fp("explain.method=saliency") != fp()


# --- through `pcim explain` -----------------------------------------------------------------------------


def _explain(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    args = ["explain", str(DEMO / "plate.yaml"), "--set", "plate.wells=[A01]",
            "--set", f"output.zarr={tmp_path}/o.zarr", "--set", f"output.csv={tmp_path}/o.csv"]
    for s in sets:
        args += ["--set", s]
    return run_pcim(*args)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("saliency", ()),
    ("integrated-gradients", ("explain.ig_steps=8",)),
    ("occlusion", ("explain.occlusion_stride=16",)),
    ("rise", ("explain.rise_masks=100",)),
])
def test_pcim_explain_runs_each_baseline_into_a_valid_store(tmp_path, method, extra):
    proc = _explain(tmp_path, f"explain.method={method}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "o.csv")
    assert len(df) == 2 and (df["PCIM_Status"] == "done").all()
    assert df["PCIM_ProbMixed"].isna().all() and df["PCIM_DeletionAUC"].between(0, 1).all()
    for index in (0, 1):
        maps, labels, record = store.read_field(tmp_path / "o.zarr", "A01", index)
        assert maps.shape == (1, 128, 128) and labels == [df["PCIM_Target"].iloc[index]]
        assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
        assert record["status"] == "done" and len(record["fingerprint"]) == 64


@pytest.mark.slow
def test_pcim_explain_per_channel_saliency_writes_one_map_per_channel(tmp_path):
    proc = _explain(tmp_path, "explain.method=saliency", "explain.per_channel=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    maps, labels, _ = store.read_field(tmp_path / "o.zarr", "A01", 0)
    assert maps.shape == (3, 128, 128)
    assert [label.split(":")[1] for label in labels] == ["DNA", "PH3", "Actin"]


# --- PCIM's map contrast (issue 7; here rather than in test_engine.py, which issue 8 is rewriting) -------


def test_pcim_map_contrast_weights_the_map_by_the_deletion_change(toy):
    model, x, target = toy
    opts = PcimOptions(steps=20, lr=0.3, resolution=2)
    raw = attribute(model, x, target, "pcim", dataclasses.replace(opts, map_contrast=False)).maps
    weighted = attribute(model, x, target, "pcim", opts).maps
    median = x.flatten(2).median(dim=2).values[..., None, None]  # the deletion substrate (the default)
    contrast = (x - median).abs().sum(1, keepdim=True)
    torch.testing.assert_close(weighted, raw * contrast)
    per_channel = deletion_contrast(x, dataclasses.replace(opts, per_channel=True))
    assert per_channel.shape == x.shape
    torch.testing.assert_close(per_channel.sum(1, keepdim=True), contrast)
