"""What a run's commit worker answered: each job's result, the errors to raise, a stall, damage.

The publisher's reader thread (and ``flush()``, for answers only the queue's journal holds)
deliver the worker's answers here; the training thread asks what is still unanswered and which
errors to raise. Thread-safe: :attr:`Answers.cond` is notified at every answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PublishError

log = logging.getLogger(__name__)


class Answers:
    """The answers of one run's jobs; ``on_result`` is called (from the delivering thread) with
    each result before its job counts as answered; ``describe_damage`` words a queue's damage notice."""

    def __init__(self, repo: Path, queue_folder: Path, on_result: Callable[[dict[str, Any]], None] | None,
                 describe_damage: Callable[[dict[str, Any]], str]) -> None:
        self.repo, self.queue_folder, self.on_result = repo, queue_folder, on_result
        self._describe_damage = describe_damage
        self.cond = threading.Condition()
        self.results: list[dict[str, Any]] = []
        #: Why publishing stopped for this run (a worker or commit processes that keep dying): the
        #: jobs stay journaled for ``oxen-callbacks sync``; training goes on.
        self.stalled: str | None = None
        self.push_warned = False
        self._submitted: set[int] = set()
        self._answered: set[int] = set()
        self._errors: list[str] = []
        self._damaged_files: set[Any] = set()
        self._delivering = threading.Lock()

    def submitted(self, seq: int) -> None:
        with self.cond:
            self._submitted.add(seq)

    @property
    def unanswered(self) -> set[int]:
        """The jobs submitted that have no answer yet."""
        with self.cond:
            return self._submitted - self._answered

    def deliver(self, result: dict[str, Any]) -> None:
        """One answer of the worker (a job's result, a push report, a stall or damage notice)."""
        if result.get("kind") == "damaged":  # (said even when its job was answered before)
            self._damaged(result)
            return
        with self._delivering:  # one at a time: the reader thread and flush() may both deliver a result
            with self.cond:
                if result.get("seq") in self._answered:
                    return  # re-sent by a restarted worker
            if result.get("kind") == "stalled":
                self.stall(f"its commit processes keep dying ({result.get('error')})")
                return
            if self.on_result:  # before the job counts as answered, so flush() covers it
                try:
                    self.on_result(result)
                except Exception:  # a sink failure must not kill the reader
                    log.exception("on_result callback failed")
            with self.cond:
                if result.get("ok") or result.get("kind") == "push":
                    self.results.append(result)
                else:
                    self._errors.append(result.get("error", "unknown error"))
                if "seq" in result:
                    self._answered.add(result["seq"])
                self.cond.notify_all()
            if result.get("kind") == "push" and not result.get("ok"):
                self.warn_unpushed(result)

    def _damaged(self, notice: dict[str, Any]) -> None:
        """A file of the queue cut short or edited: said once; the job it names counts as answered (its
        worker skipped it, or did it already); training goes on, and ``sync`` reports the file."""
        with self.cond:
            first = notice.get("file") not in self._damaged_files
            self._damaged_files.add(notice.get("file"))
            if isinstance(notice.get("seq"), int):
                self._answered.add(notice["seq"])
                self.cond.notify_all()
        if first:
            log.warning("%s", self._describe_damage(notice))

    def warn_unpushed(self, push: dict[str, Any]) -> None:
        """Say once per run that commits are not on the remote, and how they get there."""
        if self.push_warned:
            return
        self.push_warned = True
        log.warning("Checkpoints are committed in %s but NOT pushed to Oxen remote %r (%s): %s. The push is "
                    "journaled: run `oxen-callbacks sync` once the remote is reachable.", self.repo,
                    push.get("remote"), push.get("url") or "configured remote", push.get("error"))

    def stall(self, why: str) -> None:
        """Stop waiting for the worker: what is queued stays journaled; said once, never raised."""
        with self.cond:
            first = self.stalled is None
            self.stalled = self.stalled or why
            self.cond.notify_all()
        if first:
            log.error("Publishing to the model repository %s stopped: %s. Training goes on; every checkpoint "
                      "saved is kept in %s. Run `oxen-callbacks sync` to commit them.", self.repo, why,
                      self.queue_folder)

    @property
    def failed(self) -> bool:
        """Whether a job failed and :meth:`raise_errors` raises its error."""
        with self.cond:
            return bool(self._errors)

    def raise_errors(self) -> None:
        """Raise the failures answered since the last call, once."""
        with self.cond:
            errors, self._errors = self._errors, []
        if errors:
            raise PublishError(
                f"Committing to the model repository {self.repo} failed: {errors[0]}"
                + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
                + f"\nThe jobs stay journaled in {self.queue_folder}; fix the cause, then run `oxen-callbacks sync`."
            )
