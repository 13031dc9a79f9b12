"""Damaged or unusual dataset repositories: clear errors, never a dead training process or a wrong snapshot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from helpers import file_at, make_repo, store_elsewhere

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen import layout as oxen_layout
from oxen_callbacks.cli import main as cli_main
from oxen_callbacks.errors import ConfigurationError, DatasetMismatchError, OxenError

TESTS = Path(__file__).parent
# A pin as a training script makes it, in its own process: a crash there must not take pytest with it.
PIN_SCRIPT = """
import json, sys
from oxen_callbacks import PinnedDataset
from oxen_callbacks.errors import ConfigurationError
try:
    PinnedDataset(sys.argv[1], revision=sys.argv[2]).pull()
    outcome = {"error": None}
except ConfigurationError as exc:
    outcome = {"error": str(exc)}
outcome["lmdb_loaded"] = "lmdb" in sys.modules
print(json.dumps(outcome))
"""


def run_pin(repo: Path, revision: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PIN_SCRIPT, str(repo), revision], capture_output=True, text=True,
                          timeout=120)


def truncate_tree(repo: Path, size: int) -> None:
    """Cut Oxen's merkle node store short, as a full disk or an interrupted copy would."""
    data = oxen_layout.oxen_dir(repo) / oxen_layout.NODE_STORE
    assert data.stat().st_size > 8192
    os.truncate(data, size)


def stored_file(repo: Path, content: bytes) -> Path:
    """Where Oxen's content store keeps ``content`` (its xxh3-128 hash names the file)."""
    return oxen_layout.version_path(repo, xxhash.xxh3_128_intdigest(content))


def test_a_healthy_pin_never_loads_lmdb_in_the_training_process(dataset_repo):
    done = run_pin(dataset_repo.path, dataset_repo.head)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"error": None, "lmdb_loaded": False}


@pytest.mark.parametrize("size", [8192, 0], ids=["pages-cut-off", "emptied"])
def test_truncated_tree_is_a_clear_error_not_a_crash(dataset_repo, size):
    """8192 bytes keep LMDB's meta pages, whose root lies past the end: mapped in-process, SIGBUS."""
    truncate_tree(dataset_repo.path, size)
    done = run_pin(dataset_repo.path, dataset_repo.head)
    assert done.returncode == 0, f"the pinning process died ({done.returncode}): {done.stderr[-2000:]}"
    error = json.loads(done.stdout.splitlines()[-1])["error"]
    assert f"dataset repository {str(dataset_repo.path)!r} looks damaged" in error
    assert "HINT:" in error and "clone the repository again" in error


def test_a_node_store_that_is_not_lmdb_is_named_as_damage(dataset_repo):
    """4096 bytes hold no LMDB meta page (MDB_INVALID): `oxen status` of a branch pin failed with an
    OxenError and no hint; every revision now says the repository looks damaged."""
    truncate_tree(dataset_repo.path, 4096)
    for revision in (None, "main", dataset_repo.head):
        with pytest.raises(ConfigurationError, match=r"(?s)dataset repository .* looks damaged: .*\nHINT: "):
            PinnedDataset(dataset_repo.path, revision=revision).pull()


def test_lightning_fit_on_a_truncated_tree_stops_with_the_error(dataset_repo, tmp_path):
    truncate_tree(dataset_repo.path, 8192)
    done = subprocess.run([sys.executable, str(TESTS / "fit_script.py"), "--dataset", str(dataset_repo.path),
                           "--revision", dataset_repo.head, "--model-repo", str(tmp_path / "models"),
                           "--root", str(tmp_path / "run"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "ConfigurationError" in done.stderr and "looks damaged" in done.stderr


def test_repository_without_commits_is_a_clear_error(tmp_path):
    empty = make_repo(tmp_path / "empty", [])
    for revision in (None, "main"):
        with pytest.raises(ConfigurationError, match=r"has no commits yet.*\nHINT: add and commit"):
            PinnedDataset(empty.path, revision=revision)


def test_missing_head_is_named_as_damage(dataset_repo):
    (dataset_repo.path / ".oxen" / "HEAD").unlink()
    for revision in (None, "main", dataset_repo.head):
        with pytest.raises(ConfigurationError, match=r"looks damaged: \.oxen/HEAD is missing"):
            PinnedDataset(dataset_repo.path, revision=revision)


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small-file", "file-copied-by-chunks"])
def test_corrupt_content_store_file_is_refused_at_first_pin(tmp_path, size):
    """Same size, other bytes: only a content hash tells; no snapshot is made of it."""
    content = os.urandom(size)
    repo = make_repo(tmp_path / "data", [("one", {"blob.bin": content, "ok.txt": "fine"})])
    stored = stored_file(repo.path, content)
    stored.chmod(0o644)
    stored.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    pin = PinnedDataset(repo.path, revision=repo.head)
    with pytest.raises(ConfigurationError, match=r"looks damaged: .*'blob.bin'.* does not match its content hash"):
        pin.pull()
    assert not pin.is_pulled and not pin.store.folder(pin.commit).exists()


def changed_in_place(pin: PinnedDataset, rel: str) -> None:
    """Rewrite a snapshot file with other bytes of the same size (mode and size as before)."""
    target = pin.store.folder(pin.commit) / rel
    before = target.read_bytes()
    target.parent.chmod(0o755)
    target.chmod(0o644)
    target.write_bytes(before.replace(b",0\n", b",1\n"))
    target.chmod(0o444)
    target.parent.chmod(0o555)
    assert target.stat().st_size == len(before) and target.read_bytes() != before


def test_same_size_change_is_caught_by_a_deep_check(dataset_repo, capsys):
    first = dataset_repo.commits[0]
    pin = PinnedDataset(dataset_repo.path, revision=first)
    pin.pull()
    pin.verify(deep=True)
    assert cli_main(["verify"]) == 0
    changed_in_place(pin, "train.csv")
    with pytest.raises(DatasetMismatchError, match=r"'train.csv' changed \(content hash differs\)"):
        pin.verify()  # the cheap check sees another modification time, and reads that file's bytes
    with pytest.raises(DatasetMismatchError, match=r"'train.csv' changed \(content hash differs\)"):
        pin.verify(deep=True)
    with pytest.raises(DatasetMismatchError, match="train.csv"):
        PinnedDataset(dataset_repo.path, revision=first, paths=["train.csv"], verify=True).pull()
    PinnedDataset(dataset_repo.path, revision=first, paths=["val.csv"], verify=True).pull()  # untouched
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {pin.store.folder(first)}" in out and "'train.csv' changed" in out and "val.csv" not in out


def test_a_pinned_file_rewritten_by_rename_in_its_view_is_caught_by_every_check(dataset_repo, capsys):
    """`sed -i` on what `file()` gave (root, as in most containers): a new file of the same size replaced
    the view's link into the snapshot. Later pins read the edited rows as the commit's; the check at fit
    start and `oxen-callbacks verify` passed them (adversarial review)."""
    first = dataset_repo.commits[0]
    pin = PinnedDataset(dataset_repo.path, revision=first, paths=["train.csv"])
    committed = pin.file("train.csv").read_bytes()
    subprocess.run(["sed", "-i", "s/,0$/,1/", str(pin.file("train.csv"))], check=True)
    later = PinnedDataset(dataset_repo.path, revision=first, paths=["train.csv"])
    assert later.file("train.csv").read_bytes() != committed and len(later.file("train.csv").read_bytes()) == len(committed)
    with pytest.raises(DatasetMismatchError, match=r"'train.csv' in the view .* is not the snapshot's"):
        later.verify()  # what every fit start runs
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "'train.csv' in the view" in out
    later.pull_intact()
    assert later.file("train.csv").read_bytes() == committed
    later.verify()
    assert cli_main(["verify"]) == 0


def test_a_same_size_edit_in_place_is_caught_by_the_check_at_fit_start(dataset_repo, caplog):
    """Root writes through 0444 (most containers run as root): labels flipped in place, same size, passed
    the check every fit start runs, which compared counts and sizes only (adversarial review)."""
    first = dataset_repo.commits[0]
    pin = PinnedDataset(dataset_repo.path, revision=first)
    target = pin.file("train.csv")
    committed = target.read_bytes()
    if os.geteuid() != 0:
        target.chmod(0o644)  # (what root needs not)
    with open(target, "r+b") as f:
        f.write(committed.replace(b",0\n", b",1\n"))
    later = PinnedDataset(dataset_repo.path, revision=first)
    with pytest.raises(DatasetMismatchError, match=r"'train.csv' changed \(content hash differs\)"):
        later.verify()
    assert later.pull_intact().joinpath("train.csv").read_bytes() == committed
    later.verify()

    # the same bytes in other files (a cache copied with `cp -a`): read, found intact, not refused
    again = PinnedDataset(dataset_repo.path, revision=first, paths=["val.csv"])
    again.pull()
    cached = again.store.base  # (views and all: cp -a keeps their hard links)
    writable(cached)
    subprocess.run(["cp", "-a", str(cached), f"{cached}.copy"], check=True)
    subprocess.run(["rm", "-rf", str(cached)], check=True)
    os.rename(f"{cached}.copy", cached)
    with caplog.at_level("WARNING"):
        again.verify()
    assert "a copied cache?" in caplog.text

    # a manifest of the version before (no stamps) is still read, and checked as then
    manifest = later.store.manifest_path(first)
    data = json.loads(manifest.read_text())
    data["paths"] = {rel: {"files": v["files"], "bytes": v["bytes"]} for rel, v in data["paths"].items()}
    manifest.write_text(json.dumps(data))
    PinnedDataset(dataset_repo.path, revision=first).verify()


def test_mlflow_dataset_source_load_never_returns_a_damaged_snapshot(dataset_repo):
    """MLflow's dataset source `load()` "materializes that exact commit": it returned a cached snapshot
    cut short in place, unchecked (adversarial review)."""
    from oxen_callbacks._mlflow.dataset import OxenDatasetSource

    first = dataset_repo.commits[0]
    snapshot = PinnedDataset(dataset_repo.path, revision=first).pull()
    committed = (snapshot / "train.csv").read_bytes()
    writable(snapshot)
    (snapshot / "train.csv").write_bytes(committed[: len(committed) // 2])
    folder = Path(OxenDatasetSource(str(dataset_repo.path), first).load())
    assert (folder / "train.csv").read_bytes() == committed


def test_deleted_snapshot_is_made_again(dataset_repo):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    pin.pull()
    changed_in_place(pin, "val.csv")
    folder = pin.store.folder(pin.commit)
    subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    again = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, verify=True)
    assert again.file("val.csv").read_bytes() == (dataset_repo.path / "val.csv").read_bytes()


def test_hung_oxen_restore_is_stopped(tmp_path, monkeypatch):
    """A content store elsewhere sends the pin to `oxen restore`; a FIFO there makes it hang for real."""
    repo = tmp_path / "data"
    repo.mkdir()
    oxen_child.init_repo(repo)
    store_elsewhere(repo, tmp_path / "store")
    made = make_repo(repo, [("one", {"a.txt": "hello"})])
    text = format(xxhash.xxh3_128_intdigest(b"hello"), "x")
    stored = tmp_path / "store" / text[:2] / text[2:] / "data"
    stored.unlink()
    os.mkfifo(stored)  # opening it for reading blocks until a writer comes: none will
    monkeypatch.setattr(oxen_child, "MATERIALIZE_TIMEOUT_S", 5.0)
    pin = PinnedDataset(repo, revision=made.head)
    with pytest.raises(OxenError, match=rf"Could not read commit {made.head} in .*: no answer within 5s"):
        pin.pull()


# -- a damaged snapshot cache ---------------------------------------------------------------------
def writable(folder: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


@pytest.mark.parametrize("record, damage", [
    ("manifest", b'{"commit": "x", "pa'), ("manifest", b"[1, 2]"), ("manifest", b"\xff\xfe"),
    ("hashes", b'{"commit": "x", "fi'), ("hashes", b'{"files": [1]}'),
], ids=["manifest-truncated", "manifest-a-list", "manifest-not-text", "hashes-truncated", "hashes-other-shape"])
def test_unreadable_snapshot_record_is_damage_not_a_traceback(dataset_repo, capsys, record, damage):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    folder = pin.pull()
    (pin.store.base / f"{pin.commit}.{record}.json").write_bytes(damage)
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {folder}" in out and f"{pin.commit}.{record}.json" in out
    if record == "manifest":  # no usable manifest: no snapshot; the next pin makes it again from nothing
        (folder / "planted.txt").parent.chmod(0o755)
        (folder / "planted.txt").write_text("not in the commit")
        again = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, verify=True)
        assert again.file("train.csv").read_bytes() == (dataset_repo.path / "train.csv").read_bytes()
        assert not (folder / "planted.txt").exists()
    else:  # the files are as recorded: only a deep check needs the hashes, and says they are damaged
        PinnedDataset(dataset_repo.path, revision=dataset_repo.head).pull()
        with pytest.raises(DatasetMismatchError, match=rf"{pin.commit}\.hashes\.json"):
            PinnedDataset(dataset_repo.path, revision=dataset_repo.head, verify=True).pull()
    capsys.readouterr()
    assert cli_main(["verify"]) == (0 if record == "manifest" else 1)


@pytest.mark.parametrize("rel", ["/etc", "../..", "sub/../../x"])
def test_a_manifest_naming_a_path_outside_the_snapshot_is_damage(dataset_repo, capsys, rel):
    """Never walked: verify says which record is damaged, and the next pin makes the snapshot again."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    folder = pin.pull()
    (pin.store.base / f"{pin.commit}.manifest.json").write_text(
        json.dumps({"commit": pin.commit, "paths": {rel: {"files": 1, "bytes": 1}}}))
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {folder}" in out and f"names {rel!r}, outside the snapshot" in out
    again = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, verify=True)
    assert again.file("train.csv").read_bytes() == (dataset_repo.path / "train.csv").read_bytes()
    assert cli_main(["verify"]) == 0


def test_symbolic_links_in_a_snapshot_are_damage(dataset_repo, tmp_path, capsys):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    folder = pin.pull()
    writable(folder)
    (folder / "val.csv").unlink()
    (folder / "val.csv").symlink_to(tmp_path / "gone.csv")  # dangling
    with pytest.raises(DatasetMismatchError, match=r"'val.csv' is a symbolic link"):
        pin.verify()
    with pytest.raises(DatasetMismatchError, match=r"'val.csv' is a symbolic link"):
        pin.verify(deep=True)
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    assert "'val.csv' is a symbolic link" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_a_named_pipe_in_a_snapshot_is_damage_never_read(dataset_repo, capsys):
    """Opening a named pipe to hash it would wait for a writer forever: only regular files are read."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    folder = pin.pull()
    writable(folder)
    (folder / "val.csv").unlink()
    os.mkfifo(folder / "val.csv")
    for deep in (False, True):
        with pytest.raises(DatasetMismatchError, match=r"'val.csv' is a named pipe"):
            pin.verify(deep=deep)
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    assert "'val.csv' is a named pipe" in capsys.readouterr().out


def test_snapshot_folder_replaced_by_a_link_is_caught_cheaply(dataset_repo, tmp_path):
    """A copy with the same counts and sizes elsewhere, linked in place of the snapshot or a sub-folder."""
    repo = make_repo(tmp_path / "nested", [("one", {"data/a.csv": "1,0\n", "b.txt": "b"})])
    pin = PinnedDataset(repo.path, revision=repo.head, paths=["data"])
    folder = pin.pull()
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(folder / "data"), str(other)], check=True)
    writable(folder)
    subprocess.run(["rm", "-rf", str(folder / "data")], check=True)
    (folder / "data").symlink_to(other)
    with pytest.raises(DatasetMismatchError, match=r"'data' is a symbolic link"):
        pin.verify()
    whole = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    snapshot = whole.pull()
    moved = tmp_path / "moved"
    writable(snapshot)
    snapshot.rename(moved)
    snapshot.symlink_to(moved)
    with pytest.raises(DatasetMismatchError, match=r"'\.' is a symbolic link"):
        whole.verify()


def test_a_pin_never_reads_through_a_link_in_place_of_the_snapshot_or_a_folder_of_it(dataset_repo, tmp_path):
    """A snapshot folder (or a folder in it) replaced by a link to a copy with other bytes of the same size:
    the next pin's pull() and file() read that copy as the commit (adversarial review). It is damage:
    the snapshot is made again."""
    first = dataset_repo.commits[0]
    snapshot = PinnedDataset(dataset_repo.path, revision=first).pull()
    committed = (snapshot / "train.csv").read_bytes()
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(snapshot), str(other)], check=True)
    writable(other)
    (other / "train.csv").write_bytes(committed.replace(b",0\n", b",1\n"))
    writable(snapshot)
    subprocess.run(["rm", "-rf", str(snapshot)], check=True)
    snapshot.symlink_to(other)
    again = PinnedDataset(dataset_repo.path, revision=first)
    assert not again.pull().is_symlink()
    assert again.file("train.csv").read_bytes() == committed
    again.verify()
    part = PinnedDataset(dataset_repo.path, revision=first, paths=["train.csv"])
    assert part.file("train.csv").read_bytes() == committed

    nested = make_repo(tmp_path / "nested", [("one", {"data/a.csv": "1,0\n", "b.txt": "b"})])
    folder = PinnedDataset(nested.path, revision=nested.head, paths=["data"]).pull()
    snapshot = folder.parent.parent / nested.head
    copy = tmp_path / "data-copy"
    subprocess.run(["cp", "-r", str(snapshot / "data"), str(copy)], check=True)
    writable(copy)
    (copy / "a.csv").write_text("1,1\n")
    writable(snapshot)
    subprocess.run(["rm", "-rf", str(snapshot / "data")], check=True)
    (snapshot / "data").symlink_to(copy)
    pin = PinnedDataset(nested.path, revision=nested.head, paths=["data"])
    assert pin.file("data/a.csv").read_text() == "1,0\n"
    pin.verify()


def test_snapshot_folder_replaced_by_a_file_is_damage(dataset_repo, capsys):
    """Not "ok (0 files)": the manifest records files the folder cannot hold; a pin makes it again."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    folder = pin.pull()
    writable(folder)
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.write_text("not a folder")
    capsys.readouterr()
    assert cli_main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {folder}" in out and "the snapshot folder is a file, not a folder" in out
    again = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, verify=True)
    assert again.file("train.csv").read_bytes() == (dataset_repo.path / "train.csv").read_bytes()
    assert cli_main(["verify"]) == 0


# -- a damaged repository: a clear error naming it --------------------------------------------------
def break_head_not_text(oxen: Path) -> None:
    (oxen / "HEAD").write_bytes(b"\xff\xfe\x00main")


def break_head_folder(oxen: Path) -> None:
    (oxen / "HEAD").unlink()
    (oxen / "HEAD").mkdir()


def break_config(oxen: Path) -> None:
    (oxen / "config.toml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")


def break_refs(oxen: Path) -> None:
    subprocess.run(["rm", "-rf", str(oxen / "refs")], check=True)


def delete_node_store(oxen: Path) -> None:
    (oxen / oxen_layout.NODE_STORE).unlink()


def config_without_remotes(oxen: Path) -> None:
    (oxen / "config.toml").write_text('min_version = "0.36.0"\n')


def break_history(oxen: Path) -> None:
    subprocess.run(["rm", "-rf", str(oxen / "history")], check=True)
    (oxen / "history").write_text("")


@pytest.mark.parametrize("damage, what", [
    (break_head_not_text, r"\.oxen/HEAD is not text"),
    (break_head_folder, r"\.oxen/HEAD cannot be read \(Is a directory\)"),
    (break_config, r"\.oxen/config\.toml cannot be read \(.*utf-8"),
    (break_refs, r"\.oxen/refs is missing"),
    (break_history, r"\.oxen/history is not a folder"),
    (delete_node_store, r"\.oxen/tree/nodes_lmdb/data\.mdb is missing"),  # once named "uncommitted changes"
    (config_without_remotes, r"\.oxen/config\.toml lacks its `remotes` entry"),  # once an OxenError, no hint
], ids=["head-not-text", "head-a-folder", "config-binary", "refs-deleted", "history-a-file", "node-store-deleted",
        "config-without-remotes"])
def test_damaged_repository_is_named_with_what_is_wrong(dataset_repo, damage, what):
    damage(dataset_repo.path / ".oxen")
    for revision in (None, "main", dataset_repo.head):
        with pytest.raises(ConfigurationError) as caught:
            PinnedDataset(dataset_repo.path, revision=revision)
        message = str(caught.value)
        assert f"dataset repository {str(dataset_repo.path)!r} looks damaged" in message, message
        assert re.search(what, message, re.IGNORECASE), message
        assert "\nHINT: " in message and "no commits" not in message


def commit_records(oxen: Path) -> list[Path]:
    """Each commit's ``dir_hashes`` database, Oxen's record of what the commit holds, read by its status."""
    return sorted((oxen / "history").glob("*/dir_hashes"))


def empty_commit_records(oxen: Path) -> None:
    for records in commit_records(oxen):
        (records / "000004.log").write_bytes(b"")


def cut_commit_records(oxen: Path) -> None:
    for records in commit_records(oxen):
        log_file = records / "000004.log"
        os.truncate(log_file, log_file.stat().st_size // 2)


def delete_commit_records(oxen: Path) -> None:
    for records in commit_records(oxen):
        subprocess.run(["rm", "-rf", str(records)], check=True)


def wipe_commit_records(oxen: Path) -> None:
    for records in commit_records(oxen):
        subprocess.run(["rm", "-rf", str(records)], check=True)
        records.mkdir()


@pytest.mark.parametrize("damage, what", [
    (empty_commit_records, r"Oxen's status calls 'train\.csv' changed, yet its bytes are those of commit"),
    (cut_commit_records, r"Oxen's status calls 'train\.csv' changed, yet its bytes are those of commit"),
    (delete_commit_records, r"Oxen could not read its status: .*Path does not exist: .*/\.oxen/history/"),
    (wipe_commit_records, r"Oxen could not read its status: .*No such file or directory: .*/\.oxen/history/"),
], ids=["records-emptied", "records-cut", "records-deleted", "records-wiped"])
def test_damaged_commit_records_are_damage_not_uncommitted_changes(dataset_repo, damage, what):
    """The checked-out files are exactly the commit's, but Oxen's damaged records of the commit make
    its status call them changed (once: "uncommitted changes ... commit them"), or fail raw."""
    damage(dataset_repo.path / ".oxen")
    for revision in (None, "main"):
        with pytest.raises(ConfigurationError) as caught:
            PinnedDataset(dataset_repo.path, revision=revision)
        message = str(caught.value)
        assert f"dataset repository {str(dataset_repo.path)!r} looks damaged" in message, message
        assert re.search(what, message), message
        assert "uncommitted" not in message and "\nHINT: " in message
    pinned = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)  # the commit itself still reads right
    assert pinned.file("train.csv").read_bytes() == (dataset_repo.path / "train.csv").read_bytes()


def test_a_staged_change_undone_in_the_working_tree_is_still_uncommitted(dataset_repo):
    """Not damage: the change waits in the staging area, while the working tree holds the commit's bytes."""
    train = dataset_repo.path / "train.csv"
    committed = train.read_bytes()
    train.write_bytes(committed + b"9,9\n")
    subprocess.run([sys.executable, "-c", "import sys; from oxen_callbacks._oxen.repo import LocalRepo; "
                    "LocalRepo(sys.argv[1]).add('train.csv')", str(dataset_repo.path)], check=True, timeout=120)
    train.write_bytes(committed)
    with pytest.raises(ConfigurationError, match=r"has uncommitted changes in the pinned paths: train\.csv\."):
        PinnedDataset(dataset_repo.path)


def test_model_repository_with_a_garbled_config_is_named(tmp_path):
    from oxen_callbacks import OxenLightningCallback

    models = make_repo(tmp_path / "models", [("one", {"a.txt": "a"})])
    (models.path / ".oxen" / "config.toml").write_text('[[remotes]\nname = "origin"\n')
    with pytest.raises(ConfigurationError, match=rf"model repository {re.escape(repr(str(models.path)))} looks "
                                                 r"damaged: \.oxen/config\.toml cannot be read.*\nHINT: "):
        OxenLightningCallback(model_repo=models.path, remote="origin", mlflow=False)


# -- a snapshot changed in place: caught before the first step, in every adapter --------------------
def test_lightning_refuses_a_snapshot_cut_in_place(dataset_repo, tmp_path):
    from lightning_model import CsvData, TinyModel, make_trainer

    from oxen_callbacks import OxenLightningCallback

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head)
    train = pin.pull() / "train.csv"
    rows = train.read_bytes().splitlines(keepends=True)
    train.parent.chmod(0o755)
    train.chmod(0o644)
    train.write_bytes(b"".join(rows[: len(rows) // 2]))
    model = TinyModel()
    callback = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    with pytest.raises(DatasetMismatchError, match=r"changed on disk: '\.' holds 2 files, \d+ bytes; recorded"):
        make_trainer(tmp_path, [callback], epochs=1).fit(model, datamodule=CsvData(pin))
    assert model.labels_seen == set()


def test_a_removal_staged_with_the_file_kept_is_uncommitted_not_damage(dataset_repo):
    """`oxen rm --staged`: the removal waits in the staging area, the file (the commit's bytes) stays
    in the working tree, which Oxen's status then lists as untracked."""
    subprocess.run([sys.executable, "-c", "import sys, oxen; oxen.Repo(sys.argv[1]).rm('train.csv', False, True)",
                    str(dataset_repo.path)], check=True, timeout=120)
    with pytest.raises(ConfigurationError, match=r"has uncommitted changes in the pinned paths: train\.csv\."):
        PinnedDataset(dataset_repo.path)


def test_a_status_read_after_the_branch_moved_is_no_damage(dataset_repo, tmp_path):
    """The pin resolved commit A, then a commit moved the branch to B while the working tree still holds
    A's bytes: against B they are a change, not damage of A's records."""
    a, b = dataset_repo.commits
    (dataset_repo.path / "train.csv").write_bytes(file_at(dataset_repo.path, a, "train.csv", tmp_path / "read").read_bytes())
    assert oxen_child.changed_paths(dataset_repo.path, a, ["."]) == {"changed": ["train.csv"], "unchanged": []}
    assert oxen_child.changed_paths(dataset_repo.path, b, ["."]) == {"changed": ["train.csv"], "unchanged": []}
