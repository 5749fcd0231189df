"""An adaptive budget that grows until deleting the map's pixels removes the class.

Pure torch. `fit_adaptive` refits every image whose map did not remove the class (the `ok` test of
engine/verdict.py `fit_quality`) with twice the budget, up to `max_budget`.
"""

from __future__ import annotations

import dataclasses

import torch

from pcim_cli.engine.pcim import Forward, PcimOptions, PcimResult, fit_pcim
from pcim_cli.engine.verdict import FIT_OK


def fit_adaptive(model: Forward, x: torch.Tensor, target: torch.Tensor, opts: PcimOptions,
                 seeds: torch.Tensor | None = None, grow: float = 2.0, max_budget: float = 0.32,
                 lose: float = FIT_OK) -> tuple[PcimResult, torch.Tensor]:
    """fit_pcim, then refit every image whose deleted image still holds the class (p(deleted) >
    (1 - lose) * p(original)) with the budget times `grow`, up to `max_budget`. Returns the result (each
    image's last fit; `steps` adds up its fits) and each image's budget (B,). The refit reference of the
    benchmarks (up to 5 fits per map): pcim itself grows the budget within one fit (PcimOptions.adaptive_budget)."""
    if len(opts.budgets) != 1:
        raise ValueError(f"an adaptive budget starts from one budget, got {opts.budget}")
    b = x.shape[0]
    seeds = opts.seed + torch.arange(b) if seeds is None else seeds.reshape(b)
    res = fit_pcim(model, x, target, opts, seeds)
    budget = opts.budgets[0]
    budgets = torch.full((b,), budget, dtype=torch.float64)
    todo = _holds_class(res, lose)
    while bool(todo.any()) and budget * grow <= max_budget + 1e-12:
        budget *= grow
        idx = todo.nonzero()[:, 0]
        dev = idx.to(x.device)
        part = fit_pcim(model, x[dev], target.reshape(b)[dev], dataclasses.replace(opts, budget=budget),
                        seeds[idx.cpu()])
        for name in ("maps", "prob_mixed", "prob_deleted", "loss"):
            getattr(res, name)[dev] = getattr(part, name).to(getattr(res, name).dtype)
        res.steps[dev] += part.steps.to(res.steps.dtype)
        budgets[idx.cpu()] = budget
        todo[idx] = _holds_class(part, lose).to(todo.device)
    return res, budgets


def _holds_class(res: PcimResult, lose: float) -> torch.Tensor:
    return (res.prob_deleted > (1 - lose) * res.prob_original).cpu()
