"""Fan-out cost of one gateway: server CPU per delivery, with N listening clients.

    broadcast-bench fanout --clients 1000 --messages 200 [--kind ws|lines] [--redis]

Starts a real gateway process, connects N raw listeners (cheap readers that only count bytes, so
the load generator is not the bottleneck), publishes M messages from one WebSocket sender and
prints deliveries/s and the gateway's CPU microseconds per delivery (utime+stime from /proc).
A figure to compare, never a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time

import trio
from trio_websocket import open_websocket_url

from broadcast.bench.harness import GatewayProcess, RedisServer, cpu_seconds

TEXT = "x" * 100


async def open_listener(port: int, kind: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if kind == "lines":
        await stream.send_all(b"\n")
        return stream
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET /?name=l HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    return stream


async def count_until(stream: trio.SocketStream, marker: bytes, expected: int, done: list) -> None:
    seen, tail = 0, b""
    while seen < expected:
        data = tail + await stream.receive_some(1 << 16)
        seen += data.count(marker)
        tail = data[-(len(marker) - 1) :]
    done.append(time.perf_counter())


async def run(args: argparse.Namespace, port: int, pid: int) -> dict[str, float]:
    marker = TEXT.encode()
    streams = [await open_listener(port, args.kind) for _ in range(args.clients)]
    async with await trio.open_tcp_stream("127.0.0.1", port) as _:
        pass
    done: list[float] = []
    async with open_websocket_url(f"ws://127.0.0.1:{port}/?name=sender") as sender:
        await sender.get_message()
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(count_until, stream, marker, args.messages, done)
            for _ in range(args.messages):
                await sender.send_message(json.dumps({"type": "publish", "text": TEXT}))
                while json.loads(await sender.get_message())["type"] != "ack":
                    pass
        wall, cpu = max(done) - t0, cpu_seconds(pid) - cpu0
    deliveries = args.clients * args.messages
    return {
        "clients": args.clients,
        "messages": args.messages,
        "deliveries": deliveries,
        "wall_s": round(wall, 3),
        "deliveries_per_s": round(deliveries / wall),
        "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broadcast-bench fanout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--kind", choices=["ws", "lines"], default="ws")
    parser.add_argument("--redis", action="store_true", help="start a private redis-server")
    args = parser.parse_args(argv)
    redis = RedisServer() if args.redis else None
    if redis:
        redis.start()
    gateway = GatewayProcess(node_id="bench", redis_url=redis.url if redis else None)
    try:
        result = trio.run(run, args, gateway.port, gateway.process.pid)
        print(json.dumps(result))
    finally:
        gateway.kill()
        if redis:
            redis.close()
    return 0
