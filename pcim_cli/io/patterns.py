"""`plate.pattern` (and plate.objects' label patterns): file-name templates as regular expressions.

Torch- and numpy-free, so config/ checks a pattern while reading plate.yaml.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pcim_cli.errors import ConfigError

__all__ = ["PATTERN_TOKENS", "compile_pattern"]

PATTERN_TOKENS = ("well", "row", "col", "field", "channel")
_TOKEN_RE = re.compile(r"\{([^{}]*)\}|\*")
_FIXED_GROUPS = {
    "well": r"[A-Za-z]{1,2}\d{1,3}",
    "row": r"[A-Za-z]{1,2}",
    "col": r"\d{1,3}",
    "field": r"\d+",
}


def compile_pattern(pattern: str, channel_tokens: Sequence[str] | None = None) -> re.Pattern[str]:
    """Turn a `plate.pattern` into a case-insensitive regex with named groups.

    `{channel}` matches only the given tokens (longest first) when `channel_tokens` is given, else
    any text. Raises ConfigError (a ValueError) for unknown or repeated placeholders, and when the
    pattern names no well (`{well}`, or `{row}` and `{col}`).
    """
    parts: list[str] = []
    seen: set[str] = set()
    pos = 0
    for match in _TOKEN_RE.finditer(pattern):
        parts.append(re.escape(pattern[pos : match.start()]))
        pos = match.end()
        if match.group(0) == "*":
            parts.append(r"[^/]*?")
            continue
        name = match.group(1)
        if name not in PATTERN_TOKENS:
            allowed = ", ".join("{" + t + "}" for t in PATTERN_TOKENS)
            raise ConfigError(f"unknown placeholder {{{name}}} in pattern {pattern!r} (use {allowed} or *)")
        if name in seen:
            raise ConfigError(f"placeholder {{{name}}} appears twice in pattern {pattern!r}")
        seen.add(name)
        if name == "channel":
            if channel_tokens:
                alternatives = "|".join(re.escape(t) for t in sorted(channel_tokens, key=len, reverse=True))
                parts.append(f"(?P<channel>{alternatives})")
            else:
                parts.append(r"(?P<channel>[^/]+?)")
        else:
            parts.append(f"(?P<{name}>{_FIXED_GROUPS[name]})")
    parts.append(re.escape(pattern[pos:]))
    if "well" in seen and seen & {"row", "col"}:
        raise ConfigError(f"pattern {pattern!r} has {{well}} and {{row}}/{{col}}: use one or the other")
    if "well" not in seen and not {"row", "col"} <= seen:
        raise ConfigError(f"pattern {pattern!r} names no well: it needs {{well}}, or {{row}} and {{col}}")
    return re.compile("".join(parts), re.IGNORECASE)
