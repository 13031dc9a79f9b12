"""Remote success paths against a live Oxen server: opt-in.

Set ``OXEN_CALLBACKS_TEST_REMOTE=http(s)://HOST[:PORT]/NAMESPACE`` (a namespace where the
token in your Oxen config may create repositories, e.g. a local ``oxen-server``) to run
them. They create two repositories named ``oxen-callbacks-test-<random>`` there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._publish.push import pending_push
from oxen_callbacks.lightning import OxenLightningCallback

REMOTE = os.environ.get("OXEN_CALLBACKS_TEST_REMOTE")
pytestmark = pytest.mark.skipif(not REMOTE, reason="set OXEN_CALLBACKS_TEST_REMOTE=http(s)://HOST/NAMESPACE "
                                                   "to test against a live Oxen server")


@pytest.fixture(autouse=True)
def real_oxen_config(monkeypatch):
    """These tests use the machine's own Oxen config (its auth token for the server)."""
    monkeypatch.delenv("OXEN_CONFIG_DIR", raising=False)


def _create_remote(name: str) -> str:
    scheme, rest = REMOTE.rstrip("/").split("://", 1)
    host, namespace = rest.split("/", 1)
    code = "import sys, oxen; oxen.remote_repo.create_repo(sys.argv[1], host=sys.argv[2], scheme=sys.argv[3])"
    subprocess.run([sys.executable, "-c", code, f"{namespace}/{name}", host, scheme], check=True, timeout=120)
    return f"{REMOTE.rstrip('/')}/{name}"


def _push(local, url: str) -> None:  # type: ignore[no-untyped-def]
    code = "import sys, oxen; r = oxen.Repo(sys.argv[1]); r.set_remote('origin', sys.argv[2]); r.push('origin', 'main')"
    subprocess.run([sys.executable, "-c", code, str(local), url], check=True, timeout=300)


def test_pin_from_remote_and_publish_with_push(dataset_repo, tmp_path):
    data_url = _create_remote(f"oxen-callbacks-test-{uuid.uuid4().hex[:8]}")
    _push(dataset_repo.path, data_url)
    pin = PinnedDataset(data_url, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    assert pin.commit == dataset_repo.commits[0]
    assert pin.file("train.csv").read_bytes() == PinnedDataset(
        dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv"]).file("train.csv").read_bytes()
    assert PinnedDataset(data_url, revision="main").commit == dataset_repo.commits[1]

    models_url = _create_remote(f"oxen-callbacks-test-{uuid.uuid4().hex[:8]}")
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", remote_url=models_url, mlflow=False)
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
        TinyModel(), datamodule=CsvData(pin))
    assert "push" not in cb.lineage and pending_push(tmp_path / "models") is None
    remote_head = PinnedDataset(models_url, revision="main").commit
    assert remote_head == oxen_child.branches(tmp_path / "models")["main"]
