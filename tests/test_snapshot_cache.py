"""The snapshot cache under faults: files lost from a snapshot, pins killed mid-copy, long waits for a pin."""

from __future__ import annotations

import subprocess

import pytest
from helpers import make_repo

from oxen_callbacks import PinnedDataset
from oxen_callbacks.errors import ConfigurationError


def delete_from_snapshot(pin: PinnedDataset, rel: str) -> None:
    folder = pin.store.folder(pin.commit)
    subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
    subprocess.run(["rm", "-rf", str(folder / rel)], check=True)


@pytest.mark.parametrize("how", ["pull", "pull_intact", "file"])
def test_a_file_deleted_from_a_cached_snapshot_is_made_again_not_called_absent(dataset_repo, how):
    """Once `pull()` and `pull_intact()` (`reproduce`) said the commit lacks the path, and kept failing."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, paths=["train.csv", "val.csv"])
    pin.pull()
    delete_from_snapshot(pin, "train.csv")
    again = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, paths=["train.csv"])
    path = again.file("train.csv") if how == "file" else getattr(again, how)() / "train.csv"
    assert path.read_bytes() == (dataset_repo.path / "train.csv").read_bytes()
    again.verify(deep=True)
    with pytest.raises(ConfigurationError, match=r"Path 'nope.csv' is not in commit"):
        PinnedDataset(dataset_repo.path, revision=dataset_repo.head, paths=["nope.csv"]).pull()


def test_a_file_deleted_under_a_pinned_folder_is_made_again_by_file(tmp_path):
    repo = make_repo(tmp_path / "imgs", [("one", {"data/a.txt": "a", "data/b.txt": "b"})])
    pin = PinnedDataset(repo.path, revision=repo.head, paths=["data"])
    pin.pull()
    delete_from_snapshot(pin, "data/a.txt")
    assert pin.file("data/a.txt").read_text() == "a"  # the pin already checked 'data': file() finds the loss
    pin.verify(deep=True)
    with pytest.raises(ConfigurationError, match=r"'data/c.txt' is not in commit"):
        pin.file("data/c.txt")
