"""A tiny BERT text classifier for real Hugging Face Trainer runs: built from a config, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was", "plot", "very"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def make_model(seed: int = 0) -> BertForSequenceClassification:
    import torch

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def jsonl(label: int, rows: int = 32, seed: int = 0) -> str:
    """``rows`` short reviews, all with ``label``; ``uid`` says which commit wrote them."""
    rng = random.Random(seed)
    lines = [json.dumps({"uid": f"L{label}-{i}", "text": " ".join(rng.choices(WORDS, k=6)), "label": label})
             for i in range(rows)]
    return "\n".join(lines) + "\n"


def tokenize(dataset: Any, tokenizer: PreTrainedTokenizerFast) -> Any:
    return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=16), batched=True)


class RecordingCollator(DataCollatorWithPadding):
    """Pads like ``DataCollatorWithPadding`` and remembers every label it batched."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__(tokenizer)
        self.labels: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self.labels.extend(int(f["label"]) for f in features)
        return super().__call__(features)


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """Few steps, tiny batches, CPU, no reporting unless asked."""
    options: dict[str, Any] = {"output_dir": str(output_dir), "max_steps": 4, "per_device_train_batch_size": 8,
                               "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "report_to": "none",
                               "use_cpu": True, "disable_tqdm": True, "learning_rate": 1e-3, "seed": 0}
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(output_dir: Path, train: Any, callbacks: list[Any], *, eval_dataset: Any = None,
                 seed: int = 0, **overrides: Any) -> tuple[Trainer, RecordingCollator]:
    tokenizer = make_tokenizer()
    collator = RecordingCollator(tokenizer)
    trainer = Trainer(model=make_model(seed), args=training_args(output_dir, **overrides),
                      train_dataset=tokenize(train, tokenizer),
                      eval_dataset=tokenize(eval_dataset, tokenizer) if eval_dataset is not None else None,
                      data_collator=collator, callbacks=callbacks)
    return trainer, collator
