"""How a :class:`~oxen_callbacks.run.LineageRun` ends: the final lineage commit and MLflow logging.

``finish`` does it all and returns the record; ``finish_soon`` (what the adapters call at fit
end) makes the end durable and leaves the waiting to a thread, so ``fit()`` returns at once::

    run.finish_soon("FINISHED", best=path)   # final lineage job journaled when it can be
    run.lineage()                            # waits for the final commit, then MLflow (bounded)
    run.wait()                               # the same, and raises a publishing error
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Any

from ._publish.publisher import CheckpointPublisher
from ._util import background
from .errors import PublishError
from .lineage import BEST_KEY, FINAL_COMMIT_KEY, PREEMPTED, LineageJSON

log = logging.getLogger(__name__)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunEnding:
    """The end of a LineageRun (a mixin: :class:`~oxen_callbacks.run.LineageRun` holds the state)."""

    publisher: CheckpointPublisher | None
    sink: Any
    record: LineageJSON | None
    finished: bool
    model_repo: Any
    run_name: str
    remote: str | None
    remote_url: str | None
    drain_timeout: float | None
    mlflow_timeout: float
    register_model: str | None
    log_dataset_input: bool
    log_lineage_graph: bool
    _claim: Any

    def _init_ending(self) -> None:
        self._finisher: threading.Thread | None = None  # finish_soon's work
        self._committed = threading.Event()  # the final lineage commit is done (or could not be)
        self._final_seq: int | None = None  # the final lineage job, once journaled
        self._finish_error: Exception | None = None
        self.end_by: float | None = None  # a time (monotonic) every wait of the end ends by: a pre-emption's exit

    def _base_record(self) -> LineageJSON:  # (LineageRun's)
        raise NotImplementedError

    # -- ending -----------------------------------------------------------------------
    def finish(self, status: str = "FINISHED", *, best: str | os.PathLike[str] | None = None) -> LineageJSON | None:
        """Wait for every commit, commit the final lineage, log it to MLflow; returns the record.

        Safe to call twice (the second call returns the first result, once :meth:`finish_soon`'s
        work is done). Publishing errors are raised after the lineage of what was published is logged.
        """
        if self.finished:
            return self.wait()
        self.finished = True
        try:
            return self._finish(status, best, deadline=self._mlflow_deadline())
        finally:
            self._committed.set()

    def finish_soon(self, status: str = "FINISHED", *, best: str | os.PathLike[str] | None = None,
                    raise_errors: bool = True) -> None:
        """:meth:`finish` without holding the caller: what ``fit()`` returns after.

        Every checkpoint is already committed or frozen and journaled (the commit worker goes on
        alone), and so is the final lineage job, here. A run the sink is still creating gets its
        MLflow id into the committed record by a second, amending commit; the final commits and
        the MLflow logging finish in a thread while the process lives, and at interpreter exit the process waits for them
        (bounded, saying so; a killed process leaves them to ``oxen-callbacks sync``). Publishing
        errors known by now are raised here, as :meth:`finish` does (unless ``raise_errors`` is false:
        then they are said as a warning, and :meth:`wait` raises them).
        """
        if self.finished:
            return
        if (self.publisher is None or (raise_errors and self.publisher.failed)
                or multiprocessing.parent_process() is not None):
            self.finish(status, best=best)  # (a process the launcher spawned exits right after: finish here)
            return
        self.finished = True
        self.record_status(status)
        deadline = self._mlflow_deadline()
        self._final_seq = self._submit_final(best)  # durable now: a kill from here on ends the run as it is
        self._finisher = threading.Thread(target=self._finish_quietly, args=(status, best, deadline), daemon=True,
                                          name="oxen-lineage-finish")
        background.track(self.model_repo, self._finisher, committed=self._committed, describe=self._describe_end,
                         run=self.run_name)
        self._finisher.start()

    def finish_after_error(self, status: str, *, best: str | os.PathLike[str] | None = None,
                           what: str = "fit", wait: bool = True) -> None:
        """End a started run that training left with an error as ``status``; a failure here is only logged.
        Without ``wait``, as :meth:`finish_soon`: the error (a Ctrl-C) reaches the user at once, the end
        goes on beside it (waited for at exit, bounded and said)."""
        if self.publisher is None or self.finished:
            return
        try:
            if wait:
                self.finish(status, best=best)
            else:
                self.finish_soon(status, best=best, raise_errors=False)
        except Exception:
            log.exception("Recording the lineage of the %s failed too", what)

    def record_status(self, status: str) -> None:
        """The run's end, in the record at once (what :meth:`lineage` says while the rest finishes)."""
        if self.record is not None and self.record.get("status") == "RUNNING":
            self.record.update(status=status, ended_at=now())

    def wait(self, timeout: float | None = None) -> LineageJSON | None:
        """:meth:`wait_until_logged`, then raise a publishing error that came after ``fit()`` returned."""
        self.wait_until_logged(timeout)
        if self._finish_error is not None:
            raise self._finish_error
        return self.record

    def wait_until_logged(self, timeout: float | None = None) -> None:
        """Wait for :meth:`finish_soon`'s work: the final lineage commit, then MLflow's (each bounded:
        ``drain_timeout``, then ``mlflow_timeout`` for MLflow in all; what is left stays journaled)."""
        finisher = self._finisher
        if finisher is not None and finisher is not threading.current_thread():
            finisher.join(timeout)

    # -- the work -------------------------------------------------------------------------
    def _mlflow_deadline(self) -> float:
        """When the end's MLflow work stops waiting (what is left stays journaled)."""
        deadline = time.monotonic() + self.mlflow_timeout
        return deadline if self.end_by is None else min(deadline, self.end_by)

    def _drain_wait(self) -> float | None:
        """How long one wait for the commits may take: ``drain_timeout``, and no later than :attr:`end_by`."""
        if self.end_by is None:
            return self.drain_timeout
        left = max(0.0, self.end_by - time.monotonic())
        return left if self.drain_timeout is None else min(self.drain_timeout, left)

    def _finish_quietly(self, status: str, best: str | os.PathLike[str] | None, deadline: float) -> None:
        try:
            self._finish(status, best, deadline=deadline)
        except Exception as exc:  # training is over and returned: say it, keep it for wait()
            self._finish_error = exc
            log.warning("%s", exc)
        finally:
            self._committed.set()

    def _describe_end(self) -> str:
        pending = self.publisher.pending if self.publisher is not None else 0
        return (f"the lineage of run {self.run_name} ({pending} commit(s) pending"
                + (f", then MLflow for up to {self.mlflow_timeout:.0f} s)" if self.sink is not None else ")"))

    def _submit_final(self, best: str | os.PathLike[str] | None) -> int:
        assert self.publisher is not None
        seq = self.publisher.submit_finalize(self._base_record(), best=best, best_earlier=self._best_of_earlier_runs(best))
        if self.sink is not None:
            self.sink.training_over()
        return seq

    def _best_of_earlier_runs(self, best: str | os.PathLike[str] | None) -> dict[str, Any] | None:
        """The commit and path of ``best`` when a run this one was resumed from saved it (not this fit):
        a Trainer's ``load_best_model_at_end`` after a resume ends holding those weights."""
        resumed = (self.record or {}).get("resumed_from") or {}
        if not best or self.publisher is None or self.publisher.has_source(best) or not resumed.get("run_name"):
            return None
        from .checkpoints import committed_source

        return committed_source(self.model_repo, resumed["run_name"], os.path.abspath(best))

    def _finish(self, status: str, best: str | os.PathLike[str] | None, *, deadline: float) -> LineageJSON | None:
        if self.publisher is None or self.record is None:
            return None
        self.record_status(status)
        if self._final_seq is None:  # finish(): the MLflow run id first, then one final commit
            self._wait_for_mlflow_run(deadline)
            self._final_seq = self._submit_final(best)
        final, error, closing = self._commit_final(best, deadline)
        committed = final is not None
        try:
            self._wait_for_mlflow_run(deadline)  # (the record this process holds names the run in any case)
            self.record = final if committed else self._published_so_far(best)
            self._warn_unpushed()
            if self.sink is not None:
                best_path = _best_path(self.record, best) if committed else None
                if best_path is None and best and self.publisher.has_source(best):
                    best_path = self.publisher.dest_for(best)
                self._log_final_or_leave_to_sync(self.record, status, committed=committed, best_path=best_path,
                                                 timeout=max(0.0 if self.end_by is not None else 0.5,
                                                             deadline - time.monotonic()))
        finally:
            closed_with = closing.wait() if closing is not None else None
        if error is not None:
            raise error
        if closed_with is not None:
            raise closed_with
        return self.record

    def _wait_for_mlflow_run(self, deadline: float) -> None:
        if self.sink is not None and self.sink.run_id is None:  # a run the sink creates
            self.sink.wait_for_run(max(0.0, deadline - time.monotonic()))

    def _commit_final(self, best: str | os.PathLike[str] | None,
                      deadline: float) -> tuple[LineageJSON | None, Exception | None, _Beside | None]:
        """Drain the publisher until the final lineage is committed, then, when the MLflow run was
        created meanwhile, commit its id into it too; ``(None, error, None)`` when the final commit failed.

        The publisher is closed (the worker frees the repository, the run's name is released) before
        this returns, or, once the record is committed and no push or pre-emption deadline waits on
        the close, beside the MLflow logging that follows: the third value, to wait for.
        """
        assert self.publisher is not None and self._final_seq is not None
        closing: _Beside | None = None
        try:
            final = self.publisher.final_record(self._final_seq, timeout=self._drain_wait())
            if final is not None:
                self._committed.set()  # readers of the repository need not wait for MLflow
            if final is not None and self.sink is not None and not final["run"].get("mlflow_run_id"):
                self._wait_for_mlflow_run(deadline)
                if self.sink.run_id is not None:
                    amended = self.publisher.final_record(self._submit_final(best), timeout=self._drain_wait())
                    final = amended or final
            if final is not None and self.sink is not None and self.remote is None and self.remote_url is None \
                    and self.end_by is None:  # (a push's outcome goes into the record MLflow gets: waited for)
                closing = _Beside(self._close_publishing, name="oxen-publisher-close")
            return final, None, closing
        except PublishError as exc:
            return None, exc, None
        finally:
            if closing is None:
                self._close_publishing()

    def _close_publishing(self) -> None:
        """Close the publisher and release the run's name: nothing more comes to the repository for this run."""
        assert self.publisher is not None
        try:
            self.publisher.close(timeout=self._drain_wait(), by=self.end_by)
        finally:
            if self._claim is not None:
                self._claim.release(preempted=(self.record or {}).get("status") == PREEMPTED)
            self._committed.set()  # committed or not

    def _published_so_far(self, best: str | os.PathLike[str] | None) -> LineageJSON:
        """The record this process holds when the final lineage commit did not complete: the checkpoints
        committed so far, the model the trainer's ``best`` (its commit ``None`` while not committed)
        or else the last of them, and :data:`FINAL_COMMIT_KEY` saying the record is not committed."""
        assert self.publisher is not None
        final = self._base_record()
        final["checkpoints"] = [
            {"commit": r["commit"], "path": r["dest"], "step": r.get("step"), "epoch": r.get("epoch"),
             "metrics": r.get("metrics") or {}}
            for r in self.publisher.results if r.get("kind") == "checkpoint"
        ]
        best_dest = self.publisher.dest_for(best) if best and self.publisher.has_source(best) else None
        if best_dest is not None:
            commit = next((c["commit"] for c in reversed(final["checkpoints"]) if c["path"] == best_dest), None)
            final["model"] = {**final["model"], "commit": commit, "path": best_dest, BEST_KEY: True}
        elif final["checkpoints"]:
            last = final["checkpoints"][-1]
            final["model"] = {**final["model"], "commit": last["commit"], "path": last["path"]}
        final[FINAL_COMMIT_KEY] = "pending"
        log.warning("The final lineage commit of run %s did not complete: `callback.lineage` lists the checkpoints "
                    "committed so far; `oxen-callbacks sync` commits the rest and the final record.", self.run_name)
        return final

    def _log_final_or_leave_to_sync(self, final: LineageJSON, status: str, *, committed: bool,
                                    timeout: float, best_path: str | None = None) -> None:
        try:
            self.sink.log_final(final, status, committed=committed, register_model=self.register_model,
                                dataset_input=self.log_dataset_input, graph=self.log_lineage_graph, timeout=timeout,
                                best_path=best_path)
        except Exception:  # the work is done and committed: MLflow bookkeeping never fails training
            log.warning("Logging the lineage to MLflow failed; what is journaled in %s stays there for "
                        "`oxen-callbacks sync`.", self.sink.journal.folder, exc_info=True)
            self.sink.journal.release_trainer()  # sync's from now on, though this process lives on

    def _warn_unpushed(self) -> None:
        if self.remote is None and self.remote_url is None:
            return
        from ._publish.push import pending_push, pending_push_path
        from ._util.fs import DamagedFile

        try:
            marker = pending_push(self.model_repo)
        except DamagedFile as exc:  # (a full disk, a kill mid-write): the end of training goes on
            log.warning("Cannot tell whether the checkpoints reached the Oxen remote: %s is damaged (%s). "
                        "`oxen-callbacks sync` reports it; once it is removed, the next push takes these commits too.",
                        pending_push_path(self.model_repo), exc)
            return
        if marker is not None and self.publisher is not None:
            self.publisher.answers.warn_unpushed(marker)  # once per run, whether training or the end found it
            if self.record is not None:
                self.record["push"] = {"remote": marker["remote"], "pushed": False, "error": marker.get("error")}


class _Beside:
    """``work()`` in a thread of its own; :meth:`wait` returns what it raised."""

    def __init__(self, work: Any, *, name: str) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name=name)
        self._thread.start()

    def _run(self, work: Any) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            self._error = exc

    def wait(self) -> BaseException | None:
        self._thread.join()
        return self._error


def _best_path(final: LineageJSON, best: str | os.PathLike[str] | None) -> str | None:
    """The final record's model path when it is the trainer's ``best`` (saved in this fit or an earlier one)."""
    model_path = (final.get("model") or {}).get("path")
    source = os.path.abspath(best) if best else None
    return model_path if source and any(c.get("path") == model_path and c.get("source") == source
                                        for c in final.get("checkpoints") or []) else None
