"""A plate's fields as discovery finds them (io/images.py for TIFFs, io/ome_zarr_plate.py for OME-Zarr):
where one field's pixels are (`FieldSource`, with a `ZarrField` for a field of an OME-Zarr store) and the
problems found on the way (`Problem`). Plain data, JSON-able where a worker needs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FieldSource", "Problem", "ZarrField"]


class Problem(str):
    """A discovery problem: its message, plus the well and field it concerns when it concerns one."""

    well: str | None
    field: int | None

    def __new__(cls, message: str, well: str | None = None, field: int | None = None) -> Problem:
        self = super().__new__(cls, message)
        self.well, self.field = well, field
        return self


@dataclass(frozen=True)
class ZarrField:
    """Where one field's pixels are and how to read them (JSON-able: a worker gets it with the field)."""

    array: str  # the full-resolution array's folder
    axes: str  # one letter per array dimension: t, c, z, y, x (o: another axis of size 1)
    shape: tuple[int, ...]
    dtype: str
    channels: tuple[int, ...]  # index along the c axis of each plate channel, in plate.channels order
    labels: tuple[str, ...] = ()  # the omero labels of those channels ('' where the store has none)
    timepoint: int = 0  # index along the t axis (0 without one)
    zarr_format: int = 3

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the field."""
        return self.shape[self.axes.index("y")], self.shape[self.axes.index("x")]

    def to_dict(self) -> dict[str, Any]:
        return {"array": self.array, "axes": self.axes, "shape": list(self.shape), "dtype": self.dtype,
                "channels": list(self.channels), "labels": list(self.labels), "timepoint": self.timepoint,
                "zarr_format": self.zarr_format}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZarrField:
        return cls(array=str(data["array"]), axes=str(data["axes"]), shape=tuple(int(n) for n in data["shape"]),
                   dtype=str(data["dtype"]), channels=tuple(int(c) for c in data["channels"]),
                   labels=tuple(str(x) for x in data.get("labels", ())), timepoint=int(data.get("timepoint", 0)),
                   zarr_format=int(data.get("zarr_format", 3)))


@dataclass(frozen=True)
class FieldSource:
    """The file(s) of one field: one per channel in channel order, or a single multi-channel stack; for
    an OME-Zarr field, `zarr` says how to read it and `files` are what its signature covers (the image's
    metadata file and its full-resolution array folder)."""

    well: str
    field: int
    files: tuple[Path, ...]
    zarr: ZarrField | None = None
    timepoint: int | None = None  # plate.timepoint: the time point read from a T axis

    @property
    def where(self) -> str:
        """The field's location for messages: its first file, or its OME-Zarr image group."""
        return str(Path(self.zarr.array).parent) if self.zarr is not None else str(self.files[0])
