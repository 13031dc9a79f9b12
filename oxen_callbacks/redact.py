"""Keep credentials out of everything this library writes or logs."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

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


# -- command lines ----------------------------------------------------------------------------
MASK = "***"

# Word parts of an option or key name that mark its value secret (names split on - _ . and camelCase).
_SECRET_WORDS = frozenset({
    "token", "key", "apikey", "secret", "password", "passwd", "pwd", "pass", "passphrase", "auth",
    "authorization", "credential", "credentials", "creds", "pat", "cookie", "signature", "sig", "private",
    "privatekey", "bearer", "session",
})
# A word part ending in one of these is a compound secret name too: ``hftoken``, ``dbpassword``.
_SECRET_ENDINGS = ("token", "secret", "password", "passwd", "apikey", "accesskey", "secretkey", "privatekey")
# ``--pad-token '<pad>'``, ``eos_token_id``: tokenizer settings, not credentials.
_TOKENIZER_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop"})
# The last word of a name that says where a secret lives, not what it is: ``--token-file ~/.tok``.
_POINTER_WORDS = frozenset({"file", "path", "dir", "env", "var"})

_OPTION = re.compile(r"^--?[A-Za-z][\w.-]*$")
_ASSIGNMENT = re.compile(r"^((?:--?|\+\+?|~)?[A-Za-z_][\w.-]*)=(.*)$", re.DOTALL)
_EMBEDDED = re.compile(r"""(?<![\w.-])(["']?)([A-Za-z_][\w.-]*)\1(\s*[=:]\s*)(["']?)([^\s,;&"'}\]]+)""")
_KNOWN_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|hf_[A-Za-z0-9]{30,}"
    r"|sk-(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Z])[A-Za-z0-9_-]{20,}"  # not sk-learn-...: needs A-Z and 0-9
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|glpat-[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|pypi-[A-Za-z0-9_-]{50,}"
    r"|npm_[A-Za-z0-9]{36}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r")")
_CANDIDATE = re.compile(r"[A-Za-z0-9+/=_-]{20,}")
_CAMEL_PIECE = re.compile(r"[A-Z]{2,}(?![a-z])|[A-Z]?[a-z]+|[0-9]+|[A-Z]")
_COMMIT_ID = re.compile(r"^[0-9a-f]{31,32}$|^[0-9a-f]{40}$")


def secret_name(name: str) -> bool:
    """Whether an option or key ``name`` (``--hf-token``, ``trainer.api_key``, ``MY_TOKEN``) names a secret.

    >>> [secret_name(n) for n in ("--access-key", "+wandb.key", "apiKey", "--max-new-tokens", "--pad-token")]
    [True, True, True, False, False]
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name.lstrip("-+~"))
    words = [w for w in re.split(r"[-_.]+", spaced.lower()) if w]
    if not words or words[-1] in _POINTER_WORDS:
        return False
    for i, word in enumerate(words):
        if word == "token" and i and words[i - 1] in _TOKENIZER_WORDS:
            continue
        if word in _SECRET_WORDS or word.endswith(_SECRET_ENDINGS):
            return True
    return False


def _random_looking(word: str) -> bool:
    """Long, letters and digits, high entropy, class changes everywhere, and not a commit id.

    Commit ids (31/32-hex Oxen, 40-hex git) are exempt on purpose: lineage needs them; the
    price is that a secret of exactly that shape (e.g. a 40-hex W&B key) is masked by its
    option name only. Letters-only words (CamelCase names) are not judged by shape either.
    """
    body = word.rstrip("=")
    if _COMMIT_ID.match(body):
        return False
    # words and numbers joined by separators (cache-8c3f2a1b, exp42-lr3e4-bs32, 20250101-120000-ab12cd) are names
    # ('+' only occurs in base64, whose '/' is no separator either)
    separators = r"[-_=]+" if "+" in body else r"[-_/=]+"
    segments = [s for s in re.split(separators, body) if s and not re.fullmatch(r"[A-Z]?[a-z]+|[0-9]+", s)]
    chars = "".join(segments)
    if len(chars) < 20 or len(chars) / len(segments) < 10 or not re.search("[A-Za-z]", chars) \
            or not re.search("[0-9]", chars):
        return False
    counts = {c: chars.count(c) for c in set(chars)}
    entropy = -sum(n / len(chars) * math.log2(n / len(chars)) for n in counts.values())
    kinds = ["u" if c.isupper() else "l" if c.islower() else "d" for c in chars]
    # random strings change character class often (an Upper before lower starts a word: not counted)
    changes = sum(a != b and (a, b) != ("u", "l") for a, b in itertools.pairwise(kinds))
    if entropy < 3.0 or changes / (len(chars) - 1) < 0.2:
        return False
    if "u" in kinds and "l" in kinds:  # CamelCase names (SmolLM2-135M) are mostly pieces of 3+ characters
        pieces = _CAMEL_PIECE.findall(chars)
        return sum(len(p) for p in pieces if len(p) <= 2) / len(chars) >= 0.25
    return True


def _redact_value(value: str) -> str:
    """``value`` with embedded secret assignments, known tokens and random-looking words masked."""
    def assignment(m: re.Match[str]) -> str:
        quote, name, sep, vquote, _value = m.groups()
        return f"{quote}{name}{quote}{sep}{vquote}{MASK}" if secret_name(name) else m.group(0)

    value = _EMBEDDED.sub(assignment, redact_text(value))
    value = _KNOWN_TOKEN.sub(MASK, value)
    return _CANDIDATE.sub(lambda m: MASK if _random_looking(m.group(0)) else m.group(0), value)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with secrets masked by option name and by value shape.

    Names: ``--hf-token X``, ``--api-key=X``, ``trainer.api_key=X``, ``+wandb.key=X``, ``MY_TOKEN=X``
    (see :func:`secret_name`). Values anywhere: known token prefixes (``ghp_``, ``hf_``, ``sk-``,
    ``AKIA``, JWTs, ...), long random-looking words, URL credentials. Paths, numbers, model and
    run names and commit ids stay readable.

    >>> redact_argv(["train.py", "--pat", "x", "--lr=3e-4", "trainer.api_key=abc"])
    ['train.py', '--pat', '***', '--lr=3e-4', 'trainer.api_key=***']
    """
    masked: list[str] = []
    secret_next = False
    for arg in argv:
        assignment = _ASSIGNMENT.match(arg)
        if secret_next and not _OPTION.match(arg):
            masked.append(MASK)
        elif assignment and secret_name(assignment.group(1)):
            masked.append(f"{assignment.group(1)}={MASK}")
        elif assignment:
            masked.append(f"{assignment.group(1)}={_redact_value(assignment.group(2))}")
        else:
            masked.append(_redact_value(arg))
        secret_next = bool(_OPTION.match(arg)) and secret_name(arg)
    return masked
