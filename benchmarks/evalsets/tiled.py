"""Whole-field explaining and scoring for sets whose fields are larger than the model's input (a `tile` key).

pcim cuts such a field into overlapping tiles of the model's input size (pcim_cli/engine/tiling.py),
makes the field's prediction from its tiles (model.aggregate, default mean-logit) and, by default, fits
one map over the whole field through its tiles (explain.tile_maps: field; pcim_cli/engine/field.py).
The scores that matter to a user are the ones of that one map on the WHOLE field: does it rank the
field's evidence pixels first, whichever tile they lie in? So deletion / insertion perturb the whole
field and ask the tiled model again.

    model = TiledModel(ev["model"], ev["tile"])        # (B, C, H, W) fields -> (B, K) field logits
    maps = field_maps(fn, ev["model"], ev["x"], ev["target"], ev["tile"])      # as pcim explain does
    maps = per_tile_maps(fn, ev["model"], ev["x"], ev["target"], ev["tile"])   # explain.tile_maps: per-tile
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcim_cli.engine import tiling
from pcim_cli.engine.field import TiledForward

AGGREGATE = "mean-logit"  # pcim's default model.aggregate


class TiledModel(torch.nn.Module):
    """A field classifier made of a tile classifier: tiles as pcim cuts them, combined by `aggregate`."""

    def __init__(self, model: torch.nn.Module, tile: tuple[int, int], aggregate: str = AGGREGATE):
        super().__init__()
        self.model, self.tile, self.aggregate = model, tuple(tile), aggregate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tiling.plan_tiles(tuple(x.shape[-2:]), self.tile)
        return TiledForward(self.model, grid, self.aggregate)(x)


def field_maps(fn: Callable, model, x: torch.Tensor, target: torch.Tensor, tile: tuple[int, int],
               batch: int = 2) -> torch.Tensor:
    """(B, M, H, W) maps: fn(field_model, fields, targets) on whole fields through their tiles."""
    fields = TiledModel(model, tile)
    return torch.cat([fn(fields, x[i : i + batch], target[i : i + batch]) for i in range(0, len(x), batch)])


def per_tile_maps(fn: Callable, model, x: torch.Tensor, target: torch.Tensor, tile: tuple[int, int],
                  batch: int = 16) -> torch.Tensor:
    """Stitched (B, M, H, W) maps: fn(model, tiles, targets) -> (n, M, th, tw) per chunk of tiles, each
    tile explained for its field's target, blended back as pcim's worker does with tile_maps: per-tile."""
    grid = tiling.plan_tiles(tuple(x.shape[-2:]), tuple(tile))
    tiles = torch.cat([tiling.cut(f, grid, range(grid.n_tiles)) for f in x])
    tt = target.repeat_interleave(grid.n_tiles)
    maps = torch.cat([fn(model, tiles[i : i + batch], tt[i : i + batch]) for i in range(0, len(tiles), batch)])
    maps = maps.view(x.shape[0], grid.n_tiles, *maps.shape[1:])
    return torch.stack([tiling.stitch(grid, m) for m in maps])
