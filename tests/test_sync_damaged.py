"""`oxen-callbacks sync` on damaged leftovers: a journal, queue or push marker whose file was cut short
or edited is reported (where, and what is wrong), skipped and left as it is; everything else is done."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import make_repo
from mlflow import MlflowClient

from oxen_callbacks import cli
from oxen_callbacks._mlflow.journal import MlflowJournal
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._publish.known_repos import register_model_repo
from oxen_callbacks._publish.push import pending_push_path
from oxen_callbacks._publish.queue import JobQueue


def _good_journal(cache: Path) -> str:
    """A journal (named after every damaged one) tagging a real run: sync must still replay it."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("good")).info.run_id
    journal = MlflowJournal.create(cache, {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "run_id": run_id})
    journal.put(1, {"op": "set_tags", "tags": {"oxen.run": "good"}})
    return run_id


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sync(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["sync", *args])
    return code, capsys.readouterr().out


def _cut_short(path: Path) -> None:
    path.write_text(path.read_text()[:-3])


DAMAGE = {  # what happens to the journal's files -> what the report says
    "meta cut short": (lambda j: _cut_short(j.folder / "meta.json"), "meta.json is not JSON"),
    "op a list": (lambda j: (j.folder / "ops" / "000001.json").write_text("[]"), "ops/000001.json holds a JSON array"),
    "op cut short": (lambda j: _cut_short(j.folder / "ops" / "000001.json"), "ops/000001.json is not JSON"),
    "meta nested too deeply": (lambda j: (j.folder / "meta.json").write_text("[" * 100_000 + "]" * 100_000),
                               "meta.json is not JSON (cut short?): JSON nested too deeply"),
    "op nested too deeply": (lambda j: (j.folder / "ops" / "000001.json").write_text("[" * 100_000 + "]" * 100_000),
                             "ops/000001.json is not JSON (cut short?): JSON nested too deeply"),
    "log_json to a path": (lambda j: j.put(2, {"op": "log_json", "artifact_dir": "oxen", "name": "../../x.json",
                                                 "data": {}}), "ops/000002.json names the file '../../x.json' to log"),
    "log_json to a folder up": (lambda j: j.put(2, {"op": "log_json", "artifact_dir": "../..", "name": "x.json",
                                                      "data": {}}), "names the artifact folder '../..'"),
    "an unknown operation": (lambda j: j.put(2, {"op": "drop_experiment"}),
                             "ops/000002.json names no operation this version knows (op = 'drop_experiment')"),
    "log_model commit a number": (lambda j: j.put(2, {"op": "log_model", "commit": 5, "path": "runs/r1/checkpoints/a",
                                                      "model_repo": "m", "time_ms": 1}),
                                  "ops/000002.json holds commit = 5, not what a log_model operation holds there"),
    "log_model dataset without its commit": (
        lambda j: j.put(2, {"op": "log_model", "commit": "c" * 32, "path": "runs/r1/checkpoints/a", "model_repo": "m",
                            "time_ms": 1, "dataset": {"repo": "d"}}),
        "ops/000002.json holds a dataset {'repo': 'd'} that names no repository and commit"),
    "end_run status missing": (lambda j: j.put(2, {"op": "end_run"}), "holds status = None"),
    "mark_models record not a lineage record": (
        lambda j: j.put(2, {"op": "mark_models", "record": {"run": {}, "model": {}, "checkpoints": "all"},
                            "best_path": None}),
        "ops/000002.json holds a lineage record whose checkpoints are 'all', not a list"),
    "lineage.json not a lineage record": (
        lambda j: j.put(2, {"op": "log_json", "artifact_dir": "oxen", "name": "lineage.json", "data": {"a": 1}}),
        "holds a lineage record whose run is None, not an object"),
    "an operation a list": (lambda j: j.put(2, {"op": ["set_tags"]}), "names no operation this version knows"),
    "model_repo a number": (lambda j: (j.folder / "meta.json").write_text(
        (j.folder / "meta.json").read_text().replace('"model_repo": "', '"model_repo": 5, "was": "')),
        "model_repo = 5"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_mlflow_journal_is_reported_and_left_the_others_replayed(tmp_path, capsys, damage):
    models = make_repo(tmp_path / "models", [("c", {"a.txt": "1"})])
    cache = tmp_path / "cache"
    bad = MlflowJournal(cache / "mlflow-journal" / "20000101-000000-deadbeef")  # listed first
    bad.recreate({"tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "run_id": None,
                  "model_repo": str(models.path), "oxen_run": "r1"})
    bad.put(1, {"op": "create_run", "run_name": "r1", "experiment_id": None, "experiment_name": "bad"})
    harm, said = DAMAGE[damage]
    harm(bad)
    before = _files(bad.folder)
    run_id = _good_journal(cache)

    code, out = _sync(capsys)
    assert code == 1 and f"{bad.folder}" in out and said in out, out
    assert "Skipped and left as it is" in out
    assert MlflowClient().get_run(run_id).data.tags.get("oxen.run") == "good", "the good journal was not replayed"
    assert _files(bad.folder) == before, "the damaged journal was changed"

    code, out = _sync(capsys, "--json")  # again, for scripts: still there, still named
    report = json.loads(out)
    assert code == 1 and report["damaged"] == 1 and report["pending"] == 0
    [entry] = report["mlflow"]
    assert entry["status"] == "damaged" and entry["path"] == str(bad.folder) and said in entry["error"]


def test_a_journal_naming_a_file_to_log_by_path_never_writes_it(tmp_path, capsys):
    """A journaled ``log_json`` writes its file by name under a temporary folder: a path for a name
    (someone who can write the cache) wrote over any file the user can write, then logged it."""
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("original\n")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("hostile")).info.run_id
    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
                                                        "run_id": run_id})
    journal.put(1, {"op": "log_json", "artifact_dir": "oxen", "name": str(victim), "data": {"evil": "echo pwned"}})
    code, out = _sync(capsys, "--cache-dir", str(tmp_path / "cache"))
    assert code == 1 and "not a plain file name" in out, out
    assert victim.read_text() == "original\n"
    assert not client.list_artifacts(run_id, "oxen")


_GOOD = {"run": "r", "dest": "runs/r/checkpoints/x.ckpt", "staged_name": "x.ckpt", "record": {}, "metrics": {},
         "step": 1, "epoch": 0}
HOSTILE_JOBS = {  # a job edited by hand -> what the report says (nothing of it is done)
    "dest out of the repository": ({"dest": "../victim"}, "holds dest = '../victim', not a path in runs/r/checkpoints/"),
    "dest absolute": ({"dest": "<tmp>/victim"}, "not a path in runs/r/checkpoints/"),  # (<tmp>: the test's folder)
    "dest another run's": ({"dest": "runs/other/checkpoints/x.ckpt"}, "not a path in runs/r/checkpoints/"),
    "staged name climbing out": ({"staged_name": "../../../../../../secret.txt"}, "not a file name"),
    "run climbing out": ({"run": "../x"}, "holds run = '../x', not the name of a folder in runs/"),
    "step a word": ({"step": "s"}, "holds step as a string"),
    "metrics a word": ({"metrics": "m"}, "holds metrics as a string"),
    "record a word": ({"record": "r"}, "holds record as a string"),
    "staged file a link out": ({}, "is reached through a link"),
    "staged folder holding a link out": ({}, "is not a regular file or folder"),
}


@pytest.mark.parametrize("case", HOSTILE_JOBS)
def test_a_commit_job_edited_to_reach_out_of_the_repository_is_damaged_and_never_done(tmp_path, capsys, case):
    """A job file (or its frozen bytes) edited by hand: `sync` moved, deleted or committed files outside the
    repository (a dest of ../victim rmtree'd that folder; a staged name or a link brought a secret in, to be
    committed and pushed), or committed a step that made the run's record unreadable. The job is reported
    damaged, nothing outside is touched, nothing is committed, the queue is left as it is."""
    models = make_repo(tmp_path / "models", [("c", {"a.txt": "1"})])
    victim, secret = tmp_path / "victim", tmp_path / "secret.txt"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    secret.write_text("SECRET-BYTES-4242")
    queue = JobQueue.create(models.path, "r", {"pid": 1})
    change, said = HOSTILE_JOBS[case]
    change = {key: value.replace("<tmp>", str(tmp_path)) if isinstance(value, str) else value
              for key, value in change.items()}  # (an absolute path out of the repository, in the test's folder)
    queue.put(1, "checkpoint", {**_GOOD, **change})
    staging = queue.staging_for(1)
    staging.mkdir(parents=True)
    if case == "staged file a link out":
        (staging / "x.ckpt").symlink_to(secret)
    elif case == "staged folder holding a link out":
        (staging / "x.ckpt").mkdir()
        (staging / "x.ckpt" / "model.bin").symlink_to(secret)
    else:
        (staging / "x.ckpt").write_text("weights")
    register_model_repo(tmp_path / "cache", models.path)
    commits, before = LocalRepo(models.path).commit_ids(), _files(queue.folder)

    code, out = _sync(capsys, "--json", "--cache-dir", str(tmp_path / "cache"))
    report = json.loads(out)
    assert code == 1 and report["damaged"] == 1, out
    [damage] = report["model_repos"][0]["damaged"]
    assert said in damage["error"], damage
    assert (victim / "keep.txt").read_text() == "precious" and secret.read_text() == "SECRET-BYTES-4242"
    assert LocalRepo(models.path).commit_ids() == commits and _files(queue.folder) == before
    assert not [p for p in models.path.rglob("*")  # (the attacker's own link aside)
                if p.is_file() and not p.is_symlink() and b"SECRET-BYTES-4242" in p.read_bytes()]


def _dead_fits_queue(tmp_path: Path, name: str = "x.ckpt") -> tuple[Path, JobQueue]:
    """A model repository and the queue a dead training process left: one checkpoint ``name`` of run ``r``."""
    from oxen_callbacks._oxen.identity import resolve_author, worker_environment
    from oxen_callbacks.lineage import new_record

    models = make_repo(tmp_path / "models", [("c", {"a.txt": "1"})]).path
    record = new_record(dataset=None, model_repo=str(models), framework={"name": "x", "version": "1"},
                        run={"name": "r"})
    record.update(status="RUNNING", started_at="2026-12-04T05:00:00+0000", fit_id="f1")
    env = worker_environment(resolve_author(("Dead Trainer", "dead@example.com")), tmp_path / "cache")
    queue = JobQueue.create(models, "r", {"pid": 1, "env": env})
    queue.staging_for(1).mkdir(parents=True)
    (queue.staging_for(1) / name).write_bytes(b"weights")
    queue.put(1, "checkpoint", {**_GOOD, "dest": f"runs/r/checkpoints/{name}", "staged_name": name, "record": record,
                                "message": f"r {name}"})
    return models, queue


def test_a_second_sync_while_one_drains_a_queue_leaves_it_and_counts_nothing(tmp_path, monkeypatch):
    """Two `sync`s at once on a dead process's queue: both reported its checkpoints committed (one drained
    it, the other's worker found nothing left), or the second said it was left to a live training
    process. The one draining holds the queue; the other, coming in right then, reports it busy."""
    from oxen_callbacks._ops import sync

    models, queue = _dead_fits_queue(tmp_path)
    drain, seen = sync.drain_in_worker, []

    def second_sync_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not seen:  # (once: the code before this fix drained the queue here, again and again)
            seen.append(sync.sync_model_repo(models))
        return drain(*args, **kwargs)

    monkeypatch.setattr(sync, "drain_in_worker", second_sync_meanwhile)
    first = sync.sync_model_repo(models)
    assert first["committed"] == 1 and not first["failed"]
    assert seen[0]["committed"] == 0 and seen[0]["busy"] == [{"queue": queue.folder.name, "pending": 1}]
    assert sync.sync_model_repo(models)["committed"] == 0  # (done: nothing left, nothing counted again)


def test_a_job_queued_before_names_were_made_literal_is_still_committed(tmp_path):
    """A job an earlier version queued for a checkpoint named with a backslash (``model\\v1.ckpt``) is no
    hand edit: `sync` commits it under its literal name."""
    from oxen_callbacks._ops import sync

    models, queue = _dead_fits_queue(tmp_path, "model\\v1.ckpt")
    assert queue.damage() is None
    assert sync.sync_model_repo(models)["committed"] == 1


def test_a_push_marker_naming_a_branch_or_url_of_another_type_is_damaged(tmp_path, capsys):
    """A push marker edited to hold a number as its URL crashed `sync` with a traceback, skipping every
    later repository and journal; it is reported damaged and the rest goes on."""
    models = make_repo(tmp_path / "models", [("c", {"a.txt": "1"})])
    register_model_repo(tmp_path / "cache", models.path)
    pending_push_path(models.path).parent.mkdir(parents=True, exist_ok=True)
    pending_push_path(models.path).write_text(json.dumps({"remote": "origin", "branch": "main", "url": 123}))
    run_id = _good_journal(tmp_path / "cache")
    code, out = _sync(capsys, "--json", "--cache-dir", str(tmp_path / "cache"))
    report = json.loads(out)
    assert code == 1 and report["damaged"] == 1, out
    assert "push-pending.json holds url = 123" in report["model_repos"][0]["damaged"][0]["error"]
    assert MlflowClient().get_run(run_id).data.tags.get("oxen.run") == "good"


def test_a_damaged_commit_queue_or_push_marker_is_reported_and_left_sync_goes_on(tmp_path, capsys):
    models = make_repo(tmp_path / "models", [("c", {"a.txt": "1"})])
    cache = tmp_path / "cache"
    register_model_repo(cache, models.path)
    (cache / "model-repos" / "0000000000000000.json").write_text('{"pa')  # a registration cut short
    cut = JobQueue.create(models.path, "r1", {"pid": 1})
    cut.put(1, "checkpoint", {"run": "r1"})
    _cut_short(cut.jobs_dir / "00000001.json")
    listed = JobQueue.create(models.path, "r2", {"pid": 1})
    listed.put(1, "checkpoint", {"run": "r2"})
    (listed.folder / "meta.json").write_text("[]")
    pending_push_path(models.path).write_text('{"remote": "orig')
    before = {q.folder: _files(q.folder) for q in (cut, listed)}
    run_id = _good_journal(cache)

    code, out = _sync(capsys, "--json")
    report = json.loads(out)
    assert code == 1 and report["damaged"] == 3, out
    [repo] = report["model_repos"]
    faults = {Path(d["path"]).name: d["error"] for d in repo["damaged"]}
    assert "jobs/00000001.json is not JSON" in faults[cut.folder.name]
    assert "meta.json holds a JSON array" in faults[listed.folder.name]
    assert "push-pending.json is not JSON" in faults["push-pending.json"]
    assert {q.folder: _files(q.folder) for q in (cut, listed)} == before, "a damaged queue was changed"
    assert MlflowClient().get_run(run_id).data.tags.get("oxen.run") == "good"
