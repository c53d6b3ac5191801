"""The RESP connection against a real redis-server: replies, pipelining, errors, timeouts, AUTH."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from broadcast.redis.resp import (
    RedisAddress,
    RedisConnection,
    RedisConnectionError,
    RedisReplyError,
    RedisTimeout,
    open_connection,
    parse_url,
)
from tests.support.redis_server import RedisServer, free_port

# Generous for a loaded CI machine, short enough that a hang fails the test quickly.
WAIT = 5
PASSWORD = "s3cret:/@ %pass"  # needs URL quoting, so parsing is tested end to end


@pytest.fixture
async def connection(redis_server: RedisServer) -> AsyncIterator[RedisConnection]:
    connection = await open_connection(redis_server.url, command_timeout=WAIT)
    try:
        yield connection
    finally:
        await connection.aclose()


@pytest.fixture
def secured_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_command_replies(connection: RedisConnection) -> None:
    assert await connection.execute("PING") == b"PONG"
    assert await connection.execute("SET", "key", "value") == b"OK"
    assert await connection.execute("GET", "key") == b"value"
    assert await connection.execute("GET", "missing") is None
    assert await connection.execute("INCRBY", "counter", 5) == 5
    assert await connection.execute("RPUSH", "list", b"\x00\xff\r\n", "é") == 2
    assert await connection.execute("LRANGE", "list", 0, -1) == [b"\x00\xff\r\n", "é".encode()]


async def test_pipelined_replies_come_back_in_order(connection: RedisConnection) -> None:
    replies = await connection.pipeline([("INCR", "n")] * 5000)
    assert replies == list(range(1, 5001))
    mixed = await connection.pipeline([("SET", "a", "1"), ("GET", "a"), ("DEL", "a"), ("GET", "a")])
    assert mixed == [b"OK", b"1", 1, None]


async def test_an_error_reply_fails_only_its_command(connection: RedisConnection) -> None:
    replies = await connection.pipeline(
        [("SET", "word", "abc"), ("INCR", "word"), ("GET", "word"), ("PING",)]
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], RedisReplyError)
    assert replies[1].code == "ERR"
    assert replies[2:] == [b"abc", b"PONG"]

    with pytest.raises(RedisReplyError, match="not an integer"):
        await connection.execute("INCR", "word")
    assert not connection.closed
    assert await connection.execute("PING") == b"PONG"


async def test_a_stopped_server_times_out_and_closes_the_connection(
    redis_server: RedisServer,
) -> None:
    connection = await open_connection(redis_server.url, command_timeout=0.3)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        with trio.fail_after(WAIT):
            with pytest.raises(RedisTimeout):
                await connection.execute("PING")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert connection.closed
    with pytest.raises(RedisConnectionError):
        await connection.execute("PING")


async def test_server_gone_and_nobody_listening_are_connection_errors(
    redis_server: RedisServer,
) -> None:
    connection = await open_connection(redis_server.url, command_timeout=WAIT)
    redis_server.stop()
    with trio.fail_after(WAIT), pytest.raises(RedisConnectionError):
        await connection.execute("PING")
    with trio.fail_after(WAIT), pytest.raises(RedisConnectionError, match="cannot connect"):
        await open_connection(f"redis://127.0.0.1:{free_port()}/0", command_timeout=WAIT)


async def test_select_and_client_name(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("/0", "/3")
    connection = await open_connection(url, command_timeout=WAIT, client_name="broadcast-test")
    try:
        assert await connection.execute("SET", "where", "db3") == b"OK"
        assert await connection.execute("CLIENT", "GETNAME") == b"broadcast-test"
    finally:
        await connection.aclose()
    admin = redis_server.client()
    admin.select(3)  # redis-py's own connection pool: a plain sync call is fine in a test
    assert admin.get("where") == b"db3"


async def test_auth_with_password_and_with_username(secured_redis: RedisServer) -> None:
    for url in (secured_redis.url, secured_redis.url.replace("://", "://default", 1)):
        connection = await open_connection(url, command_timeout=WAIT)
        try:
            assert await connection.execute("PING") == b"PONG"
            assert PASSWORD not in connection.name
        finally:
            await connection.aclose()


async def test_missing_or_wrong_password(secured_redis: RedisServer) -> None:
    bare = f"redis://127.0.0.1:{secured_redis.port}/0"
    connection = await open_connection(bare, command_timeout=WAIT)
    try:
        with pytest.raises(RedisReplyError) as refused:
            await connection.execute("PING")
        assert refused.value.code == "NOAUTH"
    finally:
        await connection.aclose()

    wrong = f"redis://:not-{secured_redis.port}@127.0.0.1:{secured_redis.port}/0"
    with pytest.raises(RedisReplyError) as denied:
        await open_connection(wrong, command_timeout=WAIT)
    assert denied.value.code == "WRONGPASS"
    assert f"not-{secured_redis.port}" not in str(denied.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisAddress("localhost")),
        ("redis://127.0.0.1:7000/2", RedisAddress("127.0.0.1", 7000, 2)),
        ("redis://:pw@h/1?db=4", RedisAddress("h", db=4, password="pw")),
        ("redis://user:p%40ss@h:1/0", RedisAddress("h", 1, username="user", password="p@ss")),
        ("redis://user@h", RedisAddress("h", username="user")),
        ("rediss://h:6380", RedisAddress("h", 6380, tls=True)),
        ("redis://[::1]:7000", RedisAddress("::1", 7000)),
    ],
)
def test_parse_url(url: str, expected: RedisAddress) -> None:
    assert parse_url(url) == expected


def test_redacted_urls_never_show_the_password() -> None:
    assert parse_url("redis://user:pw@h:1/2").redacted() == "redis://user:***@h:1/2"
    assert parse_url("rediss://:pw@h").redacted() == "rediss://:***@h:6379/0"
    assert parse_url("redis://[::1]").redacted() == "redis://[::1]:6379/0"
    assert "pw" not in repr(parse_url("redis://:pw@h"))


@pytest.mark.parametrize("url", ["http://:pw@h", "redis://:pw@h/zero", "redis://:pw@h:port"])
def test_bad_urls_are_refused_without_quoting_them(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_url(url)
    assert "pw" not in str(refused.value)
