"""Did a fit achieve its objective, what its map can say (PCIM_Fit), and an adaptive budget.

Pure torch. A PCIM fit asks two things of its map (docs/method.md): the kept image (only the map's
pixels) keeps the target class, and the deleted image (everything but them) loses it. The record has
both probabilities, so every map says how well it did, relative to the original p(target):

    keep = p(kept) / p(original)          delete = 1 - p(deleted) / p(original)

and, with one more forward pass per field, p(target) of the FULLY deleted field (every pixel at its
channel's mean, and every pixel at its channel's median: the smaller of the two,
`full_deletion_probs`): does the class survive deleting everything? Labels
(docs/verdicts.md; thresholds measured on every class of every evaluation set):

- `absent`: p(original) < P_ABSENT (0.01), or < P_FAINT (0.1) with a fit that did not remove it
  (delete < FIT_OK): the class is not in the field; there is nothing to delete, and the keep / delete
  shares of so small a probability mean nothing. (A faint class whose map does remove it, a near miss,
  keeps the fit's label: its map holds the weak evidence.)
- `no-local-evidence`: the fit did not remove the class (delete < FIT_OK) and the fully deleted image
  still gives it (p(full deletion) >= FULL_KEEP * p(original)): the class rests on what is missing
  (a "negative" call: no mitotic cell), not on pixels a map could hold. Not a failure of the fit;
- `ok`: delete >= 0.5 and keep >= 0.5 (deleting the map's pixels removes at least half of the class
  probability, and they alone keep at least half of it);
- `failed`: delete < 0.25 (deleting the map's pixels leaves more than 3/4 of the class probability
  although deleting everything removes it: evidence larger than the budget, or a model that reads
  the evidence poorly);
- `weak`: anything between.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from pcim_cli.engine.pcim import Forward, PcimOptions, PcimResult, fit_pcim

FIT_OK = 0.5  # keep and delete shares at or above which a fit is ok
FIT_FAILED = 0.25  # delete share below which a fit failed
P_ABSENT = 0.01  # p(original) below which the class is absent from the field
P_FAINT = 0.1  # p(original) below which a class whose map removes nothing is absent (not failed)
FULL_KEEP = 0.75  # share of p(original) the fully deleted image keeps for a class without local evidence
#: every PCIM_Fit label; the first three judge the fit, the last two say what the class is
FIT_LABELS = ("ok", "weak", "failed", "absent", "no-local-evidence")
#: the labels of maps that hold evidence (a stain verdict may judge them)
JUDGED = ("ok", "weak")


def fit_quality(prob_original: float, prob_mixed: float, prob_deleted: float,
                prob_full_deleted: float | None = None) -> str:
    """PCIM_Fit of one map (see the module's doc); '' when the method fits nothing (NaN probabilities).

    Without `prob_full_deleted` (a record from before issue 26, or a model that gave no finite
    probability for the fully deleted image) the class is never called `no-local-evidence`.
    """
    values = (prob_original, prob_mixed, prob_deleted)
    if any(v is None or v != v for v in values) or prob_original <= 0:  # NaN: a baseline, no fit
        return ""
    if prob_original < P_ABSENT:
        return "absent"
    keep = prob_mixed / prob_original
    delete = 1.0 - prob_deleted / prob_original
    if delete < FIT_OK and prob_original < P_FAINT:
        return "absent"
    full = prob_full_deleted
    if (delete < FIT_OK and full is not None and math.isfinite(full)
            and full >= FULL_KEEP * prob_original):
        return "no-local-evidence"
    if delete < FIT_FAILED:
        return "failed"
    return "ok" if delete >= FIT_OK and keep >= FIT_OK else "weak"


def full_deletion_images(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) fully deleted, twice: every pixel at its channel's mean, then at its channel's
    median. (2B, C, H, W). Two levels, because a featureless field is a fair "nothing here" only when
    the class does not depend on the level: a stain covering 30 % of a field keeps its colour in the
    mean (a uniformly brown field is still `high`), not in the median; a model may call a dark field
    `mitotic` and a mean-grey one `negative`. (Independent of explain.delete_substrate.)"""
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    median = x.flatten(2).median(dim=2).values[..., None, None].expand_as(x)
    return torch.cat([mean, median]).contiguous()


@torch.no_grad()
def full_deletion_probs(model: Forward, x: torch.Tensor, opts: PcimOptions | None = None) -> torch.Tensor:
    """Class probabilities (B, K) that survive the deletion of the whole field: for each class, the
    smaller of its probabilities on the two fully deleted images (`full_deletion_images`). One forward
    pass of 2B images; NaN rows where the model gives non-finite logits."""
    b = x.shape[0]
    probs = torch.softmax(model(full_deletion_images(x)).float(), dim=1)
    probs = torch.minimum(probs[:b], probs[b:])
    return torch.where(torch.isfinite(probs).all(1, keepdim=True), probs, torch.full_like(probs, float("nan")))


def contrastive_class(probs: torch.Tensor, full: torch.Tensor) -> int | None:
    """The class whose map answers "why the predicted class and not another?" when the predicted class
    has no local evidence: the runner-up (second most probable) class, when the fully deleted field
    keeps at least FULL_KEEP of p(predicted) (probs, full: (K,) class probabilities of the field and of
    the fully deleted field). None otherwise, or without a finite `full`. Measured on near misses
    (fields called negative that hold a dimmed positive cell; docs/verdicts.md): the runner-up's map
    points at the missed cell, the predicted class's map does not."""
    if probs.numel() < 2 or not bool(torch.isfinite(full).all()):
        return None
    predicted = int(probs.argmax())
    if float(full[predicted]) < FULL_KEEP * float(probs[predicted]):
        return None
    return int(probs.topk(2).indices[1])


def fit_adaptive(model: Forward, x: torch.Tensor, target: torch.Tensor, opts: PcimOptions,
                 seeds: torch.Tensor | None = None, grow: float = 2.0, max_budget: float = 0.32,
                 lose: float = FIT_OK) -> tuple[PcimResult, torch.Tensor]:
    """fit_pcim, then refit every image whose deleted image still holds the class (p(deleted) >
    (1 - lose) * p(original)) with the budget times `grow`, up to `max_budget`. Returns the result (each
    image's last fit; `steps` adds up its fits) and each image's budget (B,)."""
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
