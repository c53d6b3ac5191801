"""Round trip through RedisBus: publish from K concurrent publishers, receive via subscribe.

    broadcast-bench roundtrip [--messages 100000] [--publishers 64] [--rate 0]
                              [--channels 1] [--runs 3] [--url redis://127.0.0.1:6379/0]

Without --url it starts its own redis-server on a free port. Each publisher awaits each publish,
as a client session does. Prints msgs/s, publish-to-delivery latency (p50/p99), this process's
CPU µs per message (``time.process_time``, which counts publishing, receiving and the harness),
and, for its own server, Redis's CPU µs per message. --rate paces the publishers (total msgs/s);
0 means as fast as they can. --channels spreads the messages over that many channels (all
subscribed): with one busy channel, many messages share a millisecond; with many quiet ones, each
message is the first of its millisecond in its channel, the publish script's worst case (it then
also trims by age and renews the stream's expiry). A figure to compare, never a test: wall
figures are noisy on a VM, CPU per message is the number to trust.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from broadcast.bench.harness import RedisServer, cpu_seconds
from broadcast.bus.base import Delivery
from broadcast.bus.redis_bus import RedisBus
from broadcast.protocol.envelope import message_body

CHANNEL = "bench"
TEXT_MARK = b'"text":"'
PAD = "x" * 60  # with the other fields, a message of about 200 bytes, like a short chat line


class Receiver:
    """Takes each delivered batch, pairs every message with its send time."""

    def __init__(self, expected: int, sent_at: list[float]) -> None:
        self.expected = expected
        self.sent_at = sent_at
        self.latencies: list[float] = []
        self.batches = 0
        self.done = trio.Event()

    def deliver(self, batch: list[Delivery]) -> None:
        now = time.perf_counter()
        self.batches += 1
        for _, payload in batch:
            start = payload.index(TEXT_MARK) + len(TEXT_MARK)
            number = int(payload[start : payload.index(b" ", start)])
            self.latencies.append(now - self.sent_at[number])
        if len(self.latencies) >= self.expected:
            self.done.set()


async def one_run(
    url: str, messages: int, publishers: int, rate: float, channels: int = 1
) -> dict[str, float]:
    per_publisher = messages // publishers
    messages = per_publisher * publishers
    sent_at = [0.0] * messages
    receiver = Receiver(messages, sent_at)
    bus = RedisBus(url)

    async def publish(first: int, started: float) -> None:
        for i in range(per_publisher):
            number = first + i * publishers
            if rate:
                await trio.sleep_until(started + number / rate)
            channel = CHANNEL if channels == 1 else f"{CHANNEL}-{number % channels}"
            body = message_body(channel, "bench", f"{number} {PAD}", 1732435200.123, "bench/1")
            sent_at[number] = time.perf_counter()
            await bus.publish_message(channel, body)

    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run, receiver.deliver)
        if not bus.ready:
            raise SystemExit(f"redis at {bus.name} is not reachable")
        for index in range(channels):
            await bus.subscribe(CHANNEL if channels == 1 else f"{CHANNEL}-{index}")
        cpu, wall, started = time.process_time(), time.perf_counter(), trio.current_time()
        async with trio.open_nursery() as publishing:
            for first in range(publishers):
                publishing.start_soon(publish, first, started)
        with trio.fail_after(60):
            await receiver.done.wait()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        nursery.cancel_scope.cancel()

    latencies = sorted(receiver.latencies)
    return {
        "msgs_per_s": len(latencies) / wall,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "cpu_us_per_msg": cpu / len(latencies) * 1e6,
        "msgs_per_batch": len(latencies) / receiver.batches,
    }


async def measure(args: argparse.Namespace) -> None:
    server = None
    url = args.url
    if url is None:
        server = RedisServer()
        server.start()
        url = server.url
    messages = args.messages - args.messages % args.publishers
    if messages < 1:
        raise SystemExit("--messages must be at least --publishers")
    pace = f"{args.rate:g} msgs/s" if args.rate else "as fast as possible"
    print(
        f"{messages} messages, {args.publishers} publishers, {args.channels} channels, {pace},"
        f" redis at {url}"
    )
    try:
        warm_up = min(messages, 5000)
        await one_run(url, warm_up, args.publishers, args.rate, args.channels)
        results = []
        for _ in range(args.runs):
            redis_cpu = cpu_seconds(server.process.pid) if server and server.process else 0
            result = await one_run(url, messages, args.publishers, args.rate, args.channels)
            if server and server.process:
                redis_cpu = cpu_seconds(server.process.pid) - redis_cpu
                result["redis_cpu_us_per_msg"] = redis_cpu / messages * 1e6
            results.append(result)
            print("  " + "  ".join(f"{key} {value:,.1f}" for key, value in result.items()))
        medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print("median  " + "  ".join(f"{key} {value:,.1f}" for key, value in medians.items()))
    finally:
        if server is not None:
            server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broadcast-bench roundtrip", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.0, help="total msgs/s; 0 = unpaced")
    parser.add_argument("--channels", type=int, default=1, help="spread over this many channels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--url", help="an existing Redis; by default a private redis-server")
    trio.run(measure, parser.parse_args(argv))
    return 0
