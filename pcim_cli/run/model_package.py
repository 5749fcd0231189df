"""A bioimage.io model package as model.path, applied to a plate's settings before anything runs.

`apply` reads the package (io/bioimageio.py), checks plate.yaml against it and turns the config into the
one every later step uses: model.path becomes the package's TorchScript weights, and model.normalize,
model.classes and model.input_size what the package states (or what plate.yaml says where it agrees, or
overrides with model.override_package). The decisions travel with the config (`package_of`), into every
field's record and `pcim validate`'s report. `fit_fields` sets the tile size when the package allows
sizes by a rule (min + n * step) that the plate's fields do not meet; `check_own_test` runs the package's
own test tensors through the loaded weights.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter

from pcim_cli.config import Normalize, RunConfig
from pcim_cli.errors import ConfigError, ModelError
from pcim_cli.io import bioimageio, package_checks

logger = logging.getLogger(__name__)

_NORMALIZE = TypeAdapter(Normalize)


class Applied:
    """A package applied to a config: what it is and what was decided (held by the config)."""

    def __init__(self, package: bioimageio.PackageModel, resolved: package_checks.Resolved):
        self.package = package
        self.resolved = resolved

    def record(self) -> dict[str, Any]:
        """`model_package` of each field record."""
        return self.resolved.record(self.package)


def package_of(cfg: RunConfig) -> Applied | None:
    """The package applied to this config (None: model.path is a model file)."""
    return cfg.model_package


def apply(cfg: RunConfig) -> Applied | None:
    """Apply model.path's package to `cfg` (in place, once). Raises ConfigError (78) listing every key of
    plate.yaml that disagrees with the package, ModelError (78) for a package pcim cannot use."""
    done = package_of(cfg)
    if done is not None:
        return done
    model = cfg.model
    if not bioimageio.is_package(model.path):
        if model.override_package:
            raise ConfigError(f"model.override_package ({', '.join(model.override_package)}) applies to bioimage.io "
                              f"model packages, and model.path {model.path} is a model file: remove it")
        return None
    pkg = bioimageio.load_package(model.path)
    given = model.model_fields_set
    resolved = package_checks.reconcile(
        pkg, channels=list(cfg.plate.channels),
        normalize=model.normalize.model_dump() if "normalize" in given else None,
        classes=model.classes if "classes" in given else None,
        input_size=model.input_size if "input_size" in given else None,
        override=model.override_package)
    if resolved.problems:
        where = cfg.config_path or "plate.yaml"
        lines = "\n".join(f"  {key}: {message}" for key, message in resolved.problems)
        noun = "problem" if len(resolved.problems) == 1 else "problems"
        raise ConfigError(f"invalid configuration {where} ({len(resolved.problems)} {noun}, against its model "
                          f"package):\n{lines}")
    model.path = pkg.weights
    model.normalize = _NORMALIZE.validate_python(resolved.normalize)
    model.classes = resolved.classes
    model.input_size = resolved.input_size
    applied = Applied(pkg, resolved)
    cfg.with_package(applied)
    logger.info("model package %s: weights %s, %s", pkg.source, pkg.weights,
                ", ".join(f"{k} from the {v}" for k, v in resolved.taken.items()))
    return applied


def probe_size(cfg: RunConfig) -> tuple[int, int]:
    """The input size to probe the model with before the fields are known: 64 x 64, or the smallest size
    of at least that which the package's size rule allows."""
    applied = package_of(cfg)
    rule = None if applied is None else applied.package.size_rule
    if rule is None:
        return 64, 64
    out = []
    for r in (rule["y"], rule["x"]):
        n = max(64, r["min"])
        out.append(r["min"] + -(-(n - r["min"]) // r["step"]) * r["step"])
    return out[0], out[1]


def fit_fields(cfg: RunConfig, field_size: tuple[int, int] | None) -> None:
    """A package with a size rule (min + n * step) and no model.input_size: the fields' size when the rule
    allows it (one tile per field), else tiles of the largest size it allows within a field; set as
    model.input_size, so every probe and worker uses a size the model takes, and recorded. Raises
    ModelError for fields smaller than the rule's minimum."""
    applied = package_of(cfg)
    if applied is None or field_size is None or cfg.model.input_size is not None:
        return
    pkg = applied.package
    if pkg.size_rule is None:
        return
    field_size = (int(field_size[0]), int(field_size[1]))
    tile = field_size if pkg.size_ok(field_size) else pkg.largest_size(field_size)
    if tile is None:
        rule = ", ".join(f"{axis}: {r['min']} + n * {r['step']}" for axis, r in pkg.size_rule.items())
        raise ModelError(f"the plate's fields are {field_size[0]}x{field_size[1]} px, smaller than model package "
                         f"{pkg.source} accepts ({rule})")
    cfg.model.input_size = tile
    applied.resolved.input_size = tile
    applied.resolved.taken["input_size"] = (
        f"package size rule: whole {tile[0]}x{tile[1]} fields" if tile == field_size else
        f"package size rule: tiles of {tile[0]}x{tile[1]} for fields of {field_size[0]}x{field_size[1]}")
    if tile != field_size:
        logger.info("model package %s: %dx%d fields are cut into %dx%d tiles (its size rule)", pkg.source,
                    *field_size, *tile)


def check_own_test(cfg: RunConfig, module: Any) -> None:
    """The package's test input, preprocessed as mapped, must give its test output through the loaded
    weights (skipped when plate.yaml overrides the normalisation). Raises ModelError (78)."""
    applied = package_of(cfg)
    if applied is None or applied.resolved.taken.get("normalize") != "package":
        return
    problem = package_checks.self_check(applied.package, cfg.model.normalize.model_dump(), module)
    if problem:
        raise ModelError(problem + "; fix the package, or set model.normalize and list normalize in "
                         "model.override_package")
