"""Limits: the dataclass, per-plan quotas and the per-connection token bucket."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from presence_core.errors import (
    LimitExceeded,
    MetaTooLarge,
    PresenceValueError,
    QuotaExceeded,
    RateLimited,
)
from presence_core.limits import DEFAULT_PLAN, Limits
from presence_core.metrics import LIMIT_HITS
from presence_core.testing import ManualClock
from presence_core.tracker import Tracker

ROOM = "room:1"


def make(clock: ManualClock, **limits: Any) -> Tracker:
    return Tracker(clock=clock, plans={DEFAULT_PLAN: Limits(**limits)})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(50.0)


# -- the dataclass -----------------------------------------------------------------------------


def test_defaults_are_sane() -> None:
    limits = Limits()
    assert limits.max_key_length >= 36  # a UUID
    assert 1024 <= limits.max_meta_bytes <= 65536
    assert limits.max_presences_per_connection >= limits.max_topics_per_connection >= 10
    assert limits.burst >= 10 and limits.rate_per_second >= 1
    assert limits.as_dict()["burst"] == limits.burst
    assert limits.emission_interval == pytest.approx(1 / limits.rate_per_second)
    assert limits.burst_tolerance == pytest.approx((limits.burst - 1) / limits.rate_per_second)


def test_limits_are_frozen_and_keyword_only() -> None:
    limits = Limits(burst=5)
    with pytest.raises(AttributeError):
        limits.burst = 6  # type: ignore[misc]
    with pytest.raises(TypeError):
        Limits(5)  # type: ignore[misc]
    assert Limits(rate_per_second=2).rate_per_second == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_key_length": 0}, ValueError),
        ({"max_meta_bytes": -1}, ValueError),
        ({"burst": 1.5}, TypeError),
        ({"max_metas_per_key": True}, TypeError),
        ({"rate_per_second": 0}, ValueError),
        ({"rate_per_second": math.inf}, ValueError),
        ({"rate_per_second": math.nan}, ValueError),
        ({"rate_per_second": "5"}, TypeError),
        # a bucket whose arithmetic overflows would admit everything or fail on every write
        ({"rate_per_second": 5e-324}, ValueError),
        ({"burst": 10**400}, ValueError),
        ({"burst": 2**63}, ValueError),
        ({"rate_per_second": 1e-300, "burst": 10**10}, ValueError),
    ],
)
def test_limits_validation(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Limits(**kwargs)


# -- sizes ---------------------------------------------------------------------------------------


def test_meta_size_is_measured_as_json_bytes(clock: ManualClock) -> None:
    tracker = make(clock, max_meta_bytes=32)
    meta = {"s": "x" * 24}  # {"s":"xxxx..."} is 8 + 24 bytes
    assert len(orjson.dumps(meta)) == 32
    tracker.track("c1", ROOM, "k", meta)
    with pytest.raises(MetaTooLarge) as info:
        tracker.track("c1", ROOM, "k", {"s": "x" * 25})
    assert (info.value.size, info.value.limit) == (33, 32)
    # Non-ASCII text counts in UTF-8 bytes, as it goes on the wire.
    with pytest.raises(MetaTooLarge):
        tracker.track("c1", ROOM, "k", {"s": "é" * 13})


def test_key_and_topic_lengths(clock: ManualClock) -> None:
    tracker = make(clock, max_key_length=3, max_topic_length=4)
    tracker.track("c1", "abcd", "abc", {})
    with pytest.raises(PresenceValueError, match="key"):
        tracker.track("c1", "abcd", "abcd", {})
    with pytest.raises(PresenceValueError, match="topic"):
        tracker.track("c1", "abcde", "abc", {})


# -- quotas --------------------------------------------------------------------------------------


def test_presences_per_connection(clock: ManualClock) -> None:
    tracker = make(clock, max_presences_per_connection=2)
    tracker.track("c1", "a", "k1", {})
    tracker.track("c1", "a", "k2", {})
    with pytest.raises(QuotaExceeded) as info:
        tracker.track("c1", "b", "k1", {})
    assert (info.value.conn, info.value.limit, info.value.value) == (
        "c1",
        "max_presences_per_connection",
        2,
    )
    # Changing an existing presence is not a new one.
    tracker.track("c1", "a", "k1", {"v": 1})
    tracker.untrack("c1", "a", "k2")
    tracker.track("c1", "b", "k1", {})


def test_topics_per_connection(clock: ManualClock) -> None:
    tracker = make(clock, max_topics_per_connection=2)
    tracker.track("c1", "a", "k1", {})
    tracker.track("c1", "b", "k1", {})
    tracker.track("c1", "b", "k2", {})  # another key in a topic it is in already
    with pytest.raises(QuotaExceeded, match="max_topics_per_connection"):
        tracker.track("c1", "c", "k1", {})
    tracker.track("c2", "c", "k1", {})  # quotas are per connection


def test_metas_per_key(clock: ManualClock) -> None:
    tracker = make(clock, max_metas_per_key=2)
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c2", ROOM, "alice", {})
    with pytest.raises(QuotaExceeded, match="max_metas_per_key"):
        tracker.track("c3", ROOM, "alice", {})  # a new connection is refused too
    assert not tracker.connected("c3")
    tracker.track("c3", "other", "alice", {})  # per topic
    tracker.disconnect("c1")
    tracker.track("c4", ROOM, "alice", {})


def test_limit_hits_are_counted(clock: ManualClock) -> None:
    tracker = make(clock, max_presences_per_connection=1, burst=1, rate_per_second=1)
    tracker.track("c1", "a", "k", {})
    for _ in range(3):
        with pytest.raises(LimitExceeded):
            tracker.track("c1", "b", "k", {})
    tracker.sync_metrics()
    assert (
        sum(
            tracker.metrics.counter(LIMIT_HITS, limit)
            for limit in (
                "rate_per_second",
                "max_presences_per_connection",
                "max_topics_per_connection",
                "max_metas_per_key",
            )
        )
        == 3
    )  # type: ignore[attr-defined]


# -- plans ---------------------------------------------------------------------------------------


def test_each_connection_uses_its_plan(clock: ManualClock) -> None:
    tracker = Tracker(
        clock=clock,
        plans={
            "free": Limits(max_presences_per_connection=1),
            "pro": Limits(max_presences_per_connection=3),
        },
        default_plan="free",
    )
    tracker.connect("pro-conn", plan="pro")
    for topic in "abc":
        tracker.track("pro-conn", topic, "k", {})
    tracker.track("free-conn", "a", "k", {})
    with pytest.raises(QuotaExceeded):
        tracker.track("free-conn", "b", "k", {})
    # Upgrading a live connection applies to its next calls.
    tracker.connect("free-conn", plan="pro")
    tracker.track("free-conn", "b", "k", {})
    assert tracker.plans["pro"].max_presences_per_connection == 3


# -- the token bucket ----------------------------------------------------------------------------


def test_burst_then_sustained_rate(clock: ManualClock) -> None:
    tracker = make(clock, rate_per_second=10, burst=5)
    for i in range(5):
        tracker.track("c1", ROOM, f"k{i}", {})
    with pytest.raises(RateLimited) as info:
        tracker.track("c1", ROOM, "k5", {})
    assert info.value.retry_after == pytest.approx(0.1)
    assert info.value.conn == "c1"
    clock.advance(0.1)
    tracker.track("c1", ROOM, "k5", {})
    with pytest.raises(RateLimited):
        tracker.track("c1", ROOM, "k6", {})
    # After a pause the bucket refills up to the burst, not beyond.
    clock.advance(60)
    for i in range(5):
        tracker.update("c1", ROOM, f"k{i}", {"v": 1})
    with pytest.raises(RateLimited):
        tracker.update("c1", ROOM, "k5", {"v": 1})


def test_a_refused_write_spends_no_token(clock: ManualClock) -> None:
    tracker = make(clock, rate_per_second=1, burst=2, max_presences_per_connection=1)
    tracker.track("c1", "a", "k", {})
    with pytest.raises(QuotaExceeded):
        tracker.track("c1", "b", "k", {})
    tracker.track("c1", "a", "k", {"v": 1})  # the second token is still there


def test_buckets_are_per_connection(clock: ManualClock) -> None:
    tracker = make(clock, rate_per_second=1, burst=1)
    tracker.track("c1", ROOM, "a", {})
    tracker.track("c2", ROOM, "b", {})
    with pytest.raises(RateLimited):
        tracker.track("c1", ROOM, "c", {})


def test_leaving_is_never_rate_limited(clock: ManualClock) -> None:
    tracker = make(clock, rate_per_second=1, burst=1)
    tracker.track("c1", "a", "k", {})
    tracker.track("c2", "a", "k", {})
    for _ in range(10):
        assert tracker.heartbeat("c1")
    assert tracker.untrack("c1", "a") == 1
    assert tracker.disconnect("c2") == 1


def test_rate_is_exact_with_large_clock_values() -> None:
    # Wall-clock seconds (~1.7e9) leave few bits for the fraction; rounding must not refuse
    # a write that is exactly on time.
    clock = ManualClock(1_700_000_000.0)
    tracker = make(clock, rate_per_second=20, burst=3)
    for step in range(200):
        tracker.track("c1", ROOM, "k", {"v": step})
        clock.advance(0.05)


def test_reads_accept_keys_any_plan_allows(clock: ManualClock) -> None:
    tracker = Tracker(
        clock=clock,
        plans={"default": Limits(max_key_length=4), "wide": Limits(max_key_length=10)},
    )
    tracker.connect("c1", plan="wide")
    tracker.track("c1", ROOM, "longer-key", {})
    assert tracker.user("longer-key").online
    with pytest.raises(PresenceValueError):
        tracker.track("c2", ROOM, "longer-key", {})  # c2 is on the default plan


def test_a_tiny_rate_still_limits() -> None:
    tracker = Tracker(
        clock=ManualClock(0.0), plans={DEFAULT_PLAN: Limits(rate_per_second=1e-9, burst=1)}
    )
    tracker.track("c1", ROOM, "k", {})
    with pytest.raises(RateLimited):
        tracker.track("c1", ROOM, "k", {"v": 1})


def test_leaving_is_possible_after_a_plan_downgrade(clock: ManualClock) -> None:
    # Limits apply to what a connection adds; what it already holds it may always take away.
    tracker = Tracker(
        clock=clock,
        plans={
            DEFAULT_PLAN: Limits(max_topic_length=8, max_key_length=8),
            "pro": Limits(max_topic_length=64, max_key_length=64),
        },
    )
    tracker.connect("c1", plan="pro")
    tracker.track("c1", "a-long-topic-name", "a-long-key-name", {})
    tracker.connect("c1", plan=DEFAULT_PLAN)
    assert tracker.untrack("c1", "a-long-topic-name", "a-long-key-name") == 1
    assert tracker.totals().presences == 0


# -- the clock stepping backwards ----------------------------------------------------------------


def test_a_clock_stepping_back_does_not_rate_limit_for_the_length_of_the_step(
    clock: ManualClock,
) -> None:
    # An NTP step under clock=time.time: the bucket's arrival time is an hour ahead of `now`.
    tracker = make(clock, rate_per_second=10, burst=5)
    for i in range(3):
        tracker.track("c1", f"t{i}", "k", {})
    clock.set(clock() - 3600.0)
    tracker.heartbeat("c1")  # heartbeats after the step change nothing about it
    tracker.track("c1", "after-step", "k", {})  # admitted: the connection keeps its rate ...
    with pytest.raises(RateLimited) as info:  # ... with the bucket spent, not an hour in debt
        tracker.track("c1", "burst", "k", {})
    assert info.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    tracker.track("c1", "burst", "k", {})


@pytest.mark.parametrize("step", [0.0005, 0.5, 0.99, 1.01, 2.0, 1e6])
def test_a_step_back_of_any_size_costs_under_two_intervals(clock: ManualClock, step: float) -> None:
    tracker = make(clock, rate_per_second=1, burst=3)
    for i in range(3):
        tracker.track("c1", f"t{i}", "k", {})
    clock.set(clock() - step)
    waited = 0.0
    while True:
        try:
            tracker.track("c1", "t3", "k", {})
            break
        except RateLimited as exc:
            clock.advance(exc.retry_after)
            waited += exc.retry_after
    assert waited < 2.0


def test_a_smaller_plan_keeps_its_bucket_spent(clock: ManualClock) -> None:
    tracker = Tracker(
        clock=clock,
        plans={
            DEFAULT_PLAN: Limits(rate_per_second=10, burst=100),
            "small": Limits(rate_per_second=1, burst=2),
        },
    )
    for i in range(100):  # ten seconds of writes at once, within the big plan's burst
        tracker.track("c1", "t", "k", {"i": i})
    tracker.connect("c1", plan="small")
    with pytest.raises(RateLimited) as info:  # not forgiven, not taken for a clock step
        tracker.track("c1", "t", "k", {"i": "next"})
    assert info.value.retry_after == pytest.approx(1.0)


def test_a_full_burst_is_still_refused_without_a_clock_step(clock: ManualClock) -> None:
    tracker = make(clock, rate_per_second=1, burst=3)
    for i in range(3):
        tracker.track("c1", f"t{i}", "k", {})
    with pytest.raises(RateLimited) as info:
        tracker.track("c1", "t3", "k", {})
    assert 0.99 < info.value.retry_after <= 1.0
