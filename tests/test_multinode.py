"""Two nodes x two processes (torchrun --nnodes 2 on loopback, gloo), as on a cluster whose nodes
share a filesystem: each node has its own cache folder, the Oxen repositories are shared. One
dataset commit read by all four ranks, each save committed once, one MLflow run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, make_repo, process_tree
from mlflow import MlflowClient
from test_distributed import _check_each_save_committed_once

SCRIPT = Path(__file__).parent / "hf_torchrun_script.py"


@pytest.mark.timeout(600)
def test_two_nodes_two_processes_each(tmp_path):
    from hf_model import jsonl

    data = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(0, rows=64), "eval.jsonl": jsonl(0, rows=8)}),
                                            ("B", {"train.jsonl": jsonl(1, rows=64)})])
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    nodes = []
    for node in (0, 1):
        env = {**os.environ, "OXEN_CALLBACKS_CACHE": str(tmp_path / f"node{node}-cache")}  # a disk per node
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(SCRIPT), "--dataset", str(data.path), "--model-repo", str(tmp_path / "models"), "--out", str(out)]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errors = [node.communicate(timeout=500)[1] for node in nodes]
    finally:  # the launchers and their ranks (each in a session of its own): none may outlive a failed run
        # (a launcher already reaped is skipped: its pid may belong to another process by now)
        for pid in [p for node in nodes if node.poll() is None for p in process_tree(node.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in nodes:
            node.wait()
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["commit"] for r in ranks] == [data.commits[1]] * 4  # one dataset commit, read by every rank
    assert [r["labels"] for r in ranks] == [[1]] * 4
    for node in (0, 1):  # each node materialized that commit once, into its own cache
        snapshots = [p for p in (tmp_path / f"node{node}-cache" / "snapshots").glob("*/*")
                     if p.is_dir() and not p.name.endswith(".views")]  # (the pin's view of its paths beside it)
        assert [s.name for s in snapshots] == [data.commits[1]]
    lineage = json.loads((out / "lineage.json").read_text())
    saved = sorted(p.name for p in (out / "hf").iterdir() if p.name.startswith("checkpoint-"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    _check_each_save_committed_once(lineage, saved, tmp_path / "models", tmp_path / "read")
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == lineage["run"]["mlflow_run_id"]  # one MLflow run
    assert runs[0].data.tags["oxen.dataset.commit"] == data.commits[1]
    # ended, and naming the final model, when the script leaves (rank 0 waited for it in cb.lineage)
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["oxen.model.commit"] == lineage["model"]["commit"]
