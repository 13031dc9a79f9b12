"""PinnedDataset: resolve once, snapshot read-only, cache by commit, never touch the user's repo."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
import sys

import pytest
from helpers import commit_files, make_repo, tree_state

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._util.fs import remove_tree
from oxen_callbacks.errors import ConfigurationError, DatasetMismatchError


def test_snapshot_holds_commit_bytes_and_is_read_only(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"])
    path = pin.file("train.csv")
    assert path.read_text().rstrip().endswith(",0")  # A's labels
    assert (dataset_repo.path / "train.csv").read_text().rstrip().endswith(",1")  # the working tree is B
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert not path.parent.stat().st_mode & stat.S_IWUSR
    assert pin.files() == [path]
    assert dataset_repo.commits[0] in str(path)  # keyed by commit
    pin.verify()


def test_a_pin_reads_its_own_paths_whatever_else_the_cache_holds_of_the_commit(dataset_repo, tmp_path):
    """The snapshot folder holds what every pin of the commit asked for: a pin of train.csv read val.csv
    from it wherever another pin had cached it, data its lineage does not name (and the same script
    failed on a machine without that pin). Each pin of some paths reads a view of its own paths."""
    commit = dataset_repo.commits[0]
    both = PinnedDataset(dataset_repo.path, revision=commit, paths=["train.csv", "val.csv"])
    train = PinnedDataset(dataset_repo.path, revision=commit, paths=["train.csv"])
    assert sorted(os.listdir(both.path)) == ["train.csv", "val.csv"]
    assert os.listdir(train.path) == ["train.csv"] and not (train.path / "val.csv").exists()
    assert train.files() == [train.path / "train.csv"]
    with pytest.raises(ConfigurationError, match="not among the pinned paths"):
        train.file("val.csv")
    assert os.path.samefile(train.file("train.csv"), both.file("train.csv"))  # no second copy of the data
    assert not (train.path.stat().st_mode & 0o222) and not (train.file("train.csv").stat().st_mode & 0o222)
    whole = PinnedDataset(dataset_repo.path, revision=commit)
    assert whole.path == whole.store.folder(commit)  # the whole commit: the snapshot itself
    train.verify(deep=True)


def test_a_damaged_or_stale_view_is_named_and_made_again(dataset_repo, tmp_path):
    commit = dataset_repo.commits[0]
    pin = PinnedDataset(dataset_repo.path, revision=commit, paths=["train.csv"])
    view = pin.path
    os.chmod(view, 0o755)
    os.unlink(view / "train.csv")
    (view / "train.csv").write_text("x0,label\n9,9\n")  # other bytes in its place
    with pytest.raises(DatasetMismatchError, match=r"'train.csv' in the view .* is not the snapshot's"):
        pin.verify()
    pin.pull_intact()  # reproduce's way: made again from the repository
    assert pin.file("train.csv").read_text().rstrip().endswith(",0")  # commit A's rows
    pin.verify(deep=True)

    os.chmod(pin.path, 0o755)
    os.unlink(pin.path / "train.csv")  # deleted: the next process's pull makes the view again
    again = PinnedDataset(dataset_repo.path, revision=commit, paths=["train.csv"])
    assert again.file("train.csv").read_text().rstrip().endswith(",0")

    snapshot = again.store.folder(commit)  # the snapshot deleted by hand (the hint of a damaged one) ...
    subprocess.run(["chmod", "-R", "u+w", str(snapshot)], check=True)
    shutil.rmtree(snapshot)
    remade = PinnedDataset(dataset_repo.path, revision=commit, paths=["train.csv"])
    assert os.path.samefile(remade.file("train.csv"), remade.store.folder(commit) / "train.csv")  # ... no old links


def test_pins_of_a_file_named_a_newline_b_and_of_a_and_b_read_their_own_files(tmp_path):
    """The view's name hashed the paths joined by newlines: a pin of the file 'a\nb' and a pin of 'a' and
    'b' shared one view, and the first then read 'a' and 'b', not its file (adversarial review)."""
    repo = make_repo(tmp_path / "data", [("one", {"a": "A\n", "b": "B\n", "a\nb": "held out\n"})])
    odd = PinnedDataset(repo.path, revision=repo.head, paths=["a\nb"])
    pair = PinnedDataset(repo.path, revision=repo.head, paths=["a", "b"])
    assert os.listdir(odd.path) == ["a\nb"]
    assert sorted(os.listdir(pair.path)) == ["a", "b"]
    assert os.listdir(odd.path) == ["a\nb"] and odd.file("a\nb").read_text() == "held out\n"
    odd.verify()
    pair.verify()


def test_a_pin_whose_view_went_with_a_snapshot_another_pin_made_again_reads_its_files(dataset_repo, tmp_path):
    """A pin of the whole commit that finds the snapshot damaged makes it again, and every view of the
    old one goes: a pin of some paths that had pulled then gave a `path` that was gone and `files()` []
    (a training loop seeing an empty dataset, found by an adversarial review)."""
    commit = dataset_repo.commits[0]
    train = PinnedDataset(dataset_repo.path, revision=commit, paths=["train.csv"])
    assert train.files() == [train.path / "train.csv"]
    whole = PinnedDataset(dataset_repo.path, revision=commit)
    snapshot = whole.pull()
    os.chmod(snapshot, 0o755)
    os.chmod(snapshot / "val.csv", 0o644)
    (snapshot / "val.csv").write_text("x" * len((snapshot / "val.csv").read_text()))  # damaged, same size
    whole.pull_intact()
    assert not whole.store.views_root(commit).exists()  # (the old view's links went with the old files)
    assert train.files() == [train.path / "train.csv"]
    assert (train.path / "train.csv").read_text().rstrip().endswith(",0")  # commit A's rows

def test_verifying_a_pin_not_pulled_yet_says_so_rather_than_pass_or_blame_the_cache(dataset_repo, tmp_path):
    """Before the first pull there is nothing on disk: a plain check passed it, and the deep one called
    every file "recorded unlike the repository's commit" and told the user to delete a missing folder."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"],
                        cache_dir=tmp_path / "cache")
    for deep in (False, True):
        with pytest.raises(ConfigurationError, match=r"Nothing to verify: 'train.csv' of .*@" + dataset_repo.commits[0]
                                                     + r" is not in the snapshot cache .* yet\.\nHINT: call pull\(\) first"):
            pin.verify(deep=deep)
    pin.pull()
    pin.verify(deep=True)


def test_cached_repin_copies_nothing(dataset_repo, tmp_path):
    first = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.files()}
    scratch = tmp_path / "cache" / "tmp"
    again = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0][:12], paths=["val.csv", "train.csv"])
    assert again.path == first.path
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in again.files()} == before
    assert not any(scratch.iterdir()) if scratch.exists() else True


def test_more_paths_of_a_cached_commit_are_added(dataset_repo):
    PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["val.csv"]).pull()
    both = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0])  # the whole commit
    assert sorted(p.name for p in both.files()) == ["train.csv", "val.csv"]


def test_a_copy_in_another_process_checks_the_snapshot_it_finds(dataset_repo, tmp_path):
    """Ray hands each worker a pickled pin, and a spawned rank gets one too: the check its first process
    made says nothing of the cache the copy finds. Before, a copy skipped it (and ``verify=True``)."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"], verify=True)
    path = pin.file("train.csv")
    committed, sent = path.read_bytes(), pickle.dumps(pin)
    os.chmod(path.parent, 0o755)
    path.unlink()  # a cleaned cache
    assert pickle.loads(sent).file("train.csv").read_bytes() == committed  # made again from the commit
    # another node: a cache of its own, the same folders, one file edited in place (the same size)
    cache, elsewhere = pin.store.cache_dir, tmp_path / "other-node"
    shutil.copytree(cache, elsewhere, symlinks=True)
    remove_tree(cache)
    edited = elsewhere / path.relative_to(cache)
    os.chmod(edited.parent, 0o755)
    os.chmod(edited, 0o644)
    edited.write_bytes(committed.replace(b",0\n", b",1\n"))
    os.rename(elsewhere, cache)
    with pytest.raises(DatasetMismatchError, match="train.csv"):
        pickle.loads(sent).pull()


def test_pins_from_two_processes_at_once(dataset_repo, tmp_path):
    code = ("import sys; from oxen_callbacks import PinnedDataset; "
            "p = PinnedDataset(sys.argv[1], revision=sys.argv[2]); print(p.file('train.csv').read_text()[-3:])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(dataset_repo.path), dataset_repo.commits[0]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert {o for o, _ in outs} == {",0\n\n"}
    assert len(list((tmp_path / "cache" / "snapshots").iterdir())) == 1


def test_branch_pin_leaves_no_lock_on_the_users_repo(dataset_repo):
    """The user keeps committing to the dataset while a pinned run holds its pin."""
    pin = PinnedDataset(dataset_repo.path, revision="main", paths=["train.csv"])
    pin.pull()
    new = commit_files(dataset_repo, "C", {"train.csv": "x0,x1,x2,x3,label\n0,0,0,0,0\n"})
    assert oxen_child.branches(dataset_repo.path)["main"] == new
    assert pin.commit == dataset_repo.commits[1]  # the pin does not move
    assert pin.file("train.csv").read_text().rstrip().endswith(",1")


def test_dirty_pinned_paths_are_refused_unless_allowed(dataset_repo):
    (dataset_repo.path / "train.csv").write_text("x0,x1,x2,x3,label\n9,9,9,9,1\n")
    state = tree_state(dataset_repo.path)
    with pytest.raises(ConfigurationError, match=r"uncommitted changes in the pinned paths: train.csv") as err:
        PinnedDataset(dataset_repo.path, paths=["train.csv"])
    assert "allow_dirty=True" in str(err.value)
    clean_other = PinnedDataset(dataset_repo.path, paths=["val.csv"])  # the change is outside the pinned paths
    assert clean_other.dirty is False
    dirty = PinnedDataset(dataset_repo.path, paths=["train.csv"], allow_dirty=True)
    assert dirty.to_lineage()["dirty"] is True
    assert dirty.file("train.csv").read_text().rstrip().endswith(",1")
    assert len(dirty.file("train.csv").read_text().splitlines()) == 97  # committed bytes, not the edit
    explicit = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[1], paths=["train.csv"])
    assert explicit.dirty is False  # a commit id does not mean "my working tree"
    assert tree_state(dataset_repo.path) == state


def test_untracked_file_in_pinned_folder_is_dirty(tmp_path):
    from helpers import make_repo

    repo = make_repo(tmp_path / "imgs", [("one", {"images/a.txt": "a"})])
    (repo.path / "images" / "b.txt").write_text("new")
    with pytest.raises(ConfigurationError, match="images/b.txt"):
        PinnedDataset(repo.path, paths=["images"])


def test_to_lineage_and_file_outside_paths(dataset_repo):
    pin = PinnedDataset(dataset_repo.path, revision="main", paths=["./train.csv"])
    assert pin.to_lineage() == {"repo": str(dataset_repo.path), "revision": "main",
                                "commit": dataset_repo.commits[1], "paths": ["train.csv"], "dirty": False}
    with pytest.raises(ConfigurationError, match="not among the pinned paths"):
        pin.file("val.csv")


def test_default_revision_is_checked_out_branch(dataset_repo):
    pin = PinnedDataset(dataset_repo.path)
    assert (pin.revision_label, pin.commit) == ("main", dataset_repo.commits[1])


def test_unwritable_cache_is_a_clear_error(dataset_repo, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(ConfigurationError, match=r"snapshot cache .*not-a-folder.* is not writable"):
        PinnedDataset(dataset_repo.path, cache_dir=blocker / "cache").pull()


@pytest.mark.parametrize("cached_first", [True, False], ids=["whole-commit-cached-first", "path-asked-first"])
def test_path_absent_from_the_commit_is_refused_cached_or_not(dataset_repo, tmp_path, cached_first):
    """Whether or not a whole-commit snapshot of the commit is cached, the answer is the same."""
    first = dataset_repo.commits[0]
    whole = PinnedDataset(dataset_repo.path, revision=first)
    if cached_first:
        whole.pull()
    with pytest.raises(ConfigurationError) as refused:
        PinnedDataset(dataset_repo.path, revision=first, paths=["nope.csv", "train.csv"]).pull()
    whole.pull()
    with pytest.raises(ConfigurationError) as refused_again:
        PinnedDataset(dataset_repo.path, revision=first, paths=["nope.csv"]).pull()
    message = f"Path 'nope.csv' is not in commit {first} of the dataset repository {str(dataset_repo.path)!r}."
    assert str(refused.value).startswith(message) and str(refused_again.value) == str(refused.value)


def test_a_backslash_is_part_of_a_file_name_not_a_folder(tmp_path):
    """On POSIX ``a\\b.csv`` is one file, beside ``a/b.csv``: pinning it must read it (it once read the other)."""
    from helpers import make_repo

    repo = make_repo(tmp_path / "data", [("both", {"a\\b.csv": "the backslash file", "a/b.csv": "the folder's file"})])
    pin = PinnedDataset(repo.path, revision=repo.head, paths=["a\\b.csv"])
    assert pin.paths == ["a\\b.csv"] and pin.file("a\\b.csv").read_text() == "the backslash file"
    with pytest.raises(ConfigurationError, match="is not among the pinned paths"):
        pin.file("a/b.csv")
    whole = PinnedDataset(repo.path, revision=repo.head)
    assert whole.file("a\\b.csv").read_text() == "the backslash file"
    assert whole.file("a/b.csv").read_text() == "the folder's file"
    whole.verify(deep=True)  # a manifest naming a backslash file is no damage either
