"""Ray Train adapter: ``OxenRayCallback``, one object in ``RunConfig(callbacks=[...])``.

Example (see ``examples/ray_train.py``)::

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.ray import OxenRayCallback, pinned_dataset

    def train_func(config):
        data = pinned_dataset()              # in each worker: the job's pinned commit, on this node
        ...ray.train.report(metrics, checkpoint=...)

    oxen = OxenRayCallback(dataset=PinnedDataset("data/reviews", paths=["train.csv"]),
                           model_repo="models/reviews")
    TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path="/shared/ray", callbacks=[oxen])).fit()
    oxen.lineage                              # the job's lineage record, committed

Where each part runs:

* the driver (construction): the dataset revision is resolved to one commit, every option checked;
* the Ray Train controller (an actor on the driver's node): one :class:`~oxen_callbacks.run.LineageRun`
  for the whole job, whatever the restarts: it opens the MLflow run, commits every checkpoint that
  ``ray.train.report`` persisted (after Ray merged the workers' reports, once) through the background
  publisher, and ends the lineage as FINISHED or FAILED with the job;
* each worker (before the training function): the pinned commit is materialized once per node (from
  the dataset's Oxen remote where the dataset repository's folder is not on that node) and
  ``MLFLOW_RUN_ID`` names the job's run, so ``setup_mlflow`` or ``MLFlowLogger`` on rank 0 joins it.

The controller and worker hooks are Ray's DeveloperAPI callback classes (``ray.train.v2._internal``):
this module supports the Ray versions in ``RAY_VERSIONS`` (checked at import) and
``tests/test_ray.py`` guards the hooks it relies on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import (
    ControllerCallback,
    ReportCallback,
    WorkerCallback,
    WorkerGroupCallback,
)

from ._util.cache import default_cache_dir
from ._util.redact import redact_url
from .errors import ConfigurationError
from .lineage import LineageJSON
from .names import (
    ENV_MLFLOW_EXPERIMENT_ID,
    ENV_MLFLOW_EXPERIMENT_NAME,
    ENV_MLFLOW_RUN_ID,
    ENV_MLFLOW_TRACKING_URI,
)
from .pin import PinnedDataset, as_pinned
from .run import LineageRun

log = logging.getLogger(__name__)

RAY_VERSIONS = ("2.60",)  # the Ray releases whose DeveloperAPI hooks tests/test_ray.py checked
if ".".join(ray.__version__.split(".")[:2]) not in RAY_VERSIONS:
    warnings.warn(f"oxen_callbacks.ray was tested with Ray {', '.join(RAY_VERSIONS)}, not {ray.__version__}: "
                  "it relies on Ray Train's DeveloperAPI callbacks, which may have changed.", stacklevel=2)

_worker_pin: PinnedDataset | None = None  # set in each worker process by OxenRayCallback
_worker_ready = False
_driver_pin: PinnedDataset | None = None  # the latest callback's pin, for Ray's local mode


class _RunOnController(LineageRun):
    """A LineageRun built (options checked) on the driver and started on Ray's controller, where its MLflow
    sink process imports MLflow while Ray starts the workers: it starts no process in the driver."""

    def _start_early_work(self) -> None:
        pass


class OxenRayCallback(ControllerCallback, WorkerGroupCallback, ReportCallback, WorkerCallback):
    """Pin the dataset once per job, commit every reported checkpoint to Oxen once, one MLflow run.

    Args:
        model_repo: local Oxen repository on the driver's node for the checkpoints (created when missing).
        dataset: a :class:`PinnedDataset`, or the path of a local Oxen dataset repository (then
            ``revision`` and ``paths`` apply). ``None``: no dataset lineage.
        **run_options: passed to :class:`oxen_callbacks.run.LineageRun` (``mlflow``, ``run_name``,
            ``experiment_name``, ``mlflow_tracking_uri``, ``cache_dir``, ``author``, ``remote``...).
        allow_dataset_change: let a job Ray resumes from an earlier job's checkpoint (the same
            ``RunConfig(name, storage_path)``) read another dataset commit than that checkpoint was trained on.

    Checkpoints stay where Ray put them (``RunConfig(storage_path)``, pruned by ``num_to_keep``); each
    is hard-linked into the cache at report time (copied when the cache lies on another filesystem;
    downloaded when the storage is not a local or mounted folder) and committed in the background.
    """

    def __init__(
        self,
        *,
        model_repo: str | os.PathLike[str],
        dataset: PinnedDataset | str | os.PathLike[str] | None = None,
        revision: str | None = None,
        paths: list[str] | None = None,
        allow_dataset_change: bool = False,
        **run_options: Any,
    ) -> None:
        global _driver_pin
        cache_dir = Path(run_options.pop("cache_dir", None) or default_cache_dir()).expanduser().resolve()
        self.dataset = as_pinned(dataset, revision, paths, cache_dir)  # resolved here, once per job
        self._fit_key = uuid.uuid4().hex  # the controller notes each fit's run under it, for `lineage`
        if run_options.get("mlflow", True):  # what this driver means, for the controller's process
            run_options.setdefault("mlflow_tracking_uri", _tracking_uri())
            run_options.setdefault("experiment_name", os.environ.get(ENV_MLFLOW_EXPERIMENT_NAME))
        self.model_repo = Path(model_repo).expanduser().resolve()
        self._run: _RunOnController | None = _RunOnController(
            dataset=self.dataset, model_repo=self.model_repo, framework=("ray", ray.__version__),
            cache_dir=cache_dir, **run_options)
        self.mlflow_tracking_uri: str | None = run_options.get("mlflow_tracking_uri")
        self.mlflow_run_id: str | None = None  # the job's run: known on the controller before workers start
        self.mlflow_experiment_id: str | None = None
        self.dataset_remote = _dataset_remote(self.dataset)
        self.allow_dataset_change = allow_dataset_change
        self._reported: dict[str, int | None] = {}  # on the controller: each checkpoint folder reported, its step
        self._warned_reuse = False
        _driver_pin = self.dataset

    def __getstate__(self) -> dict[str, Any]:
        """Workers get what they need to read the pin and join the MLflow run, not the controller's run."""
        state = dict(self.__dict__)
        if getattr(self._run, "publisher", None) is not None:
            state["_run"] = None
        return state

    # -- controller ------------------------------------------------------------------------
    def after_controller_start(self, train_run_context: Any) -> None:
        """Start the job's lineage run: claim its name, pull the pin, start the publisher, open MLflow."""
        run = self._controller_run()
        config = train_run_context.run_config
        restored = _restored_checkpoint(config.storage_context)  # an earlier job's, under the same name
        found = _committed_as(self.model_repo, restored) if restored else None
        if restored and found is None:
            log.warning("Ray resumes this job from checkpoint %s, an earlier job's under RunConfig(name=%r), which "
                        "no run of %s committed: the lineage cannot name its commit or check its dataset commit.",
                        restored, config.name, self.model_repo)
        recorded_dataset = (found or {}).get("state", {}).get("dataset")
        if recorded_dataset and self.dataset is not None and not self.allow_dataset_change:
            self.dataset.check_same(recorded_dataset, what=f"The checkpoint Ray resumes this job from ({restored})")
        run.start(fit_key=self._fit_key)  # (a default run name already taken, by an earlier fit: drawn again)
        assert run.record is not None
        run.record["run"]["ray"] = {"name": config.name, "storage_path": redact_url(str(config.storage_path)),
                                    "experiment_path": redact_url(config.storage_context.experiment_fs_path),
                                    "run_id": train_run_context.run_id}
        if restored:
            run.note_resumed((found or {}).get("state"), step=(found or {}).get("step"), file=restored,
                             committed=(found or {}).get("committed"))

    def before_init_train_context(self, workers: list[Any]) -> dict[str, list[Any]]:
        """Before Ray copies this callback to a (new) worker group: the MLflow run's id for rank 0."""
        run = self._controller_run()
        if run.sink is not None and self.mlflow_run_id is None:
            self.mlflow_run_id = run.sink.wait_for_run(run.mlflow_timeout)
            self.mlflow_experiment_id = run.sink.journal.meta().get("experiment_id")
            if self.mlflow_run_id is None:
                log.warning("The MLflow run was not created within %.0f s (%s): workers log nowhere; the lineage "
                            "is journaled for `oxen-callbacks sync`.", run.mlflow_timeout, run.sink.why_pending())
        return {}

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        """Queue the checkpoint Ray just persisted for commit (a hard link and a queue entry: ~ms)."""
        checkpoint = training_report.checkpoint
        if checkpoint is None:
            return
        try:
            step, epoch, numbers = _report_position(metrics[0] if metrics else {})
            again = self._note_reported(str(checkpoint.path), step)
            with _local_folder(checkpoint) as folder:
                self._controller_run().checkpoint_saved(folder, step=step, epoch=epoch, metrics=numbers,
                                                        rewrites_earlier=again)
        except Exception:  # never stop training for lineage: the checkpoint stays in Ray's storage
            log.exception("Committing checkpoint %s to Oxen failed", checkpoint.path)

    def _note_reported(self, path: str, step: int | None) -> bool:
        """Whether an earlier report of this job put its checkpoint in the same folder. Ray persists a report
        before the controller sees it, so by then the worker may have written the next report into that folder:
        the earlier report's commit may hold the later one's bytes. Warned once per job."""
        again = path in self._reported
        if again and not self._warned_reuse:
            self._warned_reuse = True
            log.warning("Checkpoint folder %s was reported again (step %s after step %s): a report reusing a "
                        "checkpoint_dir_name may be written over before its commit freezes it, so each earlier "
                        "report's lineage entry says it may hold a later report's bytes (may_hold_later_report). "
                        "Give each report its own checkpoint_dir_name (or leave Ray's default).",
                        path, step, self._reported[path])
        self._reported[path] = step
        return again

    def after_controller_finish(self, result: Any) -> None:
        """End the lineage with the job: wait for every commit, commit the final record, end MLflow."""
        run = self._controller_run()
        if run.publisher is None:  # never started (refused at controller start): nothing to end
            return
        status = "FAILED" if result.error is not None else "FINISHED"
        try:
            run.finish(status)
        except Exception:
            log.exception("Recording the lineage of run %s failed", run.run_name)

    def before_controller_abort(self) -> None:
        self._controller_run().finish_after_error("KILLED", what="aborted Ray run")

    def _controller_run(self) -> _RunOnController:
        assert self._run is not None, "OxenRayCallback's controller hooks run on Ray's controller only"
        return self._run

    # -- worker ----------------------------------------------------------------------------
    def after_init_train_context(self) -> None:
        """In each worker, before the training function: the pinned commit on this node, the MLflow run."""
        global _worker_pin, _worker_ready
        if self.mlflow_run_id is not None:
            os.environ[ENV_MLFLOW_RUN_ID] = self.mlflow_run_id
            if self.mlflow_experiment_id is not None:  # (setup_mlflow wants one)
                os.environ[ENV_MLFLOW_EXPERIMENT_ID] = self.mlflow_experiment_id
            if self.mlflow_tracking_uri:
                os.environ[ENV_MLFLOW_TRACKING_URI] = self.mlflow_tracking_uri
        _worker_pin = _pin_on_this_node(self.dataset, self.dataset_remote)
        if _worker_pin is not None:
            _worker_pin.pull()  # once per node: the snapshot cache is shared and locked
        _worker_ready = True

    # -- driver ----------------------------------------------------------------------------
    @property
    def lineage(self) -> LineageJSON | None:
        """The lineage record of the latest ``fit()`` with this callback, from the model repository."""
        assert self._run is not None
        record = self._run.lineage(self._fit_key)
        if record is None:
            log.warning("No lineage record in %s for this callback's job: did Ray run it with ScalingConfig("
                        "num_workers=0)? Its local mode ignores RunConfig(callbacks=...).", self.model_repo)
        return record


def pinned_dataset() -> PinnedDataset | None:
    """In a Ray Train worker: the job's pinned dataset, materialized on this node (``None``: no dataset)."""
    if not _worker_ready:
        warnings.warn("OxenRayCallback did not run in this process: with ScalingConfig(num_workers=0) Ray runs the "
                      "training function locally and ignores RunConfig(callbacks=...), so no checkpoint is "
                      "committed to Oxen. Use num_workers>=1.", RuntimeWarning, stacklevel=2)
        return _driver_pin
    return _worker_pin


# -- helpers ----------------------------------------------------------------------------------
def _tracking_uri() -> str:
    from ._mlflow.fluent import default_tracking_uri

    return default_tracking_uri()


def _dataset_remote(pin: PinnedDataset | None) -> str | None:
    """The dataset repository's Oxen remote URL, for nodes where its folder does not exist."""
    root = pin.source.local_root if pin is not None else None
    if root is None:
        return None
    from ._oxen import layout as oxen_layout

    try:
        remotes = oxen_layout.remotes(root)
    except oxen_layout.DamagedLayout:
        return None
    return remotes.get("origin") or next(iter(remotes.values()), None)


def _pin_on_this_node(pin: PinnedDataset | None, remote: str | None) -> PinnedDataset | None:
    """The pin, or the same commit from the dataset's remote where its local folder is not on this node."""
    root = pin.source.local_root if pin is not None else None
    if pin is None or root is None or root.is_dir() or pin.is_pulled:
        return pin
    if remote is None:
        raise ConfigurationError(
            f"Dataset repository {str(root)!r} is not on node {ray.util.get_node_ip_address()} and has no Oxen "
            f"remote to read commit {pin.commit} from.",
            "put it on a filesystem every node mounts, or push it to an Oxen remote (`oxen push origin main`).",
        )
    return PinnedDataset(remote, revision=pin.commit, paths=pin.paths, cache_dir=pin.store.cache_dir)


def _report_position(metrics: dict[str, Any]) -> tuple[int | None, int | None, dict[str, float]]:
    """Step, epoch and numeric metrics of rank 0's report (Lightning's and HF's reporters name them)."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    step = metrics.get("step", metrics.get("global_step"))
    epoch = metrics.get("epoch")
    if isinstance(epoch, float):  # the HF Trainer's: 1.0 is the end of epoch 0
        epoch = max(math.ceil(epoch) - 1, 0)
    return (int(step) if isinstance(step, (int, float)) else None,
            epoch if isinstance(epoch, int) else None, numbers)


def _restored_checkpoint(storage: Any) -> str | None:
    """The checkpoint Ray hands this job's workers from an earlier job of the same ``RunConfig(name,
    storage_path)``: the latest in the run snapshot Ray's checkpoint manager loaded at controller start."""
    import json

    try:
        fs, snapshot = storage.storage_filesystem, storage.checkpoint_manager_snapshot_path
        if fs.get_file_info(snapshot).type.name == "NotFound":
            return None
        with fs.open_input_stream(snapshot) as f:
            latest = (json.loads(f.read().decode("utf-8")) or {}).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
        return str(storage.build_checkpoint_path_from_name(name)) if isinstance(name, str) else None
    except Exception:  # Ray's snapshot format is its own: never stop the job for lineage
        log.warning("Could not read Ray's run snapshot %s: a checkpoint this job resumes from is not recorded.",
                    getattr(storage, "checkpoint_manager_snapshot_path", "?"), exc_info=True)
        return None


def _committed_as(model_repo: Path, source: str) -> dict[str, Any] | None:
    """The run of ``model_repo`` that committed the checkpoint Ray reported at ``source`` (its bytes still
    there): ``{"committed": {commit, path}, "step", "state": the run's resume state}``, newest run first."""
    from .checkpoints import committed_source
    from .lineage import read_or_skip
    from .model_repo import lineage_files

    if not os.path.exists(source):  # (cloud storage: not read back here)
        return None
    for file in sorted(lineage_files(model_repo), key=lambda p: p.stat().st_mtime, reverse=True):
        record = read_or_skip(file)
        if record is None or not any(c.get("source") == source for c in record["checkpoints"]):
            continue
        run = record["run"].get("name")
        committed = committed_source(model_repo, run, source, hops=1)
        if committed is not None:
            step = next((c.get("step") for c in reversed(record["checkpoints"]) if c["commit"] == committed["commit"]
                         and c["path"] == committed["path"]), None)
            return {"committed": committed, "step": step,
                    "state": {"dataset": record.get("dataset"), "run_name": run, "model_repo": str(model_repo)}}
    return None


@contextlib.contextmanager
def _local_folder(checkpoint: Any) -> Iterator[str]:
    """The checkpoint as a folder on this node: Ray's own when its storage is local (or mounted), else a
    download, removed once frozen."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield str(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="oxen-ray-") as tmp:
        yield checkpoint.to_directory(os.path.join(tmp, os.path.basename(checkpoint.path.rstrip("/"))))
