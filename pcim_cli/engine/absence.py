"""Does a class survive the deletion of the whole field? (PCIM_Fit's `no-local-evidence` test.)

Pure torch. One forward pass per batch of fields: p(target) of the fully deleted field, on two
featureless images (every pixel at its channel's mean, and at its channel's median), the smaller of
the two per class. engine/verdict.py `fit_quality` turns it into a label; `contrastive_class` picks the
class whose map answers "why the predicted class and not another?" when the predicted one rests on
what is missing (explain.target: predicted; docs/verdicts.md).
"""

from __future__ import annotations

import torch

from pcim_cli.engine.mixing import channel_median
from pcim_cli.engine.pcim import Forward
from pcim_cli.engine.verdict import FULL_KEEP


def full_deletion_images(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) fully deleted, twice: every pixel at its channel's mean, then at its channel's
    median. (2B, C, H, W). Two levels, because a featureless field is a fair "nothing here" only when
    the class does not depend on the level: a stain covering 30 % of a field keeps its colour in the
    mean (a uniformly brown field is still `high`), not in the median; a model may call a dark field
    `mitotic` and a mean-grey one `negative`. (Independent of explain.delete_substrate.)"""
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    median = channel_median(x)[..., None, None].expand_as(x)
    return torch.cat([mean, median]).contiguous()


@torch.no_grad()
def full_deletion_probs(model: Forward, x: torch.Tensor) -> torch.Tensor:
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
