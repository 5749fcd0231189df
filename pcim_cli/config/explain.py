"""`explain:` — what to attribute and how: the run's own keys plus every engine setting, derived.

The engine settings are declared once, in engine/options.py (`PcimOptions`: type, bounds, default,
description). `ExplainConfig` takes each of them as a flat key of this section, so a new engine setting
is a key of plate.yaml, of `pcim schema` and of `pcim init`'s template without another line here. Two
keys differ on purpose:

- `steps`: at least 1 in plate.yaml (a run fits); the engine also takes 0 (the first logits' map);
- `intensity_channel`: plate.yaml names a channel of plate.channels (or auto); the engine takes its
  index (run/inventory.py `engine_options` translates).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveInt, create_model, field_validator

from pcim_cli.config.base import ConfigPath, Section
from pcim_cli.engine.options import Method, PcimOptions, TileMaps

__all__ = ["ENGINE_KEYS", "ExplainConfig"]


class _RunKeys(Section):
    """The keys of `explain:` that are not engine settings."""

    method: Method = Field("pcim", description=(
        "pcim | pcim-amortised | saliency | integrated-gradients | occlusion | rise | intensity | contrast"))
    target: str = Field("predicted", description=(
        "predicted | contrastive (predicted, + the runner-up class's map where the predicted class survives the "
        "deletion of the whole field) | a class name | layout:<column> | all"))
    explainer: ConfigPath | None = Field(None, description=(
        "pcim-amortised: the file `pcim train-explainer plate.yaml --out ...` wrote"))
    intensity_channel: str = Field("auto", description=(
        "intensity: the channel shown (a name of plate.channels); auto: per image, the channel whose intensity "
        "removes the class fastest (pcim evaluate reports the best one for the plate)"))
    fidelity: bool = Field(True, description="deletion / insertion AUC of every map into the CSV, and the "
                                             "plate's stain verdict")
    fidelity_every: PositiveInt | Literal["auto"] = Field("auto", description=(
        "with fidelity on: AUCs and stain check on one field in N in plate order (the others' AUC cells "
        "empty); auto: every field (1), or 128 for pcim-amortised, whose map costs far less than its curves"))
    top_objects: PositiveInt = Field(3, description="plate.objects: top objects per field deleted together "
                                                    "(PCIM_<Object>_TopDeltaP) and outlined")
    tile_maps: TileMaps = Field("field", description=(
        "tiled fields: one fit over the field (field) | per tile (per-tile) | per tile weighted by its "
        "evidence (evidence)"))

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty target: use predicted, all, a class name or layout:<column>")
        if value.startswith("layout:") and not value[len("layout:") :].strip():
            raise ValueError("'layout:' needs a column name, e.g. layout:moa")
        return value


#: plate.yaml spells these engine settings its own way (see the module docstring)
_OWN_SPELLING = {"intensity_channel"}
#: stricter in plate.yaml than in the engine (the description and default stay the engine's)
_STRICTER: dict[str, Any] = {"steps": PositiveInt}
#: a list in YAML and JSON stays a list in the config (the engine keeps a tuple)
_AS_LIST: dict[str, Any] = {"budget": float | list[float] | None}


def _engine_field(f: dataclasses.Field, annotation: Any) -> tuple[Any, Any]:
    """A pydantic field from a PcimOptions field: its choices as a Literal, its bounds, its check, its
    default and description (engine/options.py `setting`)."""
    meta = f.metadata
    if meta.get("choices") is not None:
        annotation = Literal[meta["choices"]]
    if meta.get("check") is not None:
        annotation = Annotated[annotation, AfterValidator(meta["check"])]
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None}
    return annotation, Field(f.default, description=meta.get("description"), **bounds)


def _engine_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(PcimOptions)
    return {f.name: _engine_field(f, _STRICTER.get(f.name, _AS_LIST.get(f.name, hints[f.name])))
            for f in dataclasses.fields(PcimOptions) if f.name not in _OWN_SPELLING}


#: the engine settings that are keys of `explain:`
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(PcimOptions) if f.name not in _OWN_SPELLING)

ExplainConfig = create_model(  # type: ignore[call-overload]
    "ExplainConfig", __base__=_RunKeys, __module__=__name__,
    __doc__="`explain:` — what to attribute and how; the engine settings are flat keys of this section.",
    **_engine_fields(),
)
