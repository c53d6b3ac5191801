"""``broadcast-cli connect``: the interactive chat, whatever the terminal.

Tasks in one nursery: the Link (the network, reconnecting with backoff), the sender (typed lines
to ``publish`` commands through a small bounded channel), a signal watcher, and the reader of
typed lines, which is ``run_chat`` itself. Leaving always takes the same path: the input ends
(``exit``, ``/quit``, Ctrl+C or Ctrl+D at the prompt, end of a pipe, or a signal cancelling the
reading), lines already typed are sent and their acks awaited, the Link closes the WebSocket
with 1000, and only then is the nursery cancelled.

The sender sends one message at a time and waits for its answer before the next, paced to the
server's rate (pacing.py): so the order is kept even when the server refuses a message for
coming too early (``rate_limited``) and it is sent again after the server's hint. The answer
usually takes a millisecond; the rate, not the wait, bounds a pipe. Lines from a pipe also wait
(a while) for a connection that is down, since nobody is there to type them again; when a line
cannot be delivered after all, it is named, and the chat exits 1 at the end.

Slash commands: ``/who`` asks for the channel's ``presence`` and shows the answer (the snapshot
every gateway sends after a welcome is not news and stays unshown); ``/join NAME`` has the Link
reconnect to that channel; ``/name NAME`` renames us with a ``hello`` (the server answers with a
new welcome); ``/help`` lists them. Lines typed before a ``/join`` are acked in the old channel
first, and lines typed after it wait for the new channel's welcome, so each line goes where the
person meant it to.

A refused token, an untrusted certificate or a first connection that cannot be made ends the
chat too, through the same path: ``run_chat`` raises ``Fatal`` once the nursery is done, so the
command can print it on stderr after the prompt has given the terminal back. A token that
expires while chatting (close 4001) is said in the chat, like any other event, before leaving.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import trio

from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Denied,
    Frame,
    Refused,
    Target,
    Unreachable,
)
from broadcast.client.failures import FAILED, REFUSED, Fatal, fatal
from broadcast.client.link import Link, server_shut_down
from broadcast.client.pacing import Deliveries, Pacer, Retries
from broadcast.client.render import (
    connected_line,
    disconnected_line,
    error_line,
    error_text,
    message_line,
    notice_line,
    presence_line,
    recovered_line,
    render_event,
)
from broadcast.client.sanitize import sanitize
from broadcast.client.signals import wait_for_leave_signal
from broadcast.client.terminal import Terminal
from broadcast.client.transport import ServerNotTrusted
from broadcast.protocol.errors import ProtocolError
from broadcast.protocol.validate import check_channel, check_name

# Typed lines waiting for the sender. A person never fills it; a pipe simply waits.
LINE_QUEUE_SIZE = 16
# On leaving a prompt, how long lines already sent may wait for their acks. A pipe waits for
# every line: each is bounded by itself (PIPE_CONNECTION_WAIT, the retries).
DRAIN_SECONDS = 5.0
# After /join, how long typed lines wait for the new channel's welcome before being refused.
MOVE_SECONDS = 10.0
# A line from a pipe waits this long for a connection that is down before it is given up.
PIPE_CONNECTION_WAIT = 30.0
# Lines named in the summary of what was not delivered; the count covers the rest.
SUMMARY_LINES = 10
SHORT_TEXT = 60

QUIT_WORDS = frozenset({"exit", "/quit"})
HELP = "/who, /join CHANNEL, /name NAME, /help; /quit, exit, Ctrl+C or Ctrl+D to leave"
COMMANDS = (
    "commands: /who (who is here), /join CHANNEL (move to another channel), "
    "/name NAME (change your name), /help (this), /quit or exit (leave); "
    "//text sends text starting with /"
)


def shorten(text: str) -> str:
    """A message as named in a note: one line, not too long, safe to print."""
    one_line = text.replace("\n", " \u21b5 ")
    cut = one_line if len(one_line) <= SHORT_TEXT else one_line[: SHORT_TEXT - 1] + "\u2026"
    return sanitize(cut)


@dataclass
class Undelivered:
    """A line that did not reach the server, or may not have: its number and why."""

    number: int
    text: str
    why: str


@dataclass
class Tally:
    """What became of the lines: for the summary a pipe gets at the end."""

    delivered: int = 0
    undelivered: list[Undelivered] = field(default_factory=list)

    def summary(self) -> str:
        total = self.delivered + len(self.undelivered)
        named = "; ".join(
            f"line {u.number} ({u.why})" + (f": {shorten(u.text)}" if u.text else "")
            for u in self.undelivered[:SUMMARY_LINES]
        )
        more = len(self.undelivered) - SUMMARY_LINES
        rest = f"; and {more} more" if more > 0 else ""
        return f"{len(self.undelivered)} of {total} messages not delivered: {named}{rest}"


class ChatRoom:
    """The chat as the person sees it: sends their lines, prints what arrives.

    Called only from trio tasks. Our own lines are printed when the server acks them (the
    server does not echo them to us), so what is on screen is what others received. The Link
    has already dropped any message shown before, our own acked ones included.

    ``patient``: lines come from a pipe. They wait for a connection that is down (up to
    PIPE_CONNECTION_WAIT) instead of being refused at once as "not connected".
    """

    def __init__(self, target: Target, terminal: Terminal, *, patient: bool = False) -> None:
        self._target = target
        self._terminal = terminal
        self._show = terminal.show
        self._patient = patient
        self._link: Link | None = None  # set by ``use``; /join moves it
        self._chat: ChatConnection | None = None
        self._online = trio.Event()  # set while connected, and once the Link gave up for good
        self._gone = False  # the Link gave up: nothing will be sent any more
        self._channel: str | None = None  # of the last welcome: a new one there means a move
        self._asked_who = 0  # /who sent on this connection and not yet answered
        self._arrived = trio.Event()  # the outcome of the latest /join: welcomed, or not
        self._refs = itertools.count(1)
        self._deliveries = Deliveries()
        self._pacer = Pacer(None)
        self._settled = trio.Event()  # set while no /who waits for its answer
        self._settled.set()
        self._outages = 0  # failed attempts since the connection was last up
        self._waited_in_vain = False  # a line from a pipe waited out this outage already
        self.tally = Tally()
        self.first_connection = trio.Event()
        self.all_sent = trio.Event()  # the input ended and every line was handled

    def use(self, link: Link) -> None:
        self._link = link

    # --- Sink: called by the Link -------------------------------------------------

    async def connected(self, chat: ChatConnection) -> None:
        self._chat = chat
        self._pacer = Pacer.for_welcome(chat.welcome)
        self._online.set()
        self._asked_who = 0
        self._check_settled()
        self.first_connection.set()
        self._waited_in_vain = False
        if self._outages:
            self._terminal.outage_over()
        self._outages = 0
        if self._channel is not None and chat.channel != self._channel:
            self._show(notice_line(f"you are now in #{chat.channel}"))
            self._terminal.set_channel(chat.channel)
        else:
            self._show(connected_line(self._target.url, chat.name, chat.channel))
        self._channel = chat.channel
        self._arrived.set()

    async def received(self, frame: Frame) -> None:
        kind, event = frame.kind, frame.event
        if kind in ("ack", "error") and self._deliveries.answer(event):
            return  # the sender waits for it, and tells
        if kind == "error":
            self._show(error_line(event))
        elif kind == "welcome":  # the answer to /name
            self._show(notice_line(f"you are now {event.get('name')}"))
        elif kind == "presence":
            if self._asked_who > 0:  # an answer to /who, not the snapshot after a welcome
                self._asked_who -= 1
                self._show(presence_line(event))
                self._check_settled()
        elif kind == "recovered":
            replay = None if self._chat is None else self._chat.replay
            if (line := recovered_line(event, replay)) is not None:
                self._show(line)
        elif (line := render_event(event)) is not None:
            self._show(line)

    async def disconnected(self, error: ChatError, retry_in: float) -> None:
        """The first failure of an outage gets a line of its own; the next ones update the
        status line in place."""
        self.ended()
        self._arrived.set()  # a /join waiting for its welcome hears no better news for now
        self._outages += 1
        if self._outages == 1:
            self._show(
                disconnected_line(
                    self._target.url,
                    error.reason,
                    retry_in,
                    was_connected=isinstance(error, ConnectionLost),
                    shut_down=server_shut_down(error),
                )
            )
        else:
            self._terminal.outage(self._target.url, error.reason, retry_in, self._outages)

    def ended(self) -> None:
        """The connection is gone: lines waiting for an answer get none."""
        self._chat = None
        if self._online.is_set() and not self._gone:
            self._online = trio.Event()
        self._deliveries.lose_all()
        self._asked_who = 0
        self._settled.set()
        self._arrived.set()

    def gone(self) -> None:
        """The Link gave up for good: lines waiting for a connection stop waiting."""
        self._gone = True
        self.ended()
        self._online.set()

    # --- the person's side ---------------------------------------------------------------

    async def send_lines(self, lines: trio.MemoryReceiveChannel[tuple[int, str]]) -> None:
        """Publish each typed line in order until the input ends."""
        async with lines:
            async for number, line in lines:
                await self.say(line, number)
        self.all_sent.set()

    async def say(self, line: str, number: int = 0) -> None:
        """Publish one typed line, or explain why it was not sent; never drop it silently."""
        if not line.strip():
            return
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            await self._command(line.split())
            return
        await self._deliver(line, number)

    async def _deliver(self, text: str, number: int) -> None:
        """Send ``text`` until the server acks it, or it is clear that it cannot."""
        retries = Retries()
        while True:
            chat = await self._connection()
            if chat is None:
                self._undelivered(number, text, "not connected")
                return
            await self._pacer.wait()
            if chat is not self._chat:
                continue  # dropped while we waited
            ref = f"c-{next(self._refs)}"
            pending = self._deliveries.expect(ref)
            try:
                await chat.publish(text, ref)
            except (ConnectionLost, Denied):  # not sent: try again once connected
                self._deliveries.answer({"ref": ref})
                continue
            answer = await pending.wait()
            if answer is None:
                self._undelivered(number, text, "connection lost before an answer; maybe sent")
                return
            if answer.get("type") == "ack":
                self.tally.delivered += 1
                self._show(message_line(chat.name, text, time.time()))
                return
            if (delay := retries.delay(answer, self._pacer)) is None:
                self._undelivered(number, text, error_text(answer), shown=error_line(answer))
                return
            await trio.sleep(delay)

    async def _connection(self) -> ChatConnection | None:
        """The connection to send on; from a pipe, wait a while for one that is down."""
        if self._chat is not None or not self._patient or self._gone or self._waited_in_vain:
            return self._chat
        with trio.move_on_after(PIPE_CONNECTION_WAIT) as waited:
            while self._chat is None and not self._gone:
                await self._online.wait()
        # The next lines do not wait again, each as long, for the same outage.
        self._waited_in_vain = waited.cancelled_caught
        return self._chat

    def _undelivered(self, number: int, text: str, why: str, *, shown: str = "") -> None:
        self.tally.undelivered.append(Undelivered(number, text, why))
        if why == "not connected":
            self._show(f"! not connected, not sent: {shorten(text)}")
        elif shown:
            self._show(f"{shown}; not sent: {shorten(text)}")
        else:
            self._show(f"! {sanitize(why)}: {shorten(text)}")

    async def _command(self, words: list[str]) -> None:
        """A slash command typed at the prompt, or an explanation."""
        verb = words[0].lower()
        if words == ["/who"]:
            await self._who()
        elif verb == "/join" and len(words) == 2:
            await self._join(words[1])
        elif verb == "/name" and len(words) >= 2:
            await self._rename(" ".join(words[1:]))
        elif verb in ("/join", "/name"):
            self._show(f"! usage: {verb} {'CHANNEL' if verb == '/join' else 'NAME'}")
        elif verb == "/help":
            self._show(notice_line(COMMANDS))
        else:
            command = sanitize(words[0])
            self._show(f"! unknown command {command}; {HELP}; //text sends text starting with /")

    async def _rename(self, name: str) -> None:
        try:
            name = check_name(name)
        except ProtocolError as exc:
            self._show(f"! {exc.code}: {exc.message}")
            return
        assert self._link is not None, "use(link) first"
        try:
            await self._link.rename(name)
        except (ConnectionLost, Denied):
            self._show("! not connected; try /name again once connected")

    async def _who(self) -> None:
        chat = self._chat
        if chat is None:
            self._show("! not connected; try /who again once connected")
            return
        self._asked_who += 1
        self._unsettle()
        try:
            await chat.who()
        except (ConnectionLost, Denied):  # the network task tells why, and what next
            self._asked_who = 0
            self._check_settled()

    async def _join(self, name: str) -> None:
        """Move to channel ``name``: what was typed before is settled in the old channel (the
        sender waits for each answer), and what is typed next waits (a while) for the welcome
        in the new one."""
        try:
            channel = check_channel(name)
        except ProtocolError as exc:
            self._show(f"! {exc.code}: {exc.message}")
            return
        assert self._link is not None, "use(link) first"
        if channel == self._link.channel:
            self._show(notice_line(f"you are already in #{channel}"))
            return
        with trio.move_on_after(DRAIN_SECONDS):
            await self.wait_settled()
        self.ended()
        self._arrived = trio.Event()
        await self._link.move(channel)
        with trio.move_on_after(MOVE_SECONDS):
            await self._arrived.wait()

    async def wait_settled(self) -> None:
        """Until every /who has been answered (or the connection dropped): before leaving,
        and before moving to another channel."""
        while not self._settled.is_set():
            await self._settled.wait()

    def _unsettle(self) -> None:
        if self._settled.is_set():  # never replace an Event someone may be waiting on
            self._settled = trio.Event()

    def _check_settled(self) -> None:
        if self._asked_who == 0:
            self._settled.set()


async def run_chat(target: Target, terminal: Terminal) -> int:
    """Chat until the person leaves; 0, or 1 when the server refused our name or channel, our
    token expired, or lines from a pipe were not delivered. Raises ``Fatal`` for a refused
    token, an untrusted certificate, or a first connection that could not be made."""
    patient = terminal.waits_for_connection
    room = ChatRoom(target, terminal, patient=patient)
    link = Link(target, room)
    room.use(link)
    typing = trio.CancelScope()  # reading typed lines; cancelled by a signal or a refusal
    draining = trio.CancelScope()  # waiting for the last lines' answers; cancelled likewise
    exit_code = 0
    ending: Fatal | None = None
    terminal.show(notice_line(f"connecting to {target.url} ({HELP})"))

    async def network() -> None:
        nonlocal exit_code, ending
        try:
            await link.run()
        except Refused as exc:
            terminal.show(error_line(exc.event))
            exit_code = REFUSED
        except Denied as exc:
            if exc.live:
                terminal.show(f"! {sanitize(exc.text)}")
                exit_code = REFUSED
            else:
                ending = fatal(exc)
        except ServerNotTrusted as exc:
            ending = fatal(exc)
        except Unreachable as exc:  # the first connection: a wrong port or host, most likely
            ending = Fatal(f"cannot reach {target.url}: {exc.reason}", FAILED)
        else:
            return
        room.gone()
        typing.cancel()
        if ending is not None:
            draining.cancel()

    async def stop_on_signal(*, task_status: trio.TaskStatus[None]) -> None:
        await wait_for_leave_signal(task_status=task_status)
        typing.cancel()
        draining.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(stop_on_signal)
        nursery.start_soon(network)
        send_lines, receive_lines = trio.open_memory_channel[tuple[int, str]](LINE_QUEUE_SIZE)
        nursery.start_soon(room.send_lines, receive_lines)
        with typing:
            async with send_lines:
                if patient:
                    await room.first_connection.wait()
                number = 0
                while (line := await terminal.read_line()) is not None:
                    number += 1
                    if line.strip() in QUIT_WORDS:
                        break
                    await send_lines.send((number, line))
        with draining:
            if patient:
                await room.all_sent.wait()
                with trio.move_on_after(DRAIN_SECONDS):
                    await room.wait_settled()  # a last /who's answer
            else:
                with trio.move_on_after(DRAIN_SECONDS) as drain:
                    await room.all_sent.wait()
                    await room.wait_settled()
                if drain.cancelled_caught:
                    terminal.show(
                        f"! leaving after {DRAIN_SECONDS:g} s without an answer for every line"
                    )
        await link.leave()
        nursery.cancel_scope.cancel()
    if ending is not None:
        raise ending
    if patient and room.tally.undelivered:
        raise Fatal(room.tally.summary(), REFUSED)
    return exit_code
