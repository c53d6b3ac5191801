"""Python clients of the broadcast server API (docs/api.md): ``BroadcastApi`` (sync) and
``AsyncBroadcastApi`` (async, on asyncio or trio), both on httpx.

    from broadcast.client.api import BroadcastApi

    with BroadcastApi("http://127.0.0.1:12345", api_key="...") as api:
        message_id = api.publish("general", "deploy finished")

Every call has a timeout; a call that fails for a reason a retry can fix (no connection, no
answer in time, 503 ``bus_unavailable``, 409 ``idempotency_pending``, 429) is retried with
backoff. ``publish`` and ``broadcast`` send an idempotency key (one is made up unless given)
and send the same key again on a retry, so a retry after a lost answer publishes nothing twice.
Refusals raise ``ApiError`` with the server's stable ``code``.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx

__all__ = [
    "ApiError",
    "AsyncBroadcastApi",
    "BroadcastApi",
    "GatewayInfo",
    "History",
    "Info",
    "Message",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 3
# Backoff between attempts: full jitter over 0.2, 0.4, 0.8 s..., at most 5 s (or Retry-After).
BACKOFF_START = 0.2
BACKOFF_CAP = 5.0
_RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})

T = TypeVar("T")


class ApiError(Exception):
    """The server refused the request (``status`` is its HTTP status), or it could not be
    reached (``status`` 0, ``code`` ``unreachable``)."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})" if status else f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Message:
    id: str
    channel: str
    sender: str
    text: str
    ts: float


@dataclass(frozen=True)
class History:
    channel: str
    messages: list[Message]
    complete: bool
    """False when messages that belong in the answer are gone (trimmed, or cut by ``limit``)."""
    epoch: str | None = None


@dataclass(frozen=True)
class GatewayInfo:
    node: str
    connections: int
    version: str


@dataclass(frozen=True)
class Info:
    version: str
    node: str
    connections: int
    gateways: list[GatewayInfo]


def new_idempotency_key() -> str:
    return secrets.token_urlsafe(18)


class _Calls:
    """What both clients share: building requests and reading answers (no I/O here)."""

    def __init__(self, url: str, api_key: str, retries: int) -> None:
        self.base_url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "broadcast-api"}
        self.retries = retries

    @staticmethod
    def read(response: httpx.Response) -> Any:
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.status_code == 200 and isinstance(document, dict):
            return document
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict):
            code, message = str(error.get("code")), str(error.get("message"))
        else:
            code, message = "http_error", response.text[:200] or response.reason_phrase
        raise ApiError(code, message, response.status_code)

    @staticmethod
    def delay(attempt: int, response: httpx.Response | None) -> float:
        """Retry-After when the server gave one, else jittered exponential backoff."""
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None and retry_after.isdigit():
            return min(float(retry_after), BACKOFF_CAP)
        return random.uniform(0, min(BACKOFF_CAP, BACKOFF_START * 2**attempt))

    @staticmethod
    def retryable(response: httpx.Response) -> bool:
        return response.status_code in _RETRY_STATUSES


def _publish_body(
    channel: str, text: str, sender: str | None, idempotency_key: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": channel, "text": text}
    if sender is not None:
        body["sender"] = sender
    body["idempotency_key"] = idempotency_key or new_idempotency_key()
    return body


def _broadcast_body(
    channels: Sequence[str], text: str, sender: str | None, idempotency_key: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"channels": list(channels), "text": text}
    if sender is not None:
        body["sender"] = sender
    body["idempotency_key"] = idempotency_key or new_idempotency_key()
    return body


def _history(document: dict[str, Any]) -> History:
    messages = [
        Message(m["id"], m["channel"], m["sender"], m["text"], m["ts"])
        for m in document["messages"]
    ]
    return History(document["channel"], messages, document["complete"], document.get("epoch"))


def _info(document: dict[str, Any]) -> Info:
    gateways = [
        GatewayInfo(g["node"], g["connections"], g["version"]) for g in document["gateways"]
    ]
    return Info(document["version"], document["node"], document["connections"], gateways)


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class BroadcastApi:
    """The server API from synchronous code (scripts, Django views, cron jobs)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._calls = _Calls(url, api_key, retries)
        self._http = httpx.Client(
            base_url=self._calls.base_url,
            headers=self._calls.headers,
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> BroadcastApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def publish(
        self,
        channel: str,
        text: str,
        *,
        sender: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Publish ``text`` to ``channel``; returns the message id."""
        body = _publish_body(channel, text, sender, idempotency_key)
        return self._call("POST", "/api/publish", json=body)["id"]

    def broadcast(
        self,
        channels: Sequence[str],
        text: str,
        *,
        sender: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, str]:
        """Publish ``text`` to every channel; returns the message id in each."""
        body = _broadcast_body(channels, text, sender, idempotency_key)
        return self._call("POST", "/api/broadcast", json=body)["ids"]

    def history(
        self, channel: str, *, since: str | None = None, limit: int | None = None
    ) -> History:
        params = _params(channel=channel, since=since, limit=limit)
        return _history(self._call("GET", "/api/history", params=params))

    def presence(self, channel: str) -> list[str]:
        return self._call("GET", "/api/presence", params={"channel": channel})["members"]

    def channels(self) -> dict[str, int]:
        return self._call("GET", "/api/channels")["channels"]

    def info(self) -> Info:
        return _info(self._call("GET", "/api/info"))

    def disconnect(self, name: str) -> int:
        """Close every connection of ``name`` on every gateway; returns how many were closed."""
        return self._call("POST", "/api/disconnect", json={"name": name})["disconnected"]

    def _call(self, method: str, path: str, **options: Any) -> Any:
        return _retry(lambda: self._http.request(method, path, **options), self._calls, time.sleep)


class AsyncBroadcastApi:
    """The server API from async code, on asyncio (FastAPI, aiohttp) or trio."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._calls = _Calls(url, api_key, retries)
        self._http = httpx.AsyncClient(
            base_url=self._calls.base_url,
            headers=self._calls.headers,
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncBroadcastApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def publish(
        self,
        channel: str,
        text: str,
        *,
        sender: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        body = _publish_body(channel, text, sender, idempotency_key)
        return (await self._call("POST", "/api/publish", json=body))["id"]

    async def broadcast(
        self,
        channels: Sequence[str],
        text: str,
        *,
        sender: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, str]:
        body = _broadcast_body(channels, text, sender, idempotency_key)
        return (await self._call("POST", "/api/broadcast", json=body))["ids"]

    async def history(
        self, channel: str, *, since: str | None = None, limit: int | None = None
    ) -> History:
        params = _params(channel=channel, since=since, limit=limit)
        return _history(await self._call("GET", "/api/history", params=params))

    async def presence(self, channel: str) -> list[str]:
        return (await self._call("GET", "/api/presence", params={"channel": channel}))["members"]

    async def channels(self) -> dict[str, int]:
        return (await self._call("GET", "/api/channels"))["channels"]

    async def info(self) -> Info:
        return _info(await self._call("GET", "/api/info"))

    async def disconnect(self, name: str) -> int:
        return (await self._call("POST", "/api/disconnect", json={"name": name}))["disconnected"]

    async def _call(self, method: str, path: str, **options: Any) -> Any:
        calls = self._calls
        attempt = 0
        while True:
            response = None
            try:
                response = await self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                if attempt >= calls.retries:
                    raise ApiError("unreachable", str(exc) or type(exc).__name__, 0) from exc
            else:
                if attempt >= calls.retries or not calls.retryable(response):
                    return calls.read(response)
            await anyio.sleep(calls.delay(attempt, response))
            attempt += 1


def _retry(
    send: Callable[[], httpx.Response], calls: _Calls, sleep: Callable[[float], None]
) -> Any:
    attempt = 0
    while True:
        response = None
        try:
            response = send()
        except httpx.TransportError as exc:
            if attempt >= calls.retries:
                raise ApiError("unreachable", str(exc) or type(exc).__name__, 0) from exc
        else:
            if attempt >= calls.retries or not calls.retryable(response):
                return calls.read(response)
        sleep(calls.delay(attempt, response))
        attempt += 1
