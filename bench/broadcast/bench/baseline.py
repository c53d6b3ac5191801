"""The plain baseline the storm is compared with: ``websockets`` + redis-py asyncio, one channel.

Accept a WebSocket, greet it (``{"type":"welcome"}``), publish each text frame to one Redis
channel and answer ``{"type":"ack"}``, fan every Redis message out to every client as
``{"type":"message","id":"<n>-0","text":...}`` (n counts this server's messages, so ids increase
for its clients as the benchmark's receivers check). No names, presence, history, limits or
recovery: what a small broadcaster written in an afternoon costs on this machine. Started like a
gateway (``python -m broadcast.bench.baseline start --port 0 [--redis-url URL]``), it logs the
same ``listening on`` line, so the harness starts it the same way. Needs ``broadcast[bench]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import redis.asyncio as aioredis
import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve

CHANNEL = "baseline:general"


async def serve_clients(port: int, redis_url: str) -> None:
    clients: set[ServerConnection] = set()
    redis = aioredis.from_url(redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(CHANNEL)

    async def fan_out() -> None:
        count = 0
        async for message in pubsub.listen():
            if message["type"] == "message":
                count += 1
                text = message["data"].decode()
                broadcast(
                    clients,
                    json.dumps(
                        {"type": "message", "id": f"{count}-0", "text": text}, separators=(",", ":")
                    ),
                )

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            await ws.send('{"type":"welcome"}')
            async for frame in ws:
                if isinstance(frame, str):
                    await redis.publish(CHANNEL, frame)
                    await ws.send('{"type":"ack"}')
        except websockets.ConnectionClosed:
            pass
        finally:
            clients.discard(ws)

    fanning = asyncio.create_task(fan_out())
    async with serve(handler, "127.0.0.1", port, backlog=1024) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"baseline listening on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
        await server.serve_forever()
    fanning.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m broadcast.bench.baseline")
    parser.add_argument("command", choices=["start"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--node-id", default="baseline")  # accepted, like a gateway's flags
    parser.add_argument("--log-level", default="info")
    args, _ = parser.parse_known_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_clients(args.port, args.redis_url))


if __name__ == "__main__":
    main()
