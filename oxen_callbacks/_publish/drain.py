"""Publishing work done after its training process is gone: a worker drains a queue, then exits.

``oxen-callbacks sync`` drains the queues a dead training process left (:func:`drain_in_worker`);
the end of an abandoned run commits its amended lineage record the same way
(:func:`commit_record`), so the model repository says what MLflow says: ``KILLED``, and the
MLflow run id that training never got to commit. Both go through a publishing worker: the
repository lock, the commit rules and the push are the ones training uses.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from .._oxen.identity import holds_identity, recorded_config, resolve_author, worker_environment
from .._util.cache import default_cache_dir
from .._util.locks import FileLock
from .._util.processes import python_command
from ..lineage import BEST_KEY
from ..names import ENV_OXEN_CONFIG_DIR
from .queue import JobQueue, queues_of_run
from .warm_worker import worker_arguments

log = logging.getLogger(__name__)


def drain_in_worker(queue: JobQueue, repo: str | os.PathLike[str], push_timeout: float = 300.0) -> None:
    """Run a worker on ``queue`` with stdin closed: it drains everything (and pushes), then exits."""
    meta = queue.meta()
    cmd = python_command("publish-worker", *worker_arguments(
        queue.folder, repo, push_timeout=push_timeout, remote=meta.get("remote"), branch=meta.get("branch"),
        remote_url=meta.get("remote_url")))
    env = {**os.environ, **_identity_of(meta.get("env"), queue.folder.name)}
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   check=False)


def _identity_of(recorded: Any, queue_name: str) -> dict[str, str]:
    """The environment queue ``queue_name``'s training process committed with (``recorded``: its Oxen
    config folder, author and tokens); this one's when that folder is gone, said."""
    env = {k: v for k, v in recorded.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(
        recorded, dict) else {}
    config = recorded_config(env)
    if config is not None and not holds_identity(config):
        log.warning("The Oxen identity queue %s committed with (%s) is gone: its checkpoints are committed as "
                    "this environment's Oxen identity.", queue_name, config)
        del env[ENV_OXEN_CONFIG_DIR]
    return env


def commit_record(model_repo: str | os.PathLike[str], run: str, record: dict[str, Any], *,
                  push_timeout: float = 300.0) -> dict[str, Any] | None:
    """Commit ``record`` as run ``run``'s lineage (``runs/<run>/lineage.json``) of ``model_repo``.

    The record's checkpoints that the repository's own record lists keep their place; the model it
    names stays ``record["model"]``. Returns the committed record (commit ids filled), or ``None``
    when the commit failed (nothing is left queued).
    """
    repo = Path(model_repo)
    earlier = [queue.meta() for queue in queues_of_run(repo, run)]
    like = earlier[-1] if earlier else {}  # the run's own author, remote and branch (kept for a day)
    env = like.get("env")
    if env is None:  # (forgotten by now: this machine's identity)
        env = worker_environment(resolve_author(None), default_cache_dir())
    queue = JobQueue.create(repo, run, {"pid": os.getpid(), "amends": True, "env": env,
                                        **{k: like.get(k) for k in ("remote", "branch", "remote_url")}})
    owner = FileLock(queue.owner_lock)  # held throughout: a `sync` meanwhile leaves this queue to us
    owner.acquire()
    try:
        seq = queue.next_seq()
        job = queue.put(seq, "finalize", {"run": run, "record": record, "best": record["model"].get("path"),
                                          # (kept as the model, not named the best by this: as the record says)
                                          "best_named": record["model"].get(BEST_KEY)})
        drain_in_worker(queue, repo, push_timeout)
        result = queue.result(seq) or {}
        if not result.get("ok"):
            # not left queued: committed later, it could land over a record the run has gone on to since
            queue.drop(job)
    finally:
        owner.release()
    if not result.get("ok"):
        log.warning("Committing the amended lineage of run %s to %s failed (log: %s): the repository's record "
                    "stays as it was; MLflow has the run's end.", run, repo, queue.log_path)
        return None
    return result.get("record")
