"""The smoke run's check of the counting itself: known bad input must be counted as bad.

A benchmark whose counters silently report zero duplicates is worse than none. Before the live
run the smoke feeds a receiver frames with a duplicate, an id that goes backwards and a stale
step, and checks each is counted where it belongs.
"""

from __future__ import annotations

import time

from broadcast.bench import wire
from broadcast.bench.receivers import Receiver, StepState
from broadcast.protocol.envelope import message_body, message_payload
from broadcast.protocol.websocket_frames import encode_text_frame


def _frame(message_id: str, step: int, sender: int, seq: int) -> bytes:
    text = wire.message_text(step, sender, seq, time.time_ns())
    body = message_body("bench", f"s{sender}", text, 1.0, "gw/1")
    return encode_text_frame(message_payload(message_id, body))


def check_counting() -> list[str]:
    """Returns what was miscounted; empty when the counters are right."""
    state = StepState(step=1, senders=2, sender_gateways=(0, 1), max_seq=16)
    receiver = Receiver(0, 0, ("127.0.0.1", 0))
    receiver.reset(2, 16)
    frames = [
        _frame("100-0", 1, 0, 0),
        _frame("100-1", 1, 1, 0),
        _frame("100-1", 1, 1, 0),  # duplicate
        _frame("101-0", 1, 0, 1),
        _frame("100-5", 1, 0, 2),  # new, but its id goes backwards: an order violation
        _frame("102-0", 0, 0, 3),  # an earlier step's straggler: not counted
    ]
    data = b"".join(frames)
    # Split mid-frame, as TCP may: the parser must join the halves.
    receiver.feed_frames(state, data[:37], time.time_ns())
    receiver.feed_frames(state, data[37:], time.time_ns())
    lines = Receiver(1, 1, ("127.0.0.1", 0))
    lines.reset(2, 16)
    text = b"bx0: " + wire.message_text(1, 0, 0, time.time_ns()).encode()
    lines.feed_lines(state, b"* alice joined #general\n" + text + b"\n" + text + b"\n",
                     time.time_ns(), b"bx")  # fmt: skip
    wanted = {"delivered": 5, "duplicates": 2, "order_violations": 1, "stale": 1}
    got = {key: getattr(state, key) for key in wanted}
    return [f"{key}: counted {got[key]}, expected {wanted[key]}" for key in wanted
            if got[key] != wanted[key]]  # fmt: skip
