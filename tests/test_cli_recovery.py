"""``broadcast-cli listen`` against real gateways: history on joining, recovery after a crash.

The listener is a real subprocess; the gateways are real ``broadcast-server`` processes sharing
a private redis-server. The listener reconnects to the URL it was given, so a crashed gateway is
replaced by a new one on the same port, as a supervisor restarting it would do.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator

import pytest
import trio

from broadcast.protocol.envelope import parse_id
from tests.support.cli_process import LineReader, listening
from tests.support.clients import WsClient, ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

# Waiting out a crash takes a gateway start (seconds on a busy machine) plus the listener's backoff.
RECOVERY_SECONDS = 45
# Between two numbered messages: a steady trickle, so some fall in every phase of the outage.
PUBLISH_INTERVAL = 0.02


@pytest.fixture
def gateways(redis_server: RedisServer) -> Iterator[list[GatewayProcess]]:
    """Two gateways on one Redis; the test may replace the first, so it is killed from here."""
    started: list[GatewayProcess] = []
    try:
        for node in ("gw-a", "gw-b"):
            started.append(GatewayProcess(redis_url=redis_server.url, node_id=node))
        yield started
    finally:
        for gateway in started:
            gateway.kill()
            # Shown by pytest only when the test failed: what each gateway said last.
            print(f"--- {gateway.node_id} ---\n" + "".join(list(gateway.log)[-40:]))


async def test_listen_history_starts_with_the_last_messages(redis_server: RedisServer) -> None:
    gateway = GatewayProcess(redis_url=redis_server.url, node_id="gw-h")
    try:
        async with ws_client(gateway.url, name="bob", channel="cli-history") as bob:
            ids = [await bob.publish(f"old {n}") for n in range(3)]
            async with listening(
                gateway.url, "--json", "--history", "2", "--channel", "cli-history"
            ) as (out, _):
                replayed = [json.loads(await out.line()) for _ in range(3)]
                live = await bob.publish("new")
                replayed.append(json.loads(await out.line()))
    finally:
        gateway.kill()
    assert [(e["type"], e.get("id"), e.get("text")) for e in replayed] == [
        ("message", ids[1], "old 1"),
        ("message", ids[2], "old 2"),
        ("recovered", None, None),
        ("message", live, "new"),
    ]
    replayed[2].pop("epoch", None)  # the history's epoch, from gateways that have them
    assert replayed[2] == {
        "type": "recovered",
        "channel": "cli-history",
        "count": 2,
        "complete": True,
    }


class Transcript:
    """What the listener prints, read in the background: JSON events in order."""

    def __init__(self, out: LineReader) -> None:
        self._out = out
        self.events: list[dict[str, object]] = []
        self._changed = trio.Event()

    async def read(self) -> None:
        while True:
            self.events.append(json.loads(await self._out.line(RECOVERY_SECONDS)))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool], seconds: float) -> None:
        with trio.fail_after(seconds):
            while not condition():
                await self._changed.wait()

    def message_ids(self) -> list[str]:
        return [str(e["id"]) for e in self.events if e["type"] == "message"]

    def recovered(self) -> list[dict[str, object]]:
        return [e for e in self.events if e["type"] == "recovered"]


class Sender:
    """Publishes numbered messages on its gateway until stopped; keeps the acked ids.

    ``done`` is set once the last publish is acked: only then is ``acked`` the whole list (a
    listener may print a message before its sender hears the ack).
    """

    def __init__(self, client: WsClient) -> None:
        self._client = client
        self.acked: list[str] = []
        self.stop = trio.Event()
        self.done = trio.Event()

    async def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            self.acked.append(await self._client.publish(f"n{number}"))
            number += 1
            await trio.sleep(PUBLISH_INTERVAL)  # pacing the load, not waiting for a condition
        self.done.set()


@pytest.mark.cluster
@pytest.mark.parametrize("end", ["kill", "drain"])
async def test_listen_sees_every_message_once_in_order_across_a_gateway_crash(
    gateways: list[GatewayProcess], redis_server: RedisServer, end: str
) -> None:
    """Gateway A dies (kill -9, or a graceful drain with 1012) while B keeps publishing."""
    a, b = gateways
    channel = f"cli-crash-{end}"
    async with (
        ws_client(b.url, name="sender", channel=channel) as client,
        listening(a.url, "--json", "--channel", channel) as (out, err),
        trio.open_nursery() as nursery,
    ):
        transcript, sender = Transcript(out), Sender(client)
        nursery.start_soon(transcript.read)
        nursery.start_soon(sender.run)
        await transcript.wait_for(lambda: len(transcript.message_ids()) >= 5, RECOVERY_SECONDS)

        if end == "kill":
            a.kill()
            await err.line_containing("* connection lost: the connection dropped")
        else:
            a.signal(signal.SIGTERM)
            assert await err.line() == "* the server shut down; reconnecting"
            await trio.to_thread.run_sync(a.process.wait, 20)
        replacement = await trio.to_thread.run_sync(
            lambda: GatewayProcess(redis_url=redis_server.url, node_id="gw-a2", port=a.port)
        )
        gateways.append(replacement)
        await err.line_containing("* connected to ", RECOVERY_SECONDS)

        # Recovered, then some live messages after it, then stop and wait for the tail.
        await transcript.wait_for(lambda: bool(transcript.recovered()), RECOVERY_SECONDS)
        live_from = len(transcript.events)
        await transcript.wait_for(lambda: len(transcript.events) >= live_from + 5, 15)
        sender.stop.set()
        with trio.fail_after(15):
            await sender.done.wait()
        await transcript.wait_for(lambda: sender.acked[-1] in transcript.message_ids(), 15)
        nursery.cancel_scope.cancel()

    shown = transcript.message_ids()
    assert len(shown) == len(set(shown)), "a message was shown twice"
    assert shown == sorted(shown, key=parse_id), "messages out of order"
    # The welcome comes before the gateway has subscribed to the channel, so the first few
    # messages may go by before the listener is in; from the first it saw, it must see all.
    assert shown[0] in sender.acked[:5]
    assert shown == sender.acked[sender.acked.index(shown[0]) :], "a message is missing"
    [recovered] = transcript.recovered()
    assert recovered["complete"] is True
    assert isinstance(recovered["count"], int) and recovered["count"] >= 1
    # The replay came between what was seen before the crash and what was published after.
    position = transcript.events.index(recovered)
    assert 5 <= position < len(transcript.events) - 5
