"""While training runs, the MLflow run already names the latest committed checkpoint (README: the tags
``oxen.model.commit`` / ``oxen.model.path``), so a run watched in the UI mid-fit traces to a model."""

from __future__ import annotations

import time

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset
from oxen_callbacks.lightning import OxenLightningCallback


class WatchTags(Callback):
    """At the last epoch's start, wait (up to 30 s) for the run's model tags, as a user watching the UI."""

    def __init__(self, ours: OxenLightningCallback) -> None:
        self.ours = ours
        self.seen: dict[str, str] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "oxen.model.commit" not in self.seen:
            run_id = self.ours.run.sink.run_id if self.ours.run.sink is not None else None
            tags = MlflowClient().get_run(run_id).data.tags if run_id else {}
            self.seen = {k: v for k, v in tags.items() if k.startswith("oxen.model.")}
            time.sleep(0.1)


def test_the_run_names_a_committed_checkpoint_before_training_ends(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    ours = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", experiment_name="tags-mid-fit")
    watch = WatchTags(ours)
    saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    make_trainer(tmp_path, [saves, ours, watch], epochs=3).fit(TinyModel(), datamodule=CsvData(pin))

    earlier = [(c["commit"], c["path"]) for c in ours.lineage["checkpoints"] if c["epoch"] < 2]
    assert (watch.seen.get("oxen.model.commit"), watch.seen.get("oxen.model.path")) in earlier, watch.seen
