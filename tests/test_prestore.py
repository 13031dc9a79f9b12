"""The worker pre-stores checkpoint bytes in Oxen's content store; guard the layout it relies on."""

from __future__ import annotations

import os

from helpers import commit_files, make_repo, store_elsewhere

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import layout as oxen_layout
from oxen_callbacks._oxen.prestore import prestore
from oxen_callbacks._util.materialized import file_digest


def test_version_path_is_where_oxen_stores_bytes(tmp_path):
    """If an oxenai upgrade changes hashing or the store's layout, this fails: fix oxen_layout.version_path."""
    repo = make_repo(tmp_path / "r", [("one", {"a.bin": os.urandom(4096), "b/c.txt": "hello"})])
    for rel in ("a.bin", "b/c.txt"):
        version = oxen_layout.version_path(repo.path, file_digest(repo.path / rel))
        assert version.is_file() and version.read_bytes() == (repo.path / rel).read_bytes()


def test_prestored_bytes_are_committed_and_restored_identically(tmp_path):
    repo = make_repo(tmp_path / "r", [("one", {"x.txt": "x"})])
    folder = repo.path / "ckpt"
    folder.mkdir()
    payload = {"model.bin": os.urandom(1 << 20), "config.json": b"{}", "same.json": b"{}"}
    for name, data in payload.items():
        (folder / name).write_bytes(data)
    copied = prestore(repo.path, folder)
    assert copied == (1 << 20) + 2  # the two identical files are stored once
    assert prestore(repo.path, folder) == 0  # already there: nothing copied again
    store = oxen_layout.version_path(repo.path, file_digest(folder / "model.bin"))
    assert os.stat(store).st_ino != os.stat(folder / "model.bin").st_ino  # the store keeps its own copy
    commit = commit_files(repo, "ckpt", {f"ckpt/{n}": d for n, d in payload.items()})
    snap = PinnedDataset(repo.path, revision=commit, paths=["ckpt"], cache_dir=tmp_path / "c")
    assert {p.name: p.read_bytes() for p in snap.files()} == payload
    assert oxen_layout.orphan_temp_files(repo.path, older_than_s=0) == []


def test_a_repository_keeping_its_versions_elsewhere_gets_no_copy_in_the_default_store(tmp_path):
    """A user who moved the content store off a small disk (``versions_path``): a pre-stored copy under
    ``.oxen/versions`` is one Oxen never reads, a second copy of every checkpoint on that disk."""
    repo = make_repo(tmp_path / "r", [])
    store_elsewhere(repo.path, tmp_path / "elsewhere")
    (repo.path / "ckpt").mkdir()
    weights = os.urandom(1 << 20)
    (repo.path / "ckpt" / "model.bin").write_bytes(weights)
    assert prestore(repo.path, repo.path / "ckpt") == 0
    commit = commit_files(repo, "ckpt", {"ckpt/model.bin": weights})
    default_store = oxen_layout.oxen_dir(repo.path) / "versions"
    assert not [p for p in default_store.rglob("*") if p.is_file()] if default_store.exists() else True
    assert [p for p in (tmp_path / "elsewhere").rglob("*") if p.is_file() and p.read_bytes() == weights]
    snap = PinnedDataset(repo.path, revision=commit, paths=["ckpt"], cache_dir=tmp_path / "c")
    assert snap.file("ckpt/model.bin").read_bytes() == weights  # through `oxen restore`, checked against the tree


def test_a_config_whose_storage_is_not_a_table_is_left_to_oxen_add_to_name(tmp_path):
    repo = make_repo(tmp_path / "r", [])
    config = oxen_layout.oxen_dir(repo.path) / "config.toml"
    config.write_text('storage = "local"\n' + config.read_text().split("[storage]")[0])
    (repo.path / "model.bin").write_bytes(b"weights")
    assert prestore(repo.path, repo.path / "model.bin") == 0  # (an AttributeError in the commit process before)
