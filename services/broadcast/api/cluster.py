"""The API's control channel: gateways announce themselves, and a disconnect reaches them all.

Every gateway with the API on subscribes to ``api:control`` (a ``:`` keeps clients out) and
publishes there, through the bus:

- ``{"type":"gateway","node":…,"connections":…,"version":…}`` every HEARTBEAT_SECONDS: each
  gateway knows the live ones (heard from within GATEWAY_TTL_SECONDS), for ``/api/info`` and to
  know whose answer a disconnect waits for;
- ``{"type":"disconnect","request":…,"name":…,"from":…}``: every gateway (the asking one
  included: one path) closes that user's sessions and answers
  ``{"type":"disconnected","request":…,"node":…,"count":…}``.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

from broadcast.api.host import ApiHost
from broadcast.bus.base import BusUnavailable
from broadcast.protocol.errors import CloseCode

log = logging.getLogger("broadcast.api")

CONTROL_CHANNEL = "api:control"
HEARTBEAT_SECONDS = 2.0
# Three missed heartbeats: a gateway that is gone, not one that is busy for a moment.
GATEWAY_TTL_SECONDS = 3 * HEARTBEAT_SECONDS
# A disconnect waits this long for every live gateway's answer, then reports what it has.
DISCONNECT_WAIT_SECONDS = 2.0
# Control messages waiting for the control task; more at once is an attack or a bug: dropped.
CONTROL_QUEUE = 256
DISCONNECT_REASON = "disconnected by the server API"


class GatewayInfo(NamedTuple):
    node: str
    connections: int
    version: str


@dataclass
class _Request:
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)


class ClusterControl:
    def __init__(self, host: ApiHost, version: str) -> None:
        self._host = host
        self._version = version
        self._seen: dict[str, tuple[float, GatewayInfo]] = {}
        self._requests: dict[str, _Request] = {}
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](CONTROL_QUEUE)
        self.subscribed = trio.Event()
        self._new_gateway = trio.Event()

    def gateways(self) -> list[GatewayInfo]:
        """Live gateways, this one first (with its count as of now)."""
        now = trio.current_time()
        me = self._host.node_id
        others = [
            info
            for node, (seen, info) in sorted(self._seen.items())
            if node != me and now - seen < GATEWAY_TTL_SECONDS
        ]
        return [GatewayInfo(me, self._host.connection_count(), self._version), *others]

    async def wait_for_gateways(self, count: int) -> None:
        """Until ``count`` gateways (this one included) are known to be live."""
        while len(self.gateways()) < count:
            await self._new_gateway.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._host.hub.watch(CONTROL_CHANNEL, self._on_payload)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer)
            task_status.started()
            while True:
                try:
                    if not self.subscribed.is_set():
                        await self._host.bus.subscribe(CONTROL_CHANNEL)
                        self.subscribed.set()
                    await self._publish(
                        type="gateway",
                        node=self._host.node_id,
                        connections=self._host.connection_count(),
                        version=self._version,
                    )
                except BusUnavailable as exc:
                    log.debug("api control channel: %s", exc)
                await trio.sleep(HEARTBEAT_SECONDS)

    async def disconnect(self, name: str) -> tuple[int, int]:
        """Close ``name``'s sessions on every gateway: ``(connections closed, gateways that
        answered)``. Raises BusUnavailable when the request cannot be published."""
        request_id = secrets.token_hex(8)
        request = _Request(name, expected={g.node for g in self.gateways()})
        self._requests[request_id] = request
        try:
            await self._publish(
                type="disconnect", request=request_id, name=name, origin=self._host.node_id
            )
            with trio.move_on_after(DISCONNECT_WAIT_SECONDS):
                await request.done.wait()
        finally:
            del self._requests[request_id]
        if not request.done.is_set():
            missing = sorted(request.expected - request.counts.keys())
            log.warning("api disconnect of %r: no answer from %s", name, ", ".join(missing))
        return sum(request.counts.values()), len(request.counts)

    async def _publish(self, **fields: Any) -> None:
        payload = json.dumps(fields, separators=(",", ":")).encode()
        await self._host.bus.publish_event(CONTROL_CHANNEL, payload)

    def _on_payload(self, payload: bytes) -> None:
        """From the hub's fan-out: must not block."""
        try:
            message = json.loads(payload)
            kind = message["type"]
            if kind == "gateway":
                info = GatewayInfo(
                    str(message["node"]), int(message["connections"]), str(message["version"])
                )
                now = trio.current_time()
                last = self._seen.get(info.node)
                if last is None or now - last[0] >= GATEWAY_TTL_SECONDS:
                    self._new_gateway.set()
                    self._new_gateway = trio.Event()
                self._seen[info.node] = (now, info)
            elif kind == "disconnect":
                self._send.send_nowait(message)
            elif kind == "disconnected":
                request = self._requests.get(message["request"])
                if request is not None:
                    request.counts[str(message["node"])] = int(message["count"])
                    if request.expected <= request.counts.keys():
                        request.done.set()
        except trio.WouldBlock:
            log.warning("api control channel: too many requests at once; one dropped")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("api control channel: malformed message (%s): %.80r", exc, payload)

    async def _answer(self) -> None:
        async for message in self._receive:
            name = message.get("name")
            if not isinstance(name, str):
                continue
            count = self._host.disconnect_local(name, CloseCode.DISCONNECTED, DISCONNECT_REASON)
            if count:
                log.info("api disconnect: closed %d connections of %r", count, name)
            try:
                await self._publish(
                    type="disconnected",
                    request=message.get("request"),
                    node=self._host.node_id,
                    count=count,
                )
            except BusUnavailable as exc:
                log.warning("api disconnect: cannot answer %s: %s", message.get("origin"), exc)
