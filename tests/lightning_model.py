"""A tiny Lightning classifier that remembers which rows it trained on."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset


def load_csv(path: Path) -> TensorDataset:
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    x = torch.tensor([[float(v) for v in r[:-1]] for r in rows])
    y = torch.tensor([int(r[-1]) for r in rows])
    return TensorDataset(x, y)


class TinyModel(L.LightningModule):
    def __init__(self, features: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
        self.labels_seen: set[int] = set()

    def training_step(self, batch, _idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.labels_seen.update(y.tolist())
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=0.01)


class CsvData(L.LightningDataModule):
    """Reads the pinned snapshot lazily, as a user's DataModule would."""

    def __init__(self, pin, batch_size: int = 16) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.pin, self.batch_size = pin, batch_size
        self.train_path: Path | None = None

    def setup(self, stage: str) -> None:
        self.train_path = self.pin.file("train.csv")
        self.train, self.val = load_csv(self.train_path), load_csv(self.pin.file("val.csv"))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


def make_trainer(root: Path, callbacks: list, epochs: int = 2, **kwargs) -> L.Trainer:  # type: ignore[no-untyped-def]
    kwargs.setdefault("devices", 1)
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=root, logger=kwargs.pop("logger", False),
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                     accelerator="cpu", **kwargs)


class ShardedDDPStrategy(DDPStrategy):
    """Each rank writes its own shard of a folder checkpoint (FSDP/DeepSpeed style); rank 1 is slow."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):  # type: ignore[no-untyped-def]
        import time

        folder = Path(filepath)
        folder.mkdir(parents=True, exist_ok=True)
        if self.global_rank == 1:
            time.sleep(1.0)
        torch.save({"rank": self.global_rank, "global_step": checkpoint["global_step"]},
                   folder / f"shard-{self.global_rank}.pt")


class SelfWritingStrategy(SingleDeviceStrategy):
    """Writes checkpoints itself, past its CheckpointIO, as FSDP's sharded or DeepSpeed's saves do;
    ``saved`` lists (path, global_step) of each write."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.saved: list[tuple[str, int]] = []

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):  # type: ignore[no-untyped-def]
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, filepath)  # in place: an existing last.ckpt keeps its inode
        self.saved.append((str(filepath), checkpoint["global_step"]))


class OwnIOOnlyStrategy(SingleDeviceStrategy):
    """Takes no CheckpointIO but its own kind, as Lightning's XLA strategies do (a TypeError otherwise)."""

    @property
    def checkpoint_io(self):  # type: ignore[no-untyped-def]
        return SingleDeviceStrategy.checkpoint_io.fget(self)

    @checkpoint_io.setter
    def checkpoint_io(self, io) -> None:  # type: ignore[no-untyped-def]
        if io is not None and type(io) is not TorchCheckpointIO:
            raise TypeError(f"{type(self).__name__}.checkpoint_io must be a TorchCheckpointIO, found {io}")
        SingleDeviceStrategy.checkpoint_io.fset(self, io)
