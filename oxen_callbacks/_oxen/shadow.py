"""Work on a repository through a shadow working tree, never opening the user's own.

A shadow is a scratch folder whose ``.oxen`` copies the repository's metadata and
links its content store (see :func:`oxen_callbacks._oxen.layout.make_shadow`), with
its own detached HEAD. Run each of these in a child process
(:mod:`oxen_callbacks._oxen.child`): oxenai keeps the databases it opened locked for
the rest of the process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .._util.fs import remove_tree
from .._util.materialized import content_hash, file_digest
from .._util.progress import show_progress
from ..errors import OxenError
from . import layout as oxen_layout
from .repo import call_oxen, open_oxenai
from .tree import PathNotInCommit, UnreadableTree, files_at, path_not_in_commit


def restore_into(repo_path: str | os.PathLike[str], commit: str, paths: list[str], dest: str | os.PathLike[str]) -> None:
    """Write ``paths`` of ``commit`` under ``dest`` through a shadow working tree made in ``dest``.

    Oxen restores the commit's bytes into the shadow; the user's tree, HEAD and
    branches are never touched. Runs in the child process of
    :func:`oxen_callbacks._oxen.child.materialize`.

    Raises:
        ConfigurationError: a path is not in the commit.
        OxenError: ``oxen restore`` failed otherwise.
    """
    from tqdm.auto import tqdm

    repo_path, dest = Path(repo_path), Path(dest)
    oxen_layout.make_shadow(repo_path, dest, commit)
    shadow = open_oxenai(dest)
    try:
        for rel in tqdm(paths, desc=f"pin {repo_path.name}@{commit[:10]}", unit="path", disable=not show_progress()):
            try:
                call_oxen(shadow.restore, oxen_layout.pattern_of(rel), False, commit, what=f"read {rel!r} at {commit}")
            except OxenError as exc:
                if "not found" not in str(exc).lower():
                    raise
                raise path_not_in_commit(rel, commit, str(repo_path)) from None
            if not (dest / rel).exists():
                raise path_not_in_commit(rel, commit, str(repo_path))
    finally:
        remove_tree(oxen_layout.oxen_dir(dest))
    _check_restored(repo_path, commit, paths, dest)


def _check_restored(repo_path: Path, commit: str, paths: list[str], dest: Path) -> None:
    """Compare what ``oxen restore`` wrote (it checks no hash) with the commit's tree, where the tree
    can be read (a content store kept elsewhere): a damaged stored file must not become the snapshot.

    Raises:
        OxenError: a file differs from the tree's record, is missing, or is not in it.
    """
    try:
        found = files_at(repo_path, commit, paths)
    except (UnreadableTree, PathNotInCommit):
        return  # nothing to compare with: the restore's own checks stand
    expected = {f.path: content_hash(f.hash) for subtree in found.values() for f in subtree.files}
    written = {str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir()}
    wrong = sorted(written ^ expected.keys()) + sorted(
        rel for rel in written & expected.keys() if content_hash(file_digest(dest / rel)) != expected[rel])
    if wrong:
        raise OxenError(f"the bytes it restored are not those commit {commit} records for "
                        f"{', '.join(map(repr, wrong[:5]))}" + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))


def move_branch(repo_path: str | os.PathLike[str], name: str, commit: str) -> str | None:
    """Point branch ``name`` at ``commit``; returns its previous commit. Run it in a child process
    (:func:`oxen_callbacks._oxen.child.run_in_child`): oxenai keeps the branch database locked.

    oxenai cannot move a branch, only create one at HEAD (``checkout(name, create=True)``)
    or delete one that HEAD contains. Both run in a shadow working tree whose ``.oxen``
    links the real branch database (``refs``) and has its own, detached HEAD: set to
    the old commit for the delete, to ``commit`` for the create. The user's working
    tree, HEAD and staging area are never opened.
    """
    with tempfile.TemporaryDirectory(prefix="oxen-callbacks-branch-") as tmp:
        shadow = oxen_layout.make_shadow(repo_path, Path(tmp) / "shadow", commit, linked=("versions", "refs"))
        repo = open_oxenai(shadow)

        def heads() -> dict[str, str]:
            return {b.name: b.commit_id for b in call_oxen(repo.list_branches, what=f"list branches of {repo_path}")}

        previous = heads().get(name)
        if previous == commit:
            return previous
        if previous is not None:
            oxen_layout.detach_head(shadow, previous)
            call_oxen(repo.branch, name, True, what=f"delete branch {name!r}")
            oxen_layout.detach_head(shadow, commit)
        call_oxen(repo.checkout, name, True, what=f"create branch {name!r} at {commit}")
        if heads().get(name) != commit:
            raise OxenError(f"Branch {name!r} of {repo_path} did not move to {commit}.")
    return previous
