"""SLURM pre-emption: the checkpoint saved on the warning signal reaches Oxen, and the requeued
job goes on with the same run.

The adapters (framework-free here) use three pieces::

    requeued = RequeuedRun.find(model_repo, run_options)     # in the callback's constructor
    dataset = requeued.pin(dataset, revision, paths, ...)    #   the commit the pre-empted run read
    run = LineageRun(**requeued.options(run_options), ...)   #   its run name and MLflow run
    ...
    preemption = Preemption(run, timeout=30)
    watch = SignalWatch(signal.SIGUSR1, preemption.notice)   # chained before the trainer's handler
    ...                                                      # the trainer saves a checkpoint: frozen
    preemption.end(best)                                     #   and journaled as any; then PREEMPTED

On the signal the run notes in its claim (:func:`~._publish.claim.note_preempted`) that its job
was pre-empted, with its MLflow run and dataset pin. The checkpoint the trainer then saves is
frozen and journaled like every other (milliseconds). When training stops, :meth:`Preemption.end`
journals the final lineage as ``PREEMPTED`` and waits at most ``timeout`` seconds for the commits
(and the push); what is left stays journaled for ``oxen-callbacks sync``. The requeued job (same
``SLURM_JOB_ID``, a new process) finds that note: it claims the same run name, logs into the same
MLflow run (and ends it), and reads the same dataset commit. A job may train several runs (a sweep):
the note names the command line it ran under (:func:`training_key`), and only a training under the
same one goes on with it: by run name when the runs are named, else the first the process makes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from ._publish.claim import note_preempted, preempted_run, slurm_job
from ._util import background
from .lineage import PREEMPTED, repo_record
from .pin import PinnedDataset, as_pinned

log = logging.getLogger(__name__)

DEFAULT_PREEMPT_TIMEOUT = 20.0  # s; below SLURM's default KillWait (30 s) between SIGTERM and SIGKILL: keep it below yours


class Run(Protocol):
    """What pre-emption uses of :class:`~oxen_callbacks.run.LineageRun`."""

    model_repo: Any
    run_name: str
    dataset: PinnedDataset | None
    publisher: Any
    sink: Any
    finished: bool
    register_model: str | None
    mlflow_timeout: float
    end_by: float | None

    def finish_soon(self, status: str = ..., *, best: Any = ...) -> None: ...
    def wait_until_logged(self, timeout: float | None = None) -> None: ...


def check_timeout(timeout: float) -> float:
    from .errors import ConfigurationError

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
        raise ConfigurationError(f"preempt_timeout={timeout!r} is not a number of seconds above 0.",
                                 f"pass e.g. preempt_timeout={DEFAULT_PREEMPT_TIMEOUT:.0f} (below SLURM's KillWait).")
    return float(timeout)


_callbacks_made = itertools.count(1)  # the callbacks this process made that could go on with a run
_RANK_FLAG = re.compile(r"--local[_-]rank(=\d+)?")  # what torch.distributed.launch, DeepSpeed add per rank


def training_key() -> str:
    """The command line a training runs under, as a digest (never the arguments themselves), without
    the per-rank flags launchers add: a job that runs one command per configuration of a sweep has
    one key per configuration; its requeued start runs the same commands."""
    words, argv = [], sys.argv
    for i, word in enumerate(argv):
        if _RANK_FLAG.fullmatch(word) or (i and argv[i - 1] in ("--local_rank", "--local-rank") and word.isdigit()):
            continue
        words.append(word)
    return hashlib.sha1("\0".join(words).encode("utf-8", "surrogateescape")).hexdigest()[:16]


class Preemption:
    """One fit's pre-emption: :meth:`notice` on the signal, :meth:`end` when training stops."""

    def __init__(self, run: Run, *, timeout: float = DEFAULT_PREEMPT_TIMEOUT) -> None:
        self.run, self.timeout = run, check_timeout(timeout)
        self.noticed = False

    def notice(self) -> None:
        """The pre-emption signal arrived (in the signal handler, before the trainer saves): note it in
        the run's claim, for the requeued job. Milliseconds; a failure is only logged."""
        self.noticed = True
        run = self.run
        if run.publisher is None or run.finished:  # not the process that logs (rank > 0), or already over
            return
        facts = {"mlflow_run_id": run.sink.run_id if run.sink is not None else None,
                 "dataset": run.dataset.to_lineage() if run.dataset is not None else None,
                 "noticed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "training": training_key()}
        try:
            note_preempted(run.model_repo, run.run_name, facts)
        except OSError:
            log.warning("Could not note the pre-emption of run %s in its claim: the requeued job starts "
                        "a new run.", run.run_name, exc_info=True)
        log.info("Pre-emption of run %s noticed (SLURM job %s).", run.run_name, slurm_job())

    def end(self, best: str | os.PathLike[str] | None = None) -> None:
        """End the run as ``PREEMPTED``: journal its final lineage, then wait at most ``timeout`` s for
        the commits (push included) and MLflow; what is left stays journaled for ``oxen-callbacks sync``."""
        run = self.run
        if run.publisher is None or run.finished:
            return
        started = time.monotonic()
        run.register_model = None  # the requeued job's model is the final one, not this
        run.mlflow_timeout = min(run.mlflow_timeout, self.timeout)
        run.end_by = started + self.timeout  # every wait of the end, in turn, ends by then
        try:
            run.finish_soon(PREEMPTED, best=best)
        except Exception:  # a publishing error: what was published is journaled; never hide the pre-emption
            log.exception("Ending pre-empted run %s", run.run_name)
        background.wait_for(run.model_repo, timeout=self._left(started))
        committed = time.monotonic() - started
        run.wait_until_logged(self._left(started))
        log.info("Pre-empted run %s: lineage committed after %.2f s, ended after %.2f s.", run.run_name,
                 committed, time.monotonic() - started)

    def _left(self, started: float) -> float:
        return max(0.0, self.timeout - (time.monotonic() - started))


@dataclass
class RequeuedRun:
    """The run a pre-empted SLURM job trained, found again by its requeued start."""

    job: str
    run_name: str
    mlflow_run_id: str | None
    dataset: dict[str, Any] | None

    @classmethod
    def find(cls, model_repo: str | os.PathLike[str], run_options: dict[str, Any]) -> RequeuedRun | None:
        """This SLURM job's run in ``model_repo`` pre-empted under the same command line
        (:func:`training_key`), unless ``run_options`` name another run. Without a run name, only the first
        callback this process makes goes on with it: a sweep that skips the configurations it finished
        makes the pre-empted one first (one that starts again from the top must name its runs)."""
        first = next(_callbacks_made) == 1
        job = slurm_job()
        if job is None:
            return None
        try:
            found = preempted_run(model_repo, job, training_key())
        except OSError:
            found = None
        if found is None:
            return None
        run, facts = found
        committed = repo_record(model_repo, run) or {}  # the PREEMPTED lineage: names the MLflow run once created
        if committed.get("status") not in (None, "RUNNING", PREEMPTED):  # it ended since: nothing to go on with
            log.info("SLURM job %s: run %s ended %s after its pre-emption note; a new run starts.", job, run,
                     committed.get("status"))
            return None
        if run_options.get("run_name") not in (None, run):
            log.info("SLURM job %s was pre-empted in run %s; run_name=%r starts another run.",
                     job, run, run_options["run_name"])
            return None
        if run_options.get("run_name") is None and not first:
            log.info("SLURM job %s was pre-empted in run %s, which the first training of this process goes on "
                     "with; this one starts another run (name the runs of a sweep: run_name=...).", job, run)
            return None
        log.info("Requeued SLURM job %s: run %s goes on.", job, run)
        dataset = facts.get("dataset") or committed.get("dataset")
        mlflow_run = facts.get("mlflow_run_id") or (committed.get("run") or {}).get("mlflow_run_id")
        return cls(job, run, mlflow_run, dataset if isinstance(dataset, dict) else None)

    def options(self, run_options: dict[str, Any]) -> dict[str, Any]:
        """``run_options`` continuing this run: its name and (unless one is given) its MLflow run."""
        mlflow_run = run_options.get("mlflow_run_id") or self.mlflow_run_id
        return {**run_options, "run_name": self.run_name, **({"mlflow_run_id": mlflow_run} if mlflow_run else {})}

    def pin(self, dataset: PinnedDataset | str | os.PathLike[str] | None, revision: str | None,
            paths: list[str] | None, cache_dir: Any, *, allow_dataset_change: bool) -> PinnedDataset | None:
        """The callback's ``dataset`` arguments, pinned to the commit the pre-empted run read: a repository
        path (or none) is pinned there; a :class:`PinnedDataset` of another commit is refused."""
        recorded = self.dataset
        if recorded is None or allow_dataset_change:
            return as_pinned(dataset, revision, paths, cache_dir)
        if isinstance(dataset, PinnedDataset):
            as_pinned(dataset, revision, paths, cache_dir)  # its own argument checks
            dataset.check_same(recorded, what=f"Run {self.run_name!r}, pre-empted in SLURM job {self.job},")
            return dataset
        pin = PinnedDataset(dataset if dataset is not None else recorded["repo"], revision=recorded["commit"],
                            paths=paths if paths is not None else recorded["paths"], cache_dir=cache_dir)
        pin.revision_label = recorded.get("revision") or pin.revision_label  # what the job asked for: "main"...
        return pin

    def after_start(self, run: Run) -> None:
        """The MLflow run the pre-empted job left KILLED is this job's to end now."""
        if run.sink is not None and run.sink.run_id == self.mlflow_run_id:
            run.sink.owns_run = True


Handler = Callable[[int, FrameType | None], Any]


class SignalWatch:
    """Calls ``on_signal()`` when ``signum`` arrives, then the handler that was installed before
    (the trainer's, e.g. Lightning's SLURM requeue), from :meth:`install` to :meth:`uninstall`."""

    def __init__(self, signum: int, on_signal: Callable[[], None]) -> None:
        self.signum, self.on_signal = signal.Signals(signum), on_signal
        self._previous: Any = None
        self._installed = False

    def install(self, *, only_over_a_handler: bool = False) -> bool:
        """Install (main thread only); ``only_over_a_handler``: only when something already answers the signal."""
        if self._installed:  # a train() that raised left it installed: never chain it to itself
            return True
        if threading.current_thread() is not threading.main_thread():
            log.warning("%s can only be watched from the main thread: pre-emption is not noticed.", self.signum.name)
            return False
        previous = signal.getsignal(self.signum)
        if only_over_a_handler and not callable(previous):
            return False
        self._previous, self._installed = previous, True
        signal.signal(self.signum, self._handle)
        return True

    def uninstall(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(self.signum) == self._handle:
                signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        try:
            self.on_signal()
        except Exception:
            log.exception("Noticing pre-emption failed")
        if callable(self._previous):
            self._previous(signum, frame)
