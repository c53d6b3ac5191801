"""The web page in a real browser: Debian's chromium, driven by Playwright for Python.

Real gateways (subprocesses, one private redis-server between them) serve the page; two browser
pages and a raw WebSocket client (what the CLI speaks) chat across gateways. The page must show
who is online, mark its own messages, render other people's text as text (never HTML), and come
back after its gateway restarts, recovering what it missed.

Playwright's sync API must not run inside trio, and its objects belong to the thread that made
them: every browser call runs in one dedicated worker thread, which the trio test awaits.
Every wait is bounded (Playwright timeouts, ``trio.fail_after``); none is a sleep.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from tests.support.clients import ws_client
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer, free_port

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"{CHROMIUM} is not installed (scripts/install-system-deps installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
)
expect = sync_api.expect

pytestmark = pytest.mark.cluster

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000  # one browser wait; a busy 2-core CI machine, never reached in a good run
RECONNECT_WAIT_MS = 40_000  # the page retries by ~1, 3, 7, 15, 31 s (backoff with jitter)
TEST_SECONDS = 150
DESKTOP = {"width": 1100, "height": 700}
PHONE = {"width": 390, "height": 844}
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
XSS = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(3)</script>"
CLOCK = re.compile(r"^\d\d:\d\d$")

T = TypeVar("T")


class BrowserThread:
    """Chromium and every page, owned by one thread; trio awaits each call made there."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self._playwright: Any = None
        self.browser: Any = None

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """From outside trio (fixtures): run in the browser thread and wait."""
        return self._thread.submit(fn, *args).result(timeout=120)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """From a trio test: run in the browser thread; trio stays free meanwhile."""
        future = self._thread.submit(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    def start(self) -> None:
        def launch() -> None:
            self._playwright = sync_api.sync_playwright().start()
            self.browser = self._playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
            )

        self.call(launch)

    def close(self) -> None:
        def stop() -> None:
            if self.browser is not None:
                self.browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        try:
            self.call(stop)
        finally:
            self._thread.shutdown(wait=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    thread = BrowserThread()
    thread.start()
    try:
        yield thread
    finally:
        thread.close()


class ChatPage:
    """One browser tab on the page, with its own storage; every method runs in the browser
    thread (call them through ``BrowserThread.run``)."""

    def __init__(self, browser: Any, url: str, *, phone: bool = False) -> None:
        options: dict[str, Any] = {"viewport": PHONE if phone else DESKTOP}
        if phone:
            options.update(device_scale_factor=2, is_mobile=True, has_touch=True)
        self.context = browser.new_context(**options)
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.page.on("dialog", self._on_dialog)
        self.page.on("console", lambda message: self.console.append(message.text))
        self.response = self.page.goto(url)

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def close(self) -> None:
        self.context.close()

    def join(self, name: str, channel: str = "general") -> None:
        self.page.fill("#name", name)
        self.page.fill("#channel", channel)
        self.page.click("#join")
        self.expect_state("connected")

    def say(self, text: str) -> None:
        """Type a line and press Enter, as a person would."""
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")
        expect(self.page.locator("#text")).to_have_value("")

    def expect_state(self, state: str, timeout: float = WAIT_MS) -> None:
        expect(self.page.locator("#state")).to_have_attribute("data-state", state, timeout=timeout)

    def message(self, text: str) -> Any:
        """The chat rows whose text is exactly ``text``."""
        return self.page.locator(
            "#log li.msg", has=self.page.locator(".text").get_by_text(text, exact=True)
        )

    def expect_message(self, text: str, sender: str, *, own: bool) -> None:
        row = self.message(text)
        expect(row).to_have_count(1)
        expect(row.locator(".sender")).to_have_text(sender)
        expect(row.locator(".time")).to_have_text(CLOCK)
        if own:
            expect(row).to_have_class(re.compile(r"\bown\b"))
        else:
            expect(row).not_to_have_class(re.compile(r"\bown\b"))

    def expect_no_message(self, text: str) -> None:
        expect(self.message(text)).to_have_count(0)

    def expect_notice(self, text: str, timeout: float = WAIT_MS) -> None:
        notice = self.page.locator("#log li.notice", has_text=text).first
        expect(notice).to_be_visible(timeout=timeout)

    def expect_presence(self, *names: str) -> None:
        """The online list, in order; this page's own name reads "NAME (you)"."""
        expect(self.page.locator("#people li")).to_have_text(list(names))
        expect(self.page.locator("#count")).to_have_text(str(len(names)))

    def count(self, selector: str) -> int:
        return self.page.locator(selector).count()

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]


@asynccontextmanager
async def open_pages(browser: BrowserThread) -> AsyncIterator[Callable[..., Any]]:
    """``await open_page(url, phone=False)`` opens a tab; all are checked and closed at the end."""
    pages: list[ChatPage] = []

    async def open_page(url: str, *, phone: bool = False) -> ChatPage:
        page = await browser.run(partial(ChatPage, browser.browser, url, phone=phone))
        pages.append(page)
        return page

    try:
        yield open_page
        for page in pages:
            assert page.dialogs == [], "the page opened a dialog: something ran"
            assert page.csp_violations() == [], "the page broke its Content-Security-Policy"
    finally:
        for page in pages:
            await browser.run(page.close)


@asynccontextmanager
async def gateways(
    redis: RedisServer | None, *nodes: str | tuple[str, int]
) -> AsyncIterator[dict[str, GatewayProcess]]:
    """Gateways started side by side (``(node, port)`` for a fixed port); stopped at the end."""
    started: dict[str, GatewayProcess] = {}

    async def start(node: str | tuple[str, int]) -> None:
        name, port = (node, 0) if isinstance(node, str) else node
        url = redis.url if redis is not None else None
        started[name] = await trio.to_thread.run_sync(
            partial(GatewayProcess, redis_url=url, node_id=name, port=port)
        )

    try:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(start, node)
        yield started
    finally:
        for gateway in started.values():
            gateway.kill()


async def next_message(client: Any) -> tuple[str, str]:
    """(sender, text) of a raw client's next chat message, passing over notices."""
    event = await client.expect("message", skip=("join", "leave", "presence", "presence_diff"))
    return event["sender"], event["text"]


def forget_history(redis: RedisServer, channel: str) -> None:
    """What an expired stream or a Redis restart without persistence would do."""
    with redis.client() as client:
        client.delete(f"broadcast:history:{channel}")


def page_url(gateway: GatewayProcess) -> str:
    return f"http://127.0.0.1:{gateway.port}/"


async def test_pages_and_a_client_chat_across_gateways(
    browser: BrowserThread, redis_server: RedisServer
) -> None:
    with trio.fail_after(TEST_SECONDS):
        async with (
            gateways(redis_server, "gw-a", "gw-b", "gw-c") as gw,
            open_pages(browser) as open_page,
        ):
            run = browser.run
            alice = await open_page(page_url(gw["gw-a"]))
            headers = await run(alice.response.all_headers)
            assert "script-src 'self'" in headers["content-security-policy"]

            await run(alice.join, "alice")
            await run(alice.expect_presence, "alice (you)")

            bob = await open_page(page_url(gw["gw-b"]), phone=True)
            await run(bob.join, "bob")
            await run(bob.page.click, "#presence summary")  # folded on a phone: unfold it
            await run(bob.expect_presence, "alice", "bob (you)")
            await run(alice.expect_presence, "alice (you)", "bob")
            await run(alice.expect_notice, "bob joined")

            async with ws_client(gw["gw-c"].url, name="carol", channel="general") as carol:
                assert carol.presence == ["alice", "bob", "carol"]
                await run(alice.expect_presence, "alice (you)", "bob", "carol")
                await run(bob.expect_presence, "alice", "bob (you)", "carol")

                # A page speaks: it sees its own line marked; everyone else sees it plainly.
                await run(alice.say, "hello from the browser")
                await run(alice.expect_message, "hello from the browser", "alice", own=True)
                await run(bob.expect_message, "hello from the browser", "alice", own=False)
                assert await next_message(carol) == ("alice", "hello from the browser")

                # The terminal speaks, on a third gateway.
                await carol.publish("hello from the terminal")
                for page in (alice, bob):
                    await run(page.expect_message, "hello from the terminal", "carol", own=False)

                await run(bob.say, "hi both")
                await run(bob.expect_message, "hi both", "bob", own=True)
                await run(alice.expect_message, "hi both", "bob", own=False)

            # carol's connection is closed: she leaves every list.
            await run(alice.expect_presence, "alice (you)", "bob")
            await run(bob.expect_presence, "alice", "bob (you)")
            await run(alice.expect_notice, "carol left")

            await run(alice.screenshot, ARTIFACTS / "web-chat.png")
            await run(bob.screenshot, ARTIFACTS / "web-chat-phone.png")


async def test_text_and_names_from_others_render_as_text(
    browser: BrowserThread, redis_server: RedisServer
) -> None:
    """A message (and a name) carrying HTML shows literally: no element made, nothing run."""
    hostile_name = "x<img src=x onerror=alert(2)>"  # a name starts with a letter or digit
    with trio.fail_after(TEST_SECONDS):
        async with (
            gateways(redis_server, "gw-a", "gw-b") as gw,
            open_pages(browser) as open_page,
        ):
            run = browser.run
            alice = await open_page(page_url(gw["gw-a"]))
            await run(alice.join, "alice")
            async with ws_client(gw["gw-b"].url, name=hostile_name, channel="general") as mallory:
                await run(alice.expect_presence, "alice (you)", hostile_name)
                await mallory.publish(XSS)
                await mallory.publish(SCRIPT)
                await run(alice.expect_message, XSS, hostile_name, own=False)
                await run(alice.expect_message, SCRIPT, hostile_name, own=False)
                # The page's own text goes out as text too, and comes back as text.
                await run(alice.say, f"look: {XSS}")
                await run(alice.expect_message, f"look: {XSS}", "alice", own=True)

            assert await run(alice.count, "img") == 0
            assert await run(alice.count, "script") == 1  # app.js, nothing added
            await run(alice.expect_presence, "alice (you)")


async def test_page_reconnects_after_its_gateway_restarts_and_recovers(
    browser: BrowserThread, redis_server: RedisServer
) -> None:
    """Stop the page's gateway, talk meanwhile, start a new one on the same port: the page
    says it is reconnecting, comes back, and shows what it missed once (``since``)."""
    port = free_port()
    with trio.fail_after(TEST_SECONDS):
        async with (
            gateways(redis_server, ("gw-a", port), "gw-b") as gw,
            open_pages(browser) as open_page,
        ):
            run = browser.run
            alice = await open_page(page_url(gw["gw-a"]))
            await run(alice.join, "alice")
            async with ws_client(gw["gw-b"].url, name="bob", channel="general") as bob:
                await bob.publish("before the restart")
                await run(alice.expect_message, "before the restart", "bob", own=False)
                await run(alice.say, "mine, before")
                await run(alice.expect_message, "mine, before", "alice", own=True)
                assert await next_message(bob) == ("alice", "mine, before")

                await trio.to_thread.run_sync(gw["gw-a"].terminate)  # drains: close 1012
                await run(alice.expect_state, "reconnecting")
                await run(alice.expect_notice, "the server shut down")
                await bob.publish("while you were away 1")
                await bob.publish("while you were away 2")

                async with gateways(redis_server, ("gw-a2", port)) as gw2:
                    await run(alice.expect_state, "connected", RECONNECT_WAIT_MS)
                    await run(alice.expect_notice, "2 missed messages recovered")
                    for text in ("while you were away 1", "while you were away 2"):
                        await run(alice.expect_message, text, "bob", own=False)
                    # Replayed from `since`: nothing seen before comes twice.
                    await run(alice.expect_message, "before the restart", "bob", own=False)
                    await run(alice.expect_message, "mine, before", "alice", own=True)
                    state = await run(alice.page.text_content, "#state")
                    assert state == "connected to gw-a2"

                    await run(alice.expect_presence, "alice (you)", "bob")

                    await run(alice.say, "back again")
                    assert await next_message(bob) == ("alice", "back again")
                    await run(alice.expect_message, "back again", "alice", own=True)

                    # Again, but the history is gone meanwhile: the page says something was lost.
                    await trio.to_thread.run_sync(gw2["gw-a2"].terminate)
                    await run(alice.expect_state, "reconnecting")
                    await bob.publish("lost with the history")
                    await trio.to_thread.run_sync(forget_history, redis_server, "general")
                async with gateways(redis_server, ("gw-a3", port)):
                    await run(alice.expect_state, "connected", RECONNECT_WAIT_MS)
                    await run(alice.expect_notice, "some messages were lost")
                    await run(alice.expect_no_message, "lost with the history")


async def test_join_switches_channel_and_settings_are_remembered(browser: BrowserThread) -> None:
    """``/join NAME`` reconnects into that channel only; a reload rejoins where one was."""
    with trio.fail_after(TEST_SECONDS):
        async with gateways(None, "gw-a") as gw, open_pages(browser) as open_page:
            run = browser.run
            url = page_url(gw["gw-a"])
            alice = await open_page(url)
            await run(alice.join, "alice")
            async with (
                ws_client(gw["gw-a"].url, name="bob", channel="general") as bob,
                ws_client(gw["gw-a"].url, name="dave", channel="dev") as dave,
            ):
                await run(alice.expect_presence, "alice (you)", "bob")
                await run(alice.say, "/join dev")
                await run(alice.expect_presence, "alice (you)", "dave")
                await run(alice.expect_state, "connected")
                assert await run(alice.page.text_content, "#room-name") == "#dev"
                assert await run(alice.page.input_value, "#channel") == "dev"

                await bob.publish("only for general")
                await dave.publish("only for dev")
                await run(alice.expect_message, "only for dev", "dave", own=False)
                await run(alice.expect_no_message, "only for general")

                # A plain typo in a command is explained, not sent.
                await run(alice.page.fill, "#text", "/jion general")
                await run(alice.page.press, "#text", "Enter")
                await run(alice.expect_notice, "commands: /join CHANNEL")

                # Name and channel are remembered: a reload joins #dev as alice by itself.
                await run(alice.page.reload)
                await run(alice.expect_state, "connected")
                assert await run(alice.page.input_value, "#name") == "alice"
                assert await run(alice.page.text_content, "#room-name") == "#dev"
                # The channel's recent history is shown to someone (re)arriving.
                await run(alice.expect_message, "only for dev", "dave", own=False)


SECRET = "a-web-test-secret-that-is-long-enough-for-hs256"


async def test_page_logs_in_with_a_token_and_says_when_it_is_missing_or_expired(
    browser: BrowserThread,
) -> None:
    """``#token=`` logs the page in (and leaves the address bar at once); without a token, or
    with an expired one, the page says so instead of retrying in silence."""
    from broadcast.security.tokens import mint_token

    alice_token = mint_token(SECRET, "alice", 600)
    bob_token = mint_token(SECRET, "bob", 600)
    expired = mint_token(SECRET, "carol", 60, now=time.time() - 3600)
    with trio.fail_after(TEST_SECONDS):
        gateway = await trio.to_thread.run_sync(
            partial(GatewayProcess, node_id="gw-auth", extra=("--auth-secret", SECRET))
        )
        try:
            async with open_pages(browser) as open_page:
                run = browser.run
                url = page_url(gateway)
                alice = await open_page(f"{url}#token={alice_token}")
                assert "token" not in await run(lambda: alice.page.url)
                assert await run(alice.page.input_value, "#token") == alice_token
                await run(alice.join, "alice")
                async with ws_client(gateway.url, token=bob_token, channel="general") as bob:
                    await run(alice.say, "hello with a token")
                    assert await next_message(bob) == ("alice", "hello with a token")

                # No token: refused handshakes are explained, not retried in silence.
                carol = await open_page(url)
                await run(carol.page.fill, "#name", "carol")
                await run(carol.page.click, "#join")
                await run(carol.expect_notice, "it may require a token", RECONNECT_WAIT_MS)
                note = carol.page.locator("#form-note")
                await run(expect(note).to_contain_text, "enter it here")

                # An expired one: said plainly, and no more retries with it.
                await run(carol.page.fill, "#token", expired)
                await run(carol.page.click, "#join")
                await run(carol.expect_notice, "your token expired", RECONNECT_WAIT_MS)
                await run(carol.expect_state, "disconnected")
                await run(expect(note).to_contain_text, "your token expired")

                # Validation notes sit under the form and go once the field is right.
                await run(carol.page.fill, "#name", "no:colons")
                await run(carol.page.click, "#join")
                await run(expect(note).to_have_text, "a name may not contain a colon")
                await run(carol.page.fill, "#name", "carol")
                await run(expect(note).to_be_hidden)
        finally:
            gateway.kill()


async def test_multi_line_messages_keep_their_lines_and_history_counts_read_plainly(
    browser: BrowserThread,
) -> None:
    with trio.fail_after(TEST_SECONDS):
        async with gateways(None, "gw-a") as gw, open_pages(browser) as open_page:
            run = browser.run
            async with ws_client(gw["gw-a"].url, name="bob", channel="lines") as bob:
                await bob.publish("earlier")
                alice = await open_page(page_url(gw["gw-a"]))
                await run(alice.join, "alice", "lines")
                await run(alice.expect_notice, "1 earlier message")
                assert "above" not in await run(alice.page.text_content, "#log")
                await bob.publish("line one\n  line two")
                row = alice.page.locator("#log li.msg .text").last
                await run(expect(row).to_have_text, "line one\n  line two")
                box = await run(row.bounding_box)
                one_line = await run(alice.page.locator("#log li.msg .text").first.bounding_box)
                assert box["height"] > 1.5 * one_line["height"]  # shown on two lines


async def test_a_restarted_gateway_is_a_calm_notice_on_the_page(browser: BrowserThread) -> None:
    """One gateway, its history in memory, dies and comes back empty: nobody spoke, so the
    page says the history restarted and nothing was missed, not that messages were lost."""
    port = free_port()
    with trio.fail_after(TEST_SECONDS):
        async with open_pages(browser) as open_page:
            run = browser.run
            async with gateways(None, ("gw-a", port)) as gw:
                alice = await open_page(page_url(gw["gw-a"]))
                await run(alice.join, "alice")
                await run(alice.say, "before")
                await run(alice.expect_message, "before", "alice", own=True)
                await trio.to_thread.run_sync(gw["gw-a"].kill)
                await run(alice.expect_state, "reconnecting")
            async with gateways(None, ("gw-b", port)):
                await run(alice.expect_state, "connected", RECONNECT_WAIT_MS)
                await run(alice.expect_notice, "history of this channel restarted")
                assert "messages were lost" not in await run(alice.page.text_content, "#log")


async def test_a_token_that_expires_while_chatting_is_said_plainly(browser: BrowserThread) -> None:
    """The gateway closes with 4001 when the token expires (after its 10 s leeway): the page
    says the token expired, asks for a new one, and does not retry with the old one."""
    from broadcast.security.tokens import mint_token

    short = mint_token(SECRET, "alice", 1)
    with trio.fail_after(TEST_SECONDS):
        gateway = await trio.to_thread.run_sync(
            partial(GatewayProcess, node_id="gw-exp", extra=("--auth-secret", SECRET))
        )
        try:
            async with open_pages(browser) as open_page:
                run = browser.run
                alice = await open_page(f"{page_url(gateway)}#token={short}")
                await run(alice.join, "alice")
                await run(alice.expect_notice, "your token expired", 30_000)
                await run(alice.expect_state, "disconnected")
                assert await run(alice.page.text_content, "#state") == "token expired"
                assert await run(alice.page.input_value, "#token") == ""
                note = alice.page.locator("#form-note")
                await run(expect(note).to_contain_text, "paste a new one")
        finally:
            gateway.kill()
