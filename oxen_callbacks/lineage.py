"""The lineage pointer record, schema ``oxen-callbacks/lineage/v1``: build, validate, read, write.

One record per training run. It is committed next to the run's checkpoints in the
model repository and logged to MLflow as ``oxen/lineage.json``::

    {
      "schema": "oxen-callbacks/lineage/v1",
      "dataset": {"repo": ..., "revision": "main", "commit": ..., "paths": [...]},
      "model": {"repo": ..., "commit": ..., "path": "runs/<run>/checkpoints/best.ckpt"},
      "checkpoints": [{"commit": ..., "path": ..., "step": 10, "epoch": 0, "metrics": {...}}],
      "run": {"mlflow_run_id": ..., "mlflow_tracking_uri": ...},
      "code": {"git_commit": ..., "git_dirty": false},
      "framework": {"name": "lightning", "version": "2.6.6"}
    }

In the copy committed with a checkpoint, that commit's own id is not yet known:
its ``commit`` fields are ``null`` and :func:`read_lineage` fills them in with
``at_commit``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._oxen.commit_id import is_commit_id
from ._util.redact import redact_url
from .errors import LineageValidationError
from .model_repo import is_run_name, lineage_files, lineage_path

log = logging.getLogger(__name__)

SCHEMA = "oxen-callbacks/lineage/v1"

LineageRecord = dict[str, Any]
_DRIVE = re.compile(r"^[A-Za-z]:")  # a Windows drive: C:/x, C:x

_SECTIONS: dict[str, dict[str, tuple[type, ...]]] = {
    "dataset": {"repo": (str,), "revision": (str,), "commit": (str,), "paths": (list,)},
    "model": {"repo": (str,), "commit": (str, type(None)), "path": (str, type(None))},
    "run": {"mlflow_run_id": (str, type(None)), "mlflow_tracking_uri": (str, type(None))},
    "code": {"git_commit": (str, type(None)), "git_dirty": (bool, type(None))},
    "framework": {"name": (str,), "version": (str,)},
}
_CHECKPOINT = {
    "commit": (str, type(None)),
    "path": (str,),
    "step": (int, type(None)),
    "epoch": (int, type(None)),
    "metrics": (dict,),
}


def new_record(
    *,
    dataset: Mapping[str, Any] | None,
    model_repo: str,
    framework: Mapping[str, str],
    code: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> LineageRecord:
    """A record with no checkpoints yet."""
    return {
        "schema": SCHEMA,
        "dataset": dict(dataset) if dataset is not None else None,
        "model": {"repo": redact_url(model_repo), "commit": None, "path": None},
        "checkpoints": [],
        "run": {"mlflow_run_id": None, "mlflow_tracking_uri": None, **(run or {})},
        "code": {"git_commit": None, "git_dirty": None, **(code or {})},
        "framework": dict(framework),
    }


def validate_lineage(record: Any) -> LineageRecord:
    """Check ``record`` against the v1 schema; returns it, or raises :class:`LineageValidationError`."""
    if not isinstance(record, Mapping):
        raise LineageValidationError(f"A lineage record must be a JSON object, not {type(record).__name__}.")
    if record.get("schema") != SCHEMA:
        raise LineageValidationError(f"Unknown lineage schema {record.get('schema')!r}; expected {SCHEMA!r}.")
    for section, fields in _SECTIONS.items():
        if section not in record:
            raise LineageValidationError(f"Lineage record lacks the {section!r} section.")
        value = record[section]
        if value is None and section == "dataset":
            continue
        _check_fields(value, fields, section)
    if record["dataset"] is not None:
        _check_commit(record["dataset"]["commit"], "dataset.commit")
        for p in record["dataset"]["paths"]:
            _check_relpath(p, "dataset.paths")
    _check_commit(record["model"]["commit"], "model.commit")
    if not isinstance(record.get("checkpoints"), list):
        raise LineageValidationError("Lineage record field 'checkpoints' must be a list.")
    for i, ckpt in enumerate(record["checkpoints"]):
        _check_fields(ckpt, _CHECKPOINT, f"checkpoints[{i}]")
        _check_relpath(ckpt["path"], f"checkpoints[{i}].path")
        _check_commit(ckpt["commit"], f"checkpoints[{i}].commit")
    if record["model"]["path"] is not None:
        _check_relpath(record["model"]["path"], "model.path")
    return dict(record)


def _check_fields(value: Any, fields: Mapping[str, tuple[type, ...]], where: str) -> None:
    if not isinstance(value, Mapping):
        raise LineageValidationError(f"Lineage field {where!r} must be an object.")
    for name, types in fields.items():
        if name not in value:
            raise LineageValidationError(f"Lineage field '{where}.{name}' is missing.")
        item = value[name]
        if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise LineageValidationError(f"Lineage field '{where}.{name}' must be {wanted}, not {item!r}.")


def _check_commit(commit: str | None, where: str) -> None:
    """A commit id or ``null``: a branch name would read moving data, a path would name a folder."""
    if commit is not None and not is_commit_id(commit):
        raise LineageValidationError(f"Lineage field {where!r} holds {str(commit)[:80]!r}, not an Oxen commit id.")


def _check_relpath(path: str, where: str) -> None:
    """A repository path as this library writes it: non-empty, POSIX, relative, no '..' (no '\\', no 'C:')."""
    if (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path
            or _DRIVE.match(path) or ".." in Path(path).parts):
        raise LineageValidationError(f"Lineage field {where!r} holds an unsafe path {path!r}.")


def fill_commit(record: Mapping[str, Any], commit: str) -> LineageRecord:
    """A copy of ``record`` with its pending (``null``) checkpoint commits set to ``commit``."""
    filled = copy.deepcopy(dict(record))
    for ckpt in filled.get("checkpoints", []):
        if ckpt.get("commit") is None:
            ckpt["commit"] = commit
    model = filled.get("model") or {}
    if model.get("path") is not None and model.get("commit") is None:
        model["commit"] = commit
    return filled


def read_lineage(source: str | os.PathLike[str] | Mapping[str, Any], *, at_commit: str | None = None) -> LineageRecord:
    """Read and validate a record from a file path, JSON text or mapping.

    ``at_commit``: the commit the file was read from, filling its pending ids.
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        text = str(source)
        data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(source).read_text())
    if at_commit:
        data = fill_commit(data, at_commit)
    return validate_lineage(data)


def write_lineage(record: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate and write ``record`` atomically (temp file + rename)."""
    validate_lineage(record)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, target)
    return target


# -- the records of a model repository ------------------------------------------------------------
def repo_records(model_repo: str | os.PathLike[str]) -> list[LineageRecord]:
    """The lineage records of every run in a model repository's working tree (unreadable ones skipped)."""
    found = (_read_or_skip(path) for path in lineage_files(model_repo))
    return [record for record in found if record is not None]


def repo_record(model_repo: str | os.PathLike[str], run_name: str) -> LineageRecord | None:
    """The lineage record of run ``run_name`` in a model repository, if it is there and readable."""
    if not is_run_name(run_name):
        return None  # not a folder name: nothing outside the runs' folder is read
    path = Path(model_repo) / lineage_path(run_name)
    return _read_or_skip(path) if path.is_file() else None


def _read_or_skip(path: Path) -> LineageRecord | None:
    try:
        return read_lineage(path)
    except (OSError, ValueError, LineageValidationError) as exc:
        log.warning("Skipping unreadable lineage record %s: %s", path, exc)
        return None


def find_checkpoint_run(model_repo: str | os.PathLike[str],
                        commit: str) -> tuple[LineageRecord, dict[str, Any]] | None:
    """The run and checkpoint entry committed as ``commit`` (the last such entry), if any."""
    for record in repo_records(model_repo):
        hits = [c for c in record["checkpoints"] if c["commit"] == commit]
        if hits:
            return record, hits[-1]
    return None
