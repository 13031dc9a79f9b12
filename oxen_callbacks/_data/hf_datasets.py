"""Load the files of a pinned commit as Hugging Face ``datasets``, cached per commit.

``datasets`` caches a local file by its path and modification time, so reading
``train.jsonl`` of one commit after another can serve the first commit's Arrow
cache (the ``load_dataset(revision=...)`` pitfall). Here the files are those of
the commit's read-only snapshot folder, and the builder config is named
``oxen-<commit>``: the commit is part of the cache folder and so of every
fingerprint derived from it (``.map()`` caches included).

Example::

    pin = PinnedDataset("data/reviews", revision="main", paths=["train.jsonl", "eval.jsonl"])
    splits = pin.load_dataset()                # DatasetDict({"train": ..., "eval": ...}), one split per file
    train = pin.load_dataset({"train": "data/train-*.parquet"}, split="train")   # a Dataset
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .._util.relpath import covers, safe_relpath
from ..errors import ConfigurationError

log = logging.getLogger(__name__)

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_CONFIG_PREFIX = "oxen-"
_COMMIT_IN_PATH = re.compile(rf"^{_CONFIG_PREFIX}([0-9a-f]{{4,32}})(?:-[0-9a-f]+)?$")
_RESERVED = {"path": "the builder is chosen from the file extensions",
             "name": f"the config name is {_CONFIG_PREFIX}<commit>, the cache key",
             "data_dir": "name the files in data_files",
             "revision": "the revision is the pin's: PinnedDataset(repo, revision=...)"}

DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]


class PinnedFiles(Protocol):
    """What :func:`load_pinned` reads of a pinned dataset (a :class:`~oxen_callbacks.PinnedDataset`)."""

    @property
    def commit(self) -> str:
        """The pinned commit id."""
        ...

    @property
    def paths(self) -> list[str]:
        """The pinned repository-relative paths."""
        ...

    @property
    def path(self) -> Path:
        """The snapshot folder (the repository root as of the commit), materialized."""
        ...

    def file(self, rel_path: str) -> Path:
        """Absolute path of ``rel_path`` in the snapshot; raises unless it lies in the pinned paths."""
        ...

    def files(self) -> list[Path]:
        """Every file of the pinned paths, sorted."""
        ...


def load_pinned(pin: PinnedFiles, data_files: DataFiles | None = None, *, cache_dir: str | os.PathLike[str],
                location: str, **kwargs: Any) -> Any:
    """The pinned commit's CSV / JSON Lines / Parquet files through ``datasets.load_dataset``.

    Args:
        pin: the pinned dataset.
        data_files: repository-relative files or glob patterns, as in ``datasets``
            (a string or list: one ``train`` split; a dict: split name -> files).
            Default: one split per pinned file, named after its stem
            (``train.jsonl`` -> ``train``).
        cache_dir: the Arrow cache (:class:`~oxen_callbacks.PinnedDataset` passes
            ``<oxen-callbacks cache>/datasets/<repo>`` unless given one).
        location: the dataset repository's path or URL, for the log.
        **kwargs: passed to ``datasets.load_dataset`` (``split``, ``features``,
            ``streaming``, ``num_proc``, CSV options such as ``sep``...).

    Returns:
        a ``DatasetDict``, or a ``Dataset`` when ``split`` is given.
    """
    import datasets

    for key, why in _RESERVED.items():
        if key in kwargs:
            raise ConfigurationError(f"PinnedDataset.load_dataset() got {key}={kwargs[key]!r}.",
                                     f"leave it out: {why}.")
    files = _default_splits(pin) if data_files is None else _resolve(pin, data_files)
    builder = _builder(files)
    folder = Path(cache_dir)
    log.debug("Loading %s@%s with the %r builder into %s", location, pin.commit, builder, folder)
    return datasets.load_dataset(builder, name=f"{_CONFIG_PREFIX}{pin.commit}", data_files=files,
                                 cache_dir=str(folder), **kwargs)


def dataset_commits(dataset: Any) -> set[str]:
    """The commits a ``datasets.Dataset`` was loaded from by :func:`load_pinned` (also after ``.map()``).

    Empty when it has no cache files of a pinned load (in memory, or built another way);
    several after concatenating commits.
    """
    found: set[str] = set()
    for entry in getattr(dataset, "cache_files", None) or []:
        for part in Path(entry.get("filename", "")).parts:
            match = _COMMIT_IN_PATH.match(part)
            if match:
                found.add(match.group(1))
    return found


def _default_splits(pin: PinnedFiles) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    for path in pin.files():
        if path.suffix.lower() in BUILDERS:
            splits.setdefault(path.stem, []).append(str(path))
    if not splits:
        raise ConfigurationError(
            f"{pin!r} holds no {', '.join(BUILDERS)} files to load.",
            "load other formats yourself from pin.file('...'), or pin the data files.",
        )
    return splits


def _resolve(pin: PinnedFiles, data_files: DataFiles) -> Any:
    if isinstance(data_files, str):
        return _expand(pin, data_files)
    if isinstance(data_files, Mapping):
        return {split: _resolve(pin, entry) for split, entry in data_files.items()}
    return [path for entry in data_files for path in _expand(pin, entry)]


def _expand(pin: PinnedFiles, pattern: str) -> list[str]:
    """Absolute snapshot paths of a repository-relative file or glob, which must lie in the pinned paths."""
    rel = safe_relpath(pattern, what="data file")
    if not glob.has_magic(rel):
        return [str(pin.file(rel))]
    root = pin.path
    matches = sorted(p for p in glob.glob(str(root / rel), recursive=True) if os.path.isfile(p))
    inside = [p for p in matches if any(covers(q, Path(p).relative_to(root).as_posix()) for q in pin.paths)]
    if not inside:
        raise ConfigurationError(
            f"No file of the pinned paths {pin.paths} matches {pattern!r} in commit {pin.commit}.",
            "give patterns relative to the repository root, inside the pinned paths.",
        )
    return inside


def _builder(files: Any) -> str:
    flat = [f for group in files.values() for f in group] if isinstance(files, dict) else files
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in flat}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in flat})
        raise ConfigurationError(
            f"Cannot load files with the extensions {suffixes} as one dataset.",
            f"pass data_files= of one format ({', '.join(BUILDERS)}), e.g. {{'train': 'data/*.parquet'}}; "
            "read other formats from pin.file('...') yourself.",
        )
    return kinds.pop()  # type: ignore[return-value]
