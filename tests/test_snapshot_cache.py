"""The snapshot cache under faults: files lost from a snapshot, pins killed mid-copy, long waits for a pin."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import xxhash
from helpers import children, make_repo, process_running, process_tree, wait_until_released

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import layout as oxen_layout
from oxen_callbacks.errors import ConfigurationError, DatasetMismatchError


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


PIN = "import sys; from oxen_callbacks import PinnedDataset; PinnedDataset(sys.argv[1], revision=sys.argv[2]).pull()"


def stalled_pin(tmp_path: Path, files: int = 20) -> tuple:
    """A repository whose last stored file is a named pipe, and a pin of it in its own process: it copies
    the other files, then waits at the pipe for real (it holds the commit's lock and its scratch folder)."""
    contents = {f"part-{i:02d}.bin": os.urandom(64 << 10) + bytes([i]) for i in range(files)}
    repo = make_repo(tmp_path / "data", [("one", contents)])
    stored = oxen_layout.version_path(repo.path, xxhash.xxh3_128_intdigest(contents["part-19.bin"]))
    saved = stored.read_bytes()
    stored.unlink()
    os.mkfifo(stored)
    proc = subprocess.Popen([sys.executable, "-c", PIN, str(repo.path), repo.head], stderr=subprocess.DEVNULL)
    tmp = tmp_path / "cache" / "tmp"
    deadline = time.monotonic() + 60
    while not any(p.is_dir() and len(list(p.iterdir())) >= files - 1 for p in tmp.glob("*")):
        assert time.monotonic() < deadline and proc.poll() is None, "the pin never reached the pipe"
        time.sleep(0.05)
    return repo, proc, stored, saved


def test_a_pin_killed_mid_copy_leaves_no_copy_in_the_cache_for_good(tmp_path):
    """kill -9 of a pin (OOM killer, scancel) left its scratch copy of the data in <cache>/tmp forever."""
    repo, proc, stored, saved = stalled_pin(tmp_path)
    for pid in process_tree(proc.pid):  # the pinning process and its copier, at once
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    tmp = tmp_path / "cache" / "tmp"
    assert not wait_until_released(tmp)
    stored.unlink()
    stored.write_bytes(saved)
    pin = PinnedDataset(repo.path, revision=repo.head, verify=True)
    assert pin.file("part-19.bin").read_bytes() == saved
    assert list(tmp.iterdir()) == []  # the next pin into the cache swept it


def test_a_pin_waiting_for_a_stuck_pin_of_the_same_commit_says_so(tmp_path, monkeypatch):
    """Another DDP rank or notebook pinning the same commit holds its lock; once the wait ended after an
    hour (while a pin may take two) as 'the snapshot cache is not writable ... free some space'."""
    from oxen_callbacks import pin as pin_module
    from oxen_callbacks.errors import OxenError

    repo, proc, stored, saved = stalled_pin(tmp_path)
    try:
        assert pin_module.PIN_WAIT_S > 2 * 3600  # longer than the stuck pin's own copy may take
        monkeypatch.setattr(pin_module, "PIN_WAIT_S", 1.0)
        waiting = PinnedDataset(repo.path, revision=repo.head)
        with pytest.raises(OxenError, match=r"Another process has been pinning .* for 1s and still holds its lock"):
            waiting.pull()
    finally:
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    stored.unlink()
    stored.write_bytes(saved)
    assert waiting.file("part-19.bin").read_bytes() == saved  # its lock went with the killed process


def test_the_copier_of_a_pin_killed_by_sigkill_stops_with_it(tmp_path):
    """It went on (up to two hours, or here for ever at the pipe), copying data nobody would read."""
    repo, proc, stored, saved = stalled_pin(tmp_path)
    [copier] = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the pinning process alone, as the OOM killer does
    proc.wait()
    deadline = time.monotonic() + 10
    while process_running(copier) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = not process_running(copier)
    if not stopped:
        os.kill(copier, signal.SIGKILL)
    assert stopped


def test_a_snapshot_planted_in_a_shared_cache_with_records_to_match_is_not_taken_for_the_commit(dataset_repo):
    """Anyone who can write a shared cache can replace a snapshot's bytes and rewrite its manifest and
    hash record to match: the deep check must compare with the repository's own tree, so `verify(deep)`
    says so and `pull_intact()` (`reproduce`, `diff`) makes the snapshot again from the commit."""
    import json

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, paths=["train.csv"])
    folder = pin.pull()
    real = (folder / "train.csv").read_bytes()
    planted = real.replace(b"0", b"1")  # same size, other labels
    assert planted != real and len(planted) == len(real)
    subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
    (folder / "train.csv").write_bytes(planted)
    record = pin.store.base / f"{pin.commit}.hashes.json"
    hashes = json.loads(record.read_text())
    hashes["files"]["train.csv"] = format(xxhash.xxh3_128_intdigest(planted), "032x")
    record.write_text(json.dumps(hashes))

    again = PinnedDataset(dataset_repo.path, revision=dataset_repo.head, paths=["train.csv"])
    with pytest.raises(DatasetMismatchError, match="unlike the repository"):
        again.verify(deep=True)
    assert (again.pull_intact() / "train.csv").read_bytes() == real
    again.verify(deep=True)


@contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    """A real filesystem of ``size`` at ``where`` (tmpfs: needs the right to mount, else the test is skipped)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.parametrize("files", [{"big.bin": 3 << 20}, {f"part{i}.bin": 300 << 10 for i in range(10)}],
                         ids=["one-large-file", "small-files"])
def test_a_full_cache_disk_is_a_clear_error_naming_the_cache(tmp_path, files):
    """A full disk said `OxenError: BufferError: cannot close exported pointers exist` (a large file) or
    `OSError: [Errno 28]` naming nothing (small files) (adversarial review)."""
    repo = make_repo(tmp_path / "data", [("one", {rel: os.urandom(size) for rel, size in files.items()})])
    with small_disk(tmp_path / "small") as disk:
        pin = PinnedDataset(repo.path, revision=repo.head, cache_dir=disk / "cache")
        with pytest.raises(ConfigurationError, match=rf"snapshot cache '{disk}/cache' is full: No space left on device"
                                                     r".*\nHINT: free some space, or pass cache_dir="):
            pin.pull()
        assert not pin.is_pulled


def test_a_large_file_copy_out_of_space_reports_that_not_a_buffer_error(tmp_path, monkeypatch):
    """The in-kernel copy of a large file failing for want of room (injected: the copy runs in this process
    here) left a slice of the stored file's map alive, so closing the map raised BufferError instead."""
    from oxen_callbacks._oxen import store_copy

    repo = make_repo(tmp_path / "data", [("one", {"big.bin": os.urandom(3 << 20)})])
    dest = tmp_path / "dest"
    dest.mkdir()

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_copy.os, "copy_file_range", full)
    monkeypatch.setattr(store_copy._Copier, "_clone", lambda *_args: False)  # (a filesystem that reflinks copies nothing)
    outcome = store_copy.child_copy(str(repo.path), repo.head, ["."], str(dest))
    assert outcome == {"no_space": os.strerror(errno.ENOSPC), "errno": errno.ENOSPC}
