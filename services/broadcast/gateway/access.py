"""Who may connect and what they may do, as the operator configured it (docs/security.md)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from broadcast.gateway.budget import COMMAND_BURST, COMMAND_RATE_PER_SECOND, Rates
from broadcast.security import AddressLimit, OriginPolicy, TokenVerifier

# A person types a few messages a second; scripts and bots more. 50/s with a burst of 100 leaves
# room for both and still bounds what one connection can make the cluster fan out. A client
# past it gets `rate_limited` for that message; the others are not slowed. 0 turns it off.
MESSAGE_RATE_PER_SECOND = 50.0
MESSAGE_BURST = 100


@dataclass
class AccessPolicy:
    verifier: TokenVerifier | None = None
    """Tokens are required when set; the token's ``sub`` is the client's name."""
    origins: OriginPolicy = field(default_factory=OriginPolicy)
    tls: ssl.SSLContext | None = None
    """When set, sessions must use TLS; plain HTTP health checks are still answered."""
    message_rate: float = MESSAGE_RATE_PER_SECOND
    message_burst: int = MESSAGE_BURST
    command_rate: float = COMMAND_RATE_PER_SECOND
    command_burst: int = COMMAND_BURST
    addresses: AddressLimit | None = None
    """Connections per client address. Off by default: behind a load balancer without the PROXY
    protocol every client has the balancer's address."""

    @property
    def auth_required(self) -> bool:
        return self.verifier is not None

    @property
    def rates(self) -> Rates:
        return Rates(self.message_rate, self.message_burst, self.command_rate, self.command_burst)
