"""``broadcast-cli connect``: the interactive chat, whatever the terminal.

Tasks in one nursery: the Link (the network, reconnecting with backoff), the sender (typed lines
to ``publish`` commands through a small bounded channel), a signal watcher, and the reader of
typed lines, which is ``run_chat`` itself. Leaving always takes the same path: the input ends
(``exit``, ``/quit``, Ctrl+C or Ctrl+D at the prompt, end of a pipe, or a signal cancelling the
reading), lines already typed are sent and their acks awaited for a moment, the Link closes the
WebSocket with 1000, and only then is the nursery cancelled.

Two slash commands talk to the server: ``/who`` asks for the channel's ``presence`` and shows
the answer (the snapshot every gateway sends after a welcome is not news and stays unshown);
``/join NAME`` has the Link reconnect to that channel. Lines typed before a ``/join`` are acked
in the old channel first, and lines typed after it wait for the new channel's welcome, so each
line goes where the person meant it to.

A refused token or an untrusted certificate ends the chat too, through the same path: ``run_chat``
raises ``Fatal`` once the nursery is done, so the command can print it on stderr after the
prompt has given the terminal back. A token that expires while chatting (close 4001) is said in
the chat, like any other event, before leaving.
"""

from __future__ import annotations

import itertools
import time

import trio

from broadcast.client.connection import (
    ChatConnection,
    ChatError,
    ConnectionLost,
    Denied,
    Frame,
    Refused,
    Target,
)
from broadcast.client.failures import REFUSED, Fatal, fatal
from broadcast.client.link import Link, server_restarting
from broadcast.client.render import (
    connected_line,
    disconnected_line,
    error_line,
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
from broadcast.protocol.validate import check_channel

# Typed lines waiting for the sender. A person never fills it; a pipe simply waits.
LINE_QUEUE_SIZE = 16
# On leaving, how long lines already sent may wait for their acks.
DRAIN_SECONDS = 5.0
# After /join, how long typed lines wait for the new channel's welcome before being refused.
MOVE_SECONDS = 10.0

QUIT_WORDS = frozenset({"exit", "/quit"})
HELP = "/who, /join CHANNEL; /quit, exit, Ctrl+C or Ctrl+D to leave"


class ChatRoom:
    """The chat as the person sees it: sends their lines, prints what arrives.

    Called only from trio tasks. Our own lines are printed when the server acks them (the
    server does not echo them to us), so what is on screen is what others received. The Link
    has already dropped any message shown before, our own acked ones included.
    """

    def __init__(self, target: Target, terminal: Terminal) -> None:
        self._target = target
        self._terminal = terminal
        self._show = terminal.show
        self._link: Link | None = None  # set by ``use``; /join moves it
        self._chat: ChatConnection | None = None
        self._channel: str | None = None  # of the last welcome: a new one there means a move
        self._asked_who = 0  # /who sent on this connection and not yet answered
        self._arrived = trio.Event()  # the outcome of the latest /join: welcomed, or not
        self._refs = itertools.count(1)
        self._unconfirmed: dict[str, str] = {}  # ref -> text: sent, no ack or error yet
        self._settled = trio.Event()  # set while nothing is unconfirmed nor asked
        self._settled.set()
        self.first_connection = trio.Event()
        self.all_sent = trio.Event()  # the input ended and every line was handled

    def use(self, link: Link) -> None:
        self._link = link

    # --- Sink: called by the Link -------------------------------------------------

    def connected(self, chat: ChatConnection) -> None:
        self._chat = chat
        self._asked_who = 0
        self._check_settled()
        self.first_connection.set()
        if self._channel is not None and chat.channel != self._channel:
            self._show(notice_line(f"you are now in #{chat.channel}"))
            self._terminal.set_channel(chat.channel)
        else:
            self._show(connected_line(self._target.url, chat.name, chat.channel))
        self._channel = chat.channel
        self._arrived.set()

    def received(self, frame: Frame) -> None:
        kind, event = frame.kind, frame.event
        ref = event.get("ref")
        if kind == "ack" and isinstance(ref, str):
            text = self._confirm(ref)
            if text is not None and self._chat is not None:
                self._show(message_line(self._chat.name, text, time.time()))
        elif kind == "error":
            if isinstance(ref, str):
                self._confirm(ref)
            self._show(error_line(event))
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

    def disconnected(self, error: ChatError, retry_in: float) -> None:
        self.ended()
        self._arrived.set()  # a /join waiting for its welcome hears no better news for now
        self._show(
            disconnected_line(
                self._target.url,
                error.reason,
                retry_in,
                was_connected=isinstance(error, ConnectionLost),
                restarting=server_restarting(error),
            )
        )

    def ended(self) -> None:
        """The connection is gone: lines still waiting for an answer may not have been sent."""
        self._chat = None
        for text in self._unconfirmed.values():
            self._show(f"! connection lost before an answer; maybe not sent: {sanitize(text)}")
        self._unconfirmed.clear()
        self._asked_who = 0
        self._settled.set()
        self._arrived.set()

    # --- the person's side ---------------------------------------------------------------

    async def send_lines(self, lines: trio.MemoryReceiveChannel[str]) -> None:
        """Publish each typed line in order until the input ends."""
        async with lines:
            async for line in lines:
                await self.say(line)
        self.all_sent.set()

    async def say(self, line: str) -> None:
        """Publish one typed line, or explain why it was not sent; never drop it silently."""
        if not line.strip():
            return
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            await self._command(line.split())
            return
        chat = self._chat
        if chat is None:
            self._show(f"! not connected, not sent: {sanitize(line)}")
            return
        ref = f"c-{next(self._refs)}"
        self._unconfirmed[ref] = line
        self._unsettle()
        try:
            await chat.publish(line, ref)
        except (ConnectionLost, Denied) as exc:  # the network task tells why, and what next
            if self._confirm(ref) is not None:
                self._show(f"! not sent ({sanitize(str(exc))}): {sanitize(line)}")

    async def _command(self, words: list[str]) -> None:
        """A slash command typed at the prompt: /who, /join NAME, or an explanation."""
        if words == ["/who"]:
            await self._who()
        elif words[0] == "/join" and len(words) == 2:
            await self._join(words[1])
        elif words[0] == "/join":
            self._show("! usage: /join CHANNEL")
        else:
            command = sanitize(words[0])
            self._show(f"! unknown command {command}; {HELP}; //text sends text starting with /")

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
        """Move to channel ``name``: what was typed before is settled in the old channel, and
        what is typed next waits (a while) for the welcome in the new one."""
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
        self.ended()  # whatever is still unanswered is reported as maybe not sent
        self._arrived = trio.Event()
        await self._link.move(channel)
        with trio.move_on_after(MOVE_SECONDS):
            await self._arrived.wait()

    async def wait_settled(self) -> None:
        """Until every line sent has been acked or refused and every /who answered (or the
        connection dropped): before leaving, and before moving to another channel."""
        while not self._settled.is_set():
            await self._settled.wait()

    def _confirm(self, ref: str) -> str | None:
        text = self._unconfirmed.pop(ref, None)
        self._check_settled()
        return text

    def _unsettle(self) -> None:
        if self._settled.is_set():  # never replace an Event someone may be waiting on
            self._settled = trio.Event()

    def _check_settled(self) -> None:
        if not self._unconfirmed and self._asked_who == 0:
            self._settled.set()


async def run_chat(target: Target, terminal: Terminal) -> int:
    """Chat until the person leaves; 0, or 1 when the server refused our name or channel or
    our token expired. Raises ``Fatal`` for a refused token or an untrusted certificate."""
    room = ChatRoom(target, terminal)
    link = Link(target, room)
    room.use(link)
    typing = trio.CancelScope()  # reading typed lines; cancelled by a signal or a refusal
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
        else:
            return
        room.ended()
        typing.cancel()

    async def stop_typing_on_signal(*, task_status: trio.TaskStatus[None]) -> None:
        await wait_for_leave_signal(task_status=task_status)
        typing.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(stop_typing_on_signal)
        nursery.start_soon(network)
        send_lines, receive_lines = trio.open_memory_channel[str](LINE_QUEUE_SIZE)
        nursery.start_soon(room.send_lines, receive_lines)
        with typing:
            async with send_lines:
                if terminal.waits_for_connection:
                    await room.first_connection.wait()
                while (line := await terminal.read_line()) is not None:
                    if line.strip() in QUIT_WORDS:
                        break
                    await send_lines.send(line)
        with trio.move_on_after(DRAIN_SECONDS) as drain:
            await room.all_sent.wait()
            await room.wait_settled()
        if drain.cancelled_caught:
            terminal.show(f"! leaving after {DRAIN_SECONDS:g} s without an answer for every line")
        await link.leave()
        nursery.cancel_scope.cancel()
    if ending is not None:
        raise ending
    return exit_code
