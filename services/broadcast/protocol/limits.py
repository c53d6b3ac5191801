"""Limits of the protocol, in one place so the server, the CLI and the docs agree."""

from typing import Final

PROTOCOL_VERSION: Final = 1
DEFAULT_PORT: Final = 12345  # the original tool's port
DEFAULT_CHANNEL: Final = "general"

# 4 KiB of text is a long chat message; JSON escaping can at most ~6x it, hence the frame limit.
MAX_TEXT_BYTES: Final = 4096
MAX_FRAME_BYTES: Final = 65536
MAX_LINE_BYTES: Final = 4096
MAX_NAME_CHARS: Final = 32
MAX_CHANNEL_CHARS: Final = 64
MAX_REF_CHARS: Final = 64

# Past this much unsent data a client is "slow" and is disconnected (Centrifugo's default too).
OUTBOX_LIMIT_BYTES: Final = 1 << 20

# Capped history per channel in Redis (XADD MAXLEN ~).
HISTORY_LENGTH: Final = 1000

# History also ages out (XTRIM MINID ~), and a channel's stream expires this long after its last
# message: an hour covers a laptop closed over lunch or a train tunnel, while an abandoned
# channel costs Redis nothing after it. A client away longer is told that messages were lost.
HISTORY_MAX_AGE_SECONDS: Final = 3600

# At most this many messages answer one history read (a client's recovery, a gateway refilling a
# channel after a Redis reconnect): the whole history at the default length, and a bounded reply
# (~200 KB of typical messages) however the history is configured. Past it, the newest are sent
# and the answer is marked incomplete.
RECOVERY_LIMIT: Final = 1000

# Connections one gateway serves at once; past it new clients are refused with server_full.
# A connection costs ~20 KiB here; keep this under the process's file limit (ulimit -n).
MAX_CONNECTIONS: Final = 10000

# A WebSocket client is pinged after a third of this without a word from it, and closed (4010)
# after all of it: a half-open connection does not hold a slot and an outbox for ever.
IDLE_TIMEOUT_SECONDS: Final = 60.0

# A line client may connect and only listen: after this long without bytes it is greeted.
SNIFF_TIMEOUT_SECONDS: Final = 0.3
