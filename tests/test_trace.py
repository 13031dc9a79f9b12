"""Lineage queries without MLflow (model repositories alone) and MLflow tag search among many runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import moved_dataset
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset
from oxen_callbacks._ops.trace import LineageFinder
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback
from oxen_callbacks.model_repo import endpoint_tag


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Two fits with mlflow=False: lineage lives only in the model repository."""
    root = tmp_path_factory.mktemp("offline")
    env = {"OXEN_CONFIG_DIR": str(root / "oxen-config"), "OXEN_CALLBACKS_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(root)
        dataset = moved_dataset(root / "dataset")
        runs = {}
        for name, commit in (("solo-a", dataset.commits[0]), ("solo-b", dataset.commits[1])):
            pin = PinnedDataset(dataset.path, revision=commit, paths=["train.csv", "val.csv"])
            cb = OxenLightningCallback(dataset=pin, model_repo=root / "models", run_name=name, mlflow=False)
            make_trainer(root / name, [ModelCheckpoint(dirpath=root / name, every_n_train_steps=3, save_top_k=-1), cb],
                         epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
            runs[name] = cb.lineage
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {"root": root, "env": {**environ, **env}, "dataset": dataset, "models": (root / "models").resolve(),
            "runs": runs}


def cli(offline: dict, *args: str, cwd: Path | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", *args, "--json"], capture_output=True, text=True,
                          cwd=cwd or offline["root"], env=offline["env"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_lineage_from_the_model_repository_alone(offline):
    record = offline["runs"]["solo-a"]
    view = cli(offline, "lineage", "--model-repo", str(offline["models"]), "solo-a")
    assert view["source"] == "model-repo" and view["run"]["mlflow_run_id"] is None
    assert view["dataset"]["commit"] == offline["dataset"].commits[0]
    assert view["model"] == record["model"] and view["model"]["commit"] in LocalRepo(offline["models"]).commit_ids()
    assert [c["commit"] for c in view["checkpoints"]] == [c["commit"] for c in record["checkpoints"]]


def test_trace_inside_the_model_repository_without_mlflow(offline):
    models, (commit_a, commit_b) = offline["models"], offline["dataset"].commits
    found = cli(offline, "trace", commit_a[:8], cwd=models)
    assert found["kind"] == "dataset-commit" and [r["run"]["name"] for r in found["runs"]] == ["solo-a"]
    solo_b = offline["runs"]["solo-b"]
    found = cli(offline, "trace", solo_b["model"]["path"], cwd=models)
    assert found["kind"] == "checkpoint" and found["runs"][0]["dataset"]["commit"] == commit_b
    earlier = solo_b["checkpoints"][0]
    found = cli(offline, "trace", earlier["commit"], cwd=models)
    assert found["kind"] == "model-commit" and found["runs"][0]["dataset"]["commit"] == commit_b
    # every checkpoint that commit holds (saves that waited together share one)
    assert found["runs"][0]["matched_checkpoints"] == [c for c in solo_b["checkpoints"] if c["commit"] == earlier["commit"]]


def test_deployment_recorded_and_traced_without_mlflow(offline):
    models, record = offline["models"], offline["runs"]["solo-a"]
    deployed = cli(offline, "record-deploy", "reviews-prod", "--model-commit", record["model"]["commit"],
                   "--model-repo", str(models))
    assert not deployed["mlflow_tagged"] and deployed["record_commit"] in LocalRepo(models).commit_ids()
    found = cli(offline, "trace", "reviews-prod", "--model-repo", str(models))
    assert found["kind"] == "endpoint"
    assert [(r["run"]["name"], r["dataset"]["commit"]) for r in found["runs"]] == [("solo-a", offline["dataset"].commits[0])]
    assert found["runs"][0]["endpoints"][0]["model_commit"] == record["model"]["commit"]


def test_tag_search_finds_exactly_the_matching_runs(tmp_path):
    """MLflow's own query path (SQLite store): each answer comes from one tag search."""
    uri = f"sqlite:///{tmp_path / 'many.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("many")
    datasets = [f"{i:x}" * 32 for i in range(10, 13)]
    made: dict[str, list[str]] = {d: [] for d in datasets}
    endpoint = "https://api.example.com/v2/clf"
    for i in range(60):
        tags = {"oxen.run": f"r{i}", "oxen.dataset.commit": datasets[i % 3], "oxen.dataset.repo": "/data/x",
                "oxen.model.repo": "/models/x", "oxen.model.commit": f"{i:032x}", "oxen.model.path": f"runs/r{i}/m.ckpt"}
        if i == 7:
            tags[endpoint_tag(endpoint)] = endpoint
        made[datasets[i % 3]].append(client.create_run(experiment, tags=tags).info.run_id)
    finder = LineageFinder(tracking_uri=uri)
    found = finder.trace(datasets[1][:9])
    assert found["kind"] == "dataset-commit"
    assert sorted(r["run"]["mlflow_run_id"] for r in found["runs"]) == sorted(made[datasets[1]])
    (run,) = finder.trace(f"{41:032x}")["runs"]
    assert (run["run"]["name"], run["dataset"]["commit"], run["source"]) == ("r41", datasets[2], "mlflow-tags")
    (run,) = finder.trace(endpoint)["runs"]
    assert run["run"]["name"] == "r7" and run["endpoints"] == [
        {"endpoint": endpoint, "model_commit": None, "model_path": None, "deployed_at": None}]


def test_a_run_path_two_model_repositories_hold_lists_both(offline, tmp_path):
    """``runs/<name>/...`` names a run folder in every repository that used the name (a "baseline"
    in two projects): the answer lists each, not whichever was found first."""
    dataset, other = offline["dataset"], tmp_path / "other-models"
    pin = PinnedDataset(dataset.path, revision=dataset.commits[1], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=other, run_name="solo-a", mlflow=False)
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1), cb],
                 epochs=1).fit(TinyModel(), datamodule=CsvData(pin))
    first = offline["runs"]["solo-a"]["checkpoints"][0]["path"]
    assert first in {c["path"] for c in cb.lineage["checkpoints"]}  # the same path in both repositories

    found = cli(offline, "trace", first, "--model-repo", str(offline["models"]), "--model-repo", str(other))
    assert found["kind"] == "checkpoint"
    assert sorted((r["model"]["repo"], r["dataset"]["commit"]) for r in found["runs"]) == sorted(
        [(str(offline["models"]), dataset.commits[0]), (str(other.resolve()), dataset.commits[1])])
    # the run's name alone does not say which: no answer from whichever repository came first
    with pytest.raises(ConfigurationError, match=r"Run 'solo-a' is in 2 model repositories: .*\nHINT: pass only"):
        LineageFinder(model_repos=[offline["models"], other]).run("solo-a")
    # one repository given twice (two spellings of it) is one repository: its run, not an ambiguity
    assert LineageFinder(model_repos=[other, Path(os.path.relpath(other))]).run("solo-a")["run"]["name"] == "solo-a"


def test_a_file_inside_a_checkpoint_folder_traces_to_its_checkpoint(tmp_path):
    """Hugging Face saves folders: ``trace runs/<run>/checkpoints/checkpoint-500/model.safetensors`` found no run."""
    from oxen_callbacks.run import LineageRun

    folder = tmp_path / "out" / "checkpoint-500"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("transformers", "5"), mlflow=False,
                     run_name="hf", author=("T", "t@example.com"))
    run.start()
    run.checkpoint_saved(folder, step=500, epoch=1)
    [entry] = run.finish("FINISHED")["checkpoints"]
    found = LineageFinder(model_repos=[tmp_path / "models"]).trace(f"{entry['path']}/model.safetensors")
    assert found["kind"] == "checkpoint" and [r["run"]["name"] for r in found["runs"]] == ["hf"]
    assert found["runs"][0]["matched_checkpoints"] == [entry]


def test_mlflow_s_end_wins_over_a_record_still_running(offline, tmp_path):
    """A run killed, finished by `sync` in MLflow, whose amended record could not be committed yet:
    the answer says how MLflow ended it, and why the repository disagrees."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(offline["models"], models, symlinks=True)
    uri = f"sqlite:///{tmp_path / 'ended.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ended"), tags={"oxen.lineage.status": "KILLED"}).info.run_id
    client.set_terminated(run_id, "KILLED")
    path = models / "runs" / "solo-a" / "lineage.json"
    stale = json.loads(path.read_text())
    stale["status"], stale["run"]["mlflow_run_id"] = "RUNNING", run_id
    path.write_text(json.dumps(stale))
    view = LineageFinder(tracking_uri=uri, model_repos=[models]).run(run_id)
    assert view["status"] == "KILLED" and "still says RUNNING" in view["status_note"]
    view = LineageFinder(model_repos=[models]).run("solo-a")  # without MLflow: no end to tell, but no live process
    assert view["status"] == "RUNNING" and "no process holds this run any more" in view["status_note"]
    assert view["dataset"]["commit"] == offline["dataset"].commits[0]  # the rest is the repository's record
    # a live process trains the run (a fit continuing it in an MLflow run an earlier fit ended): RUNNING
    from oxen_callbacks._publish.claim import RunClaim

    claim = RunClaim.take(offline["models"], "solo-a", continuing=True)  # (where the record says it trains)
    try:
        view = LineageFinder(tracking_uri=uri, model_repos=[models]).run(run_id)
        assert view["status"] == "RUNNING" and "status_note" not in view
    finally:
        claim.release()


def test_a_checkpoint_an_earlier_fit_of_a_continued_run_saved_names_that_fits_code(tmp_path, monkeypatch):
    """A run continued under its name after a code change keeps one record, whose code is the latest
    fit's: `trace` of the first fit's checkpoint named the second fit's git commit (found by an
    adversarial review). Each fit's code is kept by fit id, and the answer for a checkpoint is its fit's."""
    from oxen_callbacks.run import LineageRun

    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.chdir(code)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=T", "-c", "user.email=t@example.com", *args], cwd=code,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    commits = []
    for fit, step in (("first", 1), ("second", 2)):
        (code / "train.py").write_text(f"# {fit} version\n")
        git("add", "train.py")
        git("commit", "-q", "-m", fit)
        commits.append(git("rev-parse", "HEAD"))
        run = LineageRun(dataset=None, model_repo=tmp_path / "models", framework=("test", "1"), mlflow=False,
                         run_name="nightly", author=("T", "t@example.com"))
        run.start(continuing=step == 2)
        (tmp_path / f"e{step}.ckpt").write_bytes(f"weights {step}".encode())
        run.checkpoint_saved(tmp_path / f"e{step}.ckpt", step=step, epoch=step)
        record = run.finish("FINISHED")
    first, second = record["checkpoints"]
    assert first["fit_id"] != second["fit_id"] and record["code"]["git_commit"] == commits[1]

    finder = LineageFinder(model_repos=[tmp_path / "models"])
    for entry, made_by, note in ((first, commits[0], True), (second, commits[1], False)):
        for target in (entry["path"], entry["commit"]):
            [view] = finder.trace(target)["runs"]
            assert view["code"]["git_commit"] == made_by, target
            assert ("saved by an earlier fit of this run" in view.get("fit_note", "")) is note
            assert view["status"] == (None if note else "FINISHED")  # (the later fit's is not that fit's)

    # `sync` of the first fit's MLflow run (killed before its end) logs the record cut to that fit: its code
    from oxen_callbacks._mlflow.abandoned import committed_record

    cut = committed_record(str(tmp_path / "models"), "nightly", "a" * 32, fit_id=first["fit_id"])
    assert cut["code"]["git_commit"] == commits[0] and [c["path"] for c in cut["checkpoints"]] == [first["path"]]
