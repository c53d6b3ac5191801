"""Property-based: schemathesis against a live server API, from docs/openapi.json.

Every generated request (valid ones and deliberately broken ones) must get no 5xx, a status
the document lists for that operation, the content type it lists, and a body that matches
its schema. Bounded (a few dozen examples per operation) so CI stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_api_support import KEY, Served, serve_api_in_thread

DOCUMENT = json.loads((Path(__file__).resolve().parent.parent / "docs/openapi.json").read_text())
schema = schemathesis.openapi.from_dict(DOCUMENT)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve_api_in_thread() as served:
        yield served


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_keeps_its_contract(case: schemathesis.Case, server: Served) -> None:
    case.call_and_validate(
        base_url=server.url,
        headers={"Authorization": f"Bearer {KEY}"},
        checks=CHECKS,
        timeout=10,
    )
