"""One map per field when the field is larger than the model's input: pure torch, no paths.

A field of H x W pixels is cut into overlapping tiles of the model's input size (tiling.py). The
model then says something per tile, and pcim has to say two things per field:

- **the field's prediction** (`model.aggregate`): the tiles' class probabilities averaged
  (`mean-prob`), their logits averaged (`mean-logit`), the largest probability of each class over the
  tiles, renormalised (`max`), or the model run on the untiled field (`whole-field`, for models that
  accept any size, e.g. global average pooling). `TiledForward` makes any of these one differentiable
  callable: fields (B, C, H, W) in, logits (B, K) of the field's prediction out.
- **the field's map** (`explain.tile_maps`): `field` fits ONE mixing layer over the whole field: one
  softmax over all of its pixels, the budget spent over the field, every tile's kept and deleted
  image cut from the field-level images, and the objective on the field's aggregated prediction. So
  map values mean the same in every tile, and a tile holding more evidence gets more of the budget.
  `per-tile` fits every tile on its own (each spends its own budget: every tile gets about the same
  mass whatever it holds), `evidence` does that and then weights each tile's map by its measured
  evidence, p(target | tile) - p(target | tile without its map's pixels). docs/method.md compares them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from pcim_cli.engine import tiling
from pcim_cli.engine.options import AGGREGATES, TILE_MAPS

Forward = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["AGGREGATES", "TILE_MAPS", "TiledForward", "aggregate_logits", "evidence_weights"]


def aggregate_logits(tile_logits: torch.Tensor, how: str) -> torch.Tensor:
    """(B, n, K) logits of the n tiles of B fields -> (B, K) logits whose softmax is the field's
    prediction: log of the mean probability (mean-prob), mean logit (mean-logit), log of the largest
    probability per class (max; the softmax renormalises it)."""
    if how == "mean-logit":
        return tile_logits.mean(1)
    log_p = torch.log_softmax(tile_logits.float(), dim=-1)
    n = tile_logits.shape[1]
    if how == "mean-prob":
        return torch.logsumexp(log_p, dim=1) - torch.log(torch.tensor(float(n), device=log_p.device))
    if how == "max":
        return log_p.amax(1)
    raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES[:3])} for tiles, got {how!r}")


class TiledForward(torch.nn.Module):
    """The model as a field classifier: fields (B, C, H, W) -> (B, K) logits of the field's prediction.

    Every field is cut into the tiles of `grid` (differentiably), the model runs on all tiles of the
    batch in calls of at most `chunk` tiles (None: all at once), and the tiles' outputs are combined by
    `aggregate`; `whole-field` (or a one-tile grid) runs the model on the field itself.
    `tile_logits(x)` gives the (B, n, K) per-tile logits.

    With a chunk and gradients on, every call is checkpointed (torch.utils.checkpoint): its activations
    are dropped after the forward and recomputed chunk by chunk in the backward, so a field of ~100 tiles
    (x2 for the kept and deleted images of a fit) needs the activations of one chunk, not of all its
    tiles; logits and gradients are the same as unchunked (one more forward per step).
    """

    def __init__(self, model: Forward, grid: tiling.TileGrid, aggregate: str = "mean-prob",
                 chunk: int | None = None):
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 tiles, got {chunk}")
        self.model, self.grid, self.aggregate, self.chunk = model, grid, aggregate, chunk

    @property
    def whole(self) -> bool:
        return self.aggregate == "whole-field" or self.grid.n_tiles == 1

    def tiles(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(B * n, C, th, tw): the tiles of every field, field after field, row-major within a field
        (or the tiles start:stop of that sequence)."""
        th, tw = self.grid.tile
        n = self.grid.n_tiles
        if start == 0 and stop is None:
            parts = []
            for i in range(n):
                y0, x0 = self.grid.origin(i)
                parts.append(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            return torch.stack(parts, dim=1).flatten(0, 1)
        out = []
        for k in range(start, x.shape[0] * n if stop is None else stop):
            y0, x0 = self.grid.origin(k % n)
            out.append(x[k // n, :, y0 : y0 + th, x0 : x0 + tw])
        return torch.stack(out)

    def tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        total = x.shape[0] * self.grid.n_tiles
        if self.chunk is None or total <= self.chunk:
            out = self.model(self.tiles(x))
        else:
            # each call cuts its own tiles from the fields: with gradients, the call (cut + model) is
            # checkpointed, so neither the tile images nor the activations of all calls are kept at once;
            # no early stop: the recomputation would stop by raising inside TorchScript, which rewraps it
            grad = torch.is_grad_enabled() and x.requires_grad
            parts = []
            with set_checkpoint_early_stop(False):
                for start in range(0, total, self.chunk):
                    stop = min(start + self.chunk, total)
                    if grad:
                        parts.append(checkpoint(self._call, x, start, stop, use_reentrant=False))
                    else:
                        parts.append(self._call(x, start, stop))
            out = torch.cat(parts)
        return out.view(x.shape[0], self.grid.n_tiles, -1)

    def _call(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.model(self.tiles(x, start, stop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return self.model(x)
        return aggregate_logits(self.tile_logits(x), self.aggregate)


def evidence_weights(prob_original: torch.Tensor, prob_deleted: torch.Tensor) -> torch.Tensor:
    """Each tile's measured evidence: how much p(target) falls when its map's pixels are deleted (>= 0)."""
    return (prob_original - prob_deleted).clamp(min=0).nan_to_num(0.0)
