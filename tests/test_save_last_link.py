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
    links ``last.ckpt`` again to the last file that callback saved: that checkpoint, not a save of
    another callback at the same time, and once, not at every relink."""
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
    # linked again each epoch, to the same file: committed once, as that save
    assert [(e["step"], e["same_model_as"]) for e in lasts] == [(best["step"], best["path"])]
    blob = file_at(tmp_path / "models", lasts[-1]["commit"], lasts[-1]["path"], tmp_path / "read")
    assert torch.load(blob, weights_only=False)["global_step"] == best["step"]


def test_a_resumed_fit_never_commits_the_last_ckpt_an_earlier_fit_linked(dataset_repo, tmp_path):
    """A fit resumed from ``last.ckpt`` (a new Trainer, ``ckpt_path=``) finds the earlier fit's link in
    place: it is not this fit's save, and must not enter its record under this fit's step."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    first = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last="link")
    make_trainer(tmp_path, [first, OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)],
                 epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
    resumed_from = torch.load(first.last_model_path, weights_only=False)["global_step"]

    again = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last="link")
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=2, save_top_k=-1)  # saves first
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [again, steps, cb], epochs=3).fit(TinyModel(), datamodule=CsvData(pin),
                                                             ckpt_path=first.last_model_path)
    lasts = [e for e in cb.lineage["checkpoints"] if e["path"].endswith("/last.ckpt")]
    assert lasts and all(e["step"] > resumed_from for e in lasts)
    for entry in lasts:
        blob = file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read")
        assert torch.load(blob, weights_only=False)["global_step"] == entry["step"]


def test_a_last_ckpt_linking_to_a_checkpoint_folder_is_committed(dataset_repo, tmp_path):
    """A strategy that writes folder checkpoints itself (FSDP/DeepSpeed style): ``last.ckpt`` links to
    the folder, and is committed as that folder."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class FolderStrategy(SingleDeviceStrategy):
        def __init__(self) -> None:
            super().__init__(torch.device("cpu"))

        def save_checkpoint(self, checkpoint, filepath, storage_options=None):  # type: ignore[no-untyped-def]
            os.makedirs(filepath, exist_ok=True)
            torch.save({"global_step": checkpoint["global_step"]}, os.path.join(filepath, "shard-0.pt"))

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last="link")
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ckpt, cb], epochs=2, strategy=FolderStrategy()).fit(
        TinyModel(), datamodule=CsvData(pin))
    entries = cb.lineage["checkpoints"]
    lasts = [e for e in entries if e["path"].endswith("/last.ckpt")]
    assert [e["same_model_as"] for e in lasts] == [e["path"] for e in entries if "/epoch=" in e["path"]]
    for entry in lasts:  # the folder's shard, of that save's step
        blob = file_at(tmp_path / "models", entry["commit"], entry["path"] + "/shard-0.pt", tmp_path / "read")
        assert torch.load(blob, weights_only=False)["global_step"] == entry["step"]


def test_a_last_ckpt_linking_to_a_file_its_strategy_rewrites_in_place_holds_its_own_step(dataset_repo, tmp_path):
    """A strategy writing checkpoints itself rewrites ``best.ckpt`` in place at each save: the link
    to it is frozen as a copy, as its target is, so each ``last.ckpt`` holds its own step's bytes."""
    from lightning_model import SelfWritingStrategy

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best", save_top_k=1, every_n_train_steps=1,
                           save_last="link", enable_version_counter=False)
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    make_trainer(tmp_path, [ckpt, cb], epochs=1, strategy=SelfWritingStrategy()).fit(TinyModel(), datamodule=CsvData(pin))
    lasts = [e for e in cb.lineage["checkpoints"] if e["path"].endswith("/last.ckpt")]
    assert len(lasts) > 2 and not any(e.get("changed_after_save") for e in lasts)
    for entry in lasts:
        blob = file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read")
        assert torch.load(blob, weights_only=False)["global_step"] == entry["step"]
