"""A real MLflow server stopped mid-run, then restarted: training is unaffected and sync completes the lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sync_until_nothing_pending
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from oxen_callbacks import read_lineage
from oxen_callbacks._ops import sync
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.lineage import repo_record

SCRIPT = Path(__file__).parent / "fit_script.py"


@pytest.mark.timeout(600)
def test_mlflow_down_at_fit_end_then_sync(dataset_repo, tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server").start()
    try:
        out = tmp_path / "out.json"
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
        cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision",
               dataset_repo.commits[0], "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path / "fit"),
               "--every-n-steps", "2", "--step-sleep", "0.3", "--mlflow", "--mlflow-timeout", "5",
               "--out", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not client.search_runs(
                [e.experiment_id for e in client.search_experiments()]):
            time.sleep(0.2)  # the run exists: training is under way
        os.killpg(server.proc.pid, signal.SIGKILL)  # the tracking server dies while the model trains
        server.stop()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]  # training is unaffected
        assert "journaled" in err and "oxen-callbacks sync" in err, err[-3000:]

        lineage = json.loads(out.read_text())["lineage"]
        assert set(c["commit"] for c in lineage["checkpoints"]) <= set(LocalRepo(tmp_path / "models").commit_ids())
        report = sync.sync_all()
        # still down: kept, by the sink process still retrying ("busy") or in the journal ("failed")
        assert report["pending"] > 0 and report["mlflow"][0]["status"] in ("busy", "failed")

        server.start()  # back up (same port)
        sync_until_nothing_pending(120, every=2)
        # the server may have died between creating the run and answering: then training never knew the
        # run and sync created it. Either way the repository's record names the one run MLflow keeps.
        record = repo_record(tmp_path / "models", lineage["run"]["name"])
        run_id = record["run"]["mlflow_run_id"]
        assert run_id and lineage["run"]["mlflow_run_id"] in (None, run_id)
        client = MlflowClient(server.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_id for r in runs] == [run_id]  # no twin left behind by the lost answer
        run = client.get_run(run_id)
        assert run.data.tags["oxen.model.commit"] == lineage["model"]["commit"]
        assert run.data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
        assert run.info.status == "FINISHED"
        local = MlflowClient(server.uri).download_artifacts(run.info.run_id, "oxen/lineage.json",
                                                           str(tmp_path / "dl"))
        assert read_lineage(local)["model"] == lineage["model"]
        assert sync.sync_all()["mlflow"] == []  # nothing left to do
    finally:
        server.stop()
