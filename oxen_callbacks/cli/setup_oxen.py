"""``oxen-callbacks auth``, ``identity`` and ``remote``: set Oxen up with what pip installed.

pip installs oxenai, not the ``oxen`` command line, so these do what ``oxen config`` would:
a token per host (read from stdin or a hidden prompt, never from argv), the author of
commits, and a model repository's remotes. Each writes through oxenai in a child process.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from pathlib import Path

from ..errors import ConfigurationError
from .command import Command, Result

_REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MAX_TOKEN_CHARS = 65536


# -- auth ------------------------------------------------------------------------------------------
def _auth_arguments(parser: argparse.ArgumentParser) -> None:
    from .._oxen.remote_spec import HUB_HOST

    parser.add_argument("--host", default=HUB_HOST, help=f"the Oxen server, host[:port] (default {HUB_HOST})")
    # taken only to refuse them without echoing the token (argparse would print "unrecognized arguments: TOKEN")
    parser.add_argument("argv_token", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--token", dest="token_option", help=argparse.SUPPRESS)


def _read_token(host: str) -> str:
    """The token from stdin when it is not a terminal (a pipe, a file), else from a hidden prompt."""
    if sys.stdin is None:
        return ""
    if not sys.stdin.isatty():
        return sys.stdin.read(_MAX_TOKEN_CHARS)
    return getpass.getpass(f"Token for {host} (input hidden): ")


def _auth(args: argparse.Namespace) -> Result:
    from .._oxen import child as oxen_child
    from .._oxen.auth import check_token, configured_hosts
    from .._oxen.remote_spec import check_host

    if args.argv_token or args.token_option is not None:
        raise ConfigurationError(
            "The token is never taken from the command line (it would stay in your shell history and "
            "the process list); nothing was written.",
            "run `oxen-callbacks auth` and paste it at the prompt, or pipe it in: "
            "`printenv OXEN_API_KEY | oxen-callbacks auth`.")
    host = check_host(args.host)
    token = check_token(_read_token(host))
    path = Path(oxen_child.save_token(token, host))
    return {"host": host, "auth_config": str(path), "mode": f"{path.stat().st_mode & 0o777:04o}",
            "hosts": configured_hosts(path)}


def _show_auth(result: Result) -> str:
    return (f"Token for {result['host']} saved in {result['auth_config']} (mode {result['mode']}: yours alone).\n"
            f"Hosts with a token: {', '.join(result['hosts'])}")


# -- identity --------------------------------------------------------------------------------------
def _identity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="author name of your commits (default: the current one, else git's)")
    parser.add_argument("--email", help="author email of your commits (default: the current one, else git's)")


def _ask(label: str, default: str | None) -> str:
    """One line from the terminal; the prompt goes to stderr so that ``--json`` output stays clean."""
    sys.stderr.write(f"{label}" + (f" [{default}]" if default else "") + ": ")
    sys.stderr.flush()
    return sys.stdin.readline().strip() or default or ""


def _identity(args: argparse.Namespace) -> Result:
    from .._oxen import child as oxen_child
    from .._oxen.identity import (
        USER_CONFIG,
        check_identity,
        current_identity,
        git_identity,
        oxen_config_dir,
    )

    current = current_identity()
    default = current or git_identity()
    if args.name is not None or args.email is not None:
        name, email, source = args.name or (default or ("", ""))[0], args.email or (default or ("", ""))[1], "flags"
    elif sys.stdin is not None and sys.stdin.isatty():
        name, email, source = _ask("Name", default and default[0]), _ask("Email", default and default[1]), "prompt"
    elif current:
        return {"name": current[0], "email": current[1], "source": "current", "written": False,
                "user_config": str(oxen_config_dir() / USER_CONFIG)}
    elif default:
        name, email, source = default[0], default[1], "git"
    else:
        raise ConfigurationError("No Oxen identity yet, and git has none to offer (git config user.name/user.email).",
                                 "pass both: `oxen-callbacks identity --name 'Ada Lovelace' --email ada@example.com`.")
    name, email = check_identity(name, email)
    path = oxen_child.save_identity(name, email)
    return {"name": name, "email": email, "source": source, "written": True, "user_config": path}


def _show_identity(result: Result) -> str:
    how = {"flags": "saved", "prompt": "saved", "git": "saved (from git's user.name/user.email)",
           "current": "unchanged"}[result["source"]]
    return f"Commits are authored by {result['name']} <{result['email']}>: {how} in {result['user_config']}"


# -- remote ----------------------------------------------------------------------------------------
def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (for scripts)")
    common.add_argument("--repo", help="the model repository (default: the one the current folder is in)")
    actions = parser.add_subparsers(dest="remote_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[common], help="add (or repoint) a remote; the server is asked first")
    add.add_argument("name", metavar="NAME", help="e.g. origin")
    add.add_argument("url", metavar="URL", help="https://HOST/namespace/name")
    add.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    actions.add_parser("list", parents=[common], help="list the remotes")


def _repo_root(given: str | None) -> Path:
    from .._oxen import layout as oxen_layout

    start = Path(given or ".").expanduser().resolve()
    root = start if oxen_layout.is_repo(start) else None if given else oxen_layout.find_repo_root(start)
    if root is None:
        where = f"--repo {given!r} is" if given else f"The current folder {str(start)!r} is"
        raise ConfigurationError(f"{where} not in an Oxen repository.",
                                 "pass --repo with the model repository's folder (the one holding .oxen).")
    return root


def _remote(args: argparse.Namespace) -> Result:
    from .._oxen import child as oxen_child
    from .._oxen.remote_spec import parse_remote
    from .._util.redact import redact_url

    repo = _repo_root(args.repo)
    remotes = _remotes_of(repo)  # (before `add` asks the server: oxenai would not read the config either)
    if args.remote_action == "add":
        if not _REMOTE_NAME.match(args.name):
            raise ConfigurationError(f"Remote name {args.name!r} is not a plain name.", "e.g. 'origin'.")
        spec = parse_remote(args.url)  # no credentials, query or other scheme
        oxen_child.add_remote(repo, args.name, spec.url, spec.host, timeout=args.timeout)
        remotes = _remotes_of(repo)
    # a URL someone wrote into config.toml by hand may lack its scheme and still hold a token
    return {"repo": str(repo), "added": args.name if args.remote_action == "add" else None,
            "remotes": [{"name": n, "url": redact_url(u, schemeless=True)} for n, u in sorted(remotes.items())]}


def _remotes_of(repo: Path) -> dict[str, str]:
    from .._oxen import layout as oxen_layout
    from .._oxen.repo import damaged_repo

    try:
        return oxen_layout.remotes(repo)
    except oxen_layout.DamagedLayout as exc:
        raise damaged_repo("model repository", repo, str(exc), f"repair {str(oxen_layout.oxen_dir(repo) / 'config.toml')!r} "
                           "(its `remotes` is a list of {name = \"origin\", url = \"https://HOST/namespace/name\"} "
                           "tables), or clone the repository again.") from None


def _show_remote(result: Result) -> str:
    lines = [f"{r['name']}\t{r['url']}" for r in result["remotes"]] or [f"no remotes in {result['repo']}"]
    if result["added"]:
        lines.insert(0, f"Remote {result['added']} added to {result['repo']}:")
    return "\n".join(lines)


COMMANDS = [
    Command("auth", "save a token for an Oxen server (read from stdin or a prompt, never argv)", _auth, _show_auth,
            _auth_arguments),
    Command("identity", "show or set the author of your Oxen commits (default: git's)", _identity, _show_identity,
            _identity_arguments),
    Command("remote", "add or list a model repository's Oxen remotes", _remote, _show_remote, _remote_arguments),
]
