"""A pin of many files: its paths are too many for an MLflow tag (run tags are cut at 8,000
characters, or refused). No reader may take a list cut short for the whole: `trace` reads the paths
from the run's lineage record, and `reproduce` refuses when that cannot be read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import table
from helpers import make_repo
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset
from oxen_callbacks._ops.reproduce import reproduce
from oxen_callbacks._ops.trace import LineageFinder
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback

SHARDS = [f"shards/part-{i:05d}-of-00400.csv" for i in range(400)]


def test_a_pin_of_many_files_is_traced_with_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # MLflow refuses a long tag instead of cutting it
    files = {"train.csv": table(label=0, seed=0), "val.csv": table(label=0, seed=1, rows=32),
             **{shard: "x0,label\n0.5,1\n" for shard in SHARDS}}
    dataset = make_repo(tmp_path / "dataset", [("shards", files)])
    paths = ["train.csv", "val.csv", *SHARDS]
    assert len(json.dumps(paths)) > 8000
    pin = PinnedDataset(dataset.path, revision=dataset.head, paths=paths)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="many", register_model="many-clf")
    make_trainer(tmp_path / "fit", [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4), cb],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    cb.run.wait()
    run_id = cb.lineage["run"]["mlflow_run_id"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    # every tag made it (a refused one would have stopped the run's logging), none a list cut short
    assert run.data.tags["oxen.dataset.commit"] == dataset.head
    assert run.data.tags["oxen.model.commit"] == cb.lineage["model"]["commit"]
    assert run.data.tags["oxen.lineage.status"] == "FINISHED" and run.info.status == "FINISHED"
    assert json.loads(run.data.tags["oxen.dataset.paths"]) == {"count": len(paths), "listed_in": "oxen/lineage.json"}
    [version] = client.search_model_versions("name='many-clf'")
    assert json.loads(version.tags["oxen.dataset.paths"])["count"] == len(paths)

    # the model repository is not on this machine: MLflow answers, with every path
    shutil.move(tmp_path / "models", tmp_path / "models-elsewhere")
    (view,) = LineageFinder(tracking_uri=uri).trace(dataset.head)["runs"]
    assert (view["source"], view["dataset"]["paths"]) == ("mlflow-artifact", paths)

    # the lineage artifact is gone too: the paths are unknown, and said so; nothing is reproduced
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "oxen" / "lineage.json"
    artifact.unlink()
    (view,) = LineageFinder(tracking_uri=uri).trace(dataset.head)["runs"]
    assert view["source"] == "mlflow-tags" and view["dataset"]["paths"] is None
    shown = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", "trace", dataset.head, "--tracking-uri", uri],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "paths: too many for a tag; listed in the run's oxen/lineage.json, which could not be read" in shown.stdout
    with pytest.raises(ConfigurationError, match="too many for an MLflow tag"):
        reproduce(view, tmp_path / "repro")
    assert not (tmp_path / "repro").exists()


def test_a_pin_naming_3000_files_one_by_one_reads_each_files_own_bytes(tmp_path):
    """A shard list pinned file by file (its time grew with the square of its paths before: 3,000 took
    50 s to pull; `benchmarks/pin.py` times it, case listed-3000): every file reads its own bytes, pulled,
    re-pinned and checked."""
    from oxen_callbacks._oxen import child as oxen_child

    repo = tmp_path / "dataset"
    (repo / "shards").mkdir(parents=True)
    names = [f"shards/part-{i:05d}.csv" for i in range(3000)]
    for i, name in enumerate(names):
        (repo / name).write_text(f"x\n{i}\n")
    oxen_child.init_repo(repo)
    commit = oxen_child.commit_paths(repo, ["shards"], "3,000 shards", author=("Test", "test@example.com"))
    pin = PinnedDataset(repo, revision=commit, paths=names)
    pin.pull()
    again = PinnedDataset(repo, revision=commit, paths=names)
    again.pull()
    again.verify()
    assert again.path == pin.path
    assert all(again.file(name).read_text() == f"x\n{i}\n" for i, name in enumerate(names))
