"""oxenai calls on a repository, each in a short-lived child process.

oxenai (0.65) keeps a repository's refs and staging databases open, with their
OS locks, for the rest of the process once it has touched them: a training
process that read a dataset's branches would lock the user's own ``oxen``
commands out of that repository until training ends, and two processes could
not share a model repository. Running every call in a child that exits releases
the locks at once (and keeps oxenai's GIL-holding work and panics out of the
training process). A call costs about 0.3 s of process start-up.

Example::

    from oxen_callbacks._oxen import child as oxen_child
    commit = oxen_child.commit_paths("data/reviews", ["train.csv"], "Add March reviews")
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .. import errors
from .._util.processes import (
    OWN_PROCESS_GROUP,
    check_can_start_processes,
    child_environment,
    function_reference,
    python_command,
)
from .._util.progress import child_progress_env
from ..errors import OxenError

_SIGNALS = {int(s) for s in signal.Signals}
_ERROR_TYPES = {"ConfigurationError": errors.ConfigurationError, "RepoBusyError": errors.RepoBusyError,
                "OxenError": OxenError}


#: Wall-clock limit of one materialization of a commit (a copy from Oxen's content store or
#: ``oxen restore``): generous, two hours (~1 TB through ``oxen restore``), so that only a hung
#: child meets it.
MATERIALIZE_TIMEOUT_S = 7200.0


class ChildTimedOut(OxenError):
    """The child gave no answer within its wall-clock limit (it was killed)."""


class ChildCrashed(OxenError):
    """The child was killed by a signal (``signal``: its number), e.g. SIGBUS on a damaged repository."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal = signal_number


def run_in_child(function: Callable[..., Any], *, timeout: float | None = 600.0, show_stderr: bool = False,
                 own_group: bool = False, what: str | None = None, remote_host: str | None = None,
                 any_host_key: bool = True, remote_plain_http: bool = False, **kwargs: Any) -> Any:
    """Call the module-level ``function`` (JSON-able kwargs and result) in a child process.

    ``what`` names the call in errors (default: the function's name); ``show_stderr`` passes the
    child's stderr (progress bars) to ours instead of keeping it; ``own_group`` keeps a Ctrl-C
    meant for the trainer away from it (its own process group); ``remote_host``: the server the
    call talks to, whose token from the environment it gets (:func:`.auth.private_config`; with
    ``any_host_key=False`` only a token for that host, and none over ``remote_plain_http``).
    Arguments travel on the child's stdin, never in its argv.
    """
    from .auth import private_config

    what = what or function.__name__
    request = json.dumps({"function": function_reference(function), "kwargs": kwargs})
    env: dict[str, str] | None = None
    try:
        with private_config(remote_host, any_host_key=any_host_key, plain_http=remote_plain_http) as overrides:
            env = child_environment({**overrides, **child_progress_env(show_stderr)})
            proc = subprocess.run(python_command("oxen-call"), input=request,
                                  stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE,
                                  text=True, timeout=timeout, env=env, **(OWN_PROCESS_GROUP if own_group else {}))
    except subprocess.TimeoutExpired:
        raise ChildTimedOut(f"no answer within {timeout:g}s (oxen {what} stopped)") from None
    except OSError as exc:  # the child never started (its environment, out of memory or processes)
        if exc.errno == errno.E2BIG and env is not None:
            check_can_start_processes(env)  # names the variables at fault
        raise OxenError(f"oxen {what} could not start a helper process: {exc.strerror or exc}") from None
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in _SIGNALS else str(-proc.returncode)
        raise ChildCrashed(f"oxen {what} was killed by {name}", -proc.returncode)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:]) if proc.stderr else "(its messages are above)"
        raise OxenError(f"oxen {what} failed (exit code {proc.returncode}): {tail}")
    reply = json.loads(lines[-1])
    if reply["ok"]:
        return reply["result"]
    kind = _ERROR_TYPES.get(reply["type"], OxenError)
    if kind is errors.ConfigurationError:
        raise kind(reply["message"], reply.get("hint"))
    raise kind(reply["message"])


# The calls below import their oxenai side only when made: the training process never loads it.
def init_repo(path: str | os.PathLike[str]) -> None:
    from .repo import init_at

    run_in_child(init_at, what="init", path=str(path))


def branches(path: str | os.PathLike[str]) -> dict[str, str]:
    from .repo import branches_at

    return run_in_child(branches_at, what="branches", path=str(path))


def changed_paths(path: str | os.PathLike[str], commit: str, paths: list[str]) -> dict[str, list[str]]:
    """Oxen's status of ``paths`` against ``commit`` (HEAD): see :func:`.repo.changed_paths_at`."""
    from .repo import changed_paths_at

    return run_in_child(changed_paths_at, what="changed_paths", path=str(path), commit=commit, paths=paths)


def commit_paths(path: str | os.PathLike[str], paths: list[str], message: str,
                 author: tuple[str, str] | None = None) -> str:
    """``oxen add`` each of ``paths`` then commit; returns the commit id (identity: see :mod:`.identity`)."""
    from .identity import resolve_author
    from .repo import commit_at

    who = resolve_author(author)
    return run_in_child(commit_at, what="commit", path=str(path), paths=paths, message=message,
                        author=None if who.source == "oxen-config" else [who.name, who.email])


def log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Commits reachable from HEAD, newest first: ``{id, message, author, timestamp, parent_ids}``."""
    from .repo import log_at

    return run_in_child(log_at, what="log", path=str(path))


def materialize(path: str | os.PathLike[str], commit: str, paths: list[str], dest: str | os.PathLike[str]) -> None:
    """``oxen restore`` of ``paths`` at ``commit`` into ``dest`` (see :func:`.shadow.restore_into`).

    Raises :class:`ChildTimedOut` after :data:`MATERIALIZE_TIMEOUT_S` (oxenai has no
    timeout of its own: a restore that hangs would hold the pin forever).
    """
    from .shadow import restore_into

    run_in_child(restore_into, what="materialize", timeout=MATERIALIZE_TIMEOUT_S, repo_path=str(path),
                 commit=commit, paths=paths, dest=str(dest))


def save_token(token: str, host: str) -> str:
    """Write ``host``'s token into the user's ``auth_config.toml``, readable by the user alone; its path."""
    from .auth import save_token_at
    from .identity import AUTH_CONFIG

    path = _config_file(AUTH_CONFIG)
    try:
        run_in_child(save_token_at, what="auth", timeout=60, token=token, host=host, path=path)
    finally:
        if os.path.exists(path):
            os.chmod(path, 0o600)
    return path


def save_identity(name: str, email: str) -> str:
    """Write the user's ``user_config.toml`` (the author of their commits); its path."""
    from .identity import USER_CONFIG, save_identity_at

    path = _config_file(USER_CONFIG)
    run_in_child(save_identity_at, what="identity", timeout=60, name=name, email=email, path=path)
    return path


def _config_file(name: str) -> str:
    """``name`` in Oxen's config folder, which is made (readable by the user alone) if missing."""
    from .identity import oxen_config_dir

    folder = oxen_config_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(folder / name)


def add_remote(path: str | os.PathLike[str], name: str, url: str, host: str, timeout: float = 60.0) -> None:
    """``oxen`` remote ``name`` -> ``url`` in the repository at ``path`` (the server is asked first)."""
    from .remote import set_remote_at

    run_in_child(set_remote_at, what="remote add", timeout=timeout, remote_host=host, path=str(path), name=name,
                 url=url)


# -- the child side -------------------------------------------------------------------
def _serve(request: dict[str, Any]) -> Any:
    module, _, name = request["function"].partition(":")
    return getattr(importlib.import_module(module), name)(**request["kwargs"])


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
