"""PyTorch Lightning adapter: ``OxenLightningCallback``.

Example::

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.lightning import OxenLightningCallback

    data = PinnedDataset("data/reviews", revision="main", paths=["train.csv"])
    oxen_cb = OxenLightningCallback(dataset=data, model_repo="models/reviews")
    trainer = L.Trainer(callbacks=[ModelCheckpoint(monitor="val_loss"), oxen_cb])
    trainer.fit(model, datamodule=ReviewsData(data.file("train.csv")))

Every checkpoint any ``ModelCheckpoint`` (or ``trainer.save_checkpoint``) writes is committed
to the model repository once written; top-k deletions are recorded. The callback sees them
through the strategy's ``CheckpointIO`` plugin point (see :mod:`oxen_callbacks._lightning_io`).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from ._lightning_io import CheckpointWatch
from .checkpoints import resolve_resume
from .pin import PinnedDataset, as_pinned
from .run import LineageRun


class OxenLightningCallback(Callback):
    """Pin the dataset at fit start, commit every checkpoint to Oxen, log lineage to MLflow.

    Args:
        dataset: a :class:`PinnedDataset`, or the path of a local Oxen dataset repository
            (then ``revision`` and ``paths`` apply). ``None``: no dataset lineage.
        model_repo: local Oxen repository for checkpoints (created when missing).
        allow_dataset_change: let a resumed fit read another dataset commit than the
            checkpoint recorded.
        resume_from: a checkpoint committed earlier to ``model_repo``: ``"latest"``, a run
            name, a checkpoint commit id, or a lineage record (mapping or ``lineage.json``
            path: its final/best checkpoint). It is materialized now (once per machine)
            into :attr:`ckpt_path`; pass that to ``trainer.fit(..., ckpt_path=cb.ckpt_path)``.
            Without ``dataset``, the dataset pin recorded with it is restored.
        **run_options: passed to :class:`oxen_callbacks.run.LineageRun`
            (``mlflow``, ``run_name``, ``experiment_name``, ``cache_dir``, ``author``,
            ``remote``, ``branch``, ``push_timeout``, ``drain_timeout``, ``mlflow_timeout``).

    The MLflow run is, in order: Lightning's ``MLFlowLogger`` run, the active
    ``mlflow`` run, or a new run ended at fit end.
    """

    def __init__(
        self,
        *,
        model_repo: str | os.PathLike[str],
        dataset: PinnedDataset | str | os.PathLike[str] | None = None,
        revision: str | None = None,
        paths: list[str] | None = None,
        allow_dataset_change: bool = False,
        resume_from: str | os.PathLike[str] | dict[str, Any] | None = None,
        **run_options: Any,
    ) -> None:
        self.ckpt_path: str | None = None
        self._resumed_run: str | None = None  # the run resume_from continues, when it names one
        if resume_from is not None:
            resumed = resolve_resume(model_repo, resume_from, cache_dir=run_options.get("cache_dir"))
            self.ckpt_path = str(resumed.path)
            self._resumed_run = (resumed.lineage or {}).get("run", {}).get("name")
            if dataset is None and resumed.dataset:
                dataset = resumed.pinned_dataset(cache_dir=run_options.get("cache_dir"))
        dataset = as_pinned(dataset, revision, paths, run_options.get("cache_dir"))
        self.dataset: PinnedDataset | None = dataset
        self.allow_dataset_change = allow_dataset_change
        self._run_args = {"dataset": dataset, "model_repo": model_repo,
                          "framework": ("lightning", lightning.__version__), **run_options}
        # Validates every option now, before any training time is spent.
        self.run = LineageRun(**self._run_args)
        #: Time the training process spent in this callback per checkpoint save (seconds).
        self.stall_seconds: list[float] = []
        self._fitter = uuid.uuid4().hex  # this object, also in the copies ddp_spawn makes of it
        self._watch: CheckpointWatch | None = None  # from setup to teardown of a fit

    @property
    def state_key(self) -> str:
        return "OxenLightningCallback"

    # -- fit start ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.run.finished:  # the same callback in a second fit: a new run
            self.run = LineageRun(**{**self._run_args, "run_name": None})
        if self.dataset is not None:
            self.dataset.pull()  # every process; one per node materializes, the others wait on its lock
            self.run.check_commit_of_rank_zero(trainer.strategy.broadcast(self.dataset.commit, src=0),
                                               rank=trainer.global_rank)
        if trainer.is_global_zero:
            mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
            if mlflow_logger is not None and self.run.use_mlflow and self.run.mlflow_run_id is None:
                self.run.mlflow_run_id = mlflow_logger.run_id
                self.run.mlflow_tracking_uri = mlflow_logger.experiment.tracking_uri
            # The fit key lets the main process of ddp_spawn find the run this copy trains.
            self.run.start(continuing=self._resumed_run == self.run.run_name, fit_key=self._fitter)
        self._watch = CheckpointWatch(trainer, self.run, self.stall_seconds)
        self._watch.install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._watch is not None:
            self._watch.uninstall()
            self._watch = None

    # -- saves: the CheckpointIO sees most; a save that bypassed it is published at the next hook ------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._watch is not None:
            self._watch.save_begins()

    def _publish_unseen_save(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._watch is not None:
            self._watch.publish_unseen_save()

    on_train_batch_start = on_train_epoch_start = on_train_epoch_end = _publish_unseen_save
    on_validation_start = on_train_end = _publish_unseen_save

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.run.resume_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the checkpoint's dataset commit must be the one pinned now."""
        recorded = state_dict.get("dataset")
        if recorded and self.dataset is not None and not self.allow_dataset_change:
            self.dataset.check_same(recorded, what="The checkpoint being resumed")
        self.run.note_resumed(run_name=state_dict.get("run_name"), dataset=recorded)

    # -- fit end -------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._publish_unseen_save(trainer)  # a save at on_train_end
            self.run.finish_soon("FINISHED", best=_best_path(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._watch is not None:  # Lightning calls no teardown after an exception
            self._watch.publish_unseen_save()
            self._watch.uninstall()
            self._watch = None
        if trainer.is_global_zero:
            status = "KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED"
            self.run.finish_after_error(status, best=_best_path(trainer), what="failed fit")

    @property
    def lineage(self) -> dict[str, Any] | None:
        """The run's lineage record, complete once fit() returned (reading it waits for the final
        lineage commit and the MLflow logging that fit() did not wait for, see :meth:`.LineageRun.finish_soon`).

        Under ``ddp_spawn`` the fit ran in copies of this callback; the record is
        then read from the model repository, where rank 0 committed it under the run
        name it noted for this callback object (a second fit draws a new name there).
        """
        return self.run.lineage(self._fitter)


def _best_path(trainer: pl.Trainer) -> str | None:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path
    return None
