"""Hugging Face ``Trainer`` adapter: ``OxenTrainerCallback``.

Example::

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.huggingface import OxenTrainerCallback

    pinned = PinnedDataset("data/reviews", revision="main", paths=["train.jsonl", "eval.jsonl"])
    splits = pinned.load_dataset()
    trainer = Trainer(model, args, train_dataset=splits["train"], eval_dataset=splits["eval"],
                      callbacks=[OxenTrainerCallback(dataset=pinned, model_repo="models/reviews")])
    trainer.train()

Every ``checkpoint-N`` folder the Trainer saves is committed to the model
repository (frozen at ``on_save``, before ``save_total_limit`` can delete it). The
pin rides in each checkpoint's ``trainer_state.json``, so a resumed run checks it
reads the same dataset commit.

With ``preempt_signal=signal.SIGUSR1`` (SLURM: ``sbatch --signal=USR1@90``), that signal makes
the Trainer save a checkpoint and stop; it is committed within ``preempt_timeout`` and the run
ends ``PREEMPTED``. Requeueing is the job script's (``scontrol requeue $SLURM_JOB_ID``); the
requeued job (same ``SLURM_JOB_ID``) goes on with the same run (see :mod:`oxen_callbacks._preempt`).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import time
import weakref
from typing import Any

import transformers
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ._data.hf_datasets import dataset_commits
from ._mlflow.fluent import active_run_id, end_run_if_running
from ._preempt import (
    DEFAULT_PREEMPT_TIMEOUT,
    Preemption,
    RequeuedRun,
    SignalWatch,
    check_timeout,
)
from ._publish.fits import better_earlier_checkpoint
from .errors import ConfigurationError, DatasetMismatchError
from .lineage import status_of_an_uncaught_raise
from .names import ENV_MLFLOW_RUN_ID
from .pin import PinnedDataset, as_pinned
from .run import LineageRun

# A plain entry of TrainerState.stateful_callbacks, not an ExportableState: with
# restore_callback_states_from_checkpoint=True transformers rebuilds ExportableState
# callbacks from stored arguments, which would replace this configured callback.
STATE_KEY = "oxen_callbacks"
_CALLBACK_OF_STATE = "_oxen_callback"  # the callback that took a train()'s TrainerState: one per Trainer

log = logging.getLogger(__name__)


class OxenTrainerCallback(TrainerCallback):
    """Pin the dataset at train start, commit every checkpoint folder to Oxen, log lineage to MLflow.

    Args:
        dataset: a :class:`PinnedDataset`, or the path of a local Oxen dataset repository
            (then ``revision`` and ``paths`` apply). ``None``: no dataset lineage.
        model_repo: local Oxen repository for checkpoints (created when missing).
        allow_dataset_change: let the run read another dataset commit than the pin:
            a resumed checkpoint's, or a ``train_dataset`` loaded from another commit.
        preempt_signal: a signal that means "pre-empted" (e.g. ``signal.SIGUSR1``): on it the
            Trainer saves a checkpoint at the end of the step and stops; the run ends ``PREEMPTED``.
        preempt_timeout: then, the longest wait in seconds for that checkpoint's commit (and
            push) and the lineage; the rest stays journaled for ``oxen-callbacks sync``.
        **run_options: passed to :class:`oxen_callbacks.run.LineageRun`
            (``mlflow``, ``run_name``, ``experiment_name``, ``cache_dir``, ``author``,
            ``remote``, ``branch``, ``push_timeout``, ``drain_timeout``, ``mlflow_timeout``).

    The MLflow run is the one transformers' ``MLflowCallback`` opens with
    ``report_to="mlflow"`` (it runs first), else the active ``mlflow`` run, else a
    new run ended at train end.
    """

    def __init__(
        self,
        *,
        model_repo: str | os.PathLike[str],
        dataset: PinnedDataset | str | os.PathLike[str] | None = None,
        revision: str | None = None,
        paths: list[str] | None = None,
        allow_dataset_change: bool = False,
        preempt_signal: int | None = None,
        preempt_timeout: float = DEFAULT_PREEMPT_TIMEOUT,
        **run_options: Any,
    ) -> None:
        self.preempt_timeout = check_timeout(preempt_timeout)
        self._signal_watch = SignalWatch(preempt_signal, self._preempt_signalled) if preempt_signal else None
        # a requeued SLURM job: the run it was pre-empted in goes on, on the same dataset commit
        self._requeued = RequeuedRun.find(model_repo, run_options)
        if self._requeued is not None:
            dataset = self._requeued.pin(dataset, revision, paths, run_options.get("cache_dir"),
                                         allow_dataset_change=allow_dataset_change)
        else:
            dataset = as_pinned(dataset, revision, paths, run_options.get("cache_dir"))
        self.dataset: PinnedDataset | None = dataset
        self.allow_dataset_change = allow_dataset_change
        self._run_args = {"dataset": dataset, "model_repo": model_repo,
                          "framework": ("transformers", transformers.__version__), **run_options}
        # Validates every option now, before any training time is spent.
        self.run = LineageRun(**(self._requeued.options(self._run_args) if self._requeued else self._run_args))
        self._preemption = Preemption(self.run, timeout=self.preempt_timeout)
        self._stop_for_preemption = False  # the signal came: save and stop at the end of this step
        self._run_before_train = active_run_id()  # the user's own run: never ended by us
        self._run_transformers_started: str | None = None  # the MLflow run transformers started for this train()
        self._transformers_mlflow: list[Any] = []  # the Trainer's MLflowCallbacks (they say whether they started it)
        #: Time the training process spent in this callback per checkpoint save (seconds).
        self.stall_seconds: list[float] = []

    # -- train start ----------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._run_before_train = active_run_id()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        self._transformers_mlflow = _mlflow_callbacks_of_the_calling_trainer()
        self._run_transformers_started = self._run_started_by(self._transformers_mlflow, args)
        other = getattr(state, _CALLBACK_OF_STATE, None)  # (a new TrainerState each train())
        if other is not None and other is not self:  # (they would share one resume state in each checkpoint)
            other.run.finish_after_error("FAILED", what="train() refused")  # (its run started: not left RUNNING)
            raise ConfigurationError(
                "Two OxenTrainerCallbacks are on this Trainer: each checkpoint would be committed twice, and a "
                "resume would give both runs the state of one.", "keep one (trainer.remove_callback(...)).")
        setattr(state, _CALLBACK_OF_STATE, self)
        # when the previous train() raised (a notebook cell stopped with Ctrl-C: KILLED)
        self.run.finish_after_error(status_of_an_uncaught_raise(), what="interrupted train()", wait=False)
        if self.run.finished:  # the same callback in a second train(): a new run
            self.run = LineageRun(**{**self._run_args, "run_name": None})
            self._requeued = None
        self._preemption = Preemption(self.run, timeout=self.preempt_timeout)
        self._stop_for_preemption = False
        try:
            self._begin(args, state, train_dataloader)
        except BaseException:
            self._fail_run_started_for_this_train()
            raise

    def _run_started_by(self, transformers_mlflow: list[Any], args: TrainingArguments) -> str | None:
        """The MLflow run transformers' ``MLflowCallback`` (which comes before this callback) started for this
        train() and ends at its end, if any: never the user's own run (active when the Trainer was built,
        or one it joined: it says whether it started the active run), nor ``$MLFLOW_RUN_ID``'s (an
        orchestrator's, never ended by us)."""
        if "mlflow" not in (args.report_to or []) or not any(getattr(cb, "_auto_end_run", False)
                                                             for cb in transformers_mlflow):
            return None
        run_id = active_run_id()
        if run_id is None or run_id in (self._run_before_train, os.environ.get(ENV_MLFLOW_RUN_ID, "").strip()):
            return None
        return run_id

    def _fail_run_started_for_this_train(self, status: str = "FAILED") -> None:
        """train() stopped (in our on_train_begin, or it raised): end as ``status`` the MLflow run
        transformers started for it (it would stay RUNNING, or end FINISHED at exit), if it still runs;
        no other run (the user may have ended it and started their own since)."""
        if self._run_transformers_started is not None:
            end_run_if_running(self._run_transformers_started, status)

    def _begin(self, args: TrainingArguments, state: TrainerState, train_dataloader: Any) -> None:
        """Check the data this train() reads, then start the lineage run (on the logging process)."""
        self._check_same_commit_on_every_rank()
        recorded = state.stateful_callbacks.get(STATE_KEY)  # present when resuming from a checkpoint
        if self.dataset is not None and not self.allow_dataset_change:  # every process: all fail alike
            if recorded and recorded.get("dataset"):
                self.dataset.check_same(recorded["dataset"], what="The checkpoint being resumed")
            self._check_train_data(getattr(train_dataloader, "dataset", None))
        if state.is_world_process_zero:
            self.run.checkpoint_folders = [os.path.abspath(args.output_dir)] if args.output_dir else None
            self.run.start(continuing=self.run.continues(recorded))
            _ended_at_exit_if_train_raised(self)
            if self._requeued is not None:
                self._requeued.after_start(self.run)
            if recorded:
                self.run.note_resumed(recorded, step=state.global_step, name=f"checkpoint-{state.global_step}")
        state.stateful_callbacks[STATE_KEY] = self.run.resume_state()
        if self._signal_watch is not None:
            self._signal_watch.install()

    def _preempt_signalled(self) -> None:
        """In the signal handler: note it; the step's end then saves and stops."""
        self._preemption.notice()
        self._stop_for_preemption = True

    def _check_same_commit_on_every_rank(self) -> None:
        """Under torchrun each process resolved the revision itself: rank 0's commit is the truth."""
        import torch.distributed as dist

        if self.dataset is None or not (dist.is_available() and dist.is_initialized()):
            return
        chosen = [self.dataset.commit]
        dist.broadcast_object_list(chosen, src=0)
        self.run.check_commit_of_rank_zero(chosen[0], rank=dist.get_rank())

    def _check_train_data(self, train_dataset: Any) -> None:
        """A ``train_dataset`` from ``PinnedDataset.load_dataset`` must come from the pinned commit."""
        assert self.dataset is not None
        others = dataset_commits(train_dataset) - {self.dataset.commit}
        if others:
            raise DatasetMismatchError(
                f"The Trainer's train_dataset was loaded from dataset commit(s) {sorted(others)}, but "
                f"OxenTrainerCallback pins {self.dataset.commit} of {self.dataset.source.location}: "
                "the lineage would name data the model never read.\n"
                "HINT: load the train_dataset from the PinnedDataset given to the callback (pin.load_dataset()), "
                "or pass allow_dataset_change=True."
            )

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """A second train() on a Trainer: transformers' MLflowCallback starts its run at its first log, not
        at train begin (it set itself up in the first train()); noted then, after it."""
        if self._run_transformers_started is None:
            self._run_transformers_started = self._run_started_by(self._transformers_mlflow, args)

    # -- saves ---------------------------------------------------------------------------
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Just before the Trainer saves ``checkpoint-N``, which it rewrites in place when it exists."""
        if self._stop_for_preemption:
            control.should_save = control.should_training_stop = True
        if not state.is_world_process_zero:
            return
        if control.should_save:
            self.run.before_overwrite(_checkpoint_folder(args, state))
        elif control.should_evaluate and args.save_strategy == "best":  # it saves if the evaluation is a new best
            self.run.before_overwrite(_checkpoint_folder(args, state), maybe=True)

    on_epoch_end = on_step_end

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if control.should_training_stop:  # (the save the stop asked for, or the last: the epoch's end must
            self._stop_for_preemption = False  # not save it again; a signal during another save still stops)
        if not state.is_world_process_zero or self.run.publisher is None:
            return
        started = time.perf_counter()
        self.run.note_deleted_checkpoints()  # save_total_limit rotation ran just before this hook
        folder = _checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            if state.is_hyper_param_search:  # a trial saves under output_dir/run-<trial>/
                raise ConfigurationError(f"OxenTrainerCallback found no saved checkpoint at {folder}.",
                                         "use it with Trainer.train(), not Trainer.hyperparameter_search().")
            # save_total_limit ordering by step (mtimes within 1 s) keeps a leftover higher checkpoint instead
            log.warning("The Trainer's save_total_limit rotation deleted %s as soon as it was saved (a checkpoint "
                        "of a higher step is left in output_dir); it is not committed.", folder)
            return
        metrics = {k: float(v) for entry in state.log_history if entry.get("step") == state.global_step
                   for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}
        # Lightning's convention: the index of the epoch in progress (HF's state.epoch 1.0 = end of epoch 0).
        epoch = max(math.ceil(state.epoch) - 1, 0) if state.epoch is not None else None
        self.run.checkpoint_saved(folder, step=state.global_step, epoch=epoch, metrics=metrics)
        self.stall_seconds.append(time.perf_counter() - started)

    # -- train end -------------------------------------------------------------------------
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._signal_watch is not None:
            self._signal_watch.uninstall()
        if state.is_world_process_zero and self.run.publisher is not None and not self.run.finished:
            self.run.note_deleted_checkpoints()
            if self._preemption.noticed:
                self._preemption.end(best=_best_path(args, state, self.run))
            else:
                self.run.finish_soon("FINISHED", best=_best_path(args, state, self.run))

    @property
    def preempted(self) -> bool:
        """Whether ``preempt_signal`` stopped the last ``train()`` (the job script then requeues the job)."""
        return self._preemption.noticed

    @property
    def lineage(self) -> dict[str, Any] | None:
        """The run's lineage record, complete once train() returned (waits for its final commit)."""
        return self.run.lineage()


def _best_path(args: TrainingArguments, state: TrainerState, run: LineageRun) -> str | None:
    """The run's best checkpoint: the Trainer's, or the one an earlier train() of the continued run saved
    when its ``metric_for_best_model`` is better (a new train() knows only its own evaluations)."""
    metric = args.metric_for_best_model
    if not metric or not run.continuing:
        return state.best_model_checkpoint
    earlier = better_earlier_checkpoint(run.earlier_fits_record(), (run.record or {}).get("fit_id"),
                                        metric if metric.startswith("eval_") else f"eval_{metric}",
                                        "max" if args.greater_is_better else "min", state.best_metric)
    return earlier["source"] if earlier else state.best_model_checkpoint


#: Callbacks whose train() started a run: a train() that raises calls no hook of ours (the next train()
#: or the interpreter's exit ends its run), weakly held.
_STARTED: "weakref.WeakSet[OxenTrainerCallback]" = weakref.WeakSet()


def _ended_at_exit_if_train_raised(callback: OxenTrainerCallback) -> None:
    """Note a started run and (re-)register the exit handler, after transformers' MLflowCallback
    imported MLflow: handlers run last-registered first, so ours ends the runs before MLflow's own
    handler would end the active run as FINISHED."""
    atexit.unregister(_end_runs_a_raising_train_left)  # registered again: after MLflow's, whenever it came
    atexit.register(_end_runs_a_raising_train_left)
    _STARTED.add(callback)


def _mlflow_callbacks_of_the_calling_trainer() -> list[Any]:
    """transformers' ``MLflowCallback``s of the Trainer delivering the current event (callbacks are given
    no Trainer: its ``CallbackHandler`` is found a few frames up); ``[]`` when it cannot be found."""
    from transformers.integrations import MLflowCallback
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            return [cb for cb in handler.callbacks if isinstance(cb, MLflowCallback)]
        frame = frame.f_back
    return []


def _end_runs_a_raising_train_left() -> None:
    """At exit, a run still started (its train() raised, a script died of it): FAILED, or KILLED for Ctrl-C,
    its committed checkpoints and MLflow logged; so is the MLflow run transformers started for it."""
    status = status_of_an_uncaught_raise()
    for callback in list(_STARTED):
        if callback.run.publisher is not None and not callback.run.finished:
            log.warning("oxen-callbacks: ending run %s %s before exit (its commits, then MLflow for up to %.0f s); "
                        "Ctrl-C leaves the rest to `oxen-callbacks sync`.", callback.run.run_name, status,
                        callback.run.mlflow_timeout)
            callback.run.finish_after_error(status, what="train() that raised")
            callback._fail_run_started_for_this_train(status)
    _STARTED.clear()


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
