"""A screen: many plates explained (or checked) by one command — the plate configs it names, validated.

What `pcim explain` and `pcim status` accept, all giving the same list of plates:

- several plate.yaml files: ``pcim explain P1/plate.yaml P2/plate.yaml``;
- quoted globs, expanded by pcim in sorted order: ``pcim explain 'screen/*/plate.yaml'``;
- a screen file (recognised by its ``plates:`` key): shared sections plus a list of plates::

      model: {path: classifier.ts, classes: [negative, mitotic]}   # shared by every plate
      compute: {cluster: local, workers: 4}
      output: {zarr: out/{plate}.zarr, csv: out/{plate}_pcim.csv, screen_csv: out/screen_pcim.csv}
      plates:
        - P001/plate.yaml                      # a plate.yaml: its keys override the shared ones
        - config: P002/plate.yaml              # ... and these keys override both
          explain: {steps: 100}
        - plate: {name: P003, images: P003/images, channels: [DNA, PH3, Actin]}   # inline

Precedence for each plate, lowest first: defaults < the screen file's shared sections < the plate's
plate.yaml < the keys of its entry in the screen file < ``PCIM_*`` environment < ``--set``. A key
replaces the shared key of the same name as a whole (``plate.channels``, ``model.normalize`` are
values, not merged); only ``compute.slurm`` is merged key by key. Relative paths resolve against the
folder of the file that names them: the screen file's for its sections and inline plates, each
plate.yaml's for its own.

Every plate is validated up front; an invalid one becomes a problem (its file, its entry and every YAML
path) and is skipped, the others run. Two plates with one name or one output store are problems too.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcim_cli.config.load import config_from_data, path_keys
from pcim_cli.config.sections import ComputeConfig, RunConfig
from pcim_cli.config.yaml_reader import read_yaml
from pcim_cli.errors import ConfigError

logger = logging.getLogger(__name__)

#: the key that makes a YAML file a screen file
PLATES_KEY = "plates"
#: the key of a plate entry that names its plate.yaml
CONFIG_KEY = "config"
#: sections merged key by key below their section (the others' values replace each other whole)
NESTED = {("compute", "slurm")}


@dataclass
class PlateEntry:
    """One plate of a screen: its validated config, or why it cannot run."""

    source: str  # where it was named: "P1/plate.yaml" or "screen.yaml plates[2] (P3/plate.yaml)"
    config: RunConfig | None = None
    problem: str | None = None  # the ConfigError message (file, entry, YAML paths)
    label: str | None = None  # plate.name as written, for an invalid config

    @property
    def name(self) -> str:
        return self.config.plate.name if self.config is not None else self.label or self.source


@dataclass
class Screen:
    """The plates of one command, in the order given."""

    entries: list[PlateEntry]
    files: list[Path] = field(default_factory=list)  # the YAML files named on the command line

    @property
    def configs(self) -> list[RunConfig]:
        return [e.config for e in self.entries if e.config is not None]

    @property
    def problems(self) -> list[PlateEntry]:
        return [e for e in self.entries if e.config is None]

    @property
    def compute(self) -> ComputeConfig:
        """The one cluster the screen runs on: the first valid plate's compute section."""
        configs = self.configs
        return configs[0].compute if configs else ComputeConfig()

    @property
    def screen_csv(self) -> Path | None:
        """output.screen_csv of the first valid plate that sets it."""
        return next((c.output.screen_csv for c in self.configs if c.output.screen_csv is not None), None)

    @property
    def is_single_plate(self) -> bool:
        """One plate.yaml named alone: the command behaves exactly as for one plate."""
        return len(self.entries) == 1 and not any(is_screen_file(f) for f in self.files)


def expand_arguments(args: Sequence[str | Path]) -> list[Path]:
    """Command-line paths with globs (``*``, ``?``, ``[``) expanded by pcim, sorted; a pattern that
    matches nothing is a ConfigError."""
    out: list[Path] = []
    for arg in args:
        text = str(arg)
        if Path(text).expanduser().exists() or not glob.has_magic(text):
            out.append(Path(text).expanduser())
            continue
        matches = sorted(glob.glob(str(Path(text).expanduser()), recursive=True))
        if not matches:
            raise ConfigError(f"{text}: no file matches this pattern; check the path (relative to {Path.cwd()})")
        out += [Path(m) for m in matches]
    return out


def is_screen_file(path: Path) -> bool:
    """A YAML file with a top-level `plates:` key."""
    try:
        data = read_yaml(Path(path).expanduser().absolute())
    except ConfigError:
        return False
    return isinstance(data, dict) and PLATES_KEY in data


def load_screen(args: Sequence[str | Path], overrides: Sequence[str] = (),
                environ: Mapping[str, str] | None = None) -> Screen:
    """The plates named by `args` (plate.yaml files, globs, screen files), each validated with the
    overrides. Raises ConfigError only when an argument cannot be read at all (a missing file, a
    broken screen file); an invalid plate is an entry with its problem."""
    files = expand_arguments(args)
    if not files:
        raise ConfigError("name at least one plate.yaml or screen file")
    entries: list[PlateEntry] = []
    for path in files:
        path = path.absolute()
        data = read_yaml(path)
        if isinstance(data, dict) and PLATES_KEY in data:
            entries += _screen_entries(path, data, overrides, environ)
        else:
            entries.append(_plate_entry(str(path), path, data, {}, overrides, environ))
    _check_unique(entries)
    for e in entries:
        if e.problem:
            logger.debug("plate %s skipped: %s", e.source, e.problem)
    return Screen(entries, files)


def _plate_entry(source: str, path: Path, data: Any, base: dict[str, Any], overrides: Sequence[str],
                 environ: Mapping[str, str] | None, where: str | None = None,
                 default_name: str | None = None) -> PlateEntry:
    """Validate one plate: `base` (already absolute paths) < `data` (read from `path`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return PlateEntry(source, problem=f"{where or path}: the top level must be a mapping with the sections "
                                          f"{', '.join(RunConfig.model_fields)}, got {type(data).__name__}")
    merged = merge_sections(base, absolute_paths(data, path.parent))
    try:
        return PlateEntry(source, config_from_data(merged, path, overrides, environ, where=where,
                                                   default_name=default_name))
    except ConfigError as exc:
        name = merged.get("plate", {}).get("name") if isinstance(merged.get("plate"), dict) else None
        return PlateEntry(source, problem=str(exc), label=str(name or default_name or path.stem))


def _screen_entries(path: Path, data: dict[str, Any], overrides: Sequence[str],
                    environ: Mapping[str, str] | None) -> list[PlateEntry]:
    """The plates of a screen file."""
    allowed = [*RunConfig.model_fields, PLATES_KEY]
    unknown = [k for k in data if k not in allowed]
    plates = data.get(PLATES_KEY)
    if unknown:
        raise ConfigError(f"invalid screen file {path}: unknown key(s) {', '.join(map(str, unknown))} (allowed: "
                          f"{', '.join(allowed)})")
    if not isinstance(plates, list) or not plates:
        raise ConfigError(f"invalid screen file {path}: {PLATES_KEY}: give a list of plates (paths to plate.yaml, "
                          f"or mappings with `{CONFIG_KEY}: plate.yaml` and/or sections)")
    shared = {k: v for k, v in data.items() if k != PLATES_KEY}
    bad = [k for k, v in shared.items() if v is not None and not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"invalid screen file {path}: {', '.join(bad)}: must be a mapping of keys")
    base = absolute_paths(shared, path.parent)
    out = []
    for i, item in enumerate(plates):
        where = f"{path} {PLATES_KEY}[{i}]"
        if isinstance(item, str):
            item = {CONFIG_KEY: item}
        if not isinstance(item, dict):
            out.append(PlateEntry(where, problem=f"{where}: give a path to a plate.yaml or a mapping of "
                                                 f"sections, got {item!r}"))
            continue
        item = dict(item)
        config = item.pop(CONFIG_KEY, None)
        if config is None:  # an inline plate: its paths are relative to the screen file
            if not isinstance(item.get("plate"), dict) or not item["plate"].get("name"):
                out.append(PlateEntry(where, problem=f"invalid configuration {where}:\n  plate.name: required for "
                                                     "a plate written in the screen file"))
                continue
            out.append(_plate_entry(where, path, item, base, overrides, environ, where=where))
            continue
        plate_yaml = (path.parent / Path(str(config)).expanduser()).absolute()
        source = f"{where} ({plate_yaml})"
        try:
            plate_data = read_yaml(plate_yaml)
        except ConfigError as exc:
            out.append(PlateEntry(source, problem=f"{where}: {exc}"))
            continue
        if plate_data is not None and not isinstance(plate_data, dict):
            out.append(_plate_entry(source, plate_yaml, plate_data, base, overrides, environ, where=source))
            continue
        # the entry's own keys are relative to the screen file, the plate.yaml's to its own folder
        layered = merge_sections(base, absolute_paths(plate_data or {}, plate_yaml.parent))
        layered = merge_sections(layered, absolute_paths(item, path.parent))
        out.append(_plate_entry(source, plate_yaml, {}, layered, overrides, environ, where=source,
                                default_name=plate_yaml.stem))
    return out


def _check_unique(entries: list[PlateEntry]) -> None:
    """A second plate with the name or the store of an earlier one becomes a problem."""
    names: dict[str, str] = {}
    stores: dict[Path, str] = {}
    for e in entries:
        if e.config is None:
            continue
        name, zarr = e.config.plate.name, Path(e.config.output.zarr).absolute()
        if name in names:
            e.problem = (f"{e.source}: plate name {name!r} is also the name of {names[name]}; give each plate of a "
                         "screen its own plate.name")
        elif zarr in stores:
            e.problem = (f"{e.source}: output.zarr {zarr} is also the store of {stores[zarr]}; a store holds one "
                         "plate: use {plate} in output.zarr")
        if e.problem:
            e.config = None
            continue
        names[name], stores[zarr] = e.source, e.source


def merge_sections(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top`'s keys over `base`'s, section by section (values replace whole; compute.slurm key by key)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in top.items():
        if not isinstance(values, dict) or not isinstance(out.get(section), dict):
            out[section] = values
            continue
        merged = dict(out[section])
        for key, value in values.items():
            if (section, key) in NESTED and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        out[section] = merged
    return out


def absolute_paths(data: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """A copy of `data` whose relative path values (the keys config.path_keys names, and plate.objects
    patterns) are anchored at `folder`, so sections from different files can be merged."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, key in path_keys():
        values = out.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str) and values[key].strip():
            values[key] = _anchor(values[key], folder)
    objects = (out.get("plate") or {}).get("objects") if isinstance(out.get("plate"), dict) else None
    if isinstance(objects, dict):
        out["plate"]["objects"] = {k: _anchor(v, folder) if isinstance(v, str) and v.strip() else v
                                   for k, v in objects.items()}
    return out


def _anchor(text: str, folder: Path) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else folder / path)
