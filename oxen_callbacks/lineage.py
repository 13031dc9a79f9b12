"""The lineage pointer record, schema ``oxen-callbacks/lineage/v1``: typed, validated, read, written.

One record per training run. It is committed next to the run's checkpoints in the
model repository (``runs/<run>/lineage.json``, see :mod:`.model_repo`) and logged to
MLflow as ``oxen/lineage.json``::

    {
      "schema": "oxen-callbacks/lineage/v1",
      "dataset": {"repo": ..., "revision": "main", "commit": ..., "paths": [...]},
      "model": {"repo": ..., "commit": ..., "path": "runs/<run>/checkpoints/best.ckpt"},
      "checkpoints": [{"commit": ..., "path": ..., "step": 10, "epoch": 0, "metrics": {...}}],
      "run": {"mlflow_run_id": ..., "mlflow_tracking_uri": ...},
      "code": {"git_commit": ..., "git_dirty": false},
      "framework": {"name": "lightning", "version": "2.6.6"}
    }

Any section may hold more keys than these (``status``, ``run.name``, ``dataset.dirty``...).

Two forms of one record: the JSON object (a ``dict``: what :func:`read_lineage`
returns, what the callbacks' ``lineage`` attribute holds, what travels between
processes) and :class:`LineageRecord`, the typed dataclasses of the schema
(``LineageRecord.from_json(data)`` / ``.to_json()``; extra keys kept in ``extra``)::

    record = read_lineage("models/reviews/runs/nightly/lineage.json")
    record["dataset"]["commit"]
    typed = LineageRecord.from_json(record)
    typed.dataset.commit, [c.path for c in typed.checkpoints]

Both go through one validator. In the copy committed with a checkpoint, that commit's
own id is not yet known: its ``commit`` fields are ``null`` and :func:`read_lineage`
fills them in with ``at_commit``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._oxen.commit_id import is_commit_id
from ._util import background
from ._util.fs import parse_json, write_json_atomically
from ._util.redact import redact_url
from .errors import ConfigurationError, LineageValidationError
from .model_repo import is_run_name, lineage_files, lineage_path

log = logging.getLogger(__name__)

SCHEMA = "oxen-callbacks/lineage/v1"

LineageJSON = dict[str, Any]  # a lineage record as its JSON object

# How a run ends (the record's ``status``). MLflow's runs know FINISHED, FAILED and KILLED only:
# a PREEMPTED run (a SLURM job requeued after its checkpoint was saved) ends there as KILLED,
# its ``oxen.lineage.status`` tag saying PREEMPTED; the requeued job ends the same MLflow run.
PREEMPTED = "PREEMPTED"
#: ``model.best``, written by a fit's end: whether the trainer named that checkpoint its best (the
#: metric it monitors), so that `sync` marks it so even when it is also the last one.
BEST_KEY = "best"
#: A checkpoint entry's ``{"step", "path"}`` of a later save written where it was (a Ray report reusing a
#: ``checkpoint_dir_name``) possibly before it was frozen: its commit may hold that later save's bytes.
LATER_REPORT_KEY = "may_hold_later_report"
#: A checkpoint entry's files its commit does not hold: tables Oxen could not parse, which it leaves out
#: of a commit without a word (the entry's other files are committed).
NOT_COMMITTED_KEY = "not_committed"
#: In the record ``callback.lineage`` holds when the run's final lineage commit did not complete
#: (``"pending"``: ``oxen-callbacks sync`` commits it); never in a committed record.
FINAL_COMMIT_KEY = "final_commit"
_MLFLOW_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def mlflow_run_status(status: str) -> str:
    """The MLflow run status a lineage ``status`` ends its run as (PREEMPTED and others: KILLED)."""
    return status if status in _MLFLOW_RUN_STATUSES else "KILLED"


def status_of_an_uncaught_raise() -> str:
    """How a training call that raised with no hook of ours to see it (HF's ``train()``) ended: ``KILLED``
    when the last uncaught exception (the one that ends the script, set before exit handlers; in a
    notebook, IPython keeps each cell's) is a Ctrl-C, else ``FAILED``."""
    return "KILLED" if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt) else "FAILED"


_DRIVE = re.compile(r"^[A-Za-z]:")  # a Windows drive: C:/x, C:x
_NULL = type(None)
_S = TypeVar("_S", bound="_Section")


def _json(*types: type) -> Any:
    """A schema field: the JSON types its value may have (``type(None)`` for null)."""
    return field(metadata={"json": types})


class _Section:
    """A JSON object of the record: its schema fields (with their JSON types), then ``extra`` keys."""

    extra: dict[str, Any]

    @classmethod
    def schema_fields(cls) -> dict[str, tuple[type, ...]]:
        """``{key: allowed JSON types}`` of the schema's required keys, in order."""
        return {f.name: f.metadata["json"] for f in dataclasses.fields(cls) if "json" in f.metadata}  # type: ignore[arg-type]

    @classmethod
    def _from(cls: type[_S], data: Mapping[str, Any]) -> _S:
        """From a JSON object the validator has checked."""
        known = cls.schema_fields()
        return cls(**{k: copy.deepcopy(data[k]) for k in known},  # type: ignore[call-arg]
                   extra={k: copy.deepcopy(v) for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The JSON object: schema keys in schema order, then the extra keys as they came."""
        data = {k: copy.deepcopy(getattr(self, k)) for k in self.schema_fields()}
        return {**data, **copy.deepcopy(self.extra)}


@dataclass
class DatasetPointer(_Section):
    """``dataset``: the exact data a run read."""

    repo: str = _json(str)  # local path or remote URL, no credentials
    revision: str = _json(str)  # what the user asked for: branch, tag or commit
    commit: str = _json(str)  # the commit it resolved to
    paths: list[str] = _json(list)  # the paths used from that commit
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelPointer(_Section):
    """``model``: the final (or best) checkpoint in the model repository."""

    repo: str = _json(str)
    commit: str | None = _json(str, _NULL)  # null until the commit holding it is known
    path: str | None = _json(str, _NULL)  # its path inside the model repository
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointPointer(_Section):
    """One entry of ``checkpoints``: a published save."""

    commit: str | None = _json(str, _NULL)
    path: str = _json(str)
    step: int | None = _json(int, _NULL)
    epoch: int | None = _json(int, _NULL)
    metrics: dict[str, Any] = _json(dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunPointer(_Section):
    """``run``: the MLflow run that logged it (``extra["name"]``: the run's folder name)."""

    mlflow_run_id: str | None = _json(str, _NULL)
    mlflow_tracking_uri: str | None = _json(str, _NULL)  # without credentials
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CodePointer(_Section):
    """``code``: the training code's git commit (null outside a git checkout)."""

    git_commit: str | None = _json(str, _NULL)
    git_dirty: bool | None = _json(bool, _NULL)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FrameworkInfo(_Section):
    """``framework``: what trained it (``lightning``, ``transformers``...) and its version."""

    name: str = _json(str)
    version: str = _json(str)
    extra: dict[str, Any] = field(default_factory=dict)


# the record's sections in schema order (``checkpoints`` sits between model and run)
_SECTIONS: dict[str, type[_Section]] = {"dataset": DatasetPointer, "model": ModelPointer, "run": RunPointer,
                                        "code": CodePointer, "framework": FrameworkInfo}
_ORDER = ("dataset", "model", "checkpoints", "run", "code", "framework")


@dataclass
class LineageRecord:
    """A lineage record, typed: see the module docstring. ``extra``: its keys beyond the schema's."""

    dataset: DatasetPointer | None
    model: ModelPointer
    checkpoints: list[CheckpointPointer]
    run: RunPointer
    code: CodePointer
    framework: FrameworkInfo
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> LineageRecord:
        """Validate ``data`` (:func:`validate_lineage`'s checks) and type it."""
        _validate(data)
        sections = {name: (kind._from(data[name]) if data[name] is not None else None)
                    for name, kind in _SECTIONS.items()}
        return cls(checkpoints=[CheckpointPointer._from(c) for c in data["checkpoints"]], **sections,  # type: ignore[arg-type]
                   extra={k: copy.deepcopy(v) for k, v in data.items() if k not in (*_ORDER, "schema")})

    @classmethod
    def read(cls, source: str | os.PathLike[str] | Mapping[str, Any], *, at_commit: str | None = None) -> LineageRecord:
        """:func:`read_lineage`, typed."""
        return cls.from_json(_load(source, at_commit))

    def to_json(self) -> LineageJSON:
        """The JSON object, keys in the order this library writes them."""
        data: LineageJSON = {"schema": SCHEMA}
        for name in _ORDER:
            value = getattr(self, name)
            data[name] = ([c.to_json() for c in value] if name == "checkpoints"
                          else value.to_json() if value is not None else None)
        return {**data, **copy.deepcopy(self.extra)}

    @property
    def status(self) -> str | None:
        """How the run ended (``RUNNING`` while it trains; absent in records of older versions)."""
        return self.extra.get("status")

    @status.setter
    def status(self, value: str | None) -> None:
        self.extra["status"] = value


# -- the one validator ------------------------------------------------------------------------
def validate_lineage(record: Any) -> LineageJSON:
    """Check ``record`` against the v1 schema; returns it, or raises :class:`LineageValidationError`."""
    _validate(record)
    return dict(record)


def _validate(record: Any) -> None:
    if not isinstance(record, Mapping):
        raise LineageValidationError(f"A lineage record must be a JSON object, not {type(record).__name__}.")
    if record.get("schema") != SCHEMA:
        raise LineageValidationError(f"Unknown lineage schema {record.get('schema')!r}; expected {SCHEMA!r}.")
    for section, kind in _SECTIONS.items():
        if section not in record:
            raise LineageValidationError(f"Lineage record lacks the {section!r} section.")
        value = record[section]
        if value is None and section == "dataset":
            continue
        _check_fields(value, kind.schema_fields(), section)
    if record["dataset"] is not None:
        _check_commit(record["dataset"]["commit"], "dataset.commit")
        for p in record["dataset"]["paths"]:
            _check_relpath(p, "dataset.paths")
    _check_commit(record["model"]["commit"], "model.commit")
    if not isinstance(record.get("checkpoints"), list):
        raise LineageValidationError("Lineage record field 'checkpoints' must be a list.")
    for i, ckpt in enumerate(record["checkpoints"]):
        _check_fields(ckpt, CheckpointPointer.schema_fields(), f"checkpoints[{i}]")
        _check_relpath(ckpt["path"], f"checkpoints[{i}].path")
        _check_commit(ckpt["commit"], f"checkpoints[{i}].commit")
    if record["model"]["path"] is not None:
        _check_relpath(record["model"]["path"], "model.path")


def _check_fields(value: Any, fields: Mapping[str, tuple[type, ...]], where: str) -> None:
    if not isinstance(value, Mapping):
        raise LineageValidationError(f"Lineage field {where!r} must be an object.")
    for name, types in fields.items():
        if name not in value:
            raise LineageValidationError(f"Lineage field '{where}.{name}' is missing.")
        item = value[name]
        if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
            wanted = " or ".join("null" if t is _NULL else t.__name__ for t in types)
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


# -- building, reading, writing ------------------------------------------------------------------
def new_record(
    *,
    dataset: Mapping[str, Any] | None,
    model_repo: str,
    framework: Mapping[str, str],
    code: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> LineageJSON:
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


def fill_commit(record: Mapping[str, Any], commit: str) -> LineageJSON:
    """A copy of ``record`` with its pending (``null``) checkpoint commits set to ``commit``."""
    filled = copy.deepcopy(dict(record))
    for ckpt in filled.get("checkpoints", []):
        if ckpt.get("commit") is None:
            ckpt["commit"] = commit
    model = filled.get("model") or {}
    if model.get("path") is not None and model.get("commit") is None:
        model["commit"] = commit
    return filled


def read_lineage(source: str | os.PathLike[str] | Mapping[str, Any], *, at_commit: str | None = None) -> LineageJSON:
    """Read and validate a record from a file path, JSON text or mapping.

    ``at_commit``: the commit the file was read from, filling its pending ids.
    """
    return validate_lineage(_load(source, at_commit))


def _load(source: str | os.PathLike[str] | Mapping[str, Any], at_commit: str | None) -> Any:
    """The JSON of ``source`` (not yet validated), its pending commits filled with ``at_commit``."""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        text = str(source)
        data = parse_json(text) if text.lstrip().startswith("{") else parse_json(Path(source).read_text())
    if at_commit:
        data = fill_commit(data, at_commit)
    return data


def write_lineage(record: Mapping[str, Any] | LineageRecord, path: str | os.PathLike[str]) -> Path:
    """Validate and write ``record`` atomically (temp file + rename)."""
    data = record.to_json() if isinstance(record, LineageRecord) else record
    validate_lineage(data)
    target = Path(path)
    write_json_atomically(target, data, indent=2, make_parents=True)
    return target


# -- the records of a model repository ------------------------------------------------------------
def repo_records(model_repo: str | os.PathLike[str]) -> list[LineageJSON]:
    """The lineage records of every run in a model repository's working tree (unreadable ones skipped)."""
    background.wait_for(model_repo)  # a fit of this process may still be committing its final lineage
    found = (read_or_skip(path) for path in lineage_files(model_repo))
    return [record for record in found if record is not None]


def repo_record(model_repo: str | os.PathLike[str], run_name: str) -> LineageJSON | None:
    """The lineage record of run ``run_name`` in a model repository, if it is there and readable."""
    if not is_run_name(run_name):
        return None  # not a folder name: nothing outside the runs' folder is read
    background.wait_for(model_repo)
    path = Path(model_repo) / lineage_path(run_name)
    return read_or_skip(path) if path.is_file() else None


def read_or_skip(path: Path) -> LineageJSON | None:
    """The record at ``path``; ``None``, with a warning, when it cannot be read (one damaged run's
    record never stops reading the others)."""
    try:
        return read_lineage(path)
    except (OSError, ValueError, LineageValidationError) as exc:
        log.warning("Skipping unreadable lineage record %s: %s", path, exc)
        return None


def find_checkpoint_run(model_repo: str | os.PathLike[str],
                        commit: str) -> tuple[LineageJSON, dict[str, Any]] | None:
    """The run and checkpoint entry committed as ``commit`` (see :func:`checkpoint_in_commit`), if any."""
    for record in repo_records(model_repo):
        entry = checkpoint_in_commit(record, commit)
        if entry is not None:
            return record, entry
    return None


def checkpoint_in_commit(record: Mapping[str, Any], commit: str) -> dict[str, Any] | None:
    """The checkpoint of ``record`` that ``commit`` names, ``None`` when it holds none.

    Saves that waited together share a commit: the run's model when it is one of them, else
    their one training state (an epoch's checkpoint and ``last.ckpt`` of the same step).
    Raises ConfigurationError when the commit holds several steps and none is the model.
    """
    hits = [c for c in record["checkpoints"] if c["commit"] == commit]
    model = record.get("model") or {}
    chosen = next((c for c in hits if model.get("commit") == commit and c["path"] == model.get("path")), None)
    if chosen is not None:
        return chosen
    if len({c.get("step") for c in hits}) > 1:
        listed = ", ".join(f"{c['path']} (step {c.get('step')})" for c in hits)
        raise ConfigurationError(
            f"Commit {commit} holds {len(hits)} checkpoints of run {record['run'].get('name')!r} from different "
            f"steps: {listed}.",
            "name one: read it with `materialize_checkpoint(model_repo, commit=..., path=...)`, or pass the run's "
            "model commit (`oxen-callbacks lineage RUN`).")
    return hits[-1] if hits else None
