"""Message ids, defined once for the buses, the gateway, the CLI and the benchmarks: strict
parsing, the next id, and the hot-path reads of a payload's id and epoch. Ids are Redis stream
ids ``<ms>-<seq>`` and compare as integer pairs, and only within one epoch
(docs/reliability.md, "Epochs")."""

from __future__ import annotations

import json
import re

MessageId = tuple[int, int]

ZERO_ID: MessageId = (0, 0)
"""Below every real id: ``after="0-0"`` means "everything"."""

# Redis stream ids are two unsigned 64-bit integers; anything else is refused before it reaches
# Redis (which would answer with an error) or a comparison.
_ID_PART_LIMIT = 1 << 64
_ID_RE = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")

MESSAGE_PREFIX = b'{"type":"message","id":"'
"""How every message payload starts: its id follows, then ``"epoch"`` (envelope.py)."""
_ID_START = len(MESSAGE_PREFIX)


def parse_message_id(text: str | bytes) -> MessageId:
    """A client-supplied id; ValueError unless it is ``<ms>-<seq>`` of two 64-bit numbers."""
    data = text.encode() if isinstance(text, str) else text
    if not _ID_RE.fullmatch(data):
        raise ValueError(f"not a message id: {text!r}")
    ms, _, seq = data.partition(b"-")
    parsed = int(ms), int(seq)
    if parsed[0] >= _ID_PART_LIMIT or parsed[1] >= _ID_PART_LIMIT:
        raise ValueError(f"message id out of range: {text!r}")
    return parsed


def format_id(message_id: MessageId) -> str:
    return f"{message_id[0]}-{message_id[1]}"


def next_id(message_id: MessageId) -> MessageId | None:
    """The smallest id above ``message_id`` (an inclusive range start); None past the last."""
    ms, seq = message_id
    if seq + 1 < _ID_PART_LIMIT:
        return ms, seq + 1
    if ms + 1 < _ID_PART_LIMIT:
        return ms + 1, 0
    return None


def payload_message_id(payload: bytes) -> MessageId | None:
    """The id of a message payload, read from its fixed prefix without parsing the JSON (every
    delivered payload goes through here); None for notices and for anything malformed, which
    are passed on as they are."""
    if not payload.startswith(MESSAGE_PREFIX):
        return None
    end = payload.find(b'"', _ID_START, _ID_START + 42)  # two 20-digit numbers and a dash
    if end < 0:
        return None
    ms, dash, seq = payload[_ID_START:end].partition(b"-")
    if not dash:
        return None
    try:
        return int(ms), int(seq)
    except ValueError:
        return None


_EPOCH_FIELD = b',"epoch":"'
# Epochs are short tokens (RedisBus: 17 hex digits; MemoryBus: 16); a longer one is not ours.
EPOCH_MAX_LENGTH = 64


def payload_epoch(payload: bytes) -> bytes | None:
    """The ``"epoch"`` of a message payload, read from its fixed place right after the id
    (``envelope.message_payload``); None for notices, and for payloads without one (published
    by a gateway from before epochs)."""
    if not payload.startswith(MESSAGE_PREFIX):
        return None
    end = payload.find(b'"', _ID_START, _ID_START + 42)
    return None if end < 0 else epoch_after_id(payload, end)


def epoch_after_id(payload: bytes, id_end: int) -> bytes | None:
    """The epoch of a message payload whose id ends (its closing quote) at ``id_end``."""
    if not payload.startswith(_EPOCH_FIELD, id_end + 1):
        return None
    start = id_end + 1 + len(_EPOCH_FIELD)
    end = payload.find(b'"', start, start + EPOCH_MAX_LENGTH + 1)
    return None if end < 0 else payload[start:end]


def gap_payload(channel: str) -> bytes:
    """The notice delivered in place of messages a gateway could not recover (docs/protocol.md,
    ``gap``), as compact JSON like every other bus payload."""
    name = json.dumps(channel, ensure_ascii=False)
    return b'{"type":"gap","channel":' + name.encode() + b"}"
