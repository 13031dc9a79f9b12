"""Lightning DDP with 2 CPU processes (gloo): one pull per node, each save committed once, one MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import file_at, free_port
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from mlflow import MlflowClient

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.lightning import OxenLightningCallback

SCRIPT = Path(__file__).parent / "fit_script.py"


def _check_each_save_committed_once(lineage: dict, saved: list[str], model_repo: Path, cache: Path) -> None:
    """Only rank 0 publishes: a save listed twice (by two ranks) would repeat its path and step."""
    entries = lineage["checkpoints"]
    assert len({(c["path"], c["step"]) for c in entries}) == len(entries)
    assert {c["commit"] for c in entries} <= set(LocalRepo(model_repo).commit_ids())
    kept = {Path(c["path"]).name for c in lineage["checkpoints"] if c["kept"]}
    assert kept == set(saved)
    last = lineage["checkpoints"][-1]
    assert file_at(model_repo, last["commit"], last["path"], cache).stat().st_size > 0


def test_ddp_spawn_two_processes(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", experiment_name="ddp-spawn")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [ckpt, cb], epochs=2, strategy="ddp_spawn", devices=2)
    trainer.fit(TinyModel(), datamodule=CsvData(pin))

    lineage = cb.lineage  # read back from the model repo: the fit ran in spawned copies
    assert lineage["dataset"]["commit"] == dataset_repo.commits[0]
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # 96 rows / 2 ranks / batch 16 = 3 steps per epoch, 6 steps, a save every 2 steps
    assert len(saved) == 3
    _check_each_save_committed_once(lineage, saved, tmp_path / "models", tmp_path / "read")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("ddp-spawn").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == lineage["run"]["mlflow_run_id"]
    assert runs[0].data.tags["oxen.dataset.commit"] == dataset_repo.commits[0]
    snapshots = list((tmp_path / "cache" / "snapshots").iterdir())
    assert len(snapshots) == 1  # pulled once for both ranks


@pytest.mark.timeout(600)
def test_ddp_subprocess_two_processes(dataset_repo, tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", "main",
           "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path), "--strategy", "ddp",
           "--devices", "2", "--epochs", "2", "--every-n-steps", "2", "--mlflow", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    lineage = result["lineage"]
    assert lineage["dataset"]["commit"] == dataset_repo.commits[1]
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["commit"] for r in ranks} == {dataset_repo.commits[1]}
    assert ranks[0]["snapshot"] == ranks[1]["snapshot"]
    assert all(r["labels"] == [1] for r in ranks)  # both ranks read the pinned commit (B's labels)
    _check_each_save_committed_once(lineage, result["saved"], tmp_path / "models", tmp_path / "read")
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == lineage["run"]["mlflow_run_id"]


@pytest.mark.timeout(600)
def test_a_rank_that_resolves_another_commit_stops_the_fit_before_a_step(dataset_repo, tmp_path):
    """The branch moves after rank 0 resolved it and before rank 1 does: rank 1 raises
    DatasetMismatchError naming both commits, and nothing is trained or committed."""
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", "main",
           "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path), "--strategy", "ddp",
           "--devices", "2", "--epochs", "2", "--every-n-steps", "2", "--move-branch-in-rank-one"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode != 0
    moved = LocalRepo(dataset_repo.path).resolve("main")  # the commit rank 1 saw
    assert moved not in dataset_repo.commits
    assert "DatasetMismatchError" in proc.stderr
    assert f"Rank 1 resolved dataset commit {moved} but rank 0 resolved {dataset_repo.commits[1]}" in proc.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


@pytest.mark.timeout(600)
def test_hf_trainer_under_torchrun_two_processes(tmp_path):
    from helpers import make_repo
    from hf_model import jsonl

    data = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(0, rows=64), "eval.jsonl": jsonl(0, rows=8)}),
                                            ("B", {"train.jsonl": jsonl(1, rows=64)})])
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(Path(__file__).parent / "hf_torchrun_script.py"), "--dataset", str(data.path),
           "--model-repo", str(tmp_path / "models"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["commit"] for r in ranks] == [data.commits[1]] * 2
    assert [r["labels"] for r in ranks] == [[1], [1]]  # both ranks read the pinned commit's rows
    lineage = json.loads((out / "lineage.json").read_text())
    saved = sorted(p.name for p in (out / "hf").iterdir() if p.name.startswith("checkpoint-"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    _check_each_save_committed_once(lineage, saved, tmp_path / "models", tmp_path / "read")
    client = MlflowClient()  # transformers' MLflowCallback opened the run: one run, ours joined it
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == lineage["run"]["mlflow_run_id"]
    # ended, and naming the final model, when the script leaves (rank 0 waited for it in cb.lineage)
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["oxen.model.commit"] == lineage["model"]["commit"]
    assert runs[0].data.tags["oxen.dataset.commit"] == data.commits[1]
    assert "train_loss" in runs[0].data.metrics or "loss" in runs[0].data.metrics


def test_sharded_folder_checkpoint_is_published_after_every_rank_wrote(dataset_repo, tmp_path):
    from lightning_model import ShardedDDPStrategy

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(tmp_path, [ckpt, cb], epochs=1, devices=2,
                           strategy=ShardedDDPStrategy(start_method="spawn"))
    trainer.fit(TinyModel(), datamodule=CsvData(pin))
    lineage = cb.lineage
    assert [c["step"] for c in lineage["checkpoints"]] == [3]
    entry = lineage["checkpoints"][0]
    snapshot = PinnedDataset(tmp_path / "models", revision=entry["commit"], paths=[entry["path"]],
                             cache_dir=tmp_path / "read")
    shards = sorted(p.name for p in snapshot.file(entry["path"]).iterdir())
    assert shards == ["shard-0.pt", "shard-1.pt"]  # the slow rank's shard made it into the commit
    assert torch.load(snapshot.file(entry["path"] + "/shard-1.pt"))["global_step"] == 3


def test_ddp_spawn_second_fit_of_one_callback_reports_its_own_run(dataset_repo, tmp_path):
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    names = []
    for fit in ("a", "b"):  # each fit runs in a spawned copy of cb; the second draws a new run name there
        ckpt = ModelCheckpoint(dirpath=tmp_path / fit / "ckpt", every_n_train_steps=2, save_top_k=-1)
        make_trainer(tmp_path / fit, [ckpt, cb], epochs=1, strategy="ddp_spawn", devices=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        lineage = cb.lineage
        assert lineage["checkpoints"] and all(c["source"].startswith(str(tmp_path / fit))
                                              for c in lineage["checkpoints"])
        names.append(lineage["run"]["name"])
    assert len(set(names)) == 2
