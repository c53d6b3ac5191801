"""Property tests of the token verifier: whatever claims a correctly signed token carries, the
verifier gives an ``Identity`` that keeps every promise, or an ``AuthError``; never anything
else. Signing with the test key matters: it takes the tokens past the signature check, to the
claim checks an attacker reaches with a key leaked or tokens minted carelessly."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.validate import check_channel, check_name
from broadcast.security.tokens import AuthCode, AuthError, Identity, TokenVerifier, mint_token

SECRET = "fuzz-secret-that-is-long-enough-0123456789"
NOW = int(time.time())

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**64, 2**1024])
_NUMBERS = st.integers(NOW - 10**6, NOW + 10**6) | st.floats() | st.integers() | _HUGE | _JSON
_NAMES = st.sampled_from(["alice", "zoë", "*root", "a:b", "", "x" * 40]) | st.text(max_size=40)
_CHANNEL_LISTS = (
    st.lists(st.sampled_from(["general", "ops", "a b", "", "é"]) | _JSON, max_size=4) | _JSON
)
_CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "sub": _NAMES | _JSON,
        "exp": _NUMBERS,
        "nbf": _NUMBERS,
        "iat": _NUMBERS,
        "channels": _CHANNEL_LISTS,
        "aud": st.sampled_from(["broadcast", "other"]) | _JSON,
        "iss": st.sampled_from(["ops", "other"]) | _JSON,
        "jti": _JSON,
    },
) | st.dictionaries(st.text(max_size=8), _JSON, max_size=6)
_HEADERS = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "none", "RS256", "HS512"]) | _JSON},
    optional={"typ": _JSON, "kid": _JSON, "crit": _JSON, "b64": _JSON},
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: object, payload: bytes) -> str:
    """A compact JWS over any payload bytes, with a correct HS256 signature."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(payload)
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


_VERIFIERS = [
    TokenVerifier(secret=SECRET),
    TokenVerifier(secret=SECRET, audience="broadcast", issuer="ops"),
]


def _verify_or_refuse(token: str) -> None:
    for verifier in _VERIFIERS:
        try:
            identity = verifier.verify(token)
        except AuthError as error:
            assert isinstance(error.code, AuthCode) and error.message
            assert error.http_status in (401, 403)
            continue
        _assert_keeps_its_promises(identity)


def _assert_keeps_its_promises(identity: Identity) -> None:
    assert check_name(identity.name) == identity.name
    assert identity.expires_at is not None and math.isfinite(identity.expires_at)
    if identity.channels is not None:
        assert identity.channels, "a verified token always allows some channel"
        assert all(check_channel(channel) == channel for channel in identity.channels)


@settings(max_examples=300)
@example(header={"alg": "HS256"}, claims={"sub": "alice", "exp": 10**400})
@example(header={"alg": "HS256"}, claims={"sub": "alice", "exp": NOW + 60, "channels": []})
@given(header=_HEADERS | st.just({"alg": "HS256", "typ": "JWT"}), claims=_CLAIMS)
def test_any_signed_claims_give_an_identity_or_an_auth_error(header: object, claims: Any) -> None:
    _verify_or_refuse(_signed(header, json.dumps(claims).encode()))


@given(payload=st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_any_signed_payload_bytes_give_an_identity_or_an_auth_error(payload: bytes) -> None:
    _verify_or_refuse(_signed({"alg": "HS256", "typ": "JWT"}, payload))


@given(st.text(max_size=300))
def test_any_token_text_gives_an_identity_or_an_auth_error(token: str) -> None:
    _verify_or_refuse(token)


def _claims(**overrides: Any) -> bytes:
    claims = {"sub": "alice", "exp": NOW + 600, **overrides}
    return json.dumps({k: v for k, v in claims.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (_claims(channels=[]), "allows no channel"),
        (_claims(channels=["general", "a b"]), "channels"),
        (_claims(channels=[["general"]]), "channels"),
        (_claims(channels={"general": True}), "channels"),
        (_claims(sub="*root"), "sub"),
        (_claims(sub="evil: * root"), "sub"),
        (_claims(sub=["alice"]), ""),
        (_claims(exp="tomorrow"), ""),
        (_claims(exp=...), "exp"),
        (b'{"sub": "alice", "exp": NaN}', ""),
        (b'{"sub": "alice", "exp": Infinity}', ""),
        (b'{"sub": "alice", "exp": 1' + b"0" * 400 + b"}", ""),
        (b'["sub", "alice"]', ""),
    ],
)
def test_claims_of_the_wrong_kind_are_token_invalid(payload: bytes, words: str) -> None:
    with pytest.raises(AuthError) as refused:
        TokenVerifier(secret=SECRET).verify(_signed({"alg": "HS256"}, payload))
    error = refused.value
    assert error.code is AuthCode.TOKEN_INVALID
    assert error.http_status == 401  # refused before the 101, like any invalid token
    assert words in error.message


def test_mint_refuses_an_empty_channel_list() -> None:
    with pytest.raises(ValueError, match="at least one channel"):
        mint_token(SECRET, "alice", 60, channels=[])
    with pytest.raises(ValueError):
        mint_token(SECRET, "*root", 60)
    identity = TokenVerifier(secret=SECRET).verify(mint_token(SECRET, "alice", 60, ["ops"]))
    assert identity.channels == frozenset({"ops"})


def test_a_name_a_token_may_carry_is_one_a_client_may_choose() -> None:
    """The verifier and the hello use one rule: ``check_name``."""
    for name in ("alice", "Zoë Smith", "guest-3"):
        assert TokenVerifier(secret=SECRET).verify(mint_token(SECRET, name, 60)).name == name
        assert check_name(name) == name
    with pytest.raises(ProtocolError):
        check_name("! admin")
