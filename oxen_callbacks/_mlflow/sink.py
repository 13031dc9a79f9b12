"""Log lineage into MLflow: tags as soon as each fact is known, the pointer file at the end.

The training process never imports MLflow for this (unless the user already
did, to find their active run): each operation is written to an on-disk journal
and a separate sink process applies it (see :mod:`.journal`, :mod:`.sink_process`). A slow or
dead tracking server therefore costs training nothing; what is not done stays
journaled for ``oxen-callbacks sync``.

Example::

    sink = MlflowSink.attach(cache_dir=cache)        # the active run, or a new one
    sink.set_tags({TAG_DATASET_COMMIT: pin.commit})          # tag names: oxen_callbacks.names
    sink.log_lineage(record); sink.end("FINISHED"); sink.flush(timeout=30); sink.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .._util.redact import redact_url
from ..names import (
    ENV_MLFLOW_EXPERIMENT_ID,
    ENV_MLFLOW_EXPERIMENT_NAME,
    ENV_MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    ENV_MLFLOW_HTTP_REQUEST_TIMEOUT,
    ENV_MLFLOW_PREFIX,
    ENV_MLFLOW_RUN_ID,
    ENV_MLFLOW_TRACKING_URI,
    LINEAGE_ARTIFACT_NAME,
    POINTER_ARTIFACT_DIR,
    TAG_CODE_GIT_COMMIT,
    TAG_DATASET_COMMIT,
    TAG_DATASET_PATHS,
    TAG_DATASET_REPO,
    TAG_DATASET_REVISION,
    TAG_FIT,
    TAG_LINEAGE_STATUS,
    TAG_MODEL_COMMIT,
    TAG_MODEL_PATH,
    TAG_MODEL_REPO,
    TAG_RUN,
)
from . import fluent
from .dataset_input import META_DATASET_INPUT
from .extras import extras_meta
from .fluent import absolute_store, default_tracking_uri, run_to_join
from .journal import (
    END_LINE,
    META_ENDED_BY_ITS_OWNER,
    META_FIT_STARTED_MS,
    META_JOINED_RUN,
    TRAINING_OVER_LINE,
    MlflowJournal,
    fit_tag,
)
from .logged_models import META_LOG_MODELS, checkpoint_op, mark_op, models_wanted
from .paths_tag import paths_tag
from .sink_thread import SinkThread
from .warm_sink import WarmSinkProcess, close_stdin, release_idle, start_sink

log = logging.getLogger(__name__)


class MlflowSink:
    """One MLflow run's lineage logging; see the module docstring.

    Build with :meth:`attach`. ``run_id`` is ``None`` until the sink process has
    created the run (when this sink owns it).
    """

    def __init__(self, journal: MlflowJournal, *, owns_run: bool, client_uri: str,
                 warm: WarmSinkProcess | None = None, in_process: bool = False) -> None:
        self.journal = journal
        self.owns_run = owns_run
        self.log_models = models_wanted(journal.meta())  # (log_models=False, noted in the journal for `sync`)
        self._lock = threading.Lock()
        self._seq = 0
        self._unjournaled = 0  # operations lost because the journal could not be written (warned once)
        self._whose: dict[str, Any] = {}  # the run, model repository and fit the model tags are of (see tag_start)
        # our own retries pace the sink; MLflow's (minutes by default) would only keep a dead server's
        # operations locked away from `sync` longer. The user's own settings win.
        settings = {ENV_MLFLOW_HTTP_REQUEST_MAX_RETRIES: "2", ENV_MLFLOW_HTTP_REQUEST_TIMEOUT: "30",
                    **{k: v for k, v in os.environ.items() if k.startswith(ENV_MLFLOW_PREFIX)},
                    ENV_MLFLOW_TRACKING_URI: client_uri}
        self._settings = settings
        self._reusable = False  # its process may serve this process's next run (see close)
        self._proc: Any
        if in_process:
            self._proc = SinkThread(journal.folder, client_uri)
        else:
            proc = warm.hand_over(journal.folder, settings) if warm is not None else None
            self._proc = proc or start_sink(["--journal", str(journal.folder)], settings)
            self._reusable = True  # either serves the next run of this process too (sink_process.main)
            journal.write_sink_pid(self._proc.pid)  # busy for `sync` even before it takes the journal's lock

    @classmethod
    def attach(
        cls,
        *,
        cache_dir: Path,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        model_repo: str | None = None,
        warm: WarmSinkProcess | None = None,
        log_models: bool = True,
        dataset_input: bool = True,
        register_model: str | None = None,
        graph: bool = True,
        fit_id: str | None = None,
    ) -> "MlflowSink":
        """Log into ``run_id``, else the active MLflow run or ``$MLFLOW_RUN_ID``'s, else a new run this sink ends.

        ``model_repo``: where run ``run_name``'s checkpoints are committed; a training process
        that dies without ending the run is finished from there by ``oxen-callbacks sync``.
        ``warm``: a :class:`WarmSinkProcess` started earlier, used instead of a new process.
        ``log_models`` / ``dataset_input``: ``False``: no MLflow logged model per checkpoint / no
        dataset input (noted in the journal, so that ``sync`` makes none either); ``register_model``,
        ``graph``: the end's registered version and picture (noted too: ``sync`` of a run that ended
        its lineage but not its MLflow logging makes them). ``fit_id``: the fit this journal logs
        (its lineage record's), noted before anything can be abandoned.
        """
        active = run_to_join() if run_id is None else None
        if active is not None:
            run_id, tracking_uri = active[0], tracking_uri or active[1]
        uri = absolute_store(tracking_uri or default_tracking_uri())
        meta = {"tracking_uri": redact_url(uri), "run_id": run_id, META_FIT_STARTED_MS: int(time.time() * 1000)}
        if run_id is not None:
            meta[META_JOINED_RUN] = True
            if run_id == os.environ.get(ENV_MLFLOW_RUN_ID, "").strip():
                meta[META_ENDED_BY_ITS_OWNER] = True  # an orchestrator's run, handed over in $MLFLOW_RUN_ID
        if model_repo is not None:
            meta.update(model_repo=model_repo, oxen_run=run_name)
        if not log_models:
            meta[META_LOG_MODELS] = False
        if not dataset_input:
            meta[META_DATASET_INPUT] = False
        meta.update(extras_meta(register_model=register_model, graph=graph))
        journal = MlflowJournal.create(cache_dir, meta, trainer=True)
        if fit_id is not None:
            journal.note_fit(fit_id)
        # A run this process already logs to (MLFlowLogger's, HF's MLflowCallback's, the active one):
        # MLflow is loaded and the store open here, so a thread applies our few operations for free; a
        # process of our own would import MLflow and open the store again beside training (~2-5 s CPU).
        in_process = run_id is not None and fluent.mlflow_imported()
        if in_process and warm is not None:
            warm.discard()
        sink = cls(journal, owns_run=run_id is None, client_uri=uri, warm=None if in_process else warm,
                   in_process=in_process)
        if run_id is None:
            experiment_id = os.environ.get(ENV_MLFLOW_EXPERIMENT_ID) if experiment_name is None else None
            sink._enqueue({"op": "create_run", "run_name": run_name, "experiment_id": experiment_id,
                           "experiment_name": experiment_name or os.environ.get(ENV_MLFLOW_EXPERIMENT_NAME),
                           "token": uuid.uuid4().hex})
        return sink

    # -- state ----------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self.journal.meta().get("run_id")

    @property
    def tracking_uri(self) -> str:
        """The tracking URI without credentials."""
        return self.journal.meta()["tracking_uri"]

    @property
    def last_error(self) -> str | None:
        return self.journal.status().get("last_error")

    def why_pending(self) -> str:
        """Why operations are still journaled (for the warning at fit end): the sink process's state
        and the operations it has not done."""
        status, code = self.journal.status(), self._proc.poll()
        if status.get("waiting_for"):
            why = f"the run is finished by `oxen-callbacks sync` once {status['waiting_for']}"
        elif status.get("gave_up"):
            why = f"the sink process gave up after retries: {status.get('last_error')}"
        elif code is not None:
            why = f"the sink process exited with code {code}"
        else:
            why = "the sink process is still working" + (
                f", last error: {status['last_error']}" if status.get("last_error") else "")
        ops = [op.get("op", "?") for _, op in self.journal.pending()]
        return f"{why}; not yet done: {', '.join(ops) or 'nothing'}"

    def wait_for_run(self, timeout: float) -> str | None:
        """The run id, waiting up to ``timeout`` for the sink process to create the run."""
        deadline = time.monotonic() + timeout
        while self.run_id is None and time.monotonic() < deadline and not self._stopped():
            time.sleep(0.01)
        return self.run_id

    # -- operations -------------------------------------------------------------------
    def set_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue({"op": "set_tags", "tags": {k: v for k, v in tags.items() if v is not None}})

    def tag_start(self, run_name: str, record: dict[str, Any]) -> None:
        """What is known at fit start: the run, the model repository, the code and the dataset pin."""
        if record.get("fit_id"):
            self.journal.note_fit(record["fit_id"])  # (what `sync` may amend in the repository: this fit's record)
        # (not its fit: a later fit's ``oxen.fit`` is how this fit's end knows the run is that fit's now)
        self._whose = {TAG_RUN: run_name, TAG_MODEL_REPO: record["model"]["repo"]}
        tags = {**self._whose, TAG_CODE_GIT_COMMIT: record["code"]["git_commit"]}
        if record.get("fit_id") and isinstance(started := self.journal.meta().get(META_FIT_STARTED_MS), int):
            tags[TAG_FIT] = fit_tag(started, record["fit_id"])
        if record["dataset"]:
            d = record["dataset"]
            tags.update({TAG_DATASET_REPO: redact_url(d["repo"]), TAG_DATASET_COMMIT: d["commit"],
                         TAG_DATASET_REVISION: d["revision"], TAG_DATASET_PATHS: paths_tag(d["paths"])})
        self.set_tags(tags)

    def tag_model(self, commit: str | None, path: str | None, *, lineage_status: str | None = None) -> None:
        """The model commit and path: the latest checkpoint's as each is committed, the final one's (with
        the lineage's status) at the end; with the Oxen run and repository they are of (another process's fit
        logging to the same MLflow run meanwhile never leaves one's model under the other's names)."""
        self.set_tags({**self._whose, TAG_MODEL_COMMIT: commit, TAG_MODEL_PATH: path, TAG_LINEAGE_STATUS: lineage_status})

    def log_checkpoint_model(self, result: dict[str, Any], record: dict[str, Any], *, dataset_input: bool) -> None:
        """An MLflow logged model for a committed checkpoint (see :mod:`.logged_models`), unless the run
        makes none (``log_models=False``)."""
        if self.log_models:
            self._enqueue(checkpoint_op(result, record, dataset_input=dataset_input))

    def log_final(self, final: dict[str, Any], status: str, *, committed: bool, register_model: str | None,
                  dataset_input: bool, graph: bool, timeout: float, best_path: str | None = None) -> None:
        """Tag the run with the final model, log the pointer file and extras, end it, wait for MLflow.

        ``committed=False``: the final lineage commit did not complete (its commits stay journaled):
        ``oxen-callbacks sync`` tags, logs and ends the run from what it then commits, not this
        partial record.
        """
        if not committed:
            self.finish_from_commits(status)
        else:
            self.tag_model(final["model"]["commit"], final["model"]["path"], lineage_status=status)
            self.log_lineage(final)
            if self.log_models or final.get("earlier_fits"):  # (else: no model to mark)
                self._enqueue(mark_op(final, best_path=best_path))
        if committed and (dataset_input or register_model or graph):
            self.publish_extras(final, register_model=register_model, dataset_input=dataset_input, graph=graph)
        self.end(status)
        started = time.monotonic()
        if not self.flush(timeout):  # (at once when the sink stopped, or leaves the run to `sync`)
            log.warning("MLflow has not taken the lineage after %.1f s (%s); it is journaled in %s: "
                        "run `oxen-callbacks sync` later.", time.monotonic() - started, self.why_pending(),
                        self.journal.folder)
        self.close()

    def log_lineage(self, record: dict[str, Any]) -> None:
        self._enqueue({"op": "log_json", "artifact_dir": POINTER_ARTIFACT_DIR, "name": LINEAGE_ARTIFACT_NAME,
                       "data": record})

    def publish_extras(self, record: dict[str, Any], *, register_model: str | None, dataset_input: bool,
                       graph: bool) -> None:
        """Dataset input, registered model version and lineage picture (see :mod:`.extras`)."""
        self._enqueue({"op": "publish_extras", "record": record, "register_model": register_model,
                       "dataset_input": dataset_input, "graph": graph})

    def finish_from_commits(self, status: str) -> None:
        """Let the run be tagged, logged and ended ``status`` from the model repository's lineage once
        its commits are done (the final lineage commit did not complete): the sink process leaves
        this to ``oxen-callbacks sync`` at once while commits are still journaled."""
        self._enqueue({"op": "finish_abandoned", "status": status, "terminate": self.owns_run})

    def training_over(self) -> None:
        """Nothing trains any more: operations are applied as they come, not gathered for the GIL's sake."""
        self._send(TRAINING_OVER_LINE.encode())

    def end(self, status: str = "FINISHED") -> None:
        """End the run (when this sink started it): nothing more comes for this journal."""
        if self.owns_run:
            self._enqueue({"op": "end_run", "status": status})
        try:
            self.journal.mark_ended()
        except OSError:
            pass  # no folder to mark: nothing of this run is left for `sync` either
        self._send(END_LINE.encode())

    def close(self) -> None:
        """Let go of the sink process (after :meth:`end`): once it has done everything it waits,
        MLflow imported, for the next training run of this process; else it finishes and exits."""
        if self._reusable and self.journal.is_empty() and not self._stopped():
            release_idle(self._proc, self._settings[ENV_MLFLOW_TRACKING_URI])
        else:
            close_stdin(self._proc)
        self._reusable = False
        self.journal.release_trainer()  # what is left is `sync`'s from now on

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queued operations; ``False`` if some remain (journaled) at the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        thread = self._proc if isinstance(self._proc, SinkThread) else None
        while True:
            seen = thread.steps if thread is not None else 0
            if self.journal.is_empty():
                return True
            if self._stopped() or (deadline is not None and time.monotonic() >= deadline):
                if self.journal.status().get("waiting_for"):  # it exits at once; then `sync` may take over
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(timeout=10)
                return self.journal.is_empty()
            left = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            if thread is not None:
                thread.wait_for_step(seen, left)  # (a thread of ours: no polling against its GIL)
            else:
                time.sleep(min(0.01, left))

    # -- internals -----------------------------------------------------------------------
    def _stopped(self) -> bool:
        status = self.journal.status()
        return self._proc.poll() is not None or bool(status.get("gave_up") or status.get("waiting_for"))

    def _enqueue(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            try:
                if not (self.journal.folder / "meta.json").exists():
                    self._recreate_journal()
                self.journal.put(self._seq, op)
            except OSError as exc:  # a full disk, an unwritable cache: not training's fault
                (log.debug if self._unjournaled else log.warning)(
                    "Could not journal the MLflow %s operation in %s (%s); it is not logged.",
                    op["op"], self.journal.folder, exc)
                self._unjournaled += 1
                return
        self._send(b"\n")

    def _recreate_journal(self) -> None:
        """Its folder was removed under us (a cleaned cache): make it again, with a new sink process
        if ours is gone, so the operations from now on are logged rather than dropped."""
        log.warning("The MLflow journal %s was removed during training; starting it again.", self.journal.folder)
        self.journal.recreate(self.journal.meta(), trainer=True)
        if self._proc.poll() is not None:
            self._proc = start_sink(["--journal", str(self.journal.folder)], self._settings)
            self._reusable = False
        self.journal.write_sink_pid(self._proc.pid)

    def _send(self, line: bytes) -> None:
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (OSError, ValueError):
            pass  # it gave up or ended: the operation stays journaled for sync
