"""Did a fit achieve its objective (ok / weak / failed), and an adaptive budget that grows until it does.

Pure torch. A PCIM fit asks two things of its map (docs/method.md): the kept image (only the map's
pixels) keeps the target class, and the deleted image (everything but them) loses it. The record has
both probabilities, so every map says how well it did, relative to the original p(target):

    keep = p(kept) / p(original)          delete = 1 - p(deleted) / p(original)

- `ok`: delete >= 0.5 and keep >= 0.5 (deleting the map's pixels removes at least half of the class
  probability, and they alone keep at least half of it);
- `failed`: delete < 0.25 (deleting the map's pixels leaves more than 3/4 of the class probability:
  the map did not find what the model uses: evidence larger than the budget, or evidence that is an
  absence);
- `weak`: anything between.
"""

from __future__ import annotations

import dataclasses

import torch

from pcim_cli.engine.pcim import Forward, PcimOptions, PcimResult, fit_pcim

FIT_OK = 0.5  # keep and delete shares at or above which a fit is ok
FIT_FAILED = 0.25  # delete share below which a fit failed
FIT_LABELS = ("ok", "weak", "failed")


def fit_quality(prob_original: float, prob_mixed: float, prob_deleted: float) -> str:
    """'ok', 'weak' or 'failed' for one map (see the module's doc); '' when the method fits nothing."""
    values = (prob_original, prob_mixed, prob_deleted)
    if any(v is None or v != v for v in values) or prob_original <= 0:  # NaN: a baseline, no fit
        return ""
    keep = prob_mixed / prob_original
    delete = 1.0 - prob_deleted / prob_original
    if delete < FIT_FAILED:
        return "failed"
    return "ok" if delete >= FIT_OK and keep >= FIT_OK else "weak"


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
