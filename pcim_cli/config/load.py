"""Reading plate.yaml: the one place settings are merged (docs/reference/plate-yaml.md has every key).

Precedence, lowest first:

1. the defaults of the models (config/sections.py, config/explain.py);
2. the YAML file;
3. environment variables ``PCIM_<SECTION>__<KEY>=value``, nested with ``__``
   (``PCIM_EXPLAIN__STEPS=100``, ``PCIM_COMPUTE__SLURM__QUEUE=gpu``). Only ``PCIM_`` variables
   with a ``__`` are read, and every one of them must name a real key;
4. command-line overrides ``--set explain.steps=100`` (dotted keys), in the order given.

Override values are parsed as YAML (``[A01, B03]`` is a list, ``null`` is null); a value that is not
valid YAML (e.g. ``{well}_s{field}.tif``) is taken as plain text. With
``compute.cluster: address`` and no address anywhere, ``DASK_SCHEDULER_ADDRESS`` fills it in.

Relative paths (``plate.images``, ``plate.layout``, ``model.path``, ``explain.explainer``,
``output.zarr``, ``output.csv``, ``compute.scheduler_file``) resolve against the YAML file's folder --
also when they come from an override -- never against the working directory; ``~`` is expanded.
``{plate}`` in the output paths becomes the plate name, which defaults to the YAML file's stem.
Unknown keys are errors, and every problem is reported at once in one ConfigError, each as
``<yaml.path>: <what is wrong>``.

YAML (config/yaml_reader.py): every plain scalar is read as the text it is written as, and the models
parse numbers and booleans from it, in decimal: a plate barcode ``0012345`` stays ``0012345``,
``classes: [no, yes]`` stays two class names, ``steps: 010`` is ten. Hostile files (alias bombs, deep
nesting) end in one short ConfigError, and values quoted in messages are cut to a readable length.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import ValidationError

from pcim_cli.config.base import is_config_path
from pcim_cli.config.messages import format_problems, with_origin
from pcim_cli.config.sections import RunConfig
from pcim_cli.config.yaml_reader import parse_value, read_yaml
from pcim_cli.errors import ConfigError, short

__all__ = ["ENV_PREFIX", "config_from_data", "load_config", "path_keys"]

logger = logging.getLogger(__name__)

ENV_PREFIX = "PCIM_"


def _set_key(data: dict[str, Any], keys: list[str], value: Any) -> str | None:
    """Set data[k0][k1]... = value, creating mappings; a problem message if a parent is not a mapping."""
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            return f"cannot set a key below {'.'.join(keys[: i + 1])}: it is {short(child)}, not a mapping"
        node = child
    node[keys[-1]] = value
    return None


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], str, str]]:
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and "__" in name:
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            out.append((keys, environ[name], f"environment variable {name}"))
    return out


def _cli_overrides(overrides: Sequence[str], problems: list[str]) -> list[tuple[list[str], str, str]]:
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            problems.append(f"--set {text}: expected section.key=value, e.g. --set explain.steps=100")
            continue
        out.append(([k.strip() for k in keys], value, f"--set {text}"))
    return out


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Read plate.yaml, apply `PCIM_*` environment and `--set` overrides, validate, resolve paths.

    Raises ConfigError naming the file and listing every problem as `<yaml.path>: <what is wrong>`.
    """
    path = Path(path).expanduser().absolute()
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with the sections "
                          f"{', '.join(RunConfig.model_fields)}, got {type(data).__name__}")
    return config_from_data(data, path, overrides, environ)


def config_from_data(
    data: dict[str, Any],
    path: Path,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    where: str | None = None,
    default_name: str | None = None,
) -> RunConfig:
    """Validate the sections read from `path` (relative paths resolve against its folder) with the
    environment and `--set` overrides on top. `where` names the config in messages (default: the path);
    `default_name` is plate.name when the sections give none (default: the file's stem)."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    origins: dict[str, str] = {}
    for keys, text, origin in _env_overrides(environ) + _cli_overrides(overrides, problems):
        trouble = _set_key(data, keys, parse_value(text, origin))
        if trouble:
            problems.append(f"{'.'.join(keys)}: {trouble} [from {origin}]")
        else:
            origins[".".join(keys)] = origin
    compute = data.get("compute")
    if isinstance(compute, dict) and compute.get("cluster") == "address" and not compute.get("address"):
        address = environ.get("DASK_SCHEDULER_ADDRESS")
        if address:
            compute["address"] = address
            origins["compute.address"] = "environment variable DASK_SCHEDULER_ADDRESS"

    config: RunConfig | None = None
    try:
        config = RunConfig.model_validate(data, context={"base_dir": path.parent,
                                                         "default_name": default_name or path.stem})
    except ValidationError as exc:
        problems.extend(with_origin(p, m, origins) for p, m in format_problems(exc, RunConfig))
    if problems or config is None:
        listed = "\n".join(f"  {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"invalid configuration {where or path} ({len(problems)} {noun}):\n{listed}")
    config.read_from(path)
    logger.debug("loaded %s (plate %s, %d override(s))", path, config.plate.name, len(origins))
    return config


def _is_path(annotation: Any) -> bool:
    """The annotation is (or holds) a ConfigPath: a path anchored at the YAML file's folder."""
    if typing.get_origin(annotation) is Annotated:
        if any(is_config_path(m) for m in annotation.__metadata__):
            return True
        return _is_path(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_is_path(a) for a in typing.get_args(annotation))
    return False


def path_keys() -> list[tuple[str, str]]:
    """(section, key) of every key whose value is a path relative to the YAML file (screen.py merges
    sections read from different files by anchoring these first)."""
    out = []
    for section, info in RunConfig.model_fields.items():
        model = info.annotation
        if inspect.isclass(model):
            out += [(section, key) for key, f in model.model_fields.items()
                    if _is_path(f.annotation) or any(is_config_path(m) for m in f.metadata)]
    return out
