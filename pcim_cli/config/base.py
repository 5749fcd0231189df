"""The building blocks of every plate.yaml section: paths anchored at the YAML file's folder, and the
section base (unknown keys are errors; YAML numbers are accepted where text is due)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo

__all__ = ["ConfigPath", "Section", "is_config_path", "resolve_path"]


def _check_path_text(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty path")
    return value


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ~ and anchor a relative path at the YAML file's folder (context 'base_dir')."""
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


ConfigPath = Annotated[Path, BeforeValidator(_check_path_text), AfterValidator(resolve_path)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors; YAML numbers are accepted where text is due."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def is_config_path(validator: Any) -> bool:
    """Is this annotation metadata the validator that anchors a ConfigPath (config/load.py path_keys)?"""
    return getattr(validator, "func", None) is resolve_path
