"""Lineage queries: which data and code trained a model, and what was trained on some data.

Two sources, used together when both are there:

* MLflow, searched by tag (``oxen.model.commit``, ``oxen.dataset.commit``, ``oxen.run``,
  ``oxen.endpoint.<slug>``): one indexed query per question, however many runs the
  store holds;
* model repositories: ``runs/<run>/lineage.json`` (the working-tree copy is always
  complete) and ``deployments/*.json``, which answer without MLflow.

Every answer is a list of *run views*: a lineage record (schema
``oxen-callbacks/lineage/v1``) plus ``registered`` (model versions), ``endpoints``
and ``source`` (where the record came from)::

    finder = LineageFinder(tracking_uri="http://127.0.0.1:5000", model_repos=["models/reviews"])
    finder.run("0f3c...")["dataset"]["commit"]
    finder.trace("runs/run-a/checkpoints/last.ckpt")["runs"][0]["dataset"]["commit"]
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._mlflow.paths_tag import paths_of_tag
from .._mlflow.query import TrackingReader, check_tracking_uri, missing_store, open_reader, quote, tag_filter, tag_is
from .._mlflow.query import tracking_uri as default_tracking_uri
from .._oxen import layout as oxen_layout
from .._oxen.commit_id import FULL_COMMIT_ID_LEN, is_commit_like
from .._publish.claim import run_in_use
from .._publish.fits import as_saved
from ..errors import ConfigurationError
from ..lineage import SCHEMA, read_lineage, repo_record, repo_records
from ..model_repo import clean_endpoint, endpoint_slug, endpoint_tag, read_deployments, run_of_path, runs_dir
from ..names import (
    ENV_MLFLOW_TRACKING_URI,
    LINEAGE_ARTIFACT,
    TAG_CODE_GIT_COMMIT,
    TAG_DATASET_COMMIT,
    TAG_DATASET_PATHS,
    TAG_DATASET_REPO,
    TAG_DATASET_REVISION,
    TAG_ENDPOINT_PREFIX,
    TAG_LINEAGE_STATUS,
    TAG_MODEL_COMMIT,
    TAG_MODEL_PATH,
    TAG_MODEL_REPO,
    TAG_RUN,
)

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def record_from_tags(run: dict[str, Any]) -> dict[str, Any]:
    """A lineage record rebuilt from a run's ``oxen.*`` tags (no checkpoint list; dataset paths
    ``None`` when the tag only counts them)."""
    t = run["tags"]
    dataset = None
    if t.get(TAG_DATASET_COMMIT):
        dataset = {"repo": t.get(TAG_DATASET_REPO), "revision": t.get(TAG_DATASET_REVISION),
                   "commit": t[TAG_DATASET_COMMIT], "paths": paths_of_tag(t.get(TAG_DATASET_PATHS))}
    return {"schema": SCHEMA, "dataset": dataset,
            "model": {"repo": t.get(TAG_MODEL_REPO), "commit": t.get(TAG_MODEL_COMMIT), "path": t.get(TAG_MODEL_PATH)},
            "checkpoints": [], "run": {"name": t.get(TAG_RUN), "mlflow_run_id": run["run_id"]},
            "code": {"git_commit": t.get(TAG_CODE_GIT_COMMIT), "git_dirty": None},
            "status": t.get(TAG_LINEAGE_STATUS) or run.get("status")}


def _another_runs(record: dict[str, Any], run: dict[str, Any]) -> str | None:
    """Which other run ``record`` (an MLflow run's lineage artifact) is the record of, by the MLflow run
    id it names and the run's ``oxen.run`` tag; ``None`` when it is this run's."""
    mlflow_run, name = record["run"].get("mlflow_run_id"), record["run"].get("name")
    if mlflow_run != run["run_id"]:
        return f"MLflow run {mlflow_run}"
    if (tagged := run["tags"].get(TAG_RUN)) and tagged != name:
        return f"Oxen run {name!r} (this run's tag says {tagged!r})"
    return None


def _paths_not_in_tags(tags: dict[str, str]) -> bool:
    """Whether the run's dataset paths are too many for its tags (its lineage artifact lists them)."""
    return bool(tags.get(TAG_DATASET_COMMIT)) and paths_of_tag(tags.get(TAG_DATASET_PATHS)) is None


class LineageFinder:
    """Answers lineage questions from MLflow and/or model repositories.

    Args:
        tracking_uri: MLflow to search (default ``$MLFLOW_TRACKING_URI``; none: model repositories only).
        model_repos: model repositories to read; default the one the current folder lies in.
    """

    def __init__(self, *, tracking_uri: str | None = None, model_repos: Sequence[str | os.PathLike[str]] = ()) -> None:
        uri = default_tracking_uri(tracking_uri)
        if uri:
            check_tracking_uri(uri, given_as="--tracking-uri" if tracking_uri else ENV_MLFLOW_TRACKING_URI)
        #: The SQLite file the tracking URI names when it does not exist: never created by a query.
        self.missing_store = missing_store(uri) if uri else None
        self.reader: TrackingReader | None = open_reader(uri) if uri and not self.missing_store else None
        self.model_repos = list(dict.fromkeys(_check_repo(r) for r in model_repos))  # (one given twice: once)
        if not self.model_repos:
            here = oxen_layout.find_repo_root(Path.cwd())
            if here is not None and runs_dir(here).is_dir():
                self.model_repos = [here]
        self._aliases: dict[str, dict[str, str]] = {}

    # -- one run ---------------------------------------------------------------------------
    def run(self, run_id: str) -> dict[str, Any]:
        """The lineage of ``run_id`` (an MLflow run id, or a run name in a model repository)."""
        found_in = [(repo, record) for repo in self.model_repos
                    if (record := repo_record(repo, run_id) or next(
                        (r for r in repo_records(repo) if r["run"].get("mlflow_run_id") == run_id), None)) is not None]
        if len(found_in) > 1:  # the same run name in two repositories: not ours to pick one
            raise ConfigurationError(
                f"Run {run_id!r} is in {len(found_in)} model repositories: "
                f"{', '.join(str(repo) for repo, _record in found_in)}.",
                "pass only the --model-repo that holds the run you mean (or its MLflow run id).")
        if found_in:
            return self._enrich([{**found_in[0][1], "source": "model-repo"}])[0]
        if self.reader is None:
            where = ", ".join(str(r) for r in self.model_repos)
            raise ConfigurationError(
                f"Run {run_id!r} is not in {('the model repository ' + where) if where else 'any model repository'}"
                f" and {self._no_mlflow()}.",
                "set MLFLOW_TRACKING_URI (or --tracking-uri) for an MLflow run id, "
                "or pass --model-repo PATH with the run's name (runs/<name>/ in that repository).")
        found = self.reader.get_run(run_id)
        if found is None:
            raise ConfigurationError(f"MLflow at {self.reader.uri} has no run {run_id!r}.",
                                     "copy the run id from the MLflow UI or from the training output.")
        view = self._view(found, artifact=True)
        return self._enrich([view])[0]

    def _view(self, run: dict[str, Any], *, artifact: bool = False) -> dict[str, Any]:
        """A run view for an MLflow run: the model repository's copy, else the artifact, else tags."""
        tags = run["tags"]
        repo, name = tags.get(TAG_MODEL_REPO), tags.get(TAG_RUN)
        here = bool(repo) and oxen_layout.is_repo(repo)
        record = repo_record(repo, name) if here and name else None
        if record is not None and record["run"].get("mlflow_run_id") == run["run_id"]:
            return {**record, "source": "model-repo", "_tags": tags}
        if (artifact or _paths_not_in_tags(tags)) and self.reader is not None:
            try:
                data = self.reader.artifact_json(run["run_id"], LINEAGE_ARTIFACT)
                if data is not None:
                    record = read_lineage(data)
                    if (other := _another_runs(record, run)) is None:
                        return {**record, "source": "mlflow-artifact", "_tags": tags}
                    log.warning("Run %s: its %s artifact is the record of %s (copied or edited); using its tags",
                                run["run_id"], LINEAGE_ARTIFACT, other)
            except ValueError as exc:  # not JSON, or not a lineage record (LineageValidationError)
                log.warning("Run %s: its %s artifact is not a lineage record (%s); using its tags",
                            run["run_id"], LINEAGE_ARTIFACT, exc)
        why = ("the model repository on this machine holds no record of this run" if here else
               "the model repository is not on this machine")
        return {**record_from_tags(run), "source": "mlflow-tags", "source_note": why, "_tags": tags}

    # -- trace -------------------------------------------------------------------------------
    def trace(self, target: str) -> dict[str, Any]:
        """Runs on the other side of ``target``: a checkpoint path, a model or dataset commit, or an endpoint."""
        target = target.strip()
        locations = [] if "://" in target else self._checkpoint_locations(target)
        if locations:
            kind, views = "checkpoint", [view for location in locations for view in self._by_checkpoint(*location)]
        elif self.reader is None and not self.model_repos:
            raise ConfigurationError(f"Nowhere to look for {target!r}: {self._no_mlflow()} and no model repository.",
                                     "set MLFLOW_TRACKING_URI (or --tracking-uri), or pass --model-repo PATH.")
        elif is_commit_like(target):
            kind, views = self._by_commit(target.lower())
        else:
            kind, views = "endpoint", self._by_endpoint(target)
        result = {"target": target, "kind": kind, "runs": self._enrich(views)}
        if self.missing_store and not views:
            result["note"] = f"{self._no_mlflow()}: only the model repositories were searched"
        return result

    def _no_mlflow(self) -> str:
        """Why MLflow is not searched."""
        if self.missing_store:
            return f"the MLflow store {self.missing_store} does not exist"
        return "no MLflow tracking URI is set"

    def _checkpoint_locations(self, target: str) -> list[tuple[Path, str]]:
        """``(model repository, path inside it)`` of each run folder file ``target`` may name: one
        for a path on disk; for ``runs/<run>/...``, every known model repository holding that run."""
        try:
            return self._locations_of(target)
        except OSError as exc:  # not a path this system can hold (too long, a NUL byte): not a checkpoint
            log.debug("%r is not a checkpoint path: %s", target[:200], exc)
            return []

    def _locations_of(self, target: str) -> list[tuple[Path, str]]:
        given = Path(target).expanduser()
        if "/" not in target and not given.exists():
            return []
        absolute = given if given.is_absolute() else Path.cwd() / given
        anchor = next((p for p in (absolute, *absolute.parents) if p.exists()), Path("/"))
        real = anchor.resolve() / absolute.relative_to(anchor)
        root = oxen_layout.find_repo_root(anchor)
        if root is not None:
            rel = real.relative_to(root)
            if run_of_path(rel) is not None:
                return [(root, rel.as_posix())]
        run_name = None if given.is_absolute() else run_of_path(given)
        if run_name is None:
            return []
        repos = [repo for repo in self.model_repos if (runs_dir(repo) / run_name).is_dir()]
        if not repos and self.reader is not None:  # the model repositories MLflow's runs of that name used
            tagged = {run["tags"].get(TAG_MODEL_REPO) for run in self.reader.search_runs(tag_filter(TAG_RUN, run_name))}
            repos = [Path(p) for p in sorted(p for p in tagged if p) if oxen_layout.is_repo(p)]
        unique = {os.path.realpath(repo): repo for repo in repos}  # (one folder named two ways is one repository)
        return [(repo, given.as_posix()) for repo in unique.values()]

    def _by_checkpoint(self, repo: Path, rel: str) -> list[dict[str, Any]]:
        record = repo_record(repo, run_of_path(rel) or "")
        if record is None:
            return []
        # (a file inside a checkpoint folder, as Hugging Face saves them, is that checkpoint's)
        matched = [c for c in record["checkpoints"] if c["path"] == rel or rel.startswith(c["path"] + "/")]
        return [as_saved({**record, "source": "model-repo", "matched_checkpoints": matched}, matched)] if matched else []

    def _by_commit(self, commit: str) -> tuple[str, list[dict[str, Any]]]:
        prefix = len(commit) < FULL_COMMIT_ID_LEN  # shorter input is a prefix (a 31-digit id matches itself)
        models: dict[str, dict[str, Any]] = {}
        datasets: dict[str, dict[str, Any]] = {}
        if self.reader is not None:
            for run in self.reader.search_runs(tag_filter(TAG_MODEL_COMMIT, commit, prefix=prefix)):
                models[run["run_id"]] = self._view(run)
            if prefix or not models:  # a full id names one commit: a model's is no dataset's
                for run in self.reader.search_runs(tag_filter(TAG_DATASET_COMMIT, commit, prefix=prefix)):
                    datasets[run["run_id"]] = self._view(run)
        for repo in self.model_repos:
            for record in repo_records(repo):
                # (a record without its MLflow run id is listed on its own: a run continued without
                # MLflow has a newer record than the MLflow run of its first fit)
                matched = [c for c in record["checkpoints"] if (c["commit"] or "").startswith(commit)]
                # (of an earlier fit: its MLflow run)
                view = as_saved({**record, "source": "model-repo"}, matched) if matched else None
                key = (view or record)["run"].get("mlflow_run_id") or f"{repo}:{record['run'].get('name')}"
                if view is not None:
                    models.setdefault(key, view)
                if record["dataset"] and record["dataset"]["commit"].startswith(commit):
                    datasets.setdefault(key, {**record, "source": "model-repo"})
        for view in models.values():
            model = view["model"]
            view["matched_checkpoints"] = [c for c in view["checkpoints"] if (c["commit"] or "").startswith(commit)] or (
                [{"commit": model["commit"], "path": model["path"]}] if (model["commit"] or "").startswith(commit) else [])
        if models and not datasets:
            return "model-commit", list(models.values())
        if datasets and not models:
            return "dataset-commit", list(datasets.values())
        return "commit", [*models.values(), *datasets.values()]

    def _by_endpoint(self, endpoint: str) -> list[dict[str, Any]]:
        views: dict[str, dict[str, Any]] = {}
        if self.reader is not None:
            key, recorded = endpoint_tag(endpoint), clean_endpoint(endpoint)
            for run in self.reader.search_runs(tag_filter(key, recorded)):
                if tag_is(run, key, recorded):
                    views[run["run_id"]] = self._view(run)
        slug = endpoint_slug(endpoint)
        for repo in self.model_repos:
            for deployment in read_deployments(repo):
                if deployment["slug"] != slug:
                    continue
                record = repo_record(repo, deployment["run"]["name"] or "")
                if record is not None:
                    key = record["run"].get("mlflow_run_id") or f"{repo}:{record['run']['name']}"
                    views.setdefault(key, {**record, "source": "model-repo"})
        return list(views.values())

    # -- registered versions and endpoints -----------------------------------------------------
    def _enrich(self, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
        versions: dict[str, list[dict[str, Any]]] = {}
        # (ids as MLflow makes them: a record's may be anything its writer put there)
        run_ids = [i for i in (v["run"].get("mlflow_run_id") for v in views) if isinstance(i, str) and _RUN_ID.fullmatch(i)]
        if self.reader is not None and run_ids:
            for i in range(0, len(run_ids), 100):
                chunk = ", ".join(quote(r) for r in run_ids[i:i + 100])
                for version in self.reader.search_versions(f"run_id IN ({chunk})"):
                    version["aliases"] = sorted(a for a, v in self._aliases_of(version["name"]).items()
                                                if v == version["version"])
                    versions.setdefault(version["run_id"], []).append(version)
        deployments = {str(r): read_deployments(r) for r in {v["model"]["repo"] for v in views}
                       if r and oxen_layout.is_repo(r)}
        for view in views:
            self._settle_status(view)
            view["registered"] = sorted(versions.get(view["run"].get("mlflow_run_id"), []),
                                        key=lambda v: (v["name"], int(v["version"])))
            view["endpoints"] = _endpoints(view, deployments.get(str(view["model"]["repo"]), []), view.pop("_tags", {}))
        return views

    def _settle_status(self, view: dict[str, Any]) -> None:
        """A model repository's record still ``RUNNING`` while MLflow ended the run (a killed run
        whose amended record was not committed yet): MLflow's end is the answer, said so."""
        run_id = view["run"].get("mlflow_run_id")
        if view.get("status") != "RUNNING" or view.get("source") != "model-repo":
            return
        repo, name = view["model"].get("repo"), view["run"].get("name")
        if isinstance(repo, str) and isinstance(name, str) and run_in_use(repo, name):
            return  # a live process trains it (a fit continuing it in an MLflow run an earlier fit ended)
        found = (self.reader.get_run(run_id) if self.reader is not None and isinstance(run_id, str)
                 and _RUN_ID.fullmatch(run_id) else None)
        if found is None or found.get("status") in (None, "RUNNING", "SCHEDULED"):
            if isinstance(repo, str) and isinstance(name, str) and oxen_layout.is_repo(repo):
                view["status_note"] = ("no process holds this run any more (killed?): `oxen-callbacks sync` commits "
                                       "what it journaled and ends the run")
            return
        view["status"] = found["tags"].get(TAG_LINEAGE_STATUS) or found["status"]
        view["status_note"] = (f"MLflow ended the run as {view['status']}; the model repository's record still "
                               "says RUNNING (`oxen-callbacks sync` commits the amended record)")

    def _aliases_of(self, name: str) -> dict[str, str]:
        if name not in self._aliases:
            assert self.reader is not None
            self._aliases[name] = self.reader.aliases(name)
        return self._aliases[name]


def _endpoints(view: dict[str, Any], deployments: list[dict[str, Any]], tags: dict[str, str]) -> list[dict[str, Any]]:
    """What the run's models serve: the model repository's deployment records, else the run's MLflow tags."""
    found = {d["slug"]: {"endpoint": d["endpoint"], "model_commit": d["model"]["commit"], "model_path": d["model"]["path"],
                         "deployed_at": d.get("deployed_at")}
             for d in deployments if d["run"].get("name") == view["run"].get("name")}
    for key, value in tags.items():
        if key.startswith(TAG_ENDPOINT_PREFIX):
            found.setdefault(key[len(TAG_ENDPOINT_PREFIX):], {"endpoint": value, "model_commit": None,
                                                              "model_path": None, "deployed_at": None})
    return sorted(found.values(), key=lambda e: e["endpoint"])


def _check_repo(path: str | os.PathLike[str]) -> Path:
    root = Path(path).expanduser().resolve()
    if not oxen_layout.is_repo(root):
        raise ConfigurationError(f"--model-repo {str(path)!r} is not an Oxen repository (no .oxen folder).",
                                 "pass the folder the training run committed checkpoints to (model_repo=...).")
    return root
