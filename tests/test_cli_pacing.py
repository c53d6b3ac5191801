"""The client's pacing (pacing.py): the server's limits read from its welcome, the retry hint of
a refusal, a pace that never outruns the server, and answers matched to what waits for them.

Pure logic, so trio's MockClock (``autojump_clock``) stands in for time: nothing here waits.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broadcast.client.pacing import (
    DEFAULT_BURST,
    DEFAULT_PER_SECOND,
    FALLBACK_RETRY_SECONDS,
    MIN_RETRY_SECONDS,
    Deliveries,
    Pacer,
    publish_limits,
    retry_hint,
)
from broadcast.security.rate_limit import TokenBucket


def test_limits_come_from_the_welcome_with_defaults_for_an_older_server() -> None:
    limits = {"publish_per_second": 5.0, "publish_burst": 7}
    assert publish_limits({"limits": limits}) == (5.0, 7)
    assert publish_limits({"limits": {"text_bytes": 4096}}) == (DEFAULT_PER_SECOND, DEFAULT_BURST)
    assert publish_limits({}) == (DEFAULT_PER_SECOND, DEFAULT_BURST)
    bogus = {"publish_per_second": "fast", "publish_burst": -3}
    assert publish_limits({"limits": bogus}) == (DEFAULT_PER_SECOND, DEFAULT_BURST)
    assert publish_limits({"limits": {"publish_per_second": 0, "publish_burst": 0}}) is None


@pytest.mark.parametrize(
    ("event", "seconds"),
    [
        ({"code": "rate_limited", "retry_after": 0.4, "message": "try again in 9 s"}, 0.4),
        ({"code": "rate_limited", "message": "too many messages; try again in 0.25 s"}, 0.25),
        ({"code": "rate_limited", "message": "too many messages; try again in 0.0 s"}, 0.05),
        ({"code": "bus_unavailable", "message": "message not accepted, try again"}, 1.0),
        ({"code": "rate_limited", "retry_after": True}, FALLBACK_RETRY_SECONDS),
        ({"code": "rate_limited", "retry_after": 0}, MIN_RETRY_SECONDS),
    ],
)
def test_the_retry_hint_is_a_real_time(event: dict[str, object], seconds: float) -> None:
    assert retry_hint(event) == pytest.approx(seconds)


async def test_the_pace_never_outruns_the_servers_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sending as fast as the pacer allows, 300 messages meet no refusal from a bucket like
    the gateway's, and take about as long as the server's rate makes necessary."""
    server = TokenBucket(50.0, 100, trio.current_time)
    pacer = Pacer((50.0, 100))
    start = trio.current_time()
    for _ in range(300):
        await pacer.wait()
        assert server.try_take(), "the server would have refused this one"
    elapsed = trio.current_time() - start
    assert 200 / 50 <= elapsed <= 300 / 45


async def test_each_refusal_halves_the_pace(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer((40.0, 10))
    pacer.refused()
    assert pacer.per_second == pytest.approx(18.0)  # 40 * 0.9, halved
    pacer.refused()
    assert pacer.per_second == pytest.approx(9.0)
    start = trio.current_time()
    for _ in range(9):
        await pacer.wait()
    assert trio.current_time() - start == pytest.approx(1.0)  # from an empty bucket
    assert Pacer(None).per_second is None


async def test_answers_reach_what_waits_for_them_and_a_lost_connection_ends_the_wait() -> None:
    deliveries = Deliveries()
    acked, lost = deliveries.expect("c-1"), deliveries.expect("c-2")
    assert not deliveries.answer({"type": "ack", "ref": "c-9"})  # not ours: left to others
    assert deliveries.answer({"type": "ack", "ref": "c-1", "id": "1-0"})
    assert await acked.wait() == {"type": "ack", "ref": "c-1", "id": "1-0"}
    deliveries.lose_all()
    assert await lost.wait() is None
    assert len(deliveries) == 0
