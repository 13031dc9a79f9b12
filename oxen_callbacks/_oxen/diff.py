"""Row-level diffs of tabular files through ``oxen.diff`` (run them in a child process:
:func:`oxen_callbacks._oxen.child.run_in_child`; oxenai holds the GIL for a whole call)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import OxenError
from .repo import call_oxen

_SHOWN_COLUMNS = 20  # columns named in a message about one file
_REASON_CHARS = 200  # of an oxenai error quoted as the reason a table was not compared


def table_diffs(pairs: list[list[str]], keys: list[str], limit: int) -> list[dict[str, Any]]:
    """Row-level ``oxen.diff`` of each ``[left_file, right_file]`` (run it in an oxen child process).

    Without ``keys`` a changed row shows as one ``removed`` and one ``added`` row; with
    key columns it shows as ``modified`` with ``<col>.left`` / ``<col>.right`` values.
    Columns added, removed or of another type are listed in ``schema``. A table that cannot
    be read or compared has ``error`` (one line) and no rows; the others are still compared.
    """
    return [_table_diff(left, right, keys, limit) for left, right in pairs]


def _table_diff(left: str, right: str, keys: list[str], limit: int) -> dict[str, Any]:
    import oxen
    from oxen import df_utils

    found: dict[str, Any] = {"format": "tabular", "error": None, "schema": None, "missing_keys": [],
                             "counts": {}, "total": 0, "columns": [], "rows": []}
    columns = []
    for side, path in (("A", left), ("B", right)):
        try:
            frame = call_oxen(df_utils.load, path, what=f"load {path}")
        except OxenError as exc:
            return {**found, "error": f"run {side}'s file cannot be read as a table ({_one_line(exc)})"}
        columns.append({name: str(dtype) for name, dtype in frame.schema.items()})
    a, b = columns
    found["schema"] = {"added": [c for c in b if c not in a], "removed": [c for c in a if c not in b],
                       "retyped": [f"{c} ({a[c]} -> {b[c]})" for c in a if c in b and a[c] != b[c]]}
    found["missing_keys"] = [k for k in keys if k not in a or k not in b]
    if found["missing_keys"]:
        key = found["missing_keys"][0]
        where = "is in neither run's file" if key not in a and key not in b else \
            f"is not in run {'A' if key not in a else 'B'}'s file"
        held = list(b if key in a else a)
        shown = ", ".join(held[:_SHOWN_COLUMNS]) + (", ..." if len(held) > _SHOWN_COLUMNS else "")
        return {**found, "error": f"key column {key!r} {where} (its columns: {shown})"}
    def compare() -> tuple[str, Any]:
        diff = oxen.diff(left, to=right, keys=keys)
        return diff.format, diff.get().data if diff.format == "tabular" else None

    try:
        kind, frame = call_oxen(compare, what="oxen diff")
    except OxenError as exc:
        return {**found, "error": f"oxen diff cannot compare them ({_one_line(exc)})"}
    if kind != "tabular":
        return {**found, "format": kind}
    status = next(c for c in frame.columns if c.replace(".", "_").strip("_").endswith("diff_status"))
    counts = {str(s): int(n) for s, n in frame.get_column(status).value_counts().iter_rows()}
    rows = json.loads(json.dumps(frame.head(limit).to_dicts(), default=str))
    for row in rows:
        row["status"] = row.pop(status)
    return {**found, "counts": dict(sorted(counts.items())), "total": frame.height,
            "columns": [c for c in frame.columns if c != status], "rows": rows}


def _one_line(exc: OxenError) -> str:
    """An oxenai error (as :func:`.repo.call_oxen` raised it) in one short line, without its call's name."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."
