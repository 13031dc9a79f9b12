"""SLURM pre-emption, for real: a fit in its own process with SLURM's environment, the pre-emption
signal sent mid-fit, a stand-in ``scontrol`` that records the requeue and, as SLURM does, then
sends SIGTERM; then the requeued job (same ``SLURM_JOB_ID``, a new process)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import table
from helpers import Repo, commit_files, file_at, make_repo
from mlflow import MlflowClient

SCRIPT = Path(__file__).parent / "preempt_script.py"
JOB = "4242"


def slurm_env(tmp_path: Path, restart: int) -> dict[str, str]:
    """A SLURM batch job's environment, with a stand-in ``scontrol`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    # records the call, then does what `scontrol requeue` does to the running job: SIGTERM it
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\nkill -TERM $PPID\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID=JOB, SLURM_JOB_NAME="train",
               SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_RESTART_COUNT=str(restart),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]))
    return env


def job(tmp_path: Path, framework: str, dataset: Path, restart: int, *extra: str, signal_at: int = -1,
        env: dict[str, str] | None = None) -> dict:
    """One start of the SLURM job (``restart``: SLURM_RESTART_COUNT); MLflow may take its time
    (a first SQLite store migrates for ~10 s here): the deadline under test is the commit's.
    ``signal_at``: the step the pre-emption signal comes at, given in the environment: a requeued
    job runs the same command line (which training of the job a run was is told by it)."""
    out = tmp_path / "out.json"  # (the same command line each start)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), framework, "--dataset", str(dataset), "--model-repo",
           str(tmp_path / "models"), "--root", str(tmp_path / "root"), "--out", str(out),
           "--preempt-timeout", "120", *extra]
    proc = subprocess.run(cmd, check=False, env={**slurm_env(tmp_path, restart), "TEST_SIGNAL_AT_STEP": str(signal_at), **(env or {})},
                          capture_output=True, text=True, timeout=400)
    (tmp_path / f"job{restart}.log").write_text(proc.stderr)
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr[-4000:]  # SIGTERM: requeued by the script
    return json.loads(out.rename(tmp_path / f"out{restart}.json").read_text())


def only_mlflow_run(run_id: str):  # type: ignore[no-untyped-def]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run for both jobs
    return runs[0]


@pytest.mark.timeout(600)
def test_lightning_preempted_job_commits_its_checkpoint_and_the_requeued_job_goes_on(dataset_repo, tmp_path):
    first = job(tmp_path, "lightning", dataset_repo.path, 0, signal_at=3)

    # Lightning asked SLURM to requeue this very job
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB]
    # before the process exited, the checkpoint saved on the signal was committed and the run PREEMPTED
    committed = first["committed"]
    assert committed["status"] == "PREEMPTED"
    hpc = tmp_path / "root" / "hpc_ckpt_1.ckpt"
    entry = next(c for c in committed["checkpoints"] if c["path"].endswith("hpc_ckpt_1.ckpt"))
    assert entry["step"] == 3
    assert file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read").read_bytes() == hpc.read_bytes()
    assert max(first["steps"]) < 3 * 6  # it stopped mid-fit
    mlflow_id = committed["run"]["mlflow_run_id"]
    run = only_mlflow_run(mlflow_id)
    assert run.info.status == "KILLED" and run.data.tags["oxen.lineage.status"] == "PREEMPTED"

    # the dataset's branch moves while the job waits in the queue
    commit_files(dataset_repo, "C", {"train.csv": table(label=2, seed=0)})
    second = job(tmp_path, "lightning", dataset_repo.path, 1)

    assert second["ckpt_path"] == str(hpc)  # Lightning resumed the requeue checkpoint...
    assert min(second["steps"]) == 4 and second["global_step"] == 3 * 6  # ...and went on from its step
    lineage = second["lineage"]
    assert lineage["run"]["name"] == first["run"] == second["run"]  # the same lineage run
    assert lineage["run"]["mlflow_run_id"] == mlflow_id  # the same MLflow run
    assert lineage["dataset"]["commit"] == committed["dataset"]["commit"] == dataset_repo.commits[1]
    assert lineage["dataset"]["revision"] == "main"  # what the job asked for, pinned where it first resolved
    assert second["labels"] == [1]  # it read the pinned commit, not the moved branch
    assert lineage["status"] == "FINISHED"
    steps = [c["step"] for c in lineage["checkpoints"]]
    assert 3 in steps and max(steps) == 18 and len(steps) == len(set(steps))  # both jobs' saves, once each
    run = only_mlflow_run(mlflow_id)
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"


@pytest.mark.timeout(600)
def test_lightning_preemption_signal_during_the_sanity_check_ends_preempted_and_the_requeued_job_goes_on(
        dataset_repo, tmp_path):
    """Lightning installs its requeue handler before the sanity check: a signal there requeues the job too."""
    first = job(tmp_path, "lightning", dataset_repo.path, 0, env={"TEST_SIGNAL_IN_SANITY_CHECK": "1"})

    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB]
    committed = first["committed"]
    assert first["steps"] == [] and committed["status"] == "PREEMPTED"  # no training step ran
    hpc = tmp_path / "root" / "hpc_ckpt_1.ckpt"
    entry = next(c for c in committed["checkpoints"] if c["path"].endswith("hpc_ckpt_1.ckpt"))
    assert file_at(tmp_path / "models", entry["commit"], entry["path"], tmp_path / "read").read_bytes() == hpc.read_bytes()

    second = job(tmp_path, "lightning", dataset_repo.path, 1)
    assert second["ckpt_path"] == str(hpc)
    lineage = second["lineage"]
    assert lineage["run"]["name"] == first["run"] and lineage["status"] == "FINISHED"  # the same run, not a new one
    assert lineage["run"]["mlflow_run_id"] == committed["run"]["mlflow_run_id"]


@pytest.mark.timeout(600)
def test_hf_preempt_signal_saves_commits_and_the_requeued_job_goes_on(tmp_path):
    from hf_model import jsonl

    data = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(label=0, rows=64)})])
    first = job(tmp_path, "hf", data.path, 0, "--max-steps", "8", signal_at=3)

    committed = first["committed"]
    assert committed["status"] == "PREEMPTED"
    assert first["global_step"] == 3  # saved and stopped at the end of the signalled step
    [entry] = [c for c in committed["checkpoints"] if c["step"] == 3]  # saved once (the epoch's end saved it again)
    saved = tmp_path / "root" / "out" / "checkpoint-3" / "model.safetensors"
    assert file_at(tmp_path / "models", entry["commit"], f"{entry['path']}/model.safetensors",
                   tmp_path / "read").read_bytes() == saved.read_bytes()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB]  # the job script's requeue

    second = job(tmp_path, "hf", data.path, 1, "--max-steps", "8")
    lineage = second["lineage"]
    assert min(second["steps"]) == 4 and second["global_step"] == 8  # resumed from checkpoint-3
    assert lineage["run"]["name"] == first["run"]
    assert lineage["run"]["mlflow_run_id"] == committed["run"]["mlflow_run_id"]
    assert lineage["status"] == "FINISHED"
    run = only_mlflow_run(committed["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"


# -- the requeued job's choices, without a fit -------------------------------------------------------
def first_callback(monkeypatch: pytest.MonkeyPatch) -> str:
    """The training key (see ``training_key``) of the next callback made: the first of its process,
    as in a requeued job's new process."""
    from oxen_callbacks import _preempt

    monkeypatch.setattr(_preempt, "_callbacks_made", itertools.count(1))
    key = _preempt.training_key()
    monkeypatch.setattr(_preempt, "_callbacks_made", itertools.count(1))
    return key


def preempted_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: dict, run: str = "nightly-1",
                  training: str | None = None) -> str:
    """A run of SLURM job JOB in tmp_path/models that noted its pre-emption, its process gone
    (``training``: which training of the job it was; default the first callback of this command line)."""
    from oxen_callbacks._publish.claim import RunClaim, note_preempted

    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    if not (tmp_path / "models").is_dir():
        make_repo(tmp_path / "models", [])
    claim = RunClaim.take(tmp_path / "models", run, continuing=False)
    note_preempted(tmp_path / "models", run, {"mlflow_run_id": None, "dataset": dataset,
                                              "training": training or first_callback(monkeypatch)})
    claim.release(preempted=True)  # (the process ending PREEMPTED, or killed: its note stays)
    return run


def test_a_requeued_sweep_goes_on_with_the_run_that_was_preempted(dataset_repo, tmp_path, monkeypatch):
    """A job training several runs (a sweep) is pre-empted in `lr-c` and requeued. Any training of the
    requeued job took over the job's latest pre-empted run (its name, dataset commit and final model;
    found by an adversarial review). It goes on only under the same command line (a job running one
    command per configuration), by name when the runs are named, else in the process's first callback
    (a sweep that skips the configurations it finished makes the pre-empted one first)."""
    from oxen_callbacks.lightning import OxenLightningCallback

    models = tmp_path / "models"
    run = preempted_job(tmp_path, monkeypatch, {}, run="lr-c")

    def made(**options: str) -> str | None:  # a callback of the requeued job: the run it goes on with
        cb = OxenLightningCallback(dataset=dataset_repo.path, model_repo=models, mlflow=False, **options)
        return cb.run.run_name if cb._requeued is not None else None

    first_callback(monkeypatch)
    assert [made() for _ in range(3)] == [run, None, None]  # the first made goes on; the others are new runs
    first_callback(monkeypatch)
    assert [made(run_name="lr-a"), made(run_name="lr-c")] == [None, run]  # named: by name, in any order
    argv = sys.argv
    monkeypatch.setattr(sys, "argv", [*argv, "--lr", "0.1"])  # another command of the job
    first_callback(monkeypatch)
    assert made() is None
    for rank_flags in (["--local_rank=1"], ["--local-rank", "1"]):  # what some launchers add to each rank's command
        monkeypatch.setattr(sys, "argv", [*argv, *rank_flags])
        first_callback(monkeypatch)
        assert made() == run


def test_an_hf_preemption_signal_during_a_save_still_stops_training(tmp_path):
    """The signal came after the callback's step end, while the Trainer saved: clearing the stop at that
    save let training run on to its end (found by an adversarial review). It stops at the next step,
    whose checkpoint is saved and committed once."""
    import signal as signals

    from hf_model import jsonl
    from hf_model import make_trainer as make_hf_trainer
    from transformers import TrainerCallback

    from oxen_callbacks.huggingface import OxenTrainerCallback

    data = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(label=0, rows=64)})])

    class SignalDuringSave(TrainerCallback):  # (after the Oxen callback's step end: as during the save)
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 2:
                os.kill(os.getpid(), signals.SIGUSR1)

    cb = OxenTrainerCallback(dataset=data.path, revision="main", paths=["train.jsonl"], model_repo=tmp_path / "models",
                             preempt_signal=signals.SIGUSR1, mlflow=False)
    trainer, _ = make_hf_trainer(tmp_path / "out", cb.dataset.load_dataset()["train"], [cb, SignalDuringSave()],
                                 max_steps=8, save_steps=2)
    trainer.train()
    assert trainer.state.global_step == 3
    record = cb.lineage
    assert record["status"] == "PREEMPTED" and [c["step"] for c in record["checkpoints"]] == [2, 3]


def test_requeued_job_pins_the_commit_its_run_read_or_refuses_another(dataset_repo, tmp_path, monkeypatch):
    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.errors import DatasetMismatchError
    from oxen_callbacks.lightning import OxenLightningCallback

    first = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"])
    run = preempted_job(tmp_path, monkeypatch, first.to_lineage())
    models = tmp_path / "models"

    first_callback(monkeypatch)
    cb = OxenLightningCallback(dataset=dataset_repo.path, revision="main", model_repo=models, mlflow=False)
    assert cb.run.run_name == run and cb.dataset.commit == dataset_repo.commits[0]  # not main's head
    first_callback(monkeypatch)
    with pytest.raises(DatasetMismatchError, match=dataset_repo.commits[0]):
        OxenLightningCallback(dataset=PinnedDataset(dataset_repo.path, revision="main", paths=["train.csv"]),
                              model_repo=models, mlflow=False)
    first_callback(monkeypatch)
    other = OxenLightningCallback(dataset=dataset_repo.path, revision="main", model_repo=models, mlflow=False,
                                  run_name="another")  # the user names another run: a new one
    assert other.dataset.commit == dataset_repo.commits[1]
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job: nothing to go on with
    first_callback(monkeypatch)
    fresh = OxenLightningCallback(dataset=dataset_repo.path, revision="main", model_repo=models, mlflow=False)
    assert fresh.run.run_name != run and fresh.dataset.commit == dataset_repo.commits[1]


def test_only_the_requeued_job_takes_over_a_preempted_run_name(tmp_path, monkeypatch):
    from oxen_callbacks._publish.claim import RunClaim
    from oxen_callbacks.errors import ConfigurationError

    run = preempted_job(tmp_path, monkeypatch, {})
    models = tmp_path / "models"
    lineage = models / "runs" / run / "lineage.json"
    lineage.parent.mkdir(parents=True)
    lineage.write_text(json.dumps({"checkpoints": [{"step": 3}]}))  # the run has checkpoints
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    with pytest.raises(ConfigurationError, match="already taken"):
        RunClaim.take(models, run, continuing=False)
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    RunClaim.take(models, run, continuing=False).release()  # the same job, requeued: its owner


def test_a_preemption_note_dies_with_a_run_that_ended_otherwise(dataset_repo, tmp_path, monkeypatch):
    """The signal came, yet the run ended FINISHED (or FAILED): a later start of the same SLURM job
    (an array task, a reused id) starts a new run on the data it asks for, never takes that one over."""
    from oxen_callbacks import PinnedDataset
    from oxen_callbacks._publish.claim import RunClaim, note_preempted, preempted_run
    from oxen_callbacks.lightning import OxenLightningCallback

    first = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"])
    models = tmp_path / "models"
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    make_repo(models, [])
    claim = RunClaim.take(models, "ended-1", continuing=False)
    training = first_callback(monkeypatch)
    note_preempted(models, "ended-1", {"mlflow_run_id": None, "dataset": first.to_lineage(), "training": training})
    assert preempted_run(models, JOB, training) is not None
    claim.release()  # the run ended FINISHED after all
    assert preempted_run(models, JOB, training) is None
    run = preempted_job(tmp_path / "b", monkeypatch, first.to_lineage())  # a note left by a killed process...
    from oxen_callbacks.lineage import new_record

    record = {**new_record(dataset=first.to_lineage(), model_repo=str(tmp_path / "b" / "models"),
                           framework={"name": "lightning", "version": "2"}, run={"name": run}),
              "status": "FINISHED"}  # ...whose run ended since
    commit_files(Repo(tmp_path / "b" / "models"), "end", {f"runs/{run}/lineage.json": json.dumps(record)})
    first_callback(monkeypatch)
    cb = OxenLightningCallback(dataset=dataset_repo.path, revision="main", model_repo=tmp_path / "b" / "models",
                               mlflow=False)
    assert cb.run.run_name != run and cb.dataset.commit == dataset_repo.commits[1]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "30"])
def test_bad_preempt_timeout_is_refused_before_training(tmp_path, timeout):
    from oxen_callbacks.errors import ConfigurationError
    from oxen_callbacks.lightning import OxenLightningCallback

    with pytest.raises(ConfigurationError, match="preempt_timeout"):
        OxenLightningCallback(model_repo=tmp_path / "models", mlflow=False, preempt_timeout=timeout)
