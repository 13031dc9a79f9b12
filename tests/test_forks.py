"""Processes the training process forks without exec (a ``multiprocessing`` fork ``Pool``, data-loading
workers) do not keep our helpers' pipes: the end of a fit does not wait for them, and the files
they hold of their own stay theirs."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_every_saved_checkpoint_committed, process_running
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._publish import warm_worker
from oxen_callbacks._util.fork_guard import keep_from_forks
from oxen_callbacks.lightning import OxenLightningCallback


def test_a_fork_pool_alive_across_the_fit_does_not_hold_its_end(dataset_repo, tmp_path, caplog):
    """The pool is forked after the callback started its commit worker, and lives on after fit():
    the worker still hears the end of the fit, and its stdin close when we let it go, and exits (it
    waited its 60 s limit, then was left running, when the pool kept the pipe open)."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    caplog.set_level(logging.WARNING, logger="oxen_callbacks")
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(os.getpid) != os.getpid()
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1), cb], epochs=2
                     ).fit(TinyModel(), datamodule=CsvData(pin))
        worker = cb.run.publisher._proc
        record = cb.lineage
        assert record["status"] == "FINISHED" and len(record["checkpoints"]) == 2
        assert "still busy" not in caplog.text
        assert warm_worker._take_idle() is worker  # waiting for this process's next fit
        warm_worker._close(worker)  # (as this process's exit does)
        worker.wait(timeout=30)  # not held by the pool's copy of our pipe end
        assert pool.apply(sum, ([1, 2],)) == 3  # the pool's process works on


def test_a_forked_child_drops_our_pipe_but_keeps_a_reused_number(tmp_path):
    """A guarded pipe end no longer keeps the pipe open in a forked child (the reader gets EOF while
    the child lives); a guarded number closed and then reused for the user's file is left alone."""
    read_end, write_end = os.pipe()
    ours = os.fdopen(write_end, "wb")
    keep_from_forks(ours)
    gone_read, gone_write = os.pipe()
    gone = os.fdopen(gone_write, "wb")
    keep_from_forks(gone)
    number = gone.fileno()
    gone.close()
    os.close(gone_read)
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's bytes")
    opened = os.open(mine, os.O_RDONLY)
    os.dup2(opened, number)  # the user's file now has the number a guarded pipe end had
    os.close(opened)
    done_read, done_write = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=_hold_and_read, args=(number, done_write))
    child.start()
    os.close(done_write)
    ours.close()
    os.close(number)
    try:
        assert os.read(done_read, 100) == b"the user's bytes"
        assert os.read(read_end, 1) == b""
        assert child.is_alive()  # EOF came while the child lives, not when it exited
    finally:
        child.terminate()
        child.join(30)


def _hold_and_read(number: int, done: int) -> None:
    os.write(done, os.pread(number, 100, 0))
    time.sleep(60)  # alive while the parent waits for EOF (terminated then)


@pytest.mark.timeout(600)
def test_a_trainer_killed_while_its_forked_child_lives_still_gets_its_lineage_committed(dataset_repo, tmp_path):
    """SIGKILL right after fit() while a child the trainer forked (never exec'd) lives on: the commit
    worker sees its stdin close all the same (the child does not hold it), commits the final lineage
    and exits, long before the child does; nothing is left for `sync`."""
    pids_file = tmp_path / "pids.json"
    log = tmp_path / "fit.log"
    with log.open("w") as out:  # (a file: the forked child keeps the script's stdout and stderr)
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "fit_script.py"), "--dataset",
                               str(dataset_repo.path), "--revision", dataset_repo.commits[0], "--model-repo",
                               str(tmp_path / "models"), "--root", str(tmp_path / "fit"), "--epochs", "2",
                               "--after-fit", "kill", "--forked-child", str(pids_file)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == -9, log.read_text()[-3000:]
    pids = json.loads(pids_file.read_text())
    try:
        deadline = time.monotonic() + 90
        while process_running(pids["worker"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_running(pids["worker"]), "the commit worker still waits for its stdin to close"
        assert process_running(pids["forked"])  # it still holds what it inherited, our pipe ends pointed away
    finally:
        os.kill(pids["forked"], signal.SIGKILL)
    [run] = (tmp_path / "models" / "runs").iterdir()
    record = read_lineage(run / "lineage.json")
    assert record["status"] == "FINISHED"
    assert_every_saved_checkpoint_committed(tmp_path / "models", record, tmp_path / "fit" / "ckpt", tmp_path / "read")
