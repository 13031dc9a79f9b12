"""A dataset on an Oxen remote, pinned and passed to both callbacks, against a stand-in server on loopback.

``oxen-server`` cannot be installed here; :mod:`oxen_stand_in` answers the requests
oxenai 0.65.1 makes to resolve a revision and download files, so these run the
library's real code and oxenai's real client (see ``test_remote_live.py`` for the
opt-in tests against a real server).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import table
from hf_model import jsonl
from hf_model import make_trainer as make_hf_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient
from oxen_stand_in import StandInOxen, StandInRepo

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._oxen.auth import host_variable
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.cli import main as cli_main
from oxen_callbacks.errors import ConfigurationError, OxenError
from oxen_callbacks.huggingface import OxenTrainerCallback
from oxen_callbacks.lightning import OxenLightningCallback
from oxen_callbacks.pin import Source

# Commit ids as Oxen writes them: hex u128 without zero padding (31 and 32 characters occur).
COMMIT_A = "5d0c4b1e2f3a49586776859a4b3c2d1"
COMMIT_B = "e3b0c44298fc1c149afbf4c8996fb924"
TRAIN_A, VAL_A = table(label=0, seed=0).encode(), table(label=0, seed=1, rows=32).encode()
TRAIN_B = table(label=1, seed=0).encode()


@pytest.fixture
def server() -> Iterator[StandInOxen]:
    """The stand-in with ``ox/reviews``: commit A (labels 0) then B (labels 1) on ``main``."""
    stand_in = StandInOxen()
    repo = StandInRepo()
    repo.commit(COMMIT_A, {"train.csv": TRAIN_A, "val.csv": VAL_A, "train.jsonl": jsonl(0).encode()})
    repo.commit(COMMIT_B, {"train.csv": TRAIN_B, "val.csv": VAL_A})
    stand_in.repos["ox/reviews"] = repo
    stand_in.start()
    yield stand_in
    stand_in.stop()


def test_remote_pin_resolves_to_the_commit_the_server_names(server):
    pin = PinnedDataset(server.url("ox/reviews"), revision="main", paths=["train.csv", "val.csv"])
    assert pin.commit == COMMIT_B
    assert PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["train.csv"]).commit == COMMIT_A
    assert pin.to_lineage() == {"repo": server.url("ox/reviews"), "revision": "main", "commit": COMMIT_B,
                                "paths": ["train.csv", "val.csv"], "dirty": False}
    assert pin.source.local_root is None


def test_two_repositories_whose_names_read_alike_share_no_snapshot(server):
    """``ml-team/data`` and ``ml/team-data`` made one cache folder: a pin of the second read the snapshot
    of the first wherever both name a commit id (a fork, a server that says so)."""
    tables = {"ml-team/data": table(label=0, seed=0).encode(), "ml/team-data": table(label=1, seed=0).encode()}
    for repo_id, train in tables.items():
        server.repos[repo_id] = StandInRepo()
        server.repos[repo_id].commit(COMMIT_A, {"train.csv": train})
    for repo_id, train in tables.items():
        assert PinnedDataset(server.url(repo_id), revision=COMMIT_A, paths=["train.csv"]).file("train.csv").read_bytes() == train


def test_local_and_remote_sources_offer_the_source_protocol(server, dataset_repo):
    local = PinnedDataset(dataset_repo.path, paths=["train.csv"]).source
    remote = PinnedDataset(server.url("ox/reviews"), paths=["train.csv"]).source
    assert isinstance(local, Source) and isinstance(remote, Source)
    assert (local.local_root, remote.local_root) == (dataset_repo.path, None)
    assert remote.location == server.url("ox/reviews") and local.location == str(dataset_repo.path)


def test_both_callbacks_take_a_remote_dataset(server, tmp_path):
    pin = PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["train.jsonl"])
    hf = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "hf-models", mlflow=False)
    lightning = OxenLightningCallback(dataset=server.url("ox/reviews"), revision="main", paths=["train.csv"],
                                      model_repo=tmp_path / "pl-models", mlflow=False)
    assert hf.dataset is pin
    assert lightning.dataset is not None and lightning.dataset.commit == COMMIT_B


def test_hf_trainer_trains_on_a_remote_pin(server, tmp_path):
    pin = PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["train.jsonl"])
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, collator = make_hf_trainer(tmp_path / "out", pin.load_dataset(split="train"), [cb],
                                        max_steps=2, save_steps=2)
    trainer.train()
    assert set(collator.labels) == {0}
    assert cb.lineage["dataset"] | {"repo": server.url("ox/reviews"), "commit": COMMIT_A} == cb.lineage["dataset"]
    assert [c["step"] for c in cb.lineage["checkpoints"]] == [2]


def test_unknown_revision_repository_or_path_is_named(server, tmp_path):
    with pytest.raises(ConfigurationError, match=r"Revision 'release-9' was not found in http://127\.0\.0\.1:\d+/ox/"
                                                 r"reviews\.\nHINT: pass a branch name or a commit id"):
        OxenLightningCallback(dataset=server.url("ox/reviews"), revision="release-9", model_repo=tmp_path / "m")
    with pytest.raises(ConfigurationError, match=r"remote repository http://127\.0\.0\.1:\d+/ox/nope does not exist"):
        PinnedDataset(server.url("ox/nope"), revision="main")
    with pytest.raises(ConfigurationError, match=rf"Path 'test.csv' is not in commit {COMMIT_A} of http://"):
        PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["test.csv"]).pull()


def test_server_that_stops_answering_fails_clearly_in_bounded_time(server):
    server.mute.add("branches")  # the repository lookup is answered, the branch lookup never is
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"Could not resolve revision 'main' at http://127\.0\.0\.1:\d+/ox/"
                                                 r"reviews: no answer within 2s"):
        PinnedDataset(server.url("ox/reviews"), revision="main", remote_timeout=2)
    print(f"mute server: failed after {time.monotonic() - started:.1f}s")


def test_bytes_unlike_the_hash_the_server_lists_are_never_pinned(server, tmp_path):
    """oxenai checks each download against the file's hash in the server's listing: an altered download
    is fetched again, and a server whose copy stays damaged fails the pin at the second try, naming it, with nothing cached."""
    server.altered["train.csv"] = [b"label,x\n9,9\n"]  # one download rewritten on its way (a proxy)
    pin = PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["train.csv"], cache_dir=tmp_path / "a")
    assert pin.file("train.csv").read_bytes() == TRAIN_A
    pin.verify(deep=True)

    server.altered["val.csv"] = [VAL_A[:-10]] * 2  # the server's stored copy is cut short: every try
    damaged = PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["val.csv"], cache_dir=tmp_path / "b")
    with pytest.raises(OxenError, match=r"Could not download 'val.csv' of commit " + COMMIT_A + r" at http://127\.0\.0"
                                        r"\.1:\d+/ox/reviews: twice the server sent bytes whose hash \(\w+\) is not "
                                        r"the one it lists for that file \(\w+\)\. Its stored copy may be damaged"):
        damaged.pull()
    assert not damaged.is_pulled
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file() and p.read_bytes() == VAL_A[:-10]]


def test_server_that_refuses_fails_clearly(server):
    url = server.url("ox/reviews")
    server.stop()
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"Could not resolve revision 'main' at http://127\.0\.0\.1:\d+/ox/"
                                                 r"reviews: .*Network error.*\nHINT: check the host"):
        PinnedDataset(url, revision="main", remote_timeout=5)
    print(f"refusing server: failed after {time.monotonic() - started:.1f}s (retries with backoff)")


def test_fit_on_remote_pin_reads_its_commit_and_lineage_names_the_remote(server, tmp_path):
    token = "oxtok_stand_in_secret_7f3a"
    _configure_auth(token, server.host)
    url = server.url("ox/reviews")
    pin = PinnedDataset(url, revision=COMMIT_A, paths=["train.csv", "val.csv"])
    server.repos["ox/reviews"].commit("0f1e2d3c4b5a69788796a5b4c3d2e1f0", {"train.csv": TRAIN_B})  # main moves on
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", experiment_name="remote-data")
    model = TinyModel()
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
        model, datamodule=CsvData(pin))

    assert model.labels_seen == {0}  # commit A's rows, downloaded by commit id
    assert pin.file("train.csv").read_bytes() == TRAIN_A and pin.file("val.csv").read_bytes() == VAL_A
    downloads = [r.path for r in server.requests if "/file/" in r.path]
    assert sorted(downloads) == [f"/api/repos/ox/reviews/file/{COMMIT_A}/{p}" for p in ("train.csv", "val.csv")]
    assert all(r.headers.get("authorization") == f"Bearer {token}" for r in server.requests)

    expected = {"repo": url, "revision": COMMIT_A, "commit": COMMIT_A, "paths": ["train.csv", "val.csv"]}
    record = cb.lineage
    assert record["dataset"] | expected == record["dataset"]
    committed = read_lineage(tmp_path / "models" / "runs" / record["run"]["name"] / "lineage.json")
    assert committed["dataset"] | expected == committed["dataset"]
    run = MlflowClient().get_run(record["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["oxen.dataset.repo"], run.data.tags["oxen.dataset.commit"]) == (url, COMMIT_A)
    artifact = read_lineage(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="oxen/lineage.json", dst_path=str(tmp_path / "dl")))
    assert artifact["dataset"] | expected == artifact["dataset"]
    # the token the client sent is in Oxen's auth config only (the worker's identity folder links to it):
    # no record, tag, journal, MLflow store, snapshot or commit holds it
    config = Path(os.environ["OXEN_CONFIG_DIR"]).resolve()
    holders = {p.resolve() for p in tmp_path.rglob("*") if p.is_file() and token.encode() in p.read_bytes()}
    assert holders == {config / "auth_config.toml"}


def test_a_server_a_record_names_never_gets_the_key_for_every_host(server, tmp_path, monkeypatch, caplog):
    """``OXEN_API_KEY`` is the token for every server the user pins from. A lineage record names its
    dataset's server, and anyone who can write a record can name theirs: ``reproduce``, ``diff``, a
    recorded dataset pinned again (``pinned_dataset()``, MLflow's dataset source) send a token for that
    host only, never the key for every host."""
    every_host, this_host = "oxtok_every_host_secret_91c2", "oxtok_this_host_secret_4d7e"
    monkeypatch.setenv("OXEN_API_KEY", every_host)
    pin = PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, run_name="remote-data")
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(TinyModel(),
                                                                                          datamodule=CsvData(pin))
    assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {every_host}"}  # a pin of yours

    def sent_while(action: Callable[[], object]) -> set[str | None]:
        server.requests.clear()
        action()
        return {r.headers.get("authorization") for r in server.requests}

    def reproduce(kit: str) -> None:
        assert cli_main(["reproduce", "remote-data", "--to", str(tmp_path / kit), "--model-repo",
                         str(tmp_path / "models"), "--cache-dir", str(tmp_path / f"cache-{kit}")]) == 0

    assert sent_while(lambda: reproduce("kit1")) == {None}
    assert (tmp_path / "kit1" / "data" / "train.csv").read_bytes() == TRAIN_A
    assert f"Not sending OXEN_API_KEY to {server.host}: a record named that server" in caplog.text
    checkpoint = materialize_checkpoint(tmp_path / "models", run="remote-data")
    assert sent_while(lambda: checkpoint.pinned_dataset(cache_dir=tmp_path / "cache-again").pull()) == {None}

    # a record naming its model repository there: materialize_checkpoint(lineage=) reads what it names
    record = read_lineage(tmp_path / "models" / "runs" / "remote-data" / "lineage.json")
    named = {**record, "model": {**record["model"], "repo": server.url("ox/reviews"), "commit": COMMIT_A,
                                 "path": "train.csv"}}
    got = []
    assert sent_while(lambda: got.append(materialize_checkpoint(lineage=named, cache_dir=tmp_path / "c3"))) == {None}
    assert got[0].path.read_bytes() == TRAIN_A

    monkeypatch.setenv(host_variable(server.host), this_host)  # the user names that server's own token
    assert sent_while(lambda: reproduce("kit2")) == {f"Bearer {this_host}"}


def _configure_auth(token: str, host: str) -> None:
    """Oxen's own auth config for ``host`` (how users give a token), written by oxenai in a child."""
    code = "import sys, oxen.auth; oxen.auth.config_auth(sys.argv[1], host=sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, token, host], check=True, timeout=60, capture_output=True)


def test_a_server_answering_a_path_or_another_commit_is_refused(server, tmp_path):
    """A commit id names folders of the snapshot cache: a hostile server's answer is checked, not trusted."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    os.chmod(victim / "notes.txt", 0o600)
    hostile = server.repos["ox/reviews"]
    hostile.commit(str(victim), {"train.csv": TRAIN_A}, branch="evil")
    with pytest.raises(ConfigurationError, match="is not an Oxen commit id"):
        PinnedDataset(server.url("ox/reviews"), revision="evil", paths=["train.csv"]).pull()
    assert os.listdir(victim) == ["notes.txt"] and (victim / "notes.txt").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("victim")) == ["victim"]

    hostile.branches[COMMIT_A] = COMMIT_B  # "the commit you asked for is that other one"
    with pytest.raises(ConfigurationError, match=f"answered commit {COMMIT_B} for commit id {COMMIT_A}"):
        PinnedDataset(server.url("ox/reviews"), revision=COMMIT_A, paths=["train.csv"])
