"""How a PCIM fit proceeds over its steps: learning-rate schedule, coarse-to-fine phases, first logits.

Pure functions of the options; `pcim.fit_pcim` calls them. docs/method.md ("Fewer passes per map")
has the measurements behind the defaults.

- `lr_factor(step, steps, schedule, warmup)`: the multiplier of `lr` at a step. `constant` (1), `cosine`
  (from 1 down to `FLOOR` at the last step), `step` (1, then 0.3 after half the steps, 0.1 after three
  quarters); any of them after `warmup` steps of a linear ramp from 1 / warmup.
- `phases(steps, resolution, coarse, coarse_share)`: the resolutions the logits are fitted at, and for
  how many steps: `[(resolution, steps)]`, or first `[(coarse, k), (resolution, steps - k)]`.
- `refine_logits(w, shape)`: coarse logits carried onto a finer grid (bilinear), so the mixing weights
  n * alpha stay what they were (each coarse cell becomes the fine cells it covers).
- `gradient_logits(model, x, target, ...)`: first logits from the input gradient: the first-order drop of
  log p(target) when a pixel is deleted, pooled onto the weight grid and scaled to `scale` at its maximum.
  One forward and backward pass of the B images (hook-free: the gradient with respect to the input).
- `BudgetGrowth`: each map's budget within its fit (`PcimOptions.adaptive_budget`): from step GROW_START,
  every GROW_EVERY steps, a map whose deleted image still holds more than half of p(target | x) doubles
  its budget, up to the limit, until GROW_LAST steps before the end; read from the deleted images the fit
  sends anyway (no extra pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pcim_cli.engine import mixing
from pcim_cli.engine.options import INITS, SCHEDULES

__all__ = ["FLOOR", "INITS", "SCHEDULES", "gradient_logits", "lr_factor", "phases", "refine_logits",
           "substrate_or_zero"]
#: the cosine schedule ends at this share of lr (not 0: the last steps still move)
FLOOR = 0.05


def lr_factor(step: int, steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Multiplier of the learning rate at `step` (0-based) of `steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup - 1)
    t = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "cosine":
        return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0 if t < 0.5 else 0.3 if t < 0.75 else 0.1


def phases(steps: int, resolution: int, coarse: int = 0, coarse_share: float = 0.5) -> list[tuple[int, int]]:
    """(resolution, number of steps) of each phase of the fit; one phase unless `coarse` > resolution."""
    if coarse <= resolution or steps < 2:
        return [(resolution, steps)]
    k = min(steps - 1, max(1, round(steps * coarse_share)))
    return [(coarse, k), (resolution, steps - k)]


def refine_logits(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Logits (B, M, h, w) on the finer grid `shape` (B, M, H', W'), bilinearly: same n * alpha per area."""
    if tuple(w.shape) == tuple(shape):
        return w.clone()
    return F.interpolate(w, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)


Forward = Callable[[torch.Tensor], torch.Tensor]


def gradient_logits(model: Forward, x: torch.Tensor, target: torch.Tensor, delete_sub: torch.Tensor,
                    shape: tuple[int, ...], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First logits (shape) from the input gradient of log p(target), and p(target | x) (same forward).

    The logits: relu(grad . (x - sub)), how much deleting each pixel lowers log p to first order, summed
    over channels (or per channel when the logits are per channel), average-pooled onto the logits' grid,
    divided by its maximum per image, times scale."""
    xg = x.detach().clone().requires_grad_(True)
    logits = model(xg)
    log_p = logits.gather(1, target[:, None])[:, 0] - torch.logsumexp(logits, dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), xg)
    with torch.no_grad():
        drop = (grad * (x - delete_sub)).clamp(min=0)  # log p falls by about grad . (x - sub) when deleted
        if shape[1] == 1:
            drop = drop.sum(dim=1, keepdim=True)
        pooled = F.adaptive_avg_pool2d(drop, tuple(shape[-2:]))
        peak = pooled.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return (scale * pooled / peak).to(x.dtype), log_p.detach().exp()


def substrate_or_zero(x: torch.Tensor, kind: str, blur_sigma: float) -> torch.Tensor:
    """mixing.substrate, with zeros for `none` (what a deleted pixel becomes)."""
    sub = mixing.substrate(x, kind, blur_sigma)
    return torch.zeros_like(x) if sub is None else sub


#: budget growth within a fit (BudgetGrowth): the steps (1-based) at which a map may grow are GROW_START,
#: GROW_START + GROW_EVERY, ... up to GROW_LAST steps before the end (with 49 steps: 12, 18, 24, 30, 36)
GROW_START, GROW_EVERY, GROW_LAST = 12, 6, 12
#: a map grows while its deletion share, 1 - p(deleted) / p(original), is below this
GROW_BELOW = 0.5
#: a map of a class with p(target | x) below this never grows: there is nothing to delete (PCIM_Fit `absent`)
GROW_MIN_P = 0.01


class BudgetGrowth:
    """The budget of every row of a fit, grown during it (PcimOptions.adaptive_budget): the smallest budget
    whose deleted image loses the class, found within one fit.

    At each check (`due`), `update` gets log p(target) and log(1 - p(target)) of the rows' deleted images
    of that step. A row whose deleted image still holds more than half of p(original) doubles its budget, up
    to `limit`; a row stops growing for good when a doubling did not lower the log-odds of p(target |
    deleted image) by the next check (more budget finds no more evidence), and a row whose class has
    p(original) < GROW_MIN_P never grows. A budget at or above `limit` never grows.
    """

    def __init__(self, budgets: torch.Tensor, p_original: torch.Tensor, limit: float, steps: int):
        self.budgets = budgets.clone()
        self.p_original = p_original.to(budgets.dtype)
        self.limit, self.steps = float(limit), int(steps)
        self.growing = self.p_original >= GROW_MIN_P
        self.odds_at_growth = torch.full_like(self.budgets, float("nan"))  # log-odds when the row last grew

    def due(self, step: int) -> bool:
        """Is the end of `step` (0-based) a check?"""
        s = step + 1
        return GROW_START <= s <= self.steps - GROW_LAST and (s - GROW_START) % GROW_EVERY == 0

    def update(self, idx: torch.Tensor, log_p: torch.Tensor, log_not_p: torch.Tensor) -> None:
        """Grow the rows idx whose deleted image (log p, log(1 - p) of the target) still holds the class."""
        odds = (log_p - log_not_p).to(self.budgets.dtype)
        share = 1 - log_p.exp().to(self.budgets.dtype) / self.p_original[idx].clamp(min=1e-12)
        ref = self.odds_at_growth[idx]
        self.growing[idx] &= ~(torch.isfinite(ref) & (odds > ref))
        more = self.growing[idx] & (share < GROW_BELOW) & (self.budgets[idx] < self.limit - 1e-9)
        rows = idx[more]
        self.budgets[rows] = (self.budgets[rows] * 2).clamp(max=self.limit)
        self.odds_at_growth[rows] = odds[more]
