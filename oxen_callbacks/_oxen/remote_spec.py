"""Naming a remote Oxen repository: ``https://host[:port]/namespace/name``, validated up front."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._util.redact import redact_url
from ..errors import ConfigurationError

_AUTH_HINT = ("for a token run `oxen config --auth HOST TOKEN` (or oxen.auth.config_auth(TOKEN, host=HOST)); "
              "oxen reads it from its own config.")
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
        """A folder-safe cache key."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.host}-{self.namespace}-{self.name}")


def looks_remote(repo: str) -> bool:
    return repo.startswith(("http://", "https://", "oxen://")) or "://" in repo


def parse_remote(repo: str, host: str | None = None, scheme: str = "https") -> RemoteSpec:
    """Parse ``https://host/ns/name`` (or ``ns/name`` with ``host=``); reject credentials in URLs.

    >>> parse_remote("http://127.0.0.1:3000/ox/reviews").repo_id
    'ox/reviews'
    """
    text = repo.strip()
    if "?" in text or "#" in text:  # the value is not shown: a query is where tokens hide
        base = redact_url(text.split("?", 1)[0].split("#", 1)[0])
        raise ConfigurationError(f"Remote repository URL {base!r} carries a query or fragment ('?...' or '#...'), "
                                 "which Oxen would never see.", f"drop it; {_AUTH_HINT}")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme not in ("http", "https"):
            raise ConfigurationError(
                f"Remote repository {repo!r}: scheme {scheme!r} is not supported.",
                "use an http(s) URL such as 'https://hub.oxen.ai/namespace/name'.",
            )
        host, _, path = rest.partition("/")
    else:
        path = text
        if host is None:
            raise ConfigurationError(f"Remote repository {repo!r} needs a host.",
                                     "pass a full URL 'https://HOST/namespace/name', or host='hub.oxen.ai'.")
    if "@" in host:
        raise ConfigurationError(
            f"Remote repository URL for host {host.rsplit('@', 1)[1]!r} carries credentials.",
            f"never put tokens in URLs: {_AUTH_HINT}",
        )
    port = _HOST.match(host or "")
    if not port or (port.group(1) and not 0 < int(port.group(1)) < 65536):
        raise ConfigurationError(f"Remote repository {repo!r}: {host!r} is not a valid host[:port].",
                                 "e.g. 'hub.oxen.ai' or '127.0.0.1:3000'.")
    parts = [p for p in path.split("/") if p]
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise ConfigurationError(f"Remote repository {repo!r} must name exactly 'namespace/name'.",
                                 "e.g. 'https://hub.oxen.ai/ox/reviews'.")
    return RemoteSpec(scheme, host, parts[0], parts[1])
