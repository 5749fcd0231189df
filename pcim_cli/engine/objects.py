"""Per-object attribution: which objects (cells, nuclei) of a field hold its map, and what deleting them does.

Pure torch, no I/O. Inputs are a field x (C, H, W), its label image (H, W) (0 = background, 1..N =
objects, any integer values), the field's maps per target, the model's forward callable and the field's
tile grid (engine/tiling.py; one tile for an untiled field).

- `measure`: per object its area, centre, and per target the sum, mean and maximum of the map over the
  object's pixels, its share of the field's total, its rank in the field, and the split of its
  attribution over the input channels.
- `channel_attribution`: maps per input channel: per-channel maps as they are; a shared map split over
  the channels in proportion to |x_c - deleted value_c| per pixel (the change deleting the pixel makes
  in each channel).
- `deletion_probs`: the causal check: p(class) of the field after deleting an object (or a set of
  objects) alone, i.e. setting its pixels to the deletion substrate. Many deletions share each forward
  batch; on a tiled field only the tiles an object touches are run again, and the tile probabilities
  are aggregated like the field's prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pcim_cli.engine import tiling
from pcim_cli.engine.pcim import Forward

Aggregate = Callable[[torch.Tensor], torch.Tensor]  # (n_tiles, K) tile logits -> (K,) the field's logits


def mean_prob(tile_logits: torch.Tensor) -> torch.Tensor:
    """The field's prediction as the mean of its tiles' class probabilities (as logits: log of the mean)."""
    log_p = torch.log_softmax(tile_logits.float(), dim=-1)
    return torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(tile_logits.shape[0])))


@dataclass
class ObjectMeasures:
    """Per-object numbers of one field; N objects (label values `ids`, ascending), T targets, C channels."""

    ids: torch.Tensor  # (N,) int64 label values = ObjectNumber
    area: torch.Tensor  # (N,) pixels
    center_x: torch.Tensor  # (N,) mean column (0-based px)
    center_y: torch.Tensor  # (N,) mean row
    sum: torch.Tensor  # (T, N) attribution inside the object
    mean: torch.Tensor  # (T, N) sum / area
    max: torch.Tensor  # (T, N)
    share: torch.Tensor  # (T, N) sum / the field's total (0 when the map is empty)
    rank: torch.Tensor  # (T, N) 1 = the object holding most attribution in the field
    channel_share: torch.Tensor  # (T, C, N) split of the object's attribution over the channels (NaN: none)


def compact(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N,), index (H*W,)): the objects' label values, and each pixel's object as 1..N (0 = background)."""
    flat = labels.reshape(-1).long()
    values, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    if values.numel() and int(values[0]) == 0:
        return values[1:], inverse
    return values, inverse + 1


def channel_attribution(maps: torch.Tensor, x: torch.Tensor, deleted: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) attribution per input channel from maps (T, M, H, W), M = 1 (shared) or C.

    A shared map is split over the channels in proportion to |x_c - deleted_c| at each pixel (equal
    parts where deleting changes nothing); per-channel maps are returned as they are.
    """
    t, m = maps.shape[:2]
    c = x.shape[0]
    if m == c and m != 1:
        return maps
    if m != 1:
        raise ValueError(f"maps have {m} channels: give one shared map or one per input channel ({c})")
    diff = (x - deleted).abs()
    total = diff.sum(0, keepdim=True)
    split = torch.where(total > 0, diff / total.clamp(min=1e-30), torch.full_like(diff, 1.0 / c))
    return maps * split[None]


def channel_shares(per_channel: torch.Tensor) -> torch.Tensor:
    """(T, C): each channel's share of each target's whole-field attribution (NaN for an empty map)."""
    sums = per_channel.flatten(2).sum(2).double()
    total = sums.sum(1, keepdim=True)
    return torch.where(total > 0, sums / total.clamp(min=1e-300), torch.full_like(sums, float("nan"))).float()


def measure(per_channel: torch.Tensor, labels: torch.Tensor) -> ObjectMeasures:
    """Per-object statistics of the attribution `per_channel` (T, C, H, W) over `labels` (H, W)."""
    t, c, h, w = per_channel.shape
    if tuple(labels.shape) != (h, w):
        raise ValueError(f"labels are {tuple(labels.shape)} but the maps are {(h, w)}")
    ids, index = compact(labels)
    n = ids.numel()
    values = per_channel.reshape(t, c, h * w).double()
    nbins = n + 1  # bin 0 = background
    area = torch.zeros(nbins, dtype=torch.float64).index_add_(0, index, torch.ones(h * w, dtype=torch.float64))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    cy = torch.zeros(nbins, dtype=torch.float64).index_add_(0, index, yy.reshape(-1))
    cx = torch.zeros(nbins, dtype=torch.float64).index_add_(0, index, xx.reshape(-1))
    per_ch = torch.zeros(t, c, nbins, dtype=torch.float64).index_add_(2, index, values)
    joint = values.sum(1)  # (T, HW)
    sums = per_ch.sum(1)  # (T, nbins)
    peak = torch.full((t, nbins), float("-inf"), dtype=torch.float64)
    peak = peak.scatter_reduce(1, index.expand(t, -1), joint, reduce="amax", include_self=True)
    area, cy, cx, per_ch, sums, peak = area[1:], cy[1:], cx[1:], per_ch[..., 1:], sums[:, 1:], peak[:, 1:]
    total = joint.sum(1, keepdim=True)
    share = torch.where(total > 0, sums / total.clamp(min=1e-300), torch.zeros_like(sums))
    order = torch.argsort(sums, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(1, n + 1).expand(t, n))
    obj_total = per_ch.sum(1, keepdim=True)
    ch_share = torch.where(obj_total > 0, per_ch / obj_total.clamp(min=1e-300), torch.full_like(per_ch, float("nan")))
    safe_area = area.clamp(min=1)
    return ObjectMeasures(ids=ids, area=area, center_x=cx / safe_area, center_y=cy / safe_area, sum=sums,
                          mean=sums / safe_area, max=peak, share=share, rank=rank, channel_share=ch_share)


def top_objects(sums: torch.Tensor, ids: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per target (rows of sums (T, N)), the label values of its k objects holding most attribution."""
    k = min(k, ids.numel())
    return [ids[torch.argsort(row, descending=True, stable=True)[:k]] for row in sums]


def _tile_objects(labels: torch.Tensor, grid: tiling.TileGrid) -> list[torch.Tensor]:
    """The label values present in each tile."""
    th, tw = grid.tile
    out = []
    for i in range(grid.n_tiles):
        y0, x0 = grid.origin(i)
        out.append(torch.unique(labels[y0 : y0 + th, x0 : x0 + tw]))
    return out


@torch.no_grad()
def deletion_probs(forward: Forward, x: torch.Tensor, labels: torch.Tensor, deletions: Sequence[torch.Tensor],
                   deleted: torch.Tensor, grid: tiling.TileGrid | None = None, batch_size: int = 16,
                   aggregate: Aggregate = mean_prob, device: torch.device | str | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities of the field as it is (K,) and after each deletion (D, K).

    x (C, H, W) is the field, labels (H, W) its objects, `deleted` (C, H, W) the values deleted pixels
    take (the deletion substrate of the whole field), each deletion a tensor of label values removed
    together. The (deletion, tile) pairs whose tile holds a deleted object go through `forward` in
    batches of `batch_size`; the other tiles keep their outputs; `aggregate` turns a field's tile logits
    into the field's logits, as for its prediction. A field of hundreds of objects thus costs about
    (objects x tiles each touches) / batch_size forward passes.
    """
    grid = grid if grid is not None else tiling.plan_tiles(tuple(x.shape[-2:]), None)
    device = torch.device(device) if device is not None else x.device
    th, tw = grid.tile

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return forward(batch.to(device)).float().cpu()

    base_tiles = torch.cat([logits(tiling.cut(x, grid, range(s, min(s + batch_size, grid.n_tiles))))
                            for s in range(0, grid.n_tiles, batch_size)])
    tiles_of: dict[int, list[int]] = {}
    for i, present in enumerate(_tile_objects(labels, grid)):
        for value in present.tolist():
            tiles_of.setdefault(value, []).append(i)
    units = [(d, i) for d, ids in enumerate(deletions)
             for i in sorted({t for v in ids.tolist() if v != 0 for t in tiles_of.get(v, ())})]
    per_deletion = [base_tiles.clone() for _ in deletions]
    for start in range(0, len(units), batch_size):
        part = units[start : start + batch_size]
        batch = []
        for d, i in part:
            y0, x0 = grid.origin(i)
            region = (slice(None), slice(y0, y0 + th), slice(x0, x0 + tw))
            inside = torch.isin(labels[region[1:]], deletions[d])
            batch.append(torch.where(inside[None], deleted[region], x[region]))
        for (d, i), out in zip(part, logits(torch.stack(batch)), strict=True):
            per_deletion[d][i] = out
    base = torch.softmax(aggregate(base_tiles), dim=-1)
    after = (torch.softmax(torch.stack([aggregate(t) for t in per_deletion]), dim=-1) if deletions
             else base.new_zeros(0, base.numel()))
    return base, after
