"""engine/shares.py against hand-made maps and masks: every share exact."""

from __future__ import annotations

import math

import pytest
import torch

from pcim_cli.engine import shares, tiling


def _map(h: int = 10, w: int = 10) -> torch.Tensor:
    return torch.zeros(1, h, w, dtype=torch.float64)


def test_region_share_is_the_mass_inside_over_the_positive_total():
    m = _map()
    m[0, 2, 3] = 3.0
    m[0, 5, 5] = 1.0
    m[0, 9, 9] = -7.0  # negative attribution is not mass
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2, 3] = True
    assert shares.region_shares(m, mask).tolist() == [0.75]
    assert shares.region_shares(m, ~mask).tolist() == [0.25]


def test_empty_map_gives_nan_and_per_channel_maps_are_summed():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    assert math.isnan(float(shares.region_shares(torch.zeros(1, 4, 4), mask)[0]))
    per_channel = torch.zeros(2, 3, 4, 4)  # 2 targets x 3 channels
    per_channel[0, 0, 0, 0] = 1.0  # target 0: 1 inside (channel 0) + 3 outside (channel 2)
    per_channel[0, 2, 3, 3] = 3.0
    per_channel[1, 1, 0, 0] = 2.0  # target 1: all inside
    assert shares.region_shares(per_channel, mask).tolist() == [0.25, 1.0]
    with pytest.raises(ValueError, match="do not match"):
        shares.region_shares(torch.zeros(1, 5, 4), mask)


def test_border_mask_and_margin():
    assert shares.border_margin((128, 128)) == 6  # 5 % of 128 = 6.4
    assert shares.border_margin((3, 200), 0.05) == 1  # at least one pixel
    b = shares.border_mask((6, 8), 2)
    assert int(b.sum()) == 6 * 8 - 2 * 4
    assert not b[2:4, 2:6].any() and b[:2].all() and b[:, -2:].all()
    with pytest.raises(ValueError):
        shares.border_margin((10, 10), 0.5)


def test_field_shares_on_objects_background_border_saturated():
    m = _map()
    m[0, 0, 0] = 1.0  # corner: border, background, saturated
    m[0, 5, 5] = 2.0  # centre: on the object
    m[0, 5, 6] = 1.0  # centre: background
    objects = torch.zeros(10, 10, dtype=torch.bool)
    objects[4:7, 4:6] = True  # 6 px, holds (5, 5) not (5, 6)
    saturated = torch.zeros(10, 10, dtype=torch.bool)
    saturated[0, 0] = True
    found = shares.field_shares(m, objects, shares.border_mask((10, 10), 1), saturated)
    got = found.target(0)
    assert got == {"objects": 0.5, "background": 0.5, "border": 0.25, "saturated": 0.25, "seams": None}
    assert found.areas == {"objects": 0.06, "background": 0.94, "border": 0.36, "saturated": 0.01, "seams": None}
    none = shares.field_shares(m, None, shares.border_mask((10, 10), 1))
    assert none.target(0)["objects"] is None and none.target(0)["background"] is None


def test_object_mask_is_the_dilated_union_of_labels():
    lab = torch.zeros(9, 9, dtype=torch.int32)
    lab[4, 4] = 7
    lab[0, 8] = 2
    mask = shares.object_mask(lab, dilate=1)
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[3:6, 3:6] = True
    expected[0:2, 7:9] = True
    assert torch.equal(mask, expected)
    assert torch.equal(shares.object_mask(lab, dilate=0), lab > 0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 4), (64, 64), (33, 130)])
@pytest.mark.parametrize("radius", [0, 1, 2, 3, 8])
def test_dilation_and_erosion_are_the_square_max_and_min_filters(shape, radius):
    """The row-then-column passes give the (2r+1)^2 square filter exactly, at every edge and size."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(radius)) > 0.9
    k = 2 * radius + 1

    def square_max(m: torch.Tensor) -> torch.Tensor:  # the 2-D reference (outside: background)
        return torch.nn.functional.max_pool2d(m.float()[None, None], k, stride=1, padding=radius)[0, 0] > 0

    assert torch.equal(shares._dilate(mask, radius), square_max(mask))
    assert torch.equal(shares._erode(mask, radius), ~square_max(~mask))  # outside counts as foreground


def test_seam_mask_of_a_tiled_field():
    grid = tiling.plan_tiles((176, 176), (64, 64))  # 3 x 3 tiles starting at 0, 56, 112
    assert grid.starts_y == (0, 56, 112)
    seams = shares.seam_mask(grid.field, grid.tile, grid.starts_y, grid.starts_x)
    rows = [y for y in range(176) if seams[y, 30]]  # column 30 lies on no vertical tile edge
    # tile edges inside the field: starts 56, 112 and ends 64, 120; 4 px centred on each
    assert rows == [54, 55, 56, 57, 62, 63, 64, 65, 110, 111, 112, 113, 118, 119, 120, 121]
    assert seams[:, 56].all() and not seams[0, 0]
    assert shares.seam_mask((64, 64), (64, 64), (0,), (0,)) is None
    flat = shares.seam_mask((8, 16), (8, 8), (0,), (0, 8))  # tiles without overlap: the cut at 8
    assert [x for x in range(16) if flat[0, x]] == [6, 7, 8, 9]


def test_saturation_levels_and_mask():
    raw = torch.full((3, 4, 4), 100.0)
    raw[0, 0, :2] = 4095.0  # 12-bit ceiling, 2 px: saturated
    raw[1, 0, 0] = 65535.0  # one pixel only: not a flat top
    raw[2, 1, 1] = 5000.0  # not a ceiling value
    assert shares.saturation_levels(raw, "auto") == [4095.0, None, None]
    assert shares.saturation_levels(raw, None) == [None, None, None]
    assert shares.saturation_levels(raw, 5000) == [5000.0, 5000.0, 5000.0]
    assert shares.saturation_levels(raw, [None, 60000, None]) == [None, 60000.0, None]
    # a fixed normalisation clips at its max: the lower level counts
    assert shares.saturation_levels(raw, "auto", clip_at=[3000, 2000, 6000]) == [3000.0, 2000.0, 6000.0]
    mask = shares.saturated_mask(raw, [4095.0, 60000.0, None])
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, :2] = True
    expected[0, 0] = True
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="levels for 3 channels"):
        shares.saturation_levels(raw, [1.0, 2.0])
    with pytest.raises(ValueError):
        shares.saturation_levels(raw, "max")


def test_otsu_threshold_splits_two_levels():
    v = torch.tensor([0.0] * 50 + [1.0] * 50)
    t = shares.otsu_threshold(v)
    assert 0.0 < t < 1.0
    assert shares.otsu_threshold(torch.full((5,), 3.0)) == 3.0


def test_foreground_mask_finds_blobs_and_drops_specks():
    img = torch.zeros(64, 64)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    img[((yy - 20) ** 2 + (xx - 20) ** 2) <= 36] = 1.0  # a nucleus of radius 6
    img[50, 50] = 1.0  # a one-pixel speck
    fg = shares.foreground_mask(img, dilate=0)
    assert fg[20, 20] and fg[20, 25] and not fg[50, 50] and not fg[0, 0]
    assert shares.foreground_mask(img, dilate=3)[20, 28]  # 8 px from the centre: inside after dilation
    dark = shares.foreground_mask(1.0 - img, polarity="dark", dilate=0)
    assert torch.equal(dark, fg)


def test_top_pixels_keep_each_maps_largest_values():
    m = torch.tensor([[[5.0, 1.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 2.0]]])
    assert torch.equal(shares.top_pixels(m, 0.25), torch.tensor([[[5.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]))
    assert torch.equal(shares.top_pixels(m, 0.5)[0], torch.tensor([[5.0, 0.0], [3.0, 3.0]]))  # ties kept
    mask = torch.tensor([[True, False], [False, False]])
    assert shares.region_shares(m, mask, top=0.25).tolist()[0] == 1.0
    assert shares.region_shares(m, mask).tolist()[0] == 5.0 / 12.0
