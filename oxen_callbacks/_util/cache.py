"""Where this library keeps its per-machine cache (snapshots, locks, worker state)."""

from __future__ import annotations

import os
from pathlib import Path

from ..names import ENV_CACHE, ENV_XDG_CACHE_HOME


def default_cache_dir() -> Path:
    """``$OXEN_CALLBACKS_CACHE``, else ``$XDG_CACHE_HOME/oxen-callbacks``, else ``~/.cache/oxen-callbacks``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get(ENV_XDG_CACHE_HOME) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "oxen-callbacks"
