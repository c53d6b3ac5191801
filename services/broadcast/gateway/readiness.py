"""Ready means proven: the gateway sends itself probes through the bus and sees them come back.

A connected socket is not enough: a subscriber can look healthy and hear nothing (Redis dropped
it, a resubscribe was lost), and a Redis at ``maxmemory`` still answers PING and passes PUBLISH
while it refuses every message. So each round of probes goes the way a message goes:

- one probe per connection that delivers (``bus.probe_channels``: one on a single Redis, one per
  primary on Redis Cluster), each a write to the store and then a publish (``bus.probe``), so a
  full Redis fails it exactly as it fails a message;
- the round passes when every probe came back by its deadline and no message was refused for
  lack of memory since the previous round (``bus.refused_writes``): with Redis hovering at its
  limit, a probe's small write may get through while many messages do not.

``live`` turns False the moment a round's deadline passes with a probe outstanding, or a
message is refused for lack of memory. While not live the probe retries every
RETRY_INTERVAL_SECONDS, so readiness comes back within about that of the bus working again (and
within the bus's reconnect backoff of Redis coming back).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import trio

from broadcast.bus.base import Bus, BusUnavailable
from broadcast.gateway.hub import ChannelHub

log = logging.getLogger("broadcast.gateway.readiness")

# Probe this often while ready: one small script call per connection every 2 s costs nothing.
PROBE_INTERVAL_SECONDS = 2.0
# While not ready, probe again this soon: ready again within ~0.5 s of the bus working.
RETRY_INTERVAL_SECONDS = 0.5
# While a bus connection is down, check this often whether it is back, to probe at once.
BUS_POLL_SECONDS = 0.1
# A probe not back within this marks the gateway not ready. A round trip through Redis takes
# milliseconds; seconds leave room for a loaded gateway without flapping out of the balancer.
PROBE_DEADLINE_SECONDS = 3.0


class ReadinessProbe:
    def __init__(self, bus: Bus, hub: ChannelHub, node_id: str) -> None:
        self._bus = bus
        # A ':' can never appear in a client's channel name, so no client can join or spoof this.
        self.channel = f"probe:{node_id}"
        self._hub = hub
        self._tokens = itertools.count()
        self._subscribed: set[str] = set()
        self._outstanding: dict[str, bytes] = {}
        self._arrived = trio.Event()
        self._refused_seen = 0
        self._live = False
        self.rounds = 0
        """Probe rounds finished (passed or failed); tests wait on it."""
        self.round_done = trio.Event()
        """Set (and replaced) after every round."""

    @property
    def live(self) -> bool:
        """The last round passed, and no message was refused for lack of memory since: the
        first refusal turns readiness off at once, not at the next round."""
        return self._live and self._bus.refused_writes == self._refused_seen

    def _watcher(self, channel: str) -> Callable[[bytes], None]:
        def arrived(payload: bytes) -> None:
            if self._outstanding.get(channel) == payload:
                del self._outstanding[channel]
                if not self._outstanding:
                    self._arrived.set()

        return arrived

    async def run(self) -> None:
        while True:
            try:
                live = await self._probe_once()
            except BusUnavailable:
                live = False
            # Messages refused for lack of memory since the last round fail this one.
            writes_refused = self._bus.refused_writes
            live = live and writes_refused == self._refused_seen
            self._refused_seen = writes_refused
            self._set_live(live)
            self.rounds += 1
            done, self.round_done = self.round_done, trio.Event()
            done.set()
            await self._pause()

    async def _pause(self) -> None:
        """Until the next round: PROBE_INTERVAL_SECONDS while live; RETRY_INTERVAL_SECONDS
        while not, or until the bus is connected again; and as soon as a refused message turned
        readiness off."""
        if not self._live:
            if self._bus.ready:
                await trio.sleep(RETRY_INTERVAL_SECONDS)
                return
            # A connection is down: probe as soon as the bus says it is back.
            while not self._bus.ready:  # noqa: ASYNC110 - the Bus protocol offers no event
                await trio.sleep(BUS_POLL_SECONDS)
            return
        next_round = trio.current_time() + PROBE_INTERVAL_SECONDS
        # Polls a counter (four checks per interval): the bus has no event for a refusal.
        while self.live and trio.current_time() < next_round:  # noqa: ASYNC110
            await trio.sleep(min(RETRY_INTERVAL_SECONDS, next_round - trio.current_time()))

    async def _follow(self, channels: list[str]) -> None:
        """Subscribe the probe channels of now (the cluster's primaries change), drop the rest."""
        for channel in channels:
            if channel not in self._subscribed:
                self._hub.watch(channel, self._watcher(channel))
                await self._bus.subscribe(channel)
                self._subscribed.add(channel)
        for channel in self._subscribed - set(channels):
            await self._bus.unsubscribe(channel)
            self._subscribed.discard(channel)

    async def _probe_once(self) -> bool:
        channels = self._bus.probe_channels(self.channel)
        await self._follow(channels)
        if not self._bus.ready:
            # A connection is still down (the publisher may be back before the subscriber): a
            # probe could only wait out its deadline. Retry soon instead.
            return False
        payload = b'{"type":"probe","n":%d}' % next(self._tokens)
        self._outstanding = dict.fromkeys(channels, payload)
        self._arrived = trio.Event()
        refused: list[BusUnavailable] = []
        with trio.move_on_after(PROBE_DEADLINE_SECONDS):
            async with trio.open_nursery() as nursery:
                for channel in channels:
                    nursery.start_soon(self._send, channel, payload, refused, nursery.cancel_scope)
            if refused:
                raise refused[0]
            await self._arrived.wait()
            return True
        return False

    async def _send(
        self,
        channel: str,
        payload: bytes,
        refused: list[BusUnavailable],
        scope: trio.CancelScope,
    ) -> None:
        try:
            await self._bus.probe(channel, payload)
        except BusUnavailable as exc:
            refused.append(exc)
            scope.cancel()

    def _set_live(self, live: bool) -> None:
        if live != self._live:
            log.log(
                logging.INFO if live else logging.WARNING,
                "ready: the bus round trip works"
                if live
                else "not ready: no bus round trip, or the bus refuses writes",
            )
        self._live = live
