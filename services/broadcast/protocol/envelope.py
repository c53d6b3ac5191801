"""The JSON that travels through the bus; it is also, byte for byte, the frame clients get."""

from __future__ import annotations

import json
from typing import Any

from broadcast.protocol.ids import MESSAGE_PREFIX as _MESSAGE_PREFIX
from broadcast.protocol.ids import parse_message_id

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def message_body(channel: str, sender: str, text: str, ts: float, origin: str) -> bytes:
    """A message without its opening ``{"type":"message","id":…,``: the bus adds that part."""
    fields = {"channel": channel, "sender": sender, "text": text, "ts": ts, "origin": origin}
    return _compact(fields)[1:].encode()


def message_payload(message_id: str, body: bytes, epoch: str = "") -> bytes:
    """The complete message event once the bus has given it an id, and the epoch of its channel's
    history (``"epoch"`` right after the id; left out when empty: no epoch known)."""
    if epoch:
        opening = message_id.encode() + b'","epoch":"' + epoch.encode()
        return _MESSAGE_PREFIX + opening + b'",' + body
    return _MESSAGE_PREFIX + message_id.encode() + b'",' + body


def event_payload(kind: str, channel: str, name: str, ts: float, origin: str) -> bytes:
    """A join or leave notice."""
    fields = {"type": kind, "channel": channel, "name": name, "ts": ts, "origin": origin}
    return _compact(fields).encode()


def payload_id(payload: bytes) -> str | None:
    """The id of a message payload without parsing the JSON (hot path); None for notices."""
    if not payload.startswith(_MESSAGE_PREFIX):
        return None
    start = len(_MESSAGE_PREFIX)
    return payload[start : payload.index(b'"', start)].decode()


def encode(event: dict[str, Any]) -> str:
    """Compact JSON text for a server-to-client event that is not fanned out (ack, error…)."""
    return _compact(event)


def decode(payload: bytes | str) -> dict[str, Any]:
    """Parse a payload from the bus; raises ValueError when it is not a JSON object."""
    event = json.loads(payload)
    if not isinstance(event, dict):
        raise ValueError("bus payload is not a JSON object")
    return event


def parse_id(message_id: str) -> tuple[int, int]:
    """Message ids compare as the pair ``(milliseconds, sequence)``, never as strings; ValueError
    unless it is one (``ids.parse_message_id``)."""
    return parse_message_id(message_id)
