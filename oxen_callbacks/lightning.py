"""PyTorch Lightning adapter: ``OxenLightningCallback``.

Example::

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.lightning import OxenLightningCallback

    data = PinnedDataset("data/reviews", revision="main", paths=["train.csv"])
    oxen_cb = OxenLightningCallback(dataset=data, model_repo="models/reviews")
    trainer = L.Trainer(callbacks=[ModelCheckpoint(monitor="val_loss"), oxen_cb])
    trainer.fit(model, datamodule=ReviewsData(data.file("train.csv")))

Every file any ``ModelCheckpoint`` (or ``trainer.save_checkpoint``) writes is
committed to the model repository once the write is complete (after the save's
barrier, so sharded folders are whole); top-k deletions are recorded.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from ._publish.claim import record_fit, recorded_fit
from .checkpoints import resolve_resume
from .errors import DatasetMismatchError
from .lineage import read_lineage
from .model_repo import lineage_path
from .pin import PinnedDataset, as_pinned
from .run import LineageRun

log = logging.getLogger(__name__)


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
        self._restored: dict[str, Any] | None = None
        self._originals: dict[str, Any] = {}
        #: Time the training process spent in this callback per checkpoint save (seconds).
        self.stall_seconds: list[float] = []
        self._fitter = uuid.uuid4().hex  # this object, also in the copies ddp_spawn makes of it

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
            chosen = trainer.strategy.broadcast(self.dataset.commit, src=0)
            if chosen != self.dataset.commit:
                raise DatasetMismatchError(
                    f"Rank {trainer.global_rank} resolved dataset commit {self.dataset.commit} but rank 0 "
                    f"resolved {chosen}: the branch moved between processes. Pin a commit id instead of a branch."
                )
        if trainer.is_global_zero:
            mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
            if mlflow_logger is not None and self.run.use_mlflow and self.run.mlflow_run_id is None:
                self.run.mlflow_run_id = mlflow_logger.run_id
                self.run.mlflow_tracking_uri = mlflow_logger._tracking_uri
            self.run.start(continuing=self._resumed_run == self.run.run_name)
            record_fit(self.run.model_repo, self._fitter, self.run.run_name)  # for the main process (ddp_spawn)
        self._install(trainer)

    def _install(self, trainer: pl.Trainer) -> None:
        """See each finished save (after its barrier) and each top-k deletion."""
        save, remove = trainer.save_checkpoint, trainer.strategy.remove_checkpoint
        self._originals = {"save": save, "remove": remove}

        def save_checkpoint(filepath: Any, *args: Any, **kwargs: Any) -> None:
            path = os.fspath(filepath)
            started = time.perf_counter()
            if trainer.is_global_zero and self.run.publisher and os.path.isfile(path) and not os.path.islink(path):
                # The old file is frozen by hard link; a fresh inode keeps an in-place rewrite off it.
                if self.run.publisher.has_source(path):
                    os.unlink(path)
            ours = time.perf_counter() - started
            save(filepath, *args, **kwargs)
            if trainer.is_global_zero and self.run.publisher is not None:
                started = time.perf_counter()
                self.run.checkpoint_saved(path, step=trainer.global_step, epoch=trainer.current_epoch,
                                          metrics=_scalar_metrics(trainer.callback_metrics))
                self.stall_seconds.append(ours + time.perf_counter() - started)

        def remove_checkpoint(filepath: Any) -> None:
            remove(filepath)
            if trainer.is_global_zero:
                self.run.checkpoint_removed(os.fspath(filepath))

        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        trainer.strategy.remove_checkpoint = remove_checkpoint  # type: ignore[method-assign]

    def _uninstall(self, trainer: pl.Trainer) -> None:
        if self._originals:
            del trainer.save_checkpoint
            del trainer.strategy.remove_checkpoint
            self._originals = {}

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.to_lineage() if self.dataset else None, "run_name": self.run.run_name,
                "model_repo": str(self.run.model_repo)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the checkpoint's dataset commit must be the one pinned now."""
        self._restored = state_dict
        recorded = state_dict.get("dataset")
        if recorded and self.dataset is not None and not self.allow_dataset_change:
            self.dataset.check_same(recorded, what="The checkpoint being resumed")
        if self.run.record is not None:
            self.run.record["resumed_from"] = {"run_name": state_dict.get("run_name"), "dataset": recorded}

    # -- fit end -------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.run.finish("FINISHED", best=_best_path(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.run.publisher is not None and not self.run.finished:
            status = "KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED"
            try:
                self.run.finish(status, best=_best_path(trainer))
            except Exception:
                log.exception("Recording the lineage of the failed fit failed too")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall(trainer)

    @property
    def lineage(self) -> dict[str, Any] | None:
        """The run's lineage record (complete after fit).

        Under ``ddp_spawn`` the fit ran in copies of this callback; the record is
        then read from the model repository, where rank 0 committed it under the run
        name it noted for this callback object (a second fit draws a new name there).
        """
        if self.run.record is not None and self.run.finished:
            return self.run.record
        run = recorded_fit(self.run.model_repo, self._fitter) or self.run.run_name
        committed = self.run.model_repo / lineage_path(run)
        if committed.exists():
            return read_lineage(committed)
        return self.run.record


def _best_path(trainer: pl.Trainer) -> str | None:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path
    return None


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
    return out
