"""``oxen-callbacks verify``: every snapshot of a cache and the pins' views of it, every byte checked."""

from __future__ import annotations

import os
from pathlib import Path

from .snapshot import cached_snapshots
from .views import cached_view_problems


def verify_cache(cache_dir: str | os.PathLike[str]) -> dict[str, object]:
    """Deep-check every cached snapshot (:meth:`SnapshotStore.check`) and the pins' views of it (a file
    replaced in a view is read by later pins); ``damaged`` counts those with problems."""
    snapshots = []
    for store, commit in cached_snapshots(cache_dir):
        manifest = store.manifest(commit)
        problems = store.check(commit, deep=True) or cached_view_problems(store, commit)
        snapshots.append({"folder": str(store.folder(commit)), "commit": commit, "files": manifest.files,
                          "bytes": manifest.bytes, "problems": problems})
    return {"cache_dir": str(Path(cache_dir).expanduser()), "snapshots": snapshots,
            "damaged": sum(1 for s in snapshots if s["problems"])}
