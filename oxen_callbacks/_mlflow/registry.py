"""Registered model versions, stage promotion and deployment pointers, all named by Oxen commits.

* **Register** (``LineageRun(register_model="name")``): an MLflow model version made from
  the final checkpoint's logged model (source ``models:/<model_id>``, see :mod:`.logged_models`;
  on an MLflow before 3, the run's pointer folder ``runs:/<run>/oxen``), tagged with the
  dataset and model commits.
* **Promote** (``oxen-callbacks promote``): Oxen has no tags, so a stage is a branch,
  ``stage/<stage>``, moved to the promoted commit without touching the model
  repository's working tree or HEAD; the MLflow alias ``<stage>`` follows when a
  registered version names that commit.
* **Deploy** (``oxen-callbacks record-deploy``): ``deployments/<endpoint-slug>.json``
  committed to the model repository says which commit serves an endpoint; the run
  that trained it gets the tag ``oxen.endpoint.<endpoint-slug>``.

Example::

    promote("models/reviews", "3fa2...", "production", tracking_uri="http://mlflow:5000")
    record_deploy("https://api.example.com/reviews", "stage/production", model_repo="models/reviews")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .._oxen import child as oxen_child
from .._oxen import shadow
from .._oxen.commit_id import is_commit_like
from .._oxen.repo import LocalRepo
from .._oxen.tree import PathNotInCommit, files_at
from .._publish.adding import adding
from .._publish.queue import repo_lock_path
from .._util import background
from .._util.fs import parse_json, write_json_atomically
from .._util.locks import FileLock
from .._util.redact import redact_url
from ..errors import ConfigurationError, PartlyDoneError
from ..lineage import find_checkpoint_run
from ..model_repo import (
    DEPLOY_SCHEMA,
    clean_endpoint,
    deployment_path,
    endpoint_slug,
    endpoint_tag,
    read_deployment,
)
from ..names import (
    POINTER_ARTIFACT_DIR,
    TAG_CODE_GIT_COMMIT,
    TAG_DATASET_COMMIT,
    TAG_DATASET_PATHS,
    TAG_DATASET_REPO,
    TAG_MODEL_COMMIT,
    TAG_MODEL_PATH,
    TAG_MODEL_REPO,
    TAG_RUN,
)
from .paths_tag import paths_tag
from .query import open_reader, tag_filter, tag_is

log = logging.getLogger(__name__)

STAGE_PREFIX = "stage/"
_STAGE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_LOCK_TIMEOUT_S = 600.0


def check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE.match(stage) or stage == "latest" or re.fullmatch(r"v\d+", stage):
        raise ConfigurationError(
            f"--stage {stage!r} cannot name both an Oxen branch 'stage/<stage>' and an MLflow alias.",
            "use lowercase letters, digits, '-' and '_' (not 'latest' or 'v<N>'), e.g. --stage production.",
        )
    return stage


def check_model_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or "/" in name or ":" in name:
        raise ConfigurationError(f"register_model={name!r} is not a registered model name.",
                                 "pass a name such as 'reviews-classifier' (no '/' or ':').")
    return name


# -- registering ---------------------------------------------------------------------------
def version_tags(record: dict[str, Any]) -> dict[str, str]:
    """Tags of a model version registered from ``record``: the Oxen commits behind it."""
    model, dataset, code = record["model"], record.get("dataset"), record.get("code") or {}
    tags = {TAG_MODEL_REPO: model["repo"], TAG_MODEL_COMMIT: model["commit"], TAG_MODEL_PATH: model["path"],
            TAG_RUN: record["run"].get("name"), TAG_CODE_GIT_COMMIT: code.get("git_commit")}
    if dataset:
        tags.update({TAG_DATASET_REPO: redact_url(dataset["repo"]), TAG_DATASET_COMMIT: dataset["commit"],
                     TAG_DATASET_PATHS: paths_tag(dataset["paths"])})
    return {k: str(v) for k, v in tags.items() if v is not None}


def register_version(client: Any, name: str, run_id: str, record: dict[str, Any],
                     model_id: str | None = None) -> dict[str, Any]:
    """Register the run's model commit as a new version of ``name``, from its logged model ``model_id``
    when there is one; returns ``{name, version}``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Weights live in Oxen: see the version tags oxen.model.*.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model = record["model"]
    version = _registered_already(client, name, run_id, model)
    if version is None:
        source, linked = f"runs:/{run_id}/{POINTER_ARTIFACT_DIR}", {}
        if model_id is not None:
            source, linked = _logged_model_source(client, model_id), {"model_id": model_id}
        version = str(client.create_model_version(
            name, source=source, run_id=run_id, tags=version_tags(record), **linked,
            description=f"{model['path']} at Oxen commit {model['commit']} of {model['repo']}").version)
    if model_id is not None:
        _list_version_on_model(client, model_id, name, version)
    return {"name": name, "version": version}


def _registered_already(client: Any, name: str, run_id: str, model: dict[str, Any]) -> str | None:
    """The version of ``name`` that run ``run_id`` registered for ``model`` before, if any: an end
    replayed after a fault that came after registering (a restarting server, a killed ``sync``) makes
    no second version."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        tags = version.tags or {}
        if version.name == name and (tags.get(TAG_MODEL_COMMIT), tags.get(TAG_MODEL_PATH)) == (
                model["commit"], model["path"]):
            return str(version.version)
    return None


def _logged_model_source(client: Any, model_id: str) -> str:
    """``models:/<model_id>``, as ``mlflow.register_model`` names it. A database store resolves that
    through MLflow's global tracking URI: for a client of another store (a thread of a training process
    whose logger names its own), the model's artifact location instead."""
    import mlflow

    uri = client.tracking_uri
    if uri.startswith(("http://", "https://", "databricks")) or uri == mlflow.get_tracking_uri():
        return f"models:/{model_id}"
    return client.get_logged_model(model_id).artifact_location


def _list_version_on_model(client: Any, model_id: str, name: str, version: str) -> None:
    """The logged model's own list of its registered versions (what ``mlflow.register_model`` keeps)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = parse_json(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": version}
    if entry not in listed:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})


# -- promoting -----------------------------------------------------------------------------
def _model_repo(path: str | os.PathLike[str]) -> LocalRepo:
    return LocalRepo(path, role="model repository")


def _resolve(repo: LocalRepo, revision: str) -> str:
    return repo.resolve(revision, branches=lambda: oxen_child.branches(repo.path))


def promote(model_repo: str | os.PathLike[str], revision: str, stage: str, *,
            tracking_uri: str | None = None) -> dict[str, Any]:
    """Move branch ``stage/<stage>`` of ``model_repo`` to ``revision``; set the MLflow alias ``<stage>``."""
    check_stage(stage)
    background.wait_for(model_repo)  # a fit of this process may still be committing to `revision`
    repo = _model_repo(model_repo)
    commit = _resolve(repo, revision)
    branch = STAGE_PREFIX + stage
    if repo.current_branch() == branch:
        raise ConfigurationError(f"{branch!r} is checked out in {str(repo.path)!r}: moving it would leave its "
                                 "working tree behind.", "check out another branch there first (in Python: `oxen.Repo(path).checkout('main')`).")
    with FileLock(repo_lock_path(repo.path), timeout=_LOCK_TIMEOUT_S):
        previous = oxen_child.run_in_child(shadow.move_branch, repo_path=str(repo.path),
                                           name=branch, commit=commit)
    result: dict[str, Any] = {"model_repo": str(repo.path), "branch": branch, "commit": commit, "previous": previous,
                              "aliases": [], "aliases_removed": []}
    if tracking_uri:
        try:
            result["aliases"], result["aliases_removed"] = _set_aliases(tracking_uri, repo, commit, stage)
        except Exception as exc:  # the branch moved: say so, not only what failed
            raise PartlyDoneError(
                f"{branch} of {str(repo.path)!r} now names {commit} (was {previous or 'new'}), but the MLflow "
                f"alias @{stage} was not moved: {type(exc).__name__}: {exc}",
                "run the same command again once MLflow answers (the branch is already there).") from exc
    return result


def _set_aliases(tracking_uri: str, repo: LocalRepo, commit: str,
                 alias: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Alias ``alias`` -> the newest version of each registered model naming ``commit``; the alias is
    taken off versions of another commit of ``repo`` where no version names ``commit`` (the stage's
    branch and its alias never name two models). Returns (set, removed)."""
    from mlflow import MlflowClient

    newest: dict[str, str] = {}
    for version in open_reader(tracking_uri).search_versions(tag_filter(TAG_MODEL_COMMIT, commit)):
        if int(version["version"]) > int(newest.get(version["name"], "0")):
            newest[version["name"]] = version["version"]
    client = MlflowClient(tracking_uri)
    for name, version in sorted(newest.items()):
        client.set_registered_model_alias(name, alias, version)
    ours, removed = set(repo.commit_ids()), []
    token = None
    while True:
        page = client.search_registered_models(page_token=token)
        for model in page:
            version = (model.aliases or {}).get(alias)
            if version is None or model.name in newest:
                continue
            named = client.get_model_version(model.name, str(version)).tags.get(TAG_MODEL_COMMIT)
            if named in ours and named != commit:  # this repository's model, no longer the stage's
                client.delete_registered_model_alias(model.name, alias)
                removed.append({"name": model.name, "version": str(version), "alias": alias, "commit": named})
        token = page.token
        if not token:
            break
    return [{"name": name, "version": version, "alias": alias} for name, version in sorted(newest.items())], removed


# -- deployments ------------------------------------------------------------------------------
def record_deploy(endpoint: str, model_commit: str, *, model_repo: str | os.PathLike[str] | None = None,
                  run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Record that ``endpoint`` serves ``model_commit`` (a commit id, prefix or branch such as ``stage/production``)."""
    if not clean_endpoint(endpoint):
        raise ConfigurationError("ENDPOINT is empty.", "pass the endpoint's URL or name, e.g. https://api.example.com/v1/clf.")
    reader = open_reader(tracking_uri) if tracking_uri else None
    if model_repo is None:
        model_repo = _repo_from_mlflow(reader, model_commit)
    repo = _model_repo(model_repo)
    commit = _resolve(repo, model_commit)
    found = find_checkpoint_run(repo.path, commit)
    if found is None:
        raise ConfigurationError(
            f"Commit {commit} of {str(repo.path)!r} holds no checkpoint of a recorded training run.",
            "pass a model commit from `oxen-callbacks lineage RUN` (e.g. its model.commit) or a stage branch.")
    record, checkpoint = found
    run_id = run_id or record["run"].get("mlflow_run_id")
    slug = endpoint_slug(endpoint)
    rel = deployment_path(slug)
    target = repo.path / rel
    deployment = {"schema": DEPLOY_SCHEMA, "endpoint": clean_endpoint(endpoint), "slug": slug,
                  "model": {"repo": str(repo.path), "commit": commit, "path": checkpoint["path"]},
                  "run": {"name": record["run"].get("name"), "mlflow_run_id": run_id},
                  "dataset": {k: record["dataset"][k] for k in ("repo", "commit", "paths")} if record.get("dataset") else None,
                  "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record_commit = None
    with FileLock(repo_lock_path(repo.path), timeout=_LOCK_TIMEOUT_S):
        # (under the lock: another record-deploy may have just committed it)
        previous = _committed_deployment(repo, rel)
        if not previous or previous["model"]["commit"] != commit:
            with adding(repo.path):
                record_commit = _commit_deployment(repo.path, rel, deployment, previous,
                                                   f"oxen-callbacks: {slug} serves {commit}")
        else:
            deployment = previous
            if read_deployment(target) != previous:  # a record-deploy killed before its commit wrote another
                write_json_atomically(target, previous, indent=2, make_parents=True)
    result = {**deployment, "record_commit": record_commit,
              "previous_commit": previous["model"]["commit"] if previous else None, "mlflow_tagged": False}
    if tracking_uri and run_id:
        try:
            _tag_endpoint(tracking_uri, reader, clean_endpoint(endpoint), run_id)
        except Exception as exc:  # the record is committed: say so, not only what failed
            done = f"committed in {record_commit}" if record_commit else "already recorded"
            raise PartlyDoneError(
                f"{deployment['endpoint']} serves {commit}: {done} in {str(repo.path)!r}, but MLflow run {run_id} "
                f"was not tagged: {type(exc).__name__}: {exc}",
                "run the same command again once MLflow answers (the record is not committed twice).") from exc
        result["mlflow_tagged"] = True
    return result


def _committed_deployment(repo: LocalRepo, rel: str) -> dict[str, Any] | None:
    """The deployment record at ``rel`` in the commit a new commit extends (``None`` when it has none).

    Not the working tree's file: a ``record-deploy`` killed between writing it and committing it
    leaves one that no commit holds. Raises when HEAD would make a parentless history.
    """
    heads = oxen_child.branches(repo.path)
    branch = repo.commit_branch(lambda: heads)  # never a parentless history
    if branch is None:
        return None
    target, head = repo.path / rel, heads[branch]
    try:
        entry = next(iter(files_at(repo.path, head, [rel])[rel].files))
    except (PathNotInCommit, StopIteration):
        return None
    with contextlib.suppress(OSError):
        if target.is_file() and entry.held_by(target):
            return read_deployment(target)
    with tempfile.TemporaryDirectory(prefix="oxen-deploy-") as tmp:
        oxen_child.materialize(repo.path, head, [rel], tmp)
        return read_deployment(Path(tmp) / rel)


def _commit_deployment(repo_path: Path, rel: str, deployment: dict[str, Any], previous: dict[str, Any] | None,
                       message: str) -> str:
    """Write and commit the deployment record at ``rel``; on failure the working tree is left as
    committed (``previous``: the committed record)."""
    target = repo_path / rel
    try:
        write_json_atomically(target, deployment, indent=2, make_parents=True)
    except OSError as exc:
        raise ConfigurationError(f"Cannot write the deployment record {str(target)!r}: {exc.strerror or exc}.",
                                 f"make {str(target.parent)!r} a writable folder (is it a file?).") from None
    try:
        return oxen_child.commit_paths(repo_path, [rel], message)
    except BaseException:  # the record is not true yet
        if previous is None:
            target.unlink()
        else:
            write_json_atomically(target, previous, indent=2, make_parents=True)
        raise


def _repo_from_mlflow(reader: Any, model_commit: str) -> str:
    runs = []
    if reader is not None and is_commit_like(model_commit):
        runs = reader.search_runs(tag_filter(TAG_MODEL_COMMIT, model_commit, prefix=len(model_commit) < 31))
    repos = sorted({r["tags"][TAG_MODEL_REPO] for r in runs if r["tags"].get(TAG_MODEL_REPO)})
    if len(repos) != 1:
        raise ConfigurationError(
            f"Cannot tell which model repository holds {model_commit!r} "
            f"({'no MLflow run names it' if not repos else 'several do: ' + ', '.join(repos)}).",
            "pass --model-repo PATH.")
    return repos[0]


def _tag_endpoint(tracking_uri: str, reader: Any, endpoint: str, run_id: str) -> None:
    """Tag ``run_id`` as serving ``endpoint``; untag runs that served it before."""
    from mlflow import MlflowClient

    key = endpoint_tag(endpoint)
    client = MlflowClient(tracking_uri)
    for old in reader.search_runs(tag_filter(key, endpoint)):
        if old["run_id"] != run_id and tag_is(old, key, endpoint):
            client.delete_tag(old["run_id"], key)
    client.set_tag(run_id, key, endpoint)
