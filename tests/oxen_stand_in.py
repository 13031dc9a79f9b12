"""A stand-in for ``oxen-server`` on loopback: the few requests oxenai 0.65.1 makes to read a repository.

``oxen-server`` cannot be installed on these machines (see OXEN-FACTS), so remote
*success* paths are tested against this: an ``http.server`` in a thread answering
what oxenai's ``RemoteRepo`` was seen to ask (logged against a server answering 404,
shapes from ``crates/liboxen/src/api/client`` and ``view/`` in Oxen's sources):

* ``GET  /api/repos/NS/NAME``                     repository (``RemoteRepo(...)``)
* ``GET  /api/repos/NS/NAME/revisions/REV``       what a revision names (``RemoteRepo(...)``)
* ``GET  /api/repos/NS/NAME/branches/NAME``       a branch (``get_branch``)
* ``GET  /api/repos/NS/NAME/commits/ID``          a commit (``_repo.get_commit``)
* ``POST /api/repos/NS/NAME/action/STATE/download`` download start/end pings
* ``GET  /api/repos/NS/NAME/meta/REV/PATH``       a file's metadata (hash: xxh3-128, size)
* ``GET  /api/repos/NS/NAME/file/REV/PATH``       a file's bytes

Unknown repositories, revisions and paths answer 404, as the server does. Every
request is recorded with its headers (``authorizations``: the ``Authorization`` each
carried, to check which token a client sent). ``altered`` serves other bytes than a
file's for its next requests (a damaged copy on the server, a proxy rewriting a download). The
server runs in a thread of the test process: fine because the library makes every
oxenai call in a child process (oxenai holds the GIL for a whole call).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import xxhash

_ROUTE = re.compile(r"^/api/repos/(?P<ns>[^/]+)/(?P<name>[^/]+)(?:/(?P<kind>[a-z]+)(?:/(?P<rest>.*))?)?$")
_TIMESTAMP = "2026-01-01T00:00:00Z"


@dataclass
class StandInRepo:
    """One remote repository: branches, and each commit's files (path -> bytes)."""

    branches: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def commit(self, commit_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        self.files[commit_id] = dict(files)
        self.branches[branch] = commit_id
        return commit_id

    def commit_of(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.files else None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


class StandInOxen:
    """The server: ``repos`` by ``namespace/name``; ``requests`` as received; ``mute`` kinds never answered."""

    def __init__(self) -> None:
        self.repos: dict[str, StandInRepo] = {}
        self.requests: list[Request] = []
        self.mute: set[str] = set()  # route kinds ("branches", "file"...) to hold without an answer
        self.altered: dict[str, list[bytes]] = {}  # file path -> bodies served instead of its bytes, one per request
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="oxen-stand-in", daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def url(self, repo_id: str) -> str:
        return f"http://{self.host}/{repo_id}"

    @property
    def authorizations(self) -> list[str | None]:
        """The ``Authorization`` header of each request so far (``None``: it carried none), in order."""
        return [r.headers.get("authorization") for r in list(self.requests)]

    def start(self) -> StandInOxen:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    # -- answers ----------------------------------------------------------------------
    def answer(self, method: str, path: str) -> tuple[int, Any]:
        """(status, JSON-able body or bytes) for one request."""
        route = _ROUTE.match(unquote(path.split("?")[0]))
        repo = self.repos.get(f"{route['ns']}/{route['name']}") if route else None
        if route is None or repo is None:
            return 404, _status("error", "resource_not_found")
        kind, rest = route["kind"], route["rest"] or ""
        if kind is None:
            return 200, {**_status("success", "resource_found"), "repository": {
                "namespace": route["ns"], "name": route["name"], "min_version": None,
                "is_empty": not repo.files, "storage_kind": "local"}}
        if kind == "action" and method == "POST":
            return 200, _status("success", "resource_found")
        if kind == "branches" and rest in repo.branches:
            return 200, {**_status("success", "resource_found"),
                         "branch": {"name": rest, "commit_id": repo.branches[rest]}}
        if kind == "commits" and rest in repo.files:
            return 200, {**_status("success", "resource_found"), "commit": _commit(rest)}
        if kind == "revisions" and (commit := repo.commit_of(rest)):
            branch = {"name": rest, "commit_id": commit} if rest in repo.branches else None
            return 200, {**_status("success", "resource_found"), "resource": {
                "workspace": None, "commit": _commit(commit), "branch": branch,
                "path": "", "version": rest, "resource": rest}}
        if kind in ("meta", "file"):
            return self._file_answer(repo, kind, rest)
        return 404, _status("error", "resource_not_found")

    def _file_answer(self, repo: StandInRepo, kind: str, rest: str) -> tuple[int, Any]:
        for revision, files in ((r, repo.files.get(repo.commit_of(r) or "")) for r in _prefixes(rest)):
            path = rest[len(revision) + 1:]
            if files is None or path not in files:
                continue
            data = files[path]
            if kind == "file":
                return 200, self.altered[path].pop(0) if self.altered.get(path) else data
            return 200, {**_status("success", "resource_found"), "entry": {
                "filename": path.rsplit("/", 1)[-1], "hash": f"{xxhash.xxh3_128_intdigest(data):x}",
                "is_dir": False, "latest_commit": _commit(repo.commit_of(revision) or ""), "resource": None,
                "size": len(data), "data_type": "tabular", "mime_type": "text/csv",
                "extension": path.rsplit(".", 1)[-1], "metadata": None, "is_queryable": None}}
        return 404, _status("error", "resource_not_found")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                stand_in.requests.append(Request(self.command, self.path, headers))
                route = _ROUTE.match(self.path.split("?")[0])
                if route and (route["kind"] or "repository") in stand_in.mute:
                    stand_in._release.wait()  # a server that accepted and never answers
                    return
                status, body = stand_in.answer(self.command, self.path)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _status(status: str, message: str) -> dict[str, Any]:
    return {"status": status, "status_message": message, "oxen_version": "0.65.1"}


def _commit(commit_id: str) -> dict[str, Any]:
    return {"id": commit_id, "parent_ids": [], "message": f"commit {commit_id[:8]}", "author": "Stand In",
            "email": "stand-in@example.com", "timestamp": _TIMESTAMP}


def _prefixes(rest: str) -> list[str]:
    """Candidate revisions at the start of ``REV/PATH`` (a branch name may hold '/'), longest first."""
    parts = rest.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
