"""Real Hugging Face Trainer runs with the Oxen callback: pinned datasets, committed checkpoints, resume, MLflow."""

from __future__ import annotations

import filecmp
import json
import runpy
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import commit_files, make_repo
from hf_model import jsonl, make_tokenizer, make_trainer, tokenize
from mlflow import MlflowClient
from transformers import TrainerCallback

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._data.hf_datasets import dataset_commits
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._oxen.repo import LocalRepo
from oxen_callbacks.checkpoints import materialize_checkpoint
from oxen_callbacks.errors import ConfigurationError, DatasetMismatchError
from oxen_callbacks.huggingface import OxenTrainerCallback

PATHS = ["train.jsonl", "eval.jsonl"]


@pytest.fixture
def reviews(tmp_path):
    """A dataset repository at commit A: every label 0 (commit B, when a test adds it, has only 1s)."""
    return make_repo(tmp_path / "reviews", [("A", {"train.jsonl": jsonl(0), "eval.jsonl": jsonl(0, rows=8, seed=1)})])


class FolderSpy(TrainerCallback):
    """Copies each checkpoint folder as the Trainer saved it (save_total_limit deletes it later)."""

    def __init__(self, into: Path) -> None:
        self.into = into

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        name = f"checkpoint-{state.global_step}"
        shutil.copytree(Path(args.output_dir) / name, self.into / name)


def same_tree(a: Path, b: Path) -> bool:
    """Same file names, same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def writable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IWUSR)


def test_trains_on_the_pinned_commit_while_the_branch_moves(reviews, tmp_path):
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    splits = pin.load_dataset()
    commit_b = commit_files(reviews, "B", {"train.jsonl": jsonl(1)})  # the branch moves before train()
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, collator = make_trainer(tmp_path / "out", splits["train"], [cb], eval_dataset=splits["eval"],
                                     max_steps=4, save_steps=4)
    trainer.train()

    assert set(collator.labels) == {0}  # commit A's rows; main's head B holds only label 1
    assert oxen_child.branches(reviews.path)["main"] == commit_b
    assert cb.lineage["dataset"] | {"commit": reviews.commits[0], "revision": "main", "paths": PATHS} \
        == cb.lineage["dataset"]
    assert cb.lineage["framework"]["name"] == "transformers"


def test_every_save_is_committed_whole_despite_save_total_limit(reviews, tmp_path):
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [cb, FolderSpy(tmp_path / "seen")],
                              max_steps=6, save_steps=2, save_total_limit=1)
    trainer.train()

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-6"]  # rotation deleted 2 and 4
    record = cb.lineage
    assert [(c["step"], c["kept"]) for c in record["checkpoints"]] == [(2, False), (4, False), (6, True)]
    commits = set(LocalRepo(tmp_path / "models").commit_ids())
    for entry in record["checkpoints"]:
        assert entry["commit"] in commits
        ckpt = materialize_checkpoint(tmp_path / "models", commit=entry["commit"], path=entry["path"])
        # model, optimizer, scheduler, RNG, trainer state...: all of them, byte for byte
        assert same_tree(ckpt.path, tmp_path / "seen" / Path(entry["path"]).name)
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= \
            {p.name for p in ckpt.path.iterdir()}
        assert ckpt.dataset["commit"] == reviews.commits[0]
    assert record["model"]["path"].endswith("/checkpoint-6")


def test_resume_from_a_materialized_commit_continues_training(reviews, tmp_path):
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    first = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, run_name="first")
    trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [first], max_steps=4, save_steps=2)
    trainer.train()
    uninterrupted = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    ckpt = materialize_checkpoint(tmp_path / "models", run="first", step=2)
    assert same_tree(ckpt.path, tmp_path / "out" / "checkpoint-2")
    assert not writable(ckpt.path / "model.safetensors")  # the cached snapshot is read-only
    copy = materialize_checkpoint(lineage=first.lineage, step=2, dest=tmp_path / "writable")
    assert same_tree(copy.path, ckpt.path) and writable(copy.path / "model.safetensors") and writable(copy.path)

    data = ckpt.pinned_dataset()
    assert data.commit == reviews.commits[0]
    second = OxenTrainerCallback(dataset=data, model_repo=tmp_path / "models", mlflow=False)
    resumed, collator = make_trainer(tmp_path / "out2", data.load_dataset()["train"], [second], seed=1,
                                     max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt.path))

    assert len(collator.labels) == 2 * 8  # steps 3 and 4 only
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4]  # history carried on
    for name, value in resumed.model.state_dict().items():  # same weights as never stopping
        torch.testing.assert_close(value, uninterrupted[name])
    saved = next(c for c in first.lineage["checkpoints"] if c["step"] == 2)
    assert second.lineage["resumed_from"] == {
        "run_name": "first", "model_repo": str((tmp_path / "models").resolve()), "commit": saved["commit"],
        "path": saved["path"], "step": 2, "file": None, "dataset": first.lineage["dataset"]}
    assert [c["step"] for c in second.lineage["checkpoints"]] == [4]


def test_resume_on_another_dataset_commit_is_refused_unless_allowed(reviews, tmp_path):
    pin_a = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    cb = OxenTrainerCallback(dataset=pin_a, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", pin_a.load_dataset()["train"], [cb], max_steps=2, save_steps=2)
    trainer.train()
    ckpt = materialize_checkpoint(lineage=cb.lineage)
    commit_files(reviews, "B", {"train.jsonl": jsonl(1)})

    pin_b = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    refused = OxenTrainerCallback(dataset=pin_b, model_repo=tmp_path / "models", mlflow=False)
    trainer, collator = make_trainer(tmp_path / "out2", pin_b.load_dataset()["train"], [refused], max_steps=4)
    with pytest.raises(DatasetMismatchError, match=f"{reviews.commits[0]}.*\n.*allow_dataset_change=True"):
        trainer.train(resume_from_checkpoint=str(ckpt.path))
    assert collator.labels == []  # refused before any step

    allowed = OxenTrainerCallback(dataset=pin_b, model_repo=tmp_path / "models", mlflow=False,
                                  allow_dataset_change=True)
    trainer, collator = make_trainer(tmp_path / "out3", pin_b.load_dataset()["train"], [allowed], max_steps=4)
    trainer.train(resume_from_checkpoint=str(ckpt.path))
    assert set(collator.labels) == {1}
    assert allowed.lineage["dataset"]["commit"] == reviews.commits[1]
    assert allowed.lineage["resumed_from"]["dataset"]["commit"] == reviews.commits[0]



def test_snapshot_cut_in_place_is_refused_before_a_step(reviews, tmp_path):
    """The core's cheap check at fit start (counts and sizes) covers this adapter too."""
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    train = pin.load_dataset()["train"]
    cut = pin.file("train.jsonl")
    cut.parent.chmod(0o755)
    cut.chmod(0o644)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, collator = make_trainer(tmp_path / "out", train, [cb], max_steps=2)
    with pytest.raises(DatasetMismatchError, match=r"'train.jsonl' holds 1 files, \d+ bytes; recorded"):
        trainer.train()
    assert collator.labels == []

def test_train_dataset_of_another_commit_than_the_pin_is_refused(reviews, tmp_path):
    pin_a = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    commit_files(reviews, "B", {"train.jsonl": jsonl(1)})
    pin_b = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    cb = OxenTrainerCallback(dataset=pin_a, model_repo=tmp_path / "models", mlflow=False)
    trainer, collator = make_trainer(tmp_path / "out", pin_b.load_dataset()["train"], [cb], max_steps=2)
    with pytest.raises(DatasetMismatchError, match=reviews.commits[1]):
        trainer.train()
    assert collator.labels == []


def test_report_to_mlflow_gives_one_run_with_metrics_and_oxen_pointers(reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-lineage")
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models")
    trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [cb], max_steps=4, save_steps=2,
                              report_to="mlflow")
    trainer.train()
    record = cb.lineage  # (waits for the lineage logging train() did not wait for)

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("hf-lineage").experiment_id])
    assert len(runs) == 1  # transformers' MLflowCallback run, joined, not a second one
    run = runs[0]
    assert run.info.run_id == record["run"]["mlflow_run_id"] and run.info.status == "FINISHED"
    assert "loss" in run.data.metrics and "learning_rate" in run.data.params  # MLflowCallback's own logging
    assert run.data.tags["oxen.dataset.commit"] == reviews.commits[0]
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]
    assert run.data.tags["oxen.model.path"] == record["model"]["path"]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="oxen/lineage.json",
                                                dst_path=str(tmp_path / "dl"))
    assert read_lineage(local)["checkpoints"] == record["checkpoints"]
    assert mlflow.active_run() is None


def test_two_trains_in_one_user_mlflow_run_are_one_oxen_run(reviews, tmp_path):
    """train() twice inside the user's own mlflow.start_run(): the run's tags and pointer describe one
    Oxen run, holding both train()s' checkpoints, not the second one alone."""
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models")
    trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [cb], max_steps=2, save_steps=2)
    with mlflow.start_run() as active:
        trainer.train()
        first = cb.lineage
        trainer.train()
        second = cb.lineage
    assert second["run"]["name"] == first["run"]["name"] and second["run"]["mlflow_run_id"] == active.info.run_id
    assert [c["commit"] for c in second["checkpoints"]][:1] == [first["checkpoints"][0]["commit"]]
    assert len(second["checkpoints"]) == 2 and second["status"] == "FINISHED"
    tags = MlflowClient().get_run(active.info.run_id).data.tags
    assert tags["oxen.run"] == first["run"]["name"] and tags["oxen.model.commit"] == second["model"]["commit"]


def test_rerun_into_the_same_output_dir_keeps_earlier_published_checkpoints(reviews, tmp_path):
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    callbacks = []
    for seed in (0, 1):  # the same script run twice: checkpoint-2 is written twice, in place
        cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
        trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [cb], seed=seed,
                                  max_steps=2, save_steps=2)
        trainer.train()
        callbacks.append(cb)
    first = callbacks[0].lineage["checkpoints"][0]
    committed = materialize_checkpoint(tmp_path / "models", commit=first["commit"], path=first["path"]).path
    assert same_tree(tmp_path / "models" / first["path"], committed)  # the working tree copy is intact
    assert not filecmp.cmp(committed / "optimizer.pt", tmp_path / "out" / "checkpoint-2" / "optimizer.pt",
                           shallow=False)


class Crash(TrainerCallback):
    """User code failing mid-training (after the first save)."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 3:
            raise RuntimeError("user code failed")


def test_a_failed_train_is_closed_as_failed_when_train_runs_again(reviews, tmp_path):
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    cb = OxenTrainerCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False)
    trainer, _ = make_trainer(tmp_path / "out", pin.load_dataset()["train"], [cb, Crash()], max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="user code failed"):
        trainer.train()
    failed = cb.run
    trainer.remove_callback(Crash)
    trainer.train()  # as in a notebook: fix, run the cell again

    committed = read_lineage(tmp_path / "models" / "runs" / failed.run_name / "lineage.json")
    assert committed["status"] == "FAILED"
    assert [c["step"] for c in committed["checkpoints"]] == [2]  # what the failed run saved is kept
    assert cb.lineage["status"] == "FINISHED" and cb.lineage["run"]["name"] != failed.run_name
    assert [c["step"] for c in cb.lineage["checkpoints"]] == [2, 4]


@pytest.mark.parametrize(("error", "report_to", "status"), [("error", "mlflow", "FAILED"), ("ctrl-c", "none", "KILLED")])
def test_a_script_that_dies_of_a_raising_train_ends_its_run(error, report_to, status, reviews, tmp_path):
    """train() raised (no hook of ours runs) and nothing calls it again: by the time the process
    exits, the run is ended FAILED (KILLED for Ctrl-C) in the model repository and in MLflow, not left
    RUNNING (nor ended FINISHED by MLflow's own exit handler)."""
    script = Path(__file__).parent / "hf_raising_script.py"
    done = subprocess.run([sys.executable, str(script), "--dataset", str(reviews.path), "--model-repo",
                           str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--raise", error,
                           "--report-to", report_to], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and ("KeyboardInterrupt" if error == "ctrl-c" else "user code failed") in done.stderr
    record = read_lineage(tmp_path / "models" / "runs" / "raised" / "lineage.json")
    assert record["status"] == status and [c["step"] for c in record["checkpoints"]] == [2]
    run = MlflowClient().get_run(record["run"]["mlflow_run_id"])
    assert run.info.status == status and run.data.tags["oxen.lineage.status"] == status
    assert run.data.tags["oxen.model.commit"] == record["checkpoints"][0]["commit"]


def test_a_train_that_raised_then_a_retry_in_the_same_mlflow_run_ends_as_the_retry(reviews, tmp_path):
    """report_to="mlflow" leaves transformers' run active when train() raises; the user catches it and
    trains again with a new Trainer and callback (the same MLflow run). At exit, the failed attempt's
    end must not be written over the retry's: the MLflow run and the repository say FINISHED."""
    script = Path(__file__).parent / "hf_raising_script.py"
    done = subprocess.run([sys.executable, str(script), "--dataset", str(reviews.path), "--model-repo",
                           str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--raise", "error",
                           "--report-to", "mlflow", "--retry"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])["again"]
    assert again["status"] == "FINISHED"
    record = read_lineage(tmp_path / "models" / "runs" / again["run"]["name"] / "lineage.json")
    assert record["status"] == "FINISHED"
    run = MlflowClient().get_run(again["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["oxen.lineage.status"] == "FINISHED"
    assert run.data.tags["oxen.model.commit"] == record["model"]["commit"]


def test_a_run_the_user_starts_after_a_raising_train_is_never_ended_by_us(reviews, tmp_path):
    """train() raised; the user ends the run transformers left active, starts one of their own and the
    script exits normally with it active. The exit ends the raised train()'s Oxen run FAILED, and no
    MLflow run but its own: the user's run ends FINISHED (MLflow's exit), transformers' as the user
    ended it."""
    script = Path(__file__).parent / "hf_raising_script.py"
    done = subprocess.run([sys.executable, str(script), "--dataset", str(reviews.path), "--model-repo",
                           str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--raise", "error",
                           "--report-to", "mlflow", "--then-own-run"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout.strip().splitlines()[-1])
    client = MlflowClient()
    own = client.get_run(ids["own_run"])
    assert own.info.status == "FINISHED" and own.data.metrics == {"my_eval": 0.9}
    assert not any(key.startswith("oxen.") for key in own.data.tags)
    theirs = client.get_run(ids["transformers_run"])
    assert theirs.info.status == "FINISHED" and theirs.data.tags["oxen.lineage.status"] == "FAILED"
    record = read_lineage(tmp_path / "models" / "runs" / "raised" / "lineage.json")
    assert record["status"] == "FAILED" and record["run"]["mlflow_run_id"] == ids["transformers_run"]


def test_a_second_train_that_raises_ends_the_mlflow_run_transformers_started_for_it(reviews, tmp_path):
    """The same Trainer trains twice (report_to="mlflow"); the second train() raises and the script dies of
    it. transformers starts that train()'s MLflow run at its first log (it set itself up in the first), not
    at train begin: that run ends FAILED at exit (MLflow's own exit handler ended it FINISHED)."""
    script = Path(__file__).parent / "hf_raising_script.py"
    done = subprocess.run([sys.executable, str(script), "--dataset", str(reviews.path), "--model-repo",
                           str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--raise", "error",
                           "--report-to", "mlflow", "--after-a-good-train"], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "user code failed" in done.stderr
    first = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"first"'))["first"]
    records = [read_lineage(p) for p in (tmp_path / "models" / "runs").glob("*/lineage.json")]
    [failed] = [r for r in records if r["status"] == "FAILED"]  # (the second train(): a new Oxen run)
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    status = {r.info.run_id: r.info.status for r in runs}
    assert status.pop(first["run"]["mlflow_run_id"]) == "FINISHED"
    assert status.pop(failed["run"]["mlflow_run_id"]) == "FAILED"
    # transformers' run of the second train() (its losses): ended FAILED, not FINISHED
    assert set(status.values()) == {"FAILED"}, status


def test_datasets_cache_never_returns_rows_of_another_commit(reviews, tmp_path):
    commit_files(reviews, "B", {"train.jsonl": jsonl(1)})  # same file name, same size, other labels
    commit_a, commit_b = reviews.commits
    cache = tmp_path / "hf-cache"  # one shared datasets cache for every load

    def labels(commit: str) -> tuple[set[int], object]:
        split = PinnedDataset(reviews.path, revision=commit, paths=PATHS).load_dataset(cache_dir=cache)["train"]
        return set(split["label"]), split

    (seen_a, ds_a), (seen_b, ds_b), (again_a, ds_a2) = labels(commit_a), labels(commit_b), labels(commit_a)
    assert (seen_a, seen_b, again_a) == ({0}, {1}, {0})
    assert ds_a2.cache_files == ds_a.cache_files  # A's second load is A's cache, reused
    assert ds_a._fingerprint != ds_b._fingerprint
    assert dataset_commits(ds_a) == {commit_a} and dataset_commits(ds_b) == {commit_b}
    tok_a, tok_b = tokenize(ds_a, make_tokenizer()), tokenize(ds_b, make_tokenizer())  # .map() caches too
    assert set(tok_b["label"]) == {1} and dataset_commits(tok_a) == {commit_a}
    assert tok_a.cache_files != tok_b.cache_files


def test_load_dataset_files_splits_and_bad_arguments(reviews, tmp_path):
    pin = PinnedDataset(reviews.path, revision="main", paths=PATHS)
    assert sorted(pin.load_dataset()) == ["eval", "train"]  # one split per pinned file
    train = pin.load_dataset({"train": "*.jsonl"}, split="train")
    assert train.num_rows == 32 + 8
    with pytest.raises(ConfigurationError, match="revision='v2'.*\nHINT: .*PinnedDataset"):
        pin.load_dataset(revision="v2")
    with pytest.raises(ConfigurationError, match="not among the pinned paths"):
        pin.load_dataset({"train": "other.csv"})


def test_notebook_example_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    """In this process, as in a notebook kernel (torch and transformers are already imported)."""
    monkeypatch.setenv("OXEN_NOTEBOOK_DIR", str(tmp_path / "notebook"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the notebook puts examples/ on it
    try:
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "notebook.py"), run_name="__main__")
    finally:
        sys.modules.pop("hf_trainer", None)
    assert "was trained on" in capsys.readouterr().out


def test_a_train_stopped_with_ctrl_c_in_a_notebook_is_killed_when_train_runs_again(reviews, tmp_path):
    """In a notebook, Ctrl-C stops train() (transformers calls no hook of ours) and the next cell trains
    again: the stopped run is ended then. It was recorded FAILED, though nothing failed (a script
    dying of the same Ctrl-C ends it KILLED)."""
    script = Path(__file__).parent / "hf_notebook_cells.py"
    done = subprocess.run([sys.executable, str(script), str(reviews.path), str(tmp_path / "models"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    session = json.loads(done.stdout.strip().splitlines()[-1])
    assert session["errors"] == [None, "KeyboardInterrupt", None]
    stopped = read_lineage(tmp_path / "models" / "runs" / session["stopped"] / "lineage.json")
    assert stopped["status"] == "KILLED" and [c["step"] for c in stopped["checkpoints"]] == [2]
    again = read_lineage(tmp_path / "models" / "runs" / session["again"] / "lineage.json")
    assert again["status"] == "FINISHED" and session["again"] != session["stopped"]


def test_load_dataset_reads_csv_and_parquet_of_the_pinned_commit(tmp_path):
    """The README's other formats: CSV, and Parquet shards by a glob; commit B's rows never come back
    for a pin of commit A."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def shard(label: int, rows: int) -> bytes:
        out = io.BytesIO()
        pq.write_table(pa.table({"text": [f"row {i}" for i in range(rows)], "label": [label] * rows}), out)
        return out.getvalue()

    files_a = {"train.csv": "text,label\n" + "".join(f"row {i},0\n" for i in range(5)),
               "data/part-0.parquet": shard(0, 3), "data/part-1.parquet": shard(0, 4)}
    repo = make_repo(tmp_path / "tables", [("A", files_a)])
    commit_b = commit_files(repo, "B", {"train.csv": "text,label\nrow,1\n", "data/part-0.parquet": shard(1, 9)})
    pin = PinnedDataset(repo.path, revision=repo.commits[0], paths=["train.csv", "data"])
    csv = pin.load_dataset({"train": "train.csv"}, split="train", cache_dir=tmp_path / "hf")
    parquet = pin.load_dataset({"train": "data/*.parquet"}, split="train", cache_dir=tmp_path / "hf")
    assert (csv.num_rows, set(csv["label"])) == (5, {0})
    assert (parquet.num_rows, set(parquet["label"])) == (7, {0})
    later = PinnedDataset(repo.path, revision=commit_b, paths=["data"]).load_dataset(
        {"train": "data/*.parquet"}, split="train", cache_dir=tmp_path / "hf")  # the same cache: B's rows
    assert (later.num_rows, set(later["label"])) == (9 + 4, {0, 1})
