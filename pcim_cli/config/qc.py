"""`qc:` — the shortcut QC of every run (docs/shortcuts.md): where each field's map lies (on objects, off
them, at the field border, on saturated pixels, on tile seams) and the per-plate verdict.

The settings change no map (they are not part of the settings fingerprint): they say how the regions
are made, and each field's record keeps what was used (`qc`). The defaults are the engine's
(engine/options.py, torch-free).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from pcim_cli.config.base import Section
from pcim_cli.config.messages import did_you_mean
from pcim_cli.engine.options import QC_BORDER_FRACTION, QC_COLUMNS
from pcim_cli.errors import short

__all__ = ["QcConfig", "qc_problems"]


class QcConfig(Section):
    """`qc:` — the shortcut QC: which pixels count as objects, border and saturated."""

    enabled: bool = Field(True, description=(
        "the PCIM_Share_OnObjects / _Background / _Border / _Saturated / _Seams columns and the per-plate "
        "shortcut verdict (docs/shortcuts.md); false: neither"))
    objects: str | None = Field(None, description=(
        "the plate.objects kind whose objects (their union, dilated by 3 px) count as 'on objects'; null: the "
        "first kind of plate.objects, or without plate.objects the automatic foreground of "
        "qc.foreground_channel"))
    foreground_channel: str | None = Field(None, description=(
        "without label images: the channel whose automatic foreground (Gaussian sigma 2 px, Otsu's threshold, "
        "opened by 2 px, dilated by 3 px) counts as 'on objects', e.g. DNA; null: the first of plate.channels"))
    foreground: Literal["bright", "dark"] = Field("bright", description=(
        "the automatic foreground: objects brighter than the background (fluorescence) or darker (bright-field)"))
    border: float = Field(QC_BORDER_FRACTION, gt=0, lt=0.5, description=(
        "the field border: this share of the field's shorter side (0.05: 6 px of a 128 px field, 18 % of its "
        "area)"))
    saturation: Literal["auto"] | float | list[float | None] | None = Field("auto", description=(
        "raw intensity at and above which a pixel is saturated: auto (a channel whose maximum is a full-scale "
        "value, 2^bits - 1 or 1.0, held by >= 2 pixels), a number, one per channel (null: none), or null "
        "(no detector ceiling). With model.normalize fixed, pixels at or above max count too"))

    @field_validator("saturation", mode="before")
    @classmethod
    def _check_saturation(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{short(value)}: give auto, a number, one number (or null) per channel, or null")
        if isinstance(value, str) and value != "auto":
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{short(value)}: give auto, a number, one number (or null) per channel, "
                                 "or null") from None
        return value


def qc_problems(qc: QcConfig, channels: list[str], objects: list[str]) -> list[tuple[str, str]]:
    """The checks of `qc:` against plate.channels and plate.objects, as (YAML path, message) pairs."""
    problems: list[tuple[str, str]] = []
    if qc.objects is not None and qc.objects not in objects:
        known = f"plate.objects lists {', '.join(objects)}" if objects else "plate.objects is not set"
        problems.append(("qc.objects", f"{short(qc.objects)} is not a kind of plate.objects ({known}); name one "
                         "of them, or leave qc.objects out" + did_you_mean(qc.objects, objects)))
    if qc.foreground_channel is not None and qc.foreground_channel not in channels:
        problems.append(("qc.foreground_channel", f"{short(qc.foreground_channel)} is not in plate.channels "
                         f"({', '.join(channels)})" + did_you_mean(qc.foreground_channel, channels)))
    if isinstance(qc.saturation, list) and len(qc.saturation) != len(channels):
        problems.append(("qc.saturation", f"lists {len(qc.saturation)} levels for {len(channels)} channels "
                         f"({', '.join(channels)}); give one per channel (null: none), or one number"))
    if qc.enabled:
        taken = {re.sub(r"\W+", "_", c).strip("_").lower(): c for c in channels}
        clash = [taken[w.lower()] for w in QC_COLUMNS.values() if w.lower() in taken]
        if clash:
            problems.append(("plate.channels", f"channel(s) {', '.join(clash)} would share a CSV column with the "
                             "shortcut QC (PCIM_Share_<channel> vs PCIM_Share_"
                             f"{' / '.join(QC_COLUMNS.values())}); rename the channel, or set qc.enabled: false"))
    return problems
