"""Registered model versions named by Oxen commits, and stage promotion that moves an Oxen branch.

Two real Lightning fits register versions of one model in a real MLflow SQLite
store (no server: the registry works the same, and this covers the MlflowClient
query path the CLI uses for non-HTTP stores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import isolate, moved_dataset
from helpers import make_repo, tree_state
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset
from oxen_callbacks._mlflow.registry import promote
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen import layout as oxen_layout
from oxen_callbacks._oxen import shadow as oxen_shadow
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.errors import ConfigurationError
from oxen_callbacks.lightning import OxenLightningCallback
from oxen_callbacks.run import LineageRun


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root, uri)
        env = dict(os.environ)  # what the CLI processes of the tests run with
        mp.chdir(root)
        dataset = moved_dataset(root / "dataset")
        runs = []
        for i, commit in enumerate(dataset.commits):
            pin = PinnedDataset(dataset.path, revision=commit, paths=["train.csv", "val.csv"])
            cb = OxenLightningCallback(dataset=pin, model_repo=root / "models", run_name=f"reg-{i}",
                                       register_model="reg-clf", experiment_name="registry",
                                       mlflow_tracking_uri=uri)  # explicit: immune to a global mlflow URI
            make_trainer(root / f"fit{i}", [ModelCheckpoint(dirpath=root / f"fit{i}"), cb], epochs=1).fit(
                TinyModel(), datamodule=CsvData(pin))
            runs.append(cb.lineage)
    return {"root": root, "uri": uri, "env": env, "dataset": dataset,
            "models": (root / "models").resolve(), "runs": runs}


def test_registered_versions_are_tagged_with_the_oxen_commits(registered, tmp_path):
    client = MlflowClient(registered["uri"])
    model_commits = set(LocalRepo(registered["models"]).commit_ids())
    for i, record in enumerate(registered["runs"]):
        version = client.get_model_version("reg-clf", str(i + 1))
        run_id = record["run"]["mlflow_run_id"]
        assert version.run_id == run_id and version.source.startswith("models:/")  # the checkpoint's logged model
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.source_run_id == run_id and logged.tags["oxen.model.commit"] == record["model"]["commit"]
        assert version.tags["oxen.model.commit"] == record["model"]["commit"] and record["model"]["commit"] in model_commits
        assert version.tags["oxen.model.path"] == record["model"]["path"]
        assert version.tags["oxen.model.repo"] == str(registered["models"])
        assert version.tags["oxen.dataset.commit"] == registered["dataset"].commits[i]
        assert json.loads(version.tags["oxen.dataset.paths"]) == ["train.csv", "val.csv"]
        # the source is the pointer: it names the same commit
        pointer = client.download_artifacts(run_id, "oxen/lineage.json", str(tmp_path / str(i)))
        assert json.loads(Path(pointer).read_text())["model"]["commit"] == record["model"]["commit"]


def test_promote_moves_the_stage_branch_and_alias_without_touching_the_tree(registered):
    models, (first, second) = registered["models"], [r["model"]["commit"] for r in registered["runs"]]
    repo = LocalRepo(models)
    before = (tree_state(models), repo.current_branch(), oxen_child.branches(models)["main"])
    client = MlflowClient(registered["uri"])

    out = promote(models, first, "production", tracking_uri=registered["uri"])
    assert (out["branch"], out["commit"], out["previous"]) == ("stage/production", first, None)
    assert out["aliases"] == [{"name": "reg-clf", "version": "1", "alias": "production"}]
    assert oxen_child.branches(models)["stage/production"] == first
    # forward to the newer model, through the CLI, with a commit prefix
    proc = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", "promote", str(models), second[:12],
                           "--stage", "production", "--json"], capture_output=True, text=True,
                          env=registered["env"], cwd=registered["root"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["previous"] == first
    assert oxen_child.branches(models)["stage/production"] == second
    assert str(client.get_model_version_by_alias("reg-clf", "production").version) == "2"
    # and back: a rollback moves the branch to an older commit
    promote(models, first, "production", tracking_uri=registered["uri"])
    assert oxen_child.branches(models)["stage/production"] == first
    assert str(client.get_model_version_by_alias("reg-clf", "production").version) == "1"
    after = (tree_state(models), repo.current_branch(), oxen_child.branches(models)["main"])
    assert after == before


def test_promote_without_mlflow_moves_only_the_branch(registered):
    out = promote(registered["models"], registered["runs"][1]["model"]["commit"], "staging")
    assert out["aliases"] == [] and oxen_child.branches(registered["models"])["stage/staging"] == out["commit"]


@pytest.mark.parametrize("stage", ["Prod", "latest", "v2", "a/b", ""])
def test_promote_refuses_a_stage_that_cannot_be_a_branch_and_an_alias(registered, stage):
    with pytest.raises(ConfigurationError, match="--stage"):
        promote(registered["models"], "main", stage)


def test_promote_refuses_an_unknown_commit(registered):
    with pytest.raises(ConfigurationError, match="'0000000' was not found"):
        promote(registered["models"], "0000000", "production")


def test_register_model_needs_mlflow(tmp_path):
    with pytest.raises(ConfigurationError, match="register_model='clf' needs MLflow"):
        LineageRun(dataset=None, model_repo=tmp_path / "m", framework=("x", "1"), mlflow=False, register_model="clf")


def test_shadow_with_linked_refs_changes_only_branches(tmp_path):
    """Guards the layout promote relies on: the branch database is the folder .oxen/refs."""
    repo = make_repo(tmp_path / "r", [("one", {"a.txt": "1"}), ("two", {"a.txt": "2"})])
    assert (repo.path / ".oxen" / "refs").is_dir()
    shadow = oxen_layout.make_shadow(repo.path, tmp_path / "shadow", repo.commits[0], linked=("versions", "refs"))
    assert os.path.realpath(shadow / ".oxen" / "refs") == str(repo.path / ".oxen" / "refs")
    assert (shadow / ".oxen" / "HEAD").read_text() == repo.commits[0]
    previous = oxen_child.run_in_child(oxen_shadow.move_branch, repo_path=str(repo.path),
                                       name="stage/x", commit=repo.commits[0])
    assert previous is None
    assert oxen_child.branches(repo.path) == {"main": repo.commits[1], "stage/x": repo.commits[0]}
    assert oxen_layout.head_ref(repo.path) == "main" and (repo.path / "a.txt").read_text() == "2"
