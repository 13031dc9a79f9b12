"""Real Lightning fits with the Oxen callback: pinned data, committed checkpoints, MLflow pointers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import file_at, tree_state
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning_model import CsvData, OwnIOOnlyStrategy, SelfWritingStrategy, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.errors import ConfigurationError, DatasetMismatchError
from oxen_callbacks.lightning import OxenLightningCallback


def _artifact_lineage_from(uri: str, run_id: str, tmp_path: Path) -> dict:
    return read_lineage(MlflowClient(uri).download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / "dl")))


def _artifact_lineage(run_id: str, tmp_path: Path) -> dict:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="oxen/lineage.json",
                                                dst_path=str(tmp_path / "dl"))
    return read_lineage(local)


def test_fit_reads_pinned_commit_while_branch_moved(dataset_repo, tmp_path):
    commit_a, commit_b = dataset_repo.commits
    pin = PinnedDataset(dataset_repo.path, revision=commit_a, paths=["train.csv", "val.csv"])
    model = TinyModel()
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(model, datamodule=CsvData(pin))

    assert model.labels_seen == {0}  # commit A's labels; the branch head B has only 1s
    assert oxen_child.branches(dataset_repo.path)["main"] == commit_b
    assert cb.lineage["dataset"]["commit"] == commit_a
    assert cb.lineage["dataset"]["revision"] == commit_a


class _PathsData(CsvData):
    """A DataModule built from file paths, not from a pin (what a user's usually takes)."""

    def __init__(self, train: Path, val: Path) -> None:
        super().__init__(None)
        self.paths = {"train": train, "val": val}

    def setup(self, stage: str) -> None:
        from lightning_model import load_csv

        self.train, self.val = load_csv(self.paths["train"]), load_csv(self.paths["val"])


def test_a_datamodule_of_an_earlier_pin_is_refused_before_a_step(dataset_repo, tmp_path):
    """A notebook: the pin's cell is run again after the branch moved, the DataModule's is not. The
    model would read commit A while the lineage names B: refused before a step, as the HF callback
    refuses a train_dataset of another commit."""
    commit_a, commit_b = dataset_repo.commits
    old = PinnedDataset(dataset_repo.path, revision=commit_a, paths=["train.csv", "val.csv"])
    new = PinnedDataset(dataset_repo.path, revision=commit_b, paths=["train.csv", "val.csv"])
    for stale in (CsvData(old), _PathsData(old.file("train.csv"), old.file("val.csv"))):
        model = TinyModel()
        cb = OxenLightningCallback(dataset=new, model_repo=tmp_path / "models", mlflow=False)
        with pytest.raises(DatasetMismatchError, match=f"holds dataset commit\\(s\\) \\['{commit_a}'\\]"):
            make_trainer(tmp_path, [cb], epochs=1, enable_checkpointing=False).fit(model, datamodule=stale)
        assert not model.labels_seen
    # a model whose hyperparameters recorded the data of the fit that made it is fine-tuned on the new pin
    model = TinyModel()
    model.hparams["train_file"] = str(old.file("train.csv"))
    cb = OxenLightningCallback(dataset=new, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [cb], epochs=1, enable_checkpointing=False).fit(
        model, datamodule=_PathsData(new.file("train.csv"), new.file("val.csv")))
    assert model.labels_seen == {1} and cb.lineage["dataset"]["commit"] == commit_b
    model = TinyModel()  # the DataModule of the new pin: trains, and the lineage names what it read
    cb = OxenLightningCallback(dataset=new, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [cb], epochs=1, enable_checkpointing=False).fit(
        model, datamodule=_PathsData(new.file("train.csv"), new.file("val.csv")))
    assert model.labels_seen == {1} and cb.lineage["dataset"]["commit"] == commit_b


def test_branch_revision_resolves_to_head_commit(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision="main", paths=["train.csv", "val.csv"])
    model = TinyModel()
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [cb], epochs=1, enable_checkpointing=False).fit(model, datamodule=CsvData(pin))
    assert model.labels_seen == {1}
    assert cb.lineage["dataset"] | {"revision": "main", "commit": dataset_repo.commits[1]} == cb.lineage["dataset"]


def test_every_checkpoint_committed_loads_and_mlflow_names_commits(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    topk = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1, save_last=True)
    steps = ModelCheckpoint(dirpath=tmp_path / "ckpt-steps", every_n_train_steps=4, save_top_k=-1)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", experiment_name="lineage-test")
    make_trainer(tmp_path, [topk, steps, cb], epochs=3).fit(TinyModel(), datamodule=CsvData(pin))

    record = cb.lineage
    model_repo = LocalRepo(tmp_path / "models")
    repo_commits = set(model_repo.commit_ids())
    assert len(record["checkpoints"]) >= 4 + 1 + 1  # 18 steps: 4 step saves, >= 1 top-k save, last
    for entry in record["checkpoints"]:
        assert entry["commit"] in repo_commits
        blob = file_at(model_repo.path, entry["commit"], entry["path"], tmp_path / "read-cache")
        ckpt = torch.load(blob, weights_only=False)
        assert ckpt["global_step"] == entry["step"]  # the bytes of that save, not a later one
        TinyModel.load_from_checkpoint(blob)
    # every file the trainer kept is, byte for byte, a kept checkpoint of the model repo
    kept = {c["path"]: c for c in record["checkpoints"] if c["kept"]}
    on_disk = [*(tmp_path / "ckpt").iterdir(), *(tmp_path / "ckpt-steps").iterdir()]
    assert len(on_disk) == len(kept)
    for path in on_disk:
        same_name = [c for p, c in kept.items() if p.endswith("/" + path.name)]
        assert any(file_at(model_repo.path, c["commit"], c["path"], tmp_path / "read-cache").read_bytes()
                   == path.read_bytes() for c in same_name)
    # top-k rotation: deleted files were committed first and are marked, not lost
    rotated = [c for c in record["checkpoints"] if not c["kept"]]
    assert rotated and all(c["commit"] in repo_commits for c in rotated)
    # the pointer names the best checkpoint (monitor val_loss)
    assert record["model"]["path"].endswith(Path(topk.best_model_path).name)
    best_entry = [c for c in record["checkpoints"] if c["path"] == record["model"]["path"] and c["kept"]][-1]
    assert record["model"]["commit"] == best_entry["commit"]

    run_id = record["run"]["mlflow_run_id"]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    assert run.data.tags["oxen.dataset.repo"] == str(dataset_repo.path)
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    assert run.data.tags["oxen.model.repo"] == str(model_repo.path)
    assert run.data.tags["oxen.dataset.revision"] == dataset_repo.commits[0]  # what was asked for, beside the commit
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    # the code this process runs from (the tests' checkout; no tag outside one)
    assert run.data.tags.get("oxen.code.git_commit") == (head.stdout.strip() if head.returncode == 0 else None)
    artifact = _artifact_lineage(run_id, tmp_path)
    assert artifact["model"] == record["model"]
    assert [c["commit"] for c in artifact["checkpoints"]] == [c["commit"] for c in record["checkpoints"]]
    assert artifact["dataset"]["commit"] in set(LocalRepo(dataset_repo.path).commit_ids())
    # lineage also lives in the model repo without MLflow: committed, complete
    committed = read_lineage(file_at(model_repo.path, oxen_child.branches(model_repo.path)["main"],
                                     f"runs/{record['run']['name']}/lineage.json", tmp_path / "read-cache"))
    assert committed["model"] == record["model"]


def test_a_best_checkpoint_saved_again_under_its_name_is_the_model(dataset_repo, tmp_path):
    """``ModelCheckpoint(filename="best", save_top_k=1)`` writes each new best over the same file:
    the lineage's model (and the MLflow tag) must be the bytes of the last one, not the first."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best", monitor="step", mode="max", save_top_k=1)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    make_trainer(tmp_path, [best, cb], epochs=3).fit(TinyModel(), datamodule=CsvData(pin))

    record, models = cb.lineage, tmp_path / "models"
    versions = [c for c in record["checkpoints"] if c["path"].endswith("/best.ckpt")]
    assert len(versions) == 3 and len({c["commit"] for c in versions}) == 3
    assert (record["model"]["commit"], record["model"]["path"]) == (versions[-1]["commit"], versions[-1]["path"])
    named = file_at(models, record["model"]["commit"], record["model"]["path"], tmp_path / "read-cache")
    assert named.read_bytes() == Path(best.best_model_path).read_bytes()
    tags = MlflowClient().get_run(record["run"]["mlflow_run_id"]).data.tags
    assert tags["oxen.model.commit"] == versions[-1]["commit"]
    committed = read_lineage(file_at(models, oxen_child.branches(models)["main"],
                                     f"runs/{record['run']['name']}/lineage.json", tmp_path / "read-cache"))
    assert committed["model"] == record["model"]


def test_lineage_without_mlflow_lives_in_model_repo(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, run_name="solo-run")
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=2).fit(
        TinyModel(), datamodule=CsvData(pin))
    assert cb.lineage["status"] == "FINISHED"  # reading it waits for the final lineage commit
    assert not (tmp_path / "mlflow.db").exists()
    record = read_lineage(tmp_path / "models" / "runs" / "solo-run" / "lineage.json")
    assert record["run"]["mlflow_run_id"] is None
    assert record["model"]["commit"] in LocalRepo(tmp_path / "models").commit_ids()
    assert record["status"] == "FINISHED"


def test_joins_lightning_mlflow_logger_run(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    logger = MLFlowLogger(experiment_name="with-logger", tracking_uri=f"sqlite:///{tmp_path / 'logger.db'}")
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1, logger=logger).fit(
        TinyModel(), datamodule=CsvData(pin))
    lineage = cb.lineage  # waits for the MLflow writes fit() returned before
    client = MlflowClient(f"sqlite:///{tmp_path / 'logger.db'}")
    runs = client.search_runs([client.get_experiment_by_name("with-logger").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == logger.run_id == lineage["run"]["mlflow_run_id"]
    assert runs[0].data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    assert "train_loss" in runs[0].data.metrics  # the logger's own metrics, same run


def test_a_second_fit_into_the_same_logger_run_continues_its_oxen_run(dataset_repo, tmp_path):
    """One callback and one MLFlowLogger, fitted twice (a notebook training on): the MLflow run's tags,
    pointer and the model repository describe one Oxen run holding both fits' checkpoints, not the
    second fit alone."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    uri = f"sqlite:///{tmp_path / 'logger.db'}"
    logger = MLFlowLogger(experiment_name="twice", tracking_uri=uri)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    model = TinyModel()
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a"), cb], epochs=1, logger=logger).fit(
        model, datamodule=CsvData(pin))
    first = cb.lineage
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b"), cb], epochs=1, logger=logger).fit(
        model, datamodule=CsvData(pin))
    second = cb.lineage

    assert second["run"]["name"] == first["run"]["name"] and second["run"]["mlflow_run_id"] == logger.run_id
    assert [c["commit"] for c in second["checkpoints"][:len(first["checkpoints"])]] == [
        c["commit"] for c in first["checkpoints"]] and len(second["checkpoints"]) > len(first["checkpoints"])
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.tags["oxen.run"] == first["run"]["name"]
    assert run.data.tags["oxen.model.commit"] == second["model"]["commit"]
    logged = _artifact_lineage_from(uri, logger.run_id, tmp_path)
    assert [c["commit"] for c in logged["checkpoints"]] == [c["commit"] for c in second["checkpoints"]]


class _Scored(TinyModel):
    """Logs ``score``: ``top`` (set after it is built: not a hyperparameter) minus the epoch."""

    top = 0.0

    def validation_step(self, batch, idx):  # type: ignore[no-untyped-def]
        super().validation_step(batch, idx)
        self.log("score", torch.tensor(self.top - self.current_epoch))


def test_a_continued_runs_best_is_the_whole_runs_not_the_last_fits(dataset_repo, tmp_path):
    """Two fits into one logger's run (one Oxen run), each with a new ModelCheckpoint(monitor="score",
    mode="max"): the first fit's best scores 100, the second's 50. The run's model and its logged model
    marked best are the first fit's (they were the second fit's: a new ModelCheckpoint knows only its own)."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    uri = f"sqlite:///{tmp_path / 'logger.db'}"
    logger = MLFlowLogger(experiment_name="best-of-run", tracking_uri=uri)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    for fit, top in (("a", 100.0), ("b", 50.0)):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / fit, monitor="score", mode="max", save_top_k=1,
                                     filename=fit + "-{epoch}")
        model = _Scored()
        model.top = top
        make_trainer(tmp_path / fit, [checkpoint, cb], epochs=2, logger=logger).fit(model, datamodule=CsvData(pin))
    lineage = cb.lineage
    best = next(c for c in lineage["checkpoints"] if c["path"] == lineage["model"]["path"])
    assert best["metrics"]["score"] == 100.0 and best["source"] == str(tmp_path / "a" / "a-epoch=0.ckpt")
    assert lineage["model"]["best"] is True
    models = MlflowClient(uri).search_logged_models([MlflowClient(uri).get_run(logger.run_id).info.experiment_id])
    marked = {m.tags["oxen.model.path"]: (m.tags.get("oxen.model.best"), m.tags.get("oxen.model.final")) for m in models}
    assert marked[best["path"]] == ("true", None)
    assert [path for path, (b, _f) in marked.items() if b == "true"] == [best["path"]]


def test_another_run_into_an_mlflow_run_that_holds_one_is_refused_before_a_step(dataset_repo, tmp_path):
    """Two callbacks, two datasets, one active MLflow run: the second fit would replace the first's
    lineage in that run. It stops before its first step, naming both."""
    uri = mlflow.get_tracking_uri()  # (this test's own store)
    pins = [PinnedDataset(dataset_repo.path, revision=c, paths=["train.csv", "val.csv"]) for c in dataset_repo.commits[:2]]
    with mlflow.start_run() as active:
        first = OxenLightningCallback(dataset=pins[0], model_repo=tmp_path / "models")
        make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a"), first], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pins[0]))
        assert first.lineage["run"]["mlflow_run_id"] == active.info.run_id
        second = OxenLightningCallback(dataset=pins[1], model_repo=tmp_path / "models")
        with pytest.raises(ConfigurationError, match=f"MLflow run {active.info.run_id} already holds") as refused:
            make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b"), second], epochs=1).fit(
                TinyModel(), datamodule=CsvData(pins[1]))
    assert first.run.run_name in str(refused.value) and "own MLflow run" in refused.value.hint
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.ckpt"))
    tags = MlflowClient(uri).get_run(active.info.run_id).data.tags
    assert tags["oxen.run"] == first.run.run_name and tags["oxen.dataset.commit"] == dataset_repo.commits[0]


@pytest.mark.parametrize("mlflow_loaded", [True, False], ids=["thread", "sink-process"])
def test_the_run_mlflow_run_id_names_is_the_run_logged_into(dataset_repo, tmp_path, monkeypatch, mlflow_loaded):
    """`$MLFLOW_RUN_ID` (a job wrapper's, a resumed notebook's) names the run MLflow's own start_run()
    joins: the lineage goes there, no second run is made, and a run not ours is not ended."""
    from oxen_callbacks._mlflow import fluent

    uri = mlflow.get_tracking_uri()  # (this test's own store)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("job")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    if not mlflow_loaded:
        monkeypatch.setattr(fluent, "mlflow_imported", lambda: False)
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))

    assert cb.lineage["run"]["mlflow_run_id"] == run_id
    everywhere = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(everywhere)] == [run_id]
    run = client.get_run(run_id)
    assert run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    assert run.data.tags["oxen.model.commit"] == cb.lineage["model"]["commit"]
    assert run.info.status == "RUNNING"  # the job's run: its owner ends it


def test_pinning_leaves_user_dataset_tree_head_and_branches_alone(dataset_repo, tmp_path):
    repo = LocalRepo(dataset_repo.path)
    before = (tree_state(dataset_repo.path), oxen_child.branches(repo.path), repo.current_branch())
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    after = (tree_state(dataset_repo.path), oxen_child.branches(repo.path), repo.current_branch())
    assert after == before
    assert (dataset_repo.path / "train.csv").read_text().rstrip().endswith(",1")  # still B's bytes


def test_resume_checks_the_dataset_commit(dataset_repo, tmp_path):
    import pytest

    from oxen_callbacks.errors import DatasetMismatchError

    pin_a = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = OxenLightningCallback(dataset=pin_a, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ckpt, cb], epochs=1).fit(TinyModel(), datamodule=CsvData(pin_a))
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]["OxenLightningCallback"]
    assert stored["dataset"]["commit"] == dataset_repo.commits[0]

    pin_b = PinnedDataset(dataset_repo.path, revision="main", paths=["train.csv", "val.csv"])
    cb_b = OxenLightningCallback(dataset=pin_b, model_repo=tmp_path / "models", mlflow=False)
    model = TinyModel()
    with pytest.raises(DatasetMismatchError, match=dataset_repo.commits[0]):
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt2"), cb_b], epochs=2).fit(
            model, datamodule=CsvData(pin_b), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert not model.labels_seen  # failed before any training step

    cb_same = OxenLightningCallback(dataset=pin_a, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt3"), cb_same], epochs=2).fit(
        TinyModel(), datamodule=CsvData(pin_a), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert cb_same.lineage["checkpoints"][-1]["epoch"] == 1
    assert json.dumps(cb_same.lineage)  # serializable


@pytest.fixture
def script_without_mlflow(monkeypatch):  # type: ignore[no-untyped-def]
    """As in a script that has not imported MLflow itself (this test process has)."""
    from oxen_callbacks._mlflow import fluent

    monkeypatch.setattr(fluent, "mlflow_imported", lambda: False)


def test_a_callback_never_fitted_leaves_no_process_behind(tmp_path, script_without_mlflow):
    """The MLflow sink process starts with the callback (it overlaps building the trainer); an unused
    callback's sink exits once it is gone, and nothing is left behind."""
    import gc

    uri = f"sqlite:///{tmp_path}/m.db"
    built = [OxenLightningCallback(model_repo=tmp_path / "models", mlflow_tracking_uri=uri) for _ in range(5)]
    # built in a loop (or a notebook cell run again): one sink and one worker, the newest callback's
    sinks = [cb.run._warm_sink.proc for cb in built]
    workers = [cb.run._warm_worker.proc for cb in built]
    assert sinks[:-1] == [None] * 4 and workers[:-1] == [None] * 4
    sink, worker = sinks[-1], workers[-1]
    assert sink.poll() is None and worker.poll() is None
    del built
    gc.collect()
    sink.wait(timeout=10)  # stopped at once, not left to finish importing MLflow (seconds of CPU)
    worker.wait(timeout=60)
    assert not (tmp_path / "m.db").exists()  # nothing was logged
    assert not (tmp_path / "models").exists()  # created by a fit's start (`oxen init` is one file written)


def test_a_script_that_builds_callbacks_and_exits_leaves_no_process_behind(tmp_path):
    """Unused warm helpers die with the script: none goes on importing MLflow after it exited."""
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from oxen_callbacks.lightning import OxenLightningCallback\n"
            f"built = [OxenLightningCallback(model_repo={str(tmp_path / 'models')!r}) for _ in range(3)]\n"
            "print(json.dumps([p.pid for cb in built for p in (cb.run._warm_sink.proc, cb.run._warm_worker.proc) if p]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(pids) == 2  # one sink, one worker

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 2  # (a worker exits at its stdin's end; a sink is stopped)
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if running(pid)], "a helper is still running after the script exited"


def test_fits_in_one_process_reuse_the_sink_yet_log_where_each_run_says(dataset_repo, tmp_path, script_without_mlflow):
    """A notebook fits again and again: the second fit's MLflow logging runs in the sink process the
    first one left idle (MLflow already imported), yet follows the second fit's own settings."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    stores = [f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db")]
    sinks, runs = [], []
    for i, store in enumerate(stores):
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_tracking_uri=store,
                                   experiment_name=f"notebook-{i}")
        sinks.append(cb.run._warm_sink.proc.pid)
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / f"ckpt{i}"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        runs.append(cb.lineage["run"]["mlflow_run_id"])
    assert sinks[0] == sinks[1]
    for i, (store, run_id) in enumerate(zip(stores, runs)):
        client = MlflowClient(store)
        run = client.get_run(run_id)
        assert client.get_experiment(run.info.experiment_id).name == f"notebook-{i}"
        assert run.info.status == "FINISHED" and run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
        assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
        local = client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path))
        assert read_lineage(local)["model"]["commit"] in LocalRepo(tmp_path / "models").commit_ids()
    journals = tmp_path / "cache" / "mlflow-journal"
    deadline = time.monotonic() + 30  # the sink forgets a journal just after its last operation
    while any(journals.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(journals.iterdir())


def test_a_notebook_that_imported_mlflow_reuses_the_sink_of_its_first_own_run(dataset_repo, tmp_path):
    """MLflow imported in the kernel (this process has, as a notebook that ran ``import mlflow`` or an
    MLFlowLogger cell): the first run of our own starts its sink at fit start; a later one, after a fit
    that logged through an MLFlowLogger between them, is logged by that same sink (MLflow imported in
    it already: no second import, ~2 s a cell), each run to its own store, complete."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cells = [("own", f"sqlite:///{tmp_path / 'first.db'}"), ("logger", f"sqlite:///{tmp_path / 'logger.db'}"),
             ("failed", f"sqlite:///{tmp_path / 'second.db'}"), ("own", f"sqlite:///{tmp_path / 'second.db'}")]
    sinks, runs = [], []
    for i, (kind, store) in enumerate(cells):
        if kind == "failed":  # a cell that built its callback, then failed before fit(): run again below
            unfitted = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_tracking_uri=store)
            continue
        if kind == "own":
            cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_tracking_uri=store,
                                       experiment_name=f"cell-{i}")
            logger: MLFlowLogger | bool = False
        else:
            cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
            logger = MLFlowLogger(experiment_name=f"cell-{i}", tracking_uri=store)
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / f"ckpt{i}"), cb], epochs=1, logger=logger).fit(
            TinyModel(), datamodule=CsvData(pin))
        runs.append((store, cb.lineage["run"]["mlflow_run_id"], f"cell-{i}"))
        if kind == "own":
            sinks.append(cb.run.sink._proc.pid)
    assert sinks[0] == sinks[1] and unfitted.run._warm_sink.proc is None  # (taken over by the cell run again)
    assert Path(f"/proc/{sinks[0]}").exists()  # idle, MLflow imported, for the next cell
    for store, run_id, experiment in runs:
        client = MlflowClient(store)
        run = client.get_run(run_id)
        assert client.get_experiment(run.info.experiment_id).name == experiment
        assert run.info.status == "FINISHED" and run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
        assert run.data.tags["oxen.model.commit"] in LocalRepo(tmp_path / "models").commit_ids()


def test_a_store_started_afresh_between_cells_gets_the_next_run(dataset_repo, tmp_path):
    """A notebook deletes its SQLite store between two fits (to start clean). The idle sink's MLflow
    keeps an engine on the deleted file: reused, it would log the second run there (gone, yet its
    journal done). It is not reused then, and the run is in the new file."""
    import sqlite3

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    db = tmp_path / "m.db"
    sinks, runs = [], []
    for i in range(2):
        if i == 1:
            for leftover in tmp_path.glob("m.db*"):
                leftover.unlink()
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_tracking_uri=f"sqlite:///{db}",
                                   experiment_name="afresh")
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / f"ckpt{i}"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        runs.append(cb.lineage["run"]["mlflow_run_id"])
        sinks.append(cb.run.sink._proc.pid)
    with sqlite3.connect(db) as store:
        assert store.execute("SELECT run_uuid, status FROM runs").fetchall() == [(runs[1], "FINISHED")]
    assert sinks[0] != sinks[1]  # (a new sink opened the new file)


def _committed_steps(record: dict, model_repo: Path, cache: Path) -> list[tuple[str, int, int]]:
    """(file name, step recorded, global_step inside the committed bytes) of each published save."""
    out = []
    for entry in record["checkpoints"]:
        blob = file_at(model_repo, entry["commit"], entry["path"], cache)
        out.append((Path(entry["path"]).name, entry["step"], torch.load(blob, weights_only=False)["global_step"]))
    return out


def test_checkpoint_names_oxen_would_read_as_glob_patterns_are_committed_byte_for_byte(dataset_repo, tmp_path):
    """``oxen add runs/…/model[0].ckpt`` is a glob: it stages nothing (or ``model0.ckpt``), and the
    lineage would name a commit without the file; ``oxen rm`` of such a name could take another file
    out. Such names get a literal path in the repository; ``source`` keeps the trainer's own."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    ckpt = tmp_path / "ckpt[a]"
    saved = ModelCheckpoint(dirpath=ckpt, filename="model[{epoch}]", save_top_k=1, monitor="epoch", mode="max")
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", filename="model{epoch}", save_top_k=-1)  # what a glob would hit
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [plain, saved, cb], epochs=3).fit(TinyModel(), datamodule=CsvData(pin))

    record = cb.lineage
    globbed = [c for c in record["checkpoints"] if "[" in Path(c["source"]).name]
    assert [Path(c["source"]).name for c in globbed] == [f"model[epoch={i}].ckpt" for i in range(3)]
    for i, entry in enumerate(record["checkpoints"]):
        committed = file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / f"read{i}").read_bytes()
        if Path(entry["source"]).exists():  # (top-k rotation removed the others from the trainer's folder)
            assert committed == Path(entry["source"]).read_bytes()
        assert torch.load(io.BytesIO(committed), weights_only=False)["epoch"] == entry["epoch"]
        assert not set("*?[]") & set(entry["path"])
    head = LocalRepo(tmp_path / "models").resolve(None)
    kept = [c["path"] for c in record["checkpoints"] if c.get("kept", True)]
    assert sorted(c["path"] for c in record["checkpoints"] if not c.get("kept", True)) == sorted(
        c["path"] for c in globbed[:2])  # rotated out of the folder: exactly those two, no plain file
    for path in kept:
        file_at(tmp_path / "models", head, path, tmp_path / "head")  # still in the repository's head


def test_a_strategy_that_writes_checkpoints_itself_loses_no_save(dataset_repo, tmp_path):
    """Top-k and last saved in one hook, plus a second ModelCheckpoint, all past the CheckpointIO:
    every save is committed with its own bytes, and last.ckpt, rewritten in place, shares no inode
    with a frozen copy."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    topk = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1, save_last=True)
    steps = ModelCheckpoint(dirpath=tmp_path / "ckpt-steps", every_n_train_steps=4, save_top_k=-1)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    strategy = SelfWritingStrategy()
    make_trainer(tmp_path, [topk, steps, cb], epochs=3, strategy=strategy).fit(TinyModel(), datamodule=CsvData(pin))

    record = cb.lineage
    committed = _committed_steps(record, tmp_path / "models", tmp_path / "read-cache")
    assert sorted((Path(p).name, s) for p, s in strategy.saved) == sorted((n, s) for n, s, _ in committed)
    assert all(recorded == inside for _, recorded, inside in committed)  # the bytes of that save
    assert record["model"]["path"].endswith(Path(topk.best_model_path).name)
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_nlink == 1
    # a last.ckpt names the top-k file its callback saved in the same hook (one logged model), if any;
    # the other callback's saves of the same step are never taken for it
    for entry in record["checkpoints"]:
        twins = [c["path"] for c in record["checkpoints"] if c["step"] == entry["step"]
                 and Path(c["source"]).parent == tmp_path / "ckpt" and Path(c["path"]).name != "last.ckpt"]
        expected = twins[-1] if Path(entry["path"]).name == "last.ckpt" and twins else None
        assert entry.get("same_model_as") == expected, entry
    assert any(c.get("same_model_as") for c in record["checkpoints"])


def test_a_strategy_that_refuses_a_wrapped_checkpoint_io_still_publishes(dataset_repo, tmp_path):
    cb = OxenLightningCallback(model_repo=tmp_path / "models", mlflow=False,
                               dataset=PinnedDataset(dataset_repo.path, paths=["train.csv", "val.csv"]))
    topk = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1)
    make_trainer(tmp_path, [topk, cb], epochs=2, strategy=OwnIOOnlyStrategy(torch.device("cpu"))).fit(
        TinyModel(), datamodule=CsvData(cb.dataset))

    committed = _committed_steps(cb.lineage, tmp_path / "models", tmp_path / "read-cache")
    assert sorted(n for n, _, _ in committed) == sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert all(recorded == inside for _, recorded, inside in committed)


def test_a_fit_that_raises_gives_the_strategy_its_own_checkpoint_io_back(dataset_repo, tmp_path):
    class Failing(TinyModel):
        def training_step(self, batch, idx):  # type: ignore[no-untyped-def]
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, idx)

    pin = PinnedDataset(dataset_repo.path, paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer = make_trainer(tmp_path, [cb], epochs=2)
    original = trainer.strategy.checkpoint_io
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(), datamodule=CsvData(pin))
    assert trainer.strategy.checkpoint_io is original
    assert cb.lineage["status"] == "FAILED"


@pytest.mark.timeout(400)
def test_a_stopped_sink_that_cannot_take_a_large_environment_does_not_hold_fit(dataset_repo, tmp_path, monkeypatch,
                                                                              script_without_mlflow):
    """The warm sink takes its hand-off (the whole environment) only once MLflow is imported: an
    environment larger than a pipe's buffer and a sink that never reads (stopped) held fit start for
    good. It is now given up within SINK_HANDOFF_TIMEOUT_S, killed, and a new sink logs the run."""
    from oxen_callbacks._mlflow import warm_sink

    monkeypatch.setattr(warm_sink, "SINK_HANDOFF_TIMEOUT_S", 5.0)  # (30 s: waiting for it is all this test would do)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow_tracking_uri=store)
    stopped = cb.run._warm_sink.proc
    os.kill(stopped.pid, signal.SIGSTOP)
    for part in range(8):  # 240 KB in all; one variable may not exceed 128 KiB
        monkeypatch.setenv(f"BIG_MODULE_TABLE_{part:03d}", "x" * 30_000)
    started = time.monotonic()
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    assert time.monotonic() - started < warm_sink.SINK_HANDOFF_TIMEOUT_S + 120
    assert stopped.wait(timeout=30) == -signal.SIGKILL  # killed, not left stopped
    run = MlflowClient(store).get_run(cb.lineage["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["oxen.model.commit"] == cb.lineage["model"]["commit"]
