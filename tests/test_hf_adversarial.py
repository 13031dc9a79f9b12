"""Hugging Face Trainer corner cases: evaluation-driven saves, best-model loading after a resume,
a checkpoint the Trainer's own rotation deletes before ``on_save``."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from helpers import make_repo
from hf_model import jsonl, make_trainer

from oxen_callbacks import PinnedDataset
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.huggingface import OxenTrainerCallback

PATHS = ["train.jsonl", "eval.jsonl"]


@pytest.fixture
def pin(tmp_path):
    repo = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(0), "eval.jsonl": jsonl(0, rows=8, seed=1)})])
    return PinnedDataset(repo.path, revision="main", paths=PATHS)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_a_best_only_save_rewriting_an_earlier_runs_folder_leaves_its_published_copy_alone(pin, tmp_path):
    """save_strategy="best" decides to save after evaluating, after on_step_end: the same script run
    twice into one output_dir rewrites checkpoint-2 in place. The model repository's copy of the
    first run's checkpoint-2 must still hold the first run's bytes, not the second run's."""
    splits = pin.load_dataset()
    records = []
    for seed in (0, 1):
        cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
        trainer, _ = make_trainer(tmp_path / "out", splits["train"], [cb], eval_dataset=splits["eval"], seed=seed,
                                  max_steps=2, save_strategy="best", eval_strategy="steps", eval_steps=2,
                                  metric_for_best_model="eval_loss")
        trainer.train()
        records.append(cb.lineage)
    first = records[0]["checkpoints"][0]
    committed = materialize_checkpoint(tmp_path / "models", commit=first["commit"], path=first["path"]).path
    assert same_files(tmp_path / "models" / first["path"], committed)  # the repository's working tree: run 1's
    second = records[1]["checkpoints"][0]
    assert same_files(materialize_checkpoint(tmp_path / "models", commit=second["commit"], path=second["path"]).path,
                      tmp_path / "out" / "checkpoint-2")
