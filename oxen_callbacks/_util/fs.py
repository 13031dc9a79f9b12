"""Filesystem helpers shared by the layers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

# -- folders that may hold read-only files -------------------------------------------------
# Snapshots are read-only (folders 0555, files 0444, less what the umask takes away) so that
# nobody edits a pinned commit in place; these delete or empty such folders.

def creation_mask() -> int:
    """This process's umask: what it takes away from the mode of every file it creates, and so from any
    mode this library sets (a private dataset's copy stays private under ``umask 077``). Read from
    ``/proc`` (setting it to read it would race with other threads), else from a file made to see it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with tempfile.TemporaryDirectory(prefix="oxen-callbacks-umask-") as folder:
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777))
        return 0o777 & ~os.stat(probe).st_mode


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a folder that may hold read-only snapshots (a symbolic link in its place: the link)."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        make_dirs_writable(Path(path))
        shutil.rmtree(path)


def empty_folder(path: str | os.PathLike[str]) -> None:
    """Delete everything inside ``path`` (a scratch folder), keeping the folder."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            os.unlink(entry.path)


def make_dirs_writable(path: str | os.PathLike[str]) -> None:
    """Folders of ``path`` (itself included) as a new folder is made (0777 less the umask; the owner's
    always), so their entries can be moved or deleted."""
    mode = 0o777 & ~creation_mask() | 0o700
    for dirpath, _dirs, _names in os.walk(path):
        os.chmod(dirpath, mode)


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, where nesting too deep for Python's parser (a hostile file: ``[[[[...``) is a
    ``ValueError`` as other text that is not JSON is, never a ``RecursionError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


# -- files a crash must never leave half-written ----------------------------------------------

def write_atomically(path: str | os.PathLike[str], text: str, *, make_parents: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader, or the next process
    after a crash, sees the old file or the whole new one, never part of it."""
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | os.PathLike[str], data: Any, *, indent: int | None = None,
                          make_parents: bool = False) -> None:
    """:func:`write_atomically` of ``data`` as JSON (a final newline when indented, as people read it)."""
    text = json.dumps(data, indent=indent) + ("\n" if indent is not None else "")
    write_atomically(path, text, make_parents=make_parents)


_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def json_kind(value: Any) -> str:
    """What JSON calls the type of ``value``: object, array, string, number, boolean or null."""
    return json_type_name(type(value))


def json_type_name(kind: type) -> str:
    """What JSON calls values of the Python type ``kind`` (``dict``: object)."""
    return _JSON_KINDS.get(kind, "value")


class DamagedFile(ValueError):
    """A file this library wrote holds something else now (cut short, edited, another file in its place)."""


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        FileNotFoundError: there is none.
        DamagedFile: it cannot be read, is not JSON, or holds something other than an object;
            the message names the file's name and what is wrong.
    """
    name = Path(path).name
    try:
        data = parse_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise
    except OSError as exc:  # a folder in its place, no permission
        raise DamagedFile(f"{name} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # cut short, not UTF-8, not JSON
        raise DamagedFile(f"{name} is not JSON (cut short?): {exc}") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{name} holds a JSON {json_kind(data)}, not an object")
    return data


def file_identity(target: str | os.PathLike[str] | int) -> tuple[int, int] | None:
    """(device, inode) of a path or an open file descriptor; ``None`` when there is none."""
    try:
        stat = os.stat(target)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
