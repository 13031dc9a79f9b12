"""The checks :class:`~oxen_callbacks.run.LineageRun` runs on its options at construction.

Every option is checked before any training time is spent; each error is a
:class:`~oxen_callbacks.errors.ConfigurationError` naming the bad value, with a hint.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from pathlib import Path
from typing import Any

from ._oxen import layout as oxen_layout
from ._oxen.repo import damaged_repo
from ._util.processes import check_can_start_processes
from .errors import ConfigurationError, DatasetMismatchError
from .lineage import status_of_an_uncaught_raise
from .names import ENV_MLFLOW_TRACKING_URI

log = logging.getLogger(__name__)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # (whole: fullmatch, not "$", which lets "a\n" by)
#: The Oxen run each MLflow run this process logged into holds: ``{mlflow run id: (model repo, run
#: name, dataset commit)}``. One MLflow run describes one Oxen run (its tags and pointer are one run's).
_OXEN_RUN_OF_MLFLOW_RUN: dict[str, tuple[str, str, str | None, weakref.ref[Any]]] = {}


class RunOptionChecks:
    """``_validate()`` and its parts, over the option attributes ``LineageRun.__init__`` sets
    (``LineageRun`` adds the checks that import MLflow modules)."""

    dataset: Any  # PinnedDataset | None
    model_repo: Path
    run_name: str
    use_mlflow: bool
    mlflow_run_id: str | None
    mlflow_tracking_uri: str | None
    experiment_name: str | None
    remote: str | None
    remote_url: str | None
    push_timeout: float
    drain_timeout: float | None
    mlflow_timeout: float
    register_model: str | None
    log_models: bool
    log_dataset_input: bool
    log_lineage_graph: bool
    _named: bool

    def _continue_in_shared_mlflow_run(self, continuing: bool) -> bool:
        """A second fit logging into the MLflow run an earlier fit of this process logged into (the same
        ``MLFlowLogger``, active run or ``$MLFLOW_RUN_ID``) continues that fit's Oxen run: the MLflow run's tags, pointer and
        models then describe one run, both fits' checkpoints. Returns whether this fit continues a run;
        a fit that cannot continue it (another model repository, name or dataset commit) is refused."""
        from ._mlflow.fluent import run_to_join_id

        mlflow_run = (self.mlflow_run_id or run_to_join_id()) if self.use_mlflow else None
        earlier = _OXEN_RUN_OF_MLFLOW_RUN.get(mlflow_run) if mlflow_run else None
        if earlier is None:
            return continuing
        repo, name, commit, run_ref = earlier
        earlier_run = run_ref()
        if earlier_run is not None and earlier_run is not self and not earlier_run.finished:
            # its train() raised and nothing ended it (HF calls no hook then): it ends FAILED (KILLED for a
            # Ctrl-C) now, before this fit logs into the MLflow run (at exit it would write its end over this fit's)
            earlier_run.finish_after_error(status_of_an_uncaught_raise(), what="train() that raised")
        mine = self.dataset.commit if self.dataset is not None else None
        if repo == str(self.model_repo) and commit == mine and (name == self.run_name or not self._named):
            if name != self.run_name:
                log.info("MLflow run %s holds Oxen run %s of an earlier fit: this fit continues that run.",
                         mlflow_run, name)
            self.run_name = name
            return True
        theirs = f"run {name!r} in the model repository {repo!r} on dataset commit {commit}"
        raise ConfigurationError(
            f"MLflow run {mlflow_run} already holds the lineage of {theirs}; this fit (run {self.run_name!r}, "
            f"model repository {str(self.model_repo)!r}, dataset commit {mine}) would replace its tags and pointer.",
            "give each fit its own MLflow run (a new MLFlowLogger, or mlflow.start_run() per fit), or continue "
            "that run with the same model repository and dataset.")

    def _note_mlflow_run(self, mlflow_run: str | None) -> None:
        """This run logs into ``mlflow_run`` (see :meth:`_continue_in_shared_mlflow_run`)."""
        if mlflow_run:
            _OXEN_RUN_OF_MLFLOW_RUN[mlflow_run] = (str(self.model_repo), self.run_name,
                                                   self.dataset.commit if self.dataset is not None else None,
                                                   weakref.ref(self))

    def _validate(self) -> None:
        check_can_start_processes()  # (the commit worker starts right after these checks)
        self._validate_run_name()
        self._validate_apart_from_dataset()
        self._validate_model_repo_folder()
        self._validate_remote()
        self._validate_timeouts()
        self._validate_mlflow_options()

    def _validate_run_name(self) -> None:
        if not _RUN_NAME.fullmatch(self.run_name):
            raise ConfigurationError(
                f"run_name={self.run_name!r} cannot name a folder in the model repository.",
                "use letters, digits, '.', '_' and '-' (at most 128 characters).",
            )

    def _validate_apart_from_dataset(self) -> None:
        """The model repository and a local dataset repository must not nest (a remote one cannot); the
        dataset's paths must be ones a lineage record can hold."""
        named = next((p for p in self.dataset.paths if "\\" in p), None) if self.dataset is not None else None
        if named is not None:  # (a name Linux allows: the run's record would be unreadable)
            raise ConfigurationError(
                f"The dataset path {named!r} holds a backslash, which lineage records refuse (a path "
                "separator on Windows).", "pin the folder holding that file, or rename it in the dataset repository.")
        data_root = self.dataset.source.local_root if self.dataset is not None else None
        if data_root is None:
            return
        if self.model_repo == data_root or data_root in self.model_repo.parents:
            raise ConfigurationError(
                f"model_repo={str(self.model_repo)!r} lies inside the dataset repository {str(data_root)!r}: "
                "checkpoint commits would mix with the dataset's history.",
                "put the model repository in a folder of its own, e.g. beside the dataset repository.",
            )
        if self.model_repo in data_root.parents:
            raise ConfigurationError(
                f"The dataset repository {str(data_root)!r} lies inside model_repo={str(self.model_repo)!r}.",
                "put the model repository in a folder of its own.",
            )

    def _validate_model_repo_folder(self) -> None:
        """``model_repo`` is an Oxen repository, an empty folder, or a path whose existing parents are folders."""
        if self.model_repo.exists() and not self.model_repo.is_dir():
            raise ConfigurationError(f"model_repo={str(self.model_repo)!r} is a file.", "pass a folder.")
        blocking = next((p for p in self.model_repo.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigurationError(f"model_repo={str(self.model_repo)!r} lies below {str(blocking)!r}, which is a file.",
                                     "pass a folder whose parents are folders (missing ones are created).")
        if self.model_repo.is_dir() and not oxen_layout.is_repo(self.model_repo) and any(self.model_repo.iterdir()):
            raise ConfigurationError(
                f"model_repo={str(self.model_repo)!r} is a non-empty folder that is not an Oxen repository.",
                "pass a new or empty folder (it becomes an Oxen repository), or make it one first (in Python: `oxen.init(path)`).",
            )

    def _validate_remote(self) -> None:
        """A remote given by name only must be one the model repository knows (a new repository knows none)."""
        if not self.remote or self.remote_url is not None:
            return
        try:
            known = oxen_layout.remotes(self.model_repo) if oxen_layout.is_repo(self.model_repo) else {}
        except oxen_layout.DamagedLayout as exc:
            raise damaged_repo("model repository", self.model_repo, str(exc)) from None
        if self.remote not in known:
            raise ConfigurationError(
                f"remote={self.remote!r} is not a remote of the model repository {str(self.model_repo)!r} "
                f"(it has: {', '.join(known) or 'none'}).",
                "pass remote_url='https://HOST/namespace/name' too, or add it: "
                f"`oxen-callbacks remote add {self.remote} URL --repo {str(self.model_repo)!r}`.",
            )

    def _validate_timeouts(self) -> None:
        for name, value in (("push_timeout", self.push_timeout), ("drain_timeout", self.drain_timeout),
                            ("mlflow_timeout", self.mlflow_timeout)):
            if value is not None and not value > 0:
                raise ConfigurationError(f"{name}={value!r} must be a positive number of seconds.",
                                         f"e.g. {name}=300, or {name}=None where waiting without limit is allowed.")

    def _validate_mlflow_options(self) -> None:
        """The MLflow options agree with ``mlflow=``, the switches are booleans and the tracking URI is one."""
        for name, value in (("mlflow", self.use_mlflow), ("log_models", self.log_models),
                            ("log_dataset_input", self.log_dataset_input), ("log_lineage_graph", self.log_lineage_graph)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{name}={value!r} is not True or False.", f"pass {name}=True or {name}=False.")
        if not self.use_mlflow:
            given = [n for n, v in (("mlflow_run_id", self.mlflow_run_id), ("mlflow_tracking_uri",
                     self.mlflow_tracking_uri), ("experiment_name", self.experiment_name)) if v]
            if given:
                raise ConfigurationError(f"mlflow=False conflicts with {', '.join(given)}.",
                                         "drop those options, or keep MLflow on (mlflow=True).")
        if self.use_mlflow:
            from ._mlflow.query import check_tracking_uri

            if self.mlflow_tracking_uri:
                check_tracking_uri(self.mlflow_tracking_uri, given_as="mlflow_tracking_uri")
            elif os.environ.get(ENV_MLFLOW_TRACKING_URI):
                check_tracking_uri(os.environ[ENV_MLFLOW_TRACKING_URI], given_as=ENV_MLFLOW_TRACKING_URI)

    def check_commit_of_rank_zero(self, chosen: str | None, *, rank: int) -> None:
        """Each process resolved the dataset revision itself: the commit rank 0 ``chosen`` must be this one's."""
        if self.dataset is not None and chosen != self.dataset.commit:
            raise DatasetMismatchError(
                f"Rank {rank} resolved dataset commit {self.dataset.commit} but rank 0 resolved {chosen}: "
                "the branch moved between processes.\nHINT: pin a commit id instead of a branch."
            )
