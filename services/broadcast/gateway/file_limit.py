"""Keeping ``--max-connections`` within the file descriptors the process may open.

Every connection is a descriptor; past ``RLIMIT_NOFILE`` accept fails with EMFILE and even
``/healthz`` cannot be answered. At start the soft limit is raised toward the hard one, and if
that is still not enough the maximum is lowered to fit, with one line saying so.
"""

from __future__ import annotations

import logging
import resource
from typing import Final

log = logging.getLogger("broadcast.gateway")

# Descriptors kept for everything that is not a client: Redis connections, listeners, log
# files, and the health checks that must still be answered on a full gateway (an eighth of a
# small limit).
RESERVED_DESCRIPTORS: Final = 128


def fit_connections_to_file_limit(max_connections: int, pending: int) -> tuple[int, int]:
    """How many sessions and connections still in their handshake the process can really
    hold, raising the soft limit as far as needed and allowed."""
    needed = max_connections + pending + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections, pending
    available = max(2, soft - min(RESERVED_DESCRIPTORS, soft // 8))
    pending = max(1, min(pending, available // 4))
    fitted = max(1, available - pending)
    log.warning(
        "--max-connections %d does not fit the file limit (ulimit -n %d): serving at most %d; "
        "raise the limit (ulimit -n, LimitNOFILE=, or the container's nofile) to serve more",
        max_connections, soft, fitted,
    )  # fmt: skip
    return fitted, pending
