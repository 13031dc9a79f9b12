"""Content hashes (xxh3-128, as Oxen's tree records them) and what a dataset source wrote into a
snapshot folder, as the snapshot store checks and records it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import xxhash

_BLOCK = 8 << 20


def file_digest(path: str | os.PathLike[str]) -> int:
    """The xxh3-128 hash of a file's bytes, an int as Oxen's tree and content store name it."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            hasher.update(block)
    return hasher.intdigest()


def content_hash(value: int) -> str:
    """How a content hash (xxh3-128, an int as in Oxen's tree) is written in a snapshot's sidecar."""
    return format(value, "032x")


@dataclass
class Materialized:
    """What a source wrote into a scratch folder: per requested path its file count and bytes,
    and per file (repository-relative) its content hash as :func:`content_hash` writes it."""

    counts: dict[str, dict[str, int]]
    hashes: dict[str, str]
