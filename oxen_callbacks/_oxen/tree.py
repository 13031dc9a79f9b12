"""PRIVATE OXEN LAYOUT: the files of a commit, read from a repository's merkle tree.

Together with :mod:`oxen_callbacks._oxen.layout` (which it uses for the content
store's path scheme) this is the only module that knows Oxen's on-disk tree
format; ``tests/test_oxen_layout.py`` checks it against the installed oxenai.
What it relies on (oxenai 0.65, ``merkle_node_backend = "lmdb"``):

* ``.oxen/tree/nodes_lmdb`` is an LMDB env with one named database ``nodes``.
  A node's two blobs live under ``hash_le(16) + b"\\0"`` (``node``) and
  ``hash_le(16) + b"\\1"`` (``children``); a commit's node hash is its id.
* ``node`` blob: ``type u8 | parent u128le | len u32le | payload`` then one
  33-byte entry per child: ``type u8 | hash u128le | offset u64le | len u64le``
  into the ``children`` blob. Types: 0 commit, 1 dir, 2 vnode, 3 file.
* Payloads are MessagePack (rmp_serde): ``{"V0_25_0": [fields...]}``, structs as
  positional arrays, hashes as 16-byte big-endian bins. Dir:
  ``["Dir", name, hash, ...]``; vnode: ``[hash, "VNode", n]``; file:
  ``["File", name, metadata_hash, hash, combined_hash, num_bytes, ... ,
  chunk_type, storage_backend]``.
* A commit has one child, the root dir; a dir's children are vnodes (its entries
  split at ``vnode_size``); a vnode's children are files and dirs, which are
  named relative to their parent. A file's bytes are a full copy in the content
  store under its ``hash`` (see :func:`oxen_layout.version_path`), which is copied from only
  when it is the default store (:func:`check_content_store`: no ``versions_path`` in
  ``[storage]``); the tree itself is read wherever the versions are kept.

Anything else (another backend, an unknown payload version), and a custom content store
for a copy, raises :class:`UnreadableTree`; callers then fall back to ``oxen restore``.

lmdb memory-maps the node store: a truncated or damaged ``data.mdb`` can kill the
reading process by SIGBUS. Only a child process reads the tree (see
:mod:`oxen_callbacks._oxen.store_copy`); ``lmdb`` is imported when a tree is read, so the
training process, which imports this module for its exceptions, never loads it.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from ..errors import ConfigurationError
from . import layout as oxen_layout

_COMMIT, _DIR, _VNODE, _FILE = 0, 1, 2, 3
_VERSION = "V0_25_0"
_HEADER = struct.Struct("<B16sI")
_ENTRY = struct.Struct("<B16sQQ")
_NODE_TAG, _CHILDREN_TAG = b"\x00", b"\x01"
_FILE_FIELDS = 16
_ATTEMPTS = 5  # reads of a tree that a writer changed meanwhile
#: Where a node's payload repeats its own hash (big-endian), by node type.
_OWN_HASH = {_COMMIT: 0, _DIR: 2, _VNODE: 0}
T = TypeVar("T")


class UnreadableTree(Exception):
    """The commit's tree or bytes cannot be read here (unknown layout, damage, missing data)."""


class UnsupportedLayout(UnreadableTree):
    """The repository is configured in a way this module does not read (not damage)."""


class PathNotInCommit(LookupError):
    """A requested path is neither a file nor a folder of the commit."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def path_not_in_commit(rel: str, commit: str, location: str, *, role: str = "dataset repository") -> ConfigurationError:
    """The error for a requested path that the commit does not hold (``location``: the repository)."""
    return ConfigurationError(
        f"Path {rel!r} is not in commit {commit} of the {role} {location!r}.",
        "paths are relative to the repository root (e.g. 'train.csv', 'images/'); "
        "check them against the files that commit added (in Python, `oxen.Repo(path).log()` lists the commits).",
    )


@dataclass(frozen=True, slots=True)
class TreeFile:
    """One file of a commit: repository-relative path, content hash (xxh3-128) and size."""

    path: str
    hash: int
    size: int

    def held_by(self, file: str | os.PathLike[str]) -> bool:
        """Whether ``file`` holds exactly these bytes (its size first, then its hash)."""
        from .._util.materialized import file_digest

        return os.stat(file).st_size == self.size and file_digest(file) == self.hash


@dataclass
class Subtree:
    """What one requested path holds: its folders (empty ones too) and files, repository-relative."""

    dirs: list[str] = field(default_factory=list)
    files: list[TreeFile] = field(default_factory=list)


def files_at(repo: str | os.PathLike[str], commit: str, paths: list[str]) -> dict[str, Subtree]:
    """The folders and files at or under each of ``paths`` (``"."``, a folder or a file) in ``commit``.

    Raises:
        PathNotInCommit: a path is not in the commit.
        UnreadableTree: the tree is not in a layout this module knows, or is damaged.
    """

    def collect(tree: Tree) -> dict[str, Subtree]:
        found = {rel: Subtree() for rel in paths}
        for rel in paths:
            for item in tree.walk(commit, rel):
                if isinstance(item, str):
                    found[rel].dirs.append(item)
                else:
                    found[rel].files.append(item)
        return found

    return read(repo, collect)


def read(repo: str | os.PathLike[str], use: Callable[[Tree], T]) -> T:
    """``use(tree)`` over one snapshot of the repository's merkle tree; the tree is closed after.

    When a writer changed the tree under a walk, ``use`` runs again on a new snapshot
    (so it must start over cleanly). Raises :class:`UnreadableTree` as :func:`files_at`.
    """
    import lmdb

    _check_config(repo)
    env_dir = (oxen_layout.oxen_dir(repo) / oxen_layout.NODE_STORE).parent
    if not (env_dir / "data.mdb").is_file():
        raise UnreadableTree(f"no merkle node store at {env_dir}")
    try:
        # lock=False: lock.mdb is never opened (nor created), so the locks of a live oxen process
        # are not touched. Without a reader slot, a writer may reuse pages of our snapshot from
        # the third transaction after it on; Tree.changed tells a walk that overlapped that,
        # and the read is retried.
        env = lmdb.open(str(env_dir), readonly=True, lock=False, create=False, max_dbs=1,
                        subdir=True, readahead=False)
    except lmdb.Error as exc:
        raise UnreadableTree(f"cannot open {env_dir}: {exc}") from exc
    try:
        for attempt in range(_ATTEMPTS):
            if attempt:
                time.sleep(0.05 * attempt)
            tree = Tree(env)
            try:
                result = use(tree)
            except (UnreadableTree, PathNotInCommit, lmdb.Error):
                if not tree.note_writes():
                    raise
                continue  # what looked damaged or missing may be a page a writer recycled meanwhile
            finally:
                tree.close()
            if not tree.changed:
                return result
        raise UnreadableTree("the tree kept changing while it was read")
    except lmdb.Error as exc:
        raise UnreadableTree(f"cannot read {env_dir}: {exc}") from exc
    finally:
        env.close()


def _check_config(repo: str | os.PathLike[str]) -> None:
    try:
        config = oxen_layout.read_config(repo)
    except (OSError, oxen_layout.DamagedLayout) as exc:
        raise UnreadableTree(f"cannot read the repository config: {exc}") from exc
    backend = config.get("merkle_node_backend")
    if backend != "lmdb":
        raise UnsupportedLayout(f"merkle_node_backend is {backend!r}, not 'lmdb'")


def check_content_store(repo: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsupportedLayout` unless ``repo`` keeps its file versions where
    :func:`oxen_layout.version_path` looks (the tree is read wherever they are)."""
    try:
        storage = oxen_layout.content_store(repo)
    except (OSError, oxen_layout.DamagedLayout) as exc:
        raise UnreadableTree(f"cannot read the repository config: {exc}") from exc
    if storage is not None:
        raise UnsupportedLayout(f"content store is not the default local one: {storage}")


class Tree:
    """One snapshot of the merkle tree: a read transaction over the ``nodes`` database."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.txn = env.begin(db=env.open_db(b"nodes", create=False), buffers=True)
        self.txn_id: int = self.txn.id()
        self.changed = False  # a writer may have recycled a page of the snapshot during a walk
        self._named: dict[bytes, dict[str, tuple[int, bytes, list[Any]]]] = {}  # folder -> its entries by name

    def close(self) -> None:
        self.txn.abort()

    def note_writes(self) -> bool:
        """Record whether a writer could have recycled a page of the snapshot by now; return it."""
        self.changed |= self.env.info()["last_txnid"] > self.txn_id + 1
        return self.changed

    def walk(self, commit: str, rel: str) -> Iterator[str | TreeFile]:
        """The folders (before their content) and files at or under ``rel`` in ``commit``.

        Consume it to the end: the end records whether a writer overlapped the walk.
        """
        try:
            commit_hash = int(commit, 16).to_bytes(16, "little")
        except (ValueError, OverflowError):
            raise UnreadableTree(f"{commit!r} is not a commit id") from None
        roots = [c for c in self._node(commit_hash, _COMMIT)[2] if c[0] == _DIR]
        if len(roots) != 1:
            raise UnreadableTree(f"commit {commit} has {len(roots)} root folders")
        dir_key = roots[0][1]
        parts = [] if rel == "." else rel.split("/")
        for depth, name in enumerate(parts):
            child = self._entry(dir_key, name)
            if child is None or (child[0] == _FILE and depth != len(parts) - 1):
                raise PathNotInCommit(rel)
            kind, dir_key, payload = child
            if kind == _FILE:
                yield _file(rel, dir_key, payload)
                self.note_writes()
                return
        if parts:
            yield rel
        yield from self._walk(dir_key, rel if parts else "")
        self.note_writes()

    def _walk(self, dir_key: bytes, prefix: str) -> Iterator[str | TreeFile]:
        for kind, key, payload in self._entries(dir_key):
            path = f"{prefix}/{_name(payload)}" if prefix else _name(payload)
            if kind == _FILE:
                yield _file(path, key, payload)
            else:
                yield path
                yield from self._walk(key, path)

    def _entry(self, dir_key: bytes, name: str) -> tuple[int, bytes, list[Any]] | None:
        """The entry ``name`` of a folder; each folder decoded once per read (a pin of 3,000 files of one
        folder decoded it 3,000 times)."""
        named = self._named.get(dir_key)
        if named is None:
            named = self._named[dir_key] = {}
            for entry in self._entries(dir_key):
                named.setdefault(_name(entry[2]), entry)  # (the first of a name, as the scan found it)
        return named.get(name)

    def _entries(self, dir_key: bytes) -> Iterator[tuple[int, bytes, list[Any]]]:
        """Files and folders of a folder, read through its vnodes."""
        _kind, _payload, vnodes = self._node(dir_key, _DIR)
        for vkind, vkey, _vpayload in vnodes:
            if vkind != _VNODE:
                raise UnreadableTree(f"folder node {_hex(dir_key)} holds a {vkind} node, not a vnode")
            for kind, key, payload in self._node(vkey, _VNODE)[2]:
                if kind == _DIR and (payload[0] != "Dir" or payload[2] != key[::-1]):
                    raise UnreadableTree(f"vnode {_hex(vkey)} holds a bad folder entry {_hex(key)}")
                if kind not in (_DIR, _FILE):
                    raise UnreadableTree(f"vnode {_hex(vkey)} holds a node of type {kind}")
                yield kind, key, payload

    def _node(self, key: bytes, expect: int) -> tuple[int, list[Any], list[tuple[int, bytes, list[Any]]]]:
        node = self.txn.get(key + _NODE_TAG)
        blob = self.txn.get(key + _CHILDREN_TAG)
        if node is None or blob is None:
            raise UnreadableTree(f"node {_hex(key)} is missing from the tree")
        try:
            kind, _parent, size = _HEADER.unpack_from(node)
            payload = _payload(node[_HEADER.size:_HEADER.size + size])
            table = node[_HEADER.size + size:]
            if kind != expect or payload[_OWN_HASH[kind]] != key[::-1] or len(table) % _ENTRY.size:
                raise UnreadableTree(f"node {_hex(key)} is not the expected type-{expect} node")
            children = [(ckind, bytes(ckey), _payload(blob[offset:offset + length]))
                        for ckind, ckey, offset, length in _ENTRY.iter_unpack(table)]
        except (struct.error, ValueError, IndexError) as exc:
            raise UnreadableTree(f"node {_hex(key)} cannot be decoded: {exc}") from exc
        return kind, payload, children


def _payload(data: Any) -> list[Any]:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise UnreadableTree(f"payload cannot be decoded: {exc}") from exc
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and list(value[0]) == [_VERSION] and isinstance(value[0][_VERSION], list)):
        raise UnreadableTree(f"payload is not a {_VERSION} node: {str(value)[:80]}")
    return value[0][_VERSION]


def _name(payload: list[Any]) -> str:
    name = payload[1] if len(payload) > 2 and payload[0] in ("Dir", "File") else None
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnreadableTree(f"entry has no valid name: {str(payload)[:80]}")
    return name


def _file(path: str, key: bytes, payload: list[Any]) -> TreeFile:
    if (len(payload) != _FILE_FIELDS or payload[0] != "File" or payload[3] != key[::-1]
            or payload[14] != "SingleFile" or payload[15] != "Disk" or not isinstance(payload[5], int)):
        raise UnreadableTree(f"file node of {path!r} is not a whole file on disk: {str(payload)[:120]}")
    return TreeFile(path, int.from_bytes(key, "little"), payload[5])


def _hex(key: bytes) -> str:
    return format(int.from_bytes(key, "little"), "x")


#: What Oxen reads as a table when it adds a file (and a ``.json`` that starts with ``[``): a table it
#: cannot parse is not added, and nothing says so (oxenai 0.65: ``util::fs::is_tabular``).
_TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".parquet", ".arrow", ".ndjson", ".jsonl"})


def _read_as_table(file: Path) -> bool:
    if file.suffix.lower() in _TABLE_SUFFIXES:
        return True
    if file.suffix.lower() != ".json":
        return False
    with open(file, "rb") as f:
        return f.read(1) == b"["


def tables_left_out(repo: str | os.PathLike[str], commit: str, rel: str) -> list[str]:
    """The files at or under ``rel`` in the working tree that Oxen reads as tables and ``commit`` does not
    hold (repository-relative): Oxen leaves out a table it cannot parse and says nothing. The tree is read
    only when ``rel`` holds a table; an unreadable tree tells nothing (``[]``)."""
    root = Path(repo) / rel
    tables = [f for f in ([root] if root.is_file() else root.rglob("*")) if f.is_file() and not f.is_symlink()
              and _read_as_table(f)]
    if not tables:
        return []
    try:
        held = {f.path for f in files_at(repo, commit, [rel])[rel].files}
    except PathNotInCommit:
        held = set()
    except UnreadableTree:
        return []
    return sorted(name for f in tables if (name := f.relative_to(repo).as_posix()) not in held)
