"""What is committed for a checkpoint is what the trainer saved, whatever its files go through next:
written over in place (user code after ``fit()``, another run saving into the same folder), or a
checkpoint folder holding things that are not files (a named pipe, a dangling link, a link back up).

Checkpoints are frozen by hard link (microseconds, whatever their size): until the commit worker
stages one, it shares the trainer's inode. These tests found that a write in place then reached the
commit, and after it the model repository's working tree, unnoticed (an adversarial review)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from helpers import file_at

from oxen_callbacks.run import LineageRun


def _run(tmp_path: Path, name: str) -> LineageRun:
    run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "1"), mlflow=False,
                     run_name=name, author=("T", "t@example.com"))
    run.start()
    return run


def test_a_checkpoint_written_over_before_its_commit_is_committed_as_changed_never_as_the_save(tmp_path, caplog):
    """``torch.save(stripped, trainer.checkpoint_callback.best_model_path)`` right after ``fit()``, while
    the commit is still queued: its lineage entry must not pass the new bytes off as the step's save."""
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights and optimizer state " * 40)
    run = _run(tmp_path, "stripped")
    run.checkpoint_saved(ckpt, step=12, epoch=2)
    with open(ckpt, "wb") as out:  # in place, as torch.save and open(path, "wb") write
        out.write(b"weights only " * 20)
    [entry] = run.finish("FINISHED")["checkpoints"]
    assert entry["changed_after_save"] == ["."]
    assert file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read").read_bytes() == \
        b"weights only " * 20
    assert "was written over in place after it was saved" in caplog.text


def test_a_write_after_the_commit_never_reaches_the_model_repository(tmp_path):
    """Once committed, the model repository's file is its own: the trainer's file written over in place
    (a second fit into the same folder with ``enable_version_counter=False``, whose temporary file is
    copied over ``last.ckpt`` when TMPDIR is another filesystem) leaves the first run's folder alone."""
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"run one's weights")
    ckpt.chmod(0o644)  # (fsspec gives Lightning's files the first umask it saw in the process)
    old = os.umask(0o077)
    try:
        first = _run(tmp_path, "one")
        first.checkpoint_saved(ckpt, step=4, epoch=0)
        [entry] = first.finish("FINISHED")["checkpoints"]
    finally:
        os.umask(old)
    assert "changed_after_save" not in entry
    in_repo = tmp_path / "models" / entry["path"]
    assert os.stat(in_repo).st_ino != os.stat(ckpt).st_ino
    assert in_repo.stat().st_mode & 0o777 == 0o600  # its own copy, as private as the umask

    second = _run(tmp_path, "two")
    ckpt.write_bytes(b"run one's weights, then more")  # a write before the second run knows the file
    aside = second.before_overwrite(str(ckpt))  # the second run's save, through its CheckpointIO
    with open(ckpt, "wb") as out:
        out.write(b"run two's weights")
    assert aside is None or aside.drop() is None
    second.checkpoint_saved(ckpt, step=4, epoch=0)
    [later] = second.finish("FINISHED")["checkpoints"]
    assert in_repo.read_bytes() == b"run one's weights"
    assert file_at(tmp_path / "models", later["commit"], later["path"], tmp_path / "read").read_bytes() == \
        b"run two's weights"


def test_a_save_over_a_file_another_run_still_has_queued_keeps_that_runs_bytes(tmp_path):
    """The same, while the first run's commit is still queued: the second run's save must get a new
    inode, not rewrite the one the first run froze (it was moved aside only when this run published it)."""
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"run one's weights")
    first, second = _run(tmp_path, "one"), _run(tmp_path, "two")
    first.checkpoint_saved(ckpt, step=4, epoch=0)
    aside = second.before_overwrite(str(ckpt))  # (before the first run's worker stages its save)
    with open(ckpt, "wb") as out:
        out.write(b"run two's weights")
    if aside is not None:
        aside.drop()
    [entry] = first.finish("FINISHED")["checkpoints"]
    assert "changed_after_save" not in entry
    assert file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read").read_bytes() == \
        b"run one's weights"
    second.finish("FINISHED")


@pytest.mark.timeout(120)
def test_a_checkpoint_folder_holding_what_is_not_a_file_is_committed_without_it(tmp_path, caplog):
    """A named pipe hung the commit reading it (and the script's exit waiting for it); a dangling link,
    a socket or a link back up the folder stopped training at the save. The files are committed, the
    rest is named in the lineage entry."""
    folder = tmp_path / "out" / "checkpoint-1"
    (folder / "inner").mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights")
    (folder / "inner" / "config.json").write_text("{}")
    os.mkfifo(folder / "pipe")
    (folder / "gone.bin").symlink_to(tmp_path / "nowhere")
    (folder / "inner" / "up").symlink_to("..")
    home = tmp_path / "home"
    (home / ".config" / "oxen").mkdir(parents=True)
    (home / ".config" / "oxen" / "auth_config.toml").write_text('token = "a-secret"')
    (folder / "home").symlink_to(home)  # (a link to a folder elsewhere: not the checkpoint's)
    (folder / "alias").symlink_to(folder / "inner")  # (a link to a folder of it, met before or after it:
    (folder / "inner" / "twin").symlink_to(folder / "inner")  # the folder is committed under its own name)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(folder / "sock"))
        run = _run(tmp_path, "odd")
        run.checkpoint_saved(folder, step=1, epoch=0)
    [entry] = run.finish("FINISHED")["checkpoints"]
    assert entry["files"] == 2 and sorted(entry["skipped"]) == [
        "alias: a link to a folder of the checkpoint (committed once, under its own name)",
        "gone.bin: No such file or directory", "home: a link to a folder outside the checkpoint",
        "inner/twin: a link to a folder of the checkpoint (committed once, under its own name)",
        "inner/up: a link to a folder of the checkpoint (committed once, under its own name)",
        "pipe: not a regular file", "sock: not a regular file"]
    from oxen_callbacks.checkpoints import materialize_checkpoint

    committed = materialize_checkpoint(tmp_path / "models", run="odd", step=1).path  # (no secret of the linked folder)
    assert sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*") if p.is_file()) == [
        "inner/config.json", "model.bin"]
    for rel, data in (("model.bin", b"weights"), ("inner/config.json", b"{}")):
        assert file_at(tmp_path / "models", entry["commit"], f"{entry['path']}/{rel}", tmp_path / "read").read_bytes() \
            == data
    assert "left out of its commit" in caplog.text


def test_links_to_files_in_a_checkpoint_folder_are_committed_as_their_content(tmp_path):
    """A checkpoint folder that links to shared files (a tokenizer kept once, weights linked from the
    step they were saved at): what it links to is committed under the link's name, as bytes, and
    written over later the original does not change the commit."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tokenizer.json").write_text('{"vocab": 3}')
    folder = tmp_path / "out" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights two")
    (folder / "tokenizer.json").symlink_to(shared / "tokenizer.json")  # outside the folder
    (folder / "weights.bin").symlink_to("model.bin")  # inside it, relative
    run = _run(tmp_path, "linked")
    run.checkpoint_saved(folder, step=2, epoch=0)
    os.unlink(shared / "tokenizer.json")  # gone (or rewritten) after the save: the save's bytes stay
    (shared / "tokenizer.json").write_text('{"vocab": 4}')
    [entry] = run.finish("FINISHED")["checkpoints"]
    assert entry["files"] == 3 and not entry.get("skipped")
    for rel, data in (("model.bin", b"weights two"), ("weights.bin", b"weights two"), ("tokenizer.json", b'{"vocab": 3}')):
        committed = file_at(tmp_path / "models", entry["commit"], f"{entry['path']}/{rel}", tmp_path / "read")
        assert committed.read_bytes() == data and not committed.is_symlink()


def test_a_checkpoint_whose_name_holds_a_backslash_leaves_its_run_readable(tmp_path):
    """``val\\loss=0.50.ckpt`` is a name Linux allows and lineage records refuse (a path separator to
    Windows): committed under that name, it made the whole run's record unreadable, so none of its
    checkpoints could be materialized or resumed from."""
    from oxen_callbacks.checkpoints import materialize_checkpoint, resolve_resume

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "val\\loss=0.50.ckpt").write_bytes(b"step two")
    (folder / "last.ckpt").write_bytes(b"step four")
    run = _run(tmp_path, "odd-names")
    run.checkpoint_saved(folder / "val\\loss=0.50.ckpt", step=2, epoch=0)
    run.checkpoint_saved(folder / "last.ckpt", step=4, epoch=1)
    record = run.finish("FINISHED")
    assert ["\\" in c["path"] for c in record["checkpoints"]] == [False, False]
    for step, data in ((2, b"step two"), (4, b"step four")):
        assert materialize_checkpoint(tmp_path / "models", run="odd-names", step=step).path.read_bytes() == data
    assert resolve_resume(tmp_path / "models", "odd-names").path.read_bytes() == b"step four"


def test_a_table_oxen_cannot_parse_is_named_as_not_in_its_checkpoints_commit(tmp_path):
    """Oxen does not commit a file it reads as a table (.csv, .parquet...) and cannot parse, and says
    nothing: the lineage entry claimed a commit holding the whole checkpoint folder though it lacked that
    file. The entry names it (not_committed), `lineage` shows it, and the other files are committed."""
    from oxen_callbacks.cli.lineage import entry_notes

    folder = tmp_path / "out" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights")
    (folder / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (folder / "predictions.csv").write_bytes(b"x\x01" + bytes(range(256)) * 4)  # (binary: no table)
    run = _run(tmp_path, "tables")
    run.checkpoint_saved(folder, step=1, epoch=0)
    [entry] = run.finish("FINISHED")["checkpoints"]
    assert entry["not_committed"] == [f"{entry['path']}/predictions.csv"]
    for rel, data in (("model.bin", b"weights"), ("metrics.csv", b"step,loss\n1,0.5\n")):
        assert file_at(tmp_path / "models", entry["commit"], f"{entry['path']}/{rel}", tmp_path / "read").read_bytes() \
            == data
    assert any("predictions.csv" in note for note in entry_notes(entry))
