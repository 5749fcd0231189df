"""Pydantic's errors as plate.yaml problems: `<yaml.path>: <what is wrong>`, one line each, with a hint.

`format_problems` turns a ValidationError of the whole file into (YAML path, message) pairs: unknown keys
with "did you mean", literals with the values allowed, discriminated unions by their `method` key, and
the problems found across sections (`CrossProblems`) with their own paths. Values quoted are cut to a
readable length (errors.short).
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from pcim_cli.errors import short, shown

__all__ = ["CrossProblems", "did_you_mean", "format_problems", "with_origin"]


class CrossProblems(ValueError):
    """Problems found across sections, each with its own YAML path."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_of(annotation: Any) -> type[BaseModel] | dict[str, type[BaseModel]] | None:
    """The model behind a field annotation; {tag: model} for a discriminated union."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if inspect.isclass(a) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
        if models:
            return {typing.get_args(m.model_fields["method"].annotation)[0]: m for m in models}
    return None


def _locate(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[str, Any]:
    """YAML path of a pydantic error location below `root`, and the model holding its last key."""
    parts: list[str] = []
    node: Any = root
    parent: Any = None
    for item in loc:
        if isinstance(node, dict) and item in node:  # discriminated-union tag: not a YAML key
            node = node[item]
            continue
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
            node = None
            continue
        parent = node
        parts.append(str(item))
        fields = getattr(node, "model_fields", {}) if inspect.isclass(node) else {}
        node = _section_of(fields[item].annotation) if item in fields else None
    return ".".join(parts), parent


def _quoted(ctx_text: str) -> list[str]:
    return re.findall(r"'([^']*)'", ctx_text)


def _describe(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """(yaml path, message) for one pydantic error."""
    path, parent = _locate(tuple(err["loc"]), root)
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = list(getattr(parent, "model_fields", {}))
        hint = did_you_mean(key, allowed) or (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return path, f"unknown key{hint}"
    if kind == "missing":
        return path, "required key missing"
    if kind == "literal_error":
        allowed = _quoted(ctx.get("expected", ""))
        return path, (f"{short(value)} is not allowed: use one of {', '.join(allowed)}"
                      f"{did_you_mean(str(value), allowed)}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        allowed = _quoted(ctx.get("expected_tags", "")) or ["percentile", "fixed", "zscore", "none"]
        where = f"{path}.method" if path else "method"
        if kind == "union_tag_not_found":
            return where, f"required key missing (one of {', '.join(allowed)})"
        tag = str(ctx.get("tag"))
        return where, f"{short(tag)} is not allowed: use one of {', '.join(allowed)}{did_you_mean(tag, allowed)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"must be a mapping of keys, got {short(value)}"
    if kind == "value_error":
        return path, str(ctx.get("error", err["msg"]))
    message = err["msg"][:1].lower() + err["msg"][1:]
    if value is None or isinstance(value, (str, int, float, bool)):
        message += f" (got {shown(value)})"
    return path, message


def format_problems(exc: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """(yaml path, message) of every problem of a validation of `root` (the whole plate.yaml)."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, CrossProblems):
            out.extend(error.problems)
        else:
            out.append(_describe(err, root))
    return out


def with_origin(path: str, message: str, origins: Mapping[str, str]) -> str:
    """`<path>: <message>`, with the override it came from (`[from --set ...]`) when one set it."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:n]))
        if origin:
            return f"{path}: {message} [from {origin}]"
    below = [o for key, o in origins.items() if key.startswith(path + ".")] if path else []
    if below:
        return f"{path}: {message} [from {', '.join(below)}]"
    return f"{path}: {message}" if path else message
