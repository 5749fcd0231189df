"""`pcim init`: a commented plate.yaml to start from, derived from the models (every key, its default and
what it does come from config/sections.py and config/explain.py, so the template cannot drift from them).

The only things written here are the header and the three values a user must fill in (`FILL_IN`).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pcim_cli.config.sections import RunConfig
from pcim_cli.errors import OutputError

__all__ = ["FILL_IN", "render_template", "write_template"]

HEADER = """\
# plate.yaml for pcim — fill in the marked lines, then: pcim validate {name}
# Relative paths resolve against this file's folder (never the working directory), so cron and
# sbatch runs behave like runs by hand. Unknown keys are errors. Override any key without editing:
#   PCIM_EXPLAIN__STEPS=100 pcim explain {name}      or      pcim explain {name} --set explain.steps=100
# Each key below shows its default; `pcim schema` prints them all as JSON Schema.
"""

#: (section, key) -> the example a user replaces (required keys: no default to show)
FILL_IN: dict[tuple[str, str], Any] = {
    ("plate", "images"): "images/",
    ("plate", "channels"): {"DNA": "1", "PH3": "2", "Actin": "3"},
    ("model", "path"): "classifier.ts",
}
COMMENT_COLUMN = 36
WIDTH = 112
_PLAIN = re.compile(r"[A-Za-z_./~-][A-Za-z0-9_./~ -]*")


def _yaml(value: Any) -> str:
    """A value in YAML flow style, as config/yaml_reader.py reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, BaseModel):
        return _yaml(value.model_dump(mode="json"))
    if isinstance(value, Path):
        value = value.as_posix()
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) and value.strip() == value and value != "null" else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no YAML form for {value!r}")


def _default(info: FieldInfo) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]


def _lines(key: str, value: str | None, comment: str, indent: int) -> list[str]:
    """`key: value  # comment`, the comment on its own lines below when it does not fit."""
    head = " " * indent + f"{key}:" + ("" if value is None else f" {value}")
    if not comment:
        return [head]
    inline = head.ljust(COMMENT_COLUMN - 1) + " # " + comment
    if len(inline) <= WIDTH:
        return [inline]
    prefix = " " * (indent + 4) + "# "
    return [head, *textwrap.wrap(comment, WIDTH, initial_indent=prefix, subsequent_indent=prefix,
                                 break_on_hyphens=False)]


def _section(model: type[BaseModel], name: str, indent: int) -> list[str]:
    out = []
    for key, info in model.model_fields.items():
        comment = info.description or ""
        nested = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) \
            else None
        if nested is not None:
            out += _lines(key, None, comment, indent) + _section(nested, f"{name}.{key}", indent + 2)
            continue
        if (name, key) in FILL_IN:
            value, comment = FILL_IN[(name, key)], f"FILL IN: {comment}"
        elif info.is_required() and key == "name":
            value = None  # plate.name: null is this file's name
        else:
            value = _default(info)
        out += _lines(key, _yaml(value), comment, indent)
    return out


def render_template(name: str = "plate.yaml") -> str:
    """The commented template; `name` is the file name its header mentions."""
    lines = HEADER.format(name=name).splitlines()
    for section, info in RunConfig.model_fields.items():
        model = info.annotation if isinstance(info.annotation, type) else None
        if model is None:
            continue
        lines += ["", f"{section}:"]
        lines += _section(model, section, 2)
    return "\n".join(lines) + "\n"


def write_template(path: Path, overwrite: bool = False) -> Path:
    """Write the commented template to `path`; refuses to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; choose another name or pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_template(path.name), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}; choose a writable folder") from exc
    return path
