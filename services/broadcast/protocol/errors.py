"""Stable error codes clients can act on; the human message beside them may change."""

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    BAD_COMMAND = "bad_command"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"
    BAD_CHANNEL = "bad_channel"
    BAD_TEXT = "bad_text"
    TEXT_TOO_LONG = "text_too_long"
    LINE_TOO_LONG = "line_too_long"
    INVALID_UTF8 = "invalid_utf8"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    BUS_UNAVAILABLE = "bus_unavailable"
    SERVER_FULL = "server_full"
    SERVER_BUSY = "server_busy"
    RATE_LIMITED = "rate_limited"
    TLS_REQUIRED = "tls_required"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    CHANNEL_FORBIDDEN = "channel_forbidden"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    AUTH_TIMEOUT = "auth_timeout"
    TOO_MANY_ERRORS = "too_many_errors"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # Server API only (docs/api.md): HTTP refusals with no WebSocket counterpart.
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    LENGTH_REQUIRED = "length_required"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    IDEMPOTENCY_PENDING = "idempotency_pending"


class ProtocolError(Exception):
    """Input a client sent that is refused; the connection itself stays usable."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        ref: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref
        self.retry_after = retry_after
        """Seconds after which the same request may succeed (rate limits); always > 0."""


class CloseCode:
    """WebSocket close codes the gateway uses (docs/protocol.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    SERVICE_RESTART = 1012  # draining: reconnect, the load balancer picks a live gateway
    UNAUTHORIZED = 4001  # token missing, invalid or expired (also while connected)
    SLOW = 4008
    IDLE = 4010  # nothing heard, not even a pong, for the idle timeout
    DISCONNECTED = 4003  # closed by an operator through the server API
    TOO_MANY_REQUESTS = 4029  # kept going over a rate limit after being told
