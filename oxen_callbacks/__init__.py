"""oxen-callbacks: data-to-model lineage for PyTorch Lightning and Hugging Face Trainer.

Importing this package imports no torch, lightning, transformers or mlflow; the
names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PinnedDataset": "oxen_callbacks.pin",
    "CheckpointPublisher": "oxen_callbacks._publish.publisher",
    "LineageRecord": "oxen_callbacks.lineage",
    "read_lineage": "oxen_callbacks.lineage",
    "validate_lineage": "oxen_callbacks.lineage",
    "LineageRun": "oxen_callbacks.run",
    "OxenLightningCallback": "oxen_callbacks.lightning",
    "OxenTrainerCallback": "oxen_callbacks.huggingface",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oxen_callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
