"""Only the right people in: tokens, TLS, origins, and no secret in the logs (docs/security.md).

A real gateway on a real port; certificates from trustme; tokens from PyJWT.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import jwt
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from broadcast.gateway.access import AccessPolicy
from broadcast.gateway.server import Gateway
from broadcast.security import (
    OriginPolicy,
    TokenVerifier,
    client_ssl_context,
    mint_token,
    server_ssl_context,
)
from tests.support.clients import WAIT_SECONDS, LineClient, ws_client
from tests.support.waiting import wait_until

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"
StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(nursery: trio.Nursery) -> AsyncIterator[StartGateway]:
    async def start(**access: object) -> Gateway:
        gateway = Gateway(
            __import__("broadcast.bus", fromlist=["MemoryBus"]).MemoryBus(),
            node_id="gw-secure",
            access=AccessPolicy(**access),  # type: ignore[arg-type]
        )
        await nursery.start(gateway.run)
        await wait_until(lambda: gateway.ready)
        return gateway

    yield start
    nursery.cancel_scope.cancel()


def url(gateway: Gateway, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{gateway.port}/"


async def rejected_status(address: str, **options: object) -> int:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(address, **options):  # type: ignore[arg-type]
            pass
    return rejected.value.status_code


# -- tokens ---------------------------------------------------------------------------------


async def test_token_names_the_client_and_cannot_be_overridden(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET))
    token = mint_token(SECRET, "alice", 60)
    async with ws_client(url(gateway), token=token, name="mallory") as alice:
        assert alice.welcome["name"] == "alice"
        await alice.send_json({"type": "hello", "name": "mallory"})
        error = await alice.expect("error")
        assert error["code"] == "bad_name"
        async with ws_client(url(gateway), token=mint_token(SECRET, "bob", 60)) as bob:
            await alice.publish("signed by alice")
            assert (await bob.expect("message"))["sender"] == "alice"


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: None, b"auth_required"),
        (lambda: mint_token(SECRET, "alice", 60, now=time.time() - 3600), b"token_expired"),
        (
            lambda: mint_token("another-secret-that-is-long-enough-for-hs256", "a", 60),
            b"token_invalid",
        ),
        (
            lambda: jwt.encode({"sub": "a", "exp": time.time() + 60}, key=None, algorithm="none"),
            b"token_invalid",
        ),
        (lambda: "not.a.token", b"token_invalid"),
    ],
)
async def test_bad_tokens_are_refused_in_the_handshake(
    start_gateway: StartGateway, make_token: Callable[[], str | None], reason: bytes
) -> None:
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET))
    token = make_token()
    address = url(gateway) + (f"?token={token}" if token else "")
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(address):
            pass
    assert rejected.value.status_code == 401
    assert rejected.value.body.startswith(reason)
    assert gateway.stats.errors[reason.decode()] == 1


async def test_bearer_header_works_too(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET))
    header = (b"Authorization", b"Bearer " + mint_token(SECRET, "carol", 60).encode())
    async with open_websocket_url(url(gateway), extra_headers=[header]) as ws:
        assert b'"name":"carol"' in (await ws.get_message()).encode()


async def test_channel_claim_limits_where_a_client_may_go(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET))
    token = mint_token(SECRET, "dave", 60, channels=["ops"])
    async with ws_client(url(gateway), token=token, channel="general", history="0") as dave:
        assert dave.welcome["channel"] == "ops"
        assert (await dave.expect("error"))["code"] == "channel_forbidden"
        await dave.send_json({"type": "hello", "channel": "secret"})
        assert (await dave.expect("error"))["code"] == "channel_forbidden"
        await dave.publish("in ops")


async def test_live_connection_ends_when_its_token_expires(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET, leeway=0))
    token = mint_token(SECRET, "erin", 1.5)
    async with open_websocket_url(url(gateway) + f"?token={token}") as ws:
        with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason.code == 4001
    assert "token_expired" in closed.value.reason.reason


async def test_line_client_authenticates_with_its_first_line(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET))
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        nc = LineClient(stream)
        await nc.send_line("/auth " + mint_token(SECRET, "frank", 60))
        assert (await nc.line()).startswith("* welcome to broadcast on gw-secure: you are frank")
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        nc = LineClient(stream)
        await nc.send_line("hello without a token")
        assert (await nc.closed()).startswith(b"! auth_required:")


# -- origins --------------------------------------------------------------------------------


async def test_cross_site_websocket_is_refused(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(origins=OriginPolicy())
    evil = [(b"Origin", b"https://evil.example")]
    assert await rejected_status(url(gateway), extra_headers=evil) == 403
    same = [(b"Origin", f"http://127.0.0.1:{gateway.port}".encode())]
    async with open_websocket_url(url(gateway), extra_headers=same) as ws:
        assert b"welcome" in (await ws.get_message()).encode()
    async with open_websocket_url(url(gateway)) as ws:  # no Origin: not a browser
        assert b"welcome" in (await ws.get_message()).encode()
    assert gateway.stats.errors["forbidden_origin"] == 1


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path: object) -> tuple[str, str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = __import__("pathlib").Path(str(tmp_path))
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return str(directory / "server.pem"), str(directory / "server.pem"), str(directory / "ca.pem")


async def test_tls_serves_wss_and_tls_lines_and_keeps_health_checks_plain(
    start_gateway: StartGateway, certificates: tuple[str, str, str]
) -> None:
    cert, key, ca = certificates
    gateway = await start_gateway(tls=server_ssl_context(cert, key))
    trusted = client_ssl_context(ca)
    async with ws_client(url(gateway, "wss"), ssl_context=trusted, name="secure") as web:
        raw = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        tls_line = trio.SSLStream(raw, client_ssl_context(ca), server_hostname="127.0.0.1")
        async with tls_line:
            nc = LineClient(tls_line)  # type: ignore[arg-type]
            await nc.send_line("")
            assert (await nc.line()).startswith("* welcome")
            await nc.send_line("over TLS")
            assert (await web.expect("message"))["text"] == "over TLS"
    # Plain WebSocket is refused; plain health checks are answered.
    assert await rejected_status(url(gateway)) == 403
    plain = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with plain:
        await plain.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await LineClient(plain).closed()).startswith(b"HTTP/1.1 200")


async def test_tls_against_the_wrong_ca_fails(
    start_gateway: StartGateway, certificates: tuple[str, str, str]
) -> None:
    cert, key, _ = certificates
    gateway = await start_gateway(tls=server_ssl_context(cert, key))
    other_ca = trustme.CA()
    context = ssl.create_default_context()
    other_ca.configure_trust(context)
    # A plain TLS handshake: trio-websocket would report this failure only at its connect timeout.
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", gateway.port, ssl_context=context)
    with trio.fail_after(WAIT_SECONDS), pytest.raises(trio.BrokenResourceError) as broken:
        await stream.do_handshake()
    assert isinstance(broken.value.__cause__, ssl.SSLCertVerificationError)
    await trio.aclose_forcefully(stream)


# -- secrets --------------------------------------------------------------------------------


async def test_no_secret_or_token_in_the_logs(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await start_gateway(verifier=TokenVerifier(secret=SECRET))
    token = mint_token(SECRET, "grace", 60)
    async with ws_client(url(gateway), token=token) as client:
        await client.publish("hi")
    forged = mint_token("another-secret-that-is-long-enough-for-hs256", "x", 60)
    await rejected_status(url(gateway) + f"?token={forged}")
    # The gateway's own logs (a client library may log its own URL; that is the client's business).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("broadcast"))
    assert ours  # the gateway did log the connections
    assert SECRET not in ours
    assert token not in ours and forged not in ours
