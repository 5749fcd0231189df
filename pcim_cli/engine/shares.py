"""Where a field's map lies: its share on objects, off them, at the field border, on saturated pixels and
on tile seams. Pure torch, no I/O: masks in, shares out (the shortcut QC of docs/shortcuts.md).

A share is the part of a map's positive attribution that lies inside a region:

    share(region) = sum of max(map, 0) over the region / sum of max(map, 0) over the field,

NaN for an empty map. Every share comes with the region's area fraction (the share a map spread evenly
over the field would have), so "30 % on the border" can be read against "the border is 18 % of the field".

Regions of one field (H, W), each a bool mask:

- objects: the union of a label image's objects (`plate.objects`), or, without labels, an automatic
  foreground mask (`foreground_mask`: Gaussian smoothing, Otsu's threshold, an opening that drops
  specks, then a dilation); either way dilated by a few pixels (`dilate`), because a map made at a
  coarser resolution and upsampled, and evidence that lies at an object's rim (a cortical ring), spill
  a little past a segmentation's outline. Background = the field minus the objects.
- border: the pixels within `border_margin` of the field edge.
- saturated: the pixels at which any channel sits at the detector's ceiling or was clipped by a fixed
  normalisation (`saturation_levels`, `saturated_mask`).
- seams: on a tiled field, bands along the tile edges inside the field (`seam_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pcim_cli.engine.options import QC_BORDER_FRACTION

#: foreground_mask: Gaussian sigma (px) before Otsu, and the opening radius that drops specks
FOREGROUND_SIGMA = 2.0
FOREGROUND_OPEN = 2
#: objects (labels or foreground) are dilated by this many pixels (square structuring element)
OBJECT_DILATE = 3
#: border: this share of the field's shorter side, at least one pixel (qc.border)
BORDER_FRACTION = QC_BORDER_FRACTION
#: seams: a band this wide (px) centred on every tile edge inside the field
SEAM_WIDTH = 4
#: a channel's maximum counts as the detector's ceiling when it is one of these values (2^bits - 1, or
#: 1.0 for float images) and at least SATURATION_MIN_PIXELS pixels hold it exactly (a flat top)
CEILINGS = tuple(float(2**bits - 1) for bits in range(8, 17)) + (1.0,)
SATURATION_MIN_PIXELS = 2
REGIONS = ("objects", "background", "border", "saturated", "seams")


@dataclass
class FieldShares:
    """The shares of one field's maps (one value per target) and the area fraction of each region.

    A region the field does not have (no tiles: seams; no saturation settings: saturated) is None."""

    shares: dict[str, torch.Tensor | None]  # region -> (T,) float64
    areas: dict[str, float | None]  # region -> share of the field's pixels

    def target(self, k: int) -> dict[str, float | None]:
        """{region: share} of target k (None: the field has no such region; NaN: the map is empty)."""
        return {r: (None if v is None else float(v[k])) for r, v in self.shares.items()}


def top_pixels(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """maps (T, H, W) with every value below each map's top `fraction` of pixels set to 0 (ties at the
    cut are kept)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the top fraction must lie in (0, 1], got {fraction}")
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    cut = flat.topk(k, dim=1).values[:, -1:]
    return torch.where(flat >= cut, flat, torch.zeros_like(flat)).view_as(maps)


def region_shares(maps: torch.Tensor, mask: torch.Tensor, top: float | None = None) -> torch.Tensor:
    """(T,) share of each map's positive attribution inside `mask` (H, W); maps (T, H, W) or (T, M, H, W)
    (the M maps of a target, e.g. one per channel, are summed). With `top`, only each map's top `top`
    of pixels count (`top_pixels`). NaN where a map is empty."""
    m = maps.double().clamp(min=0)
    if m.dim() == 4:
        m = m.sum(1)
    if m.dim() != 3 or tuple(m.shape[-2:]) != tuple(mask.shape):
        raise ValueError(f"maps {tuple(maps.shape)} do not match the mask {tuple(mask.shape)}")
    if top is not None:
        m = top_pixels(m, top)
    total = m.flatten(1).sum(1)
    inside = (m * mask.to(m.dtype)).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.full_like(total, float("nan")))


def field_shares(maps: torch.Tensor, objects: torch.Tensor | None, border: torch.Tensor,
                 saturated: torch.Tensor | None = None, seams: torch.Tensor | None = None) -> FieldShares:
    """Every share of one field: maps (T, H, W) or (T, M, H, W) and the region masks (H, W) of the field
    (objects None: no object mask, so no objects / background shares)."""
    masks = {"objects": objects, "background": None if objects is None else ~objects.bool(), "border": border,
             "saturated": saturated, "seams": seams}
    shares = {r: (None if m is None else region_shares(maps, m.bool())) for r, m in masks.items()}
    areas = {r: (None if m is None else float(m.bool().double().mean())) for r, m in masks.items()}
    return FieldShares(shares, areas)


# --------------------------------------------------------------------------------------------------
# regions


def border_margin(shape: Sequence[int], fraction: float = BORDER_FRACTION) -> int:
    """The border's width in pixels: `fraction` of the field's shorter side, rounded, at least 1."""
    if not 0 < fraction < 0.5:
        raise ValueError(f"the border fraction must lie in (0, 0.5), got {fraction}")
    return max(1, round(fraction * min(int(shape[-2]), int(shape[-1]))))


def border_mask(shape: Sequence[int], margin: int) -> torch.Tensor:
    """(H, W) True within `margin` pixels of the field's edge."""
    h, w = int(shape[-2]), int(shape[-1])
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[margin : h - margin, margin : w - margin] = False
    return mask


def _axis_seams(size: int, tile: int, starts: Sequence[int], width: int) -> torch.Tensor:
    """True within width / 2 of every tile edge inside the field (a tile's start > 0, its end < size)."""
    band = torch.zeros(size, dtype=torch.bool)
    edges = {s for s in starts if s > 0} | {s + tile for s in starts if s + tile < size}
    for e in edges:
        band[max(e - width // 2, 0) : min(e + (width + 1) // 2, size)] = True
    return band


def seam_mask(field: Sequence[int], tile: Sequence[int], starts_y: Sequence[int], starts_x: Sequence[int],
              width: int = SEAM_WIDTH) -> torch.Tensor | None:
    """(H, W) True on the seams of a tiled field: a band `width` px wide centred on every tile edge that
    lies inside the field (where a tile's zero padding and its blend ramp meet the neighbour's); None
    for a field of one tile. Arguments as engine/tiling.py's TileGrid (field, tile, starts_y, starts_x)."""
    if len(starts_y) * len(starts_x) <= 1:
        return None
    rows = _axis_seams(int(field[0]), int(tile[0]), starts_y, width)
    cols = _axis_seams(int(field[1]), int(tile[1]), starts_x, width)
    return rows[:, None] | cols[None, :]


def saturation_levels(raw: torch.Tensor, setting: str | float | Sequence[float | None] | None = "auto",
                      clip_at: Sequence[float] | None = None) -> list[float | None]:
    """Per channel of a raw field (C, H, W), the level at and above which a pixel counts as saturated.

    setting: "auto" (a channel whose maximum is a detector ceiling, 2^bits - 1 for 8..16 bits or 1.0,
    held by at least SATURATION_MIN_PIXELS pixels: that maximum; else none), a number (every channel),
    one number or None per channel, or None (no detector ceiling). clip_at: the raw value each channel's
    fixed normalisation maps to 1 (model.normalize method fixed, `max`): pixels at or above it were
    clipped, so the lower of the two levels counts. None where a channel has neither.
    """
    c = raw.shape[0]
    if setting is None:
        levels: list[float | None] = [None] * c
    elif isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"saturation must be 'auto', a number, one per channel or None, got {setting!r}")
        levels = [detector_ceiling(raw[i]) for i in range(c)]
    elif isinstance(setting, (int, float)):
        levels = [float(setting)] * c
    else:
        levels = [None if v is None else float(v) for v in setting]
        if len(levels) != c:
            raise ValueError(f"saturation lists {len(levels)} levels for {c} channels")
    if clip_at is not None:
        clips = list(clip_at)
        if len(clips) != c:
            raise ValueError(f"{len(clips)} normalisation maxima for {c} channels")
        levels = [float(k) if lv is None else min(lv, float(k)) for lv, k in zip(levels, clips, strict=True)]
    return levels


def detector_ceiling(channel: torch.Tensor, min_pixels: int = SATURATION_MIN_PIXELS) -> float | None:
    """The channel's maximum when it is a detector ceiling held by at least `min_pixels` pixels, else None."""
    top = float(channel.max())
    if not any(top == c for c in CEILINGS):
        return None
    return top if int((channel == top).sum()) >= min_pixels else None


def saturated_mask(raw: torch.Tensor, levels: Sequence[float | None]) -> torch.Tensor:
    """(H, W) True where any channel of raw (C, H, W) is at or above its level (None: never)."""
    mask = torch.zeros(raw.shape[-2:], dtype=torch.bool)
    for channel, level in zip(raw, levels, strict=True):
        if level is not None:
            mask |= channel >= level
    return mask


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a (2r+1)^2 square (pixels outside the field count as background): the OR of
    the mask shifted by up to r pixels along the rows, then along the columns (the square is the product
    of the two segments, so this is the 2-D dilation exactly, at 4r boolean passes)."""
    out = mask.bool().clone()
    for dim in (-2, -1):
        src = out.clone()
        n = out.shape[dim]
        for s in range(1, min(radius, n - 1) + 1):
            out.narrow(dim, s, n - s).logical_or_(src.narrow(dim, 0, n - s))
            out.narrow(dim, 0, n - s).logical_or_(src.narrow(dim, s, n - s))
    return out


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion by a (2r+1)^2 square; outside the field counts as foreground (no border effect)."""
    return ~_dilate(~mask.bool(), radius)


def object_mask(labels: torch.Tensor, dilate: int = OBJECT_DILATE) -> torch.Tensor:
    """(H, W) union of a label image's objects (label > 0), dilated by `dilate` px."""
    return _dilate(labels > 0, dilate)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of `values`: the cut of a `bins`-bin histogram that maximises the between-class
    variance (the midpoint of the best bin edge; the minimum for constant values)."""
    v = values.double().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    s0 = (hist * centres).cumsum(0)
    m0 = s0 / w0.clamp(min=1)
    m1 = (s0[-1] - s0) / w1.clamp(min=1)
    between = w0 * w1 * (m0 - m1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    return float(edges[int(between.argmax()) + 1])


def foreground_mask(channel: torch.Tensor, polarity: str = "bright", sigma: float = FOREGROUND_SIGMA,
                    opening: int = FOREGROUND_OPEN, dilate: int = OBJECT_DILATE) -> torch.Tensor:
    """(H, W) automatic object mask of one channel (H, W), when no label image is given.

    The channel is smoothed (Gaussian, `sigma` px), thresholded at Otsu's level (foreground above it;
    polarity "dark": below it, e.g. cells on a bright-field background), opened by a (2 * opening + 1)^2
    square (specks and thin debris narrower than that vanish) and dilated by `dilate` px."""
    if polarity not in ("bright", "dark"):
        raise ValueError(f"polarity must be 'bright' or 'dark', got {polarity!r}")
    from pcim_cli.engine.mixing import gaussian_blur

    smooth = gaussian_blur(channel.float()[None, None], sigma)[0, 0]
    cut = otsu_threshold(smooth)
    fg = smooth > cut if polarity == "bright" else smooth < cut
    if opening > 0:
        fg = _dilate(_erode(fg, opening), opening)
    return _dilate(fg, dilate)


def area_summary(areas: Mapping[str, float | None]) -> str:
    """'objects 31 %, border 18 %' (for messages)."""
    return ", ".join(f"{r} {100 * a:.0f} %" for r, a in areas.items() if a is not None)
