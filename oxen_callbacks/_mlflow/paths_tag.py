"""The ``oxen.dataset.paths`` tag: the pinned paths as a JSON list, or, when the list is too long
for a tag, how many there are (the whole list is in the run's lineage record). No MLflow import."""

from __future__ import annotations

import json

from .._util.fs import parse_json
from ..names import LINEAGE_ARTIFACT

#: The longest value every MLflow store keeps whole: run tags are cut at 8,000 characters (refused
#: with ``MLFLOW_TRUNCATE_LONG_VALUES=false``), and registry tags are 5,000-character columns in
#: SQL databases. A list cut short would be read as the whole: a longer one is counted instead.
MAX_TAG_CHARS = 5000


def paths_tag(paths: list[str]) -> str:
    """The tag's value for a pin of ``paths``."""
    listed = json.dumps(paths)
    if len(listed) <= MAX_TAG_CHARS:
        return listed
    return json.dumps({"count": len(paths), "listed_in": LINEAGE_ARTIFACT})


def paths_of_tag(value: str | None) -> list[str] | None:
    """The paths a tag's value lists (no tag: the whole commit, ``["."]``); ``None`` when it only
    counts them (read the run's lineage record). Anyone who can write the run's tags can write this
    one: a value of another shape is shown as it is."""
    if not value:
        return ["."]
    try:
        parsed = parse_json(value)
    except ValueError:
        return [value]
    if isinstance(parsed, list) and parsed and all(isinstance(p, str) for p in parsed):
        return parsed
    if isinstance(parsed, dict) and set(parsed) == {"count", "listed_in"}:
        return None
    return [value]
