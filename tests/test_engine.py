"""The PCIM engine against toy models whose answer is known by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from toy_models import BLOCK, BlockReader, block_mass, toy_images

from pcim_cli.engine import mixing
from pcim_cli.engine.pcim import FastForward, PcimOptions, fit_pcim, input_noise, target_log_probs


class SmallCNN(torch.nn.Module):
    """A random fully convolutional net with BatchNorm (eval mode), to check the model is untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).amax(dim=(2, 3))


# a fixed budget: these tests are about the fit's mechanics (the block is 6 % of the image, so the default
# would grow the budget, at steps that depend on the fit's length); tests/test_large_evidence.py: the growth
FAST = PcimOptions(steps=60, lr=0.1, resolution=2, adaptive_budget=None)




@pytest.mark.parametrize(
    "opts",
    [FAST, dataclasses.replace(FAST, per_channel=True),
     PcimOptions(steps=60, budget=None, objective="keep", keep_substrate="none", resolution=1, loss="logit")],
    ids=["default", "per-channel", "paper-softmax"],
)
def test_map_mass_concentrates_on_the_pixels_the_model_reads(block_model, opts):
    x = toy_images()
    result = fit_pcim(block_model, x, torch.ones(4, dtype=torch.long), opts)
    assert result.maps.shape == (4, 3 if opts.per_channel else 1, 32, 32)
    assert (result.maps >= 0).all()
    # the block is 64 of 1024 pixels (6%): chance mass is 0.06
    assert (block_mass(result.maps) > 0.6).all(), block_mass(result.maps)
    if opts.per_channel:  # only channel 1 carries evidence
        per = result.maps[:, :, BLOCK[0], BLOCK[1]].sum(dim=(2, 3))
        assert (per.argmax(1) == 1).all()


def test_zero_weights_give_back_the_input_exactly():
    x = torch.rand(2, 3, 20, 28)
    for resolution in (1, 3):
        w = torch.zeros(mixing.weight_shape(x.shape, per_channel=False, resolution=resolution))
        m = mixing.upsample(mixing.mixing_weights(w, budget=None), (20, 28))
        assert torch.equal(mixing.compose(x, m, None), x)
        m1 = mixing.upsample(mixing.mixing_weights(w, budget=1.0), (20, 28))
        assert torch.equal(mixing.compose(x, m1, mixing.substrate(x, "blur", 3.0)), x)


def test_budget_caps_weights_at_one_and_spends_the_budget():
    w = torch.randn(2, 1, 16, 16) * 3
    m = mixing.mixing_weights(w, budget=0.1)
    assert m.max() <= 1.0
    assert (m.sum(dim=(1, 2, 3)) <= 0.1 * 256 + 1e-4).all()


def test_map_does_not_depend_on_batch_companions():
    model = torch.jit.script(SmallCNN().eval())
    x = toy_images(4, seed=1)
    target = torch.tensor([0, 1, 2, 1])
    opts = dataclasses.replace(FAST, steps=25, noise=0.01)
    seeds = torch.tensor([11, 12, 13, 14])
    together = fit_pcim(model, x, target, opts, seeds=seeds)
    alone = fit_pcim(model, x[2:3], target[2:3], opts, seeds=seeds[2:3])
    torch.testing.assert_close(alone.maps[0], together.maps[2], rtol=1e-4, atol=1e-5)
    shuffled = fit_pcim(model, x[[3, 2, 0, 1]], target[[3, 2, 0, 1]], opts, seeds=seeds[[3, 2, 0, 1]])
    torch.testing.assert_close(shuffled.maps[1], together.maps[2], rtol=1e-4, atol=1e-5)


def test_same_seed_same_maps():
    model = torch.jit.script(SmallCNN().eval())
    x = toy_images(3, seed=2)
    opts = dataclasses.replace(FAST, steps=20, noise=0.02, seed=5)
    a = fit_pcim(model, x, torch.zeros(3, dtype=torch.long), opts)
    b = fit_pcim(model, x, torch.zeros(3, dtype=torch.long), opts)
    assert torch.equal(a.maps, b.maps)
    c = fit_pcim(model, x, torch.zeros(3, dtype=torch.long), dataclasses.replace(opts, seed=6))
    assert not torch.equal(a.maps, c.maps)


def test_model_parameters_flags_and_mode_are_left_as_found():
    net = SmallCNN()
    net.body[1].train()  # a mixed mode: the engine must not "fix" it
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    fit_pcim(net, toy_images(2), torch.tensor([0, 1]), dataclasses.replace(FAST, steps=5))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included
    assert [p.requires_grad for p in net.parameters()] == flags
    assert [m.training for m in net.modules()] == modes
    assert all(p.grad is None for p in net.parameters())


def test_early_stopping_freezes_converged_images_while_others_continue(block_model):
    x = toy_images(4)
    target = torch.tensor([1, 1, 0, 1])  # image 2 explains the class it is not
    opts = dataclasses.replace(FAST, steps=200, patience=10, tol=1e-2)
    stopped = fit_pcim(block_model, x, target, opts)
    assert (stopped.steps < 200).any(), stopped.steps
    assert stopped.steps.max() <= 200
    # an image's result depends only on itself: refitting it alone with the same options gives its map
    alone = fit_pcim(block_model, x[1:2], target[1:2], opts, seeds=torch.tensor([1]))
    assert int(alone.steps[0]) == int(stopped.steps[1])
    torch.testing.assert_close(alone.maps[0], stopped.maps[1])
    # and the stopped maps agree with the full-length fit on where the evidence is
    full = fit_pcim(block_model, x, target, dataclasses.replace(opts, patience=0))
    assert (block_mass(stopped.maps[[0, 1, 3]]) > 0.6).all()
    # stated tolerance: the share of the map on the evidence differs by less than 0.05
    assert (block_mass(full.maps[[0, 1, 3]]) - block_mass(stopped.maps[[0, 1, 3]])).abs().max() < 0.05


def test_stats_report_probabilities_before_and_after(block_model):
    x = toy_images(2)
    r = fit_pcim(block_model, x, torch.ones(2, dtype=torch.long), FAST)
    with torch.no_grad():
        p = torch.softmax(block_model(x), 1)[:, 1]
    torch.testing.assert_close(r.prob_original, p)
    assert (r.prob_deleted < r.prob_original).all()
    assert r.loss.shape == (2,) and torch.isfinite(r.loss).all()
    assert (r.steps == FAST.steps).all()


def test_target_log_probs_are_stable_for_confident_logits():
    logits = torch.tensor([[0.0, 200.0], [50.0, -50.0]])
    log_p, log_not_p = target_log_probs(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(log_p, torch.tensor([0.0, -100.0]))
    torch.testing.assert_close(log_not_p, torch.tensor([-200.0, 0.0]))


def test_invalid_options_are_refused_with_every_problem():
    with pytest.raises(ValueError, match="steps.*budget"):
        PcimOptions(steps=-1, budget=2.0)  # steps=0 is valid: no fit, the maps of `init`


# --------------------------------------------------------------------------------------------------
# early stopping and the fused kept / deleted batch (issue 8)


def test_a_stopped_image_keeps_its_map_while_the_others_go_on(block_model):
    """An image that stopped after s steps has exactly the map of an s-step fit without early stopping."""
    x = toy_images(4)
    target = torch.tensor([1, 1, 0, 1])
    opts = dataclasses.replace(FAST, steps=200, patience=10, tol=1e-2)
    stopped = fit_pcim(block_model, x, target, opts, seeds=torch.arange(4))
    steps = stopped.steps.tolist()
    assert min(steps) < max(steps), steps  # some stopped while others continued
    for i, s in enumerate(steps):
        truncated = fit_pcim(block_model, x[i : i + 1], target[i : i + 1],
                             dataclasses.replace(opts, steps=s, patience=0), seeds=torch.tensor([i]))
        torch.testing.assert_close(stopped.maps[i], truncated.maps[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stopped.prob_mixed[i], truncated.prob_mixed[0], rtol=1e-5, atol=1e-7)


def test_early_stopped_maps_match_the_full_fit_within_tolerance(block_model):
    """Stated tolerance: relative L1 distance of the maps < 0.25, and both put their mass on the evidence."""
    x = toy_images(4, seed=3)
    target = torch.ones(4, dtype=torch.long)
    full = fit_pcim(block_model, x, target, dataclasses.replace(FAST, steps=200))
    early = fit_pcim(block_model, x, target, dataclasses.replace(FAST, steps=200, patience=20, tol=1e-3))
    assert (early.steps < 200).all(), early.steps
    rel = (early.maps - full.maps).abs().sum((1, 2, 3)) / full.maps.abs().sum((1, 2, 3))
    assert (rel < 0.25).all(), rel
    assert (block_mass(early.maps) > 0.6).all() and (block_mass(full.maps) > 0.6).all()


class Recorder(torch.nn.Module):
    """BlockReader that keeps the batches it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = BlockReader()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_kept_and_deleted_images_go_through_the_model_as_one_batch_bit_for_bit():
    model = Recorder()
    x = toy_images(3)
    # from zero logits and without input noise, the first step's batch is known by hand
    fit_pcim(model, x, torch.ones(3, dtype=torch.long), dataclasses.replace(FAST, steps=1, init="zero", noise=0.0))
    first = model.seen[1]  # seen[0]: the unmixed images (prob_original)
    w = torch.zeros(mixing.weight_shape(x.shape, FAST.per_channel, FAST.resolution))
    m = mixing.upsample(mixing.mixing_weights(w, FAST.budget), (32, 32))
    kept = mixing.compose(x, m, mixing.substrate(x, FAST.keep_substrate, FAST.blur_sigma))
    deleted = mixing.compose(x, 1 - m.clamp(max=1.0), mixing.substrate(x, FAST.delete_substrate, FAST.blur_sigma))
    assert torch.equal(first, torch.cat([kept, deleted]))


def test_with_input_noise_both_halves_of_the_batch_hold_the_same_noisy_image():
    model = Recorder()
    x = toy_images(3)
    opts = dataclasses.replace(FAST, steps=1, init="zero", noise=0.05)
    fit_pcim(model, x, torch.ones(3, dtype=torch.long), opts)
    first = model.seen[1]
    noisy = x + input_noise(x.shape, opts.seed + torch.arange(3), 0, opts.noise, x.device, x.dtype)
    w = torch.zeros(mixing.weight_shape(x.shape, FAST.per_channel, FAST.resolution))
    m = mixing.upsample(mixing.mixing_weights(w, FAST.budget), (32, 32))
    kept = mixing.compose(noisy, m, mixing.substrate(x, FAST.keep_substrate, FAST.blur_sigma))
    deleted = mixing.compose(noisy, 1 - m.clamp(max=1.0), mixing.substrate(x, FAST.delete_substrate, FAST.blur_sigma))
    assert torch.equal(first, torch.cat([kept, deleted]))
    assert not torch.equal(first[:3], mixing.compose(x, m, mixing.substrate(x, FAST.keep_substrate, FAST.blur_sigma)))


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_fast_forward_levers_run_on_cpu_and_keep_the_answer(block_model, precision):
    net = torch.jit.script(SmallCNN().eval())
    x = toy_images(3)
    fast = FastForward(net, precision=precision, channels_last=True)
    with torch.no_grad():
        ref, out = net(x), fast(x)
    assert out.dtype == torch.float32
    tol = 1e-5 if precision == "float32" else 5e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fast(xx)[:, 1].sum(), xx)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    result = fit_pcim(FastForward(block_model, precision, channels_last=True), x, torch.ones(3, dtype=torch.long),
                      FAST)
    assert (block_mass(result.maps) > 0.6).all()
    if precision == "float32":  # channels_last alone changes nothing but the memory layout
        plain = fit_pcim(block_model, x, torch.ones(3, dtype=torch.long), FAST)
        torch.testing.assert_close(result.maps, plain.maps, rtol=1e-4, atol=1e-6)


def test_fast_forward_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="bfloat16"):
        FastForward(SmallCNN(), precision="int8")
