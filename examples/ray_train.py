"""Ray Train with complete lineage: Lightning in a TorchTrainer, two workers, one OxenRayCallback.

    python examples/ray_train.py data/reviews models/reviews

The dataset commit is pinned once, on the driver; every worker reads that commit; every reported
checkpoint is committed to ``models/reviews`` once (Oxen keeps them all, Ray keeps the last); one
MLflow run (``$MLFLOW_TRACKING_URI``) carries the pointers. A worker that dies is replaced and the
job resumes from the last reported checkpoint, the last one committed to Oxen.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Any

import lightning as L
import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import (
    RayDDPStrategy,
    RayLightningEnvironment,
    RayTrainReportCallback,
    prepare_trainer,
)
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader, TensorDataset

from oxen_callbacks import PinnedDataset
from oxen_callbacks.ray import OxenRayCallback, pinned_dataset


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def training_step(self, batch: Any, _idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def train_func(config: dict[str, Any]) -> None:
    """Runs in each worker: the pinned commit is already on this node."""
    with open(pinned_dataset().file("train.csv")) as f:  # x0,x1,x2,x3,label rows
        rows = list(csv.reader(f))[1:]
    data = TensorDataset(torch.tensor([[float(v) for v in r[:-1]] for r in rows]), torch.tensor([int(r[-1]) for r in rows]))
    loader = DataLoader(data, batch_size=16, shuffle=True)
    trainer = prepare_trainer(L.Trainer(
        max_epochs=config["epochs"], accelerator="cpu", devices="auto", strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()], callbacks=[RayTrainReportCallback(), *config.get("callbacks", [])],
        enable_checkpointing=False, logger=False, enable_progress_bar=False, enable_model_summary=False))
    checkpoint = ray.train.get_checkpoint()  # after a worker failure: the last reported one
    if checkpoint is None:
        trainer.fit(Classifier(), loader)
        return
    with checkpoint.as_directory() as folder:
        trainer.fit(Classifier(), loader, ckpt_path=os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))


def main(dataset_repo: str, model_repo: str, storage_path: str, *, epochs: int = 3, max_failures: int = 1,
         train_loop_config: dict[str, Any] | None = None) -> tuple[ray.train.Result, dict[str, Any] | None]:
    oxen = OxenRayCallback(dataset=PinnedDataset(dataset_repo, paths=["train.csv"]), model_repo=model_repo)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"epochs": epochs, **(train_loop_config or {})},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(storage_path=os.path.abspath(storage_path), callbacks=[oxen],
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    return result, oxen.lineage  # lineage: dataset commit, every checkpoint's commit, the MLflow run, Ray's run


if __name__ == "__main__":
    ray.init()
    _, lineage = main(sys.argv[1], sys.argv[2], "ray_results")
    print(lineage["dataset"]["commit"], [c["commit"] for c in lineage["checkpoints"]], lineage["run"]["mlflow_run_id"])
