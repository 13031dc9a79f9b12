"""The framework-free core a training run talks to: pin, publish, record, log.

The Lightning and Hugging Face adapters only translate their hooks into these
calls, on the process that does I/O (global rank 0)::

    run = LineageRun(dataset=pin, model_repo="models/clf", framework=("lightning", "2.6"))
    run.start()                                  # pull the pin, start the worker, open MLflow
    run.checkpoint_saved("ckpts/e0.ckpt", step=100, epoch=0, metrics={"val_loss": 0.4})
    run.checkpoint_removed("ckpts/e0.ckpt")      # top-k rotation
    record = run.finish("FINISHED", best="ckpts/e3.ckpt")
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import __version__
from ._lineage_html import LineageView
from ._oxen.remote_spec import parse_remote
from ._oxen.repo import LocalRepo
from ._publish.claim import RunClaim, record_fit, recorded_fit
from ._publish.dests import first_folder_of
from ._publish.freeze import SetAside, unfreeze_for_rewrite
from ._publish.opening import open_model_repo
from ._publish.publisher import CheckpointPublisher
from ._publish.queue import run_backlog
from ._publish.warm_worker import WarmWorker
from ._run_checks import RunOptionChecks
from ._run_end import RunEnding, now
from ._util import background
from ._util.cache import default_cache_dir
from ._util.fs import parse_json
from ._util.gitinfo import code_info
from ._util.processes import check_can_start_processes
from ._util.redact import redact_argv, redact_url
from .checkpoints import committed_checkpoint
from .errors import ConfigurationError, PublishError
from .lineage import LineageJSON, new_record, read_lineage, read_or_skip
from .model_repo import checkpoints_folder, lineage_path
from .names import ENV_JUPYTER_NOTEBOOK, ENV_RANKS
from .pin import PinnedDataset

log = logging.getLogger(__name__)


def new_run_name() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class LineageRun(RunOptionChecks, RunEnding):
    """One training run's lineage; see the module docstring.

    Args:
        dataset: the pinned dataset the run reads (``None``: checkpoints only).
        model_repo: local Oxen repository the checkpoints are committed to (created if missing).
        framework: ``(name, version)`` recorded in the lineage.
        mlflow: log tags and the pointer file to MLflow (``False``: lineage in the model repo only).
        mlflow_run_id / mlflow_tracking_uri / experiment_name: which run to log into;
            default the active run, else a new one in ``$MLFLOW_EXPERIMENT_NAME`` or ``Default``.
        run_name: the run's folder in the model repository, ``runs/<run_name>/``.
        cache_dir: snapshots and journals; default ``~/.cache/oxen-callbacks``.
        author: ``(name, email)`` of the checkpoint commits.
        remote / remote_url / branch / push_timeout: push the model repository to an Oxen
            remote after commits (each push a child process killed after ``push_timeout``).
        drain_timeout: longest wait at the end for commits (``None``: until done); a record whose final
            commit did not come by then says ``final_commit: "pending"`` (``oxen-callbacks sync`` commits it).
        mlflow_timeout: longest wait at the end for MLflow (the rest stays journaled).
        register_model: register the final checkpoint as a new version of this MLflow model
            (source ``runs:/<run>/oxen``, tags naming the Oxen commits).
        log_dataset_input: log the pinned dataset in the MLflow run's Datasets panel.
        log_lineage_graph: log the lineage picture ``oxen/lineage.svg`` to the MLflow run.
        log_models: make an MLflow 3 logged model of each committed checkpoint (``False``: the run's
            tags and ``oxen/lineage.json`` still name every checkpoint's commit).
    """

    def __init__(
        self,
        *,
        dataset: PinnedDataset | None,
        model_repo: str | os.PathLike[str],
        framework: tuple[str, str],
        mlflow: bool = True,
        mlflow_run_id: str | None = None,
        mlflow_tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        author: tuple[str, str] | None = None,
        remote: str | None = None,
        remote_url: str | None = None,
        branch: str | None = None,
        push_timeout: float = 300.0,
        drain_timeout: float | None = None,
        mlflow_timeout: float = 60.0,
        register_model: str | None = None,
        log_dataset_input: bool = True,
        log_lineage_graph: bool = True,
        log_models: bool = True,
    ) -> None:
        self.dataset = dataset
        self.model_repo = Path(model_repo).expanduser().resolve()
        self.framework = {"name": framework[0], "version": framework[1]}
        self.cache_dir = Path(cache_dir or default_cache_dir()).expanduser().resolve()
        self.run_name = run_name or new_run_name()
        self._named = run_name is not None  # an explicit name is the user's; a default one can be redrawn
        self.use_mlflow = mlflow
        self.mlflow_run_id, self.mlflow_tracking_uri = mlflow_run_id, mlflow_tracking_uri
        #: Where the trainer saves checkpoints this fit (its adapter says; ``None``: unknown), see :meth:`_first_folder`.
        self.checkpoint_folders: list[str] | None = None
        self.continuing = False  #: this fit goes on with a run earlier fits saved checkpoints of (see :meth:`start`)
        self.experiment_name = experiment_name
        self.author, self.remote, self.branch, self.push_timeout = author, remote, branch, push_timeout
        self.remote_url = parse_remote(remote_url).url if remote_url else None
        self.drain_timeout, self.mlflow_timeout = drain_timeout, mlflow_timeout
        self.register_model, self.log_dataset_input, self.log_lineage_graph, self.log_models = (
            register_model, log_dataset_input, log_lineage_graph, log_models)
        self._validate()
        self.publisher: CheckpointPublisher | None = None
        self.sink: Any = None
        self.record: LineageJSON | None = None
        self.finished = False
        self._claim: RunClaim | None = None
        self._published: list[str] = []  # checkpoint paths queued for commit, in order
        self._warm_sink: Any = None
        self._warm_worker: WarmWorker | None = None
        self._init_ending()
        if _likely_rank_zero():
            self._start_early_work()

    def _start_early_work(self) -> None:
        """Work that overlaps the user building the model and trainer: start the publishing worker, import MLflow."""
        self._warm_worker = WarmWorker()
        if self.use_mlflow:
            from ._mlflow.fluent import mlflow_imported
            from ._mlflow.warm_sink import WarmSinkProcess

            # MLflow already loaded here: most likely a logger's or the active run, which a thread of
            # this process logs (MlflowSink.attach); a run of our own then takes the sink an earlier
            # run left idle (a notebook), else starts its sink at fit start
            self._warm_sink = (WarmSinkProcess(self.mlflow_tracking_uri) if not mlflow_imported()  # imports MLflow
                               else WarmSinkProcess.if_idle(self.mlflow_tracking_uri))

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for ``ddp_spawn``: the warm processes and the claim stay here."""
        return {**self.__dict__, "_warm_sink": None, "_warm_worker": None, "_claim": None, "_finisher": None,
                "_committed": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._committed = threading.Event()

    def _validate(self) -> None:
        super()._validate()
        if self.use_mlflow:
            from ._mlflow.fluent import mlflow_available

            if not mlflow_available():
                raise ConfigurationError("mlflow=True but MLflow is not installed.",
                                         "pip install mlflow, or pass mlflow=False (lineage then lives in the model repo).")
        if self.register_model is not None:
            from ._mlflow.registry import check_model_name

            check_model_name(self.register_model)
            if not self.use_mlflow:
                raise ConfigurationError(f"register_model={self.register_model!r} needs MLflow, but mlflow=False.",
                                         "pass mlflow=True, or drop register_model.")

    # -- lifecycle -------------------------------------------------------------------
    def start(self, *, continuing: bool = False, fit_key: str | None = None) -> None:
        """Claim the run name, then pull (and check) the pinned data, start the publisher, open the MLflow run.

        ``continuing``: this fit resumes the run of the same name (its lineage goes on);
        otherwise a name an earlier run used is refused (see :class:`~.publish.claim.RunClaim`).
        ``fit_key``: an id the caller keeps across processes (``ddp_spawn`` copies); the run name
        is noted under it in the model repository for :meth:`lineage`.
        """
        check_can_start_processes()  # the environment may have grown since the callback was built
        continuing = self._continue_in_shared_mlflow_run(continuing)
        # an earlier fit of this process still finishing its lineage (all of it when it is this run's)
        background.wait_for(self.model_repo, run=self.run_name)
        opened = open_model_repo(self.model_repo, self.cache_dir)  # `oxen init` when new: a file written, ~1 ms
        try:
            self._claim = RunClaim.take(self.model_repo, self.run_name, continuing=continuing)
        except ConfigurationError:
            if self._named:
                raise
            self.run_name = new_run_name()  # a default name drawn twice (24 random bits): draw again
            self._claim = RunClaim.take(self.model_repo, self.run_name, continuing=False)
        self.continuing = continuing
        try:
            if continuing:
                self._check_continued_dataset()
            self._open(opened)
        except BaseException:
            self._claim.release()  # nothing was queued under the name: it stays free
            self._claim = None
            self._end_unstarted_sink()
            raise
        if fit_key is not None:
            record_fit(self.model_repo, fit_key, self.run_name)
        if self.sink is not None:
            self._note_mlflow_run(self.sink.run_id)

    def _open(self, repo: LocalRepo) -> None:
        """Pull the pinned data and check it is as recorded, start the publisher, open the MLflow run and tag it."""
        if self.dataset is not None:
            self.dataset.pull()
            self.dataset.verify()  # counts and sizes: a snapshot cut or grown in place stops the run before a step
        # one per fit (a continued run has several), so a late job knows its own segment; in the MLflow
        # journal from its start: a fit killed before its record exists never ends with an earlier fit's
        fit_id = uuid.uuid4().hex
        if self.use_mlflow:
            from ._mlflow.sink import MlflowSink

            self.sink = MlflowSink.attach(
                cache_dir=self.cache_dir, run_id=self.mlflow_run_id, tracking_uri=self.mlflow_tracking_uri,
                experiment_name=self.experiment_name, run_name=self.run_name, model_repo=str(self.model_repo),
                warm=self._warm_sink, log_models=self.log_models, dataset_input=self.log_dataset_input,
                register_model=self.register_model, graph=self.log_lineage_graph, fit_id=fit_id,
            )
            self._warm_sink = None
        self.record = new_record(
            dataset=self.dataset.to_lineage() if self.dataset else None,
            model_repo=str(self.model_repo),
            framework=self.framework,
            code={**{k: v for k, v in code_info().items() if k != "git_root"}, **_how_started(), "cwd": os.getcwd()},
            run=self._run_section(),
        )
        self.record.update({"status": "RUNNING", "started_at": now(), "fit_id": fit_id,
                            "oxen_callbacks_version": __version__})
        self.publisher = CheckpointPublisher(
            model_repo=repo, run=self.run_name, cache_dir=self.cache_dir, author=self.author,
            remote=self.remote, remote_url=self.remote_url, branch=self.branch, push_timeout=self.push_timeout,
            on_result=self._on_result, warm=self._warm_worker, first_folder=self._first_folder(),
        )
        self._warm_worker = None
        if self.sink is not None:
            self.sink.tag_start(self.run_name, self.record)

    def earlier_fits_record(self) -> LineageJSON | None:
        """The record of the run this fit continues, as committed so far (the model repository's working
        tree); ``None`` for a new run, or when it cannot be read."""
        path = self.model_repo / lineage_path(self.run_name)
        return read_or_skip(path) if self.continuing and path.is_file() else None

    def _first_folder(self) -> str | None:
        """The trainer's folder whose checkpoints the continued run's earlier fits committed in the run's own
        folder: a second ``ModelCheckpoint``'s files keep their subfolder in every fit."""
        earlier = self.earlier_fits_record()
        return first_folder_of(earlier["checkpoints"], checkpoints_folder(self.run_name),
                               self.checkpoint_folders) if earlier else None

    def _end_unstarted_sink(self) -> None:
        """A start that failed after the MLflow run was opened: end it ``FAILED`` (no step ran, nothing
        was committed), not left for its sink process to finish as abandoned from the run's lineage."""
        sink, self.sink = self.sink, None
        if sink is None:
            return
        try:
            sink.end("FAILED")
            sink.close()
        except Exception:  # the start's own error is the one to raise
            log.exception("Ending the MLflow run of a fit that could not start failed too")

    def _check_continued_dataset(self) -> None:
        """A run continued under its name goes on with the dataset commit its checkpoints were trained on:
        its lineage names one dataset for all of them (``allow_dataset_change`` starts a new run instead).
        Before the run's first commit (its fit killed while its commits were behind), the record its
        queued checkpoints will be committed with tells."""
        path = self.model_repo / lineage_path(self.run_name)
        try:
            record = parse_json(path.read_text())
        except FileNotFoundError:
            record = next((job.payload.get("record") for _queue, jobs in run_backlog(self.model_repo, self.run_name)
                           for job in jobs if job.kind == "checkpoint"), None)
            if record is None:
                return
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"Run {self.run_name!r} cannot be continued: its lineage record {path} cannot be read ({exc}), so "
                "the dataset commit its checkpoints were trained on is unknown.",
                "restore the file from the model repository's last commit, or resume without run_name (a new run "
                "that records resumed_from).",
            ) from None
        recorded = record.get("dataset") if isinstance(record, dict) else None
        mine = self.dataset.commit if self.dataset is not None else None
        theirs = recorded.get("commit") if isinstance(recorded, dict) else None
        if theirs != mine:
            raise ConfigurationError(
                f"Run {self.run_name!r} was trained on dataset commit {theirs}; continuing it on {mine} would name "
                "one dataset for checkpoints trained on two.",
                "resume without run_name (a new run that records resumed_from), or pin the run's dataset commit.",
            )

    def _run_section(self) -> dict[str, Any]:
        run: dict[str, Any] = {"name": self.run_name}
        if self.sink is not None:
            run.update(mlflow_run_id=self.sink.run_id, mlflow_tracking_uri=redact_url(self.sink.tracking_uri))
        return run

    def _on_result(self, result: dict[str, Any]) -> None:
        if result.get("changed_after_save"):
            log.warning("Checkpoint %s was written over in place after it was saved and before it was committed: "
                        "its commit %s holds the new bytes (its lineage entry lists changed_after_save). Write a "
                        "changed checkpoint to a new path.", result.get("source"), result.get("commit"))
        if self.sink is not None and result.get("ok") and result.get("kind") == "checkpoint":
            if not self.finished:  # (once training is over, the final tags due next name the model at once)
                self.sink.tag_model(result["commit"], result["dest"])
            self.sink.log_checkpoint_model(result, self.record, dataset_input=self.log_dataset_input)

    def checkpoint_saved(self, path: str | os.PathLike[str], *, step: int | None = None,
                         epoch: int | None = None, metrics: dict[str, float] | None = None,
                         copy: bool = False, same_model_as: str | os.PathLike[str] | None = None,
                         rewrites_earlier: bool = False) -> int:
        """Queue the finished checkpoint at ``path`` (file or folder) for commit; returns at once.
        ``copy``: the trainer may rewrite ``path`` in place without calling :meth:`before_overwrite`;
        ``same_model_as``: a checkpoint published before at the same step with the same weights
        (Lightning's ``last.ckpt`` after its top-k file): MLflow gets one logged model for both;
        ``rewrites_earlier``: this save was written where an earlier one was, possibly before that one was
        frozen (Ray persists a report before its controller sees it): the earlier entries of ``path`` are
        marked ``may_hold_later_report``."""
        if self.publisher is None or self.record is None:
            raise PublishError("LineageRun.checkpoint_saved() called before start()")
        if self.finished:  # e.g. another callback saving after ours ended the run: not in its lineage
            log.warning("Checkpoint %s was saved after run %s ended; it is not committed.", path, self.run_name)
            return -1
        seq = self.publisher.submit_checkpoint(path, record=self._base_record(), step=step, epoch=epoch,
                                               metrics=metrics, copy=copy, same_model_as=same_model_as,
                                               rewrites_earlier=rewrites_earlier)
        self._published.append(os.fspath(path))
        return seq

    def checkpoint_removed(self, path: str | os.PathLike[str]) -> None:
        """Note that ``path`` (a checkpoint queued before) left the run folder; it stays in history.
        After the run ended nothing more is committed for it (its final record lists the file)."""
        if self.publisher is not None and not self.finished:
            self.publisher.submit_removal(path)

    def note_deleted_checkpoints(self) -> None:
        """Record as removed every published checkpoint no longer on disk (for trainers that delete
        checkpoints without telling, e.g. ``save_total_limit``); they stay in history."""
        for path in [p for p in self._published if not os.path.exists(p)]:
            self._published.remove(path)
            self.checkpoint_removed(path)

    def before_overwrite(self, path: str | os.PathLike[str], *, maybe: bool = False) -> SetAside | None:
        """Call before a checkpoint is written at ``path``, which may hold one published earlier.

        A published checkpoint is frozen by hard link: the new write must get fresh inodes instead
        of rewriting the frozen copy in place. A file this run published is moved aside and
        returned (``drop()`` it after the write, ``put_back()`` when the write failed); in a
        folder, every file with another link (an earlier run's freeze too) is unlinked, or with
        ``maybe`` (the trainer may not write after all) replaced by a copy of itself.
        """
        path = os.fspath(path)
        return unfreeze_for_rewrite(path, published=self.publisher is not None and self.publisher.has_source(path),
                                    keep=maybe)

    def _base_record(self) -> LineageJSON:
        assert self.record is not None
        return {**self.record, "run": {**self.record["run"], **self._run_section()}}

    # -- resume and results ---------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """What a checkpoint carries for a later resume: the dataset pin, the run and its repository."""
        return {"dataset": self.dataset.to_lineage() if self.dataset else None, "run_name": self.run_name,
                "model_repo": str(self.model_repo)}

    def continues(self, state: dict[str, Any] | None) -> bool:
        """Whether the :meth:`resume_state` of a checkpoint being resumed is this run's."""
        return bool(state) and state.get("run_name") == self.run_name and state.get("model_repo") == str(self.model_repo)

    def note_resumed(self, state: dict[str, Any] | None, *, step: int | None, name: str | None = None,
                     file: str | None = None, committed: dict[str, Any] | None = None) -> None:
        """Record what this fit's weights start from: the checkpoint's run, model repository and
        dataset (``state``: its :meth:`resume_state`, ``None`` for one saved without this library), its
        step, the ``file`` it was read from, and its commit and path in that repository (``committed``,
        else found there by step and ``name``, its file or folder name)."""
        if self.record is None or self.finished:  # (a validate() after fit() loads a checkpoint too)
            return
        state = state or {}
        if committed is None and name is not None:
            size = os.path.getsize(file) if file and os.path.isfile(file) else None
            committed = committed_checkpoint(state.get("model_repo"), state.get("run_name"), step=step, name=name,
                                             size=size, local=file if file and "://" not in file else None)
        self.record["resumed_from"] = {
            "run_name": state.get("run_name"), "model_repo": state.get("model_repo"),
            "commit": (committed or {}).get("commit"), "path": (committed or {}).get("path"), "step": step,
            "file": redact_url(file) if file and "://" in file else file, "dataset": state.get("dataset")}

    def lineage(self, fit_key: str | None = None) -> LineageJSON | None:
        """The run's lineage record: this object's once finished, else the committed one; ``None``
        for a run that never started (never fitted, or refused: another run's record under the
        same name is not this one's).

        With ``fit_key`` (see :meth:`start`), the run noted under it is read: in a process that
        holds only a copy of the run object that trained elsewhere (``ddp_spawn``).
        """
        if self.record is not None and self.finished:
            self.wait_until_logged()
            return LineageView.of(self.record)
        run = recorded_fit(self.model_repo, fit_key) if fit_key else None
        if run is None and self.record is not None:
            run = self.run_name  # started here, still training: what is committed so far
        committed = self.model_repo / lineage_path(run) if run else None
        if committed is not None and committed.exists():
            return LineageView.of(read_lineage(committed))
        return LineageView.of(self.record)


def _how_started() -> dict[str, str | None]:
    """How this process was started, secrets masked (``oxen-callbacks reproduce`` prints it): its
    command line, or in a Jupyter kernel (whose command line reruns nothing) the notebook's path
    when the Jupyter server tells it (``JPY_SESSION_NAME``)."""
    if sys.argv and Path(sys.argv[0]).name in ("ipykernel_launcher.py", "ipykernel_launcher"):
        return {"command": None, "notebook": os.environ.get(ENV_JUPYTER_NOTEBOOK) or "(a Jupyter notebook)"}
    return {"command": shlex.join(redact_argv([Path(sys.executable).name, *sys.argv]))}


def _likely_rank_zero() -> bool:
    """Whether this process is, by the launcher's environment, the one that logs (global rank 0)."""
    return all(os.environ.get(name, "0") == "0" for name in ENV_RANKS)

