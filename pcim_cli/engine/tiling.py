"""Cut a field larger than the model's input into overlapping tiles, and blend tile maps back.

Pure torch, no I/O. Along an axis of `size` pixels, tiles of `tile` pixels with a requested overlap
`o`: n = ceil((size - tile) / (tile - o)) + 1 tiles whose starts are spread evenly from 0 to
size - tile, so the last tile ends on the border and every actual overlap is at least `o`.

Blending: a tile's weight along an axis is a raised-cosine ramp across each overlap it shares with a
neighbour (flat 1 elsewhere, also at the field's borders), and the weights of all tiles covering a
pixel are divided by their sum. The 2-D weight of a tile is the product of its two axis weights, so
the weights of the tiles covering any pixel sum to one (a partition of unity): a constant map stitches
back to the same constant, and no seam is brighter or darker than the tiles on either side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

OVERLAP_FRACTION = 1 / 8  # default overlap: 1/8 of the tile along each axis


class TileSizeError(ValueError):
    """The field is smaller than the tile (the model's input size) along some axis."""


def default_overlap(tile: int) -> int:
    """The overlap used when none is given: 1/8 of the tile (0 for tiles under 8 px)."""
    return int(tile * OVERLAP_FRACTION)


def axis_starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis: evenly spread, first at 0, last at size - tile."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if size < tile:
        raise TileSizeError(f"{size} px is smaller than the {tile} px tile")
    if size == tile:
        return (0,)
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return tuple(round(i * (size - tile) / (n - 1)) for i in range(n))


def _ramp(length: int, dtype: torch.dtype) -> torch.Tensor:
    """Rising raised-cosine weights over `length` pixels, strictly between 0 and 1."""
    t = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return torch.sin(0.5 * math.pi * t).pow(2).to(dtype)


def axis_weights(size: int, tile: int, starts: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """(n, tile) blend weights of each tile along one axis; the tiles covering a pixel sum to one."""
    raw = torch.ones(len(starts), tile, dtype=torch.float64)
    for i, s in enumerate(starts):
        if i > 0:  # overlap with the previous tile: ramp up across it
            ov = starts[i - 1] + tile - s
            if ov > 0:
                raw[i, :ov] = _ramp(ov, torch.float64)
        if i + 1 < len(starts):  # overlap with the next tile: ramp down across it
            ov = s + tile - starts[i + 1]
            if ov > 0:
                raw[i, tile - ov:] = raw[i, tile - ov:] * _ramp(ov, torch.float64).flip(0)
    total = torch.zeros(size, dtype=torch.float64)
    for i, s in enumerate(starts):
        total[s : s + tile] += raw[i]
    norm = torch.stack([raw[i] / total[s : s + tile] for i, s in enumerate(starts)])
    return norm.to(dtype)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one field lie: row-major, tile i at (starts_y[i // nx], starts_x[i % nx])."""

    field: tuple[int, int]
    tile: tuple[int, int]
    overlap: tuple[int, int]
    starts_y: tuple[int, ...]
    starts_x: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(tiles down, tiles across)."""
        return len(self.starts_y), len(self.starts_x)

    @property
    def n_tiles(self) -> int:
        return len(self.starts_y) * len(self.starts_x)

    def origin(self, i: int) -> tuple[int, int]:
        """Top-left pixel (y, x) of tile i."""
        return self.starts_y[i // len(self.starts_x)], self.starts_x[i % len(self.starts_x)]

    @cached_property
    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (axis_weights(self.field[0], self.tile[0], self.starts_y),
                axis_weights(self.field[1], self.tile[1], self.starts_x))

    def weight(self, i: int) -> torch.Tensor:
        """(tile_h, tile_w) blend weight of tile i (float32)."""
        wy, wx = self._weights
        nx = len(self.starts_x)
        return wy[i // nx][:, None] * wx[i % nx][None, :]

    def record(self) -> dict:
        """JSON-ready description for the field's completion record."""
        return {"tile": list(self.tile), "overlap": list(self.overlap), "n_tiles": self.n_tiles,
                "grid": list(self.shape)}


def plan_tiles(field: tuple[int, int], tile: tuple[int, int] | None,
               overlap: tuple[int, int] | None = None) -> TileGrid:
    """The tiles of a (H, W) field for a model taking `tile` (None: the whole field, one tile).

    overlap defaults to 1/8 of the tile per axis. Raises TileSizeError when the field is smaller than
    the tile along an axis.
    """
    h, w = (int(v) for v in field)
    if tile is None or (int(tile[0]), int(tile[1])) == (h, w):
        return TileGrid((h, w), (h, w), (0, 0), (0,), (0,))
    th, tw = int(tile[0]), int(tile[1])
    if h < th or w < tw:
        raise TileSizeError(f"the field is {h}x{w} px, smaller than the {th}x{tw} px tile")
    oy, ox = overlap if overlap is not None else (default_overlap(th), default_overlap(tw))
    return TileGrid((h, w), (th, tw), (int(oy), int(ox)), axis_starts(h, th, oy), axis_starts(w, tw, ox))


def cut(x: torch.Tensor, grid: TileGrid, indices: list[int] | range) -> torch.Tensor:
    """(k, C, tile_h, tile_w) copies of tiles `indices` of one field x (C, H, W)."""
    th, tw = grid.tile
    out = []
    for i in indices:
        y0, x0 = grid.origin(i)
        out.append(x[:, y0 : y0 + th, x0 : x0 + tw])
    return torch.stack(out)


class Stitcher:
    """Accumulates blended tile maps into one preallocated (M, H, W) field map."""

    def __init__(self, grid: TileGrid, channels: int, dtype: torch.dtype = torch.float32):
        self.grid = grid
        self.out = torch.zeros(channels, *grid.field, dtype=dtype)
        self.added = 0

    def add(self, i: int, tile_map: torch.Tensor, rows: slice | None = None) -> None:
        """Blend the (m, tile_h, tile_w) map of tile i into the rows `rows` of the field map."""
        y0, x0 = self.grid.origin(i)
        th, tw = self.grid.tile
        region = self.out[rows if rows is not None else slice(None), y0 : y0 + th, x0 : x0 + tw]
        region += tile_map.to(self.out.dtype).cpu() * self.grid.weight(i).to(self.out.dtype)
        self.added += 1


def stitch(grid: TileGrid, tile_maps: torch.Tensor) -> torch.Tensor:
    """(M, H, W) field map from all tile maps (n_tiles, M, tile_h, tile_w), in one call."""
    st = Stitcher(grid, tile_maps.shape[1])
    for i in range(grid.n_tiles):
        st.add(i, tile_maps[i])
    return st.out
