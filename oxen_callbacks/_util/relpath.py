"""Validation of repository-relative paths: nothing may escape a repository."""

from __future__ import annotations

import os
import posixpath
from pathlib import PurePosixPath

from ..errors import ConfigurationError


def safe_relpath(path: str, *, what: str = "path") -> str:
    """Normalize ``path`` to a POSIX path relative to a repository root.

    Raises :class:`ConfigurationError` for absolute paths and paths with ``..``.

    >>> safe_relpath("data//train.csv")
    'data/train.csv'
    >>> safe_relpath("./")
    '.'
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigurationError(f"Invalid {what} {path!r}: expected a non-empty string.")
    text = path.replace("\\", "/") if os.sep == "\\" else path  # (on POSIX a backslash is part of a name)
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ConfigurationError(
            f"Invalid {what} {path!r}: it is absolute.",
            "give paths relative to the repository root, e.g. 'train.csv' or 'images/'.",
        )
    if ".." in PurePosixPath(text).parts:
        raise ConfigurationError(
            f"Invalid {what} {path!r}: '..' would leave the repository.",
            "give paths relative to the repository root, without '..'.",
        )
    return posixpath.normpath(text)


def covers(parent: str, child: str) -> bool:
    """True when repository path ``parent`` is ``child`` or one of its folders."""
    return parent == "." or child == parent or child.startswith(parent.rstrip("/") + "/")


def ancestors(path: str) -> list[str]:
    """Every normalized path that :func:`covers` ``path``: ``"."``, its folders, itself."""
    if path == ".":
        return ["."]
    parts = path.split("/")
    return [".", *("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))]


def covered(path: str, paths: set[str] | dict[str, object]) -> bool:
    """Whether one of ``paths`` covers ``path`` (a set test per folder: no walk over ``paths``)."""
    return any(a in paths for a in ancestors(path))
