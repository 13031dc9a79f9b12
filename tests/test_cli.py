"""The `oxen-callbacks` CLI on runs made by real Lightning fits, against a real MLflow server.

One module-scoped world: a dataset repository with two commits, a git checkout the
fits run from, three fits (two on commit A, one on B; two register a model version).
Every command runs as its own process, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from conftest import isolate, table
from helpers import Repo, commit_files, file_at, make_repo
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.lightning import OxenLightningCallback

FLIPPED, APPENDED = 3, 2


@dataclass
class World:
    root: Path
    env: dict[str, str]
    dataset: object
    models: Path
    code_dir: Path
    code_commit: str
    runs: dict[str, dict]  # run name -> lineage record

    def run_id(self, name: str) -> str:
        return self.runs[name]["run"]["mlflow_run_id"]


def changed_table() -> str:
    """Commit B's train.csv: commit A's rows with FLIPPED labels flipped and APPENDED rows added."""
    lines = table(label=0, seed=0).splitlines()
    for i in range(1, FLIPPED + 1):
        lines[i] = lines[i][:-1] + "1"
    lines += [f"9.{i},9.{i},9.{i},9.{i},1" for i in range(APPENDED)]
    return "\n".join(lines) + "\n"


def git_checkout(path: Path) -> str:
    path.mkdir()
    (path / "train.py").write_text("# the training code\n")
    for args in (["init", "-q"], ["add", "train.py"],
                 ["-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "code"]):
        subprocess.run(["git", *args], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server) -> World:  # noqa: F811
    root = tmp_path_factory.mktemp("cli-world")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root, mlflow_server.uri)
        env = dict(os.environ)  # what the CLI processes of the tests run with
        code_commit = git_checkout(root / "code")
        mp.chdir(root / "code")
        dataset = make_repo(root / "dataset", [("A", {"train.csv": table(label=0, seed=0),
                                                       "val.csv": table(label=0, seed=1, rows=32)})])
        commit_files(dataset, "B", {"train.csv": changed_table()})
        runs = {}
        for name, revision, options in (("run-a", dataset.commits[0], {"register_model": "tiny-clf"}),
                                        ("run-b", "main", {"register_model": "tiny-clf"}),
                                        ("run-c", dataset.commits[0], {})):
            pin = PinnedDataset(dataset.path, revision=revision, paths=["train.csv", "val.csv"])
            cb = OxenLightningCallback(dataset=pin, model_repo=root / "models", run_name=name, experiment_name="cli-tests",
                                       mlflow_tracking_uri=mlflow_server.uri, **options)
            ckpt = ModelCheckpoint(dirpath=root / name, monitor="val_loss", save_top_k=1, save_last=True)
            make_trainer(root / name, [ckpt, cb], epochs=2).fit(TinyModel(), datamodule=CsvData(pin))
            runs[name] = cb.lineage
    return World(root, env, dataset, (root / "models").resolve(), root / "code", code_commit, runs)


def cli(world: World, *args: str, cwd: Path | None = None, expect: int = 0, **env: str) -> dict:
    """Run `oxen-callbacks ARGS --json` as a process; returns its parsed JSON output."""
    proc = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", *args, "--json"], capture_output=True,
                          text=True, cwd=cwd or world.root, env={**world.env, **env}, timeout=300)
    assert proc.returncode == expect, proc.stderr
    return json.loads(proc.stdout)


def cli_text(world: World, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", *args], capture_output=True, text=True,
                          cwd=world.root, env=world.env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_lineage_names_the_repositories_real_commits(world):
    record = world.runs["run-a"]
    view = cli(world, "lineage", world.run_id("run-a"))
    model_commits = set(LocalRepo(world.models).commit_ids())
    assert view["dataset"]["commit"] == world.dataset.commits[0]
    assert view["dataset"]["paths"] == ["train.csv", "val.csv"]
    assert view["model"] == record["model"] and view["model"]["commit"] in model_commits
    assert [c["commit"] for c in view["checkpoints"]] == [c["commit"] for c in record["checkpoints"]]
    assert all(c["commit"] in model_commits for c in view["checkpoints"])
    assert view["code"]["git_commit"] == world.code_commit
    assert [(v["name"], v["version"]) for v in view["registered"]] == [("tiny-clf", "1")]
    text = cli_text(world, "lineage", world.run_id("run-a"))
    assert world.dataset.commits[0] in text and record["model"]["commit"] in text and world.code_commit in text
    assert "registered   tiny-clf v1" in text.splitlines()
    # a pin by branch says what was asked for beside the commit it stood for
    assert f"dataset      {world.dataset.path} @ {world.dataset.commits[1]}  asked for 'main'" in cli_text(
        world, "lineage", world.run_id("run-b")).splitlines()
    # the quickstart's second form: the model repository alone, no MLflow
    offline = cli(world, "lineage", "--model-repo", str(world.models), "run-a", MLFLOW_TRACKING_URI="")
    assert offline["source"] == "model-repo"
    assert (offline["dataset"], offline["model"]) == (view["dataset"], view["model"])


def test_lineage_picture_written_and_logged(world, tmp_path):
    run_id = world.run_id("run-a")
    model_commit = world.runs["run-a"]["model"]["commit"]
    view = cli(world, "lineage", run_id, "--graph", str(tmp_path / "g.svg"))
    svg = ET.parse(view["graph"]).getroot()
    text = " ".join(t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text"))
    assert world.dataset.commits[0][:12] in text and model_commit[:12] in text and "tiny-clf v1" in text
    cli(world, "lineage", run_id, "--graph", str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli(world, "lineage", run_id, "--graph", str(tmp_path / "g.html"))
    assert "<svg" in (tmp_path / "g.html").read_text() and model_commit in (tmp_path / "g.html").read_text()
    logged = MlflowClient(world.env["MLFLOW_TRACKING_URI"]).download_artifacts(run_id, "oxen/lineage.svg", str(tmp_path))
    assert model_commit[:12] in Path(logged).read_text()


def test_dataset_input_resolves_back_to_the_snapshot(world, tmp_path):
    run = MlflowClient(world.env["MLFLOW_TRACKING_URI"]).get_run(world.run_id("run-b"))
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "oxen"
    source = mlflow.data.get_source(dataset_input)
    assert source.commit == world.dataset.commits[1]
    folder = Path(source.load(cache_dir=tmp_path / "cache"))
    expected = file_at(world.dataset.path, world.dataset.commits[1], "train.csv", tmp_path / "read")
    assert (folder / "train.csv").read_bytes() == expected.read_bytes()


def test_trace_from_a_checkpoint_path_finds_run_and_dataset_commit(world):
    best = Path(world.runs["run-b"]["model"]["path"])
    found = cli(world, "trace", str(world.models / best))
    assert found["kind"] == "checkpoint"
    (run,) = found["runs"]
    assert run["run"]["mlflow_run_id"] == world.run_id("run-b")
    assert run["dataset"]["commit"] == world.dataset.commits[1]
    assert world.runs["run-b"]["model"]["commit"] in [c["commit"] for c in run["matched_checkpoints"]]
    relative = cli(world, "trace", best.as_posix(), cwd=world.models)  # as typed inside the model repository
    assert relative["runs"][0]["dataset"]["commit"] == world.dataset.commits[1]
    # outside any model repository, without --model-repo: the repositories MLflow's runs of that name used
    elsewhere = cli(world, "trace", best.as_posix(), cwd=world.root)
    assert [(r["run"]["name"], r["model"]["repo"], r["dataset"]["commit"]) for r in elsewhere["runs"]] == [
        ("run-b", str(world.models), world.dataset.commits[1])]


def test_trace_from_a_dataset_commit_finds_every_model_trained_on_it(world):
    for target in (world.dataset.commits[0], world.dataset.commits[0][:10]):
        found = cli(world, "trace", target)
        assert found["kind"] == "dataset-commit"
        assert {r["run"]["name"] for r in found["runs"]} == {"run-a", "run-c"}
        assert {r["model"]["commit"] for r in found["runs"]} == {world.runs[n]["model"]["commit"] for n in ("run-a", "run-c")}
        assert {r["model"]["commit"] for r in found["runs"]} <= set(LocalRepo(world.models).commit_ids())


def test_trace_from_a_model_commit_finds_its_data(world):
    found = cli(world, "trace", world.runs["run-c"]["model"]["commit"])
    assert found["kind"] == "model-commit"
    assert [r["run"]["name"] for r in found["runs"]] == ["run-c"]
    assert found["runs"][0]["dataset"]["commit"] == world.dataset.commits[0]
    assert found["runs"][0]["code"]["git_commit"] == world.code_commit
    # another checkpoint's commit (no MLflow tag names it) is found in the model repository; there is
    # one: last.ckpt, saved at each epoch, is in two commits
    model_commit = world.runs["run-a"]["model"]["commit"]
    other = next(c["commit"] for c in world.runs["run-a"]["checkpoints"] if c["commit"] != model_commit)
    earlier = cli(world, "trace", other, "--model-repo", str(world.models))
    assert [r["run"]["name"] for r in earlier["runs"]] == ["run-a"]
    assert earlier["runs"][0]["dataset"]["commit"] == world.dataset.commits[0]


def test_endpoint_is_recorded_and_traced_to_its_data(world, tmp_path):
    endpoint = "https://api.example.com/v1/tiny"
    model_b = world.runs["run-b"]["model"]["commit"]
    deployed = cli(world, "record-deploy", endpoint, "--model-commit", model_b)
    assert deployed["model"]["commit"] == model_b and deployed["mlflow_tagged"]
    assert deployed["record_commit"] in LocalRepo(world.models).commit_ids()
    committed = json.loads(file_at(world.models, deployed["record_commit"], f"deployments/{deployed['slug']}.json",
                                   tmp_path).read_text())
    assert (committed["endpoint"], committed["model"]["commit"]) == (endpoint, model_b)
    found = cli(world, "trace", endpoint)
    assert found["kind"] == "endpoint"
    assert [r["run"]["name"] for r in found["runs"]] == ["run-b"]
    assert found["runs"][0]["dataset"]["commit"] == world.dataset.commits[1]
    # redeployed to run-a's model: the endpoint now traces to commit A, run-b no longer serves it
    cli(world, "record-deploy", endpoint, "--model-commit", world.runs["run-a"]["model"]["commit"])
    found = cli(world, "trace", endpoint)
    assert [(r["run"]["name"], r["dataset"]["commit"]) for r in found["runs"]] == [("run-a", world.dataset.commits[0])]
    assert cli(world, "lineage", world.run_id("run-b"))["endpoints"] == []
    assert [e["endpoint"] for e in cli(world, "lineage", world.run_id("run-a"))["endpoints"]] == [endpoint]
    model_a = world.runs["run-a"]["model"]["commit"]
    assert f"endpoint     {endpoint} serves {model_a}" in cli_text(world, "lineage", world.run_id("run-a")).splitlines()


def test_reproduce_materializes_exact_data_and_final_checkpoint(world, tmp_path):
    record = world.runs["run-a"]
    out = cli(world, "reproduce", world.run_id("run-a"), "--to", str(tmp_path / "kit"))
    for rel in ("train.csv", "val.csv"):
        expected = file_at(world.dataset.path, world.dataset.commits[0], rel, tmp_path / "read")
        assert (tmp_path / "kit" / "data" / rel).read_bytes() == expected.read_bytes()
    expected = file_at(world.models, record["model"]["commit"], record["model"]["path"], tmp_path / "read")
    assert Path(out["model"]["file"]).read_bytes() == expected.read_bytes()
    assert out["code"]["git_commit"] == world.code_commit
    assert out["rerun"].startswith(f"cd {world.code_dir} && git checkout {world.code_commit} && python")
    assert json.loads((tmp_path / "kit" / "lineage.json").read_text())["model"] == record["model"]
    assert (world.dataset.path / "train.csv").read_text() == changed_table()  # the user's tree: still B
    error = cli(world, "reproduce", world.run_id("run-a"), "--to", str(tmp_path / "kit"), expect=2)
    assert "empty folder" in error["hint"]


def test_diff_reports_the_changed_rows(world):
    run_a, run_b = world.run_id("run-a"), world.run_id("run-b")
    keyed = cli(world, "diff", run_a, run_b, "--keys", "x0,x1,x2,x3")
    assert (keyed["a"]["commit"], keyed["b"]["commit"]) == tuple(world.dataset.commits)
    assert keyed["files"] == {"added": [], "removed": [], "modified": ["train.csv"]}
    rows = keyed["rows"]["train.csv"]
    assert rows["counts"] == {"added": APPENDED, "modified": FLIPPED}
    flipped = [r for r in rows["rows"] if r["status"] == "modified"]
    assert all((r["label.left"], r["label.right"]) == (0, 1) for r in flipped)
    plain = cli(world, "diff", run_a, run_b)
    assert plain["rows"]["train.csv"]["counts"] == {"added": FLIPPED + APPENDED, "removed": FLIPPED}
    same = cli(world, "diff", run_a, world.run_id("run-c"))
    assert same["same_commit"] and same["files"] == {"added": [], "removed": [], "modified": []}


def test_bad_input_names_the_value_and_exits_2(world, tmp_path):
    error = cli(world, "lineage", "no-such-run", expect=2)
    assert "no-such-run" in error["error"] and error["hint"]
    error = cli(world, "lineage", world.run_id("run-a"), "--graph", str(tmp_path / "g.gif"), expect=2)
    assert "g.gif" in error["error"] and ".svg" in error["hint"]
    error = cli(world, "trace", "runs/x/y.ckpt", "--model-repo", str(tmp_path), expect=2)
    assert str(tmp_path) in error["error"]
    assert cli(world, "trace", "0123456789abcdef", expect=1)["runs"] == []  # a valid query that finds nothing


def test_sync_finishes_journaled_mlflow_logging(world):
    pytest.importorskip("oxen_callbacks._ops.sync")
    from oxen_callbacks._mlflow.journal import MlflowJournal

    cache = world.root / "sync-cache"
    journal = MlflowJournal.create(cache, {"tracking_uri": world.env["MLFLOW_TRACKING_URI"],
                                           "run_id": world.run_id("run-c")})
    journal.put(1, {"op": "set_tags", "tags": {"oxen.test.synced": "yes", "oxen.test.commit": "old"}})
    journal.put(2, {"op": "set_tags", "tags": {"oxen.test.commit": "new"}})  # learnt later: it wins
    # a run training never managed to create: sync creates, tags and ends it
    offline = MlflowJournal.create(cache, {"tracking_uri": world.env["MLFLOW_TRACKING_URI"], "run_id": None})
    offline.put(1, {"op": "create_run", "run_name": "offline", "experiment_id": None, "experiment_name": "offline"})
    offline.put(2, {"op": "set_tags", "tags": {"oxen.test.synced": "offline"}})
    offline.put(3, {"op": "end_run", "status": "FINISHED"})
    report = cli(world, "sync", "--cache-dir", str(cache))  # stdout stays one JSON object (MLflow prints links)
    client = MlflowClient(world.env["MLFLOW_TRACKING_URI"])
    tags = client.get_run(world.run_id("run-c")).data.tags
    assert tags["oxen.test.synced"] == "yes" and tags["oxen.test.commit"] == "new"
    created = {entry["run_id"] for entry in report["mlflow"]} - {world.run_id("run-c")}
    assert len(created) == 1 and report["pending"] == 0
    run = client.get_run(created.pop())
    assert run.data.tags["oxen.test.synced"] == "offline" and run.info.status == "FINISHED"


# -- hand-written runs of a model repository alone (no MLflow): damaged caches, unusual tables -------------
def hand_runs(tmp_path: Path, data: Repo, runs: dict[str, tuple[str, list[str]]]) -> Path:
    """A model repository with a lineage record of each run ``name: (dataset commit, paths)`` of ``data``."""
    ckpt = "runs/r/checkpoints/last.ckpt"
    models = make_repo(tmp_path / "models", [("c", {ckpt: "w"})])
    for name, (commit, paths) in runs.items():
        record = {"schema": "oxen-callbacks/lineage/v1",
                  "dataset": {"repo": str(data.path), "revision": commit, "commit": commit, "paths": paths},
                  "model": {"repo": str(models.path), "commit": models.head, "path": ckpt},
                  "checkpoints": [{"commit": models.head, "path": ckpt, "step": 1, "epoch": 0, "metrics": {}}],
                  "run": {"name": name, "mlflow_run_id": None, "mlflow_tracking_uri": None},
                  "code": {"git_commit": None, "git_dirty": None}, "framework": {"name": "lightning", "version": "2"}}
        (models.path / "runs" / name).mkdir(parents=True, exist_ok=True)
        (models.path / "runs" / name / "lineage.json").write_text(json.dumps(record))
    return models.path


def test_reproduce_and_diff_never_use_a_damaged_cached_snapshot(tmp_path, monkeypatch, capsys):
    """A cached file changed in place (same size: only a content hash tells) is made again, not copied."""
    from oxen_callbacks.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    committed = "x,label\n1,0\n2,0\n"
    data = make_repo(tmp_path / "data", [("A", {"train.csv": committed}), ("B", {"notes.txt": "same train.csv"})])
    models = hand_runs(tmp_path, data, {"a": (data.commits[0], ["train.csv"]), "b": (data.commits[1], ["train.csv"])})
    cached = PinnedDataset(data.path, revision=data.commits[0], paths=["train.csv"]).file("train.csv")

    def damage() -> None:
        cached.chmod(0o644)
        cached.write_text(committed.replace(",0", ",1"))
        assert main(["verify"]) == 1

    damage()
    assert main(["reproduce", "a", "--model-repo", str(models), "--to", str(tmp_path / "kit")]) == 0
    assert (tmp_path / "kit" / "data" / "train.csv").read_text() == committed == cached.read_text()
    damage()
    capsys.readouterr()
    assert main(["diff", "a", "b", "--model-repo", str(models), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == {"added": [], "removed": [], "modified": []}
    assert main(["verify"]) == 0


def test_verify_names_a_snapshot_folder_deleted_with_its_records_kept(tmp_path, capsys):
    """It said "ok (0 files)" of a snapshot whose folder was gone (adversarial review)."""
    from oxen_callbacks.cli import main

    data = make_repo(tmp_path / "data", [("A", {"train.csv": "x,label\n1,0\n", "val.csv": "x,label\n2,0\n"})])
    pin = PinnedDataset(data.path, revision=data.head)
    folder = pin.pull()
    subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    capsys.readouterr()
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {folder}" in out and "the snapshot folder is missing (its records say 2 files)" in out
    pin.pull()
    assert main(["verify"]) == 0


def test_diff_keeps_its_answer_when_one_table_cannot_be_compared(tmp_path, monkeypatch, capsys):
    """An emptied CSV, a cut-off JSON Lines row, a binary file named .csv: that table is marked, the rest stands."""
    from oxen_callbacks.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    left = {"empty.csv": "a,b\n1,2\n", "cut.jsonl": '{"a": 1}\n{"a": 2}\n', "binary.csv": "a,b\n1,2\n",
            "good.csv": "a,b\n1,2\n3,4\n"}
    right = {"empty.csv": "", "cut.jsonl": '{"a": 1}\n{"a": 2\n', "binary.csv": bytes(range(256)) * 4,
             "good.csv": "a,b\n1,2\n3,5\n"}
    data = make_repo(tmp_path / "data", [("A", left), ("B", right)])
    models = hand_runs(tmp_path, data, {"a": (data.commits[0], ["."]), "b": (data.commits[1], ["."])})
    capsys.readouterr()
    assert main(["diff", "a", "b", "--model-repo", str(models), "--keys", "a", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["files"]["modified"] == sorted(left)
    rows = found["rows"]
    assert rows["good.csv"]["error"] is None and rows["good.csv"]["counts"] == {"modified": 1}
    assert "run B's file cannot be read as a table (DataFrame error: no data: empty CSV)" in rows["empty.csv"]["error"]
    assert rows["cut.jsonl"]["error"].startswith("run B's file cannot be read as a table")
    assert rows["binary.csv"]["error"] and rows["binary.csv"]["rows"] == []
    assert main(["diff", "a", "b", "--model-repo", str(models)]) == 0
    out = capsys.readouterr().out
    assert "M empty.csv" in out and "\nempty.csv: rows not compared: run B's file cannot be read" in out
    assert all("\n" not in rows[path]["error"] for path in ("empty.csv", "cut.jsonl", "binary.csv"))


def test_diff_reports_a_schema_change_and_refuses_a_key_column_no_table_holds(tmp_path, monkeypatch, capsys):
    from oxen_callbacks.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    data = make_repo(tmp_path / "data", [("A", {"t.csv": "a,b\n1,2\n3,4\n", "u.csv": "id,b\n1,2\n"}),
                                         ("B", {"t.csv": "a,b,c\n1,2,5\n3,4,6\n", "u.csv": "id,b\n1,3\n"})])
    models = hand_runs(tmp_path, data, {"a": (data.commits[0], ["."]), "b": (data.commits[1], ["."])})
    capsys.readouterr()
    assert main(["diff", "a", "b", "--model-repo", str(models), "--keys", "a"]) == 0
    out = capsys.readouterr().out
    assert "t.csv: columns changed, rows the same in the columns both hold\n  + column c" in out
    assert "u.csv: rows not compared: key column 'a' is in neither run's file (its columns: id, b)" in out
    assert main(["diff", "a", "b", "--model-repo", str(models), "--keys", "a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"]["t.csv"]["schema"] == {"added": ["c"], "removed": [],
                                                                               "retyped": []}
    assert main(["diff", "a", "b", "--model-repo", str(models), "--keys", "c"]) == 2
    err = capsys.readouterr().err
    assert "--keys 'c' cannot compare t.csv: key column 'c' is not in run A's file (its columns: a, b)" in err
    assert "hint: name key columns both runs' tables hold" in err and len(err.strip().splitlines()) == 2
