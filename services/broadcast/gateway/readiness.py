"""Ready means proven: the gateway sends itself a probe through the bus and sees it come back.

A connected socket is not enough: a subscriber can look healthy and hear nothing (Redis dropped
it, a resubscribe was lost). Only a message that went out and came back proves both directions.
"""

from __future__ import annotations

import itertools
import logging

import trio

from broadcast.bus.base import Bus, BusUnavailable
from broadcast.gateway.hub import ChannelHub

log = logging.getLogger("broadcast.gateway.readiness")

# Probe this often; a probe not back within the timeout marks the gateway not ready.
PROBE_INTERVAL_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 5.0


class ReadinessProbe:
    def __init__(self, bus: Bus, hub: ChannelHub, node_id: str) -> None:
        self._bus = bus
        # A ':' can never appear in a client's channel name, so no client can join or spoof this.
        self.channel = f"probe:{node_id}"
        self._hub = hub
        self._tokens = itertools.count()
        self._expected = b""
        self._arrived = trio.Event()
        self.live = False

    def _on_delivery(self, payload: bytes) -> None:
        if payload == self._expected:
            self._arrived.set()

    async def run(self) -> None:
        self._hub.watch(self.channel, self._on_delivery)
        subscribed = False
        while True:
            try:
                if not subscribed:
                    await self._bus.subscribe(self.channel)
                    subscribed = True
                self._set_live(await self._probe_once())
            except BusUnavailable:
                self._set_live(False)
            await trio.sleep(PROBE_INTERVAL_SECONDS)

    async def _probe_once(self) -> bool:
        self._arrived = trio.Event()
        self._expected = b'{"type":"probe","n":%d}' % next(self._tokens)
        with trio.move_on_after(PROBE_TIMEOUT_SECONDS):
            await self._bus.publish_event(self.channel, self._expected)
            await self._arrived.wait()
            return True
        return False

    def _set_live(self, live: bool) -> None:
        if live != self.live:
            log.log(
                logging.INFO if live else logging.WARNING,
                "ready: the bus round trip works" if live else "not ready: no bus round trip",
            )
        self.live = live
