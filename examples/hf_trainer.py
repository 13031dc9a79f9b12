"""Hugging Face Trainer with data -> model lineage: Oxen dataset, Oxen checkpoints, one MLflow run.

    python examples/hf_trainer.py [--workdir oxen-hf-example] [--steps 60] [--save-steps 20]

1. creates (once) a local Oxen dataset repository of generated reviews (``train.jsonl``,
   ``eval.jsonl``) in two commits: clean labels, then 30% label noise;
2. pins the FIRST commit and loads it as a ``datasets.DatasetDict`` (cached per commit);
3. fine-tunes a tiny BERT classifier built from a config, with a tokenizer trained here
   (no downloads), committing every ``checkpoint-N`` folder to a local Oxen model repository;
4. logs metrics (transformers' ``MLflowCallback``) and the Oxen pointers into ONE MLflow run
   (``$MLFLOW_TRACKING_URI``, else SQLite in the work folder) and prints the lineage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from oxen_callbacks import PinnedDataset, oxen_child

POSITIVE = ["good", "great", "lovely", "superb", "fun", "moving", "clever", "warm"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "messy", "cold", "silly"]
NEUTRAL = ["the", "film", "plot", "was", "cast", "very", "and", "a", "story", "ending"]


def write_reviews(path: Path, rows: int, seed: int, noise: float) -> None:
    """One JSON object per line: ``{"text", "label"}``; ``noise`` of the labels are flipped."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            label = rng.randint(0, 1)
            words = rng.choices(NEUTRAL, k=5) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
            rng.shuffle(words)
            if rng.random() < noise:
                label = 1 - label
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")


def ensure_dataset(root: Path) -> str:
    """Create the dataset repository on the first run; return its first commit."""
    if not (root / ".oxen").exists():
        root.mkdir(parents=True, exist_ok=True)
        oxen_child.init_repo(root)
        write_reviews(root / "train.jsonl", rows=1024, seed=0, noise=0.0)
        write_reviews(root / "eval.jsonl", rows=256, seed=1, noise=0.0)
        oxen_child.commit_paths(root, ["train.jsonl", "eval.jsonl"], "First version: clean labels")
        write_reviews(root / "train.jsonl", rows=1024, seed=0, noise=0.3)
        oxen_child.commit_paths(root, ["train.jsonl"], "Second version: 30% label noise from a new vendor")
    return oxen_child.log(root)[-1]["id"]


def build_tokenizer(texts: list[str]) -> Any:
    """A word-level tokenizer trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.train_from_iterator(texts, WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def build_model(vocab_size: int) -> Any:
    """A 2-layer BERT classifier from a config (random weights, ~60k parameters)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def tokenized(splits: Any, tokenizer: Any) -> Any:
    return splits.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=16), batched=True)


def print_lineage(lineage: dict[str, Any], tracking_uri: str | None) -> None:
    print("\nLineage")
    print(f"  MLflow run       {lineage['run']['mlflow_run_id']}  ({lineage['run']['mlflow_tracking_uri']})")
    print(f"  dataset          {lineage['dataset']['repo']} @ {lineage['dataset']['commit']} "
          f"(asked for {lineage['dataset']['revision']!r}; paths {lineage['dataset']['paths']})")
    print(f"  model            {lineage['model']['repo']} @ {lineage['model']['commit']}")
    print(f"                   {lineage['model']['path']}")
    print(f"  checkpoints      {len(lineage['checkpoints'])} committed: "
          + ", ".join(f"step {c['step']}" for c in lineage["checkpoints"]))
    print(f"  code             git {lineage['code']['git_commit']} (dirty: {lineage['code']['git_dirty']})")
    print("\nInspect it:")
    if lineage["run"]["mlflow_run_id"]:
        print(f"  MLFLOW_TRACKING_URI={tracking_uri} oxen-callbacks lineage {lineage['run']['mlflow_run_id']}")
    print(f"  oxen-callbacks lineage --model-repo {lineage['model']['repo']} {lineage['run']['name']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="oxen-hf-example", help="folder for the repositories and MLflow store")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--no-oxen", action="store_true", help="train without the callback (for timing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # transformers' MLflowCallback reads these: metrics and Oxen pointers then share one run.
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "oxen-hf-example")
    os.environ.setdefault("OXEN_CALLBACKS_CACHE", str(work / "cache"))
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # embedded default: store and artifacts in the work folder
        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        if mlflow.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"]) is None:
            mlflow.create_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"], (work / "mlartifacts").as_uri())

    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from oxen_callbacks.huggingface import OxenTrainerCallback

    first_commit = ensure_dataset(work / "dataset")
    pinned = PinnedDataset(work / "dataset", revision=first_commit, paths=["train.jsonl", "eval.jsonl"])
    splits = pinned.load_dataset()  # DatasetDict: "train", "eval" of exactly that commit
    tokenizer = build_tokenizer(splits["train"]["text"])
    data = tokenized(splits, tokenizer)
    set_seed(0)
    callbacks = [] if args.no_oxen else [OxenTrainerCallback(dataset=pinned, model_repo=work / "models")]
    training_args = TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=32,
        learning_rate=3e-3, eval_strategy="steps", eval_steps=args.save_steps, save_steps=args.save_steps,
        save_total_limit=2, logging_steps=10, report_to="mlflow", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=build_model(tokenizer.vocab_size), args=training_args, train_dataset=data["train"],
                      eval_dataset=data["eval"], data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer, callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    print(f"\ntrain took {seconds:.2f}s ({'without' if args.no_oxen else 'with'} oxen-callbacks); "
          f"final eval_loss {eval_loss:.3f}")
    if not args.no_oxen:
        print_lineage(callbacks[0].lineage, os.environ["MLFLOW_TRACKING_URI"])


if __name__ == "__main__":
    main()
