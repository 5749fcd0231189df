"""What the maps are drawn over, and the text drawn beside them: colour composites and a real font.

`--channel` of `pcim render` names what lies under a map:

- one channel (`DNA`): that channel in grey;
- `rgb`: the first three of plate.channels as red, green and blue (bright-field RGB stacks, stained
  colour plates);
- several channels (`DNA,PH3` or `DNA=blue,PH3=green,Actin=#ff00ff`): a fluorescence composite, each
  channel in its colour (default colours in the order of COLOURS), added and clipped.

Text uses DejaVu Sans (shipped with matplotlib, and in Debian's fonts-dejavu-core); without it,
Pillow's own scalable font; only without FreeType the bitmap font, whose narrow spaces made titles
read "C04site 1".
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import ImageFont

from pcim_cli.errors import ConfigError

FONT_SIZE = 12
DEJAVU = "DejaVuSans.ttf"
SYSTEM_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts",
                    "/Library/Fonts", "C:/Windows/Fonts")

COLOURS = {  # fluorescence defaults first: blue, green, red, then magenta, cyan, yellow, grey
    "blue": (0.0, 0.35, 1.0), "green": (0.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0), "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0), "yellow": (1.0, 1.0, 0.0), "grey": (1.0, 1.0, 1.0), "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.0),
}
RGB = "rgb"


def font_path() -> Path | None:
    """DejaVu Sans from matplotlib's package data (found without importing matplotlib) or the system."""
    spec = importlib.util.find_spec("matplotlib")
    folders = [Path(p) / "mpl-data" / "fonts" / "ttf" for p in (spec.submodule_search_locations or [])] if spec else []
    folders += [Path(d) for d in SYSTEM_FONT_DIRS]
    return next((f / DEJAVU for f in folders if (f / DEJAVU).is_file()), None)


@functools.lru_cache(maxsize=4)
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font for every text of the pictures (cached)."""
    path = font_path()
    if path is not None:
        try:
            return ImageFont.truetype(str(path), size)
        except OSError:  # no FreeType in this Pillow build
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def parse_colour(text: str) -> tuple[float, float, float]:
    """`green` or `#00ff00` -> RGB in [0, 1]; ConfigError listing the names otherwise."""
    text = text.strip().lower()
    if text in COLOURS:
        return COLOURS[text]
    if len(text) == 7 and text.startswith("#"):
        try:
            return tuple(int(text[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    raise ConfigError(f"--channel: {text!r} is not a colour: use one of {', '.join(COLOURS)} or #rrggbb")


def is_composite(spec: str | None) -> bool:
    return spec is not None and (spec.lower() == RGB or "," in spec or "=" in spec)


def parse_spec(spec: str, channels: list[str]) -> list[tuple[int, tuple[float, float, float]]]:
    """(channel index, colour) pairs of a composite --channel; ConfigError naming a bad channel or colour."""
    if spec.lower() == RGB:
        if len(channels) < 3:
            raise ConfigError(f"--channel rgb needs 3 channels (red, green, blue), plate.channels lists "
                              f"{len(channels)} ({', '.join(channels)}): name a channel or a composite instead")
        return [(0, COLOURS["red"]), (1, COLOURS["green"]), (2, (0.0, 0.0, 1.0))]
    defaults = list(COLOURS.values())
    out = []
    for i, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        name, _, colour = part.partition("=")
        name = name.strip()
        if name not in channels:
            raise ConfigError(f"--channel: {name!r} is not one of plate.channels ({', '.join(channels)})")
        out.append((channels.index(name), parse_colour(colour) if colour else defaults[i % len(defaults)]))
    if not out:
        raise ConfigError("--channel: name a channel, rgb, or channels to combine (e.g. DNA,PH3 or DNA=blue)")
    return out


def composite(raw: np.ndarray, spec: str, channels: list[str]) -> np.ndarray:
    """(y, x, 3) colour image in [0, 1] from normalised channels (C, y, x) as `spec` says."""
    out = np.zeros((*raw.shape[1:], 3), dtype=np.float32)
    for index, colour in parse_spec(spec, channels):
        out += np.clip(raw[index], 0, 1)[..., None] * np.asarray(colour, dtype=np.float32)
    return np.clip(out, 0, 1)


def label(spec: str) -> str:
    """Short text for a title: `rgb`, `DNA+PH3`."""
    return RGB if spec.lower() == RGB else "+".join(p.split("=")[0].strip() for p in spec.split(",") if p.strip())
