"""PyTorch Lightning adapter: ``OxenLightningCallback``.

Example::

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.lightning import OxenLightningCallback

    data = PinnedDataset("data/reviews", revision="main", paths=["train.csv"])
    oxen_cb = OxenLightningCallback(dataset=data, model_repo="models/reviews")
    trainer = L.Trainer(callbacks=[ModelCheckpoint(monitor="val_loss"), oxen_cb])
    trainer.fit(model, datamodule=ReviewsData(data.file("train.csv")))

Every checkpoint any ``ModelCheckpoint`` (or ``trainer.save_checkpoint`` called during the fit,
e.g. from a callback) writes is committed to the model repository once written; top-k deletions
are recorded. A ``trainer.save_checkpoint`` after ``fit()`` returned belongs to no run: it is not
committed (resume from it, and the next run records it as ``resumed_from``). The callback sees them
through the strategy's ``CheckpointIO`` plugin point (see :mod:`oxen_callbacks._lightning_io`).

Under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (Lightning's default there), the
checkpoint Lightning saves on the requeue signal is committed before the job exits, the run ends
``PREEMPTED``, and the requeued job goes on with the same run (see :mod:`oxen_callbacks._preempt`).
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from ._lightning_io import CheckpointWatch
from ._preempt import (
    DEFAULT_PREEMPT_TIMEOUT,
    Preemption,
    RequeuedRun,
    SignalWatch,
    check_timeout,
)
from ._publish.fits import better_earlier_checkpoint
from .checkpoints import resolve_resume
from .errors import DatasetMismatchError
from .pin import PinnedDataset, as_pinned
from .run import LineageRun

try:  # Lightning's answer to SIGTERM (`kill`, `docker stop`, an eviction): the fit stops at the next step
    from lightning.pytorch.utilities.exceptions import SIGTERMException
except ImportError:  # (an older Lightning without it: Ctrl-C alone is told apart)
    SIGTERMException = KeyboardInterrupt  # type: ignore[assignment,misc]


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
        preempt_timeout: on SLURM pre-emption (Lightning's requeue signal), the longest wait in
            seconds for the requeue checkpoint's commit (and push) and the lineage before the
            process exits; the rest stays journaled for ``oxen-callbacks sync``. Keep it below
            SLURM's ``KillWait``.
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
        preempt_timeout: float = DEFAULT_PREEMPT_TIMEOUT,
        **run_options: Any,
    ) -> None:
        self.ckpt_path: str | None = None
        self._resumed_run: str | None = None  # the run resume_from continues, when it names one
        self._resumed_commit: dict[str, str] | None = None  # the checkpoint resume_from materialized
        self.preempt_timeout = check_timeout(preempt_timeout)
        # a requeued SLURM job: the run it was pre-empted in goes on (Lightning resumes its hpc checkpoint)
        self._requeued = RequeuedRun.find(model_repo, run_options) if resume_from is None else None
        if self._requeued is not None:
            self._resumed_run = self._requeued.run_name
        if resume_from is not None:
            resumed = resolve_resume(model_repo, resume_from, cache_dir=run_options.get("cache_dir"))
            self.ckpt_path = str(resumed.path)
            self._resumed_run = (resumed.lineage or {}).get("run", {}).get("name")
            self._resumed_commit = {"commit": resumed.commit, "path": resumed.repo_path}
            if dataset is None and resumed.dataset:
                dataset = resumed.pinned_dataset(cache_dir=run_options.get("cache_dir"))
        if self._requeued is not None:
            dataset = self._requeued.pin(dataset, revision, paths, run_options.get("cache_dir"),
                                         allow_dataset_change=allow_dataset_change)
        else:
            dataset = as_pinned(dataset, revision, paths, run_options.get("cache_dir"))
        self.dataset: PinnedDataset | None = dataset
        self.allow_dataset_change = allow_dataset_change
        self._run_args = {"dataset": dataset, "model_repo": model_repo,
                          "framework": ("lightning", lightning.__version__), **run_options}
        # Validates every option now, before any training time is spent.
        self.run = LineageRun(**(self._requeued.options(self._run_args) if self._requeued else self._run_args))
        #: Time the training process spent in this callback per checkpoint save (seconds).
        self.stall_seconds: list[float] = []
        self._fitter = uuid.uuid4().hex  # this object, also in the copies ddp_spawn makes of it
        self._watch: CheckpointWatch | None = None  # from setup to teardown of a fit
        self._preemption: Preemption | None = None  # from setup to the end of a fit
        self._signal_watch: SignalWatch | None = None

    @property
    def state_key(self) -> str:
        return "OxenLightningCallback"

    # -- fit start ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.run.finished:  # the same callback in a second fit: a new run
            self.run = LineageRun(**{**self._run_args, "run_name": None})
            self._requeued = None
        if self.dataset is not None:
            if not self.allow_dataset_change:  # every process: all fail alike, before any step
                _check_datamodule(self.dataset, trainer.datamodule)
            self.dataset.pull()  # every process; one per node materializes, the others wait on its lock
            self.run.check_commit_of_rank_zero(trainer.strategy.broadcast(self.dataset.commit, src=0),
                                               rank=trainer.global_rank)
        if trainer.is_global_zero:
            mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
            if mlflow_logger is not None and self.run.use_mlflow and self.run.mlflow_run_id is None:
                self.run.mlflow_run_id = mlflow_logger.run_id
                self.run.mlflow_tracking_uri = mlflow_logger.experiment.tracking_uri
            # The fit key lets the main process of ddp_spawn find the run this copy trains.
            self.run.checkpoint_folders = [os.path.abspath(cb.dirpath) for cb in trainer.checkpoint_callbacks
                                           if isinstance(cb, ModelCheckpoint) and cb.dirpath]
            self.run.start(continuing=self._resumed_run == self.run.run_name, fit_key=self._fitter)
            if self._requeued is not None:
                self._requeued.after_start(self.run)
        self._watch = CheckpointWatch(trainer, self.run, self.stall_seconds)
        self._watch.install()
        self._preemption = Preemption(self.run, timeout=self.preempt_timeout)

    def _watch_requeue_signal(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning has set its signal handlers (``Trainer._run``, just before the sanity check): note the
        requeue signal before its handler saves. The first hook after that is the sanity check's start (when
        there is one), else the train start: a signal during the sanity check requeues the job too."""
        env = getattr(trainer.strategy, "cluster_environment", None)
        if self._preemption is None or self._signal_watch is not None or not (
                isinstance(env, SLURMEnvironment) or SLURMEnvironment.detect()):
            return
        requeue_signal = getattr(env, "requeue_signal", None) or signal.SIGUSR1
        self._signal_watch = SignalWatch(requeue_signal, self._preemption.notice)
        if not self._signal_watch.install(only_over_a_handler=True):  # auto_requeue=False: no requeue
            self._signal_watch = None

    on_sanity_check_start = on_train_start = _watch_requeue_signal

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._watch is not None:
            self._watch.uninstall()
            self._watch = None
        if stage == "fit" and self._signal_watch is not None:
            self._signal_watch.uninstall()
            self._signal_watch = None

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

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """On resume: the lineage records the checkpoint the weights come from (its commit when a run
        of ours committed it), also one saved without this callback."""
        file = str(trainer.ckpt_path) if trainer.ckpt_path else None
        self.run.note_resumed(
            (checkpoint.get("callbacks") or {}).get(self.state_key), step=checkpoint.get("global_step"),
            name=os.path.basename(file) if file else None, file=file,
            committed=self._resumed_commit if file == self.ckpt_path else None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the checkpoint's dataset commit must be the one pinned now."""
        recorded = state_dict.get("dataset")
        if recorded and self.dataset is not None and not self.allow_dataset_change:
            self.dataset.check_same(recorded, what="The checkpoint being resumed")

    # -- fit end -------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._publish_unseen_save(trainer)  # a save at on_train_end
            self.run.finish_soon("FINISHED", best=_best_path(trainer, self.run))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._watch is not None:  # Lightning calls no teardown after an exception
            self._watch.publish_unseen_save()
            self._watch.uninstall()
            self._watch = None
        if self._signal_watch is not None:
            self._signal_watch.uninstall()
            self._signal_watch = None
        if trainer.is_global_zero and self._preemption is not None and self._preemption.noticed:
            self._preemption.end(best=_best_path(trainer, self.run))  # SLURM's SIGTERM after the requeue
        elif trainer.is_global_zero:
            status = "KILLED" if _stopped_from_outside(exception) else "FAILED"
            # (not waited for: a Ctrl-C or an error must not wait up to mlflow_timeout on a dead server)
            self.run.finish_after_error(status, best=_best_path(trainer, self.run), what="failed fit", wait=False)

    @property
    def lineage(self) -> dict[str, Any] | None:
        """The run's lineage record, complete once fit() returned (reading it waits for the final
        lineage commit and the MLflow logging that fit() did not wait for, see :meth:`.LineageRun.finish_soon`).

        Under ``ddp_spawn`` the fit ran in copies of this callback; the record is
        then read from the model repository, where rank 0 committed it under the run
        name it noted for this callback object (a second fit draws a new name there).
        """
        return self.run.lineage(self._fitter)


def _check_datamodule(pin: PinnedDataset, datamodule: Any) -> None:
    """The DataModule must not read another commit of the pinned repository: one built from an earlier
    pin in a notebook would train on data the lineage does not name. (Not the model: its hyperparameters
    may record the data of the fit that made it, which a fine-tuning does not read.)"""
    others = pin.other_commits_held(datamodule) if datamodule is not None else set()
    if others:
        raise DatasetMismatchError(
            f"The DataModule holds dataset commit(s) {sorted(others)} of {pin.source.location}, but "
            f"OxenLightningCallback pins {pin.commit}: the lineage would name data the model never read.\n"
            "HINT: build the DataModule from the PinnedDataset given to the callback (a notebook: run the "
            "DataModule's cell again after the pin's), or pass allow_dataset_change=True.")


def _stopped_from_outside(exception: BaseException) -> bool:
    """Whether the fit was stopped (Ctrl-C, SIGTERM), not failed: its run ends KILLED, as a killed one does."""
    return isinstance(exception, (KeyboardInterrupt, SIGTERMException))


def _best_path(trainer: pl.Trainer, run: LineageRun) -> str | None:
    """The run's best checkpoint: the trainer's (its first ``ModelCheckpoint`` with a monitor), or the one an
    earlier fit of the continued run saved when its monitored metric is better."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            score = cb.best_model_score
            earlier = better_earlier_checkpoint(run.earlier_fits_record(), (run.record or {}).get("fit_id"), cb.monitor,
                                                cb.mode, float(score) if score is not None else None)
            return earlier["source"] if earlier else cb.best_model_path
    return None
