"""Guards of what oxen_callbacks/oxen_layout.py assumes about Oxen's private on-disk layout.

If one of these fails after an oxenai upgrade, the layout changed: fix oxen_layout.py
before widening the oxenai range in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import os

from helpers import make_repo

from oxen_callbacks import oxen_child, oxen_layout


def test_installed_oxenai_is_in_the_supported_range():
    version = tuple(int(x) for x in importlib.metadata.version("oxenai").split(".")[:2])
    assert (0, 65) <= version < (0, 66)


def test_repo_markers_head_and_history(tmp_path):
    repo = make_repo(tmp_path / "r", [("one", {"a.txt": "1"}), ("two", {"a.txt": "2"})])
    assert oxen_layout.is_repo(repo.path)
    assert (repo.path / ".oxen" / "config.toml").is_file()
    assert oxen_layout.head_ref(repo.path) == "main"
    # every commit has a history folder named by its (unpadded) id: resolution relies on it
    assert sorted(oxen_layout.commit_ids(repo.path)) == sorted(repo.commits)
    assert [c["id"] for c in oxen_child.log(repo.path)] == list(reversed(repo.commits))
    assert oxen_layout.find_repo_root(repo.path / "sub" / "x") == repo.path
    assert (repo.path / ".oxen" / "versions").is_dir()


def test_shadow_restores_an_old_commit_without_touching_the_original(tmp_path):
    repo = make_repo(tmp_path / "r", [("one", {"d/a.txt": "old"}), ("two", {"d/a.txt": "new"})])
    head_before = (repo.path / ".oxen" / "HEAD").read_text()
    shadow = tmp_path / "shadow"
    oxen_layout.make_shadow(repo.path, shadow, repo.commits[0])
    assert os.path.islink(shadow / ".oxen" / "versions")
    assert not (shadow / ".oxen" / "staged").exists()
    assert (shadow / ".oxen" / "HEAD").read_text() == repo.commits[0]
    dest = tmp_path / "dest"
    oxen_child.materialize(repo.path, repo.commits[0], ["d"], dest)  # make_shadow + oxen restore, in a child
    assert (dest / "d" / "a.txt").read_text() == "old"
    assert not (dest / ".oxen").exists()
    assert (repo.path / "d" / "a.txt").read_text() == "new"
    assert (repo.path / ".oxen" / "HEAD").read_text() == head_before
    assert oxen_child.branches(repo.path) == {"main": repo.commits[1]}


def test_orphan_temp_files_are_found_by_their_infix(tmp_path):
    repo = make_repo(tmp_path / "r", [("one", {"a.txt": "1"})])
    stored = [p for p in (repo.path / ".oxen" / "versions").rglob("data") if p.is_file()]
    assert [p.read_bytes() for p in stored] == [b"1"]  # content-addressed full copies named 'data'
    orphan = stored[0].parent / "data.oxentmp.abc123"
    orphan.write_bytes(b"partial")
    os.utime(orphan, (0, 0))
    assert oxen_layout.orphan_temp_files(repo.path) == [orphan]
    assert oxen_layout.orphan_temp_files(repo.path, older_than_s=10**12) == []
