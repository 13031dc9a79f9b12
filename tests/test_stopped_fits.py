"""A Lightning fit stopped from outside (Ctrl-C, SIGTERM): what the lineage and MLflow say it ended as."""

from __future__ import annotations

import json
import os
import signal

import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks.lightning import OxenLightningCallback


class SignalAt(Callback):
    """Sends this process ``sig`` once, after training step ``step`` (a real signal, as a terminal or
    ``kill`` sends it: Lightning's own handlers answer it)."""

    def __init__(self, sig: int, step: int) -> None:
        self.sig, self.step, self.sent = sig, step, False

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.sig)


@pytest.fixture
def signal_handlers():  # type: ignore[no-untyped-def]
    """Python's own handlers for the fit (Lightning adds none where another library, e.g. Ray earlier in
    this test process, left one), and the saved ones back after (Lightning leaves SIGINT ignored)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _stopped_fit(dataset_repo, tmp_path, sig: int, logger=False) -> OxenLightningCallback:  # type: ignore[no-untyped-def]
    """A fit of run ``stopped`` that gets ``sig`` after step 5 (checkpoints at steps 2 and 4)."""
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", run_name="stopped")
    trainer = make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1),
                                      cb, SignalAt(sig, step=5)], epochs=3, logger=logger)
    with pytest.raises(SystemExit):  # Lightning's answer to both: a graceful stop, then exit
        trainer.fit(TinyModel(), datamodule=CsvData(pin))
    return cb


def test_ctrl_c_with_an_mlflow_logger_ends_the_lineage_killed_everywhere_it_is_ours(dataset_repo, tmp_path,
                                                                                  signal_handlers):
    """The lineage record, the model repository's record and the run's oxen.lineage.status tag say
    KILLED, and list the checkpoints saved before the stop. (The MLflow run's own status is the
    logger's: Lightning's MLFlowLogger ends it FAILED on any exception.)"""
    uri = f"sqlite:///{tmp_path / 'logger.db'}"
    logger = MLFlowLogger(experiment_name="ctrl-c", tracking_uri=uri, log_model=False)
    cb = _stopped_fit(dataset_repo, tmp_path, signal.SIGINT, logger=logger)  # "Detected KeyboardInterrupt, ..."
    lineage = cb.lineage
    assert lineage["status"] == "KILLED" and lineage["run"]["mlflow_run_id"] == logger.run_id
    assert [c["step"] for c in lineage["checkpoints"]] == [2, 4]
    assert read_lineage(tmp_path / "models" / "runs" / "stopped" / "lineage.json") == json.loads(json.dumps(lineage))
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.tags["oxen.lineage.status"] == "KILLED"
    assert run.data.tags["oxen.model.commit"] == lineage["model"]["commit"]
    assert run.info.status == "FAILED"  # Lightning's MLFlowLogger.finalize("failed"), after our hook


def test_sigterm_ends_the_run_killed_not_failed(dataset_repo, tmp_path, signal_handlers):
    """`kill`, `docker stop`, a Kubernetes eviction: Lightning stops the fit on SIGTERM (its
    SIGTERMException). Nothing failed: the run was stopped, as by Ctrl-C or `kill -9` (which `sync`
    ends KILLED). It was recorded FAILED, in the model repository and in our own MLflow run."""
    cb = _stopped_fit(dataset_repo, tmp_path, signal.SIGTERM)
    lineage = cb.lineage
    assert lineage["status"] == "KILLED"
    assert [c["step"] for c in lineage["checkpoints"]] == [2, 4]
    assert read_lineage(tmp_path / "models" / "runs" / "stopped" / "lineage.json")["status"] == "KILLED"
    run = MlflowClient().get_run(lineage["run"]["mlflow_run_id"])  # a run of our own: we end it
    assert run.info.status == "KILLED" and run.data.tags["oxen.lineage.status"] == "KILLED"
