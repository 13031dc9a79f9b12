"""The on-disk journal of a run's MLflow operations.

The training process only writes operations here (see :mod:`.sink`); a separate
sink process (:mod:`.sink_process`) carries them out in order with retries
(:mod:`.apply`), so neither MLflow's import (~150 MB, ~2 s) nor a slow or dead
tracking server touches training. What it cannot do stays on disk for
``oxen-callbacks sync``. Tracking-server credentials only ever travel in the
environment; the journal holds the URI without them.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from .._util.fs import DamagedFile, parse_json, read_json_object, write_atomically, write_json_atomically
from .._util.locks import FileLock, is_locked
from .._util.processes import ENTRY_POINTS
from ..names import LINEAGE_ARTIFACT_NAME

ABANDONED_SEQ = 999_999  # the last operation of a journal whose training process died
#: What the training run tells its sink besides a bare newline (new operations): the run ended;
#: its training is over (nothing needs the CPU any more: apply operations as they come).
END_LINE, TRAINING_OVER_LINE = "end\n", "trained\n"
META_FIT_STARTED_MS = "fit_started_ms"  # journal meta: when its fit started (ms since 1970), see TAG_FIT
#: journal meta: true for a run another program started and ends (``$MLFLOW_RUN_ID``'s): never terminated here
META_ENDED_BY_ITS_OWNER = "ended_by_its_owner"
#: journal meta: true for a run the fit joined (an ``MLFlowLogger``'s, the active one): other Oxen runs may log to it
META_JOINED_RUN = "joined_run"


def fit_tag(started_ms: int, fit_id: str) -> str:
    """The ``oxen.fit`` tag's value (:data:`~oxen_callbacks.names.TAG_FIT`)."""
    return f"{started_ms}:{fit_id}"


_META_STRINGS = ("run_id", "experiment_id", "model_repo", "oxen_run")  # each a string when given


def json_artifact_problem(op: dict[str, Any]) -> str | None:
    """Why a ``log_json`` operation cannot be carried out as written (``None``: it can). Its file is
    written under a temporary folder by name: a path there (edited in by hand or by someone else)
    would write over any file the user can write."""
    name, folder, data = op.get("name"), op.get("artifact_dir"), op.get("data")
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        return f"names the file {name!r} to log, not a plain file name"
    if not isinstance(folder, str) or not _plain_relative(folder):
        return f"names the artifact folder {folder!r}, not a relative folder of the run"
    if not isinstance(data, dict):
        return f"holds data = {data!r:.60}, not an object"
    return None


_STR, _INT, _NONE = (str,), (int,), (type(None),)
#: What each journaled operation holds besides ``op``: its fields' JSON types, a field that may not be
#: null required (``log_json`` and the lineage records of ``mark_models`` / ``publish_extras`` are
#: checked further).
_OP_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "create_run": {"run_name": _STR + _NONE, "experiment_id": _STR + _NONE, "experiment_name": _STR + _NONE,
                   "tags": (dict, *_NONE)},  # (a token not a string is ignored: no twin is looked for)
    "set_tags": {"tags": (dict,)},
    "log_json": {},
    "end_run": {"status": _STR},
    "finish_abandoned": {"status": _STR + _NONE, "terminate": (bool, *_NONE)},
    "log_model": {"commit": _STR, "path": _STR, "model_repo": _STR, "time_ms": _INT, "step": _INT + _NONE,
                  "epoch": _INT + _NONE, "metrics": (dict, *_NONE), "run": _STR + _NONE, "fit_id": _STR + _NONE,
                  "dataset": (dict, *_NONE), "same_model_as": _STR + _NONE},
    "mark_models": {"record": (dict,), "best_path": _STR + _NONE},
    "publish_extras": {"record": (dict,), "register_model": _STR + _NONE, "dataset_input": (bool, *_NONE),
                       "graph": (bool, *_NONE)},
}


def op_problem(op: dict[str, Any]) -> str | None:
    """Why a journaled operation cannot be carried out as written (``None``: it can): an unknown
    operation, a field of the wrong kind (edited by hand or by someone else) would fail every
    ``sync`` after it, or do what its writer never asked."""
    kind = op.get("op")
    if not isinstance(kind, str) or kind not in _OP_FIELDS:
        return f"names no operation this version knows (op = {kind!r:.60})"
    for name, types in _OP_FIELDS[kind].items():
        if name not in op and type(None) in types:  # (optional)
            continue
        value = op.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"holds {name} = {value!r:.60}, not what a {kind} operation holds there"
    if kind == "log_json" and (problem := json_artifact_problem(op)):
        return problem
    if kind == "log_model" and (problem := _dataset_problem(op.get("dataset"))):
        return f"holds a dataset {problem}"
    record = op["data"] if kind == "log_json" and op["name"] == LINEAGE_ARTIFACT_NAME else op.get("record")
    if record is not None and (problem := _record_problem(record)):
        return f"holds a lineage record {problem}"
    return None


def _dataset_problem(dataset: Any) -> str | None:
    """What in a journaled dataset pointer (``None``: none) MLflow's dataset input cannot be made from."""
    if dataset is None:
        return None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("repo"), str) \
            or not isinstance(dataset.get("commit"), str) or not isinstance(dataset.get("paths"), (list, type(None))):
        return f"{dataset!r:.60} that names no repository and commit"
    return None


def _record_problem(record: dict[str, Any]) -> str | None:
    """What in a journaled lineage record the MLflow side cannot read: its sections and each
    checkpoint's path and commit (what the training process wrote always reads)."""
    for section in ("run", "model"):
        if not isinstance(record.get(section), dict):
            return f"whose {section} is {record.get(section)!r:.60}, not an object"
    if problem := _dataset_problem(record.get("dataset")):
        return f"whose dataset {problem}"
    checkpoints = record.get("checkpoints")
    if not isinstance(checkpoints, list):
        return f"whose checkpoints are {checkpoints!r:.60}, not a list"
    for entry in checkpoints:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("commit"), (str, type(None))):
            return f"with a checkpoint {entry!r:.60} that names no path and commit"
    return None


def _plain_relative(folder: str) -> bool:
    parts = folder.split("/")
    return "\0" not in folder and "\\" not in folder and all(p not in ("", ".", "..") for p in parts)


class MlflowJournal:
    """The not-yet-done MLflow operations of one training run, on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # (not created here: a finished journal's folder must not come back)

    @classmethod
    def create(cls, cache_dir: Path, meta: dict[str, Any], *, trainer: bool = False) -> "MlflowJournal":
        """A new journal for ``meta``'s run; ``trainer``: the calling training process holds
        :attr:`trainer_lock_path` (from before ``sync`` can list it) until :meth:`release_trainer`."""
        journal = cls(cache_dir / "mlflow-journal" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        journal.recreate(meta, trainer=trainer)
        return journal

    def recreate(self, meta: dict[str, Any], *, trainer: bool = False) -> None:
        """Make (or make again, after someone removed it) the folder, then write ``meta``: listed by
        ``sync`` only from then on."""
        (self.folder / "ops").mkdir(parents=True, exist_ok=True)
        if trainer:
            self.release_trainer()  # a lock on a removed folder's file protects nothing
            self._trainer_lock = FileLock(self.trainer_lock_path)
            self._trainer_lock.acquire(blocking=False)
        self.write_meta(meta)

    @property
    def trainer_lock_path(self) -> Path:
        """Held by the training process for its whole life: ``sync`` never touches its journal."""
        return self.folder / "trainer.lock"

    def release_trainer(self) -> None:
        lock = getattr(self, "_trainer_lock", None)
        if lock is not None:
            lock.release()

    def trainer_alive(self) -> bool:
        return is_locked(self.trainer_lock_path)

    def note_fit(self, fit_id: str) -> None:
        """The fit (``fit_id`` of its lineage record) this journal logs: its own file, never racing the
        sink process's writes of ``meta.json``."""
        write_atomically(self.folder / "fit_id", fit_id)

    def fit_id(self) -> str | None:
        """What :meth:`note_fit` noted (``None``: not noted, a journal of an older version)."""
        try:
            return (self.folder / "fit_id").read_text() or None
        except OSError:
            return None

    def mark_ended(self) -> None:
        """The training side ended the run (it called ``end``): nothing of it was abandoned."""
        (self.folder / "ended").touch()

    def abandoned(self) -> bool:
        """Its training process died without ending a run it commits checkpoints for, and no sink
        process lived to say so (the whole job killed at once): ``finish_abandoned`` is due.
        Call only when neither the trainer nor a sink process is alive."""
        try:
            if (self.folder / "ended").exists() or not self.meta().get("model_repo"):
                return False
        except FileNotFoundError:
            return False  # forgotten meanwhile by the sink process that finished it
        return not any(op.get("op") == "finish_abandoned" for _, op in self.pending())

    @property
    def lock_path(self) -> Path:
        """Held by the process still working on this journal (``sync`` leaves it alone)."""
        return self.folder / "owner.lock"

    def meta(self) -> dict[str, Any]:
        """The run this journal logs to (kept in memory too: a finished journal's folder is deleted)."""
        try:
            self._meta = parse_json((self.folder / "meta.json").read_text())
        except FileNotFoundError:
            if not hasattr(self, "_meta"):
                raise
        return dict(self._meta)

    def damage(self) -> str | None:
        """What makes this journal unreadable (a file cut short or edited by hand), or ``None``.

        ``sync`` skips a damaged journal and leaves it as it is for its owner to look at.
        """
        try:
            meta = read_json_object(self.folder / "meta.json")
        except FileNotFoundError:
            meta = {"tracking_uri": ""}  # forgotten meanwhile: nothing left to read
        except DamagedFile as exc:
            return str(exc)
        if not isinstance(meta.get("tracking_uri"), str):
            return f"meta.json holds tracking_uri = {meta.get('tracking_uri')!r}, not a string"
        for key in _META_STRINGS:
            if meta.get(key) is not None and not isinstance(meta[key], str):
                return f"meta.json holds {key} = {meta[key]!r}, not a string"
        for path in self._op_files():
            try:
                op = read_json_object(path)
            except FileNotFoundError:
                continue
            except DamagedFile as exc:
                return f"ops/{exc}"
            if problem := op_problem(op):
                return f"ops/{path.name} {problem}"
        return None

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomically(self.folder / "meta.json", meta)
        self._meta = dict(meta)

    def put(self, seq: int, op: dict[str, Any]) -> Path:
        path = self.folder / "ops" / f"{seq:06d}.json"
        write_json_atomically(path, op)
        return path

    def _op_files(self) -> list[Path]:
        """The journaled operation files in order; none once the folder is gone (a finished journal)."""
        ops = self.folder / "ops"
        try:
            names = os.listdir(ops)
        except FileNotFoundError:
            return []
        return [ops / name for name in sorted(names) if name.endswith(".json") and not name.startswith(".")]

    def pending(self) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for path in self._op_files():
            try:
                found.append((path, parse_json(path.read_text())))
            except FileNotFoundError:
                continue  # done (and deleted) meanwhile
        return found

    def batches(self) -> list[tuple[list[Path], dict[str, Any]]]:
        """The pending operations in order, as few MLflow requests as the order allows; returns
        ``(op files, operation)`` pairs.

        In a stretch of ``set_tags`` and ``log_model`` operations (what each committed checkpoint
        journals) the tags are merged into one ``set_tags`` (MLflow takes at most 100 tags per
        request) and the models into one ``log_models``: neither depends on the other, and a later
        tag wins as it would have. Any other operation keeps its place.
        """
        merged: list[tuple[list[Path], dict[str, Any]]] = []
        tags: list[tuple[list[Path], dict[str, Any]]] = []
        models: tuple[list[Path], dict[str, Any]] | None = None
        for path, op in [*self.pending(), (None, None)]:
            if op is not None and op["op"] == "set_tags":
                last = tags[-1][1]["tags"] if tags else None
                if last is not None and len({**last, **op["tags"]}) <= 100:
                    tags[-1] = ([*tags[-1][0], path], {"op": "set_tags", "tags": {**last, **op["tags"]}})
                else:
                    tags.append(([path], op))
                continue
            if op is not None and op["op"] == "log_model":
                models = ([path], {"op": "log_models", "ops": [op]}) if models is None else (
                    [*models[0], path], {"op": "log_models", "ops": [*models[1]["ops"], op]})
                continue
            merged += tags + ([models] if models else [])  # the stretch ends here
            tags, models = [], None
            if op is not None:
                merged.append(([path], op))
        return merged

    def is_empty(self) -> bool:
        """Nothing left to do: no operation journaled, or the folder already forgotten by the sink process."""
        return not self._op_files()

    def write_sink_pid(self, pid: int) -> None:
        (self.folder / "sink.pid").write_text(str(pid))

    def sink_alive(self) -> bool:
        """Whether the sink process given this journal still lives (it may still be importing MLflow,
        before it takes :attr:`lock_path`)."""
        try:
            pid = int((self.folder / "sink.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False  # no pid, gone, or no /proc: the lock alone tells
        return ENTRY_POINTS["mlflow-sink"].encode() in cmdline

    @property
    def status_path(self) -> Path:
        return self.folder / "status.json"

    def status(self) -> dict[str, Any]:
        """What the sink process reports: ``{"gave_up": bool, "last_error": str | None}``."""
        try:
            return parse_json(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def write_status(self, **status: Any) -> None:
        if status == getattr(self, "_status", None):
            return  # what this object wrote last (after each operation applied: the same "no error")
        try:
            write_json_atomically(self.status_path, status)
        except FileNotFoundError:
            return  # the folder was removed (a cleaned cache): the training side makes it again
        self._status = status


def journals(cache_dir: Path) -> list[Path]:
    """Every MLflow journal folder under ``cache_dir``, oldest first."""
    root = Path(cache_dir) / "mlflow-journal"
    return sorted(p for p in root.iterdir() if (p / "meta.json").exists()) if root.is_dir() else []
