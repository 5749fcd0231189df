"""Drawing maps: the colour map, overlays over a raw image, colour bars, panels and the plate montage.

Pictures only (numpy arrays in, PIL images out); report/render.py decides what to draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pcim_cli.io.plate import row_letter
from pcim_cli.io.store_view import StorePlate
from pcim_cli.report import composite
from pcim_cli.report import objects as report_objects

__all__ = ["BACKGROUND", "BAR", "BAR_TEXT", "CELL", "COLORMAP", "EMPTY_GREY", "GAP", "LINE", "MIN_PANEL",
           "MISSING_GREY", "TEXT", "Panel", "colour_bar", "colourise", "draw_montage", "draw_panels", "heat_lut",
           "overlay", "robust_vmax", "thumbnail"]

MIN_PANEL = 256  # smaller fields are enlarged (nearest neighbour) so the labels stay readable
CELL = 96  # montage cell, pixels
BAR = 14  # colour bar width
BAR_TEXT = 46  # room for the colour bar's numbers
GAP = 4
LINE = 14  # height of one text line
EMPTY_GREY = (128, 128, 128)
MISSING_GREY = (70, 70, 70)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
VMAX_PERCENTILE = 99.5
#: the colour map of every map pcim draws (pcim evaluate's plots use the same): magma, from near-black
#: through purple and orange to pale yellow; its lightness rises monotonically (tests/test_render.py)
COLORMAP = "magma"


def heat_lut(n: int = 256, name: str = COLORMAP) -> np.ndarray:
    """An ``(n, 3)`` uint8 lookup table of the colour map `name` (the cmap library's)."""
    from cmap import Colormap

    return np.round(Colormap(name).lut(n)[:, :3] * 255).astype(np.uint8)


_LUT = heat_lut()


def _scaled(values: np.ndarray, vmax: float) -> np.ndarray:
    return np.clip(values / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(values)


def colourise(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values in ``[0, vmax]`` to RGB uint8 ``(y, x, 3)`` through the heat LUT."""
    return _LUT[np.round(_scaled(values, vmax) * (len(_LUT) - 1)).astype(np.intp)]


def overlay(values: np.ndarray, vmax: float, base: np.ndarray | None) -> np.ndarray:
    """The map in colour, blended over a ``base`` image in [0, 1] where given: grey ``(y, x)`` or colour
    ``(y, x, 3)`` (weak values show the cells through; strong ones cover them)."""
    colour = colourise(values, vmax)
    if base is None:
        return colour
    alpha = (_scaled(values, vmax) ** 0.7 * 0.85)[..., None]
    under = np.clip(base, 0.0, 1.0) * 255
    under = under if under.ndim == 3 else np.repeat(under[..., None], 3, axis=2)
    return np.round(under * (1 - alpha) + colour * alpha).astype(np.uint8)


def robust_vmax(values: np.ndarray) -> float:
    """The upper end of the colour scale: a high percentile, so one hot pixel does not wash out the map."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    vmax = float(np.percentile(finite, VMAX_PERCENTILE))
    return vmax if vmax > 0 else (float(finite.max()) or 1.0)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return composite.font()


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom - top


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def colour_bar(height: int, vmax: float) -> Image.Image:
    """A vertical colour bar (high at the top) labelled 0 and ``vmax``."""
    height = max(height, 24)
    ramp = np.linspace(vmax, 0.0, height, dtype=np.float32)[:, None].repeat(BAR, axis=1)
    image = Image.new("RGB", (BAR + BAR_TEXT, height), BACKGROUND)
    image.paste(Image.fromarray(colourise(ramp, vmax)), (0, 0))
    draw = ImageDraw.Draw(image)
    _, th = _text_size(draw, "0")
    draw.text((BAR + 3, 0), _fmt(vmax), fill=TEXT, font=_font())
    draw.text((BAR + 3, height - th - 3), "0", fill=TEXT, font=_font())
    return image


@dataclass
class Panel:
    """One picture: a 2-D map and what it is drawn over."""

    title: str
    values: np.ndarray  # (y, x)
    base: np.ndarray | None  # (y, x) grey or (y, x, 3) colour, in [0, 1]
    target: str = ""
    objects: report_objects.FieldObjects | None = None  # plate.objects: the target's top objects are outlined


def draw_panels(panels: Sequence[Panel], title: str) -> Image.Image:
    """Panels side by side, each titled and with its own colour bar, under a title line."""
    h, w = panels[0].values.shape
    scale = max(1, MIN_PANEL // max(h, w))
    tiles = []
    for panel in panels:
        vmax = robust_vmax(panel.values)
        rgb = Image.fromarray(overlay(panel.values, vmax, panel.base))
        if scale > 1:
            rgb = rgb.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        if panel.objects:
            report_objects.draw_outlines(rgb, panel.objects, panel.target, scale)
        tiles.append((panel.title, rgb, colour_bar(rgb.height, vmax)))
    line = LINE
    width = sum(t[1].width + t[2].width + 2 * GAP for t in tiles) + GAP
    height = tiles[0][1].height + 2 * line + 3 * GAP
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((GAP, GAP), title, fill=TEXT, font=_font())
    x = GAP
    for caption, rgb, bar in tiles:
        draw.text((x, GAP + line), caption, fill=TEXT, font=_font())
        top = 2 * GAP + 2 * line
        image.paste(rgb, (x, top))
        image.paste(bar, (x + rgb.width + GAP, top))
        x += rgb.width + bar.width + 2 * GAP
    return image


def _resize_values(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array to ``size`` (width, height), bilinear."""
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def thumbnail(values: np.ndarray, cell: int) -> np.ndarray:
    h, w = values.shape
    ratio = cell / max(h, w)
    return _resize_values(values, (max(1, round(w * ratio)), max(1, round(h * ratio))))


def draw_montage(plate: StorePlate, thumbs: Mapping[str, np.ndarray | None], caption: str,
                 cell: int = CELL, labels: Mapping[str, str] | None = None) -> Image.Image:
    """Thumbnails at plate positions: rows A.., columns 1..; wells not in the store grey, wells without
    a complete first field dark grey. One colour scale (bar on the right) for the whole plate. `labels`
    (well -> text, e.g. its target when wells have different ones) are written at each cell's foot."""
    present = [t for t in thumbs.values() if t is not None]
    vmax = robust_vmax(np.concatenate([t.ravel() for t in present])) if present else 1.0
    left, top = 28, 40
    grid_w, grid_h = plate.n_cols * (cell + 2) + 2, plate.n_rows * (cell + 2) + 2
    bar = colour_bar(min(grid_h, 4 * cell), vmax)
    image = Image.new("RGB", (left + grid_w + GAP * 3 + bar.width, top + grid_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((GAP, GAP), f"plate {plate.name}: {caption}", fill=TEXT, font=_font())
    for c in range(plate.n_cols):
        label = str(c + 1)
        tw, _ = _text_size(draw, label)
        draw.text((left + 2 + c * (cell + 2) + (cell - tw) // 2, top - 14), label, fill=TEXT, font=_font())
    for r in range(plate.n_rows):
        label = row_letter(r)
        _, th = _text_size(draw, label)
        draw.text((GAP, top + 2 + r * (cell + 2) + (cell - th) // 2), label, fill=TEXT, font=_font())
        for c in range(plate.n_cols):
            x0, y0 = left + 2 + c * (cell + 2), top + 2 + r * (cell + 2)
            name = f"{row_letter(r)}{c + 1:02d}"
            _draw_cell(image, draw, (x0, y0), cell, name, thumbs, vmax)
            if labels and labels.get(name) and thumbs.get(name) is not None:
                _, th = _text_size(draw, labels[name])
                draw.text((x0 + 2, y0 + cell - th - 4), labels[name], fill=(255, 255, 255), font=_font())
    image.paste(bar, (left + grid_w + 2 * GAP, top))
    return image


def _draw_cell(image: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], cell: int, name: str,
               thumbs: Mapping[str, np.ndarray | None], vmax: float) -> None:
    x0, y0 = at
    if name not in thumbs:
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=EMPTY_GREY)
        draw.text((x0 + 2, y0 + 1), name, fill=(165, 165, 165), font=_font())
        return
    thumb = thumbs[name]
    if thumb is None:
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=MISSING_GREY)
        draw.text((x0 + 3, y0 + cell // 2 - 5), "no map", fill=(230, 230, 230), font=_font())
        return
    th, tw = thumb.shape
    draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(0, 0, 0))
    image.paste(Image.fromarray(colourise(thumb, vmax)), (x0 + (cell - tw) // 2, y0 + (cell - th) // 2))
    draw.text((x0 + 2, y0 + 1), name, fill=(255, 255, 255), font=_font())
