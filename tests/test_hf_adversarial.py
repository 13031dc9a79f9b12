"""Hugging Face Trainer corner cases: evaluation-driven saves, best-model loading after a resume,
a checkpoint the Trainer's own rotation deletes before ``on_save``."""

from __future__ import annotations

import contextlib
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SUBREAPER, commit_files, make_repo, process_tree
from hf_model import jsonl, make_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.errors import ConfigurationError
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


class StopAt(TrainerCallback):
    """The job is cut off after ``step`` (a wall-clock limit): train() returns, to be resumed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_training_stop = True


def test_load_best_model_at_end_after_a_resume_records_the_best_checkpoint_it_loaded(pin, tmp_path):
    """The run is resumed under its name; the best evaluation came before the cut. The Trainer ends
    holding checkpoint-2's weights: the lineage's model (and MLflow's best model) must be checkpoint-2,
    not the last checkpoint saved."""
    splits = pin.load_dataset()
    args = dict(eval_dataset=splits["eval"], max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                learning_rate=1e-2)  # the loss falls: "greater is better" makes step 2 the best
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", run_name="r")
    trainer, _ = make_trainer(tmp_path / "out", splits["train"], [cb, StopAt(4)], **args)
    trainer.train()
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", run_name="r")
    trainer, _ = make_trainer(tmp_path / "out", splits["train"], [cb], **args)
    trainer.train(resume_from_checkpoint=True)

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    loaded = trainer.model.state_dict()
    assert all(torch.equal(w, loaded[k]) for k, w in load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors").items())
    record = cb.lineage
    assert [c["step"] for c in record["checkpoints"]] == [2, 4, 6]
    assert record["model"]["path"] == "runs/r/checkpoints/checkpoint-2"
    assert record["model"]["commit"] == record["checkpoints"][0]["commit"]
    import mlflow

    experiment = mlflow.get_run(record["run"]["mlflow_run_id"]).info.experiment_id
    [best] = mlflow.search_logged_models(experiment_ids=[experiment], filter_string="tags.`oxen.model.best` = 'true'",
                                         output_format="list")
    assert best.tags["oxen.model.path"] == "runs/r/checkpoints/checkpoint-2"


def test_load_best_model_at_end_after_a_resume_into_a_new_run_records_the_earlier_runs_best(pin, tmp_path):
    """Resumed without its run name (a new run, which records `resumed_from`), the best evaluation came
    before the cut: the Trainer ends holding checkpoint-2 of the run it resumed from. The lineage's
    model must be that checkpoint (its commit and path), not the new run's last save."""
    splits = pin.load_dataset()
    args = dict(eval_dataset=splits["eval"], max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                learning_rate=1e-2)  # the loss falls: "greater is better" makes step 2 the best
    first = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", splits["train"], [first, StopAt(4)], **args)
    trainer.train()
    [earlier] = [c for c in first.lineage["checkpoints"] if c["step"] == 2]
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", splits["train"], [cb], **args)
    trainer.train(resume_from_checkpoint=True)

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    record = cb.lineage
    assert record["run"]["name"] != first.lineage["run"]["name"] and [c["step"] for c in record["checkpoints"]] == [6]
    assert (record["model"]["commit"], record["model"]["path"]) == (earlier["commit"], earlier["path"])
    weights = materialize_checkpoint(tmp_path / "models", commit=record["model"]["commit"], path=record["model"]["path"],
                                     cache_dir=tmp_path / "read")
    loaded = trainer.model.state_dict()
    assert all(torch.equal(w, loaded[k]) for k, w in load_file(Path(weights.path) / "model.safetensors").items())


def test_a_save_the_trainers_rotation_deleted_at_once_does_not_stop_training(pin, tmp_path):
    """Where mtimes look unreliable (within 1 s: a fast rerun, a FUSE mount) save_total_limit orders
    checkpoints by step, so a leftover checkpoint-4 of an earlier run outranks a new checkpoint-2,
    which the Trainer deletes before on_save. Nothing is left to commit; training must go on."""
    splits = pin.load_dataset()
    first = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", splits["train"], [first], max_steps=4, save_steps=2)
    trainer.train()

    class MtimesWithinASecond(TrainerCallback):
        """Just before the step-2 save (and its rotation): the leftover folders look as new as it."""

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 2:
                soon = time.time() + 0.5
                for folder in (tmp_path / "out").iterdir():
                    os.utime(folder, (soon, soon))

    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", splits["train"], [cb, MtimesWithinASecond()], seed=1, max_steps=4,
                              save_steps=2, save_total_limit=1)
    trainer.train()

    assert trainer.state.global_step == 4 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-4"]
    record = cb.lineage
    assert record["status"] == "FINISHED" and [c["step"] for c in record["checkpoints"]] == [4]
    saved = record["checkpoints"][0]
    assert same_files(materialize_checkpoint(tmp_path / "models", commit=saved["commit"], path=saved["path"]).path,
                      tmp_path / "out" / "checkpoint-4")


KILLED_FIT_A = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from helpers import process_tree, stop_processes
from hf_model import make_trainer
from transformers import TrainerCallback
from oxen_callbacks import PinnedDataset
from oxen_callbacks.huggingface import OxenTrainerCallback

class CommitsStuckThenKilled(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # the commit worker hangs (a hung mount, a starved node)...
            worker = cb.run.publisher.worker_pid
            stopped = stop_processes(lambda: process_tree(worker))
            open(sys.argv[4], "w").write(" ".join(map(str, stopped)))

    def on_save(self, args, state, control, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # ...and the trainer is killed right after its first save

pin = PinnedDataset(sys.argv[2], revision="main", paths=["train.jsonl", "eval.jsonl"])
cb = OxenTrainerCallback(dataset=pin, model_repo=sys.argv[3], mlflow=False, run_name="nightly")
trainer, _ = make_trainer(sys.argv[5], pin.load_dataset()["train"], [cb, CommitsStuckThenKilled()], max_steps=4,
                          save_steps=2)
trainer.train()
"""


def test_continuing_a_run_whose_checkpoints_are_still_queued_keeps_its_dataset(tmp_path):
    """Run `nightly` is killed with its first checkpoint queued, not committed. Continued under its name
    on another dataset commit (allow_dataset_change=True), it must be refused before a step, as it is once
    a record is committed: otherwise the late commit and the new fit name two datasets in one run."""
    repo = make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(0), "eval.jsonl": jsonl(0, rows=8, seed=1)})])
    models, out, stopped_file = tmp_path / "models", tmp_path / "out", tmp_path / "stopped"
    wrapper = subprocess.Popen([sys.executable, "-c", SUBREAPER, sys.executable, "-c", KILLED_FIT_A,
                                str(Path(__file__).parent), str(repo.path), str(models), str(stopped_file), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and wrapper.poll() is None:
            stopped = [int(p) for p in stopped_file.read_text().split()] if stopped_file.is_file() else []
            if stopped and (out / "checkpoint-2").is_dir() and len(process_tree(wrapper.pid)) == 1 + len(stopped):
                break  # A is dead; its stopped worker is left, with the wrapper as its parent
            time.sleep(0.1)
        assert stopped and not (models / "runs" / "nightly" / "lineage.json").exists()  # queued only

        commit_files(repo, "B", {"train.jsonl": jsonl(1)})
        pin_b = PinnedDataset(repo.path, revision="main", paths=PATHS)
        second = OxenTrainerCallback(dataset=pin_b, model_repo=models, mlflow=False, run_name="nightly",
                                     allow_dataset_change=True)
        trainer, collator = make_trainer(out, pin_b.load_dataset()["train"], [second], max_steps=4, save_steps=2)
        with pytest.raises(ConfigurationError,
                           match=f"dataset commit {repo.commits[0]}; continuing it on {repo.commits[1]}"):
            trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
        assert collator.labels == []  # refused before any step
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        wrapper.wait(timeout=120)  # A's worker catches up and exits: the run's record is A's, on A's dataset
    record = read_lineage(models / "runs" / "nightly" / "lineage.json")
    assert record["dataset"]["commit"] == repo.commits[0] and [c["step"] for c in record["checkpoints"]] == [2]


@pytest.mark.parametrize("damage", [b'{"run": {"name": "nigh', b"\xff\xfe\x00garbage"])
def test_continuing_a_run_whose_record_is_damaged_is_refused_before_a_step(pin, tmp_path, damage):
    """The committed record of run `nightly` was cut off (a full disk) or overwritten: continuing the run
    under its name cannot tell which dataset it was trained on. A clear refusal, not a JSON traceback."""
    models = tmp_path / "models"
    first = OxenTrainerCallback(dataset=pin, model_repo=models, mlflow=False, run_name="nightly")
    trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [first], max_steps=2, save_steps=2)
    trainer.train()
    assert first.lineage["status"] == "FINISHED"  # (waits for the final lineage commit)
    record = models / "runs" / "nightly" / "lineage.json"
    record.write_bytes(damage)

    again = OxenTrainerCallback(dataset=pin, model_repo=models, mlflow=False, run_name="nightly")
    trainer, collator = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [again], max_steps=4, save_steps=2)
    with pytest.raises(ConfigurationError, match=r"(?s)Run 'nightly' cannot be continued: its lineage record "
                                                 rf"{record} cannot be read.*HINT: restore the file"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert collator.labels == []  # refused before any step


def test_a_resume_from_a_checkpoint_a_continued_run_saved_twice_names_no_commit_it_cannot_tell(pin, tmp_path,
                                                                                               caplog):
    """Run `nightly` saves checkpoint-4, is continued from checkpoint-2 and saves checkpoint-4 again. A new
    run resuming from the first one (read back by commit) recorded the second's commit: weights it
    never read (found by an adversarial review). The Trainer does not tell the callback which folder it
    read: with two candidates, no commit is named rather than a wrong one."""
    train = pin.load_dataset()["train"]
    models = tmp_path / "models"
    first = OxenTrainerCallback(dataset=pin, model_repo=models, run_name="nightly", mlflow=False)
    make_trainer(tmp_path / "out", train, [first], max_steps=4)[0].train()
    first4 = next(c for c in first.lineage["checkpoints"] if c["step"] == 4)
    again = OxenTrainerCallback(dataset=pin, model_repo=models, run_name="nightly", mlflow=False)
    make_trainer(tmp_path / "out2", train, [again], max_steps=4, max_grad_norm=1e-4)[0].train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert len({c["commit"] for c in again.lineage["checkpoints"] if c["step"] == 4}) == 2

    read = materialize_checkpoint(models, commit=first4["commit"], path=first4["path"])
    new = OxenTrainerCallback(dataset=pin, model_repo=models, mlflow=False)
    make_trainer(tmp_path / "out3", train, [new], max_steps=6)[0].train(resume_from_checkpoint=str(read.path))
    resumed = new.lineage["resumed_from"]
    assert resumed["run_name"] == "nightly" and resumed["step"] == 4 and resumed["commit"] is None
    assert "saved checkpoint-4 at step 4 more than once" in caplog.text


def test_two_oxen_callbacks_on_one_trainer_are_refused_before_a_step(pin, tmp_path):
    """Both committed every checkpoint, and shared one resume state in it: a resume gave one run the
    other's record (and skipped the dataset check of a callback without a dataset)."""
    train = pin.load_dataset()["train"]
    callbacks = [OxenTrainerCallback(dataset=pin, model_repo=tmp_path / f"models{n}", mlflow=False) for n in (1, 2)]
    trainer, collator = make_trainer(tmp_path / "out", train, callbacks, max_steps=2)
    with pytest.raises(ConfigurationError, match="Two OxenTrainerCallbacks are on this Trainer"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-2").exists()
    assert callbacks[0].run.finished and callbacks[0].lineage["status"] == "FAILED"  # (not left RUNNING)
    trainer.remove_callback(callbacks[1])
    trainer.train()  # one is fine, on the same Trainer
    assert [c["step"] for c in callbacks[0].lineage["checkpoints"]] == [2]


def test_a_continued_runs_best_is_the_whole_runs_across_train_calls(pin, tmp_path):
    """Two train() calls in one MLflow run (one Oxen run), each with metric_for_best_model: the second
    Trainer knows only its own evaluations, so the run's model and its MLflow best mark named the second
    train()'s best though the first's was better (found by a review of the Lightning fix)."""
    import mlflow

    splits = pin.load_dataset()
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", run_name="r")
    args = dict(eval_dataset=splits["eval"], eval_strategy="steps", metric_for_best_model="eval_loss",
                greater_is_better=True)  # the loss falls as it learns: "greater is better" makes the untrained best
    with mlflow.start_run() as active:
        first, _ = make_trainer(tmp_path / "a", splits["train"], [cb], max_steps=4, save_steps=2, eval_steps=2,
                                learning_rate=0.0, **args)  # learns nothing: its loss stays the highest
        first.train()
        second, _ = make_trainer(tmp_path / "b", splits["train"], [cb], max_steps=6, save_steps=3, eval_steps=3,
                                 learning_rate=1e-2, **args)
        second.train()
    assert Path(second.state.best_model_checkpoint).name == "checkpoint-3"  # (the Trainer's own, of this train())
    record = cb.lineage
    best = next(c for c in record["checkpoints"] if c["path"] == record["model"]["path"])
    assert best["source"] == str(tmp_path / "a" / "checkpoint-2") and record["model"]["best"] is True
    assert record["run"]["mlflow_run_id"] == active.info.run_id
    experiment = mlflow.get_run(active.info.run_id).info.experiment_id
    [marked] = mlflow.search_logged_models(experiment_ids=[experiment], filter_string="tags.`oxen.model.best` = 'true'",
                                           output_format="list")
    assert (marked.tags["oxen.model.commit"], marked.tags["oxen.model.path"]) == (best["commit"], best["path"])
