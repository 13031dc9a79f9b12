"""Keep credentials out of everything this library writes or logs."""

from __future__ import annotations

import re

_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key|password|secret|sig)=)[^&#]*")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact_url(url: str | None) -> str | None:
    """``url`` without user info or secret query parameters; other strings unchanged.

    >>> redact_url("https://user:tok@hub.oxen.ai/ns/repo?token=abc&x=1")
    'https://hub.oxen.ai/ns/repo?token=***&x=1'
    """
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    authority, sep, tail = rest.partition("/")
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}://{authority}{sep}{tail}")


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with URLs' credentials, bearer tokens and the given secrets masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)) or "", text)
