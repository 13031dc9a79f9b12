"""Guards of what oxen_callbacks/_oxen/layout.py assumes about Oxen's private on-disk layout.

If one of these fails after an oxenai upgrade, the layout changed: fix oxen_layout.py
(or oxen_tree.py, the merkle tree reader) before widening the oxenai range in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import AUTHOR, folder_contents, make_repo

from oxen_callbacks._data.local import copy_from_store
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen import layout as oxen_layout
from oxen_callbacks._oxen import tree as oxen_tree


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
    # what fit start and every commit ask instead, in one lookup however long the history
    assert oxen_layout.has_commits(repo.path) and all(oxen_layout.has_commit(repo.path, c) for c in repo.commits)
    not_commits = ["main", "HEAD", "", ".", "..", "../refs", "/", repo.commits[0][:8], repo.commits[0].upper()]
    assert not any(oxen_layout.has_commit(repo.path, text) for text in not_commits)
    (repo.path / ".oxen" / "history" / "0123abcd").write_text("")  # named like a commit, not a commit's folder
    empty = tmp_path / "empty"
    (empty / ".oxen" / "history").mkdir(parents=True)
    (empty / ".oxen" / "history" / "0123abcd").write_text("")
    assert not oxen_layout.has_commits(empty) and not oxen_layout.has_commit(repo.path, "0123abcd")
    assert [c["id"] for c in oxen_child.log(repo.path)] == list(reversed(repo.commits))
    assert oxen_layout.find_repo_root(repo.path / "sub" / "x") == repo.path
    assert (repo.path / ".oxen" / "versions").is_dir()


def test_our_init_writes_what_oxen_init_writes_and_oxen_commits_into_it(tmp_path, monkeypatch):
    """The model repository is initialized by writing ``.oxen/config.toml`` (no oxenai process):
    the same bytes as oxenai's own init, and oxenai adds, commits and reads the repository."""
    monkeypatch.setenv("OXEN_CONFIG_DIR", str(tmp_path / "oxen-config"))
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    oxen_child.init_repo(theirs)
    assert sorted(p.name for p in (theirs / ".oxen").iterdir()) == ["config.toml"]
    oxen_layout.init(ours)
    assert (ours / ".oxen" / "config.toml").read_bytes() == (theirs / ".oxen" / "config.toml").read_bytes()
    assert sorted(p.name for p in (ours / ".oxen").iterdir()) == ["config.toml"]
    (ours / "w.bin").write_bytes(b"weights")
    commit = oxen_child.commit_paths(ours, ["w.bin"], "first", author=AUTHOR)
    assert oxen_child.branches(ours) == {"main": commit}
    assert [c["id"] for c in oxen_child.log(ours)] == [commit]
    oxen_layout.init(ours)  # an existing repository is left as it is
    assert oxen_layout.damage(ours) is None and oxen_layout.head_ref(ours) == "main"


def test_init_finishes_an_interrupted_init_but_never_writes_over_damage(tmp_path):
    cut_short = tmp_path / "cut"
    (cut_short / ".oxen").mkdir(parents=True)
    (cut_short / ".oxen" / "config.toml.oxcb-init-1").write_text("remo")  # killed mid-write
    oxen_layout.init(cut_short)
    assert (cut_short / ".oxen" / "config.toml").read_text() == oxen_layout.INIT_CONFIG
    assert sorted(p.name for p in (cut_short / ".oxen").iterdir()) == ["config.toml"]
    damaged = make_repo(tmp_path / "d", [("one", {"a.txt": "1"})]).path
    (damaged / ".oxen" / "config.toml").unlink()
    oxen_layout.init(damaged)
    assert not (damaged / ".oxen" / "config.toml").exists()
    assert oxen_layout.damage(damaged) == ".oxen/config.toml is missing"


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


_RAW_GLOB_ADD = """
import sys
from oxen_callbacks._oxen.identity import commit_identity
from oxen_callbacks._oxen.native import open_repo

repo = open_repo(sys.argv[1])
repo.add(sys.argv[1] + "/ckpt/model[1].ckpt")  # oxenai itself, as our add would call it
with commit_identity(("T", "t@example.com")):
    print(repo.commit("glob").id)
"""


def test_oxen_reads_a_path_with_glob_characters_as_a_pattern_so_ours_refuse_one(tmp_path):
    """The assumption behind ``GLOB_CHARACTERS`` (``_publish/dests.py`` names checkpoints around it):
    oxenai's add of ``model[1].ckpt`` commits ``model1.ckpt``, another file, and not the one named."""
    from oxen_callbacks._oxen.repo import LocalRepo
    from oxen_callbacks.errors import ConfigurationError

    repo = make_repo(tmp_path / "r", [("one", {"a.txt": "1"})])
    write(repo.path, {"ckpt/model[1].ckpt": b"the weights named", "ckpt/model1.ckpt": b"another file"})
    out = subprocess.run([sys.executable, "-c", _RAW_GLOB_ADD, str(repo.path)], capture_output=True, text=True,
                         check=True)
    commit = out.stdout.strip().splitlines()[-1]
    _, files = listed(repo.path, commit, ["ckpt"])
    assert files == {"ckpt/model1.ckpt": b"another file"}
    for call in (LocalRepo(repo.path).add, LocalRepo(repo.path).rm):
        with pytest.raises(ConfigurationError, match="glob pattern"):
            call("ckpt/model[1].ckpt")


# -- the merkle tree (oxen_callbacks/_oxen/tree.py) --------------------------------------------
MANY = 10_050  # more than vnode_size (10,000): the folder's entries span two vnodes


@pytest.fixture(scope="module")
def big_history(tmp_path_factory):
    """Commit 1: nested folders, an empty file, MANY files in one folder; commit 2: one of them
    modified, two files removed (one the only file of its folder), a folder added."""
    root = tmp_path_factory.mktemp("layout")
    repo = root / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OXEN_CONFIG_DIR", str(root / "oxen-config"))
        mp.setenv("OXEN_CALLBACKS_CACHE", str(root / "cache"))
        files = {f"many/f{i:05d}.txt": f"file {i}\n" for i in range(MANY)}
        files |= {"n/e/s/t/deep.bin": bytes(range(256)) * 20, "n/top.txt": "top", "empty": "",
                  "gone.txt": "soon gone", "x/y/only.txt": "only"}
        write(repo, files)
        oxen_child.init_repo(repo)
        commits = [oxen_child.commit_paths(repo, ["many", "n", "empty", "gone.txt", "x"], "one", author=AUTHOR)]
        write(repo, {"many/f00007.txt": "modified\n", "new/z.txt": "z"})
        for rel in ("gone.txt", "x/y/only.txt"):
            (repo / rel).unlink()
        code = "import sys; from oxen_callbacks._oxen.repo import LocalRepo; r = LocalRepo(sys.argv[1]); " \
               "[r.rm(p) for p in sys.argv[2:]]"
        subprocess.run([sys.executable, "-c", code, str(repo), "gone.txt", "x/y/only.txt"], check=True,
                       capture_output=True, timeout=120)
        commits.append(oxen_child.commit_paths(repo, ["many/f00007.txt", "new"], "two", author=AUTHOR))
    return repo.resolve(), commits


def write(repo: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(text if isinstance(text, bytes) else text.encode())


def listed(repo: Path, commit: str, paths: list[str]) -> tuple[set[str], dict[str, bytes]]:
    """Folders and file bytes of ``paths`` at ``commit`` as the tree reader and content store give them."""
    dirs, files = set(), {}
    for subtree in oxen_tree.files_at(repo, commit, paths).values():
        dirs.update(subtree.dirs)
        for entry in subtree.files:
            data = oxen_layout.version_path(repo, entry.hash).read_bytes()
            assert len(data) == entry.size, entry
            files[entry.path] = data
    dirs.update(str(parent) for rel in [*dirs, *files] for parent in Path(rel).parents if str(parent) != ".")
    return dirs, files


def test_tree_reader_lists_what_oxen_restore_writes(big_history, tmp_path):
    repo, (first, second) = big_history
    oxen_child.materialize(repo, second, ["."], tmp_path / "all")
    dirs, files = listed(repo, second, ["."])
    assert (dirs, files) == folder_contents(tmp_path / "all")
    (tmp_path / "copied").mkdir()
    copy_from_store(repo, second, ["."], tmp_path / "copied")  # the pin's fast path: batches on threads
    assert folder_contents(tmp_path / "copied") == (dirs, files)
    assert len(files) == MANY + 4 and files["many/f00007.txt"] == b"modified\n" and files["empty"] == b""
    assert "gone.txt" not in files and "x/y" in dirs  # removed; the emptied folder stays in the commit
    parts = ["n", "many/f00007.txt", "x", "gone.txt"]
    oxen_child.materialize(repo, first, parts, tmp_path / "parts")
    dirs, files = listed(repo, first, parts)
    assert (dirs, files) == folder_contents(tmp_path / "parts")
    assert files["many/f00007.txt"] == b"file 7\n" and files["x/y/only.txt"] == b"only"
    with pytest.raises(oxen_tree.PathNotInCommit):
        oxen_tree.files_at(repo, second, ["gone.txt"])


def test_a_folder_over_vnode_size_spans_vnodes(big_history):
    repo, (_first, second) = big_history
    config = tomllib.loads((repo / ".oxen" / "config.toml").read_text())
    assert config["vnode_size"] == 10_000 and config["merkle_node_backend"] == "lmdb"
    assert "versions_path" not in config["storage"] and config["storage"]["kind"] == "local"

    def vnode_sizes(tree: oxen_tree.Tree) -> list[int]:
        root = tree._node(int(second, 16).to_bytes(16, "little"), 0)[2][0][1]
        many = tree._entry(root, "many")[1]
        return [len(tree._node(vnode[1], 2)[2]) for vnode in tree._node(many, 1)[2]]

    sizes = oxen_tree.read(repo, vnode_sizes)
    assert len(sizes) == 2 and sum(sizes) == MANY


_COMMITTER = """
import sys
from oxen_callbacks._oxen.identity import commit_identity
from oxen_callbacks._oxen.repo import LocalRepo
repo = LocalRepo(sys.argv[1])
with commit_identity(("Test Data", "data@example.com")):
    for i in range(int(sys.argv[2])):
        open(f"{sys.argv[1]}/late{i}.txt", "w").write(str(i))
        repo.add(f"late{i}.txt")
        print("commit", repo.commit(f"late {i}"), flush=True)
"""


def test_reading_the_tree_while_oxen_commits(tmp_path):
    """Oxen writes the node store (under LMDB's lock) while the tree is read: neither side is disturbed."""
    repo = make_repo(tmp_path / "r", [("one", {"d/a.txt": "a", "d/b.txt": "b"})])
    env_dir = repo.path / ".oxen" / "tree" / "nodes_lmdb"
    before = sorted(os.listdir(env_dir))
    committer = subprocess.Popen([sys.executable, "-c", _COMMITTER, str(repo.path), "12"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads = 0
    while committer.poll() is None:
        assert [f.path for f in oxen_tree.files_at(repo.path, repo.head, ["."])["."].files] == ["d/a.txt", "d/b.txt"]
        reads += 1
    out, err = committer.communicate()
    assert committer.returncode == 0, err
    late = [line.split()[1] for line in out.splitlines() if line.startswith("commit ")]  # oxen prints too
    assert len(late) == 12 and reads > 12
    files = [f.path for f in oxen_tree.files_at(repo.path, late[-1], ["."])["."].files]
    assert sorted(files) == sorted(["d/a.txt", "d/b.txt", *(f"late{i}.txt" for i in range(12))])
    assert sorted(os.listdir(env_dir)) == before == ["data.mdb", "lock.mdb"]  # nothing left behind
