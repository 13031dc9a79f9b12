"""Two training processes publishing into one model repository at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks._publish.batches import Batches
from oxen_callbacks._publish.publisher import CheckpointPublisher
from oxen_callbacks.lineage import new_record

SCRIPT = Path(__file__).parent / "fit_script.py"


def test_two_fits_into_one_model_repo_both_complete(dataset_repo, tmp_path):
    procs = []
    for name in ("alpha", "beta"):
        root = tmp_path / name
        root.mkdir()
        cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
               "--model-repo", str(tmp_path / "models"), "--root", str(root), "--run-name", name,
               "--every-n-steps", "1", "--out", str(root / "out.json")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    repo = LocalRepo(tmp_path / "models")
    commits = set(repo.commit_ids())
    for name in ("alpha", "beta"):
        out = json.loads((tmp_path / name / "out.json").read_text())
        lineage = out["lineage"]
        assert lineage["status"] == "FINISHED"
        # 3 epochs x 6 steps, one save per step (+ last.ckpt each time)
        assert len(lineage["checkpoints"]) == 18 * 2
        assert all(c["commit"] in commits for c in lineage["checkpoints"])
        names = {Path(c["path"]).name for c in lineage["checkpoints"] if c["kept"]}
        assert names == set(out["saved"])
        assert all(c["path"].startswith(f"runs/{name}/") for c in lineage["checkpoints"])
    on_disk = {p.name for p in (repo.path / "runs").iterdir()}
    assert on_disk == {"alpha", "beta"}


def test_a_pause_in_saving_frees_the_model_repo_for_the_users_own_oxen_commands(tmp_path):
    """Commits hold the repository only while saves keep coming: after a pause the user's own
    ``oxen`` command (another process, outside our locks) commits there, and publishing goes on."""
    pub = CheckpointPublisher(model_repo=tmp_path / "models", run="r", cache_dir=tmp_path / "cache")
    record = new_record(dataset=None, model_repo=str(pub.repo.path), framework={"name": "test", "version": "0"})
    try:
        for step in (1, 2):  # a burst: both served by the same commit process
            ckpt = tmp_path / f"step{step}.ckpt"
            ckpt.write_bytes(os.urandom(4096))
            pub.submit_checkpoint(ckpt, record=record, step=step, epoch=0)
        assert pub.flush(timeout=60)
        time.sleep(Batches.IDLE_S + 1.0)

        (pub.repo.path / "NOTES.md").write_text("trained on the March data\n")
        (tmp_path / "oxen-config").mkdir(exist_ok=True)  # the user's identity, as `oxen config` writes it
        (tmp_path / "oxen-config" / "user_config.toml").write_text('name = "Ada"\nemail = "ada@example.com"\n')
        users_own = subprocess.run(  # plain oxenai, as the user's `oxen add` / `oxen commit` would
            [sys.executable, "-c", "import oxen, sys; r = oxen.Repo(sys.argv[1]); r.add(sys.argv[2]); "
             "print(r.commit('notes').id)", str(pub.repo.path), str(pub.repo.path / "NOTES.md")],
            capture_output=True, text=True, timeout=60)
        assert users_own.returncode == 0, users_own.stderr[-2000:]
        users_commit = users_own.stdout.strip().splitlines()[-1]

        ckpt = tmp_path / "step3.ckpt"
        ckpt.write_bytes(os.urandom(4096))
        pub.submit_checkpoint(ckpt, record=record, step=3, epoch=0)
        assert pub.flush(timeout=60)
    finally:
        pub.close()
    history = [c["id"] for c in oxen_child.log(pub.repo.path)]
    ours = [r["commit"] for r in pub.results if r["kind"] == "checkpoint"]
    assert history.index(ours[2]) < history.index(users_commit) < history.index(ours[1])
    assert (pub.repo.path / "NOTES.md").read_text() == "trained on the March data\n"


def test_a_branch_moving_while_a_pin_resolves_it_is_not_damage(dataset_repo):
    """A pipeline commits while a fit starts: the commit ids were read before the branches were
    listed, so the new head looked like one the repository lacks ("looks damaged, clone again")."""
    path = dataset_repo.path
    moved: list[str] = []

    def branches_during_a_commit() -> dict[str, str]:
        (path / "other.csv").write_text("x\nnew\n")
        moved.append(oxen_child.commit_paths(path, ["other.csv"], "pipeline", author=("P", "p@example.com")))
        return oxen_child.branches(path)

    assert LocalRepo(path).resolve("main", branches=branches_during_a_commit) == moved[0]


def test_two_syncs_at_once_replay_a_journal_once(tmp_path, monkeypatch):
    """Each `sync` used to check the journal's lock without taking it: two at once both replayed an
    abandoned run, and the second made a second MLflow run left RUNNING for good."""
    import threading

    from oxen_callbacks._mlflow.journal import MlflowJournal
    from oxen_callbacks._ops import sync

    journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})
    journal.put(1, {"op": "set_tags", "tags": {"a": "b"}})
    replaying, release, replays = threading.Event(), threading.Event(), []

    def slow_replay(j):  # type: ignore[no-untyped-def]
        replays.append(j.folder)
        replaying.set()
        release.wait(30)
        return 1

    monkeypatch.setattr("oxen_callbacks._mlflow.apply.replay", slow_replay)
    first: list = []
    thread = threading.Thread(target=lambda: first.extend(sync._replay_all(tmp_path / "cache")))
    thread.start()
    assert replaying.wait(30)
    second = sync._replay_all(tmp_path / "cache")  # while the first one replays
    release.set()
    thread.join(30)
    assert second == [{"journal": journal.folder.name, "status": "busy"}]
    assert [e["status"] for e in first] == ["done"] and len(replays) == 1
    assert sync._replay_all(tmp_path / "cache") == [] and not journal.folder.exists()


def test_a_run_name_being_looked_at_is_not_in_use(tmp_path):
    """`trace`/`lineage` ask whether a run is live by trying its claim's lock for an instant; a fit
    claiming the name in that instant was refused ("in use: process ...", the dead owner's pid), a
    requeued or resumed job failing to start. A process that looks at the claim in a loop stands in."""
    from oxen_callbacks._publish.claim import RunClaim, claim_path, run_in_use

    models = tmp_path / "models"
    RunClaim.take(models, "nightly", continuing=False).release()  # the claim file exists, as after a run
    assert claim_path(models, "nightly").exists() and not run_in_use(models, "nightly")
    looker = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom oxen_callbacks._publish.claim import run_in_use\n"
                               "end = time.monotonic() + 60\nwhile time.monotonic() < end: run_in_use(sys.argv[1], 'nightly')",
                               str(models)])
    try:
        time.sleep(1.0)  # (its imports done: it looks now)
        for _ in range(200):
            RunClaim.take(models, "nightly", continuing=True).release()
    finally:
        looker.kill()
        looker.wait()
