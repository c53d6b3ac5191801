"""Keeping secrets out of logs, errors and /metrics: passwords in URLs, tokens, keys.

Two tools: ``redact_url`` for a URL the code is about to show (the Redis URL in the startup
log line and in /metrics labels), and ``SecretFilter`` for everything logged, including what
libraries log and exception tracebacks, as a net for what no one thought of. ``url_secrets``
gives the filter a URL's secret parts only: the URL itself is not a secret, and masking all of
it would hide which Redis a log line is about (``redis://host:6379`` stays readable).

Redaction errs on the side of hiding too much: a URL that does not parse cleanly loses its
whole user-information part rather than risk showing part of a password.
"""

from __future__ import annotations

import logging
import re
from typing import Final
from urllib.parse import quote, unquote, urlsplit

MASK: Final = "***"

# Query parameters whose values are credentials (redis-py reads ?password=; we read ?token=).
_SECRET_PARAMETERS: Final = (
    "password", "passwd", "pwd", "pass", "access_token", "token", "secret", "api_key", "apikey",
    "auth", "sentinel_password",
)  # fmt: skip
_PARAMETER = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(" + "|".join(_SECRET_PARAMETERS) + r")=([^&\s#\"',;]*)"
)

# scheme://user:password@ in free text. The password runs to the *last* @ before whitespace,
# so an unescaped @ inside a password does not leave its tail visible.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/?#@]*):\S*@")

# RFC 6750 b64token.
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/-]+=*")

# A JWT anywhere (in an exception message, a logged handshake): a header and a payload are
# base64url JSON objects, so both begin "eyJ".
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")

# A line client's /auth TOKEN, whatever the token looks like.
_AUTH_LINE = re.compile(r"(/auth\s+)\S+")


def redact_url(url: str) -> str:
    """The URL with its password (``scheme://user:password@host``) and credential query
    parameters (``?password=…``, ``&token=…``) replaced by ``***``; the username is kept, so
    a log still says which ACL user connected. Never raises."""
    url = _redact_userinfo(url)
    base, question, query = url.partition("?")
    if question:
        url = base + question + _PARAMETER.sub(rf"\1={MASK}", query)
    return url


def url_secrets(url: str) -> list[str]:
    """The secret parts of ``url`` for ``SecretFilter``: the password (as written and decoded)
    and the values of credential query parameters. Empty for ``redis://host:6379/0``."""
    secrets: list[str] = []
    split = _split_userinfo(url)
    if split is not None:
        _, userinfo, _ = split
        _, colon, password = userinfo.partition(":")
        if colon and password:
            secrets += [password, unquote(password)]
    _, question, query = url.partition("?")
    if question:
        secrets += [value for _, value in _PARAMETER.findall(query) if value]
    return list(dict.fromkeys(secrets))


def _redact_userinfo(url: str) -> str:
    split = _split_userinfo(url)
    if split is None:
        return url
    scheme_and_separator, userinfo, after = split
    user, colon, _ = userinfo.partition(":")
    credentials = f"{user}:{MASK}" if colon else user
    return f"{scheme_and_separator}{credentials}@{after}"


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """``("scheme://", userinfo, what follows the @)``, or None when the URL has no userinfo."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a netloc that is not [userinfo@]host[:port]
        netloc: str | None = parts.netloc if rest.startswith(parts.netloc) else None
    except ValueError:
        netloc = None
    if netloc and "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        after = host + rest[len(netloc) :]
    elif netloc and ":" not in rest.partition("@")[0]:
        return None  # the @ is further on (a path or query), and nothing before it has a password
    else:
        # Not a URL urlsplit reads as its author meant (a / ? or # left unescaped in a
        # password, say): everything up to the last @ may be credentials.
        userinfo, _, after = rest.rpartition("@")
    return scheme + separator, userinfo, after


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with the given secret strings, URL passwords, Bearer tokens, JWTs,
    ``/auth`` tokens and credential parameters (``token=…``) replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    text = _JWT.sub(MASK, text)
    text = _AUTH_LINE.sub(rf"\1{MASK}", text)
    return _PARAMETER.sub(rf"\1={MASK}", text)


class SecretFilter(logging.Filter):
    """Rewrites every log record that passes through it so no secret is left in it: the
    message with its arguments, the exception traceback and the stack.

    Give it the configured secrets (the auth secret, the Redis password); the patterns of
    ``redact_text`` apply as well. Install it with ``install()``, which puts it on the root
    logger's *handlers*: a filter on a logger only sees records logged on that very logger,
    not those propagated from ``broadcast.gateway`` or from libraries.
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        variants = {s for secret in secrets if secret for s in (secret, quote(secret, safe=""))}
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = tuple(sorted(variants, key=len, reverse=True))

    def __repr__(self) -> str:  # never the secrets
        return f"<SecretFilter of {len(self._secrets)} strings>"

    def redact(self, text: str) -> str:
        return redact_text(text, self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it; show no arguments
            message = str(record.msg)
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # What Formatter.format would produce, cached where it looks first.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def install(self, logger: logging.Logger | None = None) -> None:
        """Filter everything ``logger`` (the root logger by default) writes: on each of its
        handlers, and on itself for records logged on it directly. Call it after the
        handlers are set up (``logging.basicConfig``)."""
        logger = logger or logging.getLogger()
        for handler in logger.handlers:
            handler.addFilter(self)
        logger.addFilter(self)
