"""Where a trainer's checkpoint files go in the model repository, named once per run."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .._oxen.layout import literal_name


class Destinations:
    """The repository path of each checkpoint file or folder a run saves, the same for each save of it.

    Checkpoints of the first folder saved into keep their name under ``base`` (the run's
    ``runs/<run>/checkpoints``, see :func:`..model_repo.checkpoints_folder`);
    those of any other folder (a second ``ModelCheckpoint``) go one level down, in a subfolder named
    after their folder and a hash of its path, so two folders' ``last.ckpt`` never share a path.
    A name Oxen would read as a glob pattern is renamed (:func:`literal_name`); the lineage entry's
    ``source`` keeps the trainer's own.
    """

    def __init__(self, base: str, first_folder: str | None = None) -> None:
        self.base = base
        self._by_source: dict[str, str] = {}
        #: (a continued run's is its earlier fits' first folder: each folder's files keep their place)
        self._first_folder = first_folder

    def known(self, source: str | os.PathLike[str]) -> str | None:
        """The path ``source`` was given, if it was given one."""
        return self._by_source.get(os.path.abspath(source))

    def dest_for(self, source: str | os.PathLike[str]) -> str:
        """The path of ``source`` (a file or folder), given it now if it has none yet."""
        source = os.path.abspath(source)
        if source in self._by_source:
            return self._by_source[source]
        folder, name = _split(source)
        if self._first_folder is None:
            self._first_folder = folder
        if folder == self._first_folder:
            dest = f"{self.base}/{literal_name(name)}"
        else:
            digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
            subfolder = literal_name(os.path.basename(folder) or "root")
            dest = f"{self.base}/{subfolder}-{digest}/{literal_name(name)}"
        self._by_source[source] = dest
        return dest


def first_folder_of(entries: list[Any], base: str, saving_into: list[str] | None) -> str | None:
    """The trainer's folder whose files a continued run's earlier fits committed under ``base`` itself (by
    their record's ``entries``), if the record says (older records name no ``source``); ``None`` too when
    this fit saves only into folders the run never used (``saving_into``, ``None``: unknown), such as a new
    default ``lightning_logs/version_N``: the first it saves into is then the first, as in a new run."""
    sources = [(e.get("path"), os.path.abspath(e["source"])) for e in entries
               if isinstance(e, dict) and isinstance(e.get("source"), str)]
    if saving_into is not None and not {_split(source)[0] for _path, source in sources} & set(saving_into):
        return None
    return next((_split(source)[0] for path, source in sources
                 if isinstance(path, str) and path.rsplit("/", 1)[0] == base), None)


def _split(source: str) -> tuple[str, str]:
    """``(folder, name)`` of a checkpoint file or folder's absolute path (a folder's may end in ``/``)."""
    return os.path.split(source.rstrip("/"))
