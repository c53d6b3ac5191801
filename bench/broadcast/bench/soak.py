"""Soak under faults: a cluster keeps every acknowledged message, once, in order, for everyone.

    broadcast-bench soak --seconds 60 [--gateways 3] [--clients 30] [--rate 50] [--json]

Starts a private redis-server and N gateway processes, connects C listening clients (spread over
the gateways) and one sender per gateway publishing numbered messages, then injects faults on a
schedule: a gateway killed with SIGKILL and started again, the subscriber connections killed in
Redis (CLIENT KILL TYPE pubsub), a listener that stops reading for a while. Listeners reconnect to
the next gateway with ``since=<last id>`` exactly as the CLI does. At the end it prints, over all
listeners: delivered/expected (acknowledged messages), duplicates, gaps, order violations, how
often clients reconnected, and the gateways' peak RSS. Exit status 1 if anything acknowledged was
lost, duplicated or reordered.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import sys
from dataclasses import dataclass, field
from urllib.parse import urlencode

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from broadcast.bench.harness import GatewayProcess, RedisServer, rss_bytes
from broadcast.protocol.envelope import parse_id

RECONNECT_DELAY = 0.05  # listeners come back at once; backoff is the CLI's business


@dataclass
class Listener:
    name: str
    ids: list[str] = field(default_factory=list)
    reconnects: int = 0
    incomplete_recoveries: int = 0
    connected: trio.Event = field(default_factory=trio.Event)


@dataclass
class Cluster:
    redis: RedisServer
    gateways: list[GatewayProcess]

    def urls(self) -> list[str]:
        return [g.url for g in self.gateways if g.process.poll() is None]


async def listen(cluster: Cluster, listener: Listener, start: int, stop: trio.Event) -> None:
    """Stay connected to some gateway; after each drop, resume from the last id seen."""
    turn = start
    while not stop.is_set():
        urls = cluster.urls()
        query = {"name": listener.name, "announce": "0"}
        if listener.ids:
            query["since"] = listener.ids[-1]
        try:
            async with open_websocket_url(urls[turn % len(urls)] + "?" + urlencode(query)) as ws:
                listener.connected.set()
                while not stop.is_set():
                    event = json.loads(await ws.get_message())
                    if event["type"] == "message":
                        listener.ids.append(event["id"])
                    elif event["type"] == "recovered" and not event["complete"]:
                        listener.incomplete_recoveries += 1
        except (ConnectionClosed, HandshakeError, OSError):
            pass
        listener.reconnects += 1
        turn += 1
        await trio.sleep(RECONNECT_DELAY)


async def send(url: str, tag: str, rate: float, acked: list[str], stop: trio.Event) -> None:
    """Publish numbered messages at ``rate``; only acknowledged ones are expected anywhere."""
    number = 0
    while not stop.is_set():
        try:
            async with open_websocket_url(url + "?announce=0&name=" + tag) as ws:
                while not stop.is_set():
                    number += 1
                    await ws.send_message(
                        json.dumps({"type": "publish", "text": f"{tag}-{number}"})
                    )
                    while (event := json.loads(await ws.get_message()))["type"] not in (
                        "ack",
                        "error",
                    ):
                        pass
                    if event["type"] == "ack":
                        acked.append(event["id"])
                    await trio.sleep(1 / rate)
        except (ConnectionClosed, HandshakeError, OSError):
            await trio.sleep(RECONNECT_DELAY)


async def inject_faults(cluster: Cluster, seconds: float, log: list[str]) -> None:
    """A fault every few seconds, leaving time to recover between them."""
    faults = ["kill_gateway", "kill_subscribers", "kill_gateway"]
    interval = seconds / (len(faults) + 2)
    for fault in faults:
        await trio.sleep(interval)
        if fault == "kill_gateway":
            victim = random.choice(cluster.gateways[1:])  # gateway 0 hosts the senders' first try
            victim.kill()
            log.append(f"SIGKILL {victim.node_id}")
            index = cluster.gateways.index(victim)
            replacement = await trio.to_thread.run_sync(
                functools.partial(
                    GatewayProcess, redis_url=cluster.redis.url, node_id=victim.node_id + "+"
                )
            )
            cluster.gateways[index] = replacement
        else:
            killed = cluster.redis.client().client_kill_filter(_type="pubsub")
            log.append(f"CLIENT KILL TYPE pubsub: {killed} subscribers")


async def run(args: argparse.Namespace, cluster: Cluster) -> dict[str, object]:
    stop = trio.Event()
    listeners = [Listener(f"l{i}") for i in range(args.clients)]
    acked: list[str] = []
    faults: list[str] = []
    peak_rss = 0
    async with trio.open_nursery() as nursery:
        for i, listener in enumerate(listeners):
            nursery.start_soon(listen, cluster, listener, i, stop)
        for listener in listeners:  # everyone hears from the first message on
            await listener.connected.wait()
        for i, gateway in enumerate(cluster.gateways):
            nursery.start_soon(send, gateway.url, f"s{i}", args.rate, acked, stop)
        nursery.start_soon(inject_faults, cluster, args.seconds, faults)
        with trio.move_on_after(args.seconds):
            while True:
                await trio.sleep(0.5)
                peak_rss = max(
                    peak_rss,
                    sum(
                        rss_bytes(g.process.pid) // 1024
                        for g in cluster.gateways
                        if g.process.poll() is None
                    ),
                )
                if not args.json:
                    print(f"\r{len(acked)} acked, faults: {len(faults)}", end="", file=sys.stderr)
        await trio.sleep(2)  # the last acknowledged messages are still on their way: let them land
        stop.set()
        nursery.cancel_scope.cancel()
    expected = sorted(set(acked), key=parse_id)
    expected_set = set(expected)
    delivered = duplicates = gaps = order_violations = 0
    for listener in listeners:
        seen = [i for i in listener.ids if i in expected_set]
        delivered += len(set(seen))
        duplicates += len(seen) - len(set(seen))
        gaps += len(expected_set - set(seen))
        order_violations += sum(parse_id(b) <= parse_id(a) for a, b in itertools.pairwise(seen))
    return {
        "seconds": args.seconds,
        "gateways": args.gateways,
        "listeners": args.clients,
        "acknowledged": len(expected),
        "expected_deliveries": len(expected) * len(listeners),
        "delivered": delivered,
        "duplicates": duplicates,
        "gaps": gaps,
        "order_violations": order_violations,
        "reconnects": sum(listener.reconnects for listener in listeners),
        "incomplete_recoveries": sum(listener.incomplete_recoveries for listener in listeners),
        "faults": faults,
        "peak_gateway_rss_mib": round(peak_rss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broadcast-bench soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--rate", type=float, default=50, help="messages/s per sender")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    redis = RedisServer()
    redis.start()
    cluster = Cluster(redis, [])
    try:
        for i in range(args.gateways):
            cluster.gateways.append(GatewayProcess(redis_url=redis.url, node_id=f"soak{i}"))
        result = trio.run(run, args, cluster)
    finally:
        for gateway in cluster.gateways:
            gateway.kill()
        redis.close()
    if args.json:
        print(json.dumps(result))
    else:
        print()
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    ok = result["delivered"] == result["expected_deliveries"] and not (
        result["duplicates"] or result["order_violations"]
    )
    return 0 if ok else 1
