"""``broadcast-cli`` with tokens and TLS (docs/security.md), as real subprocesses.

The other side is a real gateway started with ``--auth-secret`` or ``--tls-cert/--tls-key``
(certificates from trustme, written to a temporary directory). Only the close 4001 of a token
expiring on a live connection comes from the fake gateway: the real one would make the test
wait out the token's lifetime plus its 10 s leeway. Waits are on output lines and process exits,
under deadlines; a command that retried instead of stopping would hit ``run_cli``'s deadline.
Whatever happens, the token is never printed, by the CLI or in the gateway's log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from broadcast.client.command import (
    UsageError,
    build_parser,
    compose_url,
    main,
    make_target,
    token_from,
)
from broadcast.client.mint import parse_ttl
from broadcast.security import TokenVerifier, mint_token
from tests.support.cli_process import CLI, cli_env, listening, run_cli, running
from tests.support.fake_gateway import FakeGateway
from tests.support.gateway_process import GatewayProcess
from tests.support.pty_terminal import PtyTerminal

SECRET = "a-cli-test-secret-that-is-long-enough-for-hs256"
AUTH = {"BROADCAST_AUTH_SECRET": SECRET}


def no_token_in(token: str, *outputs: bytes | str | list[str]) -> None:
    """The token, whole or as its signature, appears in none of ``outputs``."""
    signature = token.rsplit(".", 1)[1]
    for output in outputs:
        text = output.decode() if isinstance(output, bytes) else str(output)
        assert token not in text and signature not in text


def expired_token(name: str) -> str:
    """Expired an hour ago: far beyond the gateway's 10 s leeway."""
    return mint_token(SECRET, name, 60, now=time.time() - 3600)


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    process = GatewayProcess(node_id="auth", extra=("--auth-secret", SECRET))
    try:
        yield process
    finally:
        process.terminate()


# --- tokens against a real gateway ---------------------------------------------------------


async def test_a_minted_token_sends_under_its_name_to_a_listener_with_its_own(
    gateway: GatewayProcess,
) -> None:
    channel = "cli-auth"
    minted = await run_cli("token", "--name", "alice", "--ttl", "5m", env=AUTH)
    assert minted.returncode == 0, minted.stderr
    assert minted.stderr == b""
    assert minted.stdout.count(b"\n") == 1  # the token alone, one line: TOKEN=$(…)
    alice = minted.stdout.decode().strip()
    ears = mint_token(SECRET, "ears", 300, [channel])

    # The listener has no --name: it is who its token says, and says so.
    in_env = {"BROADCAST_TOKEN": ears}
    async with listening(gateway.url, "--channel", channel, env=in_env) as (out, err):
        assert err.seen[-1] == f"* connected to {gateway.url} as ears in #{channel}"
        sent = await run_cli(
            "send", "--url", gateway.url, "--channel", channel, "--token", alice, "hi"
        )
        assert sent.returncode == 0, sent.stderr
        line = await out.line_containing("hi")
        assert line.endswith("] alice: hi")
    no_token_in(alice, sent.stdout, sent.stderr, out.seen, err.seen)
    no_token_in(ears, out.seen, err.seen)


async def test_send_without_a_token_is_refused_at_once(gateway: GatewayProcess) -> None:
    result = await run_cli("send", "--url", gateway.url, "hi")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "broadcast-cli: refused: auth_required: this server needs a token to let you in\n"
    )
    assert result.stdout == b""


@pytest.mark.parametrize(
    "command", [["send", "hi"], ["listen"], ["connect"]], ids=["send", "listen", "connect"]
)
@pytest.mark.parametrize(
    ("token", "code"),
    [
        (expired_token("alice"), "token_expired"),
        (mint_token("another-secret-that-is-long-enough-for-hs256", "alice", 60), "token_invalid"),
    ],
    ids=["expired", "forged"],
)
async def test_a_refused_token_ends_every_command_with_exit_1_and_no_retry(
    gateway: GatewayProcess, command: list[str], token: str, code: str
) -> None:
    # listen and connect retry network failures for ever: exiting at all shows no retry.
    result = await run_cli(*command, "--url", gateway.url, "--token", token)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith(f"broadcast-cli: refused: {code}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    no_token_in(token, result.stdout, result.stderr)


async def test_connect_on_a_terminal_says_why_after_giving_the_terminal_back(
    gateway: GatewayProcess,
) -> None:
    token = expired_token("alice")
    argv = [*CLI, "connect", "--url", gateway.url]
    terminal = PtyTerminal(argv, env=cli_env({"BROADCAST_TOKEN": token}), rows=24, columns=100)
    try:
        assert await terminal.wait_exit() == 1
    finally:
        terminal.close()
    assert "broadcast-cli: refused: token_expired: the token has expired" in terminal.text()
    assert terminal.last_line().startswith("broadcast-cli: refused")  # below the prompt's line
    no_token_in(token, terminal.text(), bytes(terminal.output))


async def test_the_token_names_the_client_not_the_name_flag(gateway: GatewayProcess) -> None:
    token = mint_token(SECRET, "alice", 60)
    result = await run_cli("send", "--url", gateway.url, "--token", token, "--name", "bob", "hi")
    assert result.returncode == 1
    assert b"welcomed us as alice in #general, not bob" in result.stderr
    assert b"leave out --name" in result.stderr


async def test_a_channel_outside_the_token_is_refused(gateway: GatewayProcess) -> None:
    token = mint_token(SECRET, "alice", 60, ["mine"])
    result = await run_cli(
        "send", "--url", gateway.url, "--token", token, "--channel", "yours", "x"
    )
    assert result.returncode == 1
    assert b"channel_forbidden: your token does not allow #yours" in result.stderr


async def test_the_token_never_reaches_the_gateways_log() -> None:
    process = GatewayProcess(
        node_id="auth-log", extra=("--auth-secret", SECRET, "--log-level", "debug")
    )
    good, stale = mint_token(SECRET, "grace", 60), expired_token("grace")
    forged = mint_token("another-secret-that-is-long-enough-for-hs256", "grace", 60)
    try:
        async with listening(process.url, env={"BROADCAST_TOKEN": good}):
            accepted = await run_cli("send", "--url", process.url, "--token", good, "x")
            assert accepted.returncode == 0, accepted.stderr
        for bad in (stale, forged):
            refused = await run_cli("send", "--url", process.url, "--token", bad, "x")
            assert refused.returncode == 1, refused.stderr
    finally:
        process.terminate()
    log = process.finished_log()
    assert "listening on" in log
    for token in (good, stale, forged):
        no_token_in(token, log)
    assert SECRET not in log


# --- a token that expires while connected (close 4001, from the fake gateway) ---------------


@pytest.mark.parametrize("command", ["listen", "connect"])
async def test_a_token_expiring_while_connected_is_reported_and_not_retried(command: str) -> None:
    token = mint_token(SECRET, "alice", 1)  # very short: what expires while connected
    fake = FakeGateway()
    async with trio.open_nursery() as nursery:
        await fake.start(nursery)
        async with running(command, "--url", fake.url, "--token", token) as cli:
            status = cli.err if command == "listen" else cli.out  # connect: the chat's own lines
            await status.line_containing("* connected to ")
            await fake.wait_joined()
            client = fake.clients[0]
            assert client.headers["authorization"] == f"Bearer {token}"
            assert "token" not in client.query  # never in the URL

            await fake.close_all(4001, "token_expired: your token expired")
            assert await status.line() == "! your token expired; get a new one"
            assert await cli.exit_code() == 1
        nursery.cancel_scope.cancel()
    assert len(fake.clients) == 1  # not retried
    no_token_in(token, cli.out.seen, cli.err.seen)
    assert not any("Traceback" in line for line in cli.err.seen)


# --- TLS against a real gateway ------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        directory / "server.pem"
    )
    ca.cert_pem.write_to_path(directory / "ca.pem")
    trustme.CA().cert_pem.write_to_path(directory / "other-ca.pem")
    return {name: directory / f"{name}.pem" for name in ("server", "ca", "other-ca")}


@pytest.fixture(scope="module")
def tls_gateway(certificates: dict[str, Path]) -> Iterator[GatewayProcess]:
    pem = str(certificates["server"])
    process = GatewayProcess(node_id="tls", extra=("--tls-cert", pem, "--tls-key", pem))
    try:
        yield process
    finally:
        process.terminate()


async def test_send_and_listen_over_tls_verified_with_the_ca_file(
    tls_gateway: GatewayProcess, certificates: dict[str, Path]
) -> None:
    ca = str(certificates["ca"])
    wss = f"wss://127.0.0.1:{tls_gateway.port}/"
    async with listening(wss, "--ca-file", ca, "--channel", "cli-tls") as (out, err):
        assert err.seen[-1].startswith(f"* connected to {wss} as ")
        port = str(tls_gateway.port)
        sent = await run_cli(
            "send", "--tls", "--port", port, "--ca-file", ca, "--channel", "cli-tls", "--name",
            "bob", "over TLS",
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert (await out.line_containing("over TLS")).endswith("] bob: over TLS")


@pytest.mark.parametrize(
    "command",
    [["send", "--timeout", "60", "hi"], ["listen"], ["connect"]],
    ids=["send", "listen", "connect"],
)
async def test_a_certificate_from_another_ca_is_reported_plainly_with_exit_2(
    tls_gateway: GatewayProcess, certificates: dict[str, Path], command: list[str]
) -> None:
    # send would wait its --timeout and the others retry for ever, if the failure went unseen.
    port, other = str(tls_gateway.port), str(certificates["other-ca"])
    result = await run_cli(*command, "--tls", "--port", port, "--ca-file", other)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith("broadcast-cli: cannot verify the server's certificate: "), err
    assert "Traceback" not in err


async def test_a_plain_client_of_a_tls_gateway_is_told_to_use_tls(
    tls_gateway: GatewayProcess,
) -> None:
    result = await run_cli("send", "--port", str(tls_gateway.port), "hi")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("broadcast-cli: refused: tls_required: ")


# --- the command line, in process ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1.5h", 5400)],
)
def test_ttl_takes_seconds_or_units(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0m", "-5", "1w", "h", "1 hour"])
def test_bad_ttls_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        parse_ttl(text)


def test_token_prints_a_token_the_gateway_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "--name", "alice", "--ttl", "2m", "--channels", "a,b"]
    assert main(argv, environ=AUTH) == 0
    out = capsys.readouterr().out
    identity = TokenVerifier(secret=SECRET).verify(out.strip())
    assert (identity.name, identity.channels) == ("alice", frozenset({"a", "b"}))
    assert identity.expires_at is not None
    assert 100 < identity.expires_at - time.time() <= 121
    assert main([*argv, "--secret", SECRET], environ={}) == 0  # the flag works too


@pytest.mark.parametrize(
    ("argv", "environ", "says"),
    [
        (["--name", "alice"], {}, "no secret: set BROADCAST_AUTH_SECRET"),
        (["--name", "alice"], {"BROADCAST_AUTH_SECRET": "tiny-secret-42"}, "at least 32 bytes"),
        (["--name", " alice"], AUTH, "argument --name"),
        (["--name", "alice", "--channels", "a,,b"], AUTH, "empty channel"),
        (["--name", "alice", "--channels", "no spaces"], AUTH, "argument --channels"),
        (["--name", "alice", "--ttl", "soon"], AUTH, "not a lifetime"),
    ],
)
def test_token_errors_are_plain_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], says: str
) -> None:
    assert main(["token", *argv], environ=environ) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert says in captured.err and "Traceback" not in captured.err
    assert "tiny-secret-42" not in captured.err and SECRET not in captured.err


def test_tls_chooses_wss_and_cannot_be_contradicted() -> None:
    assert compose_url(None, 9443, None, tls=True) == "wss://127.0.0.1:9443/"
    assert compose_url(None, None, "wss://h/", tls=True) == "wss://h/"
    for bad in ("ws://h/", "wss://h/?token=abc.def.ghi"):
        with pytest.raises(UsageError) as refused:
            compose_url(None, None, bad, tls=True)
        assert "abc.def.ghi" not in str(refused.value)


def test_the_token_comes_from_the_flag_or_the_environment_and_is_checked() -> None:
    token = mint_token(SECRET, "alice", 60)
    assert token_from(None, {}) is None
    assert token_from(None, {"BROADCAST_TOKEN": f" {token}\n"}) == token  # as from $(cat file)
    assert token_from(token, {"BROADCAST_TOKEN": "ignored"}) == token


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "x", "--url", "ws://h/?token=abc.def.ghi"],  # a token in a URL would be logged
        ["send", "x", "--token", "abc.def.ghi\nX-Evil: 1"],  # a header injection, or a bad paste
        ["send", "x", "--token", ""],
        ["listen", "--ca-file", "/no/such/ca.pem", "--tls"],
        ["listen", "--ca-file", __file__],  # TLS is off: the CA would be silently useless
        ["connect", "--tls", "--url", "ws://h/"],
    ],
)
def test_unusable_connection_settings_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv, environ={}) == 2
    err = capsys.readouterr().err
    assert "abc.def.ghi" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("ws://127.0.0.1:1/", False),
        ("ws://localhost:1/", False),
        ("ws://[::1]:1/", False),
        ("wss://chat.example.org/", False),
        ("ws://chat.example.org/", True),
    ],
)
def test_a_token_over_plain_ws_beyond_this_machine_is_warned_about(
    capsys: pytest.CaptureFixture[str], url: str, warned: bool
) -> None:
    token = mint_token(SECRET, "alice", 60)
    args = build_parser().parse_args(["listen", "--url", url])
    target = make_target(args, {"BROADCAST_TOKEN": token})
    assert target.token == token and token not in repr(target)
    err = capsys.readouterr().err
    assert ("warning: the token goes to chat.example.org over plain ws://" in err) is warned
    assert token not in err
