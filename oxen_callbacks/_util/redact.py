"""Keep credentials out of everything this library writes or logs.

Command lines (:func:`redact_argv`) are masked by option or key name and by value shape. The
trade-offs, each chosen so that none of the leak shapes in ``tests/test_security.py`` gets through:

* Names are split into words (``-``, ``_``, ``.``, camelCase); trailing digits are dropped and
  digits inside a word read as letters (``oauth2``, ``passw0rd``) before the words are matched.
* ``token`` next to a counting or typing word (``--token-limit``, ``token_type_ids``) or a
  tokenizer word (``--pad-token``, ``--image-token``), ``pass`` next to ``through``/``rate``/``k``/
  ``at``, ``key`` as a sort, cache, monitor, eval or column key, and names ending in where or how
  a secret is used (``--token-file``, ``--auth-type basic``) are not secret names.
* A secret name's value is kept when it is a boolean (``--private false``) and, unless the name
  says password/secret/token/credential, when it is a plain number (``--session 3``): a numeric
  password under a weaker name (``--pass 123456``) is the price.
* A bare ``--key`` keeps a value that reads as a metric name: words joined by ``_``, ``/`` or ``.``,
  one of them a metric or split word (``val_loss``, ``train/acc``, ``eval.f1``). A passphrase of that
  shape (``test_loss_42``) is the price; ``--key loss`` and ``--key correct_horse`` are masked.
* Shapes are judged per path component, and 31/32/40-hex ids (Oxen and git commits, MLflow run ids,
  Hugging Face snapshots) are exempt, so a secret of exactly that shape is masked by name only. When
  one component looks random, the whole run of characters around it is masked (base64 holds ``/``).
* After a secret name, an argument starting with a single ``-`` is its value (``--token -Summer2024``);
  ``--other`` and one-letter flags (``-v``) stay options, so ``--token -v`` keeps ``-v``.
* ``--set``/``--override``/``-o``/``--opts`` style options take ``name value`` pairs: a secret name
  there masks the argument after it.
* An argument that holds a command line (starts with ``-``, or holds a ``--option``, and has spaces)
  is redacted word by word, then as a whole; in ``key: value`` pairs a quoted value is masked whole,
  and after an authorization scheme word (``Basic``, ``token``, ``Digest``...) the rest of the line.
* Query parameters are masked by the same names, first parameter or not.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import shlex
from collections.abc import Sequence

# a query parameter's value runs to the next ``&name=``: ``client_secret=Tr0ub4dor&3`` is one value
_QUERY_PARAM = re.compile(r"([?&#])([^=&#?]+)=((?:[^&#]|&(?![^=&#?]*=))*)")  # (# too: tokens in a fragment)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
# a query parameter outside a whole URL: ``url: /?access_token=...`` in urllib3's retry warnings
_BARE_QUERY_PARAM = re.compile(r"""([?&])([A-Za-z_][\w.-]*)=("[^"]*"|'[^']*'|(?:[^&#\s'"]|&(?![^=&#?\s]*=))*)""")


def redact_url(url: str | None, *, schemeless: bool = False) -> str | None:
    """``url`` without user info or secret query parameters; other strings unchanged.

    ``schemeless``: ``url`` may be a URL written without its scheme (``user:tok@host/ns/repo``, as
    someone may have written a remote by hand): what precedes its first ``/`` is its host.

    >>> redact_url("https://user:tok@hub.oxen.ai/ns/repo?x=1&client_secret=abc")
    'https://hub.oxen.ai/ns/repo?x=1&client_secret=***'
    >>> redact_url("user:tok@hub.oxen.ai/ns/repo", schemeless=True)
    'hub.oxen.ai/ns/repo'
    """
    if not url or ("://" not in url and not schemeless):
        return url
    scheme, found, rest = url.partition("://")
    if not found:
        scheme, rest = "", url
    authority, sep, tail = rest.partition("/")
    host, query_sep, query = authority.partition("?")  # ``http://mlflow:5000?auth=x`` has no path
    authority = host.rsplit("@", 1)[-1] + query_sep + query

    def parameter(m: re.Match[str]) -> str:
        lead, name, value = m.groups()
        return f"{lead}{name}={MASK}" if _masks(name, value) else m.group(0)

    return _QUERY_PARAM.sub(parameter, f"{scheme}{found}{authority}{sep}{tail}")


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with URLs' credentials, bearer tokens and the given secrets masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)) or "", text)
    return _BARE_QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if _masks(m[2], m[3]) else m[0], text)


class RedactingFormatter(logging.Formatter):
    """A log formatter that masks credentials (:func:`redact_text`) in every line it writes: MLflow's
    and urllib3's own warnings quote the tracking URI."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


# -- command lines ----------------------------------------------------------------------------
MASK = "***"

# Word parts of an option or key name that mark its value secret (names split on - _ . and camelCase).
_SECRET_WORDS = frozenset({
    "token", "key", "apikey", "secret", "secrets", "password", "passwd", "pwd", "pw", "pass", "passphrase",
    "auth", "oauth", "authorization", "credential", "credentials", "creds", "cred", "pat", "cookie", "signature",
    "sig", "private", "privatekey", "privkey", "bearer", "session", "jwt",
})
# Words whose value is secret even when it is a plain number (``--password 123456``).
_STRONG_WORDS = frozenset({
    "token", "apikey", "secret", "secrets", "password", "passwd", "pwd", "pw", "passphrase", "credential",
    "credentials", "creds", "cred", "privatekey", "privkey", "jwt",
})
# A word part ending in one of these is a compound secret name too: ``hftoken``, ``dbpassword``.
_SECRET_ENDINGS = ("token", "secret", "password", "passwd", "apikey", "accesskey", "secretkey", "privatekey")
# Neighbours that make ``token`` a tokenizer setting or a count: ``--pad-token '<pad>'``, ``--token-limit``.
_TOKEN_NOT_SECRET = frozenset({
    "pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop", "image", "audio", "video",
    "vision", "eot", "eom", "boi", "eoi", "im", "placeholder",
    "limit", "limits", "type", "types", "ids", "id", "count", "len", "length", "max", "min", "num", "size", "budget",
})
# ``--pass-through``, ``pass_k``, ``pass-at-1``: an evaluation or a flag, not a password.
_PASS_NOT_SECRET = frozenset({"through", "rate", "k", "at", "fail", "count", "num", "n"})
# ``--monitor-key``, ``--sort-key``, ``--key-column``: a key into data, not a credential.
_KEY_BEFORE = frozenset({
    "monitor", "sort", "cache", "group", "partition", "primary", "join", "index", "metric", "label", "text",
    "column", "dict", "lookup", "hash", "shard", "order", "foreign", "input", "output", "target", "image", "batch",
    "eval", "val", "best",
})
_KEY_AFTER = frozenset({"column", "columns", "col", "cols", "field", "fields", "name", "names"})
# The last word of a name that says where a secret lives, not what it is: ``--token-file ~/.tok``.
_POINTER_WORDS = frozenset({"file", "path", "dir", "env", "var"})
# The last word of a name that says how a secret is used: ``--auth-type basic``, ``--token-scheme bearer``.
_SETTING_WORDS = frozenset({"type", "method", "mode", "scheme", "provider", "backend", "kind", "algorithm"})
# Options that set ``name value`` pairs: ``--set wandb.api_key X``, ``--opts MODEL.KEY X``.
_SETTERS = frozenset({
    "set", "set-string", "set_string", "override", "overrides", "o", "opt", "opts", "option", "options",
    "define", "cfg-options", "cfg_options", "param", "params", "hparams", "config-override",
})
_BOOLEAN = frozenset({"true", "false", "yes", "no", "none", "null", "on", "off"})
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_METRIC_NAME = re.compile(r"^[A-Za-z]+\d*(?:[_./][A-Za-z]+\d*|[_./]\d+)+$")
# a word that makes ``--key``'s value a metric's name (``val_loss``, ``eval/f1``), not a passphrase
_METRIC_WORDS = frozenset({
    "loss", "acc", "accuracy", "f", "auc", "auroc", "bleu", "rouge", "ppl", "perplexity", "score", "reward", "map",
    "iou", "precision", "recall", "mse", "mae", "rmse", "error", "wer", "cer", "train", "val", "valid", "eval", "test",
})
_LEET = str.maketrans("0435", "oaes")

_OPTION = re.compile(r"^--?[A-Za-z][\w.-]*$")
_BARE_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")
_ASSIGNMENT = re.compile(r"^((?:--?|\+\+?|~)?[A-Za-z_][\w.-]*)=(.*)$", re.DOTALL)
# ``name: value`` / ``"name" = value`` inside an argument; never a URL scheme (``https://``), never across lines
_EMBEDDED_NAME = re.compile(r"""(?<![\w.-])(["']?)([A-Za-z_][\w.-]*)\1[ \t]*[=:](?!//)[ \t]*""")
_EMBEDDED_VALUE = re.compile(r""""(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[^\s,;&"'}\]]+""")
# ``Authorization: Basic X``, ``Authorization: token X``: the scheme word stays, the rest of the line goes
_AUTH_SCHEME = re.compile(r"(?i)(?:bearer|basic|token|digest|negotiate|ntlm|hoba|mutual|apikey|key|jwt|"
                          r"aws4-hmac-sha256|sharedkey|signature|oauth)[ \t]+(?=\S)")
_REST_OF_LINE = re.compile(r"[^\r\n']*[^\s']")  # a closing ' ends it too: ``-H 'Authorization: ...' url``
# ``password:`` or ``password: |`` at a line's end: the value is the more indented lines below (YAML)
_BLOCK_HEAD = re.compile(r"(?:[|>][-+0-9]*)?[ \t]*(?=\r?\n)")
_LINE = re.compile(r"\r?\n([ \t]*)([^\r\n]*)")
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


def _name_words(name: str) -> list[str]:
    """``name``'s words, lower case, trailing digits dropped and inner digits read as letters."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name.lstrip("-+~"))
    words = [w.rstrip("0123456789") or w for w in re.split(r"[-_.]+", spaced.lower()) if w]
    return [w.translate(_LEET) if re.search("[a-z]", w) else w for w in words]


def _secret_word(name: str) -> str | None:
    """The word that makes ``name`` a secret's name, or None."""
    words = _name_words(name)
    if not words or words[-1] in _POINTER_WORDS or words[-1] in _SETTING_WORDS:
        return None
    for i, word in enumerate(words):
        neighbours = set(words[max(i - 1, 0):i] + words[i + 1:i + 2])
        if (word == "token" and neighbours & _TOKEN_NOT_SECRET) or (word == "pass" and neighbours & _PASS_NOT_SECRET):
            continue
        if word == "key" and (set(words[max(i - 1, 0):i]) & _KEY_BEFORE or set(words[i + 1:i + 2]) & _KEY_AFTER):
            continue
        if word in _SECRET_WORDS:
            return word
        if word.endswith(_SECRET_ENDINGS):
            return "token"  # a compound (``hftoken``) is as strong as its ending
    return None


def secret_name(name: str) -> bool:
    """Whether an option or key ``name`` (``--hf-token``, ``trainer.api_key``, ``MY_TOKEN``) names a secret.

    >>> [secret_name(n) for n in ("--access-key", "+wandb.key", "apiKey", "--max-new-tokens", "--pad-token")]
    [True, True, True, False, False]
    """
    return _secret_word(name) is not None


def _masks(name: str, value: str) -> bool:
    """Whether ``value``, given under ``name``, is to be masked (see the module's trade-offs)."""
    word, plain = _secret_word(name), value.strip("\"'")
    if word is None or plain.lower() in _BOOLEAN:
        return False
    if _NUMBER.match(plain) and word not in _STRONG_WORDS:
        return False
    return not (_name_words(name) == ["key"] and _METRIC_NAME.match(plain) is not None
                and bool(_METRIC_WORDS & {w.rstrip("0123456789").lower() for w in re.split(r"[_./]", plain)}))


def _random_looking(word: str) -> bool:
    """Long, letters and digits, high entropy, class changes everywhere, and no commit id.

    Commit ids (31/32-hex Oxen, 40-hex git) are exempt on purpose, also as a ``-``/``_`` separated
    part (``run-<id>``): lineage needs them; the price is that a secret of exactly that shape (e.g.
    a 40-hex W&B key) is masked by its option name only. Letters-only words (CamelCase names) are
    not judged by shape either.
    """
    body = word.rstrip("=")
    # words and numbers joined by separators (cache-8c3f2a1b, exp42-lr3e4-bs32, 20250101-120000-ab12cd) are names
    segments = [s for s in re.split(r"[-_=]+", body)
                if s and not re.fullmatch(r"[A-Z]?[a-z]+|[0-9]+", s) and not _COMMIT_ID.match(s)]
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


def _random_run(run: str) -> bool:
    """Whether a run of token characters holds a random-looking word, judged per path component.

    ``+`` only occurs in base64, whose ``/`` is no separator: such a run is judged whole.
    """
    components = [run] if "+" in run else re.split(r"/+", run)
    return any(_random_looking(c) for c in components if c)


def _yaml_block_end(text: str, key_start: int, pos: int) -> int | None:
    """Where the value of a ``key:`` that continues on more indented lines ends, or None."""
    if (head := _BLOCK_HEAD.match(text, pos)) is None:
        return None
    column, end = key_start - (text.rfind("\n", 0, key_start) + 1), None
    for line in _LINE.finditer(text, head.end()):
        if line.group(2) and len(line.group(1)) <= column:
            break
        end = line.end()
    return end


def _mask_embedded(text: str) -> str:
    """``text`` with the values of secret-named ``name: value`` / ``name=value`` pairs masked."""
    out, pos = [], 0
    while m := _EMBEDDED_NAME.search(text, pos):
        out.append(text[pos:m.end()])
        pos = m.end()
        if secret_name(m.group(2)) and (block_end := _yaml_block_end(text, m.start(), pos)) is not None:
            out.append(MASK if text[pos - 1] in " \t" else f" {MASK}")
            pos = block_end
            continue
        value = _EMBEDDED_VALUE.match(text, pos)
        if value is None or not _masks(m.group(2), value.group(0)):
            continue  # the value is scanned too: ``db:\n  password: x`` holds a secret name
        if scheme := _AUTH_SCHEME.match(text, pos):
            out.append(scheme.group(0))
            value = _REST_OF_LINE.match(text, scheme.end())
        quote = value.group(0)[0] if value.group(0)[0] in "\"'" else ""
        out.append(f"{quote}{MASK}{quote}")
        pos = value.end()
    return "".join(out) + text[pos:]


def _redact_command_line(value: str) -> str:
    """``value`` redacted word by word when it holds options (``--extra "--password X"``), else unchanged."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    if len(words) == 1 and words[0] != value:  # quoted whole: ``--extra='--token X'``
        inner = _redact_value(words[0])
        return value if inner == words[0] else shlex.quote(inner)
    if not words or not (words[0].startswith("-") or any(w.startswith("--") for w in words)):
        return value  # ``{"lr": -1, ...}`` is no command line
    masked = redact_argv(words)
    return value if masked == words else " ".join(w if w == MASK else shlex.quote(w) for w in masked)


def _redact_value(value: str) -> str:
    """``value`` with embedded command lines, secret assignments, known tokens and random-looking words masked."""
    if re.search(r"\s", value):
        value = _redact_command_line(value)
    value = _mask_embedded(redact_text(value))
    value = _KNOWN_TOKEN.sub(MASK, value)
    return _CANDIDATE.sub(lambda m: MASK if _random_run(m.group(0)) else m.group(0), value)


def _is_option(arg: str) -> bool:
    """``--name``, a short flag ``-v`` or ``--``; ``-Summer2024`` after ``--token`` is a value."""
    return arg == "--" or bool(_OPTION.match(arg)) and (arg.startswith("--") or len(arg) <= 2)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with secrets masked by option name and by value shape.

    Names: ``--hf-token X``, ``--api-key=X``, ``trainer.api_key=X``, ``+wandb.key=X``, ``MY_TOKEN=X``,
    ``--set wandb.api_key X`` (see :func:`secret_name`). Values anywhere: known token prefixes (``ghp_``,
    ``hf_``, ``sk-``, ``AKIA``, JWTs, ...), long random-looking words, URL credentials, secret query
    parameters, ``key: value`` pairs and authorization headers. Paths, numbers, model and run names
    and commit ids stay readable.

    >>> redact_argv(["train.py", "--pat", "x", "--lr=3e-4", "trainer.api_key=abc"])
    ['train.py', '--pat', '***', '--lr=3e-4', 'trainer.api_key=***']
    """
    masked: list[str] = []
    secret_of: str | None = None  # the name whose value the next argument is
    setting = False  # inside ``--set name value ...``
    for arg in argv:
        assignment = _ASSIGNMENT.match(arg)
        is_value = secret_of is not None and not _is_option(arg)  # ``--token -Summer2024``: a value
        if is_value and _masks(secret_of, arg):
            masked.append(MASK)
        elif assignment and _masks(assignment.group(1), assignment.group(2)):
            masked.append(f"{assignment.group(1)}={MASK}")
        elif assignment:
            masked.append(f"{assignment.group(1)}={_redact_value(assignment.group(2))}")
        else:
            masked.append(_redact_value(arg))
        if is_value:
            secret_of = None
        elif _OPTION.match(arg):
            secret_of = arg if secret_name(arg) else None
            setting = arg.lstrip("-") in _SETTERS
        else:
            secret_of = arg if setting and _BARE_NAME.match(arg) and secret_name(arg) else None
    return masked
