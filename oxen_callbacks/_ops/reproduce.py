"""Reading data for `reproduce` (a run's exact inputs and weights) and `diff` (two runs' data).

Both read commits through :class:`~oxen_callbacks.PinnedDataset` snapshots, so the
repositories' working trees, HEADs and branches are never touched; row-level
diffs run ``oxen.diff`` on the snapshot files in a child process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from .._oxen import child as oxen_child
from .._oxen import diff as oxen_diff
from .._oxen.commit_id import checked_commit_id
from .._util.relpath import covers
from ..checkpoints import CheckpointSnapshot
from ..errors import ConfigurationError
from ..names import LINEAGE_ARTIFACT
from ..pin import PinnedDataset

_GIT_COMMIT = re.compile(r"^[0-9a-fA-F]{7,40}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TABULAR = {".csv", ".tsv", ".parquet", ".jsonl", ".ndjson", ".arrow"}


# -- reproduce ----------------------------------------------------------------------------------
def reproduce(view: dict[str, Any], dest: str | os.PathLike[str], *,
              cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Copy the run's dataset snapshot to ``dest/data`` and its final checkpoint to ``dest/model``.

    Also writes ``dest/lineage.json``; returns what was written and how to rerun.
    """
    target = Path(dest).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigurationError(f"--to {str(dest)!r} exists and is not an empty folder.",
                                 "pass a new or empty folder, e.g. --to repro-<run>.")
    dataset, model, code = view.get("dataset"), view["model"], view.get("code") or {}
    if not model.get("commit") and not dataset:
        raise ConfigurationError("This run recorded neither a dataset nor a committed checkpoint: nothing to reproduce.")
    # every check (paths, commits) before anything is written; a failure after leaves no half copy
    data_pin = _pinned(dataset["repo"], dataset["commit"], dataset["paths"], cache_dir) if dataset else None
    has_model = bool(model.get("commit") and model.get("path"))
    model_pin = (_pinned(model["repo"], model["commit"], [model["path"]], cache_dir, kind=CheckpointSnapshot)
                 if has_model else None)
    made = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        result = _copy_run(target, dataset, model, data_pin, model_pin)
    except BaseException:
        for written in [target] if made else list(target.iterdir()):
            _remove(written)
        raise
    record = {k: v for k, v in view.items() if k not in ("source", "matched_checkpoints")}
    (target / "lineage.json").write_text(json.dumps(record, indent=2) + "\n")
    result["code"] = {"git_commit": code.get("git_commit"), "git_dirty": code.get("git_dirty"),
                      "command": code.get("command"), "cwd": code.get("cwd"),
                      **({"notebook": code["notebook"]} if code.get("notebook") else {})}
    result["rerun"], result["rerun_left_out"] = _rerun_command(view)
    if dataset and dataset.get("revision") not in (None, dataset["commit"]):
        result["note"] = (f"The run asked for revision {dataset['revision']!r}, which may have moved: pin "
                          f"revision={dataset['commit']!r} to read the same data, or use {target / 'data'}.")
    return result


def _copy_run(target: Path, dataset: dict[str, Any] | None, model: dict[str, Any], data_pin: PinnedDataset | None,
              model_pin: PinnedDataset | None) -> dict[str, Any]:
    """Copy the pinned data to ``target/data`` and the checkpoint to ``target/model``; what was written."""
    result: dict[str, Any] = {"dir": str(target), "dataset": None, "model": None}
    if dataset and data_pin:
        files = _copy_paths(data_pin.pull_intact(), data_pin.paths, target / "data")
        result["dataset"] = {"repo": dataset["repo"], "commit": dataset["commit"], "paths": data_pin.paths,
                             "folder": str(target / "data"), "files": files}
    if model_pin:
        _copy_paths(model_pin.pull_intact(), [model["path"]], target / "model", flatten=True)
        result["model"] = {"repo": model["repo"], "commit": model["commit"], "path": model["path"],
                           "file": str(target / "model" / Path(model["path"]).name)}
    return result


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _pinned(repo: Any, commit: str, paths: list[str] | None, cache_dir: str | os.PathLike[str] | None, *,
            kind: type[PinnedDataset] = PinnedDataset) -> PinnedDataset:
    """The recorded commit of ``repo``, exactly: a record naming a branch (or a server answering
    another commit) would hand back data the run never read."""
    what = "dataset" if kind is PinnedDataset else "model"
    if not isinstance(repo, str) or not repo.strip():
        raise ConfigurationError(f"The run's record names its {what} commit {commit} but no {what} repository "
                                 f"(repo = {repo!r}: its oxen.{what}.repo tag is missing or edited).",
                                 "pass --model-repo PATH of the repository that holds the run, or fix the tag.")
    checked_commit_id(commit, what=f"The run's record of {repo}")
    if paths is None:  # (a record rebuilt from tags that only count them: the whole commit would be more)
        raise ConfigurationError(f"The run's record of {repo} does not list its dataset paths: they were too many for "
                                 f"an MLflow tag, and its {LINEAGE_ARTIFACT} artifact could not be read.",
                                 "check that the MLflow store holds the run's artifacts, or pass --model-repo PATH.")
    pin = kind(repo, revision=commit, paths=paths, cache_dir=cache_dir, named_by_record=True)
    if pin.commit != commit:
        raise ConfigurationError(f"{repo} resolved the recorded commit {commit} to {pin.commit}.",
                                 "check that the record names the right repository.")
    return pin


def _rerun_command(view: dict[str, Any]) -> tuple[str | None, list[str]]:
    """``cd <cwd> && git checkout <commit> && <command>`` with every word quoted, and what was left out why.

    The record is untrusted input (anyone who can write the model repository or the MLflow run
    can change it): a commit that is not 7-40 hex digits and a command that does not parse as
    shell words (or that hold control characters) are left out rather than printed to run.
    """
    code = view.get("code") or {}
    steps, left_out = [], []
    if code.get("cwd") and _CONTROL.search(str(code["cwd"])):
        left_out.append("the recorded working folder holds control characters: no `cd` printed")
    elif code.get("cwd"):
        steps.append(shlex.join(["cd", str(code["cwd"])]))
    commit = code.get("git_commit")
    if is_git_commit(commit):
        steps.append(shlex.join(["git", "checkout", commit]))
    elif commit:
        left_out.append(f"the recorded code commit {str(commit)[:80]!r} is not a git commit id (7-40 hex digits): "
                        "no checkout printed; find the code version yourself")
    if code.get("notebook") and not code.get("command"):
        left_out.append(f"the run was trained in a Jupyter notebook ({str(code['notebook'])[:200]!r}): "
                        "no command to print; run that notebook's cells again")
    if code.get("command"):
        try:
            words = shlex.split(str(code["command"]))
        except ValueError as exc:
            words = None
            left_out.append(f"the recorded command does not parse as shell words ({exc}): not printed as runnable")
        if words is not None and any(_CONTROL.search(w) for w in words):
            words = None
            left_out.append("the recorded command holds control characters: not printed as runnable")
        if words:
            steps.append(shlex.join(words))
    return " && ".join(steps) or None, left_out


def is_git_commit(value: Any) -> bool:
    """Whether ``value`` can only be a git commit id (7-40 hex digits), safe to print in a shell line."""
    return isinstance(value, str) and _GIT_COMMIT.match(value) is not None


def _copy_paths(snapshot: Path, paths: list[str], dest: Path, *, flatten: bool = False) -> int:
    """Copy ``paths`` of a snapshot as plain writable files; returns the number of files."""
    count = 0
    for rel in paths:
        source = snapshot if rel == "." else snapshot / rel
        out = dest / (source.name if flatten else ("" if rel == "." else rel))
        for file in [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()):
            target = out if file == source else out / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            count += 1
    return count


# -- diff ---------------------------------------------------------------------------------------
def diff_runs(view_a: dict[str, Any], view_b: dict[str, Any], *, keys: list[str] | None = None, limit: int = 20,
              cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Files added/removed/modified between two runs' datasets, and changed rows of tabular files."""
    sides = []
    for view in (view_a, view_b):
        dataset = view.get("dataset")
        if not dataset:
            raise ConfigurationError(f"Run {_run_label(view)!r} recorded no dataset: there is nothing to compare.")
        pin = _pinned(dataset["repo"], dataset["commit"], dataset["paths"], cache_dir)
        sides.append((pin, _hashes(pin)))
    (pin_a, files_a), (pin_b, files_b) = sides
    modified = sorted(p for p in files_a.keys() & files_b.keys() if files_a[p] != files_b[p])
    result: dict[str, Any] = {
        "a": {"run": _run_label(view_a), "repo": pin_a.source.location, "commit": pin_a.commit, "paths": pin_a.paths},
        "b": {"run": _run_label(view_b), "repo": pin_b.source.location, "commit": pin_b.commit, "paths": pin_b.paths},
        "same_commit": pin_a.commit == pin_b.commit,
        "files": {"added": sorted(files_b.keys() - files_a.keys()), "removed": sorted(files_a.keys() - files_b.keys()),
                  "modified": modified},
        "rows": {},
    }
    tables = [p for p in modified if Path(p).suffix.lower() in TABULAR]
    if tables:
        pairs = [(str(pin_a.path / p), str(pin_b.path / p)) for p in tables]
        found = oxen_child.run_in_child(oxen_diff.table_diffs, pairs=pairs, keys=keys or [], limit=limit)
        result["rows"] = dict(zip(tables, found, strict=True))
        read = [(path, table) for path, table in result["rows"].items() if table["schema"] is not None]
        if keys and read and all(table["missing_keys"] for _, table in read):  # in none of them: a typo
            path, table = read[0]
            raise ConfigurationError(f"--keys {','.join(keys)!r} cannot compare {path}: {table['error']}.",
                                     "name key columns both runs' tables hold, or leave --keys out to compare "
                                     "whole rows.")
    return result


def _run_label(view: dict[str, Any]) -> str:
    return view["run"].get("mlflow_run_id") or view["run"].get("name") or "?"


def _hashes(pin: PinnedDataset) -> dict[str, str]:
    """``{relative path: content hash}`` of every file under the pinned paths, as checked by
    :meth:`PinnedDataset.pull_intact` (a damaged snapshot is made again, never compared)."""
    pin.pull_intact()
    recorded = pin.store.hashes(pin.commit) or {}
    return {rel: digest for rel, digest in sorted(recorded.items()) if any(covers(p, rel) for p in pin.paths)}
