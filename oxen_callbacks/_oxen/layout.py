"""What this library knows of Oxen's private on-disk layout, in one place.

oxenai (0.65) offers no public way to read an old commit of a local repository
without touching its working tree, to list the commits of every branch, or to
find the temp files a killed ``add`` leaves behind. Those needs are met here
from the ``.oxen`` folder's layout. ``tests/test_oxen_layout.py`` checks every
assumption against the installed oxenai and fails loudly when an upgrade
changes one; pyproject bounds the oxenai version range accordingly. The format
of the merkle tree (which files a commit holds) is in :mod:`oxen_callbacks._oxen.tree`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .commit_id import is_commit_id

OXEN_DIR = ".oxen"
#: Our own state inside a repository's ``.oxen`` folder (Oxen ignores unknown entries).
STATE_DIR_NAME = "oxen-callbacks"
#: Entries of ``.oxen`` a read-only shadow must not copy: the content store is
#: shared through a symlink; the rest is per-working-tree state.
_SHADOW_SKIP = {"versions", "staged", "workspaces", "tmp", STATE_DIR_NAME}
_TEMP_INFIX = ".oxentmp."
#: Entries of ``.oxen`` that the first commit makes (``oxen init`` makes only ``config.toml``).
_COMMITTED = ("HEAD", "history", "refs", "tree")
#: Oxen reads a path holding any of these as a glob pattern: ``oxen add`` of ``model[1].ckpt``
#: stages nothing (or ``model1.ckpt``), ``oxen rm`` of it may take another file out.
GLOB_CHARACTERS = "*?[]"
#: The merkle node store of the ``lmdb`` backend (which files each commit holds), under ``.oxen``.
NODE_STORE = "tree/nodes_lmdb/data.mdb"
#: The whole of what ``oxen init`` writes (oxenai 0.65): ``.oxen/config.toml`` with these bytes.
#: Writing it ourselves takes a millisecond where oxenai's init costs a process and its 0.2 s
#: import; ``tests/test_oxen_layout.py`` compares it with oxenai's own init byte for byte.
INIT_CONFIG = (
    'remotes = []\n'
    'min_version = "0.36.0"\n'
    'vnode_size = 10000\n'
    'merkle_node_backend = "lmdb"\n'
    '\n'
    '[storage]\n'
    'kind = "local"\n'
)


class DamagedLayout(ValueError):
    """A repository's own files are not as Oxen leaves them; the message says which and how."""


def oxen_dir(repo: str | os.PathLike[str]) -> Path:
    return Path(repo) / OXEN_DIR


def is_repo(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is the root of a local Oxen repository (a path no file system can hold,
    e.g. one from a record someone else wrote, is none)."""
    try:
        return (oxen_dir(path) / "config.toml").is_file()
    except (OSError, ValueError):  # too long, a NUL byte
        return False


def init(path: str | os.PathLike[str]) -> None:
    """``oxen init`` at ``path`` (created when missing): write :data:`INIT_CONFIG` atomically.

    Does nothing where a config exists, or where commits were made but the config is gone (damage,
    which :class:`~.repo.LocalRepo` reports). An init cut short (only our temp file in ``.oxen``) is
    finished. Callers hold the repository's init lock against a concurrent init.
    """
    root = oxen_dir(path)
    if (root / "config.toml").is_file() or any(os.path.lexists(root / name) for name in _COMMITTED):
        return
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"config.toml.oxcb-init-{os.getpid()}"
    partial.write_text(INIT_CONFIG)
    os.replace(partial, root / "config.toml")
    for leftover in root.glob("config.toml.oxcb-init-*"):  # of an init killed mid-write
        leftover.unlink(missing_ok=True)


def find_repo_root(path: str | os.PathLike[str]) -> Path | None:
    """The Oxen repository containing ``path`` (itself or an ancestor), if any."""
    p = Path(path).resolve()
    for candidate in (p, *p.parents):
        if is_repo(candidate):
            return candidate
    return None


def state_dir(repo: str | os.PathLike[str]) -> Path:
    """Where this library keeps queues and locks of a repository."""
    return oxen_dir(repo) / STATE_DIR_NAME


def head_ref(repo: str | os.PathLike[str]) -> str:
    """What ``.oxen/HEAD`` holds: a branch name, or a commit id when detached."""
    return (oxen_dir(repo) / "HEAD").read_text().strip()


def read_config(repo: str | os.PathLike[str]) -> dict[str, Any]:
    """``.oxen/config.toml``, parsed.

    Raises:
        FileNotFoundError: there is none.
        DamagedLayout: it cannot be read or is not TOML.
    """
    import tomllib

    try:
        return tomllib.loads((oxen_dir(repo) / "config.toml").read_bytes().decode())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # a folder in its place, not UTF-8, not TOML
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DamagedLayout(f".oxen/config.toml cannot be read ({reason})") from None


def damage(repo: str | os.PathLike[str]) -> str | None:
    """What is wrong with a repository's own files (config and what a commit makes), or ``None``.

    A repository without commits holds only its config: that is not damage. ``HEAD``
    is read (and its faults named) by :func:`head_ref`.
    """
    try:
        config = read_config(repo)
    except (FileNotFoundError, DamagedLayout) as exc:
        return str(exc) if isinstance(exc, DamagedLayout) else ".oxen/config.toml is missing"
    if "remotes" not in config:  # the one entry oxenai cannot do without
        return ".oxen/config.toml lacks its `remotes` entry"
    root = oxen_dir(repo)
    if not any(os.path.lexists(root / name) for name in _COMMITTED):
        return None
    for name in ("history", "refs"):
        if not (root / name).is_dir():
            return f".oxen/{name} is {'not a folder' if os.path.lexists(root / name) else 'missing'}"
    nodes = root / NODE_STORE
    if config.get("merkle_node_backend") == "lmdb" and not nodes.is_file() and has_commits(repo):
        return f".oxen/{NODE_STORE} is {'not a file' if os.path.lexists(nodes) else 'missing'} (the tree of every commit)"
    return None


def remotes(repo: str | os.PathLike[str]) -> dict[str, str]:
    """Remote name -> URL, from ``.oxen/config.toml`` (``remotes = [{name, url}]``).

    Raises:
        DamagedLayout: the config cannot be read.
    """
    try:
        config = read_config(repo)
    except FileNotFoundError:
        return {}
    found = config.get("remotes", [])
    if not isinstance(found, list):  # (its value is not shown: it may hold a URL with a token)
        kind = {str: "a string", dict: "a table"}.get(type(found), f"a {type(found).__name__}")
        raise DamagedLayout(f".oxen/config.toml holds remotes as {kind}, not a list of {{name, url}} tables")
    for number, remote in enumerate(found, 1):
        if not (isinstance(remote, dict) and isinstance(remote.get("name"), str) and isinstance(remote.get("url"), str)):
            raise DamagedLayout(f".oxen/config.toml holds a remote (number {number}) that is not a name and a url string")
    return {r["name"]: r["url"] for r in found}


def commit_ids(repo: str | os.PathLike[str]) -> list[str]:
    """Ids of every commit the repository holds, on any branch (``.oxen/history/<id>``): one entry per
    commit read, so :func:`has_commit` and :func:`has_commits` where they do."""
    return list(_commits_in_history(repo))


def has_commit(repo: str | os.PathLike[str], commit_id: str) -> bool:
    """Whether the repository holds commit ``commit_id``, in the time of one lookup however long its history."""
    return is_commit_id(commit_id) and (oxen_dir(repo) / "history" / commit_id).is_dir()


def has_commits(repo: str | os.PathLike[str]) -> bool:
    """Whether the repository holds any commit (reads up to the first)."""
    return next(_commits_in_history(repo), None) is not None


def _commits_in_history(repo: str | os.PathLike[str]) -> Iterator[str]:
    history = oxen_dir(repo) / "history"
    if not history.is_dir():
        return
    with os.scandir(history) as entries:
        yield from (entry.name for entry in entries if entry.is_dir() and is_commit_id(entry.name))


def make_shadow(repo: str | os.PathLike[str], dest: str | os.PathLike[str], commit_id: str, *,
                linked: tuple[str, ...] = ("versions",)) -> Path:
    """Make ``dest`` a working tree of ``repo`` detached at ``commit_id``, with no files.

    The shadow's ``.oxen`` copies the original's metadata and links its content
    store, so ``restore(path, source=commit_id)`` run in the shadow writes that
    commit's bytes while the original tree, HEAD, branches and staging area stay
    as they are. ``linked`` names the ``.oxen`` entries shared rather than copied:
    with ``"refs"`` (the branch database) among them, branch operations run in the
    shadow change the original's branches, and only those.
    """
    src = oxen_dir(repo)
    dst = Path(dest) / OXEN_DIR
    dst.mkdir(parents=True)
    for entry in os.scandir(src):
        target = dst / entry.name
        if entry.name in linked:
            os.symlink(os.path.realpath(entry.path), target)
        elif entry.name in _SHADOW_SKIP:
            continue
        elif entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True)
        else:
            shutil.copy2(entry.path, target)
    detach_head(dest, commit_id)
    return Path(dest)


def detach_head(worktree: str | os.PathLike[str], commit_id: str) -> None:
    """Point ``.oxen/HEAD`` of ``worktree`` (a shadow: never the user's tree) at ``commit_id``."""
    (oxen_dir(worktree) / "HEAD").write_text(commit_id)


def content_store(repo: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``None`` when ``repo`` keeps its file versions in the default local content store (where
    :func:`version_path` looks), else its ``[storage]`` configuration (``versions_path`` elsewhere,
    another kind of storage). Raises as :func:`read_config`."""
    storage = read_config(repo).get("storage", {})
    if not isinstance(storage, dict):
        raise DamagedLayout(f".oxen/config.toml's storage is {storage!r}, not a table")
    custom = storage.get("kind", "local") != "local" or "versions_path" in storage or "settings" in storage
    return storage if custom else None


def version_path(repo: str | os.PathLike[str], content_hash: int) -> Path:
    """Where Oxen's local content store keeps bytes of this xxh3-128 hash."""
    return versions_root(repo) / version_relpath(content_hash)


def versions_root(repo: str | os.PathLike[str]) -> Path:
    """Oxen's default local content store (a ``versions_path`` in config.toml moves it)."""
    return oxen_dir(repo) / "versions" / "files"


def version_relpath(content_hash: int) -> str:
    """A hash's file under :func:`versions_root`: unpadded hex split 2/rest, then ``data``."""
    text = format(content_hash, "x")
    return f"{text[:2]}/{text[2:]}/data"


def version_scratch(repo: str | os.PathLike[str], token: str) -> Path:
    """A scratch file in the content store, named so :func:`orphan_temp_files` finds it if left behind."""
    return oxen_dir(repo) / "versions" / "files" / f"data{_TEMP_INFIX}oxcb-{token}"


def orphan_temp_files(repo: str | os.PathLike[str], older_than_s: float = 60.0) -> list[Path]:
    """Scratch files (``*.oxentmp.*``) a killed ``oxen add`` left in the content store."""
    root = oxen_dir(repo) / "versions"
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if _TEMP_INFIX in name:
                path = Path(dirpath) / name
                try:
                    if path.stat().st_mtime < cutoff:
                        found.append(path)
                except FileNotFoundError:
                    continue
    return found


def reads_as_glob(path: str) -> bool:
    """Whether Oxen would take ``path`` for a glob pattern (:data:`GLOB_CHARACTERS`)."""
    return any(char in path for char in GLOB_CHARACTERS)


#: What Oxen's matcher (the ``glob-match`` crate) reads specially in a path it takes for a pattern.
_PATTERN_CHARACTERS = GLOB_CHARACTERS + "{}\\"


def pattern_of(path: str) -> str:
    """``path`` (POSIX, relative) as Oxen must be given it to mean that path alone where it globs
    paths (``restore``): from its first part that :func:`reads_as_glob` on (Oxen walks the parts before
    it by name), each character its matcher reads specially escaped with ``\\`` (``d[x]/f{1,2}`` ->
    ``d\\[x\\]/f\\{1,2\\}``). Unescaped, ``data[1].csv`` restores ``data1.csv`` and ``q?.txt`` every
    ``q`` + one character."""
    if not reads_as_glob(path):
        return path
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if reads_as_glob(part))
    escaped = ("".join(f"\\{char}" if char in _PATTERN_CHARACTERS else char for char in part) for part in parts[first:])
    return "/".join([*parts[:first], *escaped])


def literal_name(name: str) -> str:
    """``name`` as a checkpoint's file or folder name in the repository: where it holds a character
    Oxen reads as a glob (:data:`GLOB_CHARACTERS`) or a backslash (a path separator to every reader
    on Windows, refused in lineage records), that character made ``_`` and a hash of the original
    added (``model[1].ckpt`` -> ``model_1_-<8 hex>.ckpt``): two names never meet."""
    if not reads_as_glob(name) and "\\" not in name:
        return name
    stem, extension = os.path.splitext(name)
    plain = str.maketrans(dict.fromkeys(GLOB_CHARACTERS + "\\", "_"))
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{stem.translate(plain)}-{digest}{extension.translate(plain)}"


def literal_path(path: str) -> str:
    """``path`` (POSIX, relative) with each part made :func:`literal_name`: the same for a path already
    chosen by it, and the path a job queued before names were made literal is committed under."""
    return "/".join(literal_name(part) for part in path.split("/"))
