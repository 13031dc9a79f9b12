"""What a dataset source wrote into a snapshot folder, as the snapshot store checks and records it."""

from __future__ import annotations

from dataclasses import dataclass


def content_hash(value: int) -> str:
    """How a content hash (xxh3-128, an int as in Oxen's tree) is written in a snapshot's sidecar."""
    return format(value, "032x")


@dataclass
class Materialized:
    """What a source wrote into a scratch folder: per requested path its file count and bytes,
    and per file (repository-relative) its content hash as :func:`content_hash` writes it."""

    counts: dict[str, dict[str, int]]
    hashes: dict[str, str]
