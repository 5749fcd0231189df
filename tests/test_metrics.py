"""Attribution metrics: hand-computable cases, and agreement with Quantus 0.6.0 (an independent code)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pcim_cli.engine import metrics, mixing

H = W = 16
N = H * W


def _square_mask(b: int = 1, top: int = 4, left: int = 4, size: int = 4) -> torch.Tensor:
    """(B, 1, H, W) bool mask of one size x size square at rows top.., cols left.."""
    m = torch.zeros(b, 1, H, W, dtype=torch.bool)
    m[:, :, top : top + size, left : left + size] = True
    return m


# --- a toy model whose target logit depends only on a known 4x4 block ---------------------------------------

SCALE, BIAS = 8.0, 4.0


class BlockModel(nn.Module):
    """Logit of class 0 = SCALE * mean(x over the block rows/cols 4:8, all channels) - BIAS; class 1 = 0."""

    def __init__(self, scale: float = SCALE, bias: float = BIAS):
        super().__init__()
        self.scale = scale
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * x[:, :, 4:8, 4:8].mean(dim=(1, 2, 3)) - self.bias
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.fixture(scope="module")
def block_model():
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.script; the models we load are scripted
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(BlockModel().eval())


class SmallConv(nn.Module):
    def __init__(self, c_in: int = 1, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, 6, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv(c_in: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallConv(c_in).eval()


# --- localisation: pointing game, relevance mass, pixel AUROC -----------------------------------------------


def test_map_equal_to_mask_scores_perfectly():
    mask = _square_mask(b=2)
    mask[1] = False
    mask[1, 0, 10:14, 2:9] = True  # a second, different object
    maps = mask.float()
    assert metrics.pointing_game(maps, mask).tolist() == [1.0, 1.0]
    assert torch.allclose(metrics.relevance_mass(maps, mask), torch.ones(2))
    assert torch.allclose(metrics.pixel_auroc(maps, mask), torch.ones(2))


def test_reversed_map_scores_worst():
    mask = _square_mask(b=2)
    maps = 1.0 - mask.float()
    assert metrics.pointing_game(maps, mask).tolist() == [0.0, 0.0]
    assert metrics.relevance_mass(maps, mask).tolist() == [0.0, 0.0]
    assert metrics.pixel_auroc(maps, mask).tolist() == [0.0, 0.0]


def test_auroc_constant_map_is_half_and_matches_mann_whitney():
    mask = _square_mask()
    assert metrics.pixel_auroc(torch.full((1, 1, H, W), 0.3), mask).item() == pytest.approx(0.5)
    # hand count: 16 positives; map = 1 on 8 of them and on 8 negatives, 0 elsewhere.
    # pairs (pos, neg): pos=1 beats 240-8 negatives at 0, ties 8 -> 8*(232 + 4); pos=0 ties 232 -> 8*116
    maps = torch.zeros(1, 1, H, W)
    maps[0, 0, 4:6, 4:8] = 1.0  # 8 positives
    maps[0, 0, 12:14, 0:4] = 1.0  # 8 negatives
    expected = (8 * (232 + 4) + 8 * 116) / (16 * 240)
    assert metrics.pixel_auroc(maps, mask).item() == pytest.approx(expected, abs=1e-6)


def test_empty_mask_gives_nan_pointing_and_auroc():
    mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
    maps = torch.rand(1, 1, H, W)
    assert math.isnan(metrics.pointing_game(maps, mask).item())
    assert math.isnan(metrics.pointing_game(maps, mask, tolerance=3).item())
    assert math.isnan(metrics.pixel_auroc(maps, mask).item())


def test_pointing_game_tolerance():
    mask = _square_mask()  # cols 4..7
    maps = torch.zeros(1, 1, H, W)
    maps[0, 0, 5, 9] = 1.0  # max 2 px right of the mask's last column
    assert metrics.pointing_game(maps, mask, tolerance=0).item() == 0.0
    assert metrics.pointing_game(maps, mask, tolerance=1).item() == 0.0
    assert metrics.pointing_game(maps, mask, tolerance=2).item() == 1.0
    assert metrics.pointing_game(maps, mask, tolerance=3).item() == 1.0
    # the (H, W) mask layout is accepted too
    assert metrics.pointing_game(maps, mask[:, 0], tolerance=3).item() == 1.0


def test_relevance_mass_ignores_negative_values():
    mask = _square_mask()
    maps = torch.full((1, 1, H, W), -5.0)  # strongly negative everywhere outside
    maps[0, 0, 4:6, 4:6] = 3.0  # 4 px * 3 = 12 inside
    maps[0, 0, 0, 0] = 4.0  # 4 outside
    assert metrics.relevance_mass(maps, mask).item() == pytest.approx(12 / 16)
    # inside values that are negative count as zero too
    maps[0, 0, 6, 6] = -100.0
    assert metrics.relevance_mass(maps, mask).item() == pytest.approx(12 / 16)


def test_per_channel_maps_are_summed_over_channels():
    gen = torch.Generator().manual_seed(1)
    mask = _square_mask()
    d = torch.rand(1, 1, H, W, generator=gen) * 10 * (~mask)  # big distractor outside the mask
    per_channel = torch.cat([mask.float() + d, -d, torch.zeros_like(d)], dim=1)  # (1, 3, H, W), sum = mask
    # channel 0 alone would fail every score; the sum over channels is the mask itself
    assert metrics.pointing_game(per_channel[:, :1], mask).item() == 0.0
    assert metrics.pointing_game(per_channel, mask).item() == 1.0
    assert metrics.relevance_mass(per_channel, mask).item() == pytest.approx(1.0)
    assert metrics.pixel_auroc(per_channel, mask).item() == pytest.approx(1.0)
    # the perturbation ranking sums over channels as well
    model = _conv(c_in=3)
    x = torch.rand(1, 3, H, W, generator=gen)
    target = torch.tensor([1])
    summed = per_channel.sum(1, keepdim=True)
    fr = torch.linspace(0, 1, 9)
    a = metrics.perturbation_curve(model, x, per_channel, target, substrate="zero", fractions=fr)
    b = metrics.perturbation_curve(model, x, summed, target, substrate="zero", fractions=fr)
    torch.testing.assert_close(a, b)


def test_summarize_and_directions():
    out = metrics.summarize({"pointing_game": torch.tensor([1.0, float("nan"), 0.0, 1.0]),
                             "relevance_mass": torch.tensor([0.25, 0.75])})
    assert out == {"pointing_game": pytest.approx(2 / 3), "relevance_mass": pytest.approx(0.5)}
    assert metrics.DIRECTIONS == {"deletion_auc": "lower", "insertion_auc": "higher", "pointing_game": "higher",
                                  "relevance_mass": "higher", "pixel_auroc": "higher", "rank_accuracy": "higher",
                                  "sparseness": "higher", "randomisation_spearman": "lower"}


def test_every_public_score_states_its_direction():
    scores = {"deletion_auc", "insertion_auc", "pointing_game", "relevance_mass", "pixel_auroc", "rank_accuracy",
              "sparseness"}
    assert scores <= set(metrics.DIRECTIONS) and set(metrics.DIRECTIONS.values()) == {"higher", "lower"}
    assert scores <= set(metrics.__all__)


# --- relevance rank accuracy, sparseness (Gini), Spearman -----------------------------------------------------


def test_rank_accuracy_perfect_reversed_and_hand_counted():
    mask = _square_mask(b=2)
    mask[1] = False
    mask[1, 0, 10:14, 2:9] = True
    assert metrics.rank_accuracy(mask.float(), mask).tolist() == [1.0, 1.0]
    assert metrics.rank_accuracy(1.0 - mask.float(), mask).tolist() == [0.0, 0.0]
    # 16 mask pixels; the map's top 16: 6 inside the mask (value 2) and 10 outside (value 3)
    maps = torch.zeros(1, 1, H, W)
    maps[0, 0, 4, 4:8] = 2.0
    maps[0, 0, 5, 4:6] = 2.0
    maps[0, 0, 12, 0:10] = 3.0
    assert metrics.rank_accuracy(maps, _square_mask()).item() == pytest.approx(6 / 16)
    assert math.isnan(metrics.rank_accuracy(maps, torch.zeros_like(_square_mask())).item())


def test_sparseness_is_zero_for_uniform_and_maximal_for_one_pixel():
    uniform = torch.full((1, 1, H, W), 0.2)
    one = torch.zeros(1, 1, H, W)
    one[0, 0, 3, 7] = 5.0
    assert metrics.sparseness(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.sparseness(one).item() == pytest.approx((N - 1) / N)
    # half the pixels at 1, half at 0: Gini = 1/2; a map that equals the mask (16 px) beats its complement
    half = (torch.arange(N) % 2).float().view(1, 1, H, W)
    assert metrics.sparseness(half).item() == pytest.approx(0.5)
    mask = _square_mask().float()
    assert metrics.sparseness(mask).item() > metrics.sparseness(1 - mask).item()
    assert math.isnan(metrics.sparseness(torch.zeros(1, 1, H, W)).item())


def test_spearman_of_identical_reversed_and_monotone_maps():
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 1, H, W, generator=gen)
    assert metrics.spearman(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert metrics.spearman(a, a.exp() * 3).tolist() == pytest.approx([1.0, 1.0])  # ranks only
    assert metrics.spearman(a, -a).tolist() == pytest.approx([-1.0, -1.0])
    assert math.isnan(metrics.spearman(a[:1], torch.ones(1, 1, H, W)).item())


def test_spearman_on_the_union_support_ignores_pixels_zero_in_both_maps():
    a = torch.zeros(1, 1, H, W)
    b = torch.zeros(1, 1, H, W)
    a[0, 0, 0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b[0, 0, 0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # same support, reversed order
    assert metrics.spearman(a, b).item() > 0.5  # all pixels: the shared zeros dominate
    assert metrics.spearman(a, b, support="union").item() == pytest.approx(-1.0)


def test_spearman_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(3, 2, H, W, generator=gen)
    b = (a + torch.rand(3, 2, H, W, generator=gen)).round(decimals=1)  # with ties
    ours = metrics.spearman(a, b)
    for i in range(3):
        ref = stats.spearmanr(a[i].sum(0).flatten().numpy(), b[i].sum(0).flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)


def test_per_channel_ranking_removes_pixel_channels():
    """With per_channel=True only the ranked pixel-channels are removed, the other channels stay."""

    class ChannelSum(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # logit of class 1 = 4 * mean of channel 1 - 2
            s = 4 * x[:, 1].mean(dim=(1, 2)) - 2
            return torch.stack([torch.zeros_like(s), s], 1)

    x = torch.ones(1, 2, H, W)
    maps = torch.zeros(1, 2, H, W)
    maps[0, 0] = 2.0  # channel 0 ranked first everywhere, but the model only reads channel 1
    maps[0, 1] = 1.0
    fr = torch.tensor([0.0, 0.5, 1.0])
    target = torch.tensor([1])
    joint = metrics.perturbation_curve(ChannelSum(), x, maps, target, substrate="zero", fractions=fr)
    split = metrics.perturbation_curve(ChannelSum(), x, maps, target, substrate="zero", fractions=fr,
                                       per_channel=True)
    p = [1 / (1 + math.exp(-v)) for v in (2, 0, -2)]
    assert joint[0].tolist() == pytest.approx(p)  # joint: half of the pixels, both channels -> half of channel 1
    assert split[0].tolist() == pytest.approx([p[0], p[0], p[2]])  # half of the pixel-channels = all of channel 0
    with pytest.raises(ValueError, match="per_channel"):
        metrics.perturbation_curve(ChannelSum(), x, maps[:, :1].expand(1, 3, H, W), target, per_channel=True)


# --- fidelity: perturbation curves (RISE deletion / insertion) ----------------------------------------------


def test_curve_auc_of_constant_curve_is_the_constant():
    probs = torch.full((3, 21), 0.37)
    assert torch.allclose(metrics.curve_auc(probs), torch.full((3,), 0.37))
    uneven = torch.tensor([0.1, 0.3, 0.35, 0.8])
    assert torch.allclose(metrics.curve_auc(torch.full((2, 4), 0.6), uneven), torch.full((2,), 0.6))
    # a linear ramp from 0 to 1 over the full axis has area 1/2
    assert metrics.curve_auc(torch.linspace(0, 1, 11)[None]).item() == pytest.approx(0.5)


def test_default_fractions():
    fr = metrics.default_fractions(0.5, steps=10)
    assert len(fr) == 11 and fr[0].item() == 0.0 and fr[-1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("substrate", ["zero", "mean", "blur"])
def test_curve_endpoints_are_original_and_substrate(substrate):
    gen = torch.Generator().manual_seed(2)
    model = _conv(c_in=2)
    x = torch.rand(3, 2, H, W, generator=gen)
    maps = torch.randn(3, 1, H, W, generator=gen)
    target = torch.tensor([0, 1, 2])
    fr = torch.linspace(0, 1, 6)
    sub = mixing.substrate(x, substrate, 4.0)
    with torch.no_grad():
        p_x = torch.softmax(model(x), 1)[torch.arange(3), target]
        p_sub = torch.softmax(model(sub), 1)[torch.arange(3), target]
    dele = metrics.perturbation_curve(model, x, maps, target, "deletion", substrate, fr, blur_sigma=4.0)
    ins = metrics.perturbation_curve(model, x, maps, target, "insertion", substrate, fr, blur_sigma=4.0)
    assert dele.shape == ins.shape == (3, 6)
    torch.testing.assert_close(dele[:, 0], p_x)
    torch.testing.assert_close(dele[:, -1], p_sub)
    torch.testing.assert_close(ins[:, 0], p_sub)
    torch.testing.assert_close(ins[:, -1], p_x)
    # chunking does not change the result
    chunked = metrics.perturbation_curve(model, x, maps, target, "deletion", substrate, fr, 4.0, chunk=4)
    torch.testing.assert_close(chunked, dele)


def test_deletion_and_insertion_on_block_model(block_model):
    x = torch.ones(1, 2, H, W)  # two channels: a pixel is removed in all channels at once
    target = torch.tensor([0])
    good = _square_mask().float()  # the block the model looks at
    bad = 1.0 - good
    fr = torch.linspace(0, 1, 33)  # steps of 8 px: half the 16-px block per step
    hi, mid, lo = _sig(SCALE - BIAS), _sig(SCALE / 2 - BIAS), _sig(-BIAS)  # block whole / half / gone
    step = 1 / 32

    dele_good = metrics.perturbation_curve(block_model, x, good, target, "deletion", "zero", fr)[0]
    torch.testing.assert_close(dele_good[:3], torch.tensor([hi, mid, lo]))
    torch.testing.assert_close(dele_good[3:], torch.full((30,), lo))
    ins_bad = metrics.perturbation_curve(block_model, x, bad, target, "insertion", "zero", fr)[0]
    torch.testing.assert_close(ins_bad, dele_good.flip(0))  # the block is revealed only in the last two steps

    # hand-computed areas: the block goes in the first two steps (best deletion) or the last two (worst)
    best = step * ((hi + mid) / 2 + (mid + lo) / 2) + 30 * step * lo
    worst = 30 * step * hi + step * ((hi + mid) / 2 + (mid + lo) / 2)
    kw = {"substrate": "zero", "fractions": fr}
    assert metrics.deletion_auc(block_model, x, good, target, **kw).item() == pytest.approx(best, abs=1e-5)
    assert metrics.deletion_auc(block_model, x, bad, target, **kw).item() == pytest.approx(worst, abs=1e-5)
    assert metrics.insertion_auc(block_model, x, good, target, **kw).item() == pytest.approx(worst, abs=1e-5)
    assert metrics.insertion_auc(block_model, x, bad, target, **kw).item() == pytest.approx(best, abs=1e-5)
    # within two 1/32 steps of the extremes possible: p(substrate) for deletion, p(x) for insertion
    assert best - lo < 2 * step and hi - worst < 2 * step
    assert best < 0.05 < 0.95 < worst


def test_auc_wrappers_equal_curve_auc_of_curve():
    gen = torch.Generator().manual_seed(3)
    model = _conv()
    x = torch.rand(2, 1, H, W, generator=gen)
    maps = torch.randn(2, 1, H, W, generator=gen)
    target = torch.tensor([2, 0])
    fr = metrics.default_fractions()
    curve = metrics.perturbation_curve(model, x, maps, target, "deletion", "mean", fr)
    torch.testing.assert_close(metrics.deletion_auc(model, x, maps, target), metrics.curve_auc(curve, fr))
    curve = metrics.perturbation_curve(model, x, maps, target, "insertion", "blur", fr)
    torch.testing.assert_close(metrics.insertion_auc(model, x, maps, target, substrate="blur"),
                               metrics.curve_auc(curve, fr))


def test_ranks_are_a_permutation_and_ties_are_not_raster_order():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert metrics._ranks(score).tolist() == [[3, 0, 2, 1]]
    ranks = metrics._ranks(torch.zeros(1, N))  # all tied
    assert sorted(ranks[0].tolist()) == list(range(N))
    first_row = ranks[0, :W]
    assert not bool((first_row < W).all())  # the 16 first-ranked pixels are not the first image row


# --- agreement with Quantus 0.6.0 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantus():
    q = pytest.importorskip("quantus", reason="quantus (test-only reference) is not importable",
                            exc_type=ImportError)
    if not hasattr(np, "trapz"):  # Quantus 0.6.0 calls np.trapz, removed in numpy 2.4
        np.trapz = np.trapezoid
    return q


def _random_case(seed: int, b: int = 6):
    """Single-channel inputs with per-image minimum exactly 0, tie-free maps, masks, targets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, H, W, generator=gen)
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)  # Quantus "black" = per-image minimum; make it 0
    # tie-free maps: a random permutation of distinct values, some negative
    maps = torch.stack([torch.randperm(N, generator=gen) for _ in range(b)]).float().view(b, 1, H, W) - N / 3
    mask = torch.rand(b, 1, H, W, generator=gen) < 0.3
    return x, maps, mask


def test_pointing_game_agrees_with_quantus(quantus):
    x, maps, mask = _random_case(10, b=16)
    model = _conv()
    y = model(x).argmax(1)
    # put the maximum inside the mask for half of the images so both outcomes occur
    for i in range(0, 16, 2):
        idx = mask[i].flatten().nonzero()[0, 0]
        maps[i].view(-1)[idx] = N
    theirs = quantus.PointingGame(disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(),
        s_batch=mask.numpy().astype(np.float32), channel_first=True, device="cpu")
    ours = metrics.pointing_game(maps, mask)
    assert ours.tolist() == [float(v) for v in theirs]
    assert 0 < ours.sum() < 16


def test_relevance_mass_agrees_with_quantus(quantus):
    x, maps, mask = _random_case(11)
    maps = maps - maps.amin(dim=(1, 2, 3), keepdim=True) + 1  # Quantus does not clamp negatives: use >= 0
    model = _conv()
    y = model(x).argmax(1)
    theirs = quantus.RelevanceMassAccuracy(disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(),
        s_batch=mask.numpy().astype(np.float32), channel_first=True, device="cpu")
    np.testing.assert_allclose(metrics.relevance_mass(maps, mask).numpy(), np.asarray(theirs), rtol=1e-5)


@pytest.mark.parametrize("k", [16, 32, 64])
def test_deletion_curve_agrees_with_quantus_pixel_flipping(quantus, k):
    """Quantus flips features_in_step=k pixels per step (cumulatively) to the image minimum ("black"), one
    prediction after each step; our curve at fractions j*k/N (j = 1..N/k) with a zero substrate is the same
    thing for single-channel images whose minimum is 0. Tolerance: 1e-5 absolute on probabilities."""
    x, maps, _ = _random_case(12)
    model = _conv()
    y = model(x).argmax(1)
    theirs = np.asarray(quantus.PixelFlipping(
        features_in_step=k, perturb_baseline="black", disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), channel_first=True,
        device="cpu"))
    fr = torch.arange(1, N // k + 1) * k / N
    ours = metrics.perturbation_curve(model, x, maps, y, mode="deletion", substrate="zero", fractions=fr)
    assert theirs.shape == ours.shape == (6, N // k)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    assert np.ptp(theirs, axis=1).min() > 1e-3  # the curves actually move

    # Quantus's per-sample AUC is trapz with dx=1 over the steps; ours is normalised: theirs / (steps - 1)
    auc = np.asarray(quantus.PixelFlipping(
        features_in_step=k, perturb_baseline="black", return_auc_per_sample=True, disable_warnings=True,
        display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), channel_first=True,
        device="cpu"))
    np.testing.assert_allclose(metrics.curve_auc(ours, fr).numpy(), auc / (N // k - 1), atol=1e-5)


def test_pixel_auroc_agrees_with_sklearn(quantus):
    """scikit-learn comes with Quantus; roc_auc_score also counts ties as half."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    _, maps, mask = _random_case(13)
    maps = maps.round(decimals=-1)  # introduce ties on purpose
    ours = metrics.pixel_auroc(maps, mask)
    for i in range(len(maps)):
        ref = sklearn_metrics.roc_auc_score(mask[i].flatten().numpy(), maps[i].flatten().numpy())
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)


def test_rank_accuracy_agrees_with_quantus(quantus):
    x, maps, mask = _random_case(14)
    model = _conv()
    y = model(x).argmax(1)
    theirs = quantus.RelevanceRankAccuracy(disable_warnings=True, display_progressbar=False, normalise=False)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(),
        s_batch=mask.numpy().astype(np.float32), channel_first=True, device="cpu")
    np.testing.assert_allclose(metrics.rank_accuracy(maps, mask).numpy(), np.asarray(theirs), rtol=1e-6)


def test_sparseness_agrees_with_quantus(quantus):
    x, maps, _ = _random_case(15)
    model = _conv()
    y = model(x).argmax(1)
    maps = maps.abs() + 1  # Quantus adds 1e-7 to every value: keep values far above it
    theirs = quantus.Sparseness(disable_warnings=True, display_progressbar=False, normalise=False, abs=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), channel_first=True, device="cpu")
    np.testing.assert_allclose(metrics.sparseness(maps).numpy(), np.asarray(theirs), rtol=1e-5)
