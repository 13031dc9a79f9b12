"""Where this library keeps its per-machine cache (snapshots, locks, worker state)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$OXEN_CALLBACKS_CACHE``, else ``$XDG_CACHE_HOME/oxen-callbacks``, else ``~/.cache/oxen-callbacks``."""
    if os.environ.get("OXEN_CALLBACKS_CACHE"):
        return Path(os.environ["OXEN_CALLBACKS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "oxen-callbacks"
