"""The security building blocks (broadcast.security), each on its own.

Rules: pure and fast. Keys and certificates are made in the test (cryptography, trustme);
clocks are injected, so nothing waits for time to pass; the only network is 127.0.0.1 on
port 0, for TLS and plain clients sharing one port. Every wait is bounded by ``fail_after``.
The gateway's use of these pieces is tested with real connections elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from broadcast.security import (
    TOKEN_LEEWAY_SECONDS,
    AddressLimit,
    AuthCode,
    AuthError,
    Identity,
    OriginPolicy,
    PrefixedStream,
    SecretFilter,
    TokenBucket,
    TokenVerifier,
    address_key,
    client_ssl_context,
    could_be_tls,
    looks_like_tls,
    mint_token,
    parse_auth_line,
    redact_text,
    redact_url,
    server_ssl_context,
    token_from_request,
)

WAIT_SECONDS = 10
SECRET = "correct-horse-battery-staple-0123456789"  # 39 bytes: over the 32-byte minimum


# -- keys and tokens made here ----------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    algorithm: str
    private_pem: str
    public_pem: str


def _pems(private_key: Any) -> tuple[str, str]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.fixture(scope="module")
def rsa_keys() -> KeyPair:
    return KeyPair("RS256", *_pems(rsa.generate_private_key(public_exponent=65537, key_size=2048)))


@pytest.fixture(scope="module")
def ec_keys() -> KeyPair:
    return KeyPair("ES256", *_pems(ec.generate_private_key(ec.SECP256R1())))


def _claims(name: object = "alice", ttl: float = 86400, **extra: Any) -> dict[str, Any]:
    """Claims made when the tests are collected: a day of validity outlives the whole suite."""
    now = int(time.time())
    return {"sub": name, "iat": now, "exp": now + ttl, **extra}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _handmade(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    """A JWS built by hand, for the tokens PyJWT refuses to make (that is the point)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _refused(verifier: TokenVerifier, token: str | None) -> AuthError:
    with pytest.raises(AuthError) as error:
        verifier.verify(token)
    assert not token or token not in str(error.value)  # never echoed back
    return error.value


@pytest.fixture
def hs_verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET)


# -- tokens: what is accepted -----------------------------------------------------------------


def test_a_minted_token_verifies_to_its_name_and_expiry(hs_verifier: TokenVerifier) -> None:
    before = time.time()
    identity = hs_verifier.verify(mint_token(SECRET, "alice", 3600))
    assert identity.name == "alice"
    assert identity.channels is None
    assert identity.expires_at is not None
    assert before + 3599 <= identity.expires_at <= time.time() + 3601
    assert identity.allows("general") and identity.allows("anything")


@pytest.mark.parametrize("keys", ["rsa_keys", "ec_keys"])
def test_tokens_signed_with_the_private_key_verify_with_the_public_key(
    keys: str, request: pytest.FixtureRequest
) -> None:
    pair: KeyPair = request.getfixturevalue(keys)
    verifier = TokenVerifier(public_key=pair.public_pem)
    assert verifier.algorithm == pair.algorithm
    token = jwt.encode(_claims("zoë", channels=["ops"]), pair.private_pem, algorithm=pair.algorithm)
    identity = verifier.verify(token)
    assert identity == Identity("zoë", frozenset({"ops"}), identity.expires_at)


def test_a_token_just_past_its_expiry_is_accepted_within_the_leeway(
    hs_verifier: TokenVerifier,
) -> None:
    token = jwt.encode(_claims(exp=int(time.time()) - 3), SECRET, algorithm="HS256")
    identity = hs_verifier.verify(token)
    assert identity.expires_at is not None
    # ...and a live connection on it still has the rest of the leeway, not zero.
    assert 0 < identity.seconds_left(time.time()) <= TOKEN_LEEWAY_SECONDS


def test_audience_and_issuer_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="broadcast", issuer="ops")
    good = mint_token(SECRET, "alice", 60, audience="broadcast", issuer="ops")
    assert verifier.verify(good).name == "alice"
    for token in (
        mint_token(SECRET, "alice", 60),
        mint_token(SECRET, "alice", 60, audience="billing", issuer="ops"),
        mint_token(SECRET, "alice", 60, audience="broadcast", issuer="someone"),
    ):
        assert _refused(verifier, token).code is AuthCode.TOKEN_INVALID
    # A token for another service is refused by a verifier that names no audience, too.
    plain = TokenVerifier(secret=SECRET)
    assert _refused(plain, mint_token(SECRET, "a", 60, audience="billing")).code == "token_invalid"


# -- tokens: what is refused, and with which code --------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_is_auth_required(hs_verifier: TokenVerifier, token: str | None) -> None:
    error = _refused(hs_verifier, token)
    assert error.code is AuthCode.AUTH_REQUIRED
    assert error.closes_connection and error.http_status == 401 and error.close_code == 4001


def test_an_expired_token_is_token_expired(hs_verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, "alice", 60, now=time.time() - 3600)
    error = _refused(hs_verifier, token)
    assert error.code is AuthCode.TOKEN_EXPIRED and error.closes_connection


def test_an_expired_token_with_a_forged_signature_is_invalid_not_expired() -> None:
    token = mint_token("another-secret-of-more-than-32-bytes!", "a", 60, now=time.time() - 3600)
    assert _refused(TokenVerifier(secret=SECRET), token).code is AuthCode.TOKEN_INVALID


def test_forged_signatures_are_invalid(hs_verifier: TokenVerifier) -> None:
    other = mint_token("another-secret-of-more-than-32-bytes!", "alice", 60)
    assert "signature" in _refused(hs_verifier, other).message
    # A real token whose payload was swapped for another name.
    header, _, signature = mint_token(SECRET, "alice", 60).split(".")
    payload = _b64(json.dumps(_claims("mallory")).encode())
    assert _refused(hs_verifier, f"{header}.{payload}.{signature}").code is AuthCode.TOKEN_INVALID


def test_an_rs_verifier_refuses_an_hs256_token_signed_with_its_public_key(
    rsa_keys: KeyPair,
) -> None:
    """The algorithm-confusion attack: the public key is public, so anyone can do this."""
    verifier = TokenVerifier(public_key=rsa_keys.public_pem)
    forged = _handmade(
        {"alg": "HS256", "typ": "JWT"},
        _claims("admin"),
        lambda data: hmac.new(rsa_keys.public_pem.encode(), data, hashlib.sha256).digest(),
    )
    error = _refused(verifier, forged)
    assert error.code is AuthCode.TOKEN_INVALID
    assert "RS256" in error.message


@pytest.mark.parametrize("keys", [None, "rsa_keys", "ec_keys"])
def test_alg_none_is_refused(keys: str | None, request: pytest.FixtureRequest) -> None:
    if keys is None:
        verifier = TokenVerifier(secret=SECRET)
    else:
        verifier = TokenVerifier(public_key=request.getfixturevalue(keys).public_pem)
    for alg in ("none", "None", "NONE"):
        unsigned = _handmade({"alg": alg, "typ": "JWT"}, _claims("admin"), lambda data: b"")
        assert _refused(verifier, unsigned).code is AuthCode.TOKEN_INVALID


def test_a_token_signed_with_another_algorithm_is_refused(
    rsa_keys: KeyPair, ec_keys: KeyPair
) -> None:
    rs_token = jwt.encode(_claims(), rsa_keys.private_pem, algorithm="RS256")
    es_token = jwt.encode(_claims(), ec_keys.private_pem, algorithm="ES256")
    rs512 = jwt.encode(_claims(), rsa_keys.private_pem, algorithm="RS512")
    rs = TokenVerifier(public_key=rsa_keys.public_pem)
    es = TokenVerifier(public_key=ec_keys.public_pem)
    hs = TokenVerifier(secret=SECRET)
    for verifier, token in [(hs, rs_token), (rs, es_token), (es, rs_token), (rs, rs512)]:
        assert _refused(verifier, token).code is AuthCode.TOKEN_INVALID


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        ({"exp": int(time.time()) + 60}, "sub"),
        ({"sub": "alice"}, "exp"),
        (_claims(name="bell\x07"), "sub"),
        (_claims(name=""), "sub"),
        (_claims(name=" alice"), "sub"),
        (_claims(name="x" * 33), "sub"),
        (_claims(name=42), ""),
        (_claims(exp="soon"), ""),
        (_claims(exp=1e400), ""),
        (_claims(channels=["general", "no spaces"]), "channels"),
        (_claims(channels=["general", 7]), "channels"),
        (_claims(channels="general"), "channels"),
        (_claims(channels=None), "channels"),
        (_claims(nbf=int(time.time()) + 3600), "not valid yet"),
    ],
)
def test_bad_claims_are_invalid(
    hs_verifier: TokenVerifier, claims: dict[str, Any], words: str
) -> None:
    token = _handmade(
        {"alg": "HS256", "typ": "JWT"},
        claims,
        lambda data: hmac.new(SECRET.encode(), data, hashlib.sha256).digest(),
    )
    error = _refused(hs_verifier, token)
    assert error.code is AuthCode.TOKEN_INVALID
    assert words in error.message
    assert "\x07" not in error.message


@pytest.mark.parametrize(
    "token", ["not a token", "a.b", "a.b.c.d.e", "Bearer x.y.z", "x" * 5000 + ".e.e", "é.é.é"]
)
def test_malformed_tokens_are_invalid(hs_verifier: TokenVerifier, token: str) -> None:
    assert _refused(hs_verifier, token).code is AuthCode.TOKEN_INVALID


@given(
    token=st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_-]{1,40}(\.[A-Za-z0-9_-]{0,40}){2}")
)
def test_verify_raises_only_auth_errors_whatever_it_is_given(token: str) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(secret=SECRET).verify(token)


# -- identity: channels and expiry ------------------------------------------------------------


def test_the_channel_claim_limits_where_a_client_may_go(hs_verifier: TokenVerifier) -> None:
    identity = hs_verifier.verify(mint_token(SECRET, "bob", 60, channels=["ops", "general"]))
    assert identity.channels == frozenset({"ops", "general"})
    assert identity.check_channel("ops") == "ops"
    assert not identity.allows("random")
    with pytest.raises(AuthError) as error:
        identity.check_channel("random")
    assert error.value.code is AuthCode.CHANNEL_FORBIDDEN
    assert "#random" in error.value.message
    assert not error.value.closes_connection
    assert error.value.http_status == 403 and error.value.close_code == 4003
    with pytest.raises(AuthError) as error:
        identity.check_channel("evil\x1b[31m")
    assert "\x1b" not in error.value.message


def test_pick_channel_prefers_the_default_then_the_first_allowed() -> None:
    assert Identity("a", None, None).pick_channel("general") == "general"
    assert Identity("a", frozenset({"zeta", "ops"}), None).pick_channel("general") == "ops"
    assert Identity("a", frozenset({"general", "ops"}), None).pick_channel("general") == "general"
    with pytest.raises(AuthError) as error:
        Identity("a", frozenset(), None).pick_channel("general")
    assert error.value.code is AuthCode.CHANNEL_FORBIDDEN


def test_seconds_left_counts_down_to_zero_and_never_below() -> None:
    identity = Identity("a", None, 1000.0)
    assert identity.seconds_left(900.0, leeway=0) == 100.0
    assert identity.seconds_left(900.0) == 100.0 + TOKEN_LEEWAY_SECONDS
    assert identity.seconds_left(5000.0) == 0.0
    assert Identity("a", None, None).seconds_left(5000.0) == math.inf


# -- tokens: configuration mistakes fail at start ---------------------------------------------


def test_verifier_configuration_mistakes_are_value_errors(rsa_keys: KeyPair) -> None:
    weak_rsa = _pems(rsa.generate_private_key(public_exponent=65537, key_size=1024))[1]
    p384 = _pems(ec.generate_private_key(ec.SECP384R1()))[1]
    for arguments in [
        {},
        {"secret": SECRET, "public_key": rsa_keys.public_pem},
        {"secret": "short"},
        {"secret": rsa_keys.public_pem},
        {"public_key": "not a key"},
        {"public_key": rsa_keys.private_pem},
        {"public_key": weak_rsa},
        {"public_key": p384},
    ]:
        with pytest.raises(ValueError):
            TokenVerifier(**arguments)


def test_the_verifier_does_not_show_its_key() -> None:
    verifier = TokenVerifier(secret=SECRET)
    assert SECRET not in repr(verifier) and SECRET not in str(verifier)


@pytest.mark.parametrize(
    ("name", "ttl", "channels"),
    [("bad\nname", 60, None), ("alice", 0, None), ("alice", math.inf, None), ("a", 60, ["a b"])],
)
def test_mint_token_checks_what_the_gateway_will(
    name: str, ttl: float, channels: list[str] | None
) -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, name, ttl, channels)


# -- where tokens come from ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "target", "expected"),
    [
        ([(b"authorization", b"Bearer abc.def.ghi")], b"/", "abc.def.ghi"),
        ([(b"Authorization", b"bearer   abc.def.ghi  ")], b"/", "abc.def.ghi"),
        ([(b"AUTHORIZATION", b"BEARER abc")], b"/", "abc"),
        ([], b"/?token=abc.def.ghi&name=alice", "abc.def.ghi"),
        ([], b"/?name=alice&token=%61bc", "abc"),
        ([], b"/?token=first&token=second", "second"),
        ([], b"/?name=alice#token=frag", None),
        ([], b"/?token=", None),
        ([], b"/", None),
        ([(b"authorization", b"Bearer header")], b"/?token=query", "header"),
        ([(b"authorization", b"Basic dXNlcjpwYXNz")], b"/?token=query", "query"),
        ([(b"authorization", b"Bearer ")], b"/?token=query", "query"),
        ([(b"authorization", b"Bearer")], b"/", None),
        ([(b"x-authorization", b"Bearer nope")], b"/", None),
    ],
)
def test_token_from_request(
    headers: list[tuple[bytes, bytes]], target: bytes, expected: str | None
) -> None:
    assert token_from_request(headers, target) == expected


@given(
    headers=st.lists(
        st.tuples(st.sampled_from([b"authorization", b"host"]) | st.binary(), st.binary())
    ),
    target=st.binary(),
)
def test_token_from_request_never_raises(headers: list[tuple[bytes, bytes]], target: bytes) -> None:
    token = token_from_request(headers, target)
    assert token is None or (isinstance(token, str) and token)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/auth abc.def.ghi", "abc.def.ghi"),
        ("  /auth   abc.def.ghi  ", "abc.def.ghi"),
        ("/auth", None),
        ("/auth   ", None),
        ("/authx abc", None),
        ("/name alice", None),
        ("hello everyone", None),
        ("", None),
    ],
)
def test_parse_auth_line(line: str, expected: str | None) -> None:
    assert parse_auth_line(line) == expected


# -- token bucket -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_through_then_refusal_until_tokens_come_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=5, clock=clock)
    assert [bucket.try_take() for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.retry_after() == pytest.approx(0.5)
    clock.now += 0.25
    assert not bucket.try_take()
    assert bucket.retry_after() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.try_take() and not bucket.try_take()
    clock.now += 1.0
    assert bucket.try_take(2) and not bucket.try_take()


def test_the_bucket_never_holds_more_than_its_burst_nor_less_than_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    clock.now += 3600
    assert bucket.available == 3
    assert bucket.try_take(3)
    for _ in range(100):
        assert not bucket.try_take()
    assert bucket.available == 0
    assert not bucket.try_take(2)  # a refusal takes nothing...
    clock.now += 0.1
    assert bucket.available == pytest.approx(1.0)  # ...so tokens come back at the rate
    assert bucket.retry_after(4) == math.inf and bucket.retry_after(0) == 0


def test_a_clock_stepping_back_neither_drains_nor_fills_the_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    assert bucket.try_take()
    clock.now -= 100
    assert bucket.available == pytest.approx(1.0)
    clock.now += 100.5  # half a second past where it was
    assert bucket.available == pytest.approx(1.5)


@given(steps=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 4)), max_size=60))
def test_a_bucket_never_gives_more_than_its_burst_plus_its_rate(
    steps: list[tuple[float, int]],
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=3.0, burst=4, clock=clock)
    taken, elapsed = 0, 0.0
    for advance, n in steps:
        clock.now += advance
        elapsed += advance
        if bucket.try_take(n):
            taken += n
        assert 0 <= bucket.available <= 4
    assert taken <= 4 + 3.0 * elapsed + 1e-6


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (1, 0)])
def test_a_bucket_that_could_never_work_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, FakeClock())


# -- connections per address --------------------------------------------------------------------


def test_connections_are_counted_per_address_and_forgotten_when_closed() -> None:
    limit = AddressLimit(2)
    assert limit.try_acquire("203.0.113.7") and limit.try_acquire("203.0.113.7")
    assert not limit.try_acquire("203.0.113.7")
    assert limit.try_acquire("203.0.113.8")
    limit.release("203.0.113.7")
    assert limit.try_acquire("203.0.113.7")
    for _ in range(2):
        limit.release("203.0.113.7")
    limit.release("203.0.113.8")
    assert len(limit) == 0 and limit.count("203.0.113.7") == 0


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"),  # one /64: one subscriber
        ("::ffff:198.51.100.4", "198.51.100.4"),  # a dual-stack socket's view of IPv4
        ("fe80::1%eth0", "fe80::2"),
    ],
)
def test_addresses_of_one_host_count_together(a: str, b: str) -> None:
    assert address_key(a) == address_key(b)
    limit = AddressLimit(1)
    assert limit.try_acquire(a) and not limit.try_acquire(b)


def test_different_hosts_count_apart() -> None:
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("198.51.100.4") != address_key("198.51.100.5")
    assert address_key("/run/broadcast.sock") == "/run/broadcast.sock"


# -- origins ------------------------------------------------------------------------------------

_HOST = b"127.0.0.1:12345"


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, _HOST, True),  # not a browser: the CLI, nc, websocat
        (b"", _HOST, True),
        (b"http://127.0.0.1:12345", _HOST, True),  # the gateway's own web page
        (b"http://127.0.0.1:12345/", _HOST, True),
        (b"https://evil.example", _HOST, False),  # cross-site WebSocket hijacking
        (b"http://localhost:12345", _HOST, False),
        (b"http://127.0.0.1:12346", _HOST, False),
        (b"http://127.0.0.1", _HOST, False),
        (b"https://chat.example.com", b"chat.example.com", True),
        (b"https://chat.example.com", b"chat.example.com:443", True),
        (b"https://chat.example.com:443", b"chat.example.com", True),
        (b"http://chat.example.com", b"chat.example.com:443", False),
        (b"https://CHAT.Example.com", b"chat.example.COM", True),
        (b"http://[::1]:8080", b"[::1]:8080", True),
        (b"http://[::1]:8080", b"[::2]:8080", False),
        (b"null", _HOST, False),  # sandboxed frames and file:// pages
        (b"http://127.0.0.1:12345", None, False),
        (b"http://127.0.0.1:12345", b"", False),
        (b"http://127.0.0.1:12345", b"evil@127.0.0.1:12345", False),
        (b"http://127.0.0.1:12345, https://evil.example", _HOST, False),
        (b"http://user@127.0.0.1:12345", _HOST, False),
        (b"http://127.0.0.1:12345/path", _HOST, False),
        (b"http://127.0.0.1:99999", b"127.0.0.1:99999", False),
        (b"http://\xff:1", b"\xff:1", False),
    ],
)
def test_without_an_allow_list_only_the_same_origin_may_connect(
    origin: bytes | None, host: bytes | None, allowed: bool
) -> None:
    """Same-origin, for a Host the operator named (here chat.example.com) or loopback."""
    public = OriginPolicy(public_hosts=["chat.example.com"])
    assert public.allows(origin, host) is allowed
    assert OriginPolicy([], public_hosts=["CHAT.example.com"]).allows(origin, host) is allowed


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        (b"http://rebind.evil.example:12345", b"rebind.evil.example:12345"),
        (b"https://chat.example.com", b"chat.example.com"),  # not named by the operator
        (b"http://192.168.1.5:12345", b"192.168.1.5:12345"),
        (b"http://127.0.0.1.nip.io:12345", b"127.0.0.1.nip.io:12345"),
    ],
)
def test_a_rebinding_page_cannot_pass_the_default_origin_check(origin: bytes, host: bytes) -> None:
    """DNS rebinding makes Origin and Host agree on a name that resolves to us: without an
    allow-list, only loopback Hosts and --public-host names are trusted."""
    assert not OriginPolicy().allows(origin, host)


@pytest.mark.parametrize(
    "host", [b"localhost:12345", b"127.0.0.1:12345", b"127.9.9.9:12345", b"[::1]:12345"]
)
def test_loopback_hosts_are_trusted_without_configuration(host: bytes) -> None:
    assert OriginPolicy().allows(b"http://" + host, host)


_ALLOWED = ["https://chat.example.com", "http://localhost:8080", "https://*.example.org"]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        (b"https://chat.example.com", True),
        (b"https://chat.example.com:443", True),
        (b"https://CHAT.EXAMPLE.COM", True),
        (b"http://chat.example.com", False),
        (b"https://chat.example.com:8443", False),
        (b"https://chat.example.com.evil.example", False),
        (b"https://evilchat.example.com", False),
        (b"https://example.com", False),
        (b"http://localhost:8080", True),
        (b"http://localhost", False),
        (b"https://a.example.org", True),
        (b"https://a.b.example.org", True),
        (b"https://example.org", False),  # a wildcard is for subdomains only
        (b"https://evilexample.org", False),
        (b"https://a.example.org.evil.example", False),
        (b"http://a.example.org", False),
        (b"https://a.example.org:8443", False),
        (b"http://127.0.0.1:12345", False),  # an allow-list replaces same-origin
        (b"null", False),
    ],
)
def test_with_an_allow_list_an_origin_must_match_an_entry(
    origin: bytes | None, allowed: bool
) -> None:
    assert OriginPolicy(_ALLOWED).allows(origin, _HOST) is allowed


def test_a_star_entry_allows_every_origin() -> None:
    policy = OriginPolicy(["*"])
    assert policy.allows(b"https://evil.example", _HOST)
    assert policy.allows(b"null", _HOST)


@pytest.mark.parametrize(
    "entry",
    [
        "chat.example.com",  # no scheme: say https:// or http://
        "*.example.com",
        "https://",
        "https://*",
        "https://a.*.example.com",
        "https://chat.example.com/path",
        "https://chat.example.com?x=1",
        "https://user@chat.example.com",
        "https://chat.example.com:99999",
    ],
)
def test_a_malformed_allow_list_entry_fails_at_start(entry: str) -> None:
    with pytest.raises(ValueError):
        OriginPolicy([entry])


@given(origin=st.binary() | st.none(), host=st.binary() | st.none())
def test_origin_policy_never_raises(origin: bytes | None, host: bytes | None) -> None:
    for policy in (OriginPolicy(), OriginPolicy(_ALLOWED)):
        assert isinstance(policy.allows(origin, host), bool)


# -- TLS: telling it apart on a shared port ----------------------------------------------------


def _client_hello(maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> bytes:
    """The first bytes a real TLS client sends, made without any network."""
    context = ssl.create_default_context()
    context.maximum_version = maximum
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED])
def test_a_client_hello_looks_like_tls(maximum: ssl.TLSVersion) -> None:
    hello = _client_hello(maximum)
    assert looks_like_tls(hello)
    assert looks_like_tls(hello[:3]) and looks_like_tls(hello[:16])
    assert not looks_like_tls(hello[:2]) and could_be_tls(hello[:2]) and could_be_tls(hello[:1])


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\n",
        b"GET /?token=x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"hello everyone\n",
        b"/auth eyJhbGciOiJIUzI1NiJ9.e30.x\n",
        b"",
        b"\x16\x03\x07\x00\x05\x01",  # no such version
        b"\x16\x03\x01\x00\x05\x02",  # a ServerHello is not a client's first message
        b"\x16\x02\x01",
    ],
)
def test_http_and_text_do_not_look_like_tls(first: bytes) -> None:
    assert not looks_like_tls(first)
    assert not could_be_tls(first) or len(first) < 3


@given(first=st.binary())
def test_looks_like_tls_only_for_a_handshake_record(first: bytes) -> None:
    if looks_like_tls(first):
        assert first[0] == 0x16 and first[1] == 0x03
    if not first.startswith(b"\x16"):
        assert not looks_like_tls(first) and not could_be_tls(first)


@given(text=st.text())
def test_typed_text_never_looks_like_tls(text: str) -> None:
    line = text.replace("\x16", "") + "\n"
    assert not looks_like_tls(line.encode())


async def test_prefixed_stream_gives_back_the_sniffed_bytes_first() -> None:
    left, right = trio.testing.memory_stream_pair()
    stream = PrefixedStream(b"abcdef", right)
    await left.send_all(b"ghi")
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some(100) == b"ef"
    assert await stream.receive_some(100) == b"ghi"
    await stream.send_all(b"out")
    assert await left.receive_some(100) == b"out"
    await stream.aclose()
    assert await left.receive_some(100) == b""


# -- TLS: contexts, end to end -------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    cert_file: str
    key_file: str
    ca_file: str
    other_ca_file: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder: Path = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(folder / "cert.pem"), append=True)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return Pki(*(str(folder / f) for f in ("cert.pem", "key.pem", "ca.pem", "other-ca.pem")))


async def _handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[trio.SSLStream[Any], trio.SSLStream[Any]]:
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_context, server_side=True)
    client = trio.SSLStream(client_raw, client_context, server_hostname=hostname)

    async def serve() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the client gave up; it says why
            await server.do_handshake()

    with trio.fail_after(WAIT_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                await client.do_handshake()
            except trio.BrokenResourceError as exc:
                failure = exc  # raised below, outside the nursery's exception group
                nursery.cancel_scope.cancel()
            else:
                failure = None  # and the nursery waits for the server's side to finish
    if failure is not None:
        raise failure
    return client, server


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_works_end_to_end_with_the_right_ca(pki: Pki, version: ssl.TLSVersion) -> None:
    server_context = server_ssl_context(pki.cert_file, pki.key_file)
    client_context = client_ssl_context(pki.ca_file, alpn_protocols=["http/1.1"])
    client_context.maximum_version = version
    client, server = await _handshake(server_context, client_context)
    with trio.fail_after(WAIT_SECONDS):
        await client.send_all(b"hello over tls\n")
        assert await server.receive_some(100) == b"hello over tls\n"
        await server.send_all(b"welcome\n")
        assert await client.receive_some(100) == b"welcome\n"
    assert client.selected_alpn_protocol() == "http/1.1"
    assert client.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2"}.get(version, "TLSv1.3")


@pytest.mark.parametrize("case", ["another CA", "the wrong host name"])
async def test_tls_verification_fails_against_another_ca_or_name(pki: Pki, case: str) -> None:
    server_context = server_ssl_context(pki.cert_file, pki.key_file)
    if case == "another CA":
        client_context, hostname = client_ssl_context(pki.other_ca_file), "localhost"
    else:
        client_context, hostname = client_ssl_context(pki.ca_file), "chat.example.com"
    with pytest.raises(trio.BrokenResourceError) as error:
        await _handshake(server_context, client_context, hostname)
    assert isinstance(error.value.__cause__, ssl.SSLCertVerificationError)


def test_tls_contexts_refuse_old_versions_and_verify(pki: Pki) -> None:
    server = server_ssl_context(pki.cert_file, pki.key_file)
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server.options & ssl.OP_NO_COMPRESSION
    for client in (client_ssl_context(None), client_ssl_context(pki.ca_file)):
        assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert client.verify_mode is ssl.CERT_REQUIRED and client.check_hostname


def test_a_key_that_does_not_match_its_certificate_fails_at_start(pki: Pki, tmp_path: Path) -> None:
    stranger = trustme.CA().issue_cert("localhost")
    stranger.private_key_pem.write_to_path(str(tmp_path / "stranger.pem"))
    with pytest.raises(ValueError):
        server_ssl_context(pki.cert_file, str(tmp_path / "stranger.pem"))


async def test_tls_and_plain_clients_share_one_port(pki: Pki) -> None:
    """The gateway's pattern, on a real socket: sniff, then wrap the sniffed bytes and all."""
    server_context = server_ssl_context(pki.cert_file, pki.key_file)

    async def handle(stream: trio.SocketStream) -> None:
        initial = await stream.receive_some(16)
        wire: trio.abc.Stream = stream
        kind = b"plain"
        if looks_like_tls(initial):
            wire = trio.SSLStream(PrefixedStream(initial, stream), server_context, server_side=True)
            initial, kind = b"", b"tls"
        data = initial
        while not data.endswith(b"\n"):
            data += await wire.receive_some(100)
        await wire.send_all(kind + b":" + data)
        await wire.aclose()

    with trio.fail_after(WAIT_SECONDS):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            plain = await trio.open_tcp_stream("127.0.0.1", port)
            await plain.send_all(b"hello\n")
            assert await _read_all(plain) == b"plain:hello\n"
            secure = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=client_ssl_context(pki.ca_file)
            )
            await secure.send_all(b"hello\n")
            assert await _read_all(secure) == b"tls:hello\n"
            nursery.cancel_scope.cancel()


async def _read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(100):
            data += chunk
    except trio.BrokenResourceError:  # a TLS peer that closed without close_notify
        pass
    await stream.aclose()
    return data


# -- redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://app:hunter2@redis:6379/0", "redis://app:***@redis:6379/0"),
        ("rediss://:hunter2@redis.internal", "rediss://:***@redis.internal"),
        ("rediss://app:p%40ss@redis:6380", "rediss://app:***@redis:6380"),
        ("redis://app:p@ss@redis/0", "redis://app:***@redis/0"),  # an unescaped @
        ("redis://app:pa/ss@redis/0", "redis://app:***@redis/0"),  # unparseable: masked whole
        ("redis://app:pa#ss@redis", "redis://app:***@redis"),
        ("redis://redis:6379/0?password=hunter2&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("ws://h/?name=alice&token=abc.def.ghi", "ws://h/?name=alice&token=***"),
        ("redis://app@redis:6379", "redis://app@redis:6379"),  # nothing secret
        ("redis://redis/0?to=a@b", "redis://redis/0?to=a@b"),
        ("redis://redis:6379/0?to=a@b", "redis://redis:***@b"),  # ambiguous: hide too much
        ("redis://app:12/x@redis/0", "redis://app:***@redis/0"),  # looks like port 12, is not
        ("redis://redis:6379", "redis://redis:6379"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@given(
    user=st.from_regex(r"[a-z]{0,8}", fullmatch=True),
    password=st.text(min_size=1),
    scheme=st.sampled_from(["redis", "rediss", "https"]),
)
def test_redact_url_never_shows_a_password(user: str, password: str, scheme: str) -> None:
    tail = "redis.internal:6379/0"
    shown = redact_url(f"{scheme}://{user}:{password}@{tail}")
    head = f"{scheme}://{user}:***@"
    assert shown.startswith(head)
    assert tail.endswith(shown[len(head) :])  # what is left comes from after the password


TOKEN_IN_LOGS = mint_token(SECRET, "alice", 60)


@pytest.fixture
def secret_filter(caplog: pytest.LogCaptureFixture) -> Iterator[SecretFilter]:
    """A SecretFilter on caplog's handler, as ``install()`` puts it on the root's handlers."""
    secret_filter = SecretFilter([SECRET, "hunter2", "p@ss"])
    caplog.handler.addFilter(secret_filter)
    caplog.set_level(logging.DEBUG)
    yield secret_filter
    caplog.handler.removeFilter(secret_filter)


def test_secret_filter_keeps_secrets_out_of_captured_logs(
    caplog: pytest.LogCaptureFixture, secret_filter: SecretFilter
) -> None:
    log = logging.getLogger("broadcast.gateway.test_security")
    log.info("bus: %s", "redis://app:hunter2@redis:6379/0")
    log.info("bus: %s", "rediss://app:p%40ss@redis:6380")
    log.info("auth secret %s loaded", SECRET)
    log.warning("handshake GET /?name=alice&token=%s HTTP/1.1", TOKEN_IN_LOGS)
    log.info("headers: %r", [(b"authorization", b"Bearer " + TOKEN_IN_LOGS.encode())])
    log.debug("line 1: /auth %s", "opaque-not-a-jwt")
    log.info("token inside a message: %s!", TOKEN_IN_LOGS)
    try:
        raise ConnectionError(f"AUTH failed for redis://app:hunter2@redis with {SECRET}")
    except ConnectionError:
        log.exception("connection %d failed", 7)
    text = caplog.text + "".join(record.getMessage() for record in caplog.records)
    for secret in (SECRET, "hunter2", "p%40ss", TOKEN_IN_LOGS, "opaque-not-a-jwt"):
        assert secret not in text
    assert "redis://app:***@redis:6379/0" in text  # which user and where, still said
    assert "connection 7 failed" in text and "ConnectionError" in text


def test_secret_filter_install_covers_records_from_child_loggers() -> None:
    root = logging.getLogger("test_security_root")
    root.propagate = False
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    root.addHandler(handler)
    secret_filter = SecretFilter([SECRET])
    try:
        secret_filter.install(root)
        logging.getLogger("test_security_root.child").warning("the secret is %s", SECRET)
        root.warning("and again: %s", SECRET)
    finally:
        root.removeHandler(handler)
        root.removeFilter(secret_filter)
    assert SECRET not in output.getvalue()
    assert output.getvalue().count("***") == 2
    assert SECRET not in repr(secret_filter)


def test_redact_text_leaves_ordinary_text_alone() -> None:
    text = "alice joined #general; 3 clients; bypass=1; GET /healthz"
    assert redact_text(text) == text
