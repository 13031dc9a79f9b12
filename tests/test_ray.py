"""Ray Train: one OxenRayCallback in RunConfig(callbacks=...), real Ray cluster (started once), two workers.

Each job costs ~30-45 s (worker start-up dominates), so each test asserts everything one job can show.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

import lightning as L
from helpers import file_at, make_repo

from oxen_callbacks._oxen import child as oxen_child

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray cluster for the module; its processes import this checkout, the tests and the examples,
    and keep their Oxen config, caches and logs under the module's tmp folder."""
    root = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(HERE.parent), str(HERE), str(EXAMPLES),
                                                  os.environ.get("PYTHONPATH", "")]))
        env.setenv("OXEN_CONFIG_DIR", str(root / "oxen-config"))
        env.setenv("OXEN_CALLBACKS_CACHE", str(root / "cache"))
        env.setenv("HF_HOME", str(root / "hf"))
        (root / "tmp").mkdir()  # Ray's Lightning report callback makes its folders in the temp dir
        env.setenv("TMPDIR", str(root / "tmp"))
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # Ray's controller polls workers faster than 2 s
        for name in [n for n in os.environ if n.startswith("MLFLOW_")]:  # Ray's processes inherit this env:
            env.delenv(name)  # an experiment id an earlier test's mlflow.set_experiment exported is not theirs
        # Ray's session folder holds its AF_UNIX sockets, whose paths may not pass 107 bytes: under
        # pytest's folder of an xdist worker (/tmp/pytest-of-USER/pytest-N/popen-gwN/ray0/...) they did
        sessions = tempfile.mkdtemp(prefix="oxcb-ray-", dir="/tmp")
        try:
            ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
                     _temp_dir=sessions, log_to_driver=True)
            yield root
        finally:
            ray.shutdown()
            shutil.rmtree(sessions, ignore_errors=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mlflow_runs(tracking_uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def kill_once_committed(models: Path, checkpoints: int) -> None:
    """Kill this worker once ``checkpoints`` reports reached the model repository. (A report the controller
    has not yet polled, every 2 s, dies with the worker group: Ray neither keeps nor resumes from it.)"""
    deadline = time.monotonic() + 120
    while len(list(models.glob("runs/*/checkpoints/*"))) < checkpoints and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)


class Probe(L.Callback):
    """Runs in each worker: notes what it read (and resumed from), logs to MLflow on rank 0 (joining the
    job's run), and kills rank 1 at ``kill_at_step`` on the first attempt, once a checkpoint is committed."""

    def __init__(self, notes: str, models: str, kill_at_step: int | None) -> None:
        self.notes, self.models, self.kill_at_step = Path(notes), Path(models), kill_at_step

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from oxen_callbacks.ray import pinned_dataset

        rank, pin = ray.train.get_context().get_world_rank(), pinned_dataset()
        attempt = "second" if (self.notes / "killed").exists() else "first"
        resumed, resumed_sha = ray.train.get_checkpoint(), None
        if resumed is not None:
            with resumed.as_directory() as folder:
                resumed_sha = sha256(Path(folder) / "checkpoint.ckpt")
        note = {"commit": pin.commit, "train_sha": sha256(pin.file("train.csv")), "resumed_sha": resumed_sha,
                "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID")}
        (self.notes / f"{attempt}-{rank}.json").write_text(json.dumps(note))
        if rank == 0:
            from ray.air.integrations.mlflow import setup_mlflow

            setup_mlflow().log_metric(f"{attempt}_attempt_started", 1)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        killed = self.notes / "killed"
        if (trainer.global_step == self.kill_at_step and ray.train.get_context().get_world_rank() == 1
                and not killed.exists()):
            killed.write_text("")
            kill_once_committed(self.models, 1)


def test_readme_example_commits_each_checkpoint_once_and_resumes_after_a_killed_worker(
        tmp_path: Path, dataset_repo: Any) -> None:
    import ray_train  # examples/ray_train.py, the README's example

    notes = tmp_path / "notes"
    notes.mkdir()
    storage, models = tmp_path / "ray_results", tmp_path / "models"
    # 96 rows, batch 16, 2 workers: 3 steps an epoch, a report (and checkpoint) at steps 3, 6, 9
    result, lineage = ray_train.main(str(dataset_repo.path), str(models), str(storage), epochs=3, max_failures=1,
                                     train_loop_config={"callbacks": [Probe(str(notes), str(models), kill_at_step=5)]})

    assert result.error is None and (notes / "killed").exists()
    assert lineage is not None and lineage["status"] == "FINISHED"
    # the dataset: pinned once on the driver, the same commit and bytes read by every worker of both attempts
    assert lineage["dataset"]["commit"] == dataset_repo.head
    head_train = sha256(file_at(dataset_repo.path, dataset_repo.head, "train.csv", tmp_path / "read"))
    read = {p.stem: json.loads(p.read_text()) for p in notes.glob("*.json")}
    assert set(read) == {"first-0", "first-1", "second-0", "second-1"}
    assert {(r["commit"], r["train_sha"]) for r in read.values()} == {(dataset_repo.head, head_train)}
    # every reported checkpoint committed exactly once, though Ray kept only the last (num_to_keep=1)
    checkpoints = lineage["checkpoints"]
    assert [c["step"] for c in checkpoints] == [3, 6, 9]
    assert len({c["commit"] for c in checkpoints}) == 3
    messages = [c["message"] for c in oxen_child.log(models)]
    for ckpt in checkpoints:
        assert sum(Path(ckpt["path"]).name in m for m in messages) == 1
    committed = [file_at(models, c["commit"], f"{c['path']}/checkpoint.ckpt", tmp_path / "read") for c in checkpoints]
    import torch

    assert [torch.load(p, weights_only=False)["global_step"] for p in committed] == [3, 6, 9]
    kept_by_ray = sorted(p for p in storage.glob("*/checkpoint_*") if p.is_dir())
    assert len(kept_by_ray) < len(checkpoints)  # Ray pruned some (it also keeps the one a restart resumed)
    with result.checkpoint.as_directory() as kept:
        assert sha256(Path(kept) / "checkpoint.ckpt") == sha256(committed[-1])
    # the replacement workers resumed from the last checkpoint committed before the kill
    assert read["second-0"]["resumed_sha"] == read["second-1"]["resumed_sha"] == sha256(committed[0])
    # one MLflow run for the job: rank 0 of both attempts joined it; it names the Ray run and its storage
    runs = mlflow_runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == lineage["run"]["mlflow_run_id"] == read["first-0"]["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert {"first_attempt_started", "second_attempt_started"} <= set(run.data.metrics)
    assert run.data.tags["oxen.dataset.commit"] == dataset_repo.head
    assert run.data.tags["oxen.model.commit"] == checkpoints[-1]["commit"]
    ray_section = lineage["run"]["ray"]
    assert ray_section["storage_path"] == str(storage)
    assert Path(ray_section["experiment_path"]) == Path(result.path) and ray_section["name"] == Path(result.path).name
    assert isinstance(ray_section["run_id"], str) and ray_section["run_id"]


def hf_train_func(config: dict[str, Any]) -> None:
    """The HF Trainer in each worker, reporting with Ray's own callback; rank 1 dies at ``kill_at_step``."""
    from hf_model import make_model, make_tokenizer, tokenize
    from ray.train.huggingface.transformers import (
        RayTrainReportCallback,
        prepare_trainer,
    )
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from oxen_callbacks.ray import pinned_dataset

    class KillAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == config["kill_at_step"] and ray.train.get_context().get_world_rank() == 1:
                kill_once_committed(Path(config["models"]), 2)

    tokenizer = make_tokenizer()
    train = tokenize(pinned_dataset().load_dataset()["train"], tokenizer).remove_columns(["uid", "text"])
    args = TrainingArguments(output_dir="out", max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1,
                             per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(make_model(), args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[RayTrainReportCallback(), KillAt()])
    prepare_trainer(trainer).train()


def test_hf_trainer_job_on_non_local_storage_whose_worker_dies_without_retries_ends_failed_listing_its_checkpoints(
        tmp_path: Path) -> None:
    import pyarrow.fs
    from hf_model import jsonl
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from oxen_callbacks.ray import OxenRayCallback

    data = make_repo(tmp_path / "reviews", [("reviews", {"train.jsonl": jsonl(0) + jsonl(1, seed=1)})])
    oxen = OxenRayCallback(dataset=str(data.path), paths=["train.jsonl"], model_repo=tmp_path / "models")
    # storage through a pyarrow filesystem that is not the local one (as cloud storage is): downloaded to commit
    storage = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    (tmp_path / "bucket").mkdir()
    trainer = TorchTrainer(hf_train_func, train_loop_config={"kill_at_step": 5, "models": str(tmp_path / "models")},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(storage_path="ray_results", storage_filesystem=storage,
                                                callbacks=[oxen], failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(ray.train.TrainingFailedError):
        trainer.fit()

    lineage = oxen.lineage
    assert lineage is not None and lineage["status"] == "FAILED"
    assert lineage["dataset"]["commit"] == data.head
    assert [c["step"] for c in lineage["checkpoints"]] == [2, 4]  # saved before the kill at step 5
    for ckpt in lineage["checkpoints"]:
        state = file_at(tmp_path / "models", ckpt["commit"], f"{ckpt['path']}/checkpoint/trainer_state.json",
                        tmp_path / "read")
        assert json.loads(state.read_text())["global_step"] == ckpt["step"]
    (run,) = mlflow_runs(os.environ["MLFLOW_TRACKING_URI"])
    assert run.info.status == "FAILED" and run.info.run_id == lineage["run"]["mlflow_run_id"]
    assert not list(Path(tempfile.gettempdir()).glob("oxen-ray-*"))  # the downloads are gone


def test_local_mode_warns_that_callbacks_are_ignored(tmp_path: Path, dataset_repo: Any) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from oxen_callbacks.ray import OxenRayCallback, pinned_dataset

    seen: list[str] = []
    oxen = OxenRayCallback(dataset=str(dataset_repo.path), paths=["train.csv"], model_repo=tmp_path / "models")
    trainer = TorchTrainer(lambda: seen.append(pinned_dataset().commit), scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), callbacks=[oxen]))
    with pytest.warns(RuntimeWarning, match="num_workers=0"):
        trainer.fit()
    assert seen == [dataset_repo.head]
    assert oxen.lineage is None


def test_ray_hooks_this_adapter_relies_on_are_still_there() -> None:
    """DeveloperAPI classes in ray.train.v2._internal: a Ray upgrade that renames a hook would silently
    disable lineage. These are the hooks and arguments OxenRayCallback implements."""
    from ray.train.v2._internal.execution import callback as hooks
    from ray.train.v2._internal.execution.controller import controller

    from oxen_callbacks.ray import OxenRayCallback

    expected = {
        hooks.ControllerCallback: {"after_controller_start": ["train_run_context"], "after_controller_finish":
                                   ["result"], "before_controller_abort": []},
        hooks.ExecutionGroupCallback: {"before_init_train_context": ["workers"]},
        hooks.ReportCallback: {"after_report": ["training_report", "metrics"]},
        hooks.WorkerCallback: {"after_init_train_context": []},
    }
    for base, methods in expected.items():
        assert issubclass(OxenRayCallback, base)
        for name, params in methods.items():
            assert list(inspect.signature(getattr(base, name)).parameters)[1:] == params, (base, name)
    source = inspect.getsource(controller.TrainController)
    for call in ('"after_controller_start"', '"after_controller_finish"', '"before_controller_abort"'):
        assert call in source
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    assert "checkpoint" in inspect.signature(_TrainingReport).parameters
    # the run snapshot a rerun under the same RunConfig(name) restores from (read by _restored_checkpoint)
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager
    from ray.train.v2._internal.execution.storage import StorageContext

    assert {"latest_checkpoint_result"} <= set(checkpoint_manager._CheckpointManagerState.__fields__)
    assert "checkpoint_dir_name" in checkpoint_manager._TrainingResultState.__fields__
    assert hasattr(StorageContext, "checkpoint_manager_snapshot_path")
    assert hasattr(StorageContext, "build_checkpoint_path_from_name")


def test_readme_ray_example_is_the_tested_example() -> None:
    readme = (HERE.parent / "README.md").read_text()
    section = readme[readme.index("## Ray Train"):]
    start = section.index("```python\n") + len("```python\n")
    block = section[start:section.index("\n```", start)]
    assert "OxenRayCallback" in block and block in (EXAMPLES / "ray_train.py").read_text()


def test_bad_options_fail_on_the_driver_before_ray_starts_anything(tmp_path: Path, dataset_repo: Any) -> None:
    from oxen_callbacks.errors import ConfigurationError
    from oxen_callbacks.ray import OxenRayCallback

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match="is a file"):
        OxenRayCallback(dataset=str(dataset_repo.path), model_repo=tmp_path / "file")
    with pytest.raises(ConfigurationError, match="Revision|revision"):
        OxenRayCallback(dataset=str(dataset_repo.path), revision="no-such-branch", model_repo=tmp_path / "models")


def test_worker_on_a_node_without_the_dataset_folder_and_no_remote_is_told_how_to_fix_it(
        tmp_path: Path, dataset_repo: Any) -> None:
    """What a worker on another node (no shared filesystem) meets when the dataset has no Oxen remote."""
    import pickle

    from oxen_callbacks.errors import ConfigurationError
    from oxen_callbacks.ray import OxenRayCallback

    oxen = OxenRayCallback(dataset=str(dataset_repo.path), paths=["train.csv"], model_repo=tmp_path / "models",
                           cache_dir=tmp_path / "driver-cache")
    on_other_node = pickle.loads(pickle.dumps(oxen))  # what Ray hands each worker
    dataset_repo.path.rename(tmp_path / "elsewhere")  # the folder is not on this "node"
    with pytest.raises(ConfigurationError, match="oxen push"):
        on_other_node.after_init_train_context()


def report_func(config: dict[str, Any]) -> None:
    """Reports ``config["reports"]`` checkpoints (``model.bin``: ``<tag>-<i>-`` and 1 MB) into
    ``config["dir_name"]`` (``None``: Ray's default, a new folder each); notes what it resumed from."""
    from ray.train import Checkpoint

    from oxen_callbacks.ray import pinned_dataset

    pinned_dataset()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            Path(config["notes"], "resumed.bin").write_bytes((Path(folder) / "model.bin").read_bytes())
    for i in range(config["reports"]):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "model.bin").write_bytes(f"{config['tag']}-{i}-".encode() + b"x" * 1_000_000)
            ray.train.report({"step": i}, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=config["dir_name"])


def report_job(tmp_path: Path, dataset: Any, *, tag: str, reports: int, dir_name: str | None,
               revision: str | None = None) -> tuple[Any, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from oxen_callbacks.ray import OxenRayCallback

    (tmp_path / "notes").mkdir(exist_ok=True)
    oxen = OxenRayCallback(dataset=str(dataset.path), revision=revision, paths=["train.csv"],
                           model_repo=tmp_path / "models", mlflow=False)
    trainer = TorchTrainer(report_func, train_loop_config={"tag": tag, "reports": reports, "dir_name": dir_name,
                                                           "notes": str(tmp_path / "notes")},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="job", storage_path=str(tmp_path / "ray_results"),
                                                callbacks=[oxen]))
    return trainer.fit(), oxen


def test_reports_into_one_checkpoint_dir_name_never_claim_bytes_their_commit_may_not_hold(
        tmp_path: Path, dataset_repo: Any) -> None:
    """A fixed ``checkpoint_dir_name`` (a "latest" folder): Ray persists each report before its controller
    sees it, so the next report may overwrite the folder before the earlier one is frozen."""
    from oxen_callbacks.cli.lineage import entry_notes

    result, oxen = report_job(tmp_path, dataset_repo, tag="A", reports=3, dir_name="latest")
    lineage = oxen.lineage
    assert result.error is None and lineage["status"] == "FINISHED"
    entries = lineage["checkpoints"]
    assert [c["step"] for c in entries] == [0, 1, 2]
    for c in entries:
        held = file_at(tmp_path / "models", c["commit"], f"{c['path']}/model.bin", tmp_path / "read").read_bytes()
        later = c.get("may_hold_later_report")
        # each entry's commit holds its own report's bytes, or its entry says it may hold a later report's
        assert held.startswith(f"A-{c['step']}-".encode()) or (later and held.startswith(b"A-")), (c, held[:8])
        if c["step"] < 2:  # every report but the last was followed by one into the same folder
            assert later == {"step": c["step"] + 1, "path": entries[c["step"] + 1]["path"]}
            assert entry_notes(c)  # `oxen-callbacks lineage` shows it
    assert "may_hold_later_report" not in entries[-1]
    last = file_at(tmp_path / "models", entries[-1]["commit"], f"{entries[-1]['path']}/model.bin", tmp_path / "read")
    assert last.read_bytes().startswith(b"A-2-")


def test_a_rerun_of_the_same_ray_run_records_the_checkpoint_it_resumed_and_checks_its_dataset(
        tmp_path: Path, dataset_repo: Any) -> None:
    """Ray's recovery after the driver died: the same RunConfig(name, storage_path) restores the earlier job's
    latest checkpoint (get_checkpoint() in the new job)."""
    from oxen_callbacks.errors import DatasetMismatchError

    first_result, first = report_job(tmp_path, dataset_repo, tag="A", reports=2, dir_name=None)
    earlier = first.lineage
    assert first_result.error is None and earlier["status"] == "FINISHED"

    second_result, second = report_job(tmp_path, dataset_repo, tag="B", reports=1, dir_name=None)
    lineage = second.lineage
    assert second_result.error is None and lineage["run"]["name"] != earlier["run"]["name"]
    resumed, loaded = lineage.get("resumed_from"), earlier["checkpoints"][-1]
    assert resumed is not None
    assert (resumed["commit"], resumed["path"], resumed["step"]) == (loaded["commit"], loaded["path"], 1)
    assert resumed["run_name"] == earlier["run"]["name"] and resumed["dataset"]["commit"] == dataset_repo.head
    read = (tmp_path / "notes" / "resumed.bin").read_bytes()  # what the new job's worker was handed...
    committed = file_at(tmp_path / "models", resumed["commit"], f"{resumed['path']}/model.bin", tmp_path / "read")
    assert read == committed.read_bytes() and read.startswith(b"A-1-")  # ...is what resumed_from names

    # a rerun pinning another dataset commit than the restored checkpoint's is refused, as a Lightning resume is
    with pytest.raises(ray.train.ControllerError) as refused:  # (Ray wraps our DatasetMismatchError)
        report_job(tmp_path, dataset_repo, tag="C", reports=1, dir_name=None, revision=dataset_repo.commits[0])
    assert isinstance(refused.value.__cause__ or refused.value, (DatasetMismatchError, ray.train.ControllerError))
    assert f"was trained on dataset commit {dataset_repo.head}" in str(refused.value)
