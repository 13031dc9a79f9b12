"""A run's ``runs/<run>/lineage.json`` in the model repository's working tree, as the committer
extends it (inside the commit process, under the repository's lock): which record a job extends
(its own fit's, a finalized one it adds to, the later fit's of a run it continued), the committed
one when the working tree's is damaged, and writing it back."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

from .._oxen.repo import LocalRepo
from .._util.fs import DamagedFile, read_json_object, write_atomically, write_json_atomically
from ..errors import ConfigurationError, OxenError
from ..model_repo import lineage_path
from .fits import earlier_code, earlier_fits, earlier_mlflow_runs, finalized, late_fit

log = logging.getLogger(__name__)


class RunRecords:
    """The run records of one model repository (see the module docstring)."""

    def __init__(self, repo: LocalRepo) -> None:
        self.repo = repo

    def load(self, run: str, base: dict[str, Any] | None) -> dict[str, Any]:
        """The run's record to extend: ``base`` (the job's view of the run) with the checkpoints so far.

        A job that lands after its own run segment was finalized (retried later by ``sync``), or after
        a later fit continued the run (``earlier_fits`` names its fit), extends the run's record
        instead: its status, model and end stay as they are.
        """
        existing = self._existing(run)
        if base is None:
            return existing
        fit, their_fit = base.get("fit_id"), (existing or {}).get("fit_id")
        if existing and their_fit != fit and not existing.get("checkpoints"):
            # a run that ended before its first checkpoint (FAILED early): its name was free to take
            # again, and this fit continues nothing of it (nor can a late job of it come)
            existing = None
        if existing and finalized(existing) and their_fit == fit:
            record = copy.deepcopy(existing)  # what the job learnt since (the MLflow run id) is added
            record["run"] = {**record["run"], **{k: v for k, v in base["run"].items() if v is not None}}
            return record
        if existing and late_fit(existing, base) is not None:
            # a late job of a fit the run went on from (its worker fell behind, or `sync` after a kill):
            # its checkpoint joins the history; the later fit's status, model and MLflow run stay
            return copy.deepcopy(existing)
        record = copy.deepcopy(base)
        record["checkpoints"] = existing["checkpoints"] if existing else []
        if existing:
            record["model"] = {**existing["model"], "repo": base["model"]["repo"]}
            earlier = earlier_fits(existing) + ([their_fit] if their_fit and their_fit != fit else [])
            if earlier:
                record["earlier_fits"] = earlier  # the fits this one continued, oldest first
                if runs := earlier_mlflow_runs(existing, continued=their_fit != fit):
                    record["earlier_mlflow_runs"] = runs  # where their logged models are (their marks move)
                if codes := earlier_code(existing, continued=their_fit != fit):
                    record["earlier_code"] = codes  # what made their checkpoints (the record's code is this fit's)
        return record

    def _existing(self, run: str) -> dict[str, Any] | None:
        """The run's record in the working tree; when that file is damaged (cut short, edited by
        hand), the one its last commit holds: every commit of the run committed it."""
        path = self.repo.path / lineage_path(run)
        try:
            return read_json_object(path)
        except FileNotFoundError:
            return None
        except DamagedFile as exc:
            committed = self._committed(run)
            log.warning("%s is damaged (%s): the record its last commit holds is extended instead%s.", path, exc,
                        "" if committed else " (none: the run's record starts anew; its history keeps the rest)")
            return committed

    def _committed(self, run: str) -> dict[str, Any] | None:
        """``runs/<run>/lineage.json`` as HEAD's commit holds it, if it does and it is readable."""
        from .._oxen.shadow import restore_into

        rel = lineage_path(run)
        with tempfile.TemporaryDirectory(prefix="oxen-record-") as tmp:
            try:
                restore_into(self.repo.path, self.repo.resolve(None), [rel], tmp)
                return read_json_object(Path(tmp) / rel)
            except (ConfigurationError, OxenError, OSError, DamagedFile):
                return None

    def read_text(self, run: str) -> str | None:
        try:
            return (self.repo.path / lineage_path(run)).read_text()
        except FileNotFoundError:
            return None

    def restore_text(self, run: str, text: str | None) -> None:
        path = self.repo.path / lineage_path(run)
        if text is None:
            path.unlink(missing_ok=True)
        else:
            write_atomically(path, text)

    def write(self, run: str, record: dict[str, Any]) -> None:
        path = self.repo.path / lineage_path(run)
        write_json_atomically(path, record, indent=2, make_parents=True)
