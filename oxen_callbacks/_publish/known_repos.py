"""Which model repositories this machine has published to, so ``oxen-callbacks sync`` finds their queues."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .._oxen import layout as oxen_layout
from .._util.fs import DamagedFile, read_json_object, write_json_atomically

log = logging.getLogger(__name__)


def register_model_repo(cache_dir: Path, repo: Path) -> None:
    folder = cache_dir / "model-repos"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{hashlib.sha1(str(repo).encode()).hexdigest()[:16]}.json"
    if _entry_path(entry) is None:  # missing or damaged
        write_json_atomically(entry, {"path": str(repo)})


def _entry_path(entry: Path) -> Path | None:
    """The repository a registration file names; ``None`` when it is missing or damaged."""
    try:
        path = read_json_object(entry).get("path")
    except (FileNotFoundError, DamagedFile):
        return None
    return Path(path) if isinstance(path, str) and path else None


def registered_model_repos(cache_dir: Path) -> list[Path]:
    folder = cache_dir / "model-repos"
    if not folder.is_dir():
        return []
    repos = []
    for entry in sorted(folder.glob("*.json")):
        path = _entry_path(entry)
        if path is None:  # (written again by the repository's next training run)
            log.warning("Skipping %s: not a model repository registration (damaged?)", entry)
        elif oxen_layout.is_repo(path):
            repos.append(path)
    return repos
