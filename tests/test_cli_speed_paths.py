"""`trace` / `lineage` as processes on their three paths: what each imports, and that all three agree.

A real ``mlflow server`` on loopback (REST, no MLflow import), its SQLite file read
directly (``MlflowClient``: MLflow imported) and a real model repository (Oxen commits,
no MLflow at all). What each process imported is read from ``python -X importtime``;
no timing is asserted (``benchmarks/trace_speed.py`` measures those).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import commit_files, make_repo
from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

from oxen_callbacks.lineage import SCHEMA, read_lineage
from oxen_callbacks.model_repo import endpoint_tag, lineage_path

HEAVY = ("mlflow", "torch", "lightning", "transformers", "oxen")  # oxen: the oxenai module
ENDPOINT = "https://api.example.com/v1/clf"


def commit_id(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


DATASET = {"run-a": commit_id("data-a"), "run-b": commit_id("data-b"), "tags-only": commit_id("data-a")}


@dataclass
class World:
    root: Path
    models: Path
    server_uri: str
    sqlite_uri: str
    run_ids: dict[str, str]  # run name -> MLflow run id
    model_commits: dict[str, str]  # run name -> the Oxen commit of its checkpoint


@dataclass
class Answer:
    data: dict
    imported: set[str]  # the heavy top-level packages the process imported


def lineage_record(name: str, run_id: str, models: Path, commit: str) -> dict:
    checkpoint = {"commit": commit, "path": f"runs/{name}/checkpoints/last.ckpt", "step": 4, "epoch": 1,
                  "metrics": {"val_loss": 0.25}}
    return read_lineage({
        "schema": SCHEMA, "status": "FINISHED",
        "dataset": {"repo": "/data/reviews", "revision": "main", "commit": DATASET[name], "paths": ["train.csv"]},
        "model": {"repo": str(models), "commit": commit, "path": checkpoint["path"]}, "checkpoints": [checkpoint],
        "run": {"name": name, "mlflow_run_id": run_id, "mlflow_tracking_uri": None},
        "code": {"git_commit": "0" * 40, "git_dirty": False}, "framework": {"name": "lightning", "version": "2"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server) -> World:  # noqa: F811
    """Three runs in MLflow (one registered and aliased, one with an endpoint, one whose model
    repository is not on this machine) and the first two in a model repository."""
    root = tmp_path_factory.mktemp("speed-paths")
    models = (root / "models").resolve()
    repo = make_repo(models, [(f"checkpoint of {name}", {f"runs/{name}/checkpoints/last.ckpt": f"weights {name}"})
                              for name in ("run-a", "run-b")])
    model_commits = dict(zip(("run-a", "run-b"), repo.commits, strict=True))
    model_commits["tags-only"] = commit_id("model-elsewhere")
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment("speed-paths")
    run_ids = {}
    for name, commit in model_commits.items():
        tags = {"oxen.run": name, "oxen.dataset.repo": "/data/reviews", "oxen.dataset.commit": DATASET[name],
                "oxen.dataset.revision": "main", "oxen.dataset.paths": '["train.csv"]',
                "oxen.model.repo": str(models) if name != "tags-only" else "/nowhere/models",
                "oxen.model.commit": commit, "oxen.model.path": f"runs/{name}/checkpoints/last.ckpt",
                "oxen.code.git_commit": "0" * 40, "oxen.lineage.status": "FINISHED"}
        if name == "run-b":
            tags[endpoint_tag(ENDPOINT)] = ENDPOINT
        run_ids[name] = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    client.create_registered_model("clf")
    version = client.create_model_version("clf", f"runs:/{run_ids['run-a']}/oxen", run_id=run_ids["run-a"])
    client.set_registered_model_alias("clf", "production", version.version)
    commit_files(repo, "lineage", {lineage_path(name): json.dumps(lineage_record(name, run_ids[name], models,
                                                                                  model_commits[name]))
                                   for name in ("run-a", "run-b")})
    (root / "elsewhere").mkdir()
    return World(root, models, mlflow_server.uri, f"sqlite:///{mlflow_server.folder / 'mlflow.db'}", run_ids,
                 model_commits)


def cli(world: World, *args: str, uri: str | None = None, cwd: Path | None = None) -> Answer:
    """``oxen-callbacks ARGS --json`` as its own process under ``-X importtime``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_TRACKING_URI": uri} if uri else {})
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "oxen_callbacks.cli", *args, "--json"],
                          capture_output=True, text=True, cwd=cwd or world.root / "elsewhere", env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "oxen_callbacks.cli.app" in names  # -X importtime did report
    return Answer(json.loads(proc.stdout), {n.split(".")[0] for n in names} & set(HEAVY))


def test_trace_and_lineage_from_a_server_import_no_mlflow(world):
    found = cli(world, "trace", world.model_commits["run-a"], uri=world.server_uri)
    assert found.imported == set()
    (view,) = found.data["runs"]
    assert (found.data["kind"], view["run"]["mlflow_run_id"], view["dataset"]["commit"], view["source"]) == (
        "model-commit", world.run_ids["run-a"], DATASET["run-a"], "model-repo")
    assert [(v["name"], v["version"], v["aliases"]) for v in view["registered"]] == [("clf", "1", ["production"])]
    by_data = cli(world, "trace", DATASET["run-b"], uri=world.server_uri)
    assert by_data.imported == set()
    (view,) = by_data.data["runs"]
    assert view["run"]["name"] == "run-b" and [e["endpoint"] for e in view["endpoints"]] == [ENDPOINT]
    lineage = cli(world, "lineage", world.run_ids["run-a"], uri=world.server_uri)
    assert lineage.imported == set() and lineage.data["checkpoints"][0]["commit"] == world.model_commits["run-a"]
    tags_only = cli(world, "lineage", world.run_ids["tags-only"], uri=world.server_uri)
    assert tags_only.imported == set()
    assert (tags_only.data["source"], tags_only.data["dataset"]["commit"]) == ("mlflow-tags", DATASET["tags-only"])


def test_trace_and_lineage_from_the_model_repository_import_no_mlflow(world):
    models = str(world.models)
    found = cli(world, "trace", world.model_commits["run-b"], "--model-repo", models)
    assert found.imported == set()
    assert [(v["run"]["name"], v["dataset"]["commit"]) for v in found.data["runs"]] == [("run-b", DATASET["run-b"])]
    inside = cli(world, "trace", "runs/run-a/checkpoints/last.ckpt", cwd=world.models)
    assert inside.imported == set() and inside.data["kind"] == "checkpoint"
    assert [v["run"]["mlflow_run_id"] for v in inside.data["runs"]] == [world.run_ids["run-a"]]
    by_name = cli(world, "lineage", "--model-repo", models, "run-a")
    by_run_id = cli(world, "lineage", "--model-repo", models, world.run_ids["run-a"])
    assert by_name.imported == by_run_id.imported == set()
    assert by_name.data == by_run_id.data
    assert (by_name.data["source"], by_name.data["dataset"]["commit"]) == ("model-repo", DATASET["run-a"])


def test_a_sqlite_store_answers_as_the_server_does(world):
    """The SQLite file behind the server: MLflow is imported there, and every answer is the server's."""
    questions = [("trace", world.model_commits["run-a"]), ("trace", DATASET["run-a"]), ("trace", ENDPOINT),
                 ("lineage", world.run_ids["run-a"]), ("lineage", world.run_ids["tags-only"])]
    for question in questions:
        local = cli(world, *question, uri=world.sqlite_uri)
        assert local.imported == {"mlflow"}, question  # needed for SQLite; nothing heavier
        assert local.data == cli(world, *question, uri=world.server_uri).data, question
    (view, other) = sorted(cli(world, "trace", DATASET["run-a"], uri=world.sqlite_uri).data["runs"],
                           key=lambda v: v["run"]["name"])
    assert (view["run"]["name"], other["run"]["name"]) == ("run-a", "tags-only")


def test_only_a_process_of_its_own_freezes_the_garbage_collector(tmp_path, monkeypatch):
    """``main()`` from the command line freezes the collector (the process ends next: no ~1 s teardown
    of MLflow's objects); ``main(argv)`` called inside a program leaves it as it was."""
    from oxen_callbacks.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no model repository, no MLflow: the command fails with exit code 2
    frozen = gc.get_freeze_count()
    assert main(["trace", "abcd1234"]) == 2 and gc.get_freeze_count() == frozen
    code = ("import gc, sys; from oxen_callbacks.cli import main; sys.argv = ['oxen-callbacks', 'trace', 'abcd1234']; "
            "code = main(); print(code, gc.get_freeze_count() > 0)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120, check=False)
    assert proc.stdout.split() == ["2", "True"], proc.stderr
