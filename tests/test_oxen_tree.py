"""Pinning by copying from Oxen's content store, and the ``oxen restore`` fallback: same snapshots."""

from __future__ import annotations

import logging
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import AUTHOR, folder_contents, make_repo, store_elsewhere, tree_state

from oxen_callbacks import PinnedDataset
from oxen_callbacks._data.local import LocalSource, copy_from_store
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen import layout as oxen_layout
from oxen_callbacks._oxen import tree as oxen_tree
from oxen_callbacks.errors import ConfigurationError

BIG = 64 << 20  # the size from which files are copied chunk by chunk, with progress
WARNING = "using `oxen restore` instead"


def history() -> list[tuple[str, dict[str, str | bytes]]]:
    """Commit contents with nested folders, an empty file, a big file; a modified, a removed file."""
    rng = random.Random(0)
    big = rng.randbytes(1 << 20) * (BIG >> 20) + b"tail"
    return [
        ("one", {"a.txt": "a", "empty": b"", "d/e/f/deep.bin": rng.randbytes(5000), "d/top.csv": "x\n1\n",
                 "x/y/only.txt": "only", "big.bin": big, "gone.txt": "soon gone"}),
        ("two", {"a.txt": "a changed", "new/n.txt": "new"}),
    ]


def build(path: Path, *, versions_path: Path | None = None) -> tuple[Path, list[str]]:
    """A repository with :func:`history`; the second commit also removes two files."""
    path.mkdir(parents=True)
    oxen_child.init_repo(path)
    if versions_path:
        store_elsewhere(path, versions_path)
    first, second = history()
    repo = make_repo(path, [first])
    for rel in ("gone.txt", "x/y/only.txt"):
        (path / rel).unlink()
    remove(path, ["gone.txt", "x/y/only.txt"])
    for rel, content in second[1].items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(content.encode() if isinstance(content, str) else content)
    repo.commits.append(oxen_child.commit_paths(path, list(second[1]), second[0], author=AUTHOR))
    return repo.path, repo.commits


def remove(repo: Path, rels: list[str]) -> None:
    """``oxen rm`` in a child process (the removal is committed by the next commit)."""
    code = "import sys; from oxen_callbacks._oxen.repo import LocalRepo; r = LocalRepo(sys.argv[1]); " \
           "[r.rm(p) for p in sys.argv[2:]]"
    subprocess.run([sys.executable, "-c", code, str(repo), *rels], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """The same history twice: default content store (fast path) and a custom one (restore fallback)."""
    root = tmp_path_factory.mktemp("tree")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OXEN_CONFIG_DIR", str(root / "oxen-config"))
        mp.setenv("OXEN_CALLBACKS_CACHE", str(root / "cache"))
        fast = build(root / "fast")
        slow = build(root / "slow", versions_path=root / "elsewhere")
    return {"fast": fast, "slow": slow}


PATH_SETS = [["."], ["d", "a.txt"], ["x"], ["big.bin", "empty", "d/e/f/deep.bin"]]


def listing(repo: Path, commit: str) -> dict[str, tuple[list[str], list[tuple[str, int, int]]]]:
    """The folders and files (path, hash, size) :func:`oxen_tree.files_at` reads for the whole commit."""
    return {rel: (sub.dirs, [(f.path, f.hash, f.size) for f in sub.files])
            for rel, sub in oxen_tree.files_at(repo, commit, ["."]).items()}


@pytest.mark.parametrize("paths", PATH_SETS, ids=lambda p: "+".join(p))
def test_fast_path_and_fallback_give_identical_snapshots(repos, paths, caplog):
    fast_repo, fast_commits = repos["fast"]
    slow_repo, slow_commits = repos["slow"]
    with pytest.raises(oxen_tree.UnsupportedLayout, match="versions_path"):
        copy_from_store(slow_repo, slow_commits[0], ["."], Path("/nonexistent"))
    # the tree reads the same wherever the versions are kept
    assert listing(fast_repo, fast_commits[0]) == listing(slow_repo, slow_commits[0])
    for fast_commit, slow_commit in zip(fast_commits, slow_commits, strict=True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
            fast = PinnedDataset(fast_repo, revision=fast_commit, paths=paths)
            slow = PinnedDataset(slow_repo, revision=slow_commit, paths=paths)
            assert folder_contents(fast.path) == folder_contents(slow.path)
        warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
        assert len(warnings) == 1 and f"{slow_repo}@{slow_commit}" in warnings[0], warnings
        fast.verify()
        slow.verify()


def test_what_each_commit_holds(repos, tmp_path):
    repo, (first, second) = repos["fast"]
    dirs, files = folder_contents(PinnedDataset(repo, revision=first, cache_dir=tmp_path / "c").path)
    assert {"x/y", "d/e/f"} <= dirs and files["empty"] == b"" and len(files["big.bin"]) == BIG + 4
    assert files["a.txt"] == b"a" and "gone.txt" in files
    dirs, files = folder_contents(PinnedDataset(repo, revision=second, cache_dir=tmp_path / "c").path)
    assert files["a.txt"] == b"a changed" and files["new/n.txt"] == b"new"
    assert "gone.txt" not in files and "x/y" in dirs and not any(f.startswith("x/") for f in files)


def test_fast_path_equals_oxen_restore_of_the_same_commit(repos, tmp_path):
    repo, commits = repos["fast"]
    for i, commit in enumerate(commits):
        copied, restored = tmp_path / f"copied{i}", tmp_path / f"restored{i}"
        copied.mkdir()
        copy_from_store(repo, commit, ["."], copied)
        oxen_child.materialize(repo, commit, ["."], restored)
        assert folder_contents(copied) == folder_contents(restored)


def test_pin_leaves_the_users_repository_alone(repos):
    repo, commits = repos["fast"]
    branches = oxen_child.branches(repo)
    state = tree_state(repo)
    oxen_files = _oxen_files(repo)
    PinnedDataset(repo, revision=commits[0]).pull()
    assert tree_state(repo) == state and _oxen_files(repo) == oxen_files  # no lock or temp file either
    assert oxen_layout.head_ref(repo) == "main" and oxen_child.branches(repo) == branches
    # nothing of the repository is still open or mapped in this process
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _is_link(fd)]
    assert not [h for h in held if str(repo) in h]
    assert str(repo) not in Path("/proc/self/maps").read_text()


def _oxen_files(repo: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(repo)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (repo / ".oxen").rglob("*") if p.is_file())


def _is_link(fd: str) -> bool:
    return os.path.islink(f"/proc/self/fd/{fd}")


def test_snapshot_files_are_copies_not_links_into_the_content_store(repos):
    repo, commits = repos["fast"]
    pinned = PinnedDataset(repo, revision=commits[1], paths=["a.txt", "big.bin"])
    for rel in ("a.txt", "big.bin"):
        path = pinned.file(rel)
        entry = oxen_tree.files_at(repo, commits[1], [rel])[rel].files[0]
        stored = oxen_layout.version_path(repo, entry.hash)
        assert stored.stat().st_nlink == 1 and path.stat().st_ino != stored.stat().st_ino  # (the pin's view links the snapshot's)
        assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        assert path.stat().st_size == entry.size == stored.stat().st_size
    path = pinned.file("a.txt")
    os.chmod(path, 0o644)
    path.write_text("a user scribbling on the snapshot")
    entry = oxen_tree.files_at(repo, commits[1], ["a.txt"])["a.txt"].files[0]
    assert oxen_layout.version_path(repo, entry.hash).read_bytes() == b"a changed"


def test_path_not_in_commit_is_a_configuration_error_without_fallback(repos, caplog):
    repo, commits = repos["fast"]
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        with pytest.raises(ConfigurationError, match=r"Path 'gone.txt' is not in commit"):
            PinnedDataset(repo, revision=commits[1], paths=["gone.txt"]).pull()
        with pytest.raises(ConfigurationError, match=r"Path 'a.txt/b' is not in commit"):
            PinnedDataset(repo, revision=commits[1], paths=["a.txt/b"]).pull()
    assert not [r for r in caplog.records if WARNING in r.getMessage()]


def test_missing_stored_file_falls_back_to_restore_which_names_it(tmp_path, caplog):
    repo = make_repo(tmp_path / "data", [("one", {"a.txt": "hello", "b.txt": "bbb"})])
    entry = oxen_tree.files_at(repo.path, repo.head, ["a.txt"])["a.txt"].files[0]
    oxen_layout.version_path(repo.path, entry.hash).unlink()
    dest = tmp_path / "dest"
    dest.mkdir()
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"), \
            pytest.raises(ConfigurationError, match="looks damaged.*version-store data missing"):
        LocalSource(repo.path).materialize(repo.head, ["."], dest)
    assert len([r for r in caplog.records if WARNING in r.getMessage() and "a.txt" in r.getMessage()]) == 1


GLOB_NAMED = {"data[1].csv": "the file named", "data1.csv": "another", "q?.txt": "the question", "qa.txt": "qa",
              "d[x]/f{1,2}.txt": "braces", "d[x]/f1.txt": "f1", "d[x]/a\\b.txt": "backslash", "d[x]/ab.txt": "ab",
              "dx/f.txt": "dx", "plain/s*.txt": "star", "plain/sx.txt": "sx"}


@pytest.mark.parametrize("paths", [["data[1].csv", "q?.txt", "plain/s*.txt"], ["d[x]"], ["d[x]/f{1,2}.txt"],
                                   ["d[x]/a\\b.txt"]],
                         ids=lambda p: "+".join(p))
def test_names_oxen_reads_as_glob_patterns_pin_those_files_alone_through_the_fallback(tmp_path, paths, caplog):
    """Oxen's restore takes ``data[1].csv`` for a pattern: unescaped, the fallback restored ``data1.csv`` (a
    misleading "not in the commit") and ``q?.txt`` brought ``qa.txt`` into the snapshot too."""
    fast = make_repo(tmp_path / "fast", [])
    slow = make_repo(tmp_path / "slow", []).path
    store_elsewhere(slow, tmp_path / "elsewhere")
    for repo in (fast.path, slow):
        for rel, content in GLOB_NAMED.items():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_text(content)
    commits = [oxen_child.commit_paths(repo, ["."], "glob-named files", author=AUTHOR) for repo in (fast.path, slow)]
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        snapshots = [PinnedDataset(repo, revision=commit, paths=paths, cache_dir=tmp_path / f"cache{i}").path
                     for i, (repo, commit) in enumerate(zip((fast.path, slow), commits, strict=True))]
    assert len([r for r in caplog.records if WARNING in r.getMessage()]) == 1  # the second went through restore
    wanted = {rel: content.encode() for rel, content in GLOB_NAMED.items()
              if any(rel == p or rel.startswith(p + "/") for p in paths)}
    for snapshot in snapshots:
        assert folder_contents(snapshot)[1] == wanted


def test_a_damaged_version_in_a_content_store_elsewhere_is_refused_not_pinned(tmp_path, caplog):
    """``oxen restore`` checks no hash: the fallback now compares what it wrote with the commit's tree
    (readable wherever the versions are). Before, an edited stored file became the snapshot, and even
    ``verify(deep=True)`` passed (the tree check gave up on such a repository)."""
    repo = make_repo(tmp_path / "data", []).path
    store_elsewhere(repo, tmp_path / "elsewhere")
    (repo / "train.csv").write_text("x,y\n0,0\n")
    commit = oxen_child.commit_paths(repo, ["train.csv"], "one", author=AUTHOR)
    stored = [p for p in (tmp_path / "elsewhere").rglob("*") if p.is_file() and p.read_bytes() == b"x,y\n0,0\n"]
    assert len(stored) == 1
    os.chmod(stored[0], 0o644)
    stored[0].write_bytes(b"x,y\n6,6\n")  # the same size
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"), \
            pytest.raises(ConfigurationError, match=r"looks damaged.*not those commit .* records for 'train.csv'"):
        PinnedDataset(repo, revision=commit, paths=["train.csv"], cache_dir=tmp_path / "cache").pull()
    assert [r for r in caplog.records if WARNING in r.getMessage()]  # it went through the fallback
    assert not list((tmp_path / "cache").rglob("train.csv"))


def test_a_truncated_tree_of_a_content_store_elsewhere_is_named_not_a_crash(tmp_path):
    """The restore child now reads the tree too (to check what it wrote): lmdb's SIGBUS on a truncated
    node store kills that child, never the training process, and the error names the repository."""
    repo = make_repo(tmp_path / "data", []).path
    store_elsewhere(repo, tmp_path / "elsewhere")
    (repo / "a.txt").write_text("hello")
    commit = oxen_child.commit_paths(repo, ["a.txt"], "one", author=AUTHOR)
    os.truncate(oxen_layout.oxen_dir(repo) / oxen_layout.NODE_STORE, 3 * 4096)
    with pytest.raises(ConfigurationError, match=rf"'{repo}' looks damaged: .*crashed \(SIGBUS\)"):
        PinnedDataset(repo, revision=commit, paths=["a.txt"], cache_dir=tmp_path / "cache").pull()
