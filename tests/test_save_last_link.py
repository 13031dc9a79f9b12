"""``ModelCheckpoint(save_last="link")``: Lightning makes ``last.ckpt`` a link to the file it just saved,
without the strategy's ``CheckpointIO`` (an adversarial review found it was never committed, although
the README promises every file a ``ModelCheckpoint`` writes)."""

from __future__ import annotations

import os

import torch
from helpers import file_at
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset
from oxen_callbacks.lightning import OxenLightningCallback


def test_a_linked_last_ckpt_is_committed_as_the_checkpoint_it_links_to(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last="link")
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ckpt, cb], epochs=3).fit(TinyModel(), datamodule=CsvData(pin))

    assert os.path.islink(ckpt.last_model_path)  # (Lightning did link it)
    entries = cb.lineage["checkpoints"]
    lasts = [e for e in entries if e["path"].endswith("/last.ckpt")]
    saves = {e["step"]: e for e in entries if not e["path"].endswith("/last.ckpt")}
    assert [e["step"] for e in lasts] == sorted(saves) and len(lasts) == 3  # one per save, in order

    def committed(entry: dict) -> bytes:
        return file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read").read_bytes()

    for last in lasts:  # each version of last.ckpt holds that step's model: the file it linked to then
        twin = saves[last["step"]]
        assert last["same_model_as"] == twin["path"]
        assert committed(last) == committed(twin)
        blob = file_at(tmp_path / "models", last["commit"], last["path"], tmp_path / "read-last")
        assert torch.load(blob, weights_only=False)["global_step"] == last["step"]
    assert committed(lasts[-1]) == open(ckpt.last_model_path, "rb").read()  # what the trainer's last.ckpt holds
    assert cb.lineage["status"] == "FINISHED"


def test_a_last_ckpt_linked_to_an_earlier_best_names_that_save(dataset_repo, tmp_path):
    """With a monitor and ``save_top_k=1``, an epoch that is not the best saves nothing, and Lightning
    links ``last.ckpt`` again to the last file that callback saved: that checkpoint's step, not the
    step of another callback's save at the same time."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])

    class Worse(TinyModel):  # val_loss rises after the first epoch: the first save stays the best
        def validation_step(self, batch, _idx):  # type: ignore[no-untyped-def]
            self.log("val_loss", float(self.current_epoch))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1, save_last="link")
    every = ModelCheckpoint(dirpath=tmp_path / "every", filename="every-{step}", save_top_k=-1)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ckpt, every, cb], epochs=3).fit(Worse(), datamodule=CsvData(pin))

    entries = cb.lineage["checkpoints"]
    [best] = [e for e in entries if "/epoch=" in e["path"]]
    lasts = [e for e in entries if e["path"].endswith("/last.ckpt")]
    assert len([e for e in entries if "/every-" in e["path"]]) == 3
    assert len(lasts) == 3  # linked again each epoch, to the first epoch's file
    assert all(e["step"] == best["step"] and e["same_model_as"] == best["path"] for e in lasts)
    blob = file_at(tmp_path / "models", lasts[-1]["commit"], lasts[-1]["path"], tmp_path / "read")
    assert torch.load(blob, weights_only=False)["global_step"] == best["step"]
