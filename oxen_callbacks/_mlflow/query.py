"""Read-only MLflow queries for lineage lookups, fast enough for a command line.

Importing ``mlflow`` takes about 1.5 s, longer than the whole lookup should. For
an ``http(s)`` tracking server the queries therefore go straight to MLflow's REST
API (token or basic auth from ``MLFLOW_TRACKING_TOKEN`` /
``MLFLOW_TRACKING_USERNAME`` + ``MLFLOW_TRACKING_PASSWORD`` or the URI, TLS
settings from ``MLFLOW_TRACKING_INSECURE_TLS`` / ``MLFLOW_TRACKING_SERVER_CERT_PATH``);
any other store (SQLite, Databricks, a client-certificate or plugin auth setup)
goes through ``MlflowClient``. Both answer with plain dicts::

    reader = open_reader("http://127.0.0.1:5000")
    reader.search_runs("tags.`oxen.dataset.commit` = 'ab12...'")
    # [{"run_id": ..., "run_name": ..., "experiment_id": ..., "status": ..., "tags": {...}}]
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._util.fs import parse_json
from .._util.redact import redact_url
from ..errors import ConfigurationError, OxenCallbacksError
from ..names import (
    ENV_MLFLOW_CLIENT_ONLY,
    ENV_MLFLOW_TRACKING_INSECURE_TLS,
    ENV_MLFLOW_TRACKING_PASSWORD,
    ENV_MLFLOW_TRACKING_SERVER_CERT_PATH,
    ENV_MLFLOW_TRACKING_TOKEN,
    ENV_MLFLOW_TRACKING_URI,
    ENV_MLFLOW_TRACKING_USERNAME,
)

if TYPE_CHECKING:
    import ssl

PAGE = 1000


class TrackingError(OxenCallbacksError):
    """The tracking server refused or failed a query."""


def quote(value: str) -> str:
    """``value`` as a string literal of MLflow's search syntax.

    MLflow strips the quotes around a value and undoes no escape (a backslash is itself), so a
    value holding ``'`` is written between double quotes. One holding both kinds cannot be
    written exactly: see :func:`tag_filter`.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quotes: MLflow's search syntax cannot spell it")


def tag_filter(key: str, value: str, *, prefix: bool = False) -> str:
    """``tags.`key` = 'value'`` (``LIKE 'value%'`` with ``prefix``).

    A value holding both ``'`` and ``"`` is searched with ``LIKE``, each ``"`` matching any one
    character: callers comparing a value someone else wrote check the tags of what it finds
    (:func:`tag_is`).
    """
    if prefix or ("'" in value and '"' in value):
        pattern = value.replace('"', "_") + ("%" if prefix else "")
        return f"tags.`{key}` LIKE {quote(pattern)}"
    return f"tags.`{key}` = {quote(value)}"


def tag_is(run: dict[str, Any], key: str, value: str) -> bool:
    """Whether a run found by :func:`tag_filter` has the tag ``key`` exactly ``value``."""
    return run["tags"].get(key) == value


class TrackingReader:
    """The queries lineage lookups need; see the module docstring.

    Runs are searched in every active experiment, listed once per reader.
    """

    uri: str  # without credentials

    def search_runs(self, filter_string: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def search_versions(self, filter_string: str) -> list[dict[str, Any]]:
        """Registered model versions: ``{name, version, source, run_id, tags}``."""
        raise NotImplementedError

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version of registered model ``name``."""
        raise NotImplementedError

    def artifact_json(self, run_id: str, path: str) -> Any | None:
        """A run's JSON artifact, or ``None`` when it does not exist."""
        raise NotImplementedError


class RestReader(TrackingReader):
    """MLflow's REST API over ``urllib`` (no ``mlflow`` import; ``ssl`` and ``urllib.request``,
    ~20 ms, only when a server is asked)."""

    def __init__(self, uri: str, timeout: float = 30.0) -> None:
        import ssl

        parsed = urllib.parse.urlsplit(uri)
        self.uri = redact_url(uri) or uri
        self.base = self.uri.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        user = os.environ.get(ENV_MLFLOW_TRACKING_USERNAME) or urllib.parse.unquote(parsed.username or "")
        password = os.environ.get(ENV_MLFLOW_TRACKING_PASSWORD) or urllib.parse.unquote(parsed.password or "")
        if os.environ.get(ENV_MLFLOW_TRACKING_TOKEN):
            self.headers["Authorization"] = f"Bearer {os.environ[ENV_MLFLOW_TRACKING_TOKEN]}"
        elif user:
            self.headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.context: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self.context = ssl.create_default_context(cafile=os.environ.get(ENV_MLFLOW_TRACKING_SERVER_CERT_PATH))
            if os.environ.get(ENV_MLFLOW_TRACKING_INSECURE_TLS, "").lower() == "true":
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE

    def _call(self, path: str, *, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None,
              raw: bool = False) -> Any:
        import urllib.error
        import urllib.request

        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self.headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            if exc.code == 404:
                return None
            raise TrackingError(f"MLflow at {self.uri} answered {exc.code} to {path}: {detail}") from None
        except OSError as exc:
            raise TrackingError(f"MLflow at {self.uri} is unreachable ({exc}).") from None
        return payload if raw else parse_json(payload or b"{}")

    def _pages(self, path: str, key: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        token = None
        while True:
            reply = self._call(path, body={**body, **({"page_token": token} if token else {})}) or {}
            found.extend(reply.get(key, []))
            token = reply.get("next_page_token")
            if not token:
                return found

    @cached_property
    def experiment_ids(self) -> list[str]:
        experiments = self._pages("/api/2.0/mlflow/experiments/search", "experiments",
                                  {"max_results": PAGE, "view_type": "ACTIVE_ONLY"})
        return [e["experiment_id"] for e in experiments]

    def search_runs(self, filter_string: str) -> list[dict[str, Any]]:
        if not self.experiment_ids:
            return []
        runs = self._pages("/api/2.0/mlflow/runs/search", "runs", {
            "experiment_ids": self.experiment_ids, "filter": filter_string, "max_results": PAGE,
            "run_view_type": "ACTIVE_ONLY"})
        return [_rest_run(r) for r in runs]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        reply = self._call("/api/2.0/mlflow/runs/get", query={"run_id": run_id})
        return _rest_run(reply["run"]) if reply else None

    def search_versions(self, filter_string: str) -> list[dict[str, Any]]:
        reply = self._call("/api/2.0/mlflow/model-versions/search",
                           query={"filter": filter_string, "max_results": PAGE}) or {}
        return [{"name": v["name"], "version": str(v["version"]), "source": v.get("source"), "run_id": v.get("run_id"),
                 "tags": {t["key"]: t["value"] for t in v.get("tags", [])}} for v in reply.get("model_versions", [])]

    def aliases(self, name: str) -> dict[str, str]:
        reply = self._call("/api/2.0/mlflow/registered-models/get", query={"name": name}) or {}
        return {a["alias"]: str(a["version"]) for a in reply.get("registered_model", {}).get("aliases", [])}

    def artifact_json(self, run_id: str, path: str) -> Any | None:
        payload = self._call("/get-artifact", query={"path": path, "run_uuid": run_id}, raw=True)
        return parse_json(payload) if payload else None


def _rest_run(run: dict[str, Any]) -> dict[str, Any]:
    info = run["info"]
    return {"run_id": info["run_id"], "run_name": info.get("run_name"), "experiment_id": info["experiment_id"],
            "status": info.get("status"), "tags": {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}}


class ClientReader(TrackingReader):
    """Any store ``MlflowClient`` supports (SQLite, Databricks, plugins)."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = redact_url(uri) or uri
        self.client = MlflowClient(uri)

    @cached_property
    def experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in _all_pages(self.client.search_experiments)]

    def search_runs(self, filter_string: str) -> list[dict[str, Any]]:
        if not self.experiment_ids:
            return []
        return [_client_run(r) for r in _all_pages(self.client.search_runs, self.experiment_ids, filter_string)]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        from mlflow.exceptions import MlflowException

        try:
            return _client_run(self.client.get_run(run_id))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def search_versions(self, filter_string: str) -> list[dict[str, Any]]:
        return [{"name": v.name, "version": str(v.version), "source": v.source, "run_id": v.run_id, "tags": dict(v.tags)}
                for v in self.client.search_model_versions(filter_string, max_results=PAGE)]

    def aliases(self, name: str) -> dict[str, str]:
        return {alias: str(version) for alias, version in self.client.get_registered_model(name).aliases.items()}

    def artifact_json(self, run_id: str, path: str) -> Any | None:
        import tempfile

        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError):
                return None
            with open(local) as f:
                return parse_json(f.read())


def _all_pages(search: Any, *args: Any) -> list[Any]:
    found: list[Any] = []
    token = None
    while True:
        page = search(*args, max_results=PAGE, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _client_run(run: Any) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "status": run.info.status, "tags": dict(run.data.tags)}


def tracking_uri(explicit: str | None = None) -> str | None:
    """The tracking URI to query: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else none."""
    return explicit or os.environ.get(ENV_MLFLOW_TRACKING_URI) or None


#: Schemes MLflow 3 opens a tracking store for without a plugin (``+driver`` suffixes allowed);
#: ``arn`` is SageMaker's, which MLflow resolves itself.
_STORE_SCHEMES = frozenset({"http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql", "arn"})
_FILE_STORE_SWITCH = "MLFLOW_ALLOW_FILE_STORE"


def check_tracking_uri(uri: str, *, given_as: str) -> None:
    """Raise :class:`ConfigurationError` when MLflow 3 has no store for ``uri`` (``given_as`` names
    where it came from). The scheme is read as MLflow reads it (one letter: a Windows path); no
    ``mlflow`` import: plugins are read from their entry points (group ``mlflow.tracking_store``)."""
    try:
        scheme = urllib.parse.urlparse(uri).scheme.lower()
        scheme = uri if uri in ("databricks", "databricks-uc") else "" if len(scheme) <= 1 else scheme.split("+", 1)[0]
        if scheme in ("http", "https"):
            urllib.parse.urlsplit(uri).port  # noqa: B018 (a bad port fails here)
    except ValueError as exc:  # ``http://[::1``
        raise _unusable(uri, given_as, f"it is not a valid URI ({exc})") from None
    if scheme in _STORE_SCHEMES:
        return
    if scheme in ("", "file"):
        if os.environ.get(_FILE_STORE_SWITCH, "").lower() in ("1", "true"):
            return
        raise _unusable(uri, given_as, "MLflow 3 opens a file store (a folder path or file:) only with "
                                       f"{_FILE_STORE_SWITCH}=true")
    if scheme in ("databricks-uc", "uc"):
        raise _unusable(uri, given_as, "MLflow refuses Unity Catalog as a tracking store (it is a registry)")
    from importlib.metadata import entry_points

    if scheme not in {e.name for e in entry_points(group="mlflow.tracking_store")}:
        raise _unusable(uri, given_as, f"MLflow has no tracking store for the scheme {scheme!r}")


def _unusable(uri: str, given_as: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"{given_as}={redact_url(uri) or uri!r} cannot be used: {why}.",
                              "use e.g. 'sqlite:///path/mlflow.db' or 'http://127.0.0.1:5000'.")


def missing_store(uri: str) -> str | None:
    """The database file of a SQLite tracking URI when it does not exist (MLflow would create it:
    ~1 MB and seconds, for a query); ``None`` for any other URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.split("+", 1)[0] != "sqlite":
        return None
    path = rest.removeprefix("/").split("?", 1)[0]  # sqlite:///rel, sqlite:////abs
    if path in ("", ":memory:"):
        return ":memory:"  # a new, empty store every time: nothing to find there
    return None if Path(path).exists() else str(Path(path).resolve())


def open_reader(uri: str) -> TrackingReader:
    """A reader for ``uri``: REST for ``http(s)`` servers, ``MlflowClient`` otherwise."""
    if uri.split("://", 1)[0] in ("http", "https") and not any(os.environ.get(v) for v in ENV_MLFLOW_CLIENT_ONLY):
        return RestReader(uri)
    return ClientReader(uri)
