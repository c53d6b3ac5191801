"""``broadcast-bench``: measure a broadcast cluster end to end (issue 4, docs/benchmarks.md).

The package starts a private cluster (or targets given gateways), spreads cheap receiving clients
over several worker processes, paces senders at a target rate and reports what every client got:
deliveries/s, loss, duplicates, order, latency, and the server's CPU and memory per delivery.
It imports nothing from ``tests/``: the benchmark must run from an installed package.
"""
