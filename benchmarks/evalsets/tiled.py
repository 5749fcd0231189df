"""Whole-field scoring for sets whose fields are larger than the model's input (a `tile` key).

pcim cuts such a field into overlapping tiles of the model's input size (pcim_cli/engine/tiling.py),
explains each tile and stitches the tile maps back into one map per field. The scores that matter to
a user are the ones of that stitched map on the WHOLE field: does it rank the field's evidence pixels
first, whichever tile they lie in? So the field's class probability is the mean of its tiles'
probabilities (as pcim's CSV reports it), and deletion / insertion perturb the whole field and ask
that tiled model again.

    model = TiledModel(ev["model"], ev["tile"])        # (B, C, H, W) fields -> (B, K) log mean probs
    maps = per_tile_maps(fn, ev["model"], ev["x"], ev["target"], ev["tile"])   # fn(model, x, t) -> maps
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pcim_cli.engine import tiling


class TiledModel(torch.nn.Module):
    """A field classifier made of a tile classifier: tiles as pcim cuts them, the mean of their class
    probabilities; returns log(mean p), whose softmax is that mean (usable as logits)."""

    def __init__(self, model: torch.nn.Module, tile: tuple[int, int], chunk: int = 256):
        super().__init__()
        self.model, self.tile, self.chunk = model, tuple(tile), chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tiling.plan_tiles(tuple(x.shape[-2:]), self.tile)
        tiles = torch.cat([tiling.cut(f, grid, range(grid.n_tiles)) for f in x])
        logits = torch.cat([self.model(tiles[i : i + self.chunk]) for i in range(0, len(tiles), self.chunk)])
        probs = torch.softmax(logits.float(), dim=1).view(x.shape[0], grid.n_tiles, -1).mean(1)
        return probs.clamp(min=1e-30).log()


def per_tile_maps(fn: Callable, model, x: torch.Tensor, target: torch.Tensor, tile: tuple[int, int],
                  batch: int = 16) -> torch.Tensor:
    """Stitched (B, M, H, W) maps: fn(model, tiles, targets) -> (n, M, th, tw) per chunk of tiles, each
    tile explained for its field's target, blended back as pcim's worker does."""
    grid = tiling.plan_tiles(tuple(x.shape[-2:]), tuple(tile))
    tiles = torch.cat([tiling.cut(f, grid, range(grid.n_tiles)) for f in x])
    tt = target.repeat_interleave(grid.n_tiles)
    maps = torch.cat([fn(model, tiles[i : i + batch], tt[i : i + batch]) for i in range(0, len(tiles), batch)])
    maps = maps.view(x.shape[0], grid.n_tiles, *maps.shape[1:])
    return torch.stack([tiling.stitch(grid, m) for m in maps])
