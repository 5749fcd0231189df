"""Reading plate.yaml and override values: plain scalars as the text they are written as, bounded size.

Every plain scalar is text, except ``null``, ``~`` and an empty value (null): the pydantic models of
config.py parse numbers and booleans from it, in decimal. So a plate barcode ``0012345`` stays
``0012345`` (YAML 1.1 reads the octal number 5349), ``classes: [no, yes]`` stays two class names (not
false / true), ``01:00:00`` stays a Slurm time limit (not 3600) and ``steps: 010`` is ten. Merge keys
(``<<: *defaults``) work; duplicate keys are errors (PyYAML would keep the last silently).

Hostile files end in one short error: a document that anchors and aliases expand past ``MAX_VALUES``
values (an "alias bomb": a few hundred bytes that stand for 9^7 values) is refused after composing its
node graph, before any value is built or printed; nesting deeper than ``MAX_DEPTH`` is refused while
composing, before Python's stack runs out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pcim_cli.errors import ConfigError, short

#: a plate.yaml has a few hundred values; far more means aliases expanding on themselves (an "alias bomb")
MAX_VALUES = 100_000
#: plate.yaml nests four levels; far deeper is not a configuration (and would exhaust Python's stack)
MAX_DEPTH = 32


class _TextResolver(yaml.resolver.BaseResolver):
    """Every plain scalar is text, except null; merge keys (``<<: *defaults``) work as in YAML 1.1."""


_TextResolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_TextResolver.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


class _TooBig(yaml.composer.ComposerError):
    """The document nests too deeply or expands to too many values."""


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
              yaml.constructor.SafeConstructor, _TextResolver):
    """A safe loader with plain scalars as text, no duplicate keys, and bounded depth and size."""

    def __init__(self, stream: Any) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _TextResolver.__init__(self)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(None, None, f"values nested more than {MAX_DEPTH} levels deep; a plate.yaml "
                              "needs four", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_VALUES:
            raise _TooBig(None, None, f"anchors and aliases (&name / *name) expand this document to more than "
                          f"{MAX_VALUES} values; write the values out, or repeat fewer aliases", node.start_mark)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found duplicate key {short(key_node.value)}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values the node stands for once every alias is expanded (capped just above MAX_VALUES)."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total = min(MAX_VALUES + 1, total + _expanded_size(child, memo))
    memo[id(node)] = total
    return total


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    what = "YAML" if isinstance(exc, _TooBig) else "YAML syntax error"
    if mark is not None:
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"


def read_yaml(path: Path) -> Any:
    """The YAML document in `path` (plain scalars as text); ConfigError naming the file for any problem."""
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"configuration file {path} is not a file")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_Loader)  # safe: SafeConstructor, no Python objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_error(exc)}") from None
    except RecursionError:  # a safety net: compose_node stops at MAX_DEPTH first
        raise ConfigError(f"{path}: values nested too deeply; a plate.yaml needs four levels") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None


def parse_value(text: str, origin: str) -> Any:
    """An override's value (`--set`, `PCIM_*`): YAML when it parses, else the text itself."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _TooBig as exc:
        raise ConfigError(f"{origin}: {exc.problem}") from None
    except yaml.YAMLError:
        return text
