"""``--api-listen HOST:PORT``: the server API alone on an internal address, so it need not face
the internet where clients connect."""

from __future__ import annotations

import logging

import trio

from broadcast.api.http import ApiRefusal, error_response
from broadcast.api.server import ServerApi
from broadcast.protocol.errors import ErrorCode
from broadcast.protocol.http_request import BadRequest, RequestHeadParser

log = logging.getLogger("broadcast.api")

# The request head must arrive within this (the body has its own bound in http.py).
HEAD_TIMEOUT_SECONDS = 10.0
# Requests served at once; more wait in the kernel's accept queue.
MAX_CONCURRENT_REQUESTS = 256


async def serve_api_listener(
    api: ServerApi,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve only ``/api/`` on ``host:port`` until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("server API served on %s:%d only (--api-listen)", host, bound)
    limit = trio.CapacityLimiter(MAX_CONCURRENT_REQUESTS)

    async def handle(stream: trio.SocketStream) -> None:
        async with limit:
            try:
                await _serve_one(api, stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                pass
            except Exception:
                log.exception("api request failed")
            finally:
                await trio.aclose_forcefully(stream)

    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)


async def _serve_one(api: ServerApi, stream: trio.abc.Stream) -> None:
    parser = RequestHeadParser()
    with trio.fail_after(HEAD_TIMEOUT_SECONDS):
        request = None
        while request is None:
            data = await stream.receive_some(16384)
            try:
                request = parser.feed(data)
            except BadRequest as exc:
                refusal = ApiRefusal(400, ErrorCode.BAD_COMMAND, f"bad request: {exc}")
                await stream.send_all(error_response(refusal))
                return
            if not data and request is None:
                return
    if not request.target.startswith(b"/api/"):
        refusal = ApiRefusal(404, ErrorCode.NOT_FOUND, "only /api/ is served here")
        await stream.send_all(error_response(refusal))
        return
    await stream.send_all(await api.respond(request, stream, public=False))
