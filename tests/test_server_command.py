"""``broadcast-server`` as a person starts it: every mistake is one line and exit status 2.

Each test runs the installed ``broadcast-server`` (next to this interpreter, as ``make run`` does)
with a mistake in its command line or environment, and checks what the person sees: exit status 2,
exactly one line on stderr naming what is wrong, no traceback, and no "listening" or "ready" from
a gateway that never started. Ports are free ones found at run time; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trio

import broadcast
from broadcast.bus.memory import MemoryBus
from broadcast.gateway.command import serve_until_signalled
from broadcast.gateway.server import Gateway
from tests.support.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(Path(sys.executable).parent / "broadcast-server")
BENCH = str(Path(sys.executable).parent / "broadcast-bench")
# A mistake is found before anything runs: well within this, even on a busy 2-core machine.
EXIT_SECONDS = 30
# RFC 5737 TEST-NET-1: a documentation address that no machine has.
FOREIGN_ADDRESS = "192.0.2.1"
ERROR_LINE = re.compile(r"broadcast-server: error: \S.*")


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_server(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVER, *args],
        capture_output=True,
        text=True,
        env=_env(env),
        timeout=EXIT_SECONDS,
        stdin=subprocess.DEVNULL,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *mentions: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert ERROR_LINE.fullmatch(lines[0]), lines[0]
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])
    assert result.stdout == ""
    return lines[0]


def _unused_port() -> int:
    """A port nothing listens on (the kernel just handed it out and took it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- mistakes in flags and variables: argparse-level, then the checks before start -----------------


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--port", "-1"], {}, ["--port", "0 to 65535"]),
        (["--port", "65536"], {}, ["--port", "65536"]),
        (["--port", "99999"], {}, ["--port", "99999"]),
        (["--port", "12.5"], {}, ["--port"]),
        ([], {"BROADCAST_PORT": "abc"}, ["BROADCAST_PORT", "abc"]),
        ([], {"BROADCAST_PORT": "70000"}, ["BROADCAST_PORT", "0 to 65535"]),
        (["--history-length", "-5"], {}, ["--history-length", "at least 1"]),
        ([], {"BROADCAST_HISTORY_LENGTH": "0"}, ["BROADCAST_HISTORY_LENGTH"]),
        (["--history-age", "0"], {}, ["--history-age", "above 0"]),
        (["--drain-timeout", "-1"], {}, ["--drain-timeout"]),
        (["--drain-timeout", "inf"], {}, ["--drain-timeout", "finite"]),
        (["--max-connections", "0"], {}, ["--max-connections"]),
        (["--max-per-address", "-1"], {}, ["--max-per-address"]),
        (["--message-rate", "-1"], {}, ["--message-rate"]),
        (["--message-rate", "nan"], {}, ["--message-rate"]),
        (["--message-burst", "0"], {}, ["--message-burst"]),
        (["--command-rate", "-0.5"], {}, ["--command-rate"]),
        (["--command-burst", "0"], {}, ["--command-burst"]),
        (["--log-level", "loud"], {}, ["--log-level", "debug"]),
        (["--node-id", ""], {}, ["--node-id"]),
        (["--redis-url", "localhost:6399"], {}, ["--redis-url", "redis://"]),
        (["--redis-url", "redis://localhost:99999/0"], {}, ["--redis-url", "port"]),
        (["--tls-cert", "cert.pem"], {}, ["--tls-key"]),
        (["--auth-public-key", "/nonexistent/key.pem"], {}, ["--auth-public-key", "no such"]),
        (["--auth-secret", "s3cret-value", "--auth-public-key", "k.pem"], {}, ["not both"]),
        (["--bogus"], {}, ["--bogus"]),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_a_mistake_is_one_line_and_status_2(
    args: list[str], env: dict[str, str], mentions: list[str]
) -> None:
    # --port 0 first (the flag would win over BROADCAST_PORT): a mistake must be reported as
    # such, not as a busy default port.
    port = [] if "BROADCAST_PORT" in env else ["--port", "0"]
    result = run_server("start", *port, *args, env=env)
    line = assert_one_error_line(result, *mentions)
    assert "s3cret-value" not in line


def test_a_malformed_redis_url_never_shows_its_password() -> None:
    result = run_server("start", "--port", "0", "--redis-url", "redis://:hunter2@localhost/db-x")
    line = assert_one_error_line(result, "--redis-url")
    assert "hunter2" not in line


def test_no_command_is_one_line_too() -> None:
    assert_one_error_line(run_server(), "start", "--help")


def test_connect_is_not_a_server_command() -> None:
    """The server never imports the client: chatting is broadcast-cli's job."""
    assert_one_error_line(run_server("connect"), "connect")


# -- where it cannot listen ---------------------------------------------------------------------


def test_a_busy_port_is_one_line_and_nothing_claims_to_listen(busy_port: int) -> None:
    result = run_server("start", "--port", str(busy_port), "--log-level", "debug")
    assert_one_error_line(result, f"127.0.0.1:{busy_port}", "in use")
    assert "listening" not in result.stderr and "ready" not in result.stderr


def test_an_address_of_another_machine_is_one_line() -> None:
    result = run_server("start", "--host", FOREIGN_ADDRESS, "--port", "0")
    assert_one_error_line(result, FOREIGN_ADDRESS, "not an address of this machine")
    assert "listening" not in result.stderr


def test_a_host_that_does_not_resolve_is_one_line() -> None:
    result = run_server("start", "--host", "no-such-host.invalid", "--port", "0")
    assert_one_error_line(result, "no-such-host.invalid")


async def test_a_port_taken_after_the_check_is_reported_not_raised(
    busy_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The race the early check cannot close: the gateway's own bind fails inside its nursery.
    That comes back as the same one line, not an exception group."""
    gateway = Gateway(MemoryBus(), node_id="late", host="127.0.0.1", port=busy_port)
    with trio.fail_after(EXIT_SECONDS):
        problem = await serve_until_signalled(gateway)
    assert problem == (
        f"cannot listen on 127.0.0.1:{busy_port}: the port is in use "
        "(another gateway? pick another --port)"
    )
    assert "listening" not in caplog.text


# -- a Redis that is not there (yet) -------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_an_unreachable_redis_starts_not_ready_and_says_where_it_looks() -> None:
    """Not a mistake in the command: Redis may come up later (Kubernetes, compose). The gateway
    listens, answers /readyz with 503 until it can reach Redis, and logs the URL readably (only
    a password is hidden)."""
    port = _unused_port()
    url = f"redis://127.0.0.1:{port}/0"
    gateway = GatewayProcess(node_id="no-redis", redis_url=url)
    try:
        status, body = _get(f"http://127.0.0.1:{gateway.port}/readyz")
        assert status == 503, body
        assert _get(f"http://127.0.0.1:{gateway.port}/healthz")[0] == 200
    finally:
        assert gateway.terminate() == 0
    log = gateway.finished_log()
    assert url in log, log
    assert "***" not in log


def test_a_redis_password_is_hidden_in_the_log_and_nothing_else() -> None:
    port = _unused_port()
    gateway = GatewayProcess(
        node_id="secret-redis", redis_url=f"redis://:hunter2@127.0.0.1:{port}/0"
    )
    assert gateway.terminate() == 0
    log = gateway.finished_log()
    assert "hunter2" not in log
    assert f"redis://:***@127.0.0.1:{port}/0" in log, log


# -- --version and --help ------------------------------------------------------------------------


@pytest.mark.parametrize("program", [SERVER, BENCH], ids=["broadcast-server", "broadcast-bench"])
def test_version(program: str) -> None:
    result = subprocess.run(
        [program, "--version"], capture_output=True, text=True, env=_env(), timeout=EXIT_SECONDS
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{Path(program).name} {broadcast.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", broadcast.__version__)


@pytest.mark.parametrize("args", [["--help"], ["start", "--help"]], ids=" ".join)
def test_help_has_no_markup_and_no_missing_defaults(args: list[str]) -> None:
    result = run_server(*args)
    assert result.returncode == 0, result.stderr
    for junk in ("``", "default: None", ":func:", ":class:"):
        assert junk not in result.stdout, junk
    if args == ["--help"]:
        assert "connect" not in result.stdout


def test_readme_documents_every_start_flag() -> None:
    help_text = run_server("start", "--help").stdout
    flags = set(re.findall(r"^\s+(--[a-z][a-z-]+)", help_text, re.MULTILINE)) - {"--help"}
    assert len(flags) > 10, help_text
    readme = (ROOT / "README.md").read_text()
    options = readme[readme.index("## Server options") :]
    missing = {flag for flag in flags if f"`{flag}`" not in options}
    assert not missing, f"README.md's Server options lack {sorted(missing)}"
    variables = {"BROADCAST_" + flag[2:].upper().replace("-", "_") for flag in flags}
    assert all(variable in help_text for variable in variables)
