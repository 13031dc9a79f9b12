"""Oxen datasets in MLflow's Datasets panel: a dataset source for (repo, commit, paths).

``LineageRun`` logs the pinned dataset as a run input at the end of training;
by hand::

    from oxen_callbacks._mlflow.dataset import OxenDataset
    mlflow.log_input(OxenDataset.of(pin), context="training")

The digest is computed from the Oxen commit and the paths, never from sampled
rows. The source is registered with MLflow through the ``mlflow.dataset_source``
entry point, so a logged input resolves back to its data::

    source = mlflow.data.get_source(run.inputs.dataset_inputs[0])   # an OxenDatasetSource
    folder = source.load()      # the read-only snapshot of exactly that commit
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource

from .._util.redact import redact_url

SOURCE_TYPE = "oxen"


class OxenDatasetSource(DatasetSource):
    """Paths of one commit of an Oxen repository."""

    def __init__(self, repo: str, commit: str, paths: list[str] | None = None, revision: str | None = None) -> None:
        self.repo = redact_url(str(repo)) or str(repo)
        self.commit = commit
        self.paths = list(paths or ["."])
        self.revision = revision

    @staticmethod
    def _get_source_type() -> str:
        return SOURCE_TYPE

    def load(self, cache_dir: str | os.PathLike[str] | None = None) -> str:
        """Materialize the snapshot (cached, read-only) and return its folder: every file checked against the
        commit's content hash, a damaged snapshot made again (as ``reproduce`` and ``diff`` read it)."""
        from ..pin import PinnedDataset

        return str(PinnedDataset(self.repo, revision=self.commit, paths=self.paths, cache_dir=cache_dir,
                                 named_by_record=True).pull_intact())  # (an MLflow store's record names it)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        if callable(getattr(raw_source, "to_lineage", None)):
            return True
        return isinstance(raw_source, Mapping) and {"repo", "commit"} <= set(raw_source)

    @classmethod
    def _resolve(cls, raw_source: Any) -> OxenDatasetSource:
        section = raw_source.to_lineage() if callable(getattr(raw_source, "to_lineage", None)) else raw_source
        return cls(section["repo"], section["commit"], section.get("paths"), section.get("revision"))

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "commit": self.commit, "paths": self.paths, "revision": self.revision}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> OxenDatasetSource:
        return cls(source_dict["repo"], source_dict["commit"], source_dict.get("paths"), source_dict.get("revision"))

    def __repr__(self) -> str:
        return f"OxenDatasetSource({self.repo!r}, commit={self.commit!r}, paths={self.paths})"


class OxenDataset(Dataset):
    """A pinned Oxen dataset as an MLflow dataset; its digest comes from the commit and paths."""

    def __init__(self, source: OxenDatasetSource, name: str | None = None, digest: str | None = None) -> None:
        super().__init__(source=source, name=name or Path(source.repo.rstrip("/")).name, digest=digest)

    @classmethod
    def of(cls, pinned: Any, name: str | None = None) -> OxenDataset:
        """From a :class:`~oxen_callbacks.PinnedDataset` or a lineage ``dataset`` section."""
        return cls(OxenDatasetSource._resolve(pinned), name=name)

    def _compute_digest(self) -> str:
        source: OxenDatasetSource = self.source  # type: ignore[assignment]
        return hashlib.sha256(f"{source.commit}\n{json.dumps(sorted(source.paths))}".encode()).hexdigest()[:8]

    @property
    def profile(self) -> None:
        return None

    @property
    def schema(self) -> None:
        return None


def log_dataset_input(client: Any, run_id: str, section: Mapping[str, Any], context: str = "training") -> OxenDataset:
    """Log the lineage ``dataset`` section as an input of ``run_id`` through ``client`` (an ``MlflowClient``)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = OxenDataset.of(section)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return dataset
