"""ServerApi: JSON over HTTP under ``/api/`` for applications that publish (docs/api.md).

The gateway hands it each ``/api/`` request head and the stream; it answers with one complete
response and the connection closes. Publishes go through the bus like a client's, so API
messages share the one order, the history and the recovery of every channel.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Set
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import parse_qsl

import trio

from broadcast.api.cluster import ClusterControl
from broadcast.api.host import ApiHost
from broadcast.api.http import (
    ApiRefusal,
    error_response,
    json_response,
    parse_json_object,
    read_body,
)
from broadcast.api.idempotency import IdempotencyPending, IdempotencyStore, MemoryIdempotency
from broadcast.api.keys import ApiKeys
from broadcast.api.limits import ApiLimits, ApiRates, peer_address
from broadcast.api.openapi import openapi_document
from broadcast.bus.base import BusUnavailable
from broadcast.protocol.envelope import decode, message_body
from broadcast.protocol.errors import ErrorCode, ProtocolError
from broadcast.protocol.http_request import HttpRequest
from broadcast.protocol.limits import RECOVERY_LIMIT
from broadcast.protocol.validate import check_channel, check_message_id, check_name, check_text

log = logging.getLogger("broadcast.api")

DEFAULT_SENDER = "api"
# One request fans out to at most this many channels: each is one publish on the bus.
MAX_BROADCAST_CHANNELS = 100
# Messages a history request returns unless it asks for another number.
DEFAULT_HISTORY_LIMIT = 100
MAX_IDEMPOTENCY_KEY_CHARS = 128
_IDEMPOTENCY_KEY_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}")
# Seconds a client should wait before retrying when the bus is down.
RETRY_AFTER_SECONDS = 1

try:
    VERSION = version("broadcast")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0+unknown"

Handler = Callable[[HttpRequest, dict[str, Any]], Awaitable[Any]]


class ServerApi:
    def __init__(
        self,
        host: ApiHost,
        keys: ApiKeys,
        *,
        idempotency: IdempotencyStore | None = None,
        rates: ApiRates | None = None,
    ) -> None:
        self._host = host
        self._keys = keys
        self._idempotency = idempotency or MemoryIdempotency()
        self.limits = ApiLimits(rates or ApiRates())
        self.cluster = ClusterControl(host, VERSION)
        self.requests: Counter[tuple[str, int]] = Counter()
        """Requests answered, by (route, status): for the ``broadcast_api_requests`` metric."""
        self._routes: dict[str, tuple[bytes, Handler]] = {
            "/api/publish": (b"POST", self._publish),
            "/api/broadcast": (b"POST", self._broadcast),
            "/api/history": (b"GET", self._history),
            "/api/presence": (b"GET", self._presence),
            "/api/channels": (b"GET", self._channels),
            "/api/info": (b"GET", self._info),
            "/api/disconnect": (b"POST", self._disconnect),
            "/api/openapi.json": (b"GET", self._openapi),
        }
        self._openapi_body = openapi_document()
        self.public = True
        """False with ``--api-listen``: the clients' port answers ``/api/`` with 404."""

    @property
    def enabled(self) -> bool:
        return self._keys.enabled

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The control channel and the idempotency store; start it in the gateway's nursery."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._idempotency.run)
            if self.enabled:
                await nursery.start(self.cluster.run)
            task_status.started()

    async def respond(
        self,
        request: HttpRequest,
        stream: trio.abc.Stream,
        *,
        public: bool = True,
        address: str | None = None,
    ) -> bytes:
        """The complete response to one ``/api/`` request (the body is read from ``stream``).

        ``public`` is True on the clients' port (the gateway's call), False on ``--api-listen``.
        ``address`` is the client's, for the wrong-key limit (default: the stream's peer).
        """
        path, _, query = request.target.partition(b"?")
        route = path.decode("latin-1")
        label = route if route in self._routes else "other"
        method = request.method.decode("latin-1")
        try:
            if public and not self.public:
                raise ApiRefusal(404, ErrorCode.NOT_FOUND, "the server API is not on this port")
            client = address if address is not None else peer_address(stream)
            status, document = 200, await self._dispatch(request, route, query, stream, client)
            answer = json_response(200, document)
        except ApiRefusal as refusal:
            status, answer = refusal.status, error_response(refusal)
            if refusal.status != 404 or self.enabled:
                # 429s come in floods: /metrics counts them, the log has them at debug level.
                level = logging.DEBUG if status == 429 else logging.INFO
                log.log(level, "api %s %s refused: %d %s", method, label, status, refusal.code)
        except Exception:  # a bug: the client still gets JSON, the log the traceback
            log.exception("api %s %s failed", method, label)
            status = 500
            error = {"code": "internal_error", "message": "see the gateway's log"}
            answer = json_response(500, {"error": error})
        self.requests[label, status] += 1
        return answer

    async def _dispatch(
        self,
        request: HttpRequest,
        route: str,
        query: bytes,
        stream: trio.abc.Stream,
        address: str,
    ) -> Any:
        if not self.enabled:
            raise ApiRefusal(404, ErrorCode.NOT_FOUND, "the server API is off on this gateway")
        entry = self._routes.get(route)
        if entry is None:
            raise ApiRefusal(404, ErrorCode.NOT_FOUND, f"no API route {route[:100]!r}")
        method, handler = entry
        if route != "/api/openapi.json":
            self._authenticate(request, address)
        if request.method != method:
            raise ApiRefusal(
                405,
                ErrorCode.METHOD_NOT_ALLOWED,
                f"{route} takes {method.decode()}",
                [(b"Allow", method)],
            )
        if method == b"POST":
            fields = parse_json_object(request, await read_body(request, stream))
        else:
            fields = _query_fields(query)
        try:
            return await handler(request, fields)
        except ProtocolError as error:
            raise ApiRefusal(400, error.code, error.message) from None
        except BusUnavailable as exc:
            log.warning("api %s: %s", route, exc)
            raise ApiRefusal(
                503,
                ErrorCode.BUS_UNAVAILABLE,
                "the bus is unavailable; retry (with the same idempotency_key)",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None
        except IdempotencyPending:
            raise ApiRefusal(
                409,
                ErrorCode.IDEMPOTENCY_PENDING,
                "a request with this idempotency_key is still running; retry",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None

    def _authenticate(self, request: HttpRequest, address: str) -> None:
        """A valid key within its rate, or ApiRefusal: 429 for an address that sent too many
        wrong keys (before its key is looked at) or a key over its rate, 401 for a wrong key."""
        if (wait := self.limits.failed_wait(address)) > 0:
            raise ApiRefusal(
                429,
                ErrorCode.RATE_LIMITED,
                f"too many requests without a valid key from your address; retry in {wait:.2f} s",
                retry_after=wait,
            )
        key = self._keys.match(request)
        if key is None:
            self.limits.failed(address)
            raise ApiRefusal(
                401,
                ErrorCode.UNAUTHORIZED,
                "send a valid key: Authorization: Bearer KEY",
                [(b"WWW-Authenticate", b'Bearer realm="broadcast-api"')],
            )
        if (wait := self.limits.key_wait(key)) > 0:
            raise ApiRefusal(
                429,
                ErrorCode.RATE_LIMITED,
                f"too many requests with this key; retry in {wait:.2f} s",
                retry_after=wait,
            )

    # -- routes ----------------------------------------------------------------------------

    async def _publish(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields, required={"channel", "text"}, optional={"sender", "idempotency_key"})
        channel = check_channel(fields["channel"])
        text, sender = _text(fields["text"]), _sender(fields.get("sender", DEFAULT_SENDER))
        key = _idempotency_key(fields.get("idempotency_key"))
        message_id = await self._publish_once(key and f"publish:{key}", channel, sender, text)
        return {"id": message_id}

    async def _broadcast(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields, required={"channels", "text"}, optional={"sender", "idempotency_key"})
        channels = fields["channels"]
        if not isinstance(channels, list) or not 1 <= len(channels) <= MAX_BROADCAST_CHANNELS:
            raise ProtocolError(
                ErrorCode.BAD_CHANNEL, f"channels is a list of 1-{MAX_BROADCAST_CHANNELS} channels"
            )
        channels = list(dict.fromkeys(check_channel(c) for c in channels))
        text, sender = _text(fields["text"]), _sender(fields.get("sender", DEFAULT_SENDER))
        key = _idempotency_key(fields.get("idempotency_key"))
        # One key per channel: a retry after a failure half way publishes only what is missing.
        ids = {}
        for channel in channels:
            claim = key and f"broadcast:{key}:{channel}"
            ids[channel] = await self._publish_once(claim, channel, sender, text)
        return {"ids": ids}

    async def _publish_once(self, key: str | None, channel: str, sender: str, text: str) -> str:
        origin = f"{self._host.node_id}/api"
        body = message_body(channel, sender, text, round(time.time(), 3), origin)
        return await self.publish_once(key, channel, body)

    async def publish_once(self, key: str | None, channel: str, body: bytes) -> str:
        """``bus.publish_message(channel, body)``, at most once per ``key`` within the window
        (cluster-wide with Redis); a repeated key returns the first id. Also for a WebSocket
        ``publish`` with an idempotency key: scope ``key`` (e.g. ``ws:<name>:<key>``).

        Raises BusUnavailable (the key is freed again: the retry publishes) and
        IdempotencyPending (the first request with ``key`` is still publishing).
        """
        if key is not None:
            earlier = await self._idempotency.claim(key)
            if earlier is not None:
                return earlier
        try:
            message_id = await self._host.bus.publish_message(channel, body)
        except BaseException:
            if key is not None:
                # Shielded: a cancelled request must still free its key; a store that cannot
                # answer lets it expire with the window.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(2),
                    contextlib.suppress(BusUnavailable),
                ):
                    await self._idempotency.release(key)
            raise
        if key is not None:
            try:
                await self._idempotency.complete(key, message_id)
            except BusUnavailable as exc:  # published: say so; a retry may publish again
                log.warning("api: idempotency key of %s not stored: %s", message_id, exc)
        return message_id

    async def _history(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields, required={"channel"}, optional={"since", "limit"})
        channel = check_channel(fields["channel"])
        since = fields.get("since")
        if since is not None:
            check_message_id(since)
        limit = _integer(fields.get("limit", str(DEFAULT_HISTORY_LIMIT)), "limit", RECOVERY_LIMIT)
        if since is not None:
            history = await self._host.bus.history(channel, after=since, limit=limit)
            messages, complete = history.messages, history.complete
        else:  # one more than asked: whether older messages exist beyond ``limit``
            history = await self._host.bus.history(channel, last=limit + 1, limit=limit + 1)
            messages, complete = history.messages[-limit:], len(history.messages) <= limit
        answer: dict[str, Any] = {
            "channel": channel,
            "messages": [decode(payload) for payload in messages],
            "complete": complete,
        }
        epoch = getattr(history, "epoch", None)  # the bus's epochs (docs/protocol.md)
        if epoch is not None:
            answer["epoch"] = epoch
        return answer

    async def _presence(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields, required={"channel"})
        channel = check_channel(fields["channel"])
        return {"channel": channel, "members": await self._host.presence.members(channel)}

    async def _channels(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields)
        counts = await self._host.presence.channels()
        return {"channels": dict(sorted(counts.items()))}

    async def _info(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields)
        await trio.lowlevel.checkpoint()
        gateways = [g._asdict() for g in self.cluster.gateways()]
        return {
            "version": VERSION,
            "node": self._host.node_id,
            "connections": sum(g["connections"] for g in gateways),
            "gateways": gateways,
        }

    async def _disconnect(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        _expect(fields, required={"name"})
        name = _sender(fields["name"])
        count, gateways = await self.cluster.disconnect(name)
        return {"disconnected": count, "gateways": gateways}

    async def _openapi(self, request: HttpRequest, fields: dict[str, Any]) -> Any:
        await trio.lowlevel.checkpoint()
        return self._openapi_body


def _expect(
    fields: dict[str, Any],
    required: Set[str] = frozenset(),
    optional: Set[str] = frozenset(),
) -> None:
    missing = sorted(required - fields.keys())
    unknown = sorted(fields.keys() - required - optional)
    if missing or unknown:
        why = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise ProtocolError(ErrorCode.BAD_COMMAND, f"{why}: see /api/openapi.json")


def _query_fields(query: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ApiRefusal(400, ErrorCode.BAD_COMMAND, "the query is not valid") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ApiRefusal(400, ErrorCode.BAD_COMMAND, "a query parameter is repeated")
    return fields


def _text(value: object) -> str:
    return check_text(value)


def _sender(value: object) -> str:
    return check_name(value)


def _idempotency_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise ProtocolError(
            ErrorCode.BAD_COMMAND,
            f"an idempotency_key is 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters of "
            "A-Z a-z 0-9 . _ : -",
        )
    return value


def _integer(value: str, name: str, maximum: int) -> int:
    digits = value.isascii() and value.isdigit() and len(value) <= 9
    if not digits or not 1 <= int(value) <= maximum:
        raise ProtocolError(ErrorCode.BAD_COMMAND, f"{name} is a whole number, 1-{maximum}")
    return int(value)
