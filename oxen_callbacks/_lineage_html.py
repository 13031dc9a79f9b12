"""A lineage record as Jupyter shows it: a small table of pointers and the lineage picture.

``callback.lineage`` is a :class:`LineageView`: the plain JSON object of the record (a
``dict``, compared, indexed and serialized like one) that a notebook renders through
``_repr_html_``::

    lineage = callback.lineage
    lineage                      # in Jupyter: run, dataset repo@commit, model repo,
                                 # each checkpoint's step/commit/path, MLflow run, picture
    lineage["dataset"]["commit"]

Every value is HTML-escaped: a record read from someone else's repository may hold
markup in a run name or a path. The picture (:mod:`._mlflow.picture`, SVG) is loaded
only when a notebook asks for the HTML.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

_STYLE = ("<style>.oxen-lineage table{border-collapse:collapse;margin:4px 0}"
          ".oxen-lineage th,.oxen-lineage td{border:1px solid #ddd;padding:2px 8px;text-align:left;"
          "font-size:12px;font-family:monospace}</style>")


class LineageView(dict):  # type: ignore[type-arg]
    """A lineage record (its JSON object) that renders as HTML in Jupyter; otherwise a plain ``dict``."""

    @classmethod
    def of(cls, record: Mapping[str, Any] | None) -> LineageView | None:
        """``record`` as a view (a shallow copy), ``None`` stays ``None``."""
        return None if record is None else cls(record)

    def _repr_html_(self) -> str:
        return lineage_html(self)


def _e(value: Any) -> str:
    """``value`` as escaped text (``None``: a dash)."""
    return "&mdash;" if value is None or value == "" else html.escape(str(value), quote=True)


def _row(label: str, *cells: Any) -> str:
    return f"<tr><th>{_e(label)}</th>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"


def _at(repo: Any, commit: Any) -> str:
    return f"{repo} @ {commit}" if commit else f"{repo} (no commit yet)"


def lineage_html(record: Mapping[str, Any]) -> str:
    """The record's pointers as an HTML table, its checkpoints as a second one, then the picture."""
    run = record.get("run") or {}
    dataset, model = record.get("dataset"), record.get("model") or {}
    code = record.get("code") or {}
    facts = [
        _row("run", run.get("name"), record.get("status")),
        _row("dataset", _at(dataset.get("repo"), dataset.get("commit")),
             f"asked for {dataset.get('revision')}; " + ", ".join(map(str, dataset.get("paths") or [])))
        if isinstance(dataset, Mapping) else _row("dataset", "none recorded", None),
        _row("model repo", model.get("repo"), _at(model.get("path"), model.get("commit"))),
        _row("MLflow run", run.get("mlflow_run_id"), run.get("mlflow_tracking_uri")),
        _row("code", code.get("git_commit") and f"git {code.get('git_commit')}",
             "dirty" if code.get("git_dirty") else None),
    ]
    checkpoints = [c for c in record.get("checkpoints") or [] if isinstance(c, Mapping)]
    rows = "".join(f"<tr><td>{_e(c.get('step'))}</td><td>{_e(c.get('epoch'))}</td><td>{_e(c.get('commit'))}</td>"
                   f"<td>{_e(c.get('path'))}</td></tr>" for c in checkpoints)
    table = ("<table><tr><th>step</th><th>epoch</th><th>commit</th><th>checkpoint path</th></tr>"
             f"{rows}</table>") if checkpoints else "<p>No checkpoint committed.</p>"
    return (f"<div class='oxen-lineage'>{_STYLE}<table>{''.join(facts)}</table>{table}"
            f"{_picture(record)}</div>")


def _picture(record: Mapping[str, Any]) -> str:
    """The lineage picture as inline SVG (its text is escaped there), or nothing when it cannot be drawn."""
    from ._mlflow.picture import to_svg

    try:
        return to_svg(dict(record))
    except (KeyError, TypeError, ValueError, AttributeError):  # a record too incomplete to draw
        log.debug("No lineage picture for this record", exc_info=True)
        return ""
