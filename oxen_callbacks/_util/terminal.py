"""Text from records, tags and stores, made safe to show on a terminal.

Lineage records, MLflow tags and deployment records are written by whoever can write the
repository or the tracking store. Printed raw, an escape sequence, a carriage return or a
bidirectional override in one of them could rewrite what the terminal shows (spoof the commit a
model names). Such characters are shown as Python escapes (``\\x1b``) instead.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls but tab and newline, DEL, C1 controls, bidirectional marks, overrides and isolates,
# line and paragraph separators, lone surrogates (JSON can hold them; no terminal encoding can)
_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_IN_TEXT = re.compile(f"[{_CONTROL}]")
_UNSAFE_IN_VALUE = re.compile(f"[\t\n{_CONTROL}]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: str) -> str:
    """``text`` with control characters escaped; its newlines and tabs are kept (our own messages)."""
    return _UNSAFE_IN_TEXT.sub(_escape, text)


#: How deep :func:`printable_value` shows nested lists and dicts (a hostile record nests thousands).
_SHOWN_DEPTH = 40
NESTED_TOO_DEEPLY = "(nested too deeply to show)"


def printable_value(value: Any, _depth: int = 0) -> Any:
    """``value`` (a result's strings, in lists and dicts, keys too) with every control character,
    newlines and tabs included, escaped: one value never shows as two lines."""
    if isinstance(value, str):
        return _UNSAFE_IN_VALUE.sub(_escape, value)
    if isinstance(value, (dict, list, tuple)) and _depth >= _SHOWN_DEPTH:
        return NESTED_TOO_DEEPLY
    if isinstance(value, dict):
        return {printable_value(k, _depth + 1): printable_value(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_value(v, _depth + 1) for v in value]
    return value
