"""The OpenAPI 3.1 document of the server API, built here and kept in docs/openapi.json
(``python -m broadcast.api.openapi > docs/openapi.json``; a test checks they are the same)."""

from __future__ import annotations

import json
from typing import Any

from broadcast.protocol.errors import ErrorCode
from broadcast.protocol.limits import MAX_CHANNEL_CHARS, MAX_NAME_BYTES, RECOVERY_LIMIT

_CHANNEL = {
    "type": "string",
    "pattern": f"^[A-Za-z0-9._-]{{1,{MAX_CHANNEL_CHARS}}}$",
    "description": "A channel name.",
    "examples": ["general"],
}
_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME_BYTES,
    "description": "A display name: no control characters, no outer spaces.",
}
_TEXT = {
    "type": "string",
    "minLength": 1,
    "maxLength": 4096,
    "description": "Message text, at most 4096 bytes of UTF-8; newlines allowed, other "
    "control characters refused.",
    "examples": ["deploy finished"],
}
_IDEMPOTENCY_KEY = {
    "type": "string",
    "pattern": "^[A-Za-z0-9._:-]{1,128}$",
    "description": "Repeated within 10 minutes, the request publishes nothing and returns the "
    "first request's ids (on any gateway).",
}
_MESSAGE_ID = {
    "type": "string",
    "pattern": "^[0-9]{1,20}-[0-9]{1,20}$",
    "description": "A message id (milliseconds-sequence), increasing within a channel.",
    "examples": ["1732435200123-0"],
}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return response


_ERRORS = {
    400: _error("Invalid input (`bad_json`, `bad_command`, `bad_channel`, `bad_text`, ...)."),
    401: _error("No API key, or a wrong one (`unauthorized`)."),
    409: _error(
        "A request with this idempotency_key is still running (`idempotency_pending`).",
        retry=True,
    ),
    411: _error("No Content-Length, or a chunked body (`length_required`)."),
    413: _error("The body is over 64 KiB (`payload_too_large`), refused unread."),
    415: _error("The body is not `application/json` (`unsupported_media_type`)."),
    429: _error(
        "Too many requests (`rate_limited`): this key is over its rate, or this address sent "
        "too many requests without a valid key (refused before the key is checked).",
        retry=True,
    ),
    503: _error(
        "The bus (Redis) is unavailable (`bus_unavailable`); retry after Retry-After.",
        retry=True,
    ),
}


def _operation(
    summary: str,
    result: dict[str, Any],
    errors: list[int],
    *,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    description: str = "",
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "Done.", "content": {"application/json": {"schema": result}}}
    }
    for status in errors:
        responses[str(status)] = _ERRORS[status]
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    if parameters:
        operation["parameters"] = parameters
    return operation


def _query(name: str, schema: dict[str, Any], required: bool, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


_POST_ERRORS = [400, 401, 411, 413, 415, 429, 503]


def openapi_document() -> dict[str, Any]:
    message = _object(
        {
            "type": {"const": "message"},
            "id": _MESSAGE_ID,
            "channel": _CHANNEL,
            "sender": {"type": "string"},
            "text": {"type": "string"},
            "ts": {"type": "number", "description": "Unix time (seconds) of acceptance."},
            "origin": {"type": "string"},
        },
        ["type", "id", "channel", "sender", "text", "ts"],
    )
    message["additionalProperties"] = True
    paths = {
        "/api/publish": {
            "post": _operation(
                "Publish a message to one channel",
                _object({"id": _MESSAGE_ID}, ["id"]),
                [*_POST_ERRORS, 409],
                body=_object(
                    {
                        "channel": _CHANNEL,
                        "text": _TEXT,
                        "sender": {**_NAME, "default": "api"},
                        "idempotency_key": _IDEMPOTENCY_KEY,
                    },
                    ["channel", "text"],
                ),
                description="The message goes through the bus like a client's: one order, "
                "history and recovery. Every client in the channel gets it.",
            )
        },
        "/api/broadcast": {
            "post": _operation(
                "Publish one message to several channels",
                _object(
                    {
                        "ids": {
                            "type": "object",
                            "additionalProperties": _MESSAGE_ID,
                            "description": "The message id in each channel.",
                        }
                    },
                    ["ids"],
                ),
                [*_POST_ERRORS, 409],
                body=_object(
                    {
                        "channels": {
                            "type": "array",
                            "items": _CHANNEL,
                            "minItems": 1,
                            "maxItems": 100,
                        },
                        "text": _TEXT,
                        "sender": {**_NAME, "default": "api"},
                        "idempotency_key": _IDEMPOTENCY_KEY,
                    },
                    ["channels", "text"],
                ),
            )
        },
        "/api/history": {
            "get": _operation(
                "A channel's stored messages, oldest first",
                _object(
                    {
                        "channel": _CHANNEL,
                        "messages": {"type": "array", "items": message},
                        "complete": {
                            "type": "boolean",
                            "description": "False when there is more than this answer: older "
                            "messages beyond limit, or (with since) messages trimmed away.",
                        },
                        "epoch": {"type": "string"},
                    },
                    ["channel", "messages", "complete"],
                ),
                [400, 401, 429, 503],
                parameters=[
                    _query("channel", _CHANNEL, True, "The channel."),
                    _query("since", _MESSAGE_ID, False, "Only messages after this id."),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": RECOVERY_LIMIT},
                        False,
                        "At most this many (the newest); default 100.",
                    ),
                ],
            )
        },
        "/api/presence": {
            "get": _operation(
                "Who is in a channel, on every gateway",
                _object(
                    {
                        "channel": _CHANNEL,
                        "members": {"type": "array", "items": {"type": "string"}},
                    },
                    ["channel", "members"],
                ),
                [400, 401, 429, 503],
                parameters=[_query("channel", _CHANNEL, True, "The channel.")],
            )
        },
        "/api/channels": {
            "get": _operation(
                "Channels with members, cluster-wide, and how many names each has",
                _object(
                    {
                        "channels": {
                            "type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 1},
                        }
                    },
                    ["channels"],
                ),
                [400, 401, 429, 503],
            )
        },
        "/api/info": {
            "get": _operation(
                "The gateways of the cluster and their connections",
                _object(
                    {
                        "version": {"type": "string"},
                        "node": {"type": "string", "description": "The gateway that answered."},
                        "connections": {"type": "integer", "minimum": 0},
                        "gateways": {
                            "type": "array",
                            "items": _object(
                                {
                                    "node": {"type": "string"},
                                    "connections": {"type": "integer", "minimum": 0},
                                    "version": {"type": "string"},
                                },
                                ["node", "connections", "version"],
                            ),
                        },
                    },
                    ["version", "node", "connections", "gateways"],
                ),
                [400, 401, 429],
            )
        },
        "/api/disconnect": {
            "post": _operation(
                "Close every connection of a user, on every gateway (close code 4003)",
                _object(
                    {
                        "disconnected": {"type": "integer", "minimum": 0},
                        "gateways": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Gateways that answered within 2 s.",
                        },
                    },
                    ["disconnected", "gateways"],
                ),
                _POST_ERRORS,
                body=_object({"name": _NAME}, ["name"]),
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "broadcast server API",
            "version": "1",
            "description": "Publish, read history and presence, and disconnect users, from "
            "applications. Off unless the gateway has an API key (docs/api.md).",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: --api-key, --api-key-file or BROADCAST_API_KEY. "
                    "X-API-Key: KEY works too.",
                }
            },
            "headers": {
                "RetryAfter": {
                    "description": "Whole seconds to wait before retrying (at least 1).",
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
            "schemas": {
                "Error": _object(
                    {
                        "error": _object(
                            {
                                "code": {"type": "string", "enum": [str(c) for c in ErrorCode]},
                                "message": {"type": "string"},
                                "retry_after": {
                                    "type": "number",
                                    "exclusiveMinimum": 0,
                                    "description": "Seconds to wait before retrying (429, "
                                    "409, 503); Retry-After is the same, rounded up.",
                                },
                            },
                            ["code", "message"],
                        )
                    },
                    ["error"],
                )
            },
        },
    }


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=2))
