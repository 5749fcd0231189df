"""The shortcut picture: where on the plate does the classifier look off the cells, at the border, at
saturated pixels? Pure drawing: numbers and images in, a PIL image out (report/render.py reads the store).

One block per target class: a plate heat-map per share (off objects always; border always; saturated
pixels and tile seams when the plate has any), each well coloured by its mean share from white (0 %) to
dark red (100 %), its value written in the well, the wells a rule flags outlined in black; a colour bar
marks each rule's threshold. Under the heat-maps, the findings in words and thumbnails of the flagged
fields: the map over the image, the objects' outline in cyan, the share that flagged it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pcim_cli.engine import shortcuts
from pcim_cli.io.plate import row_letter
from pcim_cli.report import composite
from pcim_cli.report.drawing import overlay, robust_vmax

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
NO_MAP = (222, 222, 222)  # the well has no map for this class
NOT_IN_STORE = (246, 246, 246)
OUTLINE = (0, 0, 0)
OBJECT_OUTLINE = (0, 230, 255)
GAP = 8
THUMB = 160
#: white -> amber -> red -> dark red: a share of 0 reads as nothing, more than a half as alarming
SHARE_ANCHORS = ((0.0, (255, 255, 255)), (0.25, (253, 212, 158)), (0.5, (239, 101, 72)), (0.75, (179, 0, 0)),
                 (1.0, (90, 0, 0)))
TITLES = {"background": "off objects", "border": "border", "saturated": "saturated pixels", "seams": "tile seams"}
RULE_OF = {region: rule for region, (rule, _) in shortcuts.RULES.items()}


def share_colour(value: float) -> tuple[int, int, int]:
    """The heat-map colour of a share in [0, 1]."""
    v = min(max(float(value), 0.0), 1.0)
    for (a, ca), (b, cb) in zip(SHARE_ANCHORS[:-1], SHARE_ANCHORS[1:], strict=True):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(round(x + t * (y - x)) for x, y in zip(ca, cb, strict=True))  # type: ignore[return-value]
    return SHARE_ANCHORS[-1][1]


@dataclass
class Thumb:
    """A flagged field: the image (y, x, 3) in [0, 1] or None, its map (y, x), its objects (y, x) bool or None."""

    well: str
    site: int
    caption: str
    values: np.ndarray
    base: np.ndarray | None = None
    objects: np.ndarray | None = None


@dataclass
class TargetBlock:
    """What one target class's block shows."""

    target: str
    wells: Mapping[str, Mapping[str, float]]  # well -> region -> mean share (engine/shortcuts.well_means)
    findings: Sequence[shortcuts.Finding] = ()
    thumbs: Sequence[Thumb] = field(default_factory=list)


def _font(size: int = composite.FONT_SIZE):
    return composite.font(size)


def _text_w(draw: ImageDraw.ImageDraw, text: str, size: int = composite.FONT_SIZE) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font(size))
    return right - left, bottom - top


def heatmap(n_rows: int, n_cols: int, values: Mapping[str, float | None], flagged: set[str], title: str,
            cell: int | None = None, present: set[str] | None = None, note: str = "") -> Image.Image:
    """A plate heat-map: wells at their positions coloured by share, flagged wells outlined. `values`:
    well -> share (None: no map for this class); wells outside `present` (the store's) are left blank;
    `note` (a plate-position finding) is written in red after the title and the outer ring framed."""
    cell = cell or max(14, min(40, 480 // max(n_cols, 1)))
    size = 9 if cell < 26 else 11
    left, top = 22, 36
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = _text_w(probe, title, 13)[0] + (_text_w(probe, note, 13)[0] + 10 if note else 0) + 6
    img = Image.new("RGB", (max(left + n_cols * cell + 4, title_w), top + n_rows * cell + 4), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((2, 2), title, fill=TEXT, font=_font(13))
    if note:
        tw, _ = _text_w(draw, title, 13)
        draw.text((8 + tw, 2), note, fill=(200, 0, 0), font=_font(13))
    step = 1 if cell >= 20 else 2 if cell >= 12 else 4
    for c in range(0, n_cols, step):
        label = str(c + 1)
        tw, _ = _text_w(draw, label, 9)
        draw.text((left + c * cell + (cell - tw) // 2, top - 13), label, fill=TEXT, font=_font(9))
    for r in range(n_rows):
        if r % step == 0:
            draw.text((3, top + r * cell + cell // 2 - 6), row_letter(r), fill=TEXT, font=_font(9))
        for c in range(n_cols):
            well = f"{row_letter(r)}{c + 1:02d}"
            x0, y0 = left + c * cell, top + r * cell
            box = (x0 + 1, y0 + 1, x0 + cell - 2, y0 + cell - 2)
            if present is not None and well not in present:
                draw.rectangle(box, fill=NOT_IN_STORE, outline=(230, 230, 230))
                continue
            v = values.get(well)
            if v is None or v != v:
                draw.rectangle(box, fill=NO_MAP)
                continue
            colour = share_colour(v)
            draw.rectangle(box, fill=colour)
            if well in flagged:
                draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), outline=OUTLINE, width=3 if cell >= 20 else 2)
            if cell >= 20:
                text = f"{100 * v:.0f}"
                tw, th = _text_w(draw, text, size)
                light = sum(colour) < 380
                draw.text((x0 + (cell - tw) // 2, y0 + (cell - th) // 2 - 2), text,
                          fill=(255, 255, 255) if light else (60, 60, 60), font=_font(size))
    if note and n_rows > 2 and n_cols > 2:  # frame the outer ring in red
        draw.rectangle((left - 2, top - 2, left + n_cols * cell + 1, top + n_rows * cell + 1), outline=(200, 0, 0),
                       width=2)
        draw.rectangle((left + cell - 1, top + cell - 1, left + (n_cols - 1) * cell, top + (n_rows - 1) * cell),
                       outline=(200, 0, 0), width=2)
    return img


def share_bar(height: int, thresholds: Mapping[str, float]) -> Image.Image:
    """A vertical colour bar 0-100 % with each rule's threshold marked."""
    width, bar = 175, 14
    img = Image.new("RGB", (width, height + 20), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for y in range(height):
        draw.line((0, 10 + y, bar, 10 + y), fill=share_colour(1 - y / max(height - 1, 1)))
    draw.rectangle((0, 10, bar, 10 + height - 1), outline=(150, 150, 150))
    for v, label in ((1.0, "100 %"), (0.0, "0 %")):
        draw.text((bar + 4, 10 + (1 - v) * (height - 1) - 6), label, fill=TEXT, font=_font(10))
    for name, t in thresholds.items():
        y = 10 + (1 - t) * (height - 1)
        draw.line((0, y, bar + 2, y), fill=OUTLINE, width=2)
        draw.text((bar + 4, y - 6), f"{name} > {100 * t:.0f} %", fill=TEXT, font=_font(10))
    return img


def _thumb_image(t: Thumb, size: int = THUMB) -> Image.Image:
    values = t.values.astype(np.float32)
    rgb = Image.fromarray(overlay(values, robust_vmax(values), t.base))
    if t.objects is not None and t.objects.shape == values.shape:
        edge = t.objects & ~_eroded(t.objects)
        arr = np.asarray(rgb).copy()
        arr[edge] = OBJECT_OUTLINE
        rgb = Image.fromarray(arr)
    scale = size / max(rgb.size)
    return rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                      Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)


def _eroded(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=True)
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out &= m[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _paragraph(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, width: int) -> int:
    """Draw wrapped text; returns its height."""
    chars = max(30, width // 7)
    y = at[1]
    for line in textwrap.wrap(text, chars) or [""]:
        draw.text((at[0], y), line, fill=TEXT, font=_font())
        y += 16
    return y - at[1]


def regions_shown(blocks: Sequence[TargetBlock]) -> list[str]:
    """off objects and border always; saturated pixels and seams when any well has such a share > 0."""
    shown = ["background", "border"]
    for region in ("saturated", "seams"):
        if any(v.get(region, 0.0) > 0 or v.get(f"area:{region}", 0.0) > 0 for b in blocks for v in b.wells.values()):
            shown.append(region)
    return shown


def draw_target(block: TargetBlock, n_rows: int, n_cols: int, regions: Sequence[str],
                present: set[str] | None = None) -> Image.Image:
    """One target class: heat-maps side by side with the colour bar, the findings, the flagged fields."""
    by_rule: dict[str, set[str]] = {}
    edge: dict[str, str] = {}
    for f in block.findings:
        if f.rule == "plate-edge":
            ratio = f.numbers.get("ratio", 0.0)
            edge[f.region] = f"edge wells {ratio:.1f}x inner" if ratio < 100 else "edge wells >100x inner"
        else:
            by_rule.setdefault(f.region, set()).update(f.wells)
    maps = [heatmap(n_rows, n_cols, {w: v.get(r) for w, v in block.wells.items()}, by_rule.get(r, set()),
                    f"{TITLES[r]}: share of the map", present=present, note=edge.get(r, "")) for r in regions]
    bar = share_bar(maps[0].height - 46, {TITLES[r]: shortcuts.RULES[r][1] for r in regions})
    width = max(sum(m.width for m in maps) + GAP * len(maps) + bar.width, 4 * (THUMB + GAP))
    heading = f"{block.target}: {len(block.wells)} wells judged"
    sentences = [f.sentence for f in block.findings] or [
        "nothing suspicious: no well's map lies mostly off the objects, at the border or on saturated pixels, "
        "and edge wells look like inner wells"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = sum(_paragraph(probe, (0, 0), "- " + s, width - 2 * GAP) + 4 for s in sentences)
    thumbs = [_thumb_image(t) for t in block.thumbs]
    per_row = max(1, width // (THUMB + GAP))
    thumb_rows = (len(thumbs) + per_row - 1) // per_row
    thumb_h = thumb_rows * (THUMB + 34) + (20 if thumbs else 0)
    img = Image.new("RGB", (width + 2 * GAP, 24 + maps[0].height + text_h + thumb_h + 3 * GAP), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((GAP, GAP), heading, fill=TEXT, font=_font(15))
    x, y = GAP, 24 + GAP
    for m in maps:
        img.paste(m, (x, y))
        x += m.width + GAP
    img.paste(bar, (x, y + 26))
    y += maps[0].height + GAP
    for s in sentences:
        y += _paragraph(draw, (GAP, y), "- " + s, width - 2 * GAP) + 4
    if thumbs:
        draw.text((GAP, y + 2), "flagged fields (map over the image; objects outlined in cyan):", fill=TEXT,
                  font=_font())
        y += 20
        for i, (t, im) in enumerate(zip(block.thumbs, thumbs, strict=True)):
            tx = GAP + (i % per_row) * (THUMB + GAP)
            ty = y + (i // per_row) * (THUMB + 34)
            img.paste(im, (tx, ty))
            for k, line in enumerate(textwrap.wrap(t.caption, 26)[:2]):
                draw.text((tx, ty + im.height + 2 + 14 * k), line, fill=TEXT, font=_font(11))
    return img


def draw(plate: str, n_rows: int, n_cols: int, blocks: Sequence[TargetBlock],
         present: set[str] | None = None) -> Image.Image:
    """The whole picture: a title, then one block per target class."""
    regions = regions_shown(blocks)
    parts = [draw_target(b, n_rows, n_cols, regions, present) for b in blocks]
    title = f"plate {plate}: where does the classifier look?"
    width = max([p.width for p in parts] + [400])
    img = Image.new("RGB", (width, 30 + sum(p.height + GAP for p in parts)), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((GAP, 6), title, fill=TEXT, font=_font(17))
    y = 30
    for p in parts:
        d.line((GAP, y, width - GAP, y), fill=(200, 200, 200))
        img.paste(p, (0, y + 2))
        y += p.height + GAP
    return img
