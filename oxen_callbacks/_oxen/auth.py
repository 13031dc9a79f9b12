"""Bearer tokens for Oxen servers: the user's ``auth_config.toml``, or the environment.

oxenai reads tokens only from ``auth_config.toml`` in its config folder
(``$OXEN_CONFIG_DIR``, else ``~/.config/oxen``) and has no variable for one. Clusters and CI
hold tokens in the environment instead: ``OXEN_API_KEY_<HOST>`` for one host (the host
upper-cased, each character other than a letter or digit as ``_``: ``OXEN_API_KEY_HUB_OXEN_AI``,
``OXEN_API_KEY_127_0_0_1_3000``), else ``OXEN_API_KEY`` for every host. A child process that
talks to a remote then runs with a private config folder (:func:`private_config`): mode 0700
in the temporary folder, holding that token for the remote's host and a copy of the user's
identity, removed when the child is done. The token is never written into the user's home
and never passed in argv.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigurationError
from ..names import ENV_OXEN_API_KEY, ENV_OXEN_API_KEY_HOST_PREFIX, ENV_OXEN_CONFIG_DIR
from .identity import AUTH_CONFIG, USER_CONFIG, oxen_config_dir

log = logging.getLogger(__name__)


def host_variable(host: str) -> str:
    """The environment variable holding ``host``'s own token.

    >>> host_variable("127.0.0.1:3000")
    'OXEN_API_KEY_127_0_0_1_3000'
    """
    return ENV_OXEN_API_KEY_HOST_PREFIX + re.sub(r"[^A-Z0-9]", "_", host.upper())


def token_from_environment(host: str, *, any_host_key: bool = True) -> str | None:
    """``host``'s token from ``OXEN_API_KEY_<HOST>``, else ``OXEN_API_KEY``; ``None`` without one.

    ``any_host_key=False``: not ``OXEN_API_KEY``, for a server a record named (anyone who can write a
    lineage record or an MLflow run can name one: the key for every host would go to theirs); nor
    ``OXEN_API_KEY_<HOST>`` when other host names share that variable (``hub-oxen.ai`` would get
    ``hub.oxen.ai``'s token): such a server's token comes from ``auth_config.toml``, which names hosts exactly."""
    variable = host_variable(host)
    token = (os.environ.get(variable) or "").strip()
    if token and (any_host_key or _UNSHARED_VARIABLE.fullmatch(host)):
        return token
    withheld = variable if token else ENV_OXEN_API_KEY
    token = token or (os.environ.get(ENV_OXEN_API_KEY) or "").strip()
    if token and not any_host_key:
        if host not in _withheld:
            _withheld.add(host)
            fix = (f"set {variable} (or run `oxen-callbacks auth --host {host}`)" if withheld == ENV_OXEN_API_KEY
                   else f"run `oxen-callbacks auth --host {host}`: {variable} is also the variable of other host names")
            log.warning("Not sending %s to %s: a record named that server, not you. If it is yours, %s.",
                        withheld, host, fix)
        return None
    return token or None


_withheld: set[str] = set()  # hosts told about once
_withheld_http: set[str] = set()  # record-named http hosts told about once
# a host whose OXEN_API_KEY_<HOST> no other host name shares: letters, digits and dots, then a port
# (a host name ending in a dot and digits, the other spelling of a port, has no top-level domain)
_UNSHARED_VARIABLE = re.compile(r"[A-Za-z0-9.]+(:[0-9]+)?")


def _loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]``, ``[v6]:port``) is this machine: plain http to it stays here."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> str:
    """The token stripped, or a clear error (never showing it)."""
    token = token.strip()
    if not token:
        raise ConfigurationError("No token was given.", "paste it at the prompt, or pipe it in: "
                                 "`printenv OXEN_API_KEY | oxen-callbacks auth`.")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigurationError("The token holds spaces or control characters (more than one line pasted?).",
                                 "give the token alone, on one line.")
    return token


@contextmanager
def private_config(host: str | None, *, any_host_key: bool = True, plain_http: bool = False) -> Iterator[dict[str, str]]:
    """Environment overrides for a child that talks to ``host``: a private config folder when the
    environment holds a token for it (removed on leaving the block), else none (the user's own
    config applies). ``any_host_key``: see :func:`token_from_environment`. ``plain_http`` with
    ``any_host_key=False``: a record named ``http://host``, which is not this machine: a folder
    holding no token at all (a record could name your server over http for a token in clear text)."""
    tokenless = bool(host) and plain_http and not any_host_key and not _loopback(host or "")
    token = token_from_environment(host, any_host_key=any_host_key) if host and not tokenless else None
    if tokenless and host not in _withheld_http:
        _withheld_http.add(host or "")
        log.warning("Not sending a token to %s: a record named it over plain http, which would show the token "
                    "to the network. Use its https address.", host)
    if token is None and not tokenless:
        yield {}
        return
    _remove_stale_private_configs()
    try:
        folder = _write_private_config(host, token)
    except OSError as exc:
        raise _unwritable(host, exc) from None
    try:
        yield {ENV_OXEN_CONFIG_DIR: str(folder)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_private_config(host: str, token: str | None) -> Path:
    """A new folder (mode 0700) holding ``host``'s token (``None``: no token at all) and the user's
    identity; nothing is left behind when writing it fails."""
    identity = _user_identity()  # (before anything is written: its own error, not the temporary folder's)
    folder = Path(tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-{_scope()}-"))
    try:
        if token is not None:
            auth = os.open(folder / AUTH_CONFIG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(auth, "w") as out:  # JSON string escapes are TOML's
                out.write(f"[[host_configs]]\nhost = {json.dumps(host)}\nauth_token = {json.dumps(token)}\n")
        if identity is not None:
            (folder / USER_CONFIG).write_bytes(identity)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _user_identity() -> bytes | None:
    """The user's ``user_config.toml`` (name and email for commits), if there is one."""
    user = oxen_config_dir() / USER_CONFIG
    try:
        return user.read_bytes() if user.is_file() else None
    except OSError as exc:
        raise ConfigurationError(f"Could not read your Oxen identity {str(user)!r} ({exc.strerror or type(exc).__name__}).",
                                 f"make it readable by this user (chmod u+r {user}), or set {ENV_OXEN_CONFIG_DIR} "
                                 "to a folder with a readable user_config.toml.") from None


def _unwritable(host: str, exc: OSError) -> ConfigurationError:
    """The temporary folder cannot take the private config (full, read-only, missing): say so,
    not "could not start a process" (never the token)."""
    return ConfigurationError(
        f"Could not write the private Oxen config for {host} under {tempfile.gettempdir()!r} "
        f"({exc.strerror or type(exc).__name__}).",
        "free space there, or point TMPDIR at a writable folder.")


_PRIVATE_PREFIX = "oxen-callbacks-auth-"


def _scope() -> str:
    """This machine and PID namespace, in a private folder's name: a process id means something
    only there (containers sharing ``/tmp``, nodes sharing a TMPDIR on NFS)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:12]


def _remove_stale_private_configs() -> None:
    """Private config folders (with a token) of processes killed before removing theirs (SIGKILL):
    those of this machine and PID namespace only, where ``kill(pid, 0)`` can tell."""
    scope = _scope()
    for folder in Path(tempfile.gettempdir()).glob(f"{_PRIVATE_PREFIX}*-{scope}-*"):
        pid = folder.name[len(_PRIVATE_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)  # its process lives: still in use
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def configured_hosts(path: Path) -> list[str]:
    """The hosts ``auth_config.toml`` at ``path`` holds a token for (never the tokens)."""
    import tomllib

    try:
        config = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    entries = config.get("host_configs")
    return sorted({e["host"] for e in entries if isinstance(e, dict) and isinstance(e.get("host"), str)}
                  if isinstance(entries, list) else set())


def save_token_at(token: str, host: str, path: str) -> None:
    """oxenai writes ``host``'s token into ``auth_config.toml`` at ``path`` (run in a child: it prints).

    oxenai's Python ``oxen.auth.config_auth`` would also, for the hub, fetch the account's name
    and overwrite the user's commit identity over the network; its binding writes the token only.
    """
    from oxen.auth import auth as oxen_auth_binding

    oxen_auth_binding.config_auth(host, token, path)
