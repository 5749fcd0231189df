"""Fidelity and localisation scores of attribution maps: pure torch, vectorised over a batch.

Every function takes maps (B, M, H, W) with M = 1 (one map for all channels) or M = C (one per
channel), reduced to one pixel ranking by summing over M unless said otherwise (deletion and
insertion can rank pixel-channels instead: `per_channel=True`).

Direction of each score (DIRECTIONS, the single source for tables and tests): deletion AUC lower is
better; insertion AUC, pointing game, relevance mass, relevance rank accuracy, pixel AUROC and
sparseness (Gini) higher is better; rank correlation with the map of a randomised model (the sanity
check of Adebayo et al. 2018) lower is better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pcim_cli.engine import mixing

Forward = Callable[[torch.Tensor], torch.Tensor]

DIRECTIONS = {
    "deletion_auc": "lower",
    "insertion_auc": "higher",
    "pointing_game": "higher",
    "relevance_mass": "higher",
    "pixel_auroc": "higher",
    "rank_accuracy": "higher",
    "sparseness": "higher",
    "randomisation_spearman": "lower",
}


def _joint(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W): one relevance value per pixel position."""
    return maps.sum(dim=1) if maps.dim() == 4 else maps


def _ranks(score: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of each pixel (0 = most relevant); ties broken by a fixed random order, not by position."""
    b, n = score.shape
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(score.device)
    order = shuffled[torch.argsort(score[:, shuffled], dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=score.device).expand(b, n))
    return ranks


def default_fractions(max_fraction: float = 1.0, steps: int = 20) -> torch.Tensor:
    """Evenly spaced shares of pixels from 0 to max_fraction (steps + 1 points)."""
    return torch.linspace(0.0, max_fraction, steps + 1)


@torch.no_grad()
def perturbation_curve(
    model: Forward,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    mode: str = "deletion",
    substrate: str = "mean",
    fractions: torch.Tensor | None = None,
    blur_sigma: float = 8.0,
    chunk: int = 64,
    per_channel: bool = False,
) -> torch.Tensor:
    """p(target) as the most relevant pixels are removed (deletion) or revealed (insertion).

    RISE protocol (Petsiuk et al. 2018): pixels are ranked by the map; at each fraction f the top
    f*N pixels (all channels at once) are set to the substrate (deletion), or every pixel but those is
    (insertion). per_channel=True with per-channel maps (M = C) ranks the C*N pixel-channels instead,
    and removes the top f*C*N of them. Returns (B, S) probabilities at `fractions`.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    fractions = default_fractions() if fractions is None else fractions
    b, c, h, w = x.shape
    score = ranking_score(maps, c, per_channel)
    sub = mixing.substrate(x, substrate, blur_sigma)
    sub = torch.zeros_like(x) if sub is None else sub
    counts = (fractions.to(x.device) * score[0].numel()).round().long()
    pairs = [(i, s) for i in range(b) for s in range(len(counts))]
    target = target.to(x.device).long()
    probs = perturbed_probs(model, x, pixel_ranks(score), sub, counts, pairs, mode, chunk)
    rows = torch.tensor([i for i, _ in pairs], device=x.device)
    return probs.gather(1, target[rows][:, None])[:, 0].view(b, len(counts))


def pixel_ranks(score: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Ranks (B, M, H, W) of a ranking score (B, M, H, W): 0 = most relevant; ties in a fixed random order."""
    return _ranks(score.flatten(1), seed).view(score.shape)


@torch.no_grad()
def perturbed_probs(model: Forward, x: torch.Tensor, ranks: torch.Tensor, sub: torch.Tensor, counts: torch.Tensor,
                    pairs: Sequence[tuple[int, int]], mode: str = "deletion", chunk: int = 64) -> torch.Tensor:
    """Class probabilities (len(pairs), K) of the perturbed images: for each (row i, step s), image i with
    its `counts[s]` top-ranked pixel(-channel)s set to `sub` (deletion) or with every other one set to it
    (insertion); forwards in batches of at most `chunk` images."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    out = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        ii = torch.tensor([p[0] for p in part], device=x.device)
        ss = torch.tensor([p[1] for p in part], device=x.device)
        top = (ranks[ii] < counts[ss].view(-1, 1, 1, 1)).to(x.dtype)
        keep = 1 - top if mode == "deletion" else top
        out.append(torch.softmax(model(sub[ii] + keep * (x[ii] - sub[ii])).float(), dim=1))
    return torch.cat(out) if out else torch.zeros(0, 0, device=x.device)


def ranking_score(maps: torch.Tensor, channels: int, per_channel: bool) -> torch.Tensor:
    """(B, 1, H, W) joint pixel relevance, or (B, C, H, W) per pixel-channel when per_channel is asked."""
    maps = maps if maps.dim() == 4 else maps[:, None]
    if not per_channel or maps.shape[1] == 1:
        return maps.sum(dim=1, keepdim=True)
    if maps.shape[1] != channels:
        raise ValueError(f"per_channel ranking needs one map per input channel ({channels}), got {maps.shape[1]}")
    return maps


def curve_auc(probs: torch.Tensor, fractions: torch.Tensor | None = None) -> torch.Tensor:
    """Trapezoidal area under p(target) over the fraction axis, normalised to the axis length."""
    fractions = default_fractions(steps=probs.shape[1] - 1) if fractions is None else fractions
    fr = fractions.to(probs.device, probs.dtype)
    area = torch.trapezoid(probs, fr, dim=1)
    return area / (fr[-1] - fr[0])


def deletion_auc(model, x, maps, target, **kw) -> torch.Tensor:
    """(B,) area under the deletion curve; lower is better."""
    fractions = kw.pop("fractions", None)
    fractions = default_fractions() if fractions is None else fractions
    return curve_auc(perturbation_curve(model, x, maps, target, "deletion", fractions=fractions, **kw),
                     fractions)


def insertion_auc(model, x, maps, target, **kw) -> torch.Tensor:
    """(B,) area under the insertion curve; higher is better."""
    fractions = kw.pop("fractions", None)
    fractions = default_fractions() if fractions is None else fractions
    return curve_auc(perturbation_curve(model, x, maps, target, "insertion", fractions=fractions, **kw),
                     fractions)


def pointing_game(maps: torch.Tensor, mask: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """(B,) 1.0 where the map's maximum lies in the mask (dilated by `tolerance` px), else 0.0.

    Images whose mask is empty score NaN (nothing to point at).
    """
    m = _joint(maps)
    b, h, w = m.shape
    mask = mask.bool().view(b, h, w)
    if tolerance > 0:
        k = 2 * tolerance + 1
        mask = F.max_pool2d(mask[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0
    top = m.flatten(1).argmax(dim=1)
    hit = mask.flatten(1).gather(1, top[:, None])[:, 0].float()
    return torch.where(mask.flatten(1).any(1), hit, torch.full_like(hit, float("nan")))


def rank_accuracy(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) relevance rank accuracy (Arras et al. 2022): share of the K top-ranked pixels inside the mask,
    K = the mask's size. 1 when the map's top K are exactly the mask; NaN for empty masks. Ties are
    broken by the same fixed random order as the deletion curves."""
    m = _joint(maps).flatten(1)
    inside_mask = mask.flatten(1).bool().to(m.device)
    k = inside_mask.sum(1)
    top = _ranks(m) < k[:, None]
    share = (top & inside_mask).sum(1).to(m.dtype) / k.clamp(min=1).to(m.dtype)
    return torch.where(k > 0, share, torch.full_like(share, float("nan")))


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    """(B,) Gini index of |map| over pixels (Chalasani et al. 2020): 0 for a uniform map, (N-1)/N when
    one pixel holds all relevance. NaN for an all-zero map (nothing to be sparse about)."""
    a = _joint(maps).flatten(1).abs().double()
    n = a.shape[1]
    a_sorted = a.sort(dim=1).values
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    total = a.sum(1)
    gini = ((2 * i - n - 1) * a_sorted).sum(1) / (n * total.clamp(min=1e-300))
    return torch.where(total > 0, gini, torch.full_like(gini, float("nan"))).float()


def spearman(a: torch.Tensor, b: torch.Tensor, support: str = "all") -> torch.Tensor:
    """(B,) Spearman rank correlation between the joint pixel relevance of two batches of maps (ties get
    their mean rank); NaN where either map is constant. The randomisation sanity check uses it.

    support "union": only the pixels where either map is non-zero. Pixels that are 0 in both maps are
    ties in both rankings and carry no information, but in sparse maps (PCIM's are ~90% zeros) they
    dominate the all-pixel correlation: two maps with different tops then still correlate at ~0.6.
    """
    if support not in ("all", "union"):
        raise ValueError(f"support must be all or union, got {support!r}")
    fa, fb = _joint(a).flatten(1), _joint(b).flatten(1)
    out = torch.full((fa.shape[0],), float("nan"))
    for i in range(fa.shape[0]):
        keep = (fa[i] != 0) | (fb[i] != 0) if support == "union" else torch.ones_like(fa[i], dtype=torch.bool)
        if int(keep.sum()) < 2:
            continue
        ra, rb = _average_ranks(fa[i][keep][None])[0], _average_ranks(fb[i][keep][None])[0]
        ra, rb = ra - ra.mean(), rb - rb.mean()
        den = (ra.square().sum() * rb.square().sum()).sqrt()
        if den > 0:
            out[i] = float((ra * rb).sum() / den)
    return out


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """(B, N) float64 ranks 1..N per row, tied values sharing their mean rank."""
    out = torch.empty(v.shape, dtype=torch.float64, device=v.device)
    for i in range(v.shape[0]):
        _, inv, counts = torch.unique(v[i], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        out[i] = (ends - (counts.double() - 1) / 2)[inv]
    return out


def relevance_mass(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) share of the (non-negative) relevance inside the mask (Arras et al. 2022); NaN for empty masks."""
    m = _joint(maps).clamp(min=0).flatten(1)
    inside_mask = mask.flatten(1).bool()
    share = (m * inside_mask.to(m.dtype)).sum(1) / m.sum(1).clamp(min=1e-12)
    return torch.where(inside_mask.any(1), share, torch.full_like(share, float("nan")))


def pixel_auroc(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) area under the ROC curve of the map as a pixel classifier of the mask (ties count half)."""
    m = _joint(maps).flatten(1).double()
    y = mask.flatten(1).bool()
    out = torch.full((m.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(m.shape[0]):
        pos, neg = int(y[i].sum()), int((~y[i]).sum())
        if pos == 0 or neg == 0:
            continue
        # average ranks (1-based) with ties sharing their mean rank: Mann-Whitney U
        r = _average_ranks(m[i : i + 1])[0]
        out[i] = (r[y[i]].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return out.float()


def summarize(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """nan-aware means of per-image scores."""
    return {k: float(torch.nanmean(v.float())) for k, v in values.items()}


__all__: Sequence[str] = (
    "DIRECTIONS",
    "curve_auc",
    "deletion_auc",
    "insertion_auc",
    "perturbation_curve",
    "pixel_auroc",
    "ranking_score",
    "pointing_game",
    "rank_accuracy",
    "relevance_mass",
    "sparseness",
    "spearman",
    "summarize",
)
