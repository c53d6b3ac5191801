"""Who may connect and what they may do: tokens, origins, rate limits, TLS, redaction.

Building blocks for the gateway and the CLI, sans I/O where they can be (everything but the
TLS contexts and ``PrefixedStream``). docs/security.md has the threat model they answer.
"""

from broadcast.security.address_limit import AddressLimit, address_key
from broadcast.security.origins import OriginPolicy
from broadcast.security.rate_limit import TokenBucket
from broadcast.security.redact import SecretFilter, redact_text, redact_url
from broadcast.security.tls import (
    PrefixedStream,
    client_ssl_context,
    could_be_tls,
    looks_like_tls,
    server_ssl_context,
)
from broadcast.security.token_sources import parse_auth_line, token_from_request
from broadcast.security.tokens import (
    TOKEN_LEEWAY_SECONDS,
    AuthCode,
    AuthError,
    Identity,
    TokenVerifier,
    mint_token,
)

__all__ = [
    "TOKEN_LEEWAY_SECONDS",
    "AddressLimit",
    "AuthCode",
    "AuthError",
    "Identity",
    "OriginPolicy",
    "PrefixedStream",
    "SecretFilter",
    "TokenBucket",
    "TokenVerifier",
    "address_key",
    "client_ssl_context",
    "could_be_tls",
    "looks_like_tls",
    "mint_token",
    "parse_auth_line",
    "redact_text",
    "redact_url",
    "server_ssl_context",
    "token_from_request",
]
