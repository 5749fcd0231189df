"""How a fit proceeds over its steps (engine/schedule.py): lr schedules, coarse-to-fine, first logits,
and fit_pcim's `init` — on the toy model whose evidence is one known block."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from toy_models import BLOCK, block_mass, toy_images

from pcim_cli.engine import mixing, schedule
from pcim_cli.engine.pcim import PcimOptions, attribution_map, fit_pcim


def test_lr_factors_by_hand() -> None:
    assert [schedule.lr_factor(s, 10) for s in range(10)] == [1.0] * 10
    cos = [schedule.lr_factor(s, 11, "cosine") for s in range(11)]
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(schedule.FLOOR)
    assert cos[5] == pytest.approx(schedule.FLOOR + (1 - schedule.FLOOR) * 0.5)
    assert all(a >= b for a, b in zip(cos, cos[1:], strict=False))  # never rises
    warm = [schedule.lr_factor(s, 20, "cosine", warmup=4) for s in range(6)]
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4] == pytest.approx(1.0)
    steps = [schedule.lr_factor(s, 9, "step") for s in range(9)]
    assert steps == [1.0] * 4 + [0.3] * 2 + [0.1] * 3
    with pytest.raises(ValueError, match="schedule"):
        schedule.lr_factor(0, 10, "linear")


def test_phases() -> None:
    assert schedule.phases(50, 4) == [(4, 50)]
    assert schedule.phases(50, 4, coarse=16, coarse_share=0.4) == [(16, 20), (4, 30)]
    assert schedule.phases(50, 4, coarse=4) == [(4, 50)]  # not coarser: one phase
    assert schedule.phases(1, 4, coarse=16) == [(4, 1)]


def test_refined_logits_keep_the_mixing_weights() -> None:
    """n * alpha of the coarse logits, carried to the finer grid, is the same per area."""
    g = torch.Generator().manual_seed(0)
    coarse = 3 * torch.rand(2, 1, 8, 8, generator=g)
    fine = schedule.refine_logits(coarse, (2, 1, 32, 32))
    assert fine.shape == (2, 1, 32, 32)
    m_coarse = mixing.upsample(mixing.mixing_weights(coarse), (128, 128))
    m_fine = mixing.upsample(mixing.mixing_weights(fine), (128, 128))
    # the same relative weights, up to the interpolation: identical where the coarse grid is flat
    torch.testing.assert_close(m_fine.mean(dim=(2, 3)), m_coarse.mean(dim=(2, 3)), rtol=0.05, atol=0.0)
    assert float(torch.corrcoef(torch.stack([m_fine.flatten(), m_coarse.flatten()]))[0, 1]) > 0.95


def test_gradient_logits_point_at_the_block(block_model) -> None:
    x = toy_images()
    target = torch.ones(4, dtype=torch.long)
    sub = schedule.substrate_or_zero(x, "mean", 8.0)
    w, p = schedule.gradient_logits(block_model, x, target, sub, (4, 1, 16, 16), scale=4.0)
    assert w.shape == (4, 1, 16, 16) and (w >= 0).all()
    assert torch.allclose(w.flatten(1).amax(1), torch.full((4,), 4.0))
    torch.testing.assert_close(p, torch.softmax(block_model(x), 1)[:, 1])
    block = w[:, 0, BLOCK[0].start // 2 : BLOCK[0].stop // 2, BLOCK[1].start // 2 : BLOCK[1].stop // 2]
    assert (block.sum(dim=(1, 2)) > 0.7 * w.sum(dim=(1, 2, 3))).all()  # 16 of 256 cells hold most of it
    assert (block.amin(dim=(1, 2)) > 10 * w[:, 0, :4, :4].amax(dim=(1, 2))).all()


@pytest.mark.parametrize("changes", [
    {"schedule": "cosine", "lr": 0.3, "warmup": 3},
    {"schedule": "step", "lr": 0.3},
    {"schedule": "cosine", "lr": 0.3, "coarse": 8, "coarse_share": 0.4},
    {"schedule": "cosine", "lr": 0.3, "init": "gradient"},
], ids=["cosine-warmup", "step", "coarse-to-fine", "gradient-init"])
def test_every_schedule_finds_the_block_in_few_steps(block_model, changes) -> None:
    opts = PcimOptions(steps=30, resolution=2, **changes)
    r = fit_pcim(block_model, toy_images(), torch.ones(4, dtype=torch.long), opts)
    assert r.maps.shape == (4, 1, 32, 32)
    assert (block_mass(r.maps) > 0.6).all(), block_mass(r.maps)
    assert (r.steps == 30).all()


def test_init_is_where_the_fit_starts(block_model) -> None:
    """With a negligible learning rate the map is the map of the given first logits."""
    x = toy_images(2)
    shape = mixing.weight_shape(x.shape, False, 2)
    init = torch.zeros(shape)
    init[:, :, 2:6, 14:18] = 5.0  # a region away from the block
    opts = PcimOptions(steps=1, lr=1e-12, resolution=2, map_contrast=False, coarse=8, init="gradient")
    r = fit_pcim(block_model, x, torch.ones(2, dtype=torch.long), opts, init=init)
    expected = attribution_map(init, (32, 32), torch.full((2,), opts.budget))
    torch.testing.assert_close(r.maps, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="init must have the weights' shape"):
        fit_pcim(block_model, x, torch.ones(2, dtype=torch.long), opts, init=torch.zeros(2, 1, 8, 8))


def test_refining_from_the_right_logits_beats_starting_from_zero(block_model) -> None:
    x = toy_images()
    target = torch.ones(4, dtype=torch.long)
    opts = PcimOptions(steps=3, resolution=2, lr=0.1, schedule="constant")
    init = torch.zeros(mixing.weight_shape(x.shape, False, 2))
    init[:, :, BLOCK[0].start // 2 : BLOCK[0].stop // 2, BLOCK[1].start // 2 : BLOCK[1].stop // 2] = 4.0
    warm = fit_pcim(block_model, x, target, opts, init=init)
    cold = fit_pcim(block_model, x, target, opts)
    assert (block_mass(warm.maps) > block_mass(cold.maps)).all()
    assert (warm.loss < cold.loss).all()


def test_invalid_schedule_options_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule.*init.*coarse_share"):
        PcimOptions(schedule="linear", init="random", coarse_share=1.5)
    with pytest.raises(ValueError, match="beta1"):
        dataclasses.replace(PcimOptions(), beta2=1.0)
    assert math.isclose(schedule.FLOOR, 0.05)


# ---------------------------------------------------------------------------------------- through the CLI

#: the default before issue 14, as README's --set line gives it (with fewer steps, to keep the test short)
OLD_STYLE = ("explain.schedule=constant", "explain.lr=0.1", "explain.init=zero", "explain.noise=0")


@pytest.mark.slow
def test_the_old_default_is_reachable_by_settings_and_a_new_default_redoes_the_fields(tmp_path) -> None:
    """The --set line of the old default runs the old fit exactly (the engine called with the old options
    gives the same maps); the settings fingerprint differs, so a run with the new defaults redoes them."""
    import numpy as np
    from cli_runner import run_pcim
    from plates import STORE_RTOL, make_plate

    from pcim_cli.io import images, store

    plate = make_plate(tmp_path, wells=("A02",), steps=8)
    sets = [a for s in OLD_STYLE for a in ("--set", s)]
    old = run_pcim("explain", str(plate), *sets)
    assert old.returncode == 0, old.stderr[-2000:]
    zarr_path = tmp_path / "out" / "P1.zarr"
    stored, _, record = store.read_field(zarr_path, "A02", 0)
    assert (record["settings"]["engine"]["init"], record["settings"]["engine"]["noise"]) == ("zero", 0.0)

    files = sorted((tmp_path / "images").glob("A02_s1_w*.tif"))
    src = images.FieldSource("A02", 1, tuple(files))
    x = torch.from_numpy(images.normalize(images.read_field(src, 3), "percentile", low=1.0, high=99.8))[None]
    model = torch.jit.load(str(tmp_path / "classifier.ts")).eval()
    with torch.no_grad():
        target = model(x).argmax(1)
    opts = PcimOptions(steps=8, lr=0.1, schedule="constant", init="zero", noise=0.0)
    direct = fit_pcim(model, x, target, opts).maps[0].numpy()
    np.testing.assert_allclose(stored, direct, rtol=STORE_RTOL, atol=1e-6)

    new = run_pcim("explain", str(plate))  # the new defaults: another fingerprint, every field redone
    assert new.returncode == 0, new.stderr[-2000:]
    assert "(2 fitted by this run)" in new.stderr, new.stderr[-2000:]
    again = run_pcim("explain", str(plate))
    assert "(0 fitted by this run)" in again.stderr, again.stderr[-2000:]
    record = store.read_field(zarr_path, "A02", 0)[2]
    assert (record["settings"]["engine"]["init"], record["settings"]["engine"]["schedule"]) == ("gradient", "constant")
