"""Limits of the protocol, in one place so the server, the CLI and the docs agree."""

from typing import Final

PROTOCOL_VERSION: Final = 1
DEFAULT_PORT: Final = 12345  # the original tool's port
DEFAULT_CHANNEL: Final = "general"

# 4 KiB of text is a long chat message; JSON escaping can at most ~6x it, hence the frame limit.
MAX_TEXT_BYTES: Final = 4096
MAX_FRAME_BYTES: Final = 65536
MAX_LINE_BYTES: Final = 4096
# Every size limit on what a client sends is in UTF-8 bytes: bytes are what a limit protects
# (memory, the wire), and a character count lets one "character" of combining marks be kilobytes.
MAX_NAME_BYTES: Final = 32
MAX_CHANNEL_CHARS: Final = 64  # ASCII only, so characters are bytes
MAX_REF_BYTES: Final = 64

# JSON commands are a handful of flat fields; anything nested deeper is an attack on the parser
# (json.loads recurses, and "[" * 100000 would end in RecursionError), refused before parsing.
MAX_JSON_DEPTH: Final = 32

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
# An idle one costs ~10 KiB, so 20,000 is ~200 MiB: room for a 10,000-client storm and its
# monitors. At start it is lowered, with one log line, to fit the file limit (ulimit -n).
MAX_CONNECTIONS: Final = 20000

# A WebSocket client is pinged after a third of this without a word from it, and closed (4010)
# after all of it: a half-open connection does not hold a slot and an outbox for ever.
IDLE_TIMEOUT_SECONDS: Final = 60.0

# A line client cannot answer pings (nc), so silence is its only sign of life: after this long
# without a line it is asked to send one (an empty line will do), and after a third more it is
# closed. Long enough for someone who only listens to a quiet channel to press Enter now and
# then; short enough that a forgotten or half-open socket does not hold its slot for ever.
LINE_IDLE_TIMEOUT_SECONDS: Final = 900.0
