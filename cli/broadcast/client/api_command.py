"""``broadcast-cli publish``: publish through the server API, for shell scripts and cron jobs.

    BROADCAST_API_KEY=... broadcast-cli publish --url http://gateway:12345 general "deploy done"

Prints the message id. Exit status: 0 published, 1 refused (the key, the channel, the text),
2 no answer or the server cannot publish now (after the retries, with one idempotency key, so
a retry never publishes twice).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from broadcast.client.api import DEFAULT_RETRIES, ApiError, BroadcastApi
from broadcast.protocol.limits import DEFAULT_PORT

KEY_VARIABLE = "BROADCAST_API_KEY"
URL_VARIABLE = "BROADCAST_API_URL"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 10.0


def add_publish_parser(commands: Any) -> argparse.ArgumentParser:
    publish = commands.add_parser(
        "publish",
        help="publish one message through the server API (needs an API key)",
        description="Publish one message through the gateway's server API (docs/api.md) and "
        "print its id. The key comes from "
        f"{KEY_VARIABLE}, or --api-key (other users can read command lines in ps). Exit "
        "status: 0 published, 1 refused, 2 no answer or the bus unavailable (after retries "
        "that reuse one idempotency key).",
    )
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("text", metavar="TEXT", help="the message; - reads it from stdin")
    publish.add_argument(
        "--url",
        dest="api_url",
        help=f"the gateway's HTTP address, http(s)://host:port [{URL_VARIABLE}; "
        f"default {DEFAULT_URL}]",
    )
    publish.add_argument("--api-key", help=f"the API key; better: set {KEY_VARIABLE}")
    publish.add_argument("--sender", help="the sender name clients see (default: api)")
    publish.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="publish at most once per KEY within 10 minutes (e.g. a job's run id)",
    )
    publish.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per attempt"
    )
    publish.add_argument(
        "--retries", type=int, default=DEFAULT_RETRIES, help="attempts after the first"
    )
    return publish


def run_publish(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = (args.api_key or environ.get(KEY_VARIABLE, "")).strip()
    url = args.api_url or environ.get(URL_VARIABLE) or DEFAULT_URL
    if not key:
        return _usage(f"no API key: set {KEY_VARIABLE} (or give --api-key)")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        return _usage(f"--url must look like http://host:port, not {url!r}")
    text = sys.stdin.read().rstrip("\n") if args.text == "-" else args.text
    try:
        with BroadcastApi(url, key, timeout=args.timeout, retries=args.retries) as api:
            message_id = api.publish(
                args.channel, text, sender=args.sender, idempotency_key=args.idempotency_key
            )
    except ApiError as error:
        print(f"broadcast-cli publish: {error.code}: {error.message}", file=sys.stderr)
        return 1 if 400 <= error.status < 500 and error.status not in (409, 429) else 2
    print(message_id, flush=True)
    return 0


def _usage(message: str) -> int:
    print(f"broadcast-cli publish: error: {message}", file=sys.stderr)
    return 2
