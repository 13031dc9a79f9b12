"""Which author name and email the checkpoint commits carry.

Oxen refuses to commit without ``user_config.toml`` in its config folder
(``$OXEN_CONFIG_DIR``, else ``~/.config/oxen``). The author is, in order:

1. the ``author=("Name", "email")`` argument;
2. ``$OXEN_CALLBACKS_AUTHOR_NAME`` / ``$OXEN_CALLBACKS_AUTHOR_EMAIL``;
3. the user's own Oxen config (``oxen-callbacks identity --name ... --email ...``);
4. git's ``user.name`` / ``user.email``;
5. ``<login>`` / ``<login>@<hostname>``, so a fresh machine works.

For 1, 2, 4 and 5 the publisher's worker runs with a private ``OXEN_CONFIG_DIR``
holding that identity (and a link to the ``auth_config.toml`` of the config folder in
use, so its remote tokens still apply). The user's own config is never written.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util.cache import default_cache_dir
from .._util.fs import write_atomically
from ..errors import ConfigurationError
from ..names import ENV_AUTHOR_EMAIL, ENV_AUTHOR_NAME, ENV_OXEN_CONFIG_DIR

#: The files of Oxen's config folder: the commit identity, and the bearer tokens by host.
USER_CONFIG = "user_config.toml"
AUTH_CONFIG = "auth_config.toml"


@dataclass(frozen=True)
class Author:
    name: str
    email: str
    source: str


def oxen_config_dir() -> Path:
    return Path(os.environ.get(ENV_OXEN_CONFIG_DIR) or Path.home() / ".config" / "oxen")


def _git_config(key: str) -> str | None:
    try:
        out = subprocess.run(["git", "config", "--get", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def git_identity() -> tuple[str, str] | None:
    """git's ``user.name`` and ``user.email``, when both are set."""
    name, email = _git_config("user.name"), _git_config("user.email")
    return (name, email) if name and email else None


def current_identity() -> tuple[str, str] | None:
    """The name and email of the user's Oxen config, if it holds both."""
    import tomllib

    try:
        config = tomllib.loads((oxen_config_dir() / USER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    name, email = config.get("name"), config.get("email")
    return (name, email) if isinstance(name, str) and isinstance(email, str) and name and email else None


def check_identity(name: str, email: str) -> tuple[str, str]:
    """``(name, email)`` stripped, or a clear error naming the flag to fix."""
    name, email = name.strip(), email.strip()
    if not name or not name.isprintable():
        raise ConfigurationError(f"--name {name!r} must be a non-empty line of text.", "e.g. --name 'Ada Lovelace'.")
    if "@" not in email or not email.isprintable() or any(c.isspace() for c in email):
        raise ConfigurationError(f"--email {email!r} is not an email address.", "e.g. --email ada@example.com.")
    return name, email


def save_identity_at(name: str, email: str, path: str) -> None:
    """Write ``user_config.toml`` at ``path`` with oxenai (run in a child: it prints to stdout)."""
    import oxen

    oxen.user.config_user(name, email, path)


def resolve_author(explicit: tuple[str, str] | None = None) -> Author:
    if explicit:
        return Author(explicit[0], explicit[1], "argument")
    env_name, env_email = os.environ.get(ENV_AUTHOR_NAME), os.environ.get(ENV_AUTHOR_EMAIL)
    if env_name and env_email:
        return Author(env_name, env_email, "environment")
    if (oxen_config_dir() / USER_CONFIG).is_file():
        return Author("", "", "oxen-config")
    git = git_identity()
    if git:
        return Author(git[0], git[1], "git")
    login = _login()
    return Author(login, f"{login}@{socket.gethostname() or 'localhost'}", "system")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "oxen-callbacks"


def worker_environment(author: Author, state_root: Path) -> dict[str, str]:
    """Environment overrides for a process that commits (and pushes) as ``author`` with the tokens of
    the Oxen config folder in use now; written into each queue's meta, so that whoever finishes the
    queue later (an adopting worker, ``sync``) commits as the same author."""
    config = oxen_config_dir().absolute()
    if author.source == "oxen-config":
        return {ENV_OXEN_CONFIG_DIR: str(config)}
    # (one folder per author and config folder: two config folders may hold different tokens for one host)
    digest = hashlib.sha1(f"{author.name}\0{author.email}\0{config}".encode()).hexdigest()[:12]
    folder = state_root / "oxen-identity" / digest
    folder.mkdir(parents=True, exist_ok=True)
    user_config = folder / USER_CONFIG
    if not user_config.exists():
        write_atomically(user_config, f"name = {_toml_str(author.name)}\nemail = {_toml_str(author.email)}\n")
    link = folder / AUTH_CONFIG  # the config folder's tokens as they are when used (none while it has none)
    if not link.is_symlink():
        try:
            os.symlink(config / AUTH_CONFIG, link)
        except FileExistsError:
            pass  # (made meanwhile by another process: the same link)
    return {ENV_OXEN_CONFIG_DIR: str(folder)}


def recorded_config(env: Any) -> str | None:
    """The Oxen config folder a recorded environment (a queue's ``env``) commits with, if it names one."""
    config = env.get(ENV_OXEN_CONFIG_DIR) if isinstance(env, dict) else None
    return config if isinstance(config, str) and config else None


def holds_identity(config: str | os.PathLike[str]) -> bool:
    """Whether Oxen config folder ``config`` still holds an identity to commit as (not a job's
    scratch folder removed since, or a cleaned cache)."""
    return (Path(config) / USER_CONFIG).is_file()


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def commit_identity(author: tuple[str, str] | None = None, state_root: Path | None = None) -> Iterator[Author]:
    """Within the block, oxenai commits in this process carry the resolved author.

    Example (committing a dataset on a machine with no Oxen identity yet)::

        with commit_identity():
            repo.add("train.csv"); repo.commit("first version")
    """
    resolved = resolve_author(author)
    overrides = worker_environment(resolved, state_root or default_cache_dir())
    saved = os.environ.get(ENV_OXEN_CONFIG_DIR)
    os.environ.update(overrides)
    try:
        yield resolved
    finally:
        if saved is None:
            os.environ.pop(ENV_OXEN_CONFIG_DIR, None)
        else:
            os.environ[ENV_OXEN_CONFIG_DIR] = saved
