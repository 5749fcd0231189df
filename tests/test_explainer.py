"""Amortised PCIM (engine/explainer.py) against a toy model whose evidence is known by hand.

The toy classifier reads one 8x8 block of channel 1 (its contrast to the channel's mean): the block is
the whole evidence, wherever else the image is bright. Its images carry bright distractor squares of
the same brightness elsewhere, so an explainer that only learned "bright in channel 1" fails; one that
learned what this model reads puts the map's mass on the block.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from toy_models import BlockReader as ToyBlockReader

from pcim_cli.engine import explainer as ex
from pcim_cli.engine.attribute import AMORTISED_KEYS, attribute, method_settings
from pcim_cli.engine.pcim import PcimOptions, attribution_map, deletion_contrast, fit_pcim
from pcim_cli.errors import ConfigError
from pcim_cli.io import explainer as explainer_file

BY, BX = slice(8, 16), slice(20, 28)  # the only pixels the toy model reads
OPTS = PcimOptions(budget=0.0625, resolution=4, blur_sigma=2.0)  # budget = the block's share of 32x32


def BlockReader() -> ToyBlockReader:  # noqa: N802 - a toy model's constructor
    """Logits (-s, s), s = 8 * (mean of channel 1 in the block - its mean over the image - 0.15)."""
    return ToyBlockReader((BY, BX), scale=8.0, offset=0.15)


def toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, the block bright in half of the images (class 1), two equally bright squares elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, 3, 32, 32, generator=g)
    positive = torch.rand(n, generator=g) < 0.5
    for i in range(n):
        if positive[i]:
            x[i, 1, BY, BX] += 0.7
        for _ in range(2):
            y0, x0 = torch.randint(0, 26, (2,), generator=g).tolist()
            if not (y0 < 16 and y0 + 6 > 8 and x0 < 28 and x0 + 6 > 20):  # never on the block
                x[i, 1, y0 : y0 + 6, x0 : x0 + 6] += 0.7
    return x, positive.long()


def block_mass(maps: torch.Tensor) -> torch.Tensor:
    m = maps.sum(1)
    return m[:, BY, BX].sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp(min=1e-12)


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    model = torch.jit.script(BlockReader()).eval()
    untrained = ex.make_explainer(3, 2, OPTS, seed=0)
    net = ex.make_explainer(3, 2, OPTS, seed=0)
    steps = 150
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    for step in range(steps):  # training images: seeds 0..149; the test images below: seed 999
        x, _ = toy_images(8, step)
        with torch.no_grad():
            target = model(x).argmax(1)
        ex.train_step(net, model, optimizer, x, target, OPTS)
        schedule.step()
    x, y = toy_images(48, 999)
    keep = y == 1
    return model, net.eval(), untrained.eval(), x[keep], y[keep]


def test_trained_explainer_puts_the_mass_on_the_block_of_unseen_images(toy):
    model, net, untrained, x, target = toy
    assert len(x) >= 16 and bool((model(x).argmax(1) == 1).all())
    trained = block_mass(attribute(model, x, target, "pcim-amortised", OPTS, explainer=net).maps)
    control = block_mass(attribute(model, x, target, "pcim-amortised", OPTS, explainer=untrained).maps)
    # hand-derived answer: all evidence is in the block (6 % of the image); distractors are as bright
    assert trained.mean() > 0.85 and trained.min() > 0.7, trained
    assert control.mean() < 0.4, control  # the untrained network: the learning is real
    from_zero = dataclasses.replace(OPTS, steps=20, lr=0.1, init="zero", noise=0.0)
    per_image = block_mass(fit_pcim(model, x, target, from_zero).maps)
    assert trained.mean() > per_image.mean()  # 20 per-image steps from zero get less far


def test_refine_from_the_explainer_converges_at_least_as_well_as_from_zero(toy):
    model, net, _, x, target = toy
    w = ex.class_logits(net(x), target, 1)
    start = ex.objective(model, x, w, target, OPTS)
    for n in (5, 20):
        refined = attribute(model, x, target, "pcim-amortised",
                            dataclasses.replace(OPTS, refine_steps=n, refine_lr=0.05), explainer=net)
        from_zero = fit_pcim(model, x, target, dataclasses.replace(OPTS, steps=n, lr=0.05))
        assert refined.loss.mean() <= from_zero.loss.mean(), (n, refined.loss.mean(), from_zero.loss.mean())
        assert refined.loss.mean() <= start.mean() + 1e-4  # refining does not undo the explainer's answer
        assert bool((refined.steps == n).all())
        assert block_mass(refined.maps).mean() > 0.85


def test_without_refine_the_maps_are_the_fits_maps_of_the_explainers_logits(toy):
    """Same map code as the per-image fit: attribution_map of the logits x the deletion contrast."""
    model, net, _, x, target = toy
    result = ex.amortised_pcim(model, net, x, target, OPTS)
    w = ex.class_logits(net(x), target, 1)
    budgets = torch.full((len(x),), OPTS.budget)
    expected = attribution_map(w, x.shape[-2:], budgets) * deletion_contrast(x, OPTS)
    torch.testing.assert_close(result.maps, expected)
    assert bool((result.steps == 0).all()) and torch.isnan(result.loss).all()
    assert bool((result.prob_deleted < result.prob_mixed).all())  # deleting the map's pixels loses the class


class CountingExplainer(torch.nn.Module):
    """A real explainer that records how many images each forward received."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.net(x)


def test_one_explainer_forward_per_tile_gives_the_maps_of_all_targets(toy):
    model, net, _, x, _ = toy
    counting = CountingExplainer(net)
    pairs = x[:3].repeat_interleave(2, dim=0)  # (tile, target) units: each tile for class 0 and class 1
    target = torch.tensor([0, 1] * 3)
    maps = attribute(model, pairs, target, "pcim-amortised", OPTS, explainer=counting).maps
    assert counting.rows == [3]
    alone = attribute(model, x[:3], torch.ones(3, dtype=torch.long), "pcim-amortised", OPTS, explainer=net).maps
    torch.testing.assert_close(maps[1::2], alone)  # the class-1 maps do not depend on their companions
    assert not torch.allclose(maps[0::2], maps[1::2])  # each class its own map


def test_explainer_file_round_trip_and_refusals(toy, tmp_path):
    model, net, _, x, _ = toy
    meta = {"classifier_sha256": "a" * 64, "classifier_path": "toy.ts", "channels": ["c0", "c1", "c2"],
            "normalize": {"method": "none"}, "classes": ["0", "1"], "engine": explainer_file.engine_record(OPTS)}
    sha = explainer_file.save_explainer(net, tmp_path / "e.pt", meta)
    loaded = explainer_file.load_explainer(tmp_path / "e.pt")
    assert loaded.sha256 == sha and loaded.meta["classifier_sha256"] == "a" * 64
    assert json.loads((tmp_path / "e.pt.json").read_text())["sha256"] == sha
    torch.testing.assert_close(loaded.module(x), net(x))  # TorchScript gives the same logits
    ok = {"model_sha256": "a" * 64, "model_path": "toy.ts", "channels": ["c0", "c1", "c2"],
          "normalize": {"method": "none"}, "classes": ["0", "1"], "opts": OPTS}
    explainer_file.check_explainer(loaded, **ok)
    for change, words in [({"model_sha256": "b" * 64}, ["a" * 64, "b" * 64]),
                          ({"channels": ["c1", "c0", "c2"]}, ["c1, c0, c2"]),
                          ({"normalize": {"method": "percentile", "low": 1.0, "high": 99.8}}, ["percentile"]),
                          ({"opts": dataclasses.replace(OPTS, budget=0.02)}, ["explain.budget=0.0625"])]:
        with pytest.raises(ConfigError) as err:
            explainer_file.check_explainer(loaded, **{**ok, **change})
        assert all(w in str(err.value) for w in words) and "pcim train-explainer" in str(err.value)
    with pytest.raises(ConfigError, match="pcim train-explainer"):
        explainer_file.load_explainer(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a pcim explainer"):
        explainer_file.load_explainer(tmp_path / "junk.pt")


def test_settings_of_pcim_amortised_and_pcim():
    opts = PcimOptions()
    assert not set(AMORTISED_KEYS) & set(method_settings("pcim", opts))  # PCIM fingerprints unchanged
    amortised = method_settings("pcim-amortised", opts)
    assert set(AMORTISED_KEYS) <= set(amortised) and "steps" not in amortised and "budget" in amortised
    with pytest.raises(ValueError, match="explainer"):
        attribute(BlockReader(), torch.zeros(1, 3, 32, 32), torch.ones(1, dtype=torch.long), "pcim-amortised", opts)


def test_explainer_shapes_for_any_size_resolution_and_per_channel():
    for res, per_channel, (h, w) in [(4, False, (128, 100)), (2, True, (33, 47)), (8, False, (64, 64))]:
        opts = PcimOptions(resolution=res, per_channel=per_channel)
        net = torch.jit.script(ex.make_explainer(3, 5, opts))
        out = net(torch.rand(2, 3, h, w))
        m = 3 if per_channel else 1
        assert tuple(out.shape) == (2, 5 * m, -(-h // res), -(-w // res))
