"""Fidelity and localisation scores of attribution maps: pure torch, vectorised over a batch.

Every function takes maps (B, M, H, W) with M = 1 (one map for all channels) or M = C (one per
channel), reduced to one pixel ranking by summing over M unless said otherwise.

Direction of each score (also in DIRECTIONS): deletion AUC lower is better; insertion AUC, pointing
game, relevance mass, pixel AUROC higher is better.
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
) -> torch.Tensor:
    """p(target) as the most relevant pixels are removed (deletion) or revealed (insertion).

    RISE protocol (Petsiuk et al. 2018): pixels are ranked by the map; at each fraction f the top
    f*N pixels (all channels at once) are set to the substrate (deletion), or every pixel but those is
    (insertion). Returns (B, S) probabilities at `fractions`.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    fractions = default_fractions() if fractions is None else fractions
    b, c, h, w = x.shape
    n = h * w
    sub = mixing.substrate(x, substrate, blur_sigma)
    sub = torch.zeros_like(x) if sub is None else sub
    ranks = _ranks(_joint(maps).flatten(1)).view(b, 1, h, w)
    counts = (fractions.to(x.device) * n).round().long()
    target = target.to(x.device).long()
    probs = torch.empty(b, len(counts), device=x.device)
    pairs = [(i, s) for i in range(b) for s in range(len(counts))]
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        ii = torch.tensor([p[0] for p in part], device=x.device)
        ss = torch.tensor([p[1] for p in part], device=x.device)
        top = (ranks[ii] < counts[ss].view(-1, 1, 1, 1)).to(x.dtype)
        keep = 1 - top if mode == "deletion" else top
        batch = sub[ii] + keep * (x[ii] - sub[ii])
        p = torch.softmax(model(batch), dim=1).gather(1, target[ii][:, None])[:, 0]
        probs[ii, ss] = p.to(probs.dtype)
    return probs


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
        vals, inv, counts = torch.unique(m[i], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        avg_rank = ends - (counts.double() - 1) / 2
        r = avg_rank[inv]
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
    "pointing_game",
    "relevance_mass",
    "summarize",
)
