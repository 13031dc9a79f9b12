# %% [markdown]
# # Hugging Face Trainer with Oxen lineage, step by step
#
# A percent-script: open it as a notebook (VS Code, or `jupytext --to notebook examples/notebook.py`)
# or run it top to bottom with `python examples/notebook.py`. It reuses the data, tokenizer and
# model builders of `examples/hf_trainer.py` and writes everything under `./oxen-notebook`.

# %%
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent if "__file__" in globals() else Path.cwd()))
from hf_trainer import build_model, build_tokenizer, ensure_dataset, tokenized  # noqa: E402

work = Path(os.environ.get("OXEN_NOTEBOOK_DIR", "oxen-notebook")).resolve()
work.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("OXEN_CALLBACKS_CACHE", str(work / "cache"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
first_commit = ensure_dataset(work / "dataset")  # two commits: clean labels, then noisy ones

# %% [markdown]
# ## 1. Pin the dataset and load it with `datasets`
# `revision` may be a branch; it is resolved to a commit once, here. The `DatasetDict` holds
# exactly that commit's rows, cached under a key that contains the commit.

# %%
from oxen_callbacks import PinnedDataset  # noqa: E402

pinned = PinnedDataset(work / "dataset", revision=first_commit, paths=["train.jsonl", "eval.jsonl"])
splits = pinned.load_dataset()
print(pinned.commit, splits)

# %% [markdown]
# ## 2. Train with the callback
# Each `checkpoint-N` folder is committed to the model repository in the background.

# %%
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from oxen_callbacks.huggingface import OxenTrainerCallback  # noqa: E402

tokenizer = build_tokenizer(splits["train"]["text"])
data = tokenized(splits, tokenizer)


def make_trainer(output_dir: Path, dataset: PinnedDataset, steps: int) -> tuple[Trainer, OxenTrainerCallback]:
    callback = OxenTrainerCallback(dataset=dataset, model_repo=work / "models")
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, save_steps=10, logging_steps=10,
                             per_device_train_batch_size=32, learning_rate=3e-3, report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=build_model(tokenizer.vocab_size), args=args, train_dataset=data["train"],
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[callback])
    return trainer, callback


trainer, callback = make_trainer(work / "run-1", pinned, steps=20)
trainer.train()
lineage = callback.lineage
print("dataset commit:", lineage["dataset"]["commit"])
print("checkpoints:", [(c["step"], c["commit"]) for c in lineage["checkpoints"]])

# %% [markdown]
# ## 3. Resume from the model repository
# Materialize `checkpoint-10` out of its commit (read-only, cached), pin the dataset commit recorded
# with it, and continue. A resume on another dataset commit raises `DatasetMismatchError`.

# %%
from oxen_callbacks.checkpoints import materialize_checkpoint  # noqa: E402

ckpt = materialize_checkpoint(lineage=lineage, step=10)
print(ckpt.path, "trained on", ckpt.dataset["commit"])
resumed, resumed_callback = make_trainer(work / "run-2", ckpt.pinned_dataset(), steps=30)
resumed.train(resume_from_checkpoint=str(ckpt.path))
print("resumed from:", resumed_callback.lineage["resumed_from"])

# %% [markdown]
# ## 4. Which data trained this model?
# The lineage committed next to the checkpoint answers it without MLflow.

# %%
final = materialize_checkpoint(lineage=resumed_callback.lineage)
print(f"{final.repo_path} @ {final.commit} was trained on {final.dataset['repo']} @ {final.dataset['commit']}")
assert final.dataset["commit"] == first_commit
