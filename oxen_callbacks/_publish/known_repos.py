"""Which model repositories this machine has published to, so ``oxen-callbacks sync`` finds their queues."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._oxen import layout as oxen_layout


def register_model_repo(cache_dir: Path, repo: Path) -> None:
    folder = cache_dir / "model-repos"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{hashlib.sha1(str(repo).encode()).hexdigest()[:16]}.json"
    if not entry.exists():
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(repo)}))
        os.replace(tmp, entry)


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
