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

#: oxenai calls in short-lived child processes (init a repository, commit files, read its log):
#: public because a script that set up a dataset with oxenai directly would hold its locks.
_MODULES = {"oxen_child": "oxen_callbacks._oxen.child"}

__all__ = ["__version__", *_MODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oxen_callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
