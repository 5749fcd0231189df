"""`pcim render` for plate.objects: outline each field's top objects on its overlay, and list them.

The top objects of a target are the `explain.top_objects` objects holding most of its attribution
(rank 1..k in the field's object table in the store, io/object_tables.py). They are outlined on every
panel of that target, in one colour per object kind, with their ObjectNumber beside them; the report
lists them per field and target with their share of the map and the drop of p(target) when each is
deleted alone (ΔP).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import zarr
from PIL import Image, ImageDraw

from pcim_cli.io import labels as label_io
from pcim_cli.io import ngff, object_tables
from pcim_cli.io.summary import column_word
from pcim_cli.report import composite

#: outline colours per object kind (first kind cyan: far from the map's violet-to-yellow scale)
OUTLINE_COLOURS = ((0, 255, 255), (120, 255, 80), (255, 255, 255), (80, 160, 255))


@dataclass
class TopObject:
    """One of a field's top objects for one target."""

    kind: str
    number: int
    rank: int
    share: float
    delta_p: float


@dataclass
class FieldObjects:
    """A field's top objects per target, and its label images at the level drawn."""

    top: dict[str, list[TopObject]] = field(default_factory=dict)  # target -> objects by rank
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (y, x) at the maps' level
    colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.top.values())


def _labels_at(group: zarr.Group, kind: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The kind's label image at the pyramid level of the given (y, x) shape."""
    for level in range(len(ngff.PYRAMID_FACTORS)):
        image = label_io.read_labels_level(group, kind, level)
        if image is None:
            return None
        if tuple(image.shape) == tuple(shape):
            return image
    return None


def field_objects(group: zarr.Group, record: Mapping | None, shape: tuple[int, int]) -> FieldObjects:
    """The top objects of a field (from its tables and record) and its label images at `shape`."""
    found = FieldObjects()
    entries = (record or {}).get("objects") or {}
    for i, (kind, entry) in enumerate(entries.items()):
        if entry.get("status") != "done":
            continue
        table = object_tables.read_table(group, kind)
        image = _labels_at(group, kind, shape)
        if table is None or image is None:
            continue
        found.labels[kind] = image
        found.colours[kind] = OUTLINE_COLOURS[i % len(OUTLINE_COLOURS)]
        k = int(entry.get("top_k") or 3)
        for target in (record or {}).get("targets", []):
            word = column_word(target)
            rank = table.get(f"PCIM_{word}_Rank")
            if rank is None:
                continue
            rows = table[(rank <= k) & (table[f"PCIM_{word}_Sum"] > 0)].sort_values(f"PCIM_{word}_Rank")
            found.top.setdefault(target, []).extend(
                TopObject(kind, int(r["ObjectNumber"]), int(r[f"PCIM_{word}_Rank"]), float(r[f"PCIM_{word}_Share"]),
                          float(r[f"PCIM_{word}_DeltaP"])) for _, r in rows.iterrows())
    return found


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def draw_outlines(image: Image.Image, objects: FieldObjects, target: str, scale: int) -> None:
    """Outline `target`'s top objects on a panel drawn at `scale` x the labels' size, numbers beside them."""
    pixels = np.asarray(image).copy()
    texts = []
    for obj in objects.top.get(target, []):
        labels = objects.labels.get(obj.kind)
        if labels is None:
            continue
        mask = labels == obj.number
        if not mask.any():  # too small for this pyramid level
            continue
        big = np.kron(mask, np.ones((scale, scale), dtype=bool)) if scale > 1 else mask
        edge = _outline(big)
        pixels[edge] = objects.colours[obj.kind]
        ys, xs = np.nonzero(big)
        texts.append((int(xs.max()) + 2, max(0, int(ys.min()) - 4), str(obj.number), objects.colours[obj.kind]))
    image.paste(Image.fromarray(pixels))
    draw = ImageDraw.Draw(image)
    font = composite.font()  # the report's font
    for x, y, text, colour in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = min(x, image.width - (right - left) - 2), max(0, y - (bottom - top) // 2)
        draw.text((x + 1, y + 1), text, fill=(0, 0, 0), font=font)
        draw.text((x, y), text, fill=colour, font=font)


def _number(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def top_html(top: Sequence[TopObject]) -> str:
    """The report cell listing a field's top objects for one target."""
    if not top:
        return ""
    items = "".join(f"<li>{html.escape(o.kind)} {o.number}: share {_number(o.share)}, ΔP {_number(o.delta_p)}</li>"
                    for o in top)
    return f'<ol class="objects">{items}</ol>'
