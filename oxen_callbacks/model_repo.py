"""The model repository's layout: where a run's checkpoints, lineage and bookkeeping live.

Committed (paths inside the repository, POSIX, relative)::

    runs/<run>/lineage.json                   the run's lineage record (oxen_callbacks.lineage)
    runs/<run>/checkpoints/<name>             a checkpoint of the run's first checkpoint folder
    runs/<run>/checkpoints/<folder>-<h>/<n>   one of any other folder (see _publish.publisher)
                                              (names Oxen reads as a glob pattern: see _oxen.layout.literal_name)
    deployments/<endpoint-slug>.json          which commit serves an endpoint (see _mlflow.registry)

Not committed, in this library's state folder of the repository (see ``_oxen.layout.state_dir``)::

    runs/<run>.claim                          held by the live fit of ``<run>`` (see _publish.claim)
    fits/<fitter>                             the run of a callback object's latest fit

Example::

    Path(repo) / lineage_path("nightly")      # .../runs/nightly/lineage.json
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from ._oxen import layout as oxen_layout
from ._util.fs import parse_json
from ._util.redact import redact_url
from .names import TAG_ENDPOINT_PREFIX

log = logging.getLogger(__name__)

RUNS_DIR = "runs"  # every run's folder is in here
LINEAGE_FILE = "lineage.json"  # the lineage record's name in a run folder
CHECKPOINTS_DIR = "checkpoints"  # the checkpoints' folder in a run folder
DEPLOY_DIR = "deployments"  # deployment records, one JSON file per endpoint
DEPLOY_SCHEMA = "oxen-callbacks/deployment/v1"  # the schema of one deployment record
RUN_CLAIM_SUFFIX = ".claim"  # a run's claim file in claims_dir(): <run>.claim
FITS_DIR = "fits"  # in the state folder: the run of each callback object's latest fit


def run_folder(run: str) -> str:
    """``runs/<run>``: the folder of run ``run``."""
    return f"{RUNS_DIR}/{run}"


def lineage_path(run: str) -> str:
    """``runs/<run>/lineage.json``: the lineage record of run ``run``."""
    return f"{run_folder(run)}/{LINEAGE_FILE}"


def checkpoints_folder(run: str) -> str:
    """``runs/<run>/checkpoints``: where run ``run``'s checkpoints are committed."""
    return f"{run_folder(run)}/{CHECKPOINTS_DIR}"


def deployment_path(slug: str) -> str:
    """``deployments/<slug>.json``: the deployment record of the endpoint named ``slug``."""
    return f"{DEPLOY_DIR}/{slug}.json"


def runs_dir(model_repo: str | os.PathLike[str]) -> Path:
    """The folder holding every run folder of ``model_repo``'s working tree."""
    return Path(model_repo) / RUNS_DIR


def lineage_files(model_repo: str | os.PathLike[str]) -> list[Path]:
    """Every run's lineage record file in ``model_repo``'s working tree, sorted by path."""
    return sorted(runs_dir(model_repo).glob(f"*/{LINEAGE_FILE}"))


def is_run_name(name: str) -> bool:
    """Whether ``name`` can only name a folder directly in ``runs/`` (no ``..``, no ``/``)."""
    return bool(name) and name not in (".", "..") and Path(name).name == name


def run_of_path(rel: str | os.PathLike[str]) -> str | None:
    """The run whose folder holds ``rel`` (a path inside the repository, ``runs/<run>/<more>``), else ``None``."""
    parts = Path(rel).parts
    return parts[1] if len(parts) >= 3 and parts[0] == RUNS_DIR else None


def run_of_checkpoint(rel: str) -> str | None:
    """The run ``rel`` (a POSIX path inside the repository) is a checkpoint of: ``runs/<run>/checkpoints/...``."""
    parts = rel.split("/", 3)
    if len(parts) == 4 and parts[0] == RUNS_DIR and parts[1] and parts[2] == CHECKPOINTS_DIR and parts[3]:
        return parts[1]
    return None


def claims_dir(model_repo: str | os.PathLike[str]) -> Path:
    """Where the claims of live runs are held (not committed)."""
    return oxen_layout.state_dir(model_repo) / RUNS_DIR


def claim_path(model_repo: str | os.PathLike[str], run: str) -> Path:
    """The claim file of run ``run``."""
    return claims_dir(model_repo) / f"{run}{RUN_CLAIM_SUFFIX}"


def fit_record_path(model_repo: str | os.PathLike[str], fitter: str) -> Path:
    """Where the run of callback object ``fitter``'s latest fit is noted (not committed)."""
    return oxen_layout.state_dir(model_repo) / FITS_DIR / fitter


# -- deployments: which model commit serves an endpoint -----------------------------------
def endpoint_slug(endpoint: str) -> str:
    """A file- and tag-safe name for ``endpoint``, readable and unique.

    >>> endpoint_slug("https://api.example.com/v1/reviews")
    'api-example-com-v1-reviews-5d3aa1af'
    """
    clean = clean_endpoint(endpoint)
    text = re.sub(r"^[a-z][a-z0-9+.-]*://", "", clean.lower())
    readable = re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:60].strip("-") or "endpoint"
    return f"{readable}-{hashlib.sha1(clean.encode()).hexdigest()[:8]}"


def clean_endpoint(endpoint: str) -> str:
    """``endpoint`` as recorded: trimmed, without credentials (user info, secret query or fragment
    parameters), also when it is written without a scheme (``user:pw@host/v1?api_key=...``)."""
    return redact_url(endpoint.strip(), schemeless=True) or ""


def endpoint_tag(endpoint: str) -> str:
    return TAG_ENDPOINT_PREFIX + endpoint_slug(endpoint)


def read_deployments(model_repo: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The deployment records of a model repository (its working tree holds the current ones);
    unreadable or malformed ones are skipped with a warning."""
    folder = Path(model_repo) / DEPLOY_DIR
    found = (read_deployment(path) for path in sorted(folder.glob("*.json")) if folder.is_dir())
    return [record for record in found if record is not None]


def read_deployment(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """One deployment record, or ``None`` (with a warning) when it is missing, unreadable or not of
    :data:`DEPLOY_SCHEMA`'s shape: anyone who can write the repository can write one."""
    try:
        data = parse_json(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Skipping unreadable deployment record %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("schema") != DEPLOY_SCHEMA:
        return None
    model, run = data.get("model"), data.get("run")
    fields_ok = (isinstance(data.get("endpoint"), str) and isinstance(data.get("slug"), str)
                 and isinstance(model, dict) and all(isinstance(model.get(k), (str, type(None))) for k in ("commit", "path"))
                 and isinstance(run, dict) and isinstance(run.get("name"), (str, type(None))))
    if not fields_ok:
        log.warning("Skipping malformed deployment record %s (not the shape %s writes)", path, DEPLOY_SCHEMA)
        return None
    return data
