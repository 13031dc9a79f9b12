"""Which fit of a continued run a run's record, a job or a checkpoint belongs to.

A run continued under its name (``resume_from=<run>, run_name=<run>``) is one lineage record for
several fits: ``earlier_fits`` lists the fits it went on from, ``earlier_mlflow_runs`` their MLflow
runs (each with its ``fit_id``), ``earlier_code`` their code by fit id, and each checkpoint carries
the ``fit_id`` that saved it: what made an earlier fit's checkpoint is told apart from the record's
own code and MLflow run, which are the latest fit's. A killed fit's worker may land its
saves late, after a later fit took the record over (see :class:`.committer.Committer`).
"""

from __future__ import annotations

import math
from typing import Any


def earlier_fits(record: dict[str, Any]) -> list[str]:
    """The fits a continued run's record went on from (``earlier_fits``), oldest first."""
    earlier = record.get("earlier_fits")
    return [f for f in earlier if isinstance(f, str)] if isinstance(earlier, list) else []


def saved_by(entry: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether checkpoint ``entry`` of a run's record was saved by ``record``'s own fit, not by a fit
    it went on from (a record or checkpoint without a fit id, written before fits had them, counts as its own)."""
    return record.get("fit_id") is None or entry.get("fit_id") in (None, record["fit_id"])


def earlier_mlflow_runs(existing: dict[str, Any], *, continued: bool) -> list[dict[str, Any]]:
    """The MLflow runs (id, redacted tracking URI, fit id) of the fits a run's record went on from:
    those ``existing`` lists, and its own when this fit ``continued`` it."""
    listed = existing.get("earlier_mlflow_runs")
    runs = [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []  # (hand-edited: ignored)
    theirs = existing.get("run") if isinstance(existing.get("run"), dict) else {}
    entry = {"mlflow_run_id": theirs.get("mlflow_run_id"), "mlflow_tracking_uri": theirs.get("mlflow_tracking_uri"),
             "fit_id": existing.get("fit_id")}
    if continued and entry["mlflow_run_id"] and entry not in runs:
        runs.append(entry)
    return runs


def earlier_code(existing: dict[str, Any], *, continued: bool) -> dict[str, Any]:
    """The code of each fit a run's record went on from, by fit id: those ``existing`` lists, and its
    own when this fit ``continued`` it."""
    listed = existing.get("earlier_code")
    codes = {f: c for f, c in listed.items() if isinstance(c, dict)} if isinstance(listed, dict) else {}
    if continued and isinstance(existing.get("fit_id"), str) and isinstance(existing.get("code"), dict):
        codes[existing["fit_id"]] = existing["code"]
    return codes


def as_saved(view: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``view`` (a run's record) for checkpoints ``entries`` that one earlier fit of the run saved: that
    fit's code and MLflow run instead of the latest fit's, and a note saying so (as it is otherwise)."""
    fits = {e.get("fit_id") for e in entries}
    fit = next(iter(fits)) if len(fits) == 1 else None
    if not isinstance(fit, str) or fit == view.get("fit_id") or fit not in earlier_fits(view):
        return view
    codes, runs = view.get("earlier_code"), view.get("earlier_mlflow_runs")
    code = codes.get(fit) if isinstance(codes, dict) and isinstance(codes.get(fit), dict) else None
    mlflow = next((r for r in runs if isinstance(r, dict) and r.get("fit_id") == fit), {}) if isinstance(runs, list) else {}
    said = "its code and MLflow run" if code is not None else "its code and MLflow run were not recorded: shown as none"
    later = {k: v for k, v in view.items() if k not in ("resumed_from", "status")}  # (the later fit's)
    return {**later, "status": None, "code": code or {"git_commit": None},
            "run": {**view["run"], "mlflow_run_id": mlflow.get("mlflow_run_id"),
                    "mlflow_tracking_uri": mlflow.get("mlflow_tracking_uri")},
            "fit_note": f"saved by an earlier fit of this run ({fit[:12]}): {said}; the record goes on with a "
                        f"later fit, {view.get('status') or 'running'}"}


def late_fit(record: dict[str, Any] | None, base: dict[str, Any] | None) -> str | None:
    """The fit of a job's ``base`` record when ``record`` (the run's, in the repository) went on from
    it: that job is late (its worker fell behind, or ``sync`` finished it after a kill)."""
    fit = (base or {}).get("fit_id")
    return fit if record and fit is not None and fit in earlier_fits(record) else None


def finalized(record: dict[str, Any]) -> bool:
    """Whether the record is a run segment's final one (its finalize job ran)."""
    return record.get("status") not in (None, "RUNNING")


def saved_by_earlier_fit(kept: list[dict[str, Any]], source: str | None) -> dict[str, Any] | None:
    """The latest kept checkpoint written at the trainer's path ``source``: a best checkpoint that an
    earlier fit of a continued run saved (HF's ``load_best_model_at_end`` loads it after a resume)."""
    return next((c for c in reversed(kept) if source and c.get("source") == source), None)


def checkpoint_named(found: Any) -> dict[str, Any] | None:
    """``{"commit", "path"}`` of a checkpoint another run committed (a job's ``best_earlier``), if well formed."""
    ok = isinstance(found, dict) and all(isinstance(found.get(k), str) for k in ("commit", "path"))
    return found if ok else None


def better_earlier_checkpoint(record: dict[str, Any] | None, fit_id: str | None, metric: str, mode: str,
                              score: float | None) -> dict[str, Any] | None:
    """The checkpoint an earlier fit of a continued run saved (still at its path, its trainer file known)
    whose ``metric`` beats ``score``, this fit's best by ``mode`` (``"min"`` or ``"max"``), if any: a new
    ``ModelCheckpoint`` knows only its own fit's, the run's best is the whole run's. ``record``: the
    run's committed record; ``score`` ``None`` or not finite: the earlier fits' best."""
    if not record or not isinstance(record.get("checkpoints"), list):
        return None
    entries = [c for c in record["checkpoints"] if isinstance(c, dict)]
    latest = {c.get("path"): c for c in entries}  # (a path saved again holds the later bytes)

    def value(entry: dict[str, Any]) -> float | None:
        found = (entry.get("metrics") or {}).get(metric) if isinstance(entry.get("metrics"), dict) else None
        ok = isinstance(found, (int, float)) and not isinstance(found, bool) and math.isfinite(found)
        return float(found) if ok else None

    earlier = [c for c in entries if c.get("fit_id") not in (None, fit_id) and c.get("kept", True)
               and latest.get(c.get("path")) is c and isinstance(c.get("source"), str) and value(c) is not None]
    if not earlier or mode not in ("min", "max"):
        return None
    best = (min if mode == "min" else max)(earlier, key=lambda c: value(c))  # type: ignore[arg-type, return-value]
    if score is None or not math.isfinite(score):
        return best
    found = value(best)
    assert found is not None
    return best if (found < score if mode == "min" else found > score) else None
