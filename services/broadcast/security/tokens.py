"""Signed tokens (JWT): who a client is and where it may speak, vouched for by the operator.

A client cannot choose its own name once auth is on: the name is the token's ``sub``, signed by
whoever holds the secret (HS256) or the private key (RS256/ES256). The gateway holds only what it
needs to *verify*: the secret, or just the public key, so a compromised gateway with a public key
cannot mint tokens.

Choices, and why:

- ``exp`` is required. There is no revocation list: expiry is the only way a leaked or stolen
  token stops working, so a token without one would be valid for ever. The gateway also ends a
  live connection when its token expires (``Identity.seconds_left``).
- The algorithm is pinned to the one the verifier was built for. The token's own ``alg`` header
  only has to agree; it never chooses how the token is checked. So ``alg: none`` is refused, and
  so is the classic confusion attack: an HS256 token "signed" with the RS256 public key as its
  HMAC secret, which a verifier that let the header pick the algorithm would accept.
- HS256 secrets are at least 32 bytes (RFC 7518 section 3.2: a key as long as the hash), so
  they cannot be guessed offline from one captured token.
- Failures carry stable codes; messages never echo the token or anything an attacker put in it,
  so they are safe to log and to send back.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.validate import check_channel, check_name

# Clocks of the machine that mints a token and of the gateways drift a little; 10 s of grace
# keeps a fresh token from being "not yet valid" or a just-expired one from failing mid-connect,
# while being far below any sensible token lifetime.
TOKEN_LEEWAY_SECONDS: Final = 10.0

# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output (256 bits).
MIN_SECRET_BYTES: Final = 32

# Below 2048 bits RSA is factorable by a determined attacker (NIST SP 800-131A).
MIN_RSA_BITS: Final = 2048

# A token must fit on one line of the line protocol (4096 bytes). That leaves room for dozens of
# channels in the claim, and bounds the work an anonymous client can make us do before the
# signature is checked.
MAX_TOKEN_BYTES: Final = 4096

# JWS compact serialisation: three base64url parts. Anything else (JWE, JSON serialisation, a
# password typed by mistake) is refused before any parsing or crypto.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_ALGORITHM_HS256: Final = "HS256"
_ALGORITHM_RS256: Final = "RS256"
_ALGORITHM_ES256: Final = "ES256"


class AuthCode(StrEnum):
    """Stable codes a client can act on (as ``protocol.errors.ErrorCode``)."""

    AUTH_REQUIRED = "auth_required"  # no token at all
    TOKEN_EXPIRED = "token_expired"  # a good token, past its exp: get a new one
    TOKEN_INVALID = "token_invalid"  # forged, malformed, wrong algorithm, bad claims
    CHANNEL_FORBIDDEN = "channel_forbidden"  # a good token, but not for this channel


# A refused token ends the connection: the client has no identity to go on with. A channel
# outside the claim is refused like any bad input, and the connection stays usable.
_FATAL = frozenset({AuthCode.AUTH_REQUIRED, AuthCode.TOKEN_EXPIRED, AuthCode.TOKEN_INVALID})

# WebSocket close codes in the private range (4000-4999), mirroring HTTP 401 and 403.
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_FORBIDDEN: Final = 4003


class AuthError(Exception):
    """A client is refused. ``code`` is stable; ``message`` is for people and safe to show.

    Deliberately *not* a ``ProtocolError``: the sessions catch those and keep the connection
    open, and a refused token must never be swallowed that way. Where the gateway wants the
    connection to stay (``channel_forbidden``) it says so explicitly. Like a ``ProtocolError``
    it has ``code`` and ``message``, so ``lines.render_error`` can render it.
    """

    def __init__(self, code: AuthCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def closes_connection(self) -> bool:
        """True for a missing, expired or invalid token; False for ``channel_forbidden``."""
        return self.code in _FATAL

    @property
    def http_status(self) -> int:
        """For refusing a WebSocket handshake: 401 without a good token, 403 for a channel."""
        return 403 if self.code is AuthCode.CHANNEL_FORBIDDEN else 401

    @property
    def close_code(self) -> int:
        """For closing a WebSocket that is already open; the reason should be ``code``."""
        return CLOSE_FORBIDDEN if self.code is AuthCode.CHANNEL_FORBIDDEN else CLOSE_UNAUTHORIZED


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the client is."""

    name: str
    """The display name, from ``sub``; the client cannot change it."""
    channels: frozenset[str] | None
    """Channels it may join and publish to; None means any. An empty set allows none."""
    expires_at: float | None
    """Unix time of ``exp``; None only for identities the gateway makes itself (auth off)."""

    def allows(self, channel: str) -> bool:
        return self.channels is None or channel in self.channels

    def check_channel(self, channel: str) -> str:
        """The channel, if this identity may use it; else ``AuthError(channel_forbidden)``."""
        if self.allows(channel):
            return channel
        try:
            shown = f"#{check_channel(channel)}"
        except ProtocolError:  # never echo a malformed channel (control characters) back
            shown = "that channel"
        raise AuthError(AuthCode.CHANNEL_FORBIDDEN, f"your token does not allow {shown}")

    def pick_channel(self, preferred: str) -> str:
        """Where to put a client that asked for nothing in particular: ``preferred`` (the
        gateway's default channel) when allowed, else the first allowed channel by name."""
        if self.allows(preferred):
            return preferred
        if not self.channels:
            raise AuthError(AuthCode.CHANNEL_FORBIDDEN, "your token allows no channel")
        return min(self.channels)

    def seconds_left(self, now: float, leeway: float = TOKEN_LEEWAY_SECONDS) -> float:
        """How long a live connection may go on, given Unix time ``now`` (``time.time()``):
        the gateway closes it (``token_expired``) when this reaches 0. The leeway is the
        verifier's, so a token accepted within it is not cut off at once."""
        if self.expires_at is None:
            return math.inf
        return max(0.0, self.expires_at + leeway - now)


class TokenVerifier:
    """Checks tokens against one key and one algorithm; build it once, at startup.

    Exactly one of ``secret`` (HS256, the ``--auth-secret``) or ``public_key`` (PEM text of an
    RSA or P-256 EC public key, for RS256 or ES256: the ``--auth-public-key``). A bad key is
    a ``ValueError`` here, so a misconfigured gateway fails at start, not at the first client.
    With ``audience`` or ``issuer`` set, tokens must carry that ``aud`` / ``iss``: use them
    when the key is shared with other services, so their tokens are not valid here.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        leeway: float = TOKEN_LEEWAY_SECONDS,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("give exactly one: an HS256 secret or a PEM public key")
        self._key: Any
        if secret is not None:
            self._key = _hs256_secret(secret)
            self.algorithm = _ALGORITHM_HS256
        else:
            assert public_key is not None
            self._key, self.algorithm = _public_key(public_key)
        self.leeway = leeway
        self._audience = audience
        self._issuer = issuer
        required = ["exp", "sub"]
        if audience is not None:
            required.append("aud")
        if issuer is not None:
            required.append("iss")
        self._options: Any = {"require": required}

    def __repr__(self) -> str:  # never the key
        return f"<TokenVerifier {self.algorithm}>"

    def verify(self, token: str | None) -> Identity:
        """The identity in a valid token, or ``AuthError``; never anything else, whatever
        the input. None or an empty token is ``auth_required``."""
        if not token:
            raise AuthError(AuthCode.AUTH_REQUIRED, "this server needs a token to let you in")
        if len(token) > MAX_TOKEN_BYTES or not _COMPACT_JWS.fullmatch(token):
            raise AuthError(AuthCode.TOKEN_INVALID, "the token is malformed (not a JWT)")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                options=self._options,
                leeway=self.leeway,
                audience=self._audience,
                issuer=self._issuer,
            )
        except jwt.InvalidTokenError as exc:
            raise _refusal(exc, self.algorithm) from None
        except (ValueError, TypeError, OverflowError):  # odd JSON inside a well-formed shell
            raise AuthError(AuthCode.TOKEN_INVALID, "the token is malformed") from None
        return _identity(claims)


def mint_token(
    secret: str,
    name: str,
    ttl_seconds: float,
    channels: list[str] | None = None,
    *,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token for ``name``, valid for ``ttl_seconds`` (``broadcast-cli token``).

    The name and channels are checked here as the gateway will check them, so an operator
    learns of a typo now rather than from a refused client. ``now`` (Unix time) is for tests.
    """
    key = _hs256_secret(secret)
    if not ttl_seconds > 0 or not math.isfinite(ttl_seconds):
        raise ValueError("a token needs a positive, finite lifetime")
    if channels is not None and not channels:
        raise ValueError("a token must allow at least one channel (or leave channels out)")
    try:
        check_name(name)
        for channel in channels or []:
            check_channel(channel)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": name,
        "iat": int(issued),
        "exp": math.ceil(issued + ttl_seconds),
    }
    if channels is not None:
        claims["channels"] = sorted(set(channels))
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=_ALGORITHM_HS256)


# -- keys ------------------------------------------------------------------------------------


def _hs256_secret(secret: str) -> bytes:
    key = secret.encode("utf-8")
    if b"-----BEGIN" in key:
        raise ValueError("that is a PEM key, not a shared secret: give it as the public key")
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key


def _public_key(pem: str) -> tuple[Any, str]:
    """The key object and the one algorithm it is for."""
    try:
        key = load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError):
        raise ValueError(
            "not a PEM public key (-----BEGIN PUBLIC KEY-----); a private key stays with "
            "whoever mints tokens"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key must have at least {MIN_RSA_BITS} bits")
        return key, _ALGORITHM_RS256
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("ES256 needs a P-256 (secp256r1) key")
        return key, _ALGORITHM_ES256
    raise ValueError("the public key must be RSA (RS256) or EC P-256 (ES256)")


# -- claims ----------------------------------------------------------------------------------


def _identity(claims: dict[str, Any]) -> Identity:
    try:
        name = check_name(claims.get("sub"))
    except ProtocolError as exc:
        raise AuthError(
            AuthCode.TOKEN_INVALID, f"the token's sub is not a name: {exc.message}"
        ) from None
    exp = claims.get("exp")
    try:  # float() of a 400-digit exp overflows; NaN and infinity are not times either
        expires_at = (
            float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        )
    except OverflowError:
        expires_at = None
    if expires_at is None or not math.isfinite(expires_at):
        raise AuthError(AuthCode.TOKEN_INVALID, "the token's exp is not a number of seconds")
    return Identity(name, _channels(claims), expires_at)


def _channels(claims: dict[str, Any]) -> frozenset[str] | None:
    if "channels" not in claims:
        return None
    channels = claims["channels"]
    # A string would iterate as letters and null is ambiguous: refuse both, fail closed.
    if not isinstance(channels, list):
        raise AuthError(AuthCode.TOKEN_INVALID, "the token's channels claim is not a list")
    # An empty list would let the client in to nowhere: refused here, before the handshake is
    # accepted, so it gets a 401 rather than a connection that can do nothing.
    if not channels:
        raise AuthError(AuthCode.TOKEN_INVALID, "the token allows no channel (channels is [])")
    try:
        return frozenset(check_channel(channel) for channel in channels)
    except ProtocolError as exc:
        raise AuthError(
            AuthCode.TOKEN_INVALID, f"the token's channels claim is not valid: {exc.message}"
        ) from None


def _refusal(exc: jwt.InvalidTokenError, algorithm: str) -> AuthError:
    """Our own words for PyJWT's errors: stable, and free of anything taken from the token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return AuthError(AuthCode.TOKEN_EXPIRED, "the token has expired; get a new one")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        message = f"the token is not signed with {algorithm}, the only algorithm accepted here"
    elif isinstance(exc, jwt.InvalidSignatureError):
        message = "the token's signature does not match: it was not made with this key"
    elif isinstance(exc, jwt.MissingRequiredClaimError):
        message = f"the token has no {exc.claim} claim"
    elif isinstance(exc, jwt.ImmatureSignatureError):
        message = "the token is not valid yet (nbf or iat in the future)"
    elif isinstance(exc, jwt.InvalidAudienceError):
        message = "the token is meant for another service (aud)"
    elif isinstance(exc, jwt.InvalidIssuerError):
        message = "the token comes from an issuer this server does not trust (iss)"
    elif isinstance(exc, jwt.DecodeError):
        message = "the token is malformed"
    else:
        message = "the token is not valid"
    return AuthError(AuthCode.TOKEN_INVALID, message)
