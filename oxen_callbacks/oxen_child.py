"""oxenai calls on a repository, each in a short-lived child process.

oxenai (0.65) keeps a repository's refs and staging databases open, with their
OS locks, for the rest of the process once it has touched them: a training
process that read a dataset's branches would lock the user's own ``oxen``
commands out of that repository until training ends, and two processes could
not share a model repository. Running every call in a child that exits releases
the locks at once (and keeps oxenai's GIL-holding work and panics out of the
training process). A call costs about 0.3 s of process start-up.

Example::

    from oxen_callbacks import oxen_child
    commit = oxen_child.commit_paths("data/reviews", ["train.csv"], "Add March reviews")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import errors
from .errors import OxenError

_ERROR_TYPES = {"ConfigurationError": errors.ConfigurationError, "RepoBusyError": errors.RepoBusyError,
                "OxenError": OxenError}


def _call(op: str, timeout: float | None = 600.0, **args: Any) -> Any:
    request = json.dumps({"op": op, "args": args})
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src_root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "oxen_callbacks.oxen_child"], input=request,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise OxenError(f"no answer within {timeout:.0f}s (oxen {op} stopped)") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise OxenError(f"oxen {op} failed (exit code {proc.returncode}): {tail}")
    reply = json.loads(lines[-1])
    if reply["ok"]:
        return reply["result"]
    kind = _ERROR_TYPES.get(reply["type"], OxenError)
    if kind is errors.ConfigurationError:
        raise kind(reply["message"], reply.get("hint"))
    raise kind(reply["message"])


def run_in_child(function: str, *, timeout: float | None = 600.0, **kwargs: Any) -> Any:
    """Call ``function`` (``"package.module:name"``, JSON-able kwargs and result) in a child process."""
    return _call("call", timeout=timeout, function=function, kwargs=kwargs)


def init_repo(path: str | os.PathLike[str]) -> None:
    _call("init", path=str(path))


def branches(path: str | os.PathLike[str]) -> dict[str, str]:
    return _call("branches", path=str(path))


def changed_paths(path: str | os.PathLike[str], paths: list[str]) -> list[str]:
    return _call("changed_paths", path=str(path), paths=paths)


def commit_paths(path: str | os.PathLike[str], paths: list[str], message: str,
                 author: tuple[str, str] | None = None) -> str:
    """``oxen add`` each of ``paths`` then commit; returns the commit id (identity: see :mod:`.identity`)."""
    from .identity import resolve_author

    who = resolve_author(author)
    return _call("commit", path=str(path), paths=paths, message=message,
                 author=None if who.source == "oxen-config" else [who.name, who.email])


def log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Commits reachable from HEAD, newest first: ``{id, message, author, timestamp, parent_ids}``."""
    return _call("log", path=str(path))


def materialize(path: str | os.PathLike[str], commit: str, paths: list[str], dest: str | os.PathLike[str]) -> None:
    _call("materialize", timeout=None, path=str(path), commit=commit, paths=paths, dest=str(dest))


# -- the child side -------------------------------------------------------------------
def _serve(request: dict[str, Any]) -> Any:
    from .oxen_repo import LocalRepo

    op, args = request["op"], request["args"]
    if op == "call":
        import importlib

        module, _, name = args["function"].partition(":")
        return getattr(importlib.import_module(module), name)(**args["kwargs"])
    if op == "init":
        LocalRepo.init(args["path"])
        return None
    if op == "commit":
        from .identity import commit_identity

        repo = LocalRepo(args["path"])
        author = tuple(args["author"]) if args["author"] else None
        with commit_identity(author) if author else nullcontext():
            for rel in args["paths"]:
                repo.add(rel)
            return repo.commit(args["message"])
    repo = LocalRepo(args["path"])
    if op == "branches":
        return repo.branches()
    if op == "changed_paths":
        return repo.changed_paths(args["paths"])
    if op == "log":
        return repo.log()
    if op == "materialize":
        from .source_local import restore_into

        restore_into(repo, args["commit"], args["paths"], Path(args["dest"]))
        return None
    raise ValueError(f"unknown op {op!r}")


def main() -> int:
    reply_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # oxenai prints progress to stdout: keep it off the reply channel
    request = json.loads(sys.stdin.read())
    try:
        reply = {"ok": True, "result": _serve(request)}
    except errors.ConfigurationError as exc:
        reply = {"ok": False, "type": "ConfigurationError", "message": str(exc).split("\nHINT: ")[0],
                 "hint": exc.hint}
    except errors.OxenCallbacksError as exc:
        reply = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    except Exception as exc:
        reply = {"ok": False, "type": "OxenError", "message": f"{type(exc).__name__}: {exc}"}
    reply_stream.write(json.dumps(reply) + "\n")
    reply_stream.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
