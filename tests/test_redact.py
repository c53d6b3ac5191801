"""What the log filter is given from a Redis URL: its secret parts, never the whole URL.

The gateway used to give ``SecretFilter`` the whole ``--redis-url``, so a URL without any
password still came out as ``***/0`` in every log line: nobody could tell which Redis a gateway
was failing to reach. ``url_secrets`` takes only the password and credential parameters.
(The URL redaction itself is tested in test_security.py.)
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcast.security.redact import SecretFilter, redact_url, url_secrets


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("redis://127.0.0.1:6379/0", []),
        ("redis://host:6379", []),
        ("redis://app@host:6379/0", []),  # a user name is not a secret
        ("redis://:hunter2@host:6379/0", ["hunter2"]),
        ("rediss://app:hunter2@host:6380/1", ["hunter2"]),
        ("redis://:p%40ss@host/0", ["p%40ss", "p@ss"]),  # as written and as Redis receives it
        ("redis://:p@ss@host/0", ["p@ss"]),  # an unescaped @ in the password
        ("redis://host:6379/0?password=hunter2&db=1", ["hunter2"]),
        ("redis://host/0?db=1", []),
        ("redis://:@host/0", []),  # an empty password hides nothing
    ],
)
def test_url_secrets_are_the_password_and_credential_parameters(
    url: str, secrets: list[str]
) -> None:
    assert url_secrets(url) == secrets


def _logged(secret_filter: SecretFilter, message: str, *args: object) -> str:
    record = logging.LogRecord("broadcast.bus", logging.WARNING, __file__, 1, message, args, None)
    assert secret_filter.filter(record)
    return record.getMessage()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://host:6379", "redis://host:6379"),
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://app:hunter2@host:6379/0", "redis://app:***@host:6379/0"),
    ],
)
def test_the_log_shows_the_url_with_only_its_password_hidden(url: str, shown: str) -> None:
    secret_filter = SecretFilter(url_secrets(url))
    assert _logged(secret_filter, "cannot connect to %s, retrying", url) == (
        f"cannot connect to {shown}, retrying"
    )
    # The URL as the bus names it (redacted by itself) is left as it is.
    assert _logged(secret_filter, "bus: %s", redact_url(url)) == f"bus: {redact_url(url)}"


def test_a_password_is_hidden_wherever_it_appears() -> None:
    secret_filter = SecretFilter(url_secrets("redis://:hunter2@host:6379/0"))
    assert _logged(secret_filter, "AUTH %s failed", "hunter2") == "AUTH *** failed"


@given(
    password=st.text(
        alphabet=st.characters(codec="ascii", exclude_characters="/?#@%"), min_size=4
    ).filter(str.strip),
    host=st.sampled_from(["redis", "10.0.0.7", "[::1]"]),
)
def test_a_password_never_survives_the_filter(password: str, host: str) -> None:
    url = f"redis://app:{password}@{host}:6379/0"
    shown = _logged(SecretFilter(url_secrets(url)), "url %s and again %s", url, password)
    assert password not in shown
