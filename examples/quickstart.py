"""Quickstart: data -> model lineage with Oxen and MLflow, on a laptop, in under a minute.

    python examples/quickstart.py [--workdir oxen-quickstart] [--epochs 3]

1. creates (once) a local Oxen dataset repository with a generated table in two commits;
2. pins the FIRST commit (the branch has moved on since: the model must not see it);
3. trains a tiny Lightning classifier, committing each checkpoint to a local Oxen
   model repository in the background;
4. logs the lineage to MLflow (``$MLFLOW_TRACKING_URI``, else SQLite in the work folder)
   and prints it.

Run it twice: the second run reuses both repositories.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import shlex
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from oxen_callbacks import PinnedDataset, oxen_child

FEATURES = 8


def write_table(path: Path, rows: int, seed: int, flip: float) -> None:
    """A linearly separable table; ``flip`` of the labels are noise (the 'newer' data)."""
    rng = random.Random(seed)
    weights = [rng.uniform(-1, 1) for _ in range(FEATURES)]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([f"x{i}" for i in range(FEATURES)] + ["label"])
        for _ in range(rows):
            x = [round(rng.gauss(0, 1), 4) for _ in range(FEATURES)]
            label = int(sum(w * v for w, v in zip(weights, x)) > 0)
            if rng.random() < flip:
                label = 1 - label
            out.writerow(x + [label])


def ensure_dataset(root: Path) -> str:
    """Create the dataset repository on the first run; return its first commit."""
    if not (root / ".oxen").exists():
        root.mkdir(parents=True, exist_ok=True)
        oxen_child.init_repo(root)
        write_table(root / "train.csv", rows=2048, seed=0, flip=0.0)
        write_table(root / "val.csv", rows=512, seed=1, flip=0.0)
        oxen_child.commit_paths(root, ["train.csv", "val.csv"], "First version: clean labels")
        write_table(root / "train.csv", rows=2048, seed=0, flip=0.3)
        oxen_child.commit_paths(root, ["train.csv"], "Second version: 30% label noise from a new vendor")
    return oxen_child.log(root)[-1]["id"]


def load_table(path: Path) -> TensorDataset:
    with path.open() as f:
        rows = list(csv.reader(f))[1:]
    x = torch.tensor([[float(v) for v in r[:FEATURES]] for r in rows])
    y = torch.tensor([int(r[FEATURES]) for r in rows])
    return TensorDataset(x, y)


class Classifier(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="oxen-quickstart", help="folder for the repositories and MLflow store")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-oxen", action="store_true", help="train without the callback (for timing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("OXEN_CALLBACKS_CACHE", str(work / "cache"))

    first_commit = ensure_dataset(work / "dataset")
    data = PinnedDataset(work / "dataset", revision=first_commit, paths=["train.csv", "val.csv"])
    callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=work / "checkpoints", monitor="val_loss",
                                                   save_top_k=2, save_last=True)]
    oxen_cb = None
    if not args.no_oxen:
        from oxen_callbacks.lightning import OxenLightningCallback  # (not imported by a --no-oxen timing run)

        oxen_cb = OxenLightningCallback(dataset=data, model_repo=work / "models",
                                        mlflow_tracking_uri=tracking_uri, experiment_name="oxen-quickstart")
        callbacks.append(oxen_cb)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=work, log_every_n_steps=10)
    train = DataLoader(load_table(data.file("train.csv")), batch_size=64, shuffle=True)
    val = DataLoader(load_table(data.file("val.csv")), batch_size=256)
    started = time.perf_counter()
    trainer.fit(Classifier(), train, val)
    seconds = time.perf_counter() - started
    print(f"\nfit took {seconds:.2f}s ({'without' if oxen_cb is None else 'with'} oxen-callbacks)")
    if oxen_cb is None:
        return
    lineage = oxen_cb.lineage
    assert lineage is not None
    print("\nLineage")
    print(f"  MLflow run       {lineage['run']['mlflow_run_id']}  ({lineage['run']['mlflow_tracking_uri']})")
    print(f"  dataset          {lineage['dataset']['repo']} @ {lineage['dataset']['commit']} "
          f"(asked for {lineage['dataset']['revision']!r}; paths {lineage['dataset']['paths']})")
    print(f"  model            {lineage['model']['repo']} @ {lineage['model']['commit']}")
    print(f"                   {lineage['model']['path']}")
    print(f"  checkpoints      {len(lineage['checkpoints'])} committed")
    print(f"  code             git {lineage['code']['git_commit']} (dirty: {lineage['code']['git_dirty']})")
    print("\nInspect it:")
    print(f"  MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} oxen-callbacks lineage {lineage['run']['mlflow_run_id']}")
    print(f"  oxen-callbacks lineage --model-repo {shlex.quote(lineage['model']['repo'])} {lineage['run']['name']}")


if __name__ == "__main__":
    main()
