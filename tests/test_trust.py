"""Lineage you can trust: reused run names, killed commit processes, shared file names, mute remotes."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import children, file_at, wait_until_released
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._ops.trace import LineageFinder
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._publish.batches import Batches
from oxen_callbacks._publish.claim import claims_dir
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback

SCRIPT = Path(__file__).parent / "fit_script.py"


def _pin(dataset_repo, commit_index: int = 0) -> PinnedDataset:  # type: ignore[no-untyped-def]
    return PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[commit_index], paths=["train.csv", "val.csv"])


def _fit(root: Path, pin: PinnedDataset, cb: OxenLightningCallback, *extra: Callback, epochs: int = 1,
         model: TinyModel | None = None, ckpt_path: str | None = None) -> TinyModel:
    model = model or TinyModel()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(root, [ckpt, cb, *extra], epochs=epochs).fit(model, datamodule=CsvData(pin), ckpt_path=ckpt_path)
    return model


# -- run names --------------------------------------------------------------------------------
def test_a_reused_run_name_is_refused_before_training_and_the_first_lineage_stays_right(dataset_repo, tmp_path):
    models = tmp_path / "models"
    first = OxenLightningCallback(dataset=_pin(dataset_repo, 0), model_repo=models, run_name="nightly", mlflow=False)
    _fit(tmp_path / "a", first.dataset, first)
    assert first.lineage["status"] == "FINISHED"  # (waits for the final lineage commit fit() did not wait for)
    before = (models / "runs" / "nightly" / "lineage.json").read_bytes()

    second_pin = _pin(dataset_repo, 1)  # the script runs again, the branch has moved
    second = OxenLightningCallback(dataset=second_pin, model_repo=models, run_name="nightly", mlflow=False)
    assert second.lineage is None  # never fitted: the first run's record is not this one's
    model = TinyModel()
    with pytest.raises(ConfigurationError, match=r"(?s)run_name='nightly' is already taken.*HINT: omit run_name"):
        _fit(tmp_path / "b", second_pin, second, model=model)
    assert not model.labels_seen  # refused before the first step
    assert second.lineage is None  # nor once refused
    assert (models / "runs" / "nightly" / "lineage.json").read_bytes() == before
    for entry in read_lineage(before.decode())["checkpoints"]:  # every checkpoint still traces to commit A
        runs = LineageFinder(model_repos=[models]).trace(entry["commit"])["runs"]
        assert [r["dataset"]["commit"] for r in runs] == [dataset_repo.commits[0]]

    third = OxenLightningCallback(dataset=second_pin, model_repo=models, mlflow=False)  # no name: a unique one
    _fit(tmp_path / "c", second_pin, third)
    assert third.lineage["run"]["name"] != "nightly" and third.lineage["status"] == "FINISHED"


def test_a_run_name_in_use_by_a_live_process_is_refused(dataset_repo, tmp_path):
    models = tmp_path / "models"
    live = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
         "--model-repo", str(models), "--root", str(tmp_path / "live"), "--run-name", "shared",
         "--step-sleep", "0.3", "--epochs", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        claim = claims_dir(models) / "shared.claim"
        deadline = time.monotonic() + 120
        while not (claim.exists() and claim.read_text()) and live.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.poll() is None, live.stderr.read()[-2000:] if live.stderr else ""
        pin = _pin(dataset_repo, 1)
        again = OxenLightningCallback(dataset=pin, model_repo=models, run_name="shared", mlflow=False,
                                      resume_from=None)
        with pytest.raises(ConfigurationError, match=rf"run_name='shared' is in use: process {live.pid} "):
            _fit(tmp_path / "again", pin, again)
    finally:
        _, err = live.communicate(timeout=300)
    assert live.returncode == 0, err[-3000:]
    lineage = read_lineage(models / "runs" / "shared" / "lineage.json")
    assert lineage["dataset"]["commit"] == dataset_repo.commits[0] and lineage["status"] == "FINISHED"
    assert all(c["source"].startswith(str(tmp_path / "live")) for c in lineage["checkpoints"])


def test_resume_from_continues_the_named_run(dataset_repo, tmp_path):
    models = tmp_path / "models"
    first = OxenLightningCallback(dataset=_pin(dataset_repo, 0), model_repo=models, run_name="long", mlflow=False)
    _fit(tmp_path / "a", first.dataset, first)
    done = first.lineage["checkpoints"]

    again = OxenLightningCallback(model_repo=models, run_name="long", resume_from="long", mlflow=False)
    _fit(tmp_path / "b", again.dataset, again, epochs=2, ckpt_path=again.ckpt_path)
    lineage = again.lineage
    assert lineage["run"]["name"] == "long" and lineage["dataset"]["commit"] == dataset_repo.commits[0]
    assert lineage["checkpoints"][:len(done)] == done  # the run goes on: earlier checkpoints kept
    assert lineage["checkpoints"][-1]["step"] > done[-1]["step"]
    resumed = lineage["resumed_from"]  # the weights came from the run's last committed checkpoint
    assert (resumed["commit"], resumed["path"], resumed["step"]) == (done[-1]["commit"], done[-1]["path"], done[-1]["step"])


def test_a_resumed_fit_records_the_committed_checkpoint_its_weights_come_from(dataset_repo, tmp_path, capsys):
    """ckpt_path= a file an earlier run saved (not its last): the lineage names that checkpoint's commit
    in its model repository, not just the earlier run's name (whose record lists several)."""
    from oxen_callbacks import cli

    models, pin = tmp_path / "models", _pin(dataset_repo, 0)
    first = OxenLightningCallback(dataset=pin, model_repo=models, run_name="r1", mlflow=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=6, save_top_k=-1)
    make_trainer(tmp_path / "a", [ckpt, first], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    earlier = next(c for c in first.lineage["checkpoints"] if c["step"] == 6)
    local = tmp_path / "a" / os.path.basename(earlier["path"])

    second = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False)
    make_trainer(tmp_path / "b", [second], epochs=3, enable_checkpointing=False).fit(
        TinyModel(), datamodule=CsvData(pin), ckpt_path=local)
    resumed = second.lineage["resumed_from"]
    assert resumed["run_name"] == "r1" and resumed["model_repo"] == str(models.resolve())
    assert (resumed["commit"], resumed["path"], resumed["step"]) == (earlier["commit"], earlier["path"], 6)
    assert resumed["file"] == str(local)
    assert cli.main(["lineage", second.lineage["run"]["name"], "--model-repo", str(models)]) == 0
    assert f"resumed from {models.resolve()} @ {earlier['commit']}  {earlier['path']}  step 6  run r1" in capsys.readouterr().out

    plain = tmp_path / "plain.ckpt"  # saved without the callback: what it is, said as such
    trainer = make_trainer(tmp_path / "c", [], epochs=1, enable_checkpointing=False)
    trainer.fit(TinyModel(), datamodule=CsvData(pin))
    trainer.save_checkpoint(plain)
    third = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False)
    make_trainer(tmp_path / "d", [third], epochs=2, enable_checkpointing=False).fit(
        TinyModel(), datamodule=CsvData(pin), ckpt_path=plain)
    assert third.lineage["resumed_from"] | {"file": str(plain), "commit": None, "run_name": None} == third.lineage["resumed_from"]


# -- killed commit processes ------------------------------------------------------------------
class SlowSteps(Callback):
    def on_train_batch_end(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        time.sleep(0.25)


class CommitProcessKiller(Callback):
    """SIGKILLs the publishing worker's commit processes (its forked children) while the fit runs."""

    def __init__(self, oxen_cb: OxenLightningCallback, *, every: tuple[float, float], limit: int,
                 through_fit_end: bool = False) -> None:
        self.oxen_cb, self.every, self.limit, self.through_fit_end = oxen_cb, every, limit, through_fit_end
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._thread = threading.Thread(target=self._kill, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if not self.through_fit_end:
            self.stop()

    def _kill(self) -> None:
        rng = random.Random(7)
        while not self._stop.wait(rng.uniform(*self.every)) and len(self.killed) < self.limit:
            publisher = self.oxen_cb.run.publisher
            worker = publisher.worker_pid if publisher else None
            for pid in (children(worker) if worker else [])[:self.limit - len(self.killed)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass


def _assert_all_committed(models: Path, lineage: dict, ckpt_dir: Path) -> None:  # type: ignore[type-arg]
    commits = set(LocalRepo(models).commit_ids())
    assert sorted(Path(c["path"]).name for c in lineage["checkpoints"]) == sorted(p.name for p in ckpt_dir.iterdir())
    assert all(c["commit"] in commits for c in lineage["checkpoints"])
    for entry in lineage["checkpoints"]:  # the bytes in each commit are the file the trainer wrote
        committed = file_at(models, entry["commit"], entry["path"], models.parent / "verify-cache")
        assert committed.read_bytes() == (ckpt_dir / Path(entry["path"]).name).read_bytes()


def test_killed_commit_processes_never_stop_training_and_lose_nothing(dataset_repo, tmp_path):
    pin = _pin(dataset_repo)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    # as many kills as one task may lose: never enough in a row, however slow the machine, to give up
    killer = CommitProcessKiller(cb, every=(0.4, 1.0), limit=Batches.RESTARTS)
    _fit(tmp_path, pin, cb, SlowSteps(), killer, epochs=3)
    assert len(killer.killed) >= 3
    assert cb.lineage["status"] == "FINISHED" and cb.run.publisher.stalled is None
    _assert_all_committed(tmp_path / "models", cb.lineage, tmp_path / "ckpt")
    log = cb.run.publisher.queue.log_path.read_text()
    assert "again in a new commit process" in log


def test_scratch_files_of_a_killed_add_go_at_the_next_worker_start_and_the_store_is_walked_only_then(
        dataset_repo, tmp_path):
    """A commit process killed inside `oxen add` leaves scratch files in the content store and the marker of
    its batch: the next worker's start removes both. A batch that ends leaves no marker, and then the store,
    which grows with every version ever committed, is not walked (a scratch file that is not ours stays)."""
    from oxen_callbacks._oxen import layout as oxen_layout
    from oxen_callbacks._publish.adding import adding_marker

    models, pin = tmp_path / "models", _pin(dataset_repo)

    def fit_and_wait(root: Path) -> None:
        cb = OxenLightningCallback(dataset=pin, model_repo=models, mlflow=False)
        _fit(root, pin, cb)
        assert cb.lineage["status"] == "FINISHED"
        assert not wait_until_released(models)  # its worker and commit process are done

    fit_and_wait(tmp_path / "a")
    marker = adding_marker(models)
    assert not marker.exists()  # every batch ended
    killed = oxen_layout.version_scratch(models, "killed-mid-add")
    killed.write_bytes(b"half a checkpoint")
    marker.touch()  # what the killed commit process left
    fit_and_wait(tmp_path / "b")
    assert not killed.exists() and not marker.exists()
    assert oxen_layout.orphan_temp_files(models, older_than_s=0) == []

    stranger = oxen_layout.version_scratch(models, "not-ours")
    stranger.write_bytes(b"someone's own oxen add")
    fit_and_wait(tmp_path / "c")
    assert stranger.exists() and not marker.exists()


def test_a_commit_process_killed_while_it_stores_a_checkpoint_leaves_no_scratch_file(tmp_path):
    """A real SIGKILL of the commit process while it copies a 200 MB checkpoint into Oxen's content store:
    the commit process that takes over removes the scratch copy before its own batch, and the checkpoint
    is committed whole."""
    from oxen_callbacks._oxen import layout as oxen_layout
    from oxen_callbacks._publish.adding import adding_marker
    from oxen_callbacks.run import LineageRun

    models = tmp_path / "models"
    run = LineageRun(dataset=None, model_repo=models, framework=("test", "0"), mlflow=False)
    run.start()
    checkpoint = tmp_path / "big.ckpt"
    checkpoint.write_bytes(os.urandom(200 << 20))
    run.checkpoint_saved(checkpoint, step=1, epoch=0)
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        if oxen_layout.orphan_temp_files(models, older_than_s=0):  # mid-copy
            for pid in children(run.publisher.worker_pid):
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.001)
    assert killed is not None, "the commit process never copied the checkpoint"
    assert oxen_layout.orphan_temp_files(models, older_than_s=0) and adding_marker(models).exists()  # what it left
    record = run.finish("FINISHED")
    assert record is not None and record["status"] == "FINISHED"
    assert not wait_until_released(models)
    assert oxen_layout.orphan_temp_files(models, older_than_s=0) == []
    [entry] = record["checkpoints"]
    assert file_at(models, entry["commit"], entry["path"], tmp_path / "read-cache").read_bytes() == checkpoint.read_bytes()


def test_commit_processes_that_keep_dying_are_reported_once_and_sync_finishes(dataset_repo, tmp_path, caplog):
    pin = _pin(dataset_repo)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    # every commit process, as soon as it exists, until fit() has returned
    killer = CommitProcessKiller(cb, every=(0.01, 0.02), limit=10_000, through_fit_end=True)
    try:
        with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
            model = _fit(tmp_path, pin, cb, killer, epochs=2)
            cb.lineage  # the final lineage commit fit() did not wait for, while commits still die
    finally:
        killer.stop()
    assert model.labels_seen  # training went on to the end
    stopped = [r for r in caplog.records if "stopped" in r.getMessage() and "oxen-callbacks sync" in r.getMessage()]
    assert len(stopped) == 1, [r.getMessage() for r in caplog.records]
    assert cb.run.publisher.stalled

    report = sync.sync_all()  # the operator runs sync later: every journaled save is committed
    assert report["pending"] == 0, report
    lineage = read_lineage(tmp_path / "models" / "runs" / cb.run.run_name / "lineage.json")
    _assert_all_committed(tmp_path / "models", lineage, tmp_path / "ckpt")


# -- checkpoint paths -------------------------------------------------------------------------
def test_the_same_file_name_from_two_checkpoint_folders_gets_two_paths(dataset_repo, tmp_path):
    pin = _pin(dataset_repo)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    folders = [tmp_path / name / "ckpt" for name in ("a", "b", "c")]
    saves = [ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=0, save_last=True)
             for folder, every in zip(folders, (2, 3, 4))]
    make_trainer(tmp_path, [*saves, cb], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    entries = cb.lineage["checkpoints"]
    by_source: dict[str, set[str]] = {}
    for entry in entries:
        by_source.setdefault(entry["source"], set()).add(entry["path"])
    assert set(by_source) == {str(f / "last.ckpt") for f in folders}
    paths = [p for ps in by_source.values() for p in ps]
    assert len(paths) == 3 and len(set(paths)) == 3  # one path per file, never shared
    for folder in folders:  # the last commit of each path holds that folder's final last.ckpt
        last = [e for e in entries if e["source"] == str(folder / "last.ckpt")][-1]
        committed = file_at(tmp_path / "models", last["commit"], last["path"], tmp_path / "verify-cache")
        assert committed.read_bytes() == (folder / "last.ckpt").read_bytes()


# -- remotes ----------------------------------------------------------------------------------
def test_a_named_remote_of_a_model_repo_not_made_yet_is_refused_at_construction(tmp_path):
    with pytest.raises(ConfigurationError, match=r"remote='origin' is not a remote .*\(it has: none\)"):
        OxenLightningCallback(model_repo=tmp_path / "new-models", remote="origin", mlflow=False)


def test_a_mute_remote_costs_one_push_attempt_and_one_warning(dataset_repo, tmp_path, hanging_port, caplog):
    pin = _pin(dataset_repo)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False,
                               remote_url=f"http://127.0.0.1:{hanging_port}/ox/models", push_timeout=3)
    with caplog.at_level(logging.WARNING, logger="oxen_callbacks"):
        _fit(tmp_path, pin, cb, epochs=2)
        cb.lineage  # the final lineage commit (and its push) that fit() did not wait for
    pushes = [r for r in cb.run.publisher.results if r["kind"] == "push"]
    assert len(pushes) == 1 and not pushes[0]["ok"]  # not a second full timeout at the end
    warned = [r for r in caplog.records if "NOT pushed" in r.getMessage()]
    assert len(warned) == 1 and "oxen-callbacks sync" in warned[0].getMessage()
    assert cb.lineage["push"]["pushed"] is False
    _assert_all_committed(tmp_path / "models", cb.lineage, tmp_path / "ckpt")


_COMMIT_WHEN_TOLD = """
import sys
from oxen_callbacks._oxen.identity import commit_identity
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._publish.committer import Committer
repo = LocalRepo(sys.argv[1])
if sys.argv[2] == "add":
    repo.add("b.txt")
    sys.exit(0)
sys.stdin.readline()
with commit_identity(("Test", "test@example.com")):
    print(repo.commit("second") if sys.argv[2] == "plain" else Committer(repo)._commit("second"), flush=True)
"""


def test_a_commit_half_written_by_a_killed_process_is_committed_again(tmp_path):
    """What a commit killed after writing its data but before moving the branch leaves behind
    (seen for real under kill -9, about once in 30 kills): made here deterministically by undoing
    the branch move of a finished commit. Retried within the same second Oxen refuses the id."""
    from helpers import make_repo

    from oxen_callbacks._oxen import child as oxen_child

    repo = make_repo(tmp_path / "models", [("first", {"a.txt": "a"})])
    (repo.path / "b.txt").write_text("b")
    run = [sys.executable, "-c", _COMMIT_WHEN_TOLD, str(repo.path)]
    subprocess.run([*run, "add"], check=True, capture_output=True, timeout=60)
    saved = tmp_path / "before-commit"
    for name in ("refs", "staged", "HEAD"):
        src = repo.path / ".oxen" / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, saved / name)
    killed, ours = (subprocess.Popen([*run, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for kind in ("plain", "ours"))
    time.sleep(2.0)  # both have imported oxenai: what follows fits in one second
    time.sleep(1.02 - time.time() % 1.0)
    killed.stdin.write("\n")
    killed.stdin.flush()
    half_written = killed.communicate(timeout=60)[0].split()[-1]
    for name in ("refs", "staged", "HEAD"):  # as if the process died before the branch moved
        shutil.rmtree(repo.path / ".oxen" / name, ignore_errors=True)
        (shutil.copytree if (saved / name).is_dir() else shutil.copy2)(saved / name, repo.path / ".oxen" / name)
    ours.stdin.write("\n")
    ours.stdin.flush()
    out, err = ours.communicate(timeout=60)
    assert ours.returncode == 0, err[-2000:]
    # (on a machine so loaded that the two commits fell in different seconds, Oxen raises nothing
    # to recover from, and the commit below is a plain one: the assertions hold all the same)
    assert "already exists or is being written" in err or "committing again" not in err
    commit = out.split()[-1]
    assert commit != half_written
    assert oxen_child.branches(repo.path) == {"main": commit}
    assert file_at(repo.path, commit, "b.txt", tmp_path / "cache-check").read_text() == "b"


# -- review findings: run names and late jobs ------------------------------------------------
class Boom(Callback):
    def on_train_batch_start(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in the user's training_step")


def test_a_fit_that_failed_before_any_checkpoint_leaves_its_name_free(dataset_repo, tmp_path):
    models, pin = tmp_path / "models", _pin(dataset_repo)
    failed = OxenLightningCallback(dataset=pin, model_repo=models, run_name="exp1", mlflow=False)
    with pytest.raises(RuntimeError, match="a bug"):
        _fit(tmp_path / "a", pin, failed, Boom())
    again = OxenLightningCallback(dataset=pin, model_repo=models, run_name="exp1", mlflow=False)
    _fit(tmp_path / "b", pin, again)  # the user fixed the bug and runs the same script again
    assert again.lineage["run"]["name"] == "exp1" and again.lineage["status"] == "FINISHED"
    assert all(c["source"].startswith(str(tmp_path / "b")) for c in again.lineage["checkpoints"])


def test_continuing_a_run_on_another_dataset_commit_is_refused(dataset_repo, tmp_path):
    models = tmp_path / "models"
    first = OxenLightningCallback(dataset=_pin(dataset_repo, 0), model_repo=models, run_name="long", mlflow=False)
    _fit(tmp_path / "a", first.dataset, first)
    pin_b = _pin(dataset_repo, 1)
    again = OxenLightningCallback(dataset=pin_b, model_repo=models, run_name="long", resume_from="long",
                                  allow_dataset_change=True, mlflow=False)
    model = TinyModel()
    with pytest.raises(ConfigurationError, match=r"Run 'long' was trained on dataset commit .* continuing it on"):
        _fit(tmp_path / "b", pin_b, again, model=model, ckpt_path=again.ckpt_path)
    assert not model.labels_seen
    for entry in first.lineage["checkpoints"]:  # trace still answers the data they were trained on
        runs = LineageFinder(model_repos=[models]).trace(entry["commit"])["runs"]
        assert [r["dataset"]["commit"] for r in runs] == [dataset_repo.commits[0]]


def test_a_name_still_held_by_this_process_says_so(tmp_path):
    from oxen_callbacks.run import LineageRun

    first = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "0"), mlflow=False,
                       run_name="exp")
    first.start()  # then train() raised in a notebook cell, and a new callback is made with the same name
    try:
        again = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "0"), mlflow=False,
                           run_name="exp")
        with pytest.raises(ConfigurationError, match=r"(?s)in use by this process.*HINT: fit again with that same"):
            again.start()
    finally:
        first.finish("FAILED")


def test_a_name_whose_checkpoint_is_only_queued_is_taken_and_names_around_it_are_not(tmp_path, monkeypatch):
    """A training process of run "exp-2" saved a checkpoint that is still queued (its worker has not committed
    it yet). A fit finds a run's queues by their folder names: "exp-2" is taken, "exp" and "exp-2-b" (whose
    queue folder names start or end alike) are free, and a queue folder that only looks like another run's
    (its meta names another run: renamed by hand) is not that run's."""
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks._publish.opening import open_model_repo
    from oxen_callbacks._publish.queue import JobQueue, run_backlog
    from oxen_callbacks._util.locks import FileLock
    from oxen_callbacks.run import LineageRun

    for key, value in worker_environment(resolve_author(("T", "t@example.com")), tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    models = tmp_path / "models"
    open_model_repo(models, tmp_path / "cache")
    queued = JobQueue.create(models, "exp-2", {"pid": os.getpid()})
    owner = FileLock(queued.owner_lock)
    owner.acquire()  # its training process lives: no worker adopts the job meanwhile
    queued.staging_for(1).mkdir(parents=True)
    (queued.staging_for(1) / "c.ckpt").write_bytes(b"weights")
    queued.put(1, "checkpoint", {"run": "exp-2", "dest": "runs/exp-2/checkpoints/c.ckpt", "staged_name": "c.ckpt",
                                 "step": 1, "epoch": 0, "metrics": {}, "message": "exp-2 c", "record": {}})
    lookalike = JobQueue.create(models, "other", {"pid": os.getpid()})
    lookalike.folder.rename(lookalike.folder.with_name("exp-2-b-0123abcd"))  # named like run "exp-2-b"'s
    lookalike = JobQueue(lookalike.folder.with_name("exp-2-b-0123abcd"))
    lookalike.put(1, "checkpoint", {"run": "other", "dest": "runs/other/c.ckpt", "staged_name": "c.ckpt"})
    lookalike_owner = FileLock(lookalike.owner_lock)
    lookalike_owner.acquire()  # (live too: no worker of the fits below adopts it)
    try:
        assert [q.folder for q, _jobs in run_backlog(models, "exp-2")] == [queued.folder]
        assert run_backlog(models, "exp") == run_backlog(models, "exp-2-b") == []
        taken = LineageRun(dataset=None, model_repo=models, framework=("test", "0"), mlflow=False, run_name="exp-2")
        with pytest.raises(ConfigurationError, match=r"run_name='exp-2' is already taken"):
            taken.start()
        for free in ("exp", "exp-2-b"):
            run = LineageRun(dataset=None, model_repo=models, framework=("test", "0"), mlflow=False, run_name=free)
            run.start()
            run.finish("FINISHED")
            assert run.record["run"]["name"] == free
    finally:
        owner.release()
        lookalike_owner.release()


def test_a_disk_full_while_storing_a_checkpoint_leaves_no_partial_copy_and_the_next_batch_commits_it(
        tmp_path, monkeypatch):
    """The disk fills up halfway through copying a checkpoint into Oxen's content store (injected: ENOSPC
    after half the bytes). The partial copy is removed at once, the batch is marked unfinished (the next
    lock holder looks for scratch files first), and the job, still queued, is committed whole next time."""
    import errno
    import shutil as shutil_module

    from oxen_callbacks._oxen import layout as oxen_layout
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks._publish.adding import adding_marker
    from oxen_callbacks._publish.committer import Committer
    from oxen_callbacks._publish.opening import open_model_repo
    from oxen_callbacks._publish.queue import JobQueue
    from oxen_callbacks.lineage import new_record

    for key, value in worker_environment(resolve_author(("T", "t@example.com")), tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    models = tmp_path / "models"
    open_model_repo(models, tmp_path / "cache")
    base = new_record(dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"}, run={"name": "r"})
    base.update(status="RUNNING", started_at="2026-12-04T05:00:00+0000", fit_id="f1")
    queue = JobQueue.create(models, "r", {})
    queue.staging_for(1).mkdir(parents=True)
    weights = os.urandom(1 << 20)
    (queue.staging_for(1) / "c1.ckpt").write_bytes(weights)
    queue.put(1, "checkpoint", {"run": "r", "dest": "runs/r/checkpoints/c1.ckpt", "staged_name": "c1.ckpt",
                                "step": 1, "epoch": 0, "metrics": {}, "message": "c1", "record": base})
    real_copy = shutil_module.copyfile

    def disk_full(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        Path(dst).write_bytes(Path(src).read_bytes()[: 1 << 19])
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    committer = Committer(LocalRepo(models))
    monkeypatch.setattr(shutil_module, "copyfile", disk_full)
    assert not committer.run_batch(queue, queue.pending())[0]["ok"]
    assert oxen_layout.orphan_temp_files(models, older_than_s=0) == []  # no half checkpoint left in the store
    assert adding_marker(models).exists() and [j.seq for j in queue.pending()] == [1]
    monkeypatch.setattr(shutil_module, "copyfile", real_copy)  # space freed
    [result] = committer.run_batch(queue, queue.pending())
    assert result["ok"] and not adding_marker(models).exists() and not queue.pending()
    assert file_at(models, result["commit"], "runs/r/checkpoints/c1.ckpt", tmp_path / "read-cache").read_bytes() == weights


def test_a_failed_checkpoint_job_is_listed_only_once_committed(tmp_path, monkeypatch):
    """A job that fails (here: one injected transient add failure) stays queued; later jobs go on.
    The lineage never lists it under another checkpoint's commit, and its retry by sync after the
    run's final lineage commit adds it without moving the run's status or model."""
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks._publish.committer import Committer
    from oxen_callbacks._publish.opening import open_model_repo
    from oxen_callbacks._publish.orphans import drain
    from oxen_callbacks._publish.queue import JobQueue
    from oxen_callbacks.errors import OxenError
    from oxen_callbacks.lineage import new_record

    for key, value in worker_environment(resolve_author(("T", "t@example.com")), tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    models = tmp_path / "models"
    open_model_repo(models, tmp_path / "cache")
    base = new_record(dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"},
                      run={"name": "r"})
    base.update(status="RUNNING", started_at="2026-12-04T05:00:00+0000", fit_id="f1")
    queue = JobQueue.create(models, "r", {})
    for seq in (1, 2):
        queue.staging_for(seq).mkdir(parents=True)
        (queue.staging_for(seq) / f"c{seq}.ckpt").write_bytes(b"x" * seq)
        queue.put(seq, "checkpoint", {"run": "r", "dest": f"runs/r/checkpoints/c{seq}.ckpt", "staged_name": f"c{seq}.ckpt",
                                      "step": seq, "epoch": 0, "metrics": {}, "message": f"c{seq}", "record": base})
    queue.put(3, "finalize", {"run": "r", "record": {**base, "status": "FINISHED"}, "best": "runs/r/checkpoints/c2.ckpt"})
    committer = Committer(LocalRepo(models))
    real_add, failed = committer.repo.add, []

    def add_failing_once(rel: str) -> None:
        if rel.endswith("c1.ckpt") and not failed:
            failed.append(rel)
            raise OxenError("oxen add: repository busy")
        real_add(rel)

    monkeypatch.setattr(committer.repo, "add", add_failing_once)
    assert not committer.run_batch(queue, queue.pending())[0]["ok"]  # c1 fails and stays queued
    committer.run_batch(queue, [j for j in queue.pending() if j.seq != 1])  # as the worker goes on past it
    after_fit = read_lineage(models / "runs" / "r" / "lineage.json")
    assert [c["path"] for c in after_fit["checkpoints"]] == ["runs/r/checkpoints/c2.ckpt"]
    drain(queue, committer)  # `oxen-callbacks sync`, later
    after_sync = read_lineage(models / "runs" / "r" / "lineage.json")
    assert after_sync["status"] == "FINISHED" and after_sync["model"] == after_fit["model"]
    entries = {c["path"]: c["commit"] for c in after_sync["checkpoints"]}
    assert set(entries) == {"runs/r/checkpoints/c1.ckpt", "runs/r/checkpoints/c2.ckpt"}
    for path, commit in entries.items():
        assert file_at(models, commit, path, tmp_path / "check").read_bytes() == b"x" * int(path[-6])


class KillWorkerAfterFailedPush(Callback):
    """After the first save, wait for its push to fail (the commit worker runs at the lowest priority: on a
    busy machine it may not push before the fit ends), then SIGKILL the publishing worker (it is restarted)."""

    def __init__(self, oxen_cb: OxenLightningCallback) -> None:
        self.oxen_cb, self.killed = oxen_cb, None

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if self.killed is not None or trainer.global_step < 3:
            return
        publisher = self.oxen_cb.run.publisher
        deadline = time.monotonic() + 120
        while not any(r["kind"] == "push" for r in publisher.results):
            assert time.monotonic() < deadline, "the first push never failed"
            time.sleep(0.05)
        self.killed = publisher.worker_pid
        os.kill(self.killed, signal.SIGKILL)


def test_a_restarted_worker_does_not_push_to_a_mute_remote_again(dataset_repo, tmp_path, hanging_port):
    pin = _pin(dataset_repo)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False,
                               remote_url=f"http://127.0.0.1:{hanging_port}/ox/models", push_timeout=2)
    killer = KillWorkerAfterFailedPush(cb)
    _fit(tmp_path, pin, cb, SlowSteps(), killer, epochs=3)
    assert killer.killed and cb.run.publisher.worker_pid != killer.killed
    assert [r["ok"] for r in cb.run.publisher.results if r["kind"] == "push"] == [False]
    _assert_all_committed(tmp_path / "models", cb.lineage, tmp_path / "ckpt")


class _Unpicklable:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot serialize this (a save that fails, as a full disk would)")


class _FailsToSaveAtStep9(TinyModel):
    def on_save_checkpoint(self, checkpoint):  # type: ignore[no-untyped-def]
        if self.global_step == 9:
            checkpoint["extra"] = _Unpicklable()


def test_a_save_that_fails_leaves_the_previous_last_checkpoint_in_place(dataset_repo, tmp_path):
    """Lightning writes a checkpoint only once it is serialized: a failed save keeps the previous
    last.ckpt. Giving the rewrite a fresh inode must not take that away (the file was unlinked)."""
    pin = _pin(dataset_repo, 0)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=0, save_last=True)
    with pytest.raises(RuntimeError, match="cannot serialize"):
        make_trainer(tmp_path, [ckpt, cb], epochs=3).fit(_FailsToSaveAtStep9(), datamodule=CsvData(pin))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    record = cb.lineage
    assert [c["step"] for c in record["checkpoints"]] == [3, 6]
    kept = file_at(tmp_path / "models", record["checkpoints"][-1]["commit"], record["checkpoints"][-1]["path"],
                   tmp_path / "read")
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == kept.read_bytes()  # step 6's, as committed
