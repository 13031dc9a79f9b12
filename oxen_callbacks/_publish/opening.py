"""Open (or create) the model repository at fit start, and refuse before a step one that no commit
could write."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .._oxen import child as oxen_child
from .._oxen import layout as oxen_layout
from .._oxen.repo import LocalRepo
from .._util.locks import FileLock
from ..errors import ConfigurationError


def open_model_repo(path: str | os.PathLike[str], cache_dir: Path) -> LocalRepo:
    """Open the model repository, creating it (``oxen init``) when missing or empty."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ConfigurationError(f"The model repository {str(path)!r} is a file.", "pass a folder path.")
    key = hashlib.sha1(str(target).encode()).hexdigest()[:16]
    try:
        with FileLock(cache_dir / "locks" / f"init-{key}.lock", timeout=120):
            if target.is_dir() and any(target.iterdir()) and not oxen_layout.oxen_dir(target).exists():
                raise ConfigurationError(
                    f"The model repository {str(path)!r} is a non-empty folder that is not an Oxen repository.",
                    "pass a new or empty folder (it becomes an Oxen repository), or make it one first (in Python: `oxen.init(path)`).",
                )
            oxen_layout.init(target)
            repo = LocalRepo(target, role="model repository")
            # HEAD's own faults, before any step (the worker checks the branch exists); branches are
            # listed (a child process) only for a missing or empty HEAD: a first commit cut short
            repo.commit_branch(lambda: oxen_child.branches(target), check_name=False)
    except PermissionError as exc:
        raise ConfigurationError(
            f"Cannot create the model repository {str(path)!r}: {exc.strerror}.", "pass a writable folder."
        ) from None
    _check_writable(repo)
    return repo


def _check_writable(repo: LocalRepo) -> None:
    """Write a file where the worker writes (the working tree, ``.oxen``, its content store), so a
    read-only place stops the fit before a step rather than every commit after it."""
    root = oxen_layout.oxen_dir(repo.path)
    stores = [root / "versions", oxen_layout.versions_root(repo.path)]
    try:
        elsewhere = (oxen_layout.content_store(repo.path) or {}).get("versions_path")
    except (OSError, oxen_layout.DamagedLayout):
        elsewhere = None  # (its first commit names what is wrong)
    if isinstance(elsewhere, str):
        stores.append(repo.path / elsewhere)  # (an absolute one as it is)
    places = [repo.path, root, *(p for p in stores if p.exists())]
    for place in places:
        try:
            handle, probe = tempfile.mkstemp(dir=place, prefix=".oxcb-probe-")  # (unique: fits may start together)
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigurationError(
                f"The model repository {str(repo.path)!r} cannot be written: {place} "
                f"({exc.strerror or exc}).",
                "make it writable for this user (every commit writes there), or pass another model_repo.",
            ) from None
