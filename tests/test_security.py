"""No credential ever lands in MLflow, logs, commit messages, lineage files, journals or caches."""

from __future__ import annotations

import logging
import os
import socket

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.errors import ConfigurationError, LineageValidationError
from oxen_callbacks.lightning import OxenLightningCallback

TOKEN = "oxtok_4f9c2e7d1b8a6053SECRET"


def test_a_configured_token_appears_nowhere(dataset_repo, tmp_path, caplog):
    import oxen

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    host = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    auth = tmp_path / "oxen-config" / "auth_config.toml"
    auth.parent.mkdir(parents=True, exist_ok=True)
    oxen.auth.config_auth(TOKEN, host=host, path=str(auth))  # the user's token, in Oxen's own config
    assert TOKEN in auth.read_text()

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", remote_url=f"http://{host}/ox/models",
                               push_timeout=5, experiment_name="secrets")
    with caplog.at_level(logging.DEBUG):
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
    assert cb.lineage["push"]["pushed"] is False  # the push was tried (and failed) with that token configured

    assert TOKEN not in caplog.text
    leaks = []
    for dirpath, _dirs, names in os.walk(tmp_path):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.realpath(path) == str(auth.resolve()) or os.path.islink(path):
                continue  # the user's own config file (and our link to it)
            try:
                if TOKEN.encode() in open(path, "rb").read():
                    leaks.append(path)
            except OSError:
                continue
    assert not leaks  # MLflow store and artifacts, model repo (commits, lineage), journals, worker logs, caches


def test_lineage_paths_are_validated_before_anything_is_read(tmp_path):
    record = {
        "schema": "oxen-callbacks/lineage/v1",
        "dataset": None,
        "model": {"repo": str(tmp_path), "commit": "abc1234", "path": "../../etc/passwd"},
        "checkpoints": [],
        "run": {"mlflow_run_id": None, "mlflow_tracking_uri": None},
        "code": {"git_commit": None, "git_dirty": None},
        "framework": {"name": "x", "version": "1"},
    }
    with pytest.raises(LineageValidationError, match="unsafe path"):
        read_lineage(record)
    with pytest.raises((LineageValidationError, ConfigurationError)):
        materialize_checkpoint(lineage=record)
