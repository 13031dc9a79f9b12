"""Get a published checkpoint (file or folder) back out of a model-repository commit, for any framework.

Example::

    from oxen_callbacks.checkpoints import materialize_checkpoint

    ckpt = materialize_checkpoint("models/reviews", run="20250101-120000-ab12cd", step=200)
    ckpt.path            # read-only folder (or file) holding exactly what was committed
    ckpt.dataset         # the dataset section recorded with it: repo, revision, commit, paths
    data = ckpt.pinned_dataset()             # PinnedDataset of that same dataset commit
    trainer.train(resume_from_checkpoint=str(ckpt.path))
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._oxen.layout import literal_name
from ._util import background
from ._util.fs import make_dirs_writable
from ._util.relpath import safe_relpath
from .errors import ConfigurationError
from .lineage import LineageJSON, checkpoint_in_commit, read_lineage, read_or_skip, repo_record
from .model_repo import lineage_files, lineage_path, run_of_checkpoint
from .pin import PinnedDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaterializedCheckpoint:
    """A checkpoint read from a model-repository commit.

    Attributes:
        path: the checkpoint file or folder on disk (read-only unless ``dest`` was given).
        commit: the model-repository commit it was read from.
        repo_path: its path inside the model repository.
        lineage: the run's lineage record as committed with it (``None`` outside ``runs/<run>/``).
    """

    path: Path
    commit: str
    repo_path: str
    lineage: LineageJSON | None

    @property
    def dataset(self) -> dict[str, Any] | None:
        """The dataset section recorded with the checkpoint (repo, revision, commit, paths)."""
        return self.lineage["dataset"] if self.lineage else None

    def pinned_dataset(self, **kwargs: Any) -> PinnedDataset:
        """A :class:`PinnedDataset` of the recorded dataset commit (``kwargs``: e.g. ``cache_dir``); the
        record names its server, so ``OXEN_API_KEY`` is not sent there (see ``named_by_record``)."""
        if not self.dataset:
            raise ConfigurationError(f"No dataset is recorded with checkpoint {self.repo_path!r} at {self.commit}.",
                                     "build the PinnedDataset yourself.")
        return PinnedDataset(self.dataset["repo"], revision=self.dataset["commit"], paths=self.dataset["paths"],
                             **{"named_by_record": True, **kwargs})


def materialize_checkpoint(
    model_repo: str | os.PathLike[str] | None = None,
    *,
    commit: str | None = None,
    path: str | None = None,
    run: str | None = None,
    lineage: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    step: int | None = None,
    dest: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MaterializedCheckpoint:
    """Read one checkpoint out of the model repository's history, without touching its working tree.

    Name the checkpoint in one of three ways:

    - ``commit`` and ``path`` (as listed in a lineage record's ``checkpoints``);
    - ``run``: a run folder ``runs/<run>/`` of ``model_repo``;
    - ``lineage``: a lineage record (mapping, JSON file or MLflow artifact ``oxen/lineage.json``;
      ``model_repo`` defaults to the one it names).

    With ``run`` or ``lineage``, ``step`` picks the checkpoint saved at that step; by
    default the record's final/best model.

    Args:
        dest: copy the checkpoint into this new folder, writable (default: return the
            read-only cached snapshot, shared by later calls; the HF Trainer and
            Lightning only read the checkpoint they resume from).
        cache_dir: snapshot cache root; default ``~/.cache/oxen-callbacks``.
    """
    if model_repo is not None:
        background.wait_for(model_repo)  # a fit of this process may still be committing its final lineage
    record = _record(model_repo, run, lineage)
    named_by_record = False  # (a repository the record names, not you: OXEN_API_KEY is not sent there)
    if record is not None:
        if commit or path:
            raise ConfigurationError("Pass either commit= and path=, or run=/lineage=, not both.")
        named_by_record = model_repo is None
        model_repo = model_repo or record["model"]["repo"]
        commit, path = _pick(record, step)
    if not (model_repo and commit and path):
        raise ConfigurationError(
            "materialize_checkpoint() needs the model repository and which checkpoint to read.",
            "pass model_repo with commit= and path=, or with run=, or pass lineage=.",
        )
    path = safe_relpath(path, what="checkpoint path")
    run = run_of_checkpoint(path)
    wanted = [path, lineage_path(run)] if run else [path]
    snapshot = CheckpointSnapshot(model_repo, revision=commit, paths=wanted, cache_dir=cache_dir,
                                  named_by_record=named_by_record)
    source = snapshot.file(path)
    committed = read_lineage(snapshot.file(wanted[1]), at_commit=snapshot.commit) if run else None
    return MaterializedCheckpoint(path=_copy(source, Path(dest)) if dest is not None else source,
                                  commit=snapshot.commit, repo_path=path, lineage=committed)


class CheckpointSnapshot(PinnedDataset):
    """A pin of checkpoint files: its errors name the model repository."""

    ROLE = "model repository"


def _record(model_repo: str | os.PathLike[str] | None, run: str | None,
            lineage: str | os.PathLike[str] | Mapping[str, Any] | None) -> LineageJSON | None:
    if run is not None and lineage is not None:
        raise ConfigurationError("Pass run= or lineage=, not both.")
    if run is None:
        return read_lineage(lineage) if lineage is not None else None
    if model_repo is None:
        raise ConfigurationError(f"run={run!r} needs model_repo= (the repository holding runs/{run}/).")
    file = Path(model_repo) / lineage_path(safe_relpath(run, what="run name"))
    if not file.is_file():
        raise ConfigurationError(f"The model repository {str(model_repo)!r} has no run {run!r} ({file} is missing).",
                                 "pass a run name from its runs/ folder (or the lineage record's run.name).")
    return read_lineage(file)


def _pick(record: LineageJSON, step: int | None) -> tuple[str, str]:
    if step is None:
        chosen = record["model"]
    else:
        saved = [c for c in record["checkpoints"] if c["step"] == step]
        if not saved:
            steps = sorted({c["step"] for c in record["checkpoints"] if c["step"] is not None})
            raise ConfigurationError(f"No checkpoint of run {record['run'].get('name')!r} was saved at step={step}.",
                                     f"pick one of the saved steps: {steps}.")
        chosen = saved[-1]
    if not chosen.get("commit") or not chosen.get("path"):
        raise ConfigurationError(f"The lineage record names no committed checkpoint (step={step}).",
                                 "was any checkpoint saved? See its 'checkpoints' list.")
    return chosen["commit"], chosen["path"]


def _copy(source: Path, dest: Path) -> Path:
    """A writable copy of the read-only snapshot ``source`` at the new path ``dest``."""
    if dest.exists():
        raise ConfigurationError(f"dest={str(dest)!r} already exists.", "pass a new folder path.")
    if source.is_dir():
        shutil.copytree(source, dest, copy_function=shutil.copyfile)
        make_dirs_writable(dest)  # (copytree copied the snapshot's read-only folder modes)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    return dest


def resolve_resume(model_repo: str | os.PathLike[str], resume_from: str | os.PathLike[str] | Mapping[str, Any],
                   *, cache_dir: str | os.PathLike[str] | None = None) -> MaterializedCheckpoint:
    """The checkpoint a resumed fit starts from, named the way users name it.

    ``resume_from``: ``"latest"`` (the newest committed checkpoint of any run), a run
    name (its last committed checkpoint: a killed run resumes where its commits stop),
    a checkpoint commit id, or a lineage record (mapping or path of a ``lineage.json``).
    """
    background.wait_for(model_repo)  # a fit of this process may still be committing its final lineage
    if isinstance(resume_from, Mapping) or str(resume_from).endswith(".json"):
        return materialize_checkpoint(model_repo, lineage=resume_from, cache_dir=cache_dir)
    text = str(resume_from)
    records = sorted(lineage_files(model_repo), key=lambda p: p.stat().st_mtime)
    if text == "latest":
        newest = next((record for p in reversed(records)  # (newest first: older records are not read)
                       if (record := read_or_skip(p)) is not None and record["checkpoints"]), None)
        if newest is None:
            raise ConfigurationError(f"resume_from='latest': the model repository {str(model_repo)!r} has no "
                                     "committed checkpoint yet.", "train once without resume_from.")
        return _last_of(model_repo, newest, cache_dir)
    if text in ("", ".", "..") or "/" in text or "\\" in text:
        raise ConfigurationError(
            f"resume_from={text!r} is not a plain run name: nothing outside the model repository's runs/ is read.",
            "pass 'latest', a run name as it appears under runs/ (e.g. '20250101-120000-ab12cd'), "
            "a checkpoint commit id, or the path of a lineage.json.",
        )
    named = Path(model_repo) / lineage_path(text)
    if named.is_file():
        try:
            record = read_lineage(named)
        except (OSError, ValueError) as exc:  # (a cut-off or overwritten file, a hand edit)
            raise ConfigurationError(
                f"resume_from={text!r}: the lineage record {named} of that run cannot be read ({exc}).",
                "restore the file from the model repository's last commit, or pass a checkpoint commit id of the run.",
            ) from None
        return _last_of(model_repo, record, cache_dir)
    for file in reversed(records):
        if (record := read_or_skip(file)) is None:
            continue
        commit = next((c["commit"] for c in reversed(record["checkpoints"])
                       if c["commit"] and c["commit"].startswith(text) and len(text) >= 7), None)
        if commit is not None:
            entry = checkpoint_in_commit(record, commit)  # (several saves may share the commit)
            return materialize_checkpoint(model_repo, commit=commit, path=entry["path"], cache_dir=cache_dir)
    raise ConfigurationError(
        f"resume_from={text!r} names no run or checkpoint commit of the model repository {str(model_repo)!r}.",
        "pass 'latest', a run name from its runs/ folder, a checkpoint commit id, or a lineage.json.",
    )


def _last_of(model_repo: str | os.PathLike[str], record: LineageJSON,
             cache_dir: str | os.PathLike[str] | None) -> MaterializedCheckpoint:
    committed = [c for c in record["checkpoints"] if c.get("commit")]
    last = max((i for i, c in enumerate(record["checkpoints"]) if c.get("commit")), default=None)
    unnamed = [c["path"] for c in record["checkpoints"][last + 1:]] if last is not None else []
    if unnamed and record.get("status") not in (None, "RUNNING"):
        # A finished run's record as its last commit wrote it (a clone: the training machine's copy
        # names every commit) cannot name the commit it is in: those checkpoints are in it, unnamed.
        # Resuming from the last one it names would silently start from an older checkpoint.
        raise ConfigurationError(
            f"Run {record['run'].get('name')!r}: its record names no commit for its newest checkpoint(s) "
            f"{unnamed[:3]}, committed with the record itself (a clone of the model repository), so the "
            "checkpoint to resume from cannot be told from it.",
            "resume on the machine that trained the run, or materialize_checkpoint(model_repo, commit=<the commit "
            "that holds it, from `oxen log`>, path=<its path>) and pass that checkpoint's path.")
    if not committed:
        raise ConfigurationError(f"Run {record['run'].get('name')!r} has no committed checkpoint to resume from.",
                                 "pick another run, or train without resume_from.")
    last = committed[-1]
    return materialize_checkpoint(model_repo, commit=last["commit"], path=last["path"], cache_dir=cache_dir)


def committed_checkpoint(model_repo: str | None, run: str | None, *, step: int | None, name: str,
                         size: int | None = None, local: str | None = None) -> dict[str, Any] | None:
    """The committed checkpoint of run ``run`` in ``model_repo`` saved at ``step`` as ``name`` (its
    file or folder name), per the repository's record, ``size`` bytes when given: what a resumed fit's
    weights come from. ``local``: the file or folder read, whose bytes that commit must hold (one
    changed since it was committed is not that commit's). ``None`` when the repository, the record
    or such a checkpoint is not there, and when several commits hold one and ``local`` cannot tell
    which was read (a continued run saved it again): naming the newest could name weights never read."""
    record = repo_record(model_repo, run) if model_repo and run and step is not None else None
    if record is None:
        return None
    hits = [c for c in record["checkpoints"] if c["commit"] and c.get("step") == step
            and os.path.basename(c["path"]) == literal_name(name) and (size is None or c.get("bytes") in (None, size))]
    if local is not None and os.path.exists(local):
        return _newest_holding(model_repo, hits, Path(local))
    if len({c["commit"] for c in hits}) > 1:
        log.warning("Run %s saved %s at step %s more than once (commits %s): the resumed checkpoint's commit "
                    "is not recorded, as which of them was read cannot be told.", run, name, step,
                    ", ".join(c["commit"][:12] for c in hits))
        return None
    return {"commit": hits[-1]["commit"], "path": hits[-1]["path"]} if hits else None


def committed_source(model_repo: str | os.PathLike[str], run: str | None, source: str, *,
                     hops: int = 20) -> dict[str, Any] | None:
    """The committed checkpoint the trainer saved at ``source`` (an absolute path that still holds its
    bytes) in run ``run`` of ``model_repo``, or in a run it was resumed from, and so on back: the
    best checkpoint a Trainer loads at its end may come from before a resume. ``None`` if none."""
    seen: set[str] = set()
    while run and run not in seen and len(seen) < hops:
        seen.add(run)
        record = repo_record(model_repo, run)
        if record is None:
            return None
        hits = [c for c in record["checkpoints"] if c["commit"] and c.get("source") == source]
        if found := _newest_holding(model_repo, hits, Path(source)):
            return found
        earlier = record.get("resumed_from") or {}
        run = earlier.get("run_name") if earlier.get("model_repo") == str(model_repo) else None
    return None


def _newest_holding(model_repo: str | os.PathLike[str], hits: list[dict[str, Any]], local: Path) -> dict[str, Any] | None:
    """``{"commit", "path"}`` of the newest of ``hits`` whose commit holds ``local``'s bytes (only the
    newest few are looked at: a hash each)."""
    held = [c for c in hits[-3:] if _holds(str(model_repo), c, local)]
    return {"commit": held[-1]["commit"], "path": held[-1]["path"]} if held else None


def _holds(model_repo: str, entry: dict[str, Any], local: Path) -> bool:
    """Whether ``local`` (a file, or a folder) has the bytes ``entry``'s commit holds at its path."""
    from ._oxen.tree import PathNotInCommit, UnreadableTree, files_at

    try:
        committed = {f.path: f for f in files_at(model_repo, entry["commit"], [entry["path"]])[entry["path"]].files}
    except (PathNotInCommit, UnreadableTree, OSError):
        return False  # not verifiable: not named
    if local.is_file():
        mine = {entry["path"]: local}
    else:
        mine = {f"{entry['path']}/{p.relative_to(local).as_posix()}": p for p in local.rglob("*") if p.is_file()}
    return mine.keys() == committed.keys() and all(committed[rel].held_by(path) for rel, path in mine.items())
