"""``broadcast-cli send [TEXT]``: publish a message (or each line of stdin), wait for the acks.

Without TEXT, every line of stdin is a message: ``seq 1 300 | broadcast-cli send`` publishes 300
messages, in order, over one connection. They are paced to the server's rate (pacing.py); one
the server refuses for coming too early is sent again after its hint, and the next waits for it,
so the order holds. Each id is printed on stdout as its ack arrives, one a line.

Exit codes: 0 every message accepted, 1 some refused by the server (each named on stderr, with
its line number and the error; a refused token too), 2 no server answered, the connection
failed, was lost or timed out (what was not delivered is named), or the server's certificate
did not verify. ``--timeout`` bounds connecting, and then the wait for each answer.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator

import trio

from broadcast.client.chat import Tally, Undelivered, shorten
from broadcast.client.connection import (
    ChatConnection,
    ConnectionLost,
    Denied,
    Target,
    open_chat,
)
from broadcast.client.failures import FAILED, ONE_SHOT_FAILURES, REFUSED, one_shot_failure, report
from broadcast.client.pacing import Deliveries, Pacer, Retries
from broadcast.client.render import error_text
from broadcast.client.sanitize import sanitize
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.lines import LineSplitter

ACCEPTED = 0
_READ_CHUNK = 65536

Numbered = tuple[int, str | ProtocolError]


class NoAnswer(Exception):
    """The connection ended, or stayed silent, before the answer to a message."""

    def __init__(self, why: str, *, maybe_sent: bool) -> None:
        super().__init__(why)
        self.why = why
        self.maybe_sent = maybe_sent


async def one_message(text: str) -> AsyncIterator[Numbered]:
    yield 1, text


async def stdin_lines(fd: int = 0) -> AsyncIterator[Numbered]:
    """Each line of ``fd`` with its number (blank ones skipped); a line the splitter refuses
    (too long, not UTF-8) comes as its error, to be counted as not delivered."""
    splitter = LineSplitter()
    number = 0
    while True:
        data = await trio.to_thread.run_sync(os.read, fd, _READ_CHUNK, abandon_on_cancel=True)
        for item in splitter.feed(data or b"\n"):  # a last line without its newline ends too
            number += 1
            if isinstance(item, ProtocolError) or item.strip():
                yield number, item
        if not data:
            return


class Sender:
    """Messages over one connection, one at a time, each until the server answers."""

    def __init__(self, chat: ChatConnection, seconds: float) -> None:
        self._chat = chat
        self._seconds = seconds
        self._deliveries = Deliveries()
        self._pacer = Pacer.for_welcome(chat.welcome)
        self._refs = itertools.count(1)
        self._lost: str | None = None  # why the connection ended, once it has

    async def read_answers(self) -> None:
        """Hand acks and errors to whoever waits for them, until the connection ends."""
        try:
            while True:
                frame = await self._chat.receive()
                answered = frame.kind in ("ack", "error") and self._deliveries.answer(frame.event)
                if frame.kind == "error" and not answered:  # not about a message: say it anyway
                    report(f"the server said: {error_text(frame.event)}")
        except (ConnectionLost, Denied) as exc:
            self._lost = str(exc.reason if isinstance(exc, ConnectionLost) else exc.text)
            self._deliveries.lose_all()

    async def deliver(self, text: str) -> dict[str, object]:
        """The ``ack``, or the ``error`` that refused ``text`` for good; NoAnswer otherwise."""
        retries = Retries()
        while True:
            await self._pacer.wait()
            if self._lost is not None:
                raise NoAnswer(f"connection lost: {self._lost}", maybe_sent=False)
            ref = f"send-{next(self._refs)}"
            pending = self._deliveries.expect(ref)
            try:
                await self._chat.publish(text, ref)
            except (ConnectionLost, Denied) as exc:
                raise NoAnswer(f"connection lost: {exc}", maybe_sent=False) from None
            with trio.move_on_after(self._seconds) as waited:
                answer = await pending.wait()
            if waited.cancelled_caught:
                raise NoAnswer(f"no answer within {self._seconds:g} s", maybe_sent=True)
            if answer is None:
                raise NoAnswer(f"connection lost: {self._lost}", maybe_sent=True)
            if answer.get("type") == "ack":
                return answer
            if (delay := retries.delay(answer, self._pacer)) is None:
                return answer
            await trio.sleep(delay)


async def run_send(target: Target, text: str | None, seconds: float, *, fd: int = 0) -> int:
    """Publish ``text`` (or the lines of ``fd``); return an exit code, saying on stderr what
    failed."""
    messages = one_message(text) if text is not None else stdin_lines(fd)
    try:
        async with open_chat(target, seconds) as chat:
            return await _send_all(chat, messages, target.url, seconds, single=text is not None)
    except ONE_SHOT_FAILURES as exc:
        return one_shot_failure(exc, target.url)


async def _send_all(
    chat: ChatConnection,
    messages: AsyncIterator[Numbered],
    url: str,
    seconds: float,
    *,
    single: bool,
) -> int:
    tally = Tally()
    failed: NoAnswer | None = None
    sender = Sender(chat, seconds)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.read_answers)
        async for number, item in messages:
            if isinstance(item, ProtocolError):
                tally.undelivered.append(Undelivered(number, "", f"{item.code}: {item.message}"))
                report(f"line {number} not sent: {item.code}: {item.message}")
            elif failed is not None:  # the connection is gone: the rest is only counted
                tally.undelivered.append(Undelivered(number, item, "not sent"))
            else:
                failed = await _deliver_one(sender, number, item, tally, single=single)
        nursery.cancel_scope.cancel()
    if failed is not None:
        if single:
            note = "; the message may or may not have been sent" if failed.maybe_sent else ""
            report(f"{failed.why} ({url}){note}")
        else:
            report(tally.summary())
        return FAILED
    if tally.undelivered:
        if not single:
            report(tally.summary())
        return REFUSED
    return ACCEPTED


async def _deliver_one(
    sender: Sender, number: int, text: str, tally: Tally, *, single: bool
) -> NoAnswer | None:
    """Send one message and tell how it went; the NoAnswer that ends the sending, if any."""
    try:
        answer = await sender.deliver(text)
    except NoAnswer as exc:
        why = f"{exc.why}; maybe sent" if exc.maybe_sent else exc.why
        tally.undelivered.append(Undelivered(number, text, why))
        return exc
    if answer.get("type") == "ack":
        tally.delivered += 1
        print(sanitize(str(answer.get("id"))), flush=True)
        return None
    tally.undelivered.append(Undelivered(number, text, error_text(answer)))
    if single:
        report(f"refused by the server: {error_text(answer)}")
    else:
        report(f"line {number} refused: {error_text(answer)}: {shorten(text)}")
    return None
