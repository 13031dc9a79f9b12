"""Row-level diffs of tabular files through ``oxen.diff`` (run them in a child process:
:func:`oxen_callbacks._oxen.child.run_in_child`; oxenai holds the GIL for a whole call)."""

from __future__ import annotations

import json
from typing import Any


def table_diffs(pairs: list[list[str]], keys: list[str], limit: int) -> list[dict[str, Any]]:
    """Row-level ``oxen.diff`` of each ``[left_file, right_file]`` (run it in an oxen child process).

    Without ``keys`` a changed row shows as one ``removed`` and one ``added`` row; with
    key columns it shows as ``modified`` with ``<col>.left`` / ``<col>.right`` values.
    """
    return [_table_diff(left, right, keys, limit) for left, right in pairs]


def _table_diff(left: str, right: str, keys: list[str], limit: int) -> dict[str, Any]:
    import oxen

    diff = oxen.diff(left, to=right, keys=keys)
    if diff.format != "tabular":
        return {"format": diff.format, "counts": {}, "columns": [], "rows": []}
    frame = diff.get().data
    status = next(c for c in frame.columns if c.replace(".", "_").strip("_").endswith("diff_status"))
    counts = {str(s): int(n) for s, n in frame.get_column(status).value_counts().iter_rows()}
    rows = json.loads(json.dumps(frame.head(limit).to_dicts(), default=str))
    for row in rows:
        row["status"] = row.pop(status)
    return {"format": "tabular", "counts": dict(sorted(counts.items())), "total": frame.height,
            "columns": [c for c in frame.columns if c != status], "rows": rows}
