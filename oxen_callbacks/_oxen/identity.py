"""Which author name and email the checkpoint commits carry.

Oxen refuses to commit without ``user_config.toml`` in its config folder
(``$OXEN_CONFIG_DIR``, else ``~/.config/oxen``). The author is, in order:

1. the ``author=("Name", "email")`` argument;
2. ``$OXEN_CALLBACKS_AUTHOR_NAME`` / ``$OXEN_CALLBACKS_AUTHOR_EMAIL``;
3. the user's own Oxen config (``oxen config --name ... --email ...``);
4. git's ``user.name`` / ``user.email``;
5. ``<login>`` / ``<login>@<hostname>``, so a fresh machine works.

For 1, 2, 4 and 5 the publisher's worker runs with a private ``OXEN_CONFIG_DIR``
holding that identity (and a link to the user's ``auth_config.toml``, so remote
tokens still apply). The user's own config is never written.
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

from .._util.cache import default_cache_dir
from .._util.fs import write_atomically
from ..names import ENV_AUTHOR_EMAIL, ENV_AUTHOR_NAME, ENV_OXEN_CONFIG_DIR


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


def resolve_author(explicit: tuple[str, str] | None = None) -> Author:
    if explicit:
        return Author(explicit[0], explicit[1], "argument")
    env_name, env_email = os.environ.get(ENV_AUTHOR_NAME), os.environ.get(ENV_AUTHOR_EMAIL)
    if env_name and env_email:
        return Author(env_name, env_email, "environment")
    if (oxen_config_dir() / "user_config.toml").is_file():
        return Author("", "", "oxen-config")
    git_name, git_email = _git_config("user.name"), _git_config("user.email")
    if git_name and git_email:
        return Author(git_name, git_email, "git")
    login = _login()
    return Author(login, f"{login}@{socket.gethostname() or 'localhost'}", "system")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "oxen-callbacks"


def worker_environment(author: Author, state_root: Path) -> dict[str, str]:
    """Environment overrides for a process that commits as ``author``."""
    if author.source == "oxen-config":
        return {}
    digest = hashlib.sha1(f"{author.name}\0{author.email}".encode()).hexdigest()[:12]
    folder = state_root / "oxen-identity" / digest
    folder.mkdir(parents=True, exist_ok=True)
    user_config = folder / "user_config.toml"
    if not user_config.exists():
        write_atomically(user_config, f"name = {_toml_str(author.name)}\nemail = {_toml_str(author.email)}\n")
    auth = oxen_config_dir() / "auth_config.toml"
    link = folder / "auth_config.toml"
    if auth.is_file() and not link.exists():
        try:
            os.symlink(auth.resolve(), link)
        except FileExistsError:
            pass
    return {ENV_OXEN_CONFIG_DIR: str(folder)}


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
