"""Which model repositories this machine has published to, so ``oxen-callbacks sync`` finds their queues."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._oxen import layout as oxen_layout
from .._util.fs import write_json_atomically


def register_model_repo(cache_dir: Path, repo: Path) -> None:
    folder = cache_dir / "model-repos"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{hashlib.sha1(str(repo).encode()).hexdigest()[:16]}.json"
    if not entry.exists():
        write_json_atomically(entry, {"path": str(repo)})


def registered_model_repos(cache_dir: Path) -> list[Path]:
    folder = cache_dir / "model-repos"
    if not folder.is_dir():
        return []
    repos = []
    for entry in sorted(folder.glob("*.json")):
        path = Path(json.loads(entry.read_text())["path"])
        if oxen_layout.oxen_dir(path).is_dir():
            repos.append(path)
    return repos
