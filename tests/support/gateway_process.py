"""Real gateway subprocesses, as an operator would run them, for cluster and CLI tests.

The one way to start them lives in ``broadcast.bench.harness`` (the benchmark uses it too):
``GatewayProcess(node_id=..., redis_url=..., extra=..., port=..., file_limit=...)`` with ``url``,
``log``, ``finished_log()``, ``signal()``, ``terminate()`` and ``kill()``.
"""

from __future__ import annotations

from broadcast.bench.harness import GatewayProcess

__all__ = ["GatewayProcess"]
