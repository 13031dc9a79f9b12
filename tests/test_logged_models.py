"""MLflow 3 logged models: one per committed checkpoint (a ``last.ckpt`` shares the model of the
top-k file it copies), naming the Oxen commit that holds its bytes.

One real Lightning fit (its own MLflow run, a monitored metric, top-k rotation, a registered
model) in a real MLflow SQLite store serves most tests; a killed fit and an MLflow without
logged models get their own.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import isolate, moved_dataset
from helpers import (
    killed_as_fit_returns_then_synced,
    logged_models_of_run,
    model_of_each_checkpoint,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ENDPOINT_NOT_FOUND, INVALID_PARAMETER_VALUE

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._mlflow import logged_models
from oxen_callbacks._mlflow.journal import MlflowJournal
from oxen_callbacks._mlflow.registry import promote
from oxen_callbacks._ops import sync
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.lightning import OxenLightningCallback
from oxen_callbacks.run import LineageRun

SCRIPT = Path(__file__).parent / "fit_script.py"
EPOCHS = 3


def _by_checkpoint(models: list) -> dict[tuple[str, str], object]:  # type: ignore[type-arg]
    keyed = {(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]): m for m in models}
    assert len(keyed) == len(models), "two logged models for one checkpoint"
    return keyed


class _CountModelsAtTrainEnd(Callback):
    """At train end (before fit() returns and the end of the run is logged), waits until every
    saved checkpoint has its logged model: they come while training, one per checkpoint but for a
    ``last.ckpt`` that copies a top-k file."""

    def __init__(self, uri: str) -> None:
        self.uri, self.saves, self.seen, self.committed, self.own = uri, 0, -1, 0, 0

    def on_train_end(self, trainer, _module) -> None:  # type: ignore[no-untyped-def]
        run = next(c for c in trainer.callbacks if isinstance(c, OxenLightningCallback)).run
        deadline = time.monotonic() + 120
        self.saves = len(run.publisher.stall_seconds)  # one per checkpoint submitted (weights-only saves too)
        while time.monotonic() < deadline:
            committed = [r for r in run.publisher.results if r.get("kind") == "checkpoint"]
            self.committed, self.own = len(committed), len([r for r in committed if not r.get("same_model_as")])
            self.seen = len(logged_models_of_run(self.uri, run.sink.run_id)) if run.sink.run_id else 0
            if self.committed == self.saves and self.seen == self.own:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("logged-models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root, uri)
        mp.chdir(root)
        dataset = moved_dataset(root / "dataset")
        pin = PinnedDataset(dataset.path, revision=dataset.commits[0], paths=["train.csv", "val.csv"])
        cb = OxenLightningCallback(dataset=pin, model_repo=root / "models", run_name="lm", register_model="lm-clf",
                                   experiment_name="logged-models", mlflow_tracking_uri=uri)
        # the best (the first monitored ModelCheckpoint's) is in its own folder: never the final save;
        # weights only, so its file is never the model of latest's full file of the same step
        best = ModelCheckpoint(dirpath=root / "best", monitor="val_loss", mode="max", save_top_k=1, save_weights_only=True)
        latest = ModelCheckpoint(dirpath=root / "ckpt", monitor="step", mode="max", save_top_k=2,  # rotates epoch 0's
                                 save_last=True)
        counter = _CountModelsAtTrainEnd(uri)
        make_trainer(root / "fit", [best, latest, cb, counter], epochs=EPOCHS).fit(TinyModel(), datamodule=CsvData(pin))
        record = cb.lineage
    return {"root": root, "uri": uri, "record": record, "run_id": record["run"]["mlflow_run_id"],
            "models": logged_models_of_run(uri, record["run"]["mlflow_run_id"]),
            "counted": (counter.saves, counter.committed, counter.seen, counter.own),
            "best": best.best_model_path}


def test_one_logged_model_per_committed_checkpoint_and_last_ckpt_shares_its_top_k_files(fitted, tmp_path):
    record, run_id = fitted["record"], fitted["run_id"]
    entries = record["checkpoints"]
    assert len(entries) > EPOCHS and any(not c["kept"] for c in entries)  # one rotated
    lasts = [c for c in entries if c["path"].endswith("/last.ckpt")]
    assert len(lasts) == EPOCHS and all(c.get("same_model_as") for c in lasts)  # each copies latest's file of its step
    own = [c for c in entries if not c.get("same_model_as")]
    assert len(own) == len(entries) - EPOCHS
    assert fitted["counted"] == (len(entries), len(entries), len(own), len(own))  # logged as committed, before the end
    assert len(fitted["models"]) == len(own)  # no second model of a last.ckpt's weights
    models = model_of_each_checkpoint(fitted["models"], record)
    # the weights-only best file and latest's full files (top-k, last.ckpt) of the same step are other models
    pairs = [(a, b) for a in entries for b in entries if a["step"] == b["step"]
             and Path(a["source"]).parent.name == "best" and Path(b["source"]).parent.name == "ckpt"]
    assert pairs and all(models[(a["commit"], a["path"])].model_id != models[(b["commit"], b["path"])].model_id
                         for a, b in pairs)
    run = MlflowClient(fitted["uri"]).get_run(run_id)
    steps = {o.model_id: o.step for o in run.outputs.model_outputs}
    assert sorted(steps.values()) == sorted(c["step"] for c in own)
    [dataset_input] = run.inputs.dataset_inputs
    for entry in entries:
        model = models[(entry["commit"], entry["path"])]
        assert model.status == "READY" and model.source_run_id == run_id
        assert model.name == Path(model.tags["oxen.model.path"]).stem  # e.g. epoch=0-step=6
        first = entry if not entry.get("same_model_as") else next(  # a last.ckpt: the top-k file it copies
            c for c in entries if c["path"] == entry["same_model_as"] and c["step"] == entry["step"])
        assert Path(first["source"]).parent.name == Path(entry["source"]).parent.name  # (the same ModelCheckpoint's)
        assert (model.tags["oxen.model.commit"], model.tags["oxen.model.path"]) == (first["commit"], first["path"])
        assert model.tags["oxen.model.repo"] == record["model"]["repo"] and model.tags["oxen.run"] == "lm"
        assert steps[model.model_id] == entry["step"]
        assert {m.key: m.value for m in model.metrics} == pytest.approx(entry["metrics"]) and entry["metrics"]
        assert {m.step for m in model.metrics} == {entry["step"]}
        # its dataset is the run's dataset input: the pinned commit
        assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {
            (dataset_input.dataset.name, dataset_input.dataset.digest)}
        assert json.loads(dataset_input.dataset.source)["commit"] == record["dataset"]["commit"]
        # the commit its tags name holds that checkpoint's bytes: the save at that step
        ckpt = materialize_checkpoint(record["model"]["repo"], commit=model.tags["oxen.model.commit"],
                                      path=model.tags["oxen.model.path"], cache_dir=tmp_path / "read")
        assert torch.load(ckpt.path, weights_only=False)["global_step"] == entry["step"]
        if entry is first and entry["kept"]:
            assert ckpt.path.read_bytes() == Path(entry["source"]).read_bytes()
    assert not any((fitted["root"] / "mlflow").glob("**/*.ckpt"))  # no bytes copied into MLflow


def test_best_and_final_checkpoints_are_marked(fitted):
    record, models = fitted["record"], fitted["models"]
    [best] = [m for m in models if m.tags.get("oxen.model.best") == "true"]
    [final] = [m for m in models if m.tags.get("oxen.model.final") == "true"]
    run = MlflowClient(fitted["uri"]).get_run(fitted["run_id"])
    mlflow.set_tracking_uri(fitted["uri"])  # the README's query, as written there
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run.info.run_id}' AND tags.`oxen.model.best` = 'true'")
    assert [m.model_id for m in found] == [best.model_id]
    last = record["checkpoints"][-1]  # a last.ckpt: its top-k file's model is the final one
    assert last["path"].endswith("/last.ckpt") and final.tags["oxen.model.path"] == last["same_model_as"]
    assert final.model_id == model_of_each_checkpoint(models, record)[(last["commit"], last["path"])].model_id
    assert (best.tags["oxen.model.commit"], best.tags["oxen.model.path"]) == (record["model"]["commit"],
                                                                              record["model"]["path"])
    assert Path(best.tags["oxen.model.path"]).name == Path(fitted["best"]).name  # the monitored metric's pick
    assert best.model_id != final.model_id


def test_registered_and_promoted_version_leads_to_the_logged_model_and_its_commit(fitted):
    client, record = MlflowClient(fitted["uri"]), fitted["record"]
    [best] = [m for m in fitted["models"] if m.tags.get("oxen.model.best") == "true"]
    out = promote(record["model"]["repo"], record["model"]["commit"], "production", tracking_uri=fitted["uri"])
    assert out["aliases"] == [{"name": "lm-clf", "version": "1", "alias": "production"}]
    version = client.get_model_version_by_alias("lm-clf", "production")
    assert version.source == f"models:/{best.model_id}" and version.run_id == fitted["run_id"]
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.tags["oxen.model.commit"] == out["commit"] == version.tags["oxen.model.commit"]
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "lm-clf", "version": "1"}]


def test_replaying_a_checkpoint_whose_model_may_exist_creates_no_second_one(fitted, monkeypatch):
    """A sink killed between creating a model and noting its id: `sync` finds it by its tags."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted["uri"])
    record, entry = fitted["record"], fitted["record"]["checkpoints"][0]
    journal = MlflowJournal.create(fitted["root"] / "cache", {
        "tracking_uri": fitted["uri"], "run_id": fitted["run_id"],
        "logged_models": {f"{entry['commit']}:{entry['path']}": None}})  # noted, id never written
    journal.put(1, logged_models.checkpoint_op({**entry, "dest": entry["path"]}, record, dataset_input=True))
    journal.mark_ended()
    assert sync.sync_all(fitted["root"] / "cache", model_repos=[])["pending"] == 0
    models = logged_models_of_run(fitted["uri"], fitted["run_id"])
    model_of_each_checkpoint(models, record)
    assert len(models) == len([c for c in record["checkpoints"] if not c.get("same_model_as")])


def test_a_last_ckpt_shares_its_top_k_files_model_and_nothing_else_does(fitted, monkeypatch):
    """A ``last.ckpt`` that copies a top-k file of its step (``same_model_as``) leads to that file's
    model (the latest save of that path), whether reported together with it or apart; two files of
    one step with the same metrics and no such link (a Ray report, an EMA copy, another callback's
    weights-only file, one path saved twice) are two models. The final mark, the best mark and a
    registered version reach a ``last.ckpt`` through its top-k file's model, and a replayed end keeps
    them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted["uri"])
    client = MlflowClient(fitted["uri"])
    run_id = client.create_run(client.get_run(fitted["run_id"]).info.experiment_id).info.run_id
    folder = "runs/one-step/checkpoints"
    saves = [("c1", "epoch=0-step=6.ckpt", 6, None), ("c1", "last.ckpt", 6, "epoch=0-step=6.ckpt"),
             ("c2", "report", 7, None), ("c3", "report-ema", 7, None),
             # one path saved twice at one step (other bytes), then a last.ckpt of the second save
             ("c5", "latest.pt", 7, None), ("c6", "latest.pt", 7, None), ("c6", "last.ckpt", 7, "latest.pt"),
             ("c4", "epoch=1-step=8.ckpt", 8, None), ("c4", "last.ckpt", 8, "epoch=1-step=8.ckpt")]
    entries = [{"commit": c, "path": f"{folder}/{name}", "step": step, "epoch": 0, "metrics": {"val_loss": 0.5},
                "fit_id": "fit-1", "kept": True, **({"same_model_as": f"{folder}/{same}"} if same else {})}
               for c, name, step, same in saves]
    record = {"run": {"name": "one-step"}, "fit_id": "fit-1", "dataset": None, "checkpoints": entries,
              "model": {"repo": str(fitted["root"] / "models"), "commit": "c1", "path": f"{folder}/last.ckpt"}}

    def log_model(entry: dict) -> dict:  # type: ignore[type-arg]
        return logged_models.checkpoint_op({**entry, "dest": entry["path"]}, record, dataset_input=False)

    journal = MlflowJournal.create(fitted["root"] / "cache-one-step", {"tracking_uri": fitted["uri"], "run_id": run_id})
    journal.put(1, log_model(entries[0]))
    # registered before the step's last.ckpt is reported: its version comes from its top-k file's model
    journal.put(2, {"op": "publish_extras", "record": record, "register_model": "one-step", "graph": False,
                    "dataset_input": False})
    journal.put(3, log_model(entries[1]))  # apart from its top-k file
    for seq, entry in enumerate(entries[2:], 4):  # together (one batch)
        journal.put(seq, log_model(entry))
    end = logged_models.mark_op({**record, "model": {**record["model"], "path": f"{folder}/epoch=0-step=6.ckpt"}},
                                best_path=f"{folder}/epoch=0-step=6.ckpt")
    journal.put(20, end)
    journal.mark_ended()
    assert sync.sync_all(fitted["root"] / "cache-one-step", model_repos=[])["pending"] == 0
    # the end replayed from a journal that knows no model ids (found by searching, marks already on)
    again = MlflowJournal.create(fitted["root"] / "cache-one-step-again", {"tracking_uri": fitted["uri"], "run_id": run_id})
    again.put(1, end)
    again.mark_ended()
    assert sync.sync_all(fitted["root"] / "cache-one-step-again", model_repos=[])["pending"] == 0
    found = logged_models_of_run(fitted["uri"], run_id)
    assert sorted((m.tags["oxen.model.path"].rsplit("/", 1)[1], m.tags["oxen.model.commit"]) for m in found) == [
        ("epoch=0-step=6.ckpt", "c1"), ("epoch=1-step=8.ckpt", "c4"), ("latest.pt", "c5"), ("latest.pt", "c6"),
        ("report", "c2"), ("report-ema", "c3")]
    models = model_of_each_checkpoint(found, record)
    assert models[("c6", f"{folder}/last.ckpt")].tags["oxen.model.commit"] == "c6"  # the save it copies
    [final] = [m for m in found if m.tags.get("oxen.model.final") == "true"]
    [best] = [m for m in found if m.tags.get("oxen.model.best") == "true"]
    assert final.model_id == models[("c4", f"{folder}/last.ckpt")].model_id
    assert final.tags["oxen.model.path"] == f"{folder}/epoch=1-step=8.ckpt"
    assert best.tags["oxen.model.path"] == f"{folder}/epoch=0-step=6.ckpt"
    [version] = client.search_model_versions("name = 'one-step'")
    assert models[("c1", f"{folder}/last.ckpt")].model_id == best.model_id
    assert best.model_id in version.source  # models:/<id>, or its artifact location (another store than the global one)
    assert (version.tags["oxen.model.commit"], version.tags["oxen.model.path"]) == ("c1", f"{folder}/last.ckpt")


def test_a_checkpoint_saved_with_a_nan_metric_shows_no_value_for_it_on_its_model(fitted, monkeypatch):
    """A NaN (or infinite) loss at a save: MLflow's SQL store reads a logged model's NaN back as 0.0, a
    perfect loss. Such a metric is left off the model (the lineage keeps it as it was); the others stay."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted["uri"])
    client = MlflowClient(fitted["uri"])
    run_id = client.create_run(client.get_run(fitted["run_id"]).info.experiment_id).info.run_id
    entry = {"commit": "d" * 32, "path": "runs/nan/checkpoints/e.ckpt", "step": 3, "epoch": 0, "fit_id": "f", "kept": True,
             "metrics": {"val_loss": float("nan"), "train_loss": float("inf"), "acc": 0.75}}
    record = {"run": {"name": "nan"}, "fit_id": "f", "dataset": None, "checkpoints": [entry],
              "model": {"repo": str(fitted["root"] / "models"), "commit": entry["commit"], "path": entry["path"]}}
    journal = MlflowJournal.create(fitted["root"] / "cache-nan", {"tracking_uri": fitted["uri"], "run_id": run_id})
    journal.put(1, logged_models.checkpoint_op({**entry, "dest": entry["path"]}, record, dataset_input=False))
    journal.mark_ended()
    assert sync.sync_all(fitted["root"] / "cache-nan", model_repos=[])["pending"] == 0
    [model] = logged_models_of_run(fitted["uri"], run_id)
    assert {m.key: m.value for m in model.metrics} == {"acc": 0.75}


def test_a_last_ckpt_whose_top_k_file_mlflow_refused_gets_a_model_of_its_own(fitted, monkeypatch):
    """MLflow refuses the top-k file's model (an injected INVALID_PARAMETER_VALUE: a name or tag it will
    not take): the ``last.ckpt`` that copies it is then the model of those weights, marked final."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted["uri"])
    client = MlflowClient(fitted["uri"])
    run_id = client.create_run(client.get_run(fitted["run_id"]).info.experiment_id).info.run_id
    folder = "runs/refused/checkpoints"
    entries = [{"commit": "c1", "path": f"{folder}/epoch=0-step=6.ckpt", "step": 6, "epoch": 0, "metrics": {},
                "fit_id": "fit-1", "kept": True},
               {"commit": "c1", "path": f"{folder}/last.ckpt", "step": 6, "epoch": 0, "metrics": {},
                "fit_id": "fit-1", "kept": True, "same_model_as": f"{folder}/epoch=0-step=6.ckpt"}]
    record = {"run": {"name": "refused"}, "fit_id": "fit-1", "dataset": None, "checkpoints": entries,
              "model": {"repo": str(fitted["root"] / "models"), "commit": "c1", "path": entries[1]["path"]}}
    create = MlflowClient.create_logged_model

    def refuse_top_k(self, experiment_id, name=None, **kwargs):  # type: ignore[no-untyped-def]
        if name == "epoch=0-step=6":
            raise MlflowException("refused", error_code=INVALID_PARAMETER_VALUE)
        return create(self, experiment_id, name=name, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_logged_model", refuse_top_k)
    journal = MlflowJournal.create(fitted["root"] / "cache-refused", {"tracking_uri": fitted["uri"], "run_id": run_id})
    for seq, entry in enumerate(entries, 1):
        journal.put(seq, logged_models.checkpoint_op({**entry, "dest": entry["path"]}, record, dataset_input=False))
    journal.put(3, logged_models.mark_op(record, best_path=None))
    journal.mark_ended()
    assert sync.sync_all(fitted["root"] / "cache-refused", model_repos=[])["pending"] == 0
    [model] = logged_models_of_run(fitted["uri"], run_id)
    assert model.tags["oxen.model.path"] == f"{folder}/last.ckpt" and model.tags.get("oxen.model.final") == "true"


def test_tampered_same_model_as_values_never_link_across_steps_or_forward_nor_crash_sync(fitted, monkeypatch):
    """A record edited by hand, fed to `sync`'s end: ``same_model_as`` that is not a string, names the
    checkpoint itself, another step's file, or a file saved after it. `sync` finishes, and each such
    checkpoint keeps a model of its own: a link is only ever followed to an earlier save of the same
    fit and step (what a real last.ckpt names)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted["uri"])
    client = MlflowClient(fitted["uri"])
    run_id = client.create_run(client.get_run(fitted["run_id"]).info.experiment_id).info.run_id
    folder = "runs/tampered/checkpoints"
    saves = [("c1", "a.ckpt", 6, None), ("c1", "b.ckpt", 6, 42), ("c1", "c.ckpt", 6, "c.ckpt"),
             ("c2", "d.ckpt", 7, "a.ckpt"), ("c2", "e.ckpt", 7, "f.ckpt"), ("c2", "f.ckpt", 7, None)]
    entries = [{"commit": c, "path": f"{folder}/{name}", "step": step, "epoch": 0, "metrics": {}, "fit_id": "fit-1",
                "kept": True, "same_model_as": same if not isinstance(same, str) else f"{folder}/{same}"}
               for c, name, step, same in saves]
    record = {"run": {"name": "tampered"}, "fit_id": "fit-1", "dataset": None, "checkpoints": entries,
              "model": {"repo": str(fitted["root"] / "models"), "commit": "c2", "path": entries[-1]["path"]}}
    journal = MlflowJournal.create(fitted["root"] / "cache-tampered", {"tracking_uri": fitted["uri"], "run_id": run_id})
    journal.put(1, logged_models.mark_op(record, best_path=None))
    journal.mark_ended()
    assert sync.sync_all(fitted["root"] / "cache-tampered", model_repos=[])["pending"] == 0
    found = logged_models_of_run(fitted["uri"], run_id)
    assert sorted(m.tags["oxen.model.path"].rsplit("/", 1)[1] for m in found) == [
        "a.ckpt", "b.ckpt", "c.ckpt", "d.ckpt", "e.ckpt", "f.ckpt"]

def test_a_run_continued_into_another_experiment_has_one_final_and_one_best_model(dataset_repo, tmp_path):
    """Fit A logs to experiment "cont"; fit B continues the run into another experiment (a forgotten
    ``experiment_name``). A's models lose their final and best marks there too: across experiments,
    the run's one final model is B's last checkpoint and its one best model is the record's."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    first = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="cont", experiment_name="cont")
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt", monitor="val_loss"), first],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    assert first.lineage["model"]["commit"]
    again = OxenLightningCallback(model_repo=tmp_path / "models", run_name="cont", resume_from="cont",
                                  experiment_name="other")
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt", monitor="val_loss"), again],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(again.dataset), ckpt_path=again.ckpt_path)
    record = again.lineage
    assert record["earlier_mlflow_runs"] == [{"mlflow_run_id": first.lineage["run"]["mlflow_run_id"],
                                              "mlflow_tracking_uri": first.lineage["run"]["mlflow_tracking_uri"],
                                              "fit_id": first.lineage["fit_id"]}]
    client = MlflowClient(uri)
    models = client.search_logged_models([e.experiment_id for e in client.search_experiments()],
                                         filter_string="tags.`oxen.run` = 'cont'")
    assert len({m.experiment_id for m in models}) == 2

    def marked(tag: str) -> list[tuple[str, str]]:
        return [(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in models if m.tags.get(tag) == "true"]

    last = record["checkpoints"][-1]
    assert marked("oxen.model.final") == [(last["commit"], last["path"])]
    assert marked("oxen.model.best") in ([], [(record["model"]["commit"], record["model"]["path"])])


def test_a_continued_run_moves_its_final_mark_off_the_earlier_fit(dataset_repo, tmp_path):
    """A fit marks the models it made without searching MLflow; a fit that continues a run (whose
    record lists the earlier fit's checkpoints) must still find the earlier fit's final model and
    take the mark off it: one final model per run."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    first = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="cont", experiment_name="cont")
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt"), first],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    earlier = first.lineage["checkpoints"][-1]
    again = OxenLightningCallback(model_repo=tmp_path / "models", run_name="cont", resume_from="cont",
                                  experiment_name="cont")
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), again],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(again.dataset), ckpt_path=again.ckpt_path)
    last = again.lineage["checkpoints"][-1]
    assert (last["commit"], last["path"]) != (earlier["commit"], earlier["path"])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cont").experiment_id
    models = client.search_logged_models([experiment], filter_string="tags.`oxen.run` = 'cont'")
    finals = [(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in models
              if m.tags.get("oxen.model.final") == "true"]
    assert finals == [(last["commit"], last["path"])]
    assert {(earlier["commit"], earlier["path"])} < {(m.tags["oxen.model.commit"], m.tags["oxen.model.path"])
                                                     for m in models}  # the earlier fit's model is still there

    # the first fit's end, replayed by `sync` only now (its MLflow was down then): the marks stay the later fit's
    ids = {f"{m.tags['oxen.model.commit']}:{m.tags['oxen.model.path']}": m.model_id for m in models}
    record = first.lineage
    journal = MlflowJournal.create(tmp_path / "cache", {
        "tracking_uri": uri, "run_id": record["run"]["mlflow_run_id"], "model_repo": str(tmp_path / "models"),
        "oxen_run": "cont", "logged_models": {f"{c['commit']}:{c['path']}": ids[f"{c['commit']}:{c['path']}"]
                                              for c in record["checkpoints"]}})
    journal.put(1, logged_models.mark_op(record, best_path=None))
    journal.mark_ended()
    assert sync.sync_all(tmp_path / "cache", model_repos=[])["pending"] == 0
    models = client.search_logged_models([experiment], filter_string="tags.`oxen.run` = 'cont'")
    assert [(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in models
            if m.tags.get("oxen.model.final") == "true"] == [(last["commit"], last["path"])]


def test_the_final_model_that_is_also_the_best_carries_both_marks(dataset_repo, tmp_path):
    """The last checkpoint is the best one (the monitored value rose each epoch): its one logged model is
    marked final and best (in one request), no other model either."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="both", experiment_name="both")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="epoch", mode="max", save_top_k=-1)
    make_trainer(tmp_path / "fit", [checkpoint, cb], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    record = cb.lineage
    last = record["checkpoints"][-1]
    assert Path(checkpoint.best_model_path).name == Path(last["path"]).name
    models = logged_models_of_run(uri, record["run"]["mlflow_run_id"])
    assert len(models) == 2
    for tag in ("oxen.model.final", "oxen.model.best"):
        assert [(m.tags["oxen.model.commit"], m.tags["oxen.model.path"]) for m in models
                if m.tags.get(tag) == "true"] == [(last["commit"], last["path"])], tag


def test_a_replayed_end_whose_final_model_was_deleted_finishes(dataset_repo, tmp_path):
    """The journal knows each checkpoint's model id; someone deleted the final one in MLflow before
    a fit's end was replayed: `sync` finishes that end (the other marks set) instead of retrying it forever."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="gone", experiment_name="gone")
    make_trainer(tmp_path / "fit", [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1), cb],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    record = cb.lineage
    client = MlflowClient(uri)
    models = _by_checkpoint(logged_models_of_run(uri, record["run"]["mlflow_run_id"]))
    last, first = record["checkpoints"][-1], record["checkpoints"][0]
    client.delete_logged_model(models[(last["commit"], last["path"])].model_id)
    journal = MlflowJournal.create(tmp_path / "cache", {
        "tracking_uri": uri, "run_id": record["run"]["mlflow_run_id"], "model_repo": str(tmp_path / "models"),
        "oxen_run": "gone", "logged_models": {f"{c}:{p}": m.model_id for (c, p), m in models.items()}})
    journal.put(1, logged_models.mark_op({**record, "model": {**record["model"], "commit": first["commit"],
                                                             "path": first["path"]}}, best_path=first["path"]))
    journal.mark_ended()
    assert sync.sync_all(tmp_path / "cache", model_repos=[])["pending"] == 0
    [best] = [m for m in logged_models_of_run(uri, record["run"]["mlflow_run_id"]) if m.tags.get("oxen.model.best") == "true"]
    assert (best.tags["oxen.model.commit"], best.tags["oxen.model.path"]) == (first["commit"], first["path"])


def test_a_fit_without_checkpoints_still_logs_its_dataset_input(dataset_repo, tmp_path):
    """The dataset input goes in with the first logged models, and the end does not log it again;
    a fit that saved no checkpoint must still get it, at the end."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", experiment_name="no-ckpt")
    make_trainer(tmp_path / "fit", [cb], epochs=1, enable_checkpointing=False).fit(TinyModel(), datamodule=CsvData(pin))
    record = cb.lineage
    assert record["checkpoints"] == []
    [dataset_input] = MlflowClient(mlflow.get_tracking_uri()).get_run(record["run"]["mlflow_run_id"]).inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.source)["commit"] == dataset_repo.commits[0]


@pytest.mark.timeout(600)
def test_killed_the_moment_fit_returns_sync_leaves_each_checkpoint_one_logged_model(dataset_repo, tmp_path):
    """SIGKILL right after fit() of a run joined from MLFlowLogger (a thread of the killed process
    served its journal), then `sync`: every committed checkpoint leads to exactly one logged model,
    its step's (``last.ckpt`` and the top-k file of a step share it), and the end's extras the fit
    asked for are there: the registered version and the lineage picture."""
    killed_as_fit_returns_then_synced(dataset_repo, tmp_path, "--register-model", "killed-clf")
    assert sync.sync_all()["pending"] == 0  # and again: nothing is replayed twice
    uri = mlflow.get_tracking_uri()
    [run] = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    record = read_lineage(tmp_path / "models" / "runs" / run.data.tags["oxen.run"] / "lineage.json")
    found = logged_models_of_run(uri, run.info.run_id)
    models = model_of_each_checkpoint(found, record)
    lasts = [c for c in record["checkpoints"] if c["path"].endswith("/last.ckpt")]
    assert lasts and all(c.get("same_model_as") for c in lasts)  # each copies the top-k file of its step
    assert len(found) == len(record["checkpoints"]) - len(lasts)
    assert run.data.params and all(m.params == run.data.params for m in found)  # the logger's hparams
    last = record["checkpoints"][-1]
    assert [m.model_id for m in found if m.tags.get("oxen.model.final") == "true"] == [
        models[(last["commit"], last["path"])].model_id]
    [dataset_input] = run.inputs.dataset_inputs  # logged once: by `sync`, before the models that name it
    assert json.loads(dataset_input.dataset.source)["commit"] == dataset_repo.commits[0]
    assert all({(m.dataset_name, m.dataset_digest) for m in model.metrics} == {
        (dataset_input.dataset.name, dataset_input.dataset.digest)} for model in found if model.metrics)
    assert record["status"] == "FINISHED"
    [version] = MlflowClient(uri).search_model_versions("name = 'killed-clf'")
    assert (version.tags["oxen.model.commit"], version.tags["oxen.model.path"]) == (
        record["model"]["commit"], record["model"]["path"]) and version.run_id == run.info.run_id
    assert version.source == f"models:/{models[(record['model']['commit'], record['model']['path'])].model_id}"
    assert "oxen/lineage.svg" in {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "oxen")}


@pytest.mark.timeout(600)
def test_killed_the_moment_fit_returns_sync_marks_the_best_even_when_it_is_the_last(dataset_repo, tmp_path):
    """The trainer's best checkpoint is its last one (a monitored metric that only grows); SIGKILL right
    after fit() (its lineage ended FINISHED), then `sync`: that checkpoint's logged model is marked final
    and best, as the end would have (found by an adversarial review: sync could not tell "best" from
    "last" and left the best mark out)."""
    killed_as_fit_returns_then_synced(dataset_repo, tmp_path, "--best-is-last")
    uri = mlflow.get_tracking_uri()
    [run] = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    record = read_lineage(tmp_path / "models" / "runs" / run.data.tags["oxen.run"] / "lineage.json")
    assert record["status"] == "FINISHED" and record["model"]["path"] == record["checkpoints"][-1]["path"]
    found = logged_models_of_run(uri, run.info.run_id)
    model = model_of_each_checkpoint(found, record)[(record["model"]["commit"], record["model"]["path"])]
    assert [m.model_id for m in found if m.tags.get("oxen.model.best") == "true"] == [model.model_id]
    assert [m.model_id for m in found if m.tags.get("oxen.model.final") == "true"] == [model.model_id]


def _endpoint_not_found(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    raise MlflowException("API request to endpoint /api/2.0/mlflow/logged-models failed with error code 404 != 200",
                          error_code=ENDPOINT_NOT_FOUND)


@pytest.mark.parametrize("older", ["client", "server"])
def test_an_mlflow_without_logged_models_is_skipped_cleanly(older, tmp_path, monkeypatch, caplog):
    """MLflow before 3 has no logged models, in the client (simulated: the API taken away) or in the
    tracking server (simulated: its 404): the run gets its tags, pointer and registered version
    (source: the pointer folder) as before, and one line says why there are no logged models."""
    monkeypatch.setattr(logged_models, "_said_unsupported", False)
    monkeypatch.setattr(logged_models, "_servers_without", set())
    ckpt = tmp_path / "ckpt" / "step=1.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    with pytest.MonkeyPatch.context() as api, caplog.at_level(logging.DEBUG, logger="oxen_callbacks"), \
            mlflow.start_run() as active:
        if older == "client":
            api.delattr(MlflowClient, "create_logged_model")
        else:
            api.setattr(MlflowClient, "create_logged_model", _endpoint_not_found)
            api.setattr(MlflowClient, "search_logged_models", _endpoint_not_found)
        run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "1"), register_model="old")
        run.start()
        run.checkpoint_saved(ckpt, step=1, metrics={"loss": 0.5})
        record = run.finish()
    said = [r for r in caplog.records if "no logged models" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno <= logging.INFO
    # (this run's store is a local file: an HTTP retry that urllib3 logs meanwhile is another test's
    # leftover thread, talking to a server that test stopped)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and not r.name.startswith("urllib3")], \
        caplog.text
    client = MlflowClient()
    tags = client.get_run(active.info.run_id).data.tags
    assert tags["oxen.model.commit"] == record["model"]["commit"]
    assert client.get_model_version("old", "1").source == f"runs:/{active.info.run_id}/oxen"
    assert mlflow.search_logged_models(experiment_ids=[active.info.experiment_id], output_format="list") == []
    assert sync.sync_all()["pending"] == 0


def test_a_stretch_of_tags_and_models_is_one_request_each_and_keeps_its_meaning(tmp_path):
    """What each committed checkpoint journals (its tags, its model) is merged across checkpoints: the
    later tag wins as it did one by one, and an operation of another kind keeps its place."""
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": "sqlite:///x.db", "run_id": "r1"})
    model = {"op": "log_model", "commit": "c", "step": 1}
    ops = [{"op": "set_tags", "tags": {"a": "1"}}, {**model, "path": "x"}, {"op": "set_tags", "tags": {"a": "2", "b": "1"}},
           {**model, "path": "y"}, {"op": "end_run", "status": "FINISHED"}, {"op": "set_tags", "tags": {"c": "1"}}]
    files = [journal.put(seq, op) for seq, op in enumerate(ops, start=1)]
    assert journal.batches() == [
        ([files[0], files[2]], {"op": "set_tags", "tags": {"a": "2", "b": "1"}}),
        ([files[1], files[3]], {"op": "log_models", "ops": [ops[1], ops[3]]}),
        ([files[4]], ops[4]),
        ([files[5]], ops[5]),
    ]


def test_the_end_of_a_continuing_fit_replayed_after_a_late_save_of_the_fit_it_continued_marks_its_own_last(
        dataset_repo, tmp_path):
    """Fit B continued fit A's run; B's end reached MLflow only later (`sync`), after A's killed worker
    had committed a late save of A's: that save comes last in the run's history, yet the run is B's,
    and its final model is B's last checkpoint."""
    uri = mlflow.get_tracking_uri()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    models = tmp_path / "models"
    first = OxenLightningCallback(dataset=pin, model_repo=models, run_name="cont", experiment_name="cont")
    make_trainer(tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt"), first], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    a_last = first.lineage["checkpoints"][-1]
    again = OxenLightningCallback(model_repo=models, run_name="cont", resume_from="cont", experiment_name="cont")
    make_trainer(tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt"), again], epochs=2).fit(
        TinyModel(), datamodule=CsvData(again.dataset), ckpt_path=again.ckpt_path)
    final = again.lineage
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cont").experiment_id
    found = client.search_logged_models([experiment], filter_string="tags.`oxen.run` = 'cont'")
    for model in found:  # B's end not applied yet: no marks
        for tag in ("oxen.model.final", "oxen.model.best"):
            if model.tags.get(tag):
                client.delete_logged_model_tag(model.model_id, tag)
    path = models / "runs" / "cont" / "lineage.json"  # A's late save lands after B's final lineage
    record = json.loads(path.read_text())
    record["checkpoints"].append({**a_last, "path": a_last["path"].replace(".ckpt", "-late.ckpt"), "job": "late/1",
                                  "fit_id": first.lineage["fit_id"]})
    path.write_text(json.dumps(record))
    ids = {f"{m.tags['oxen.model.commit']}:{m.tags['oxen.model.path']}": m.model_id for m in found}
    journal = MlflowJournal.create(tmp_path / "cache", {
        "tracking_uri": uri, "run_id": final["run"]["mlflow_run_id"], "model_repo": str(models), "oxen_run": "cont",
        "experiment_id": experiment,
        "logged_models": {f"{c['commit']}:{c['path']}": ids[f"{c['commit']}:{c['path']}"] for c in final["checkpoints"]}})
    journal.put(1, logged_models.mark_op(final, best_path=None))  # what `sync` replays of B's end
    journal.mark_ended()
    assert sync.sync_all(tmp_path / "cache", model_repos=[])["pending"] == 0
    own = [c for c in final["checkpoints"] if c["fit_id"] == final["fit_id"]][-1]
    assert [(m.tags["oxen.model.commit"], m.tags["oxen.model.path"])
            for m in client.search_logged_models([experiment], filter_string="tags.`oxen.run` = 'cont'")
            if m.tags.get("oxen.model.final") == "true"] == [(own["commit"], own["path"])]
