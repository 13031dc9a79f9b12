"""Naming a remote Oxen repository: ``https://host[:port]/namespace/name``, validated up front."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .._util.redact import redact_url
from ..errors import ConfigurationError

#: oxenai's default host (``oxen.auth.config_auth``, ``RemoteRepo``): the Oxen hub.
HUB_HOST = "hub.oxen.ai"
_AUTH_HINT = "give the token with `oxen-callbacks auth --host HOST` (it reads it from stdin) or $OXEN_API_KEY."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*|\[[0-9a-fA-F:]+\])"
                   r"(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class RemoteSpec:
    scheme: str
    host: str  # with :port when given
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}/{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """A folder-safe cache key, one per repository: its readable part alone is shared by
        ``ml-team/data`` and ``ml/team-data``, or by hosts ``h:3000`` and ``h_3000``; a digest of the URL is not."""
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.host}-{self.namespace}-{self.name}")
        return f"{readable}-{hashlib.sha1(self.url.encode()).hexdigest()[:10]}"


def check_host(host: str) -> str:
    """``host`` if it is a ``host[:port]`` (what Oxen keys tokens by), else a clear error.

    >>> check_host("127.0.0.1:3000")
    '127.0.0.1:3000'
    """
    match = _HOST.match(host)
    if not match or (match.group(1) and not 0 < int(match.group(1)) < 65536):
        if "://" in host:  # a URL: name its host (never what may sit before an '@')
            bare = host.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
            raise ConfigurationError(f"{redact_url(host)!r} is a URL, not a host[:port].", f"pass {bare!r}.")
        if "@" in host:  # user:secret@host: never echo what sits before the '@'
            raise ConfigurationError(f"'***@{host.rsplit('@', 1)[-1]}' is not a host[:port]: it carries credentials.",
                                     f"pass {host.rsplit('@', 1)[-1]!r}; the token comes from stdin or the prompt.")
        raise ConfigurationError(  # (not echoed: a token pasted here by mistake must not reach a log)
            f"The host given ({len(host)} characters, not shown) is not a host[:port].",
            f"e.g. {HUB_HOST!r} or '127.0.0.1:3000'.")
    return host


def looks_remote(repo: str) -> bool:
    return repo.startswith(("http://", "https://", "oxen://")) or "://" in repo


def parse_remote(repo: str, host: str | None = None, scheme: str = "https") -> RemoteSpec:
    """Parse ``https://host/ns/name`` (or ``ns/name`` with ``host=``); reject credentials in URLs.

    >>> parse_remote("http://127.0.0.1:3000/ox/reviews").repo_id
    'ox/reviews'
    """
    text = repo.strip()
    shown = redact_url(text, schemeless=True)  # in messages: a URL written without its scheme may hold a token
    if "?" in text or "#" in text:  # the value is not shown: a query is where tokens hide
        base = redact_url(text.split("?", 1)[0].split("#", 1)[0])
        raise ConfigurationError(f"Remote repository URL {base!r} carries a query or fragment ('?...' or '#...'), "
                                 "which Oxen would never see.", f"drop it; {_AUTH_HINT}")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme not in ("http", "https"):
            raise ConfigurationError(
                f"Remote repository {shown!r}: scheme {scheme!r} is not supported.",
                "use an http(s) URL such as 'https://hub.oxen.ai/namespace/name'.",
            )
        host, _, path = rest.partition("/")
    else:
        path = text
        if host is None:
            raise ConfigurationError(f"Remote repository {shown!r} needs a host.",
                                     "pass a full URL 'https://HOST/namespace/name', or host='hub.oxen.ai'.")
    if "@" in host:
        raise ConfigurationError(
            f"Remote repository URL for host {host.rsplit('@', 1)[1]!r} carries credentials.",
            f"never put tokens in URLs: {_AUTH_HINT}",
        )
    try:
        check_host(host or "")
    except ConfigurationError:
        raise ConfigurationError(f"Remote repository {shown!r}: {host!r} is not a valid host[:port].",
                                 f"e.g. {HUB_HOST!r} or '127.0.0.1:3000'.") from None
    parts = [p for p in path.split("/") if p]
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise ConfigurationError(f"Remote repository {shown!r} must name exactly 'namespace/name'.",
                                 "e.g. 'https://hub.oxen.ai/ox/reviews'.")
    return RemoteSpec(scheme, host, parts[0], parts[1])
