"""Oxen commit ids: the unpadded lowercase hex of a 128-bit hash (31 or 32 characters, rarely fewer).

A commit id names folders of the snapshot cache and is read back from lineage records,
MLflow tags and remote servers: anything else in its place (a path, ``"main"``) is refused.
"""

from __future__ import annotations

import re

from ..errors import ConfigurationError

_COMMIT_ID = re.compile(r"[0-9a-f]{1,32}")
#: A full id has 32 digits, or 31 when its hash starts with a zero nibble.
FULL_COMMIT_ID_LEN = 32


def is_commit_like(text: str) -> bool:
    """Whether user input could be a commit id or a unique prefix of one (4 to 32 hex digits)."""
    return 4 <= len(text) <= FULL_COMMIT_ID_LEN and all(c in "0123456789abcdefABCDEF" for c in text)


def is_commit_id(text: object) -> bool:
    return isinstance(text, str) and _COMMIT_ID.fullmatch(text) is not None


def checked_commit_id(text: object, *, what: str) -> str:
    """``text`` if it is a commit id, else a :class:`ConfigurationError` naming ``what`` gave it."""
    if not is_commit_id(text):
        raise ConfigurationError(f"{what} gave {str(text)[:80]!r}, which is not an Oxen commit id "
                                 "(up to 32 lowercase hex digits).",
                                 "check where it comes from: a commit id is never a branch name or a path.")
    return str(text)
