"""The JSON that travels through the bus; it is also, byte for byte, the frame clients get."""

from __future__ import annotations

import json
from typing import Any

_MESSAGE_PREFIX = b'{"type":"message","id":"'
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def message_body(channel: str, sender: str, text: str, ts: float, origin: str) -> bytes:
    """A message without its opening ``{"type":"message","id":…,``: the bus adds that part."""
    fields = {"channel": channel, "sender": sender, "text": text, "ts": ts, "origin": origin}
    return _compact(fields)[1:].encode()


def message_payload(message_id: str, body: bytes) -> bytes:
    """The complete message event once the bus has given it an id."""
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
    """Message ids compare as the pair ``(milliseconds, sequence)``, never as strings."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq)
