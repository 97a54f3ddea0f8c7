"""Unit tests of PresenceTable, each run against the compiled table and its pure twin."""

from __future__ import annotations

import gc
import math
import pickle
import random
import weakref
from typing import Any

import pytest

from presence_core import TOMBSTONE

TICK = 0.01


def snapshot(table: Any) -> Any:
    """Everything observable without changing the table (drains are destructive)."""
    stats = table.stats()
    del stats["memory_bytes"], stats["implementation"]
    keys = list(table)
    return keys, [(table.get(k), table.deadline(k)) for k in keys], stats


# -- basics -------------------------------------------------------------------------------


def test_upsert_get_len_contains(Table: Any) -> None:
    t = Table(10, tick=TICK)
    assert t.upsert("a", 1, 5.0, now=100.0) is True
    assert t.upsert("a", 2, 5.0, now=100.0) is False
    assert t.upsert(("b", 1), 3, 5, now=100.0) is True
    assert len(t) == 2
    assert "a" in t and ("b", 1) in t and "c" not in t
    assert t.get("a") == 2 and t.get("c") is None and t.get("c", 7) == 7
    assert t.deadline("a") == 105.0 and t.deadline("c", -1) == -1
    assert t.capacity == 10 and t.tick == TICK


def test_iteration_is_most_recent_first_and_get_does_not_touch(Table: Any) -> None:
    t = Table(10, tick=TICK)
    for i, k in enumerate("abcd"):
        t.upsert(k, i, 10.0, now=0.0)
    assert list(t) == ["d", "c", "b", "a"]
    t.touch("b", now=1.0)
    t.get("a")
    assert "a" in t
    assert list(t) == ["b", "d", "c", "a"]
    t.upsert("c", 9, 10.0, now=1.0)
    assert list(t) == ["c", "b", "d", "a"]


def test_iteration_detects_changes(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=0.0)
    t.upsert("b", 1, 1.0, now=0.0)
    it = iter(t)
    assert next(it) == "b"
    t.touch("a", now=0.0)
    with pytest.raises(RuntimeError, match="changed during iteration"):
        next(it)


def test_touch_refreshes_deadline_and_keeps_ttl(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 5.0, now=0.0)
    assert t.touch("a", now=3.0) is True
    assert t.deadline("a") == 8.0
    assert t.touch("a", ttl=1.0, now=4.0) is True
    assert t.deadline("a") == 5.0
    assert t.touch("a", now=4.5) is True  # the new ttl sticks
    assert t.deadline("a") == 5.5
    assert t.touch("missing", now=4.5) is False
    assert t.drain_dirty() == [("a", 1)]  # one insert; touches are not changes


def test_touch_many_counts_live_keys(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert_many([(k, k.upper()) for k in "abc"], 2.0, now=0.0)
    assert t.touch_many(["a", "x", "c", "a"], now=1.0) == 3
    assert t.deadline("a") == 3.0 and t.deadline("b") == 2.0
    assert list(t) == ["a", "c", "b"]
    assert t.touch_many(iter(["b"]), ttl=10.0, now=1.0) == 1
    assert t.deadline("b") == 11.0
    assert t.touch_many([], now=1.0) == 0


def test_upsert_many_returns_new_count(Table: Any) -> None:
    t = Table(10, tick=TICK)
    assert t.upsert_many([("a", 1), ("b", 2), ("a", 3)], 1.0, now=0.0) == 2
    assert t.get("a") == 3 and list(t) == ["a", "b"]
    assert t.upsert_many((p for p in [("c", 1)]), 1.0, now=0.0) == 1


def test_pop(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=0.0)
    assert t.pop("a") == 1
    assert t.pop("a") is None and t.pop("a", "gone") == "gone"
    assert len(t) == 0 and "a" not in t
    assert t.expire(now=5.0) == []  # a popped entry is off the wheel too


# -- expiry ---------------------------------------------------------------------------------


def test_expire_exactly_at_deadline(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=0.0)
    t.upsert("b", 2, 1.005, now=0.0)  # same tick as "a"'s deadline, a bit later
    assert t.expire(now=0.999) == []
    assert t.expire(now=1.0) == [("a", 1)]
    assert t.expire(now=1.004) == []
    assert t.expire(now=1.005) == [("b", 2)]
    assert len(t) == 0


def test_heartbeat_postpones_expiry(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=0.0)
    for step in range(1, 50):
        t.touch("a", now=step * 0.5)
        assert t.expire(now=step * 0.5) == []
    assert t.expire(now=25.5) == [("a", 1)]


def test_shorter_deadline_is_honoured(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 3600.0, now=0.0)
    t.touch("a", ttl=1.0, now=0.0)
    assert t.expire(now=1.0) == [("a", 1)]


@pytest.mark.parametrize(
    "ttl",
    [
        0.005,
        2.55,
        2.56,
        2.57,
        655.35,
        655.36,
        655.37,
        3600.0,
        86400.0 * 3,
        167772.15,
        167772.16,
        167772.17,
        86400.0 * 400,
        86400.0 * 498,
        86400.0 * 3650,
        1e12,
    ],
)
def test_deadlines_across_every_wheel_level(Table: Any, ttl: float) -> None:
    # 256**k ticks of 10 ms are 2.56 s, 655.36 s, 167772.16 s, ~497 days: one each side of
    # every level boundary, plus far beyond the wheel's horizon.
    t = Table(4, tick=TICK)
    now = 1234.567
    t.upsert("k", "v", ttl, now=now)
    deadline = now + ttl
    probes = sorted({now + ttl * f for f in (0.25, 0.5, 0.9, 0.999)} | {deadline - TICK})
    for p in probes:
        assert t.expire(now=p) == [], p
    assert "k" in t
    assert t.expire(now=deadline) == [("k", "v")]
    assert len(t) == 0


def test_wheel_wraps_many_times_with_periodic_expire(Table: Any) -> None:
    t = Table(1000, tick=TICK)
    rng = random.Random(7)
    now = 0.0
    deadlines = {}
    for i in range(300):
        ttl = rng.choice([0.02, 0.3, 3.0, 700.0, 20000.0]) * rng.random() + 0.01
        t.upsert(i, i, ttl, now=now)
        deadlines[i] = now + ttl
    while deadlines:
        now += rng.choice([0.01, 0.5, 7.0, 300.0])
        got = dict(t.expire(now=now))
        want = {k for k, d in deadlines.items() if d <= now}
        assert set(got) == want
        for k in want:
            del deadlines[k]
        t.check_invariants()


def test_time_not_moving(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=5.0)
    for _ in range(3):
        assert t.expire(now=5.0) == []
    assert t.expire(now=6.0) == [("a", 1)]


def test_time_moving_backwards(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=100.0)
    assert t.expire(now=50.0) == []
    t.upsert("b", 2, 1.0, now=40.0)  # deadline behind the wheel's current time
    assert t.expire(now=40.5) == []
    assert t.expire(now=41.0) == [("b", 2)]
    assert t.expire(now=100.5) == []
    assert t.expire(now=101.0) == [("a", 1)]
    t.check_invariants()


def test_negative_times(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=-10.0)
    assert t.expire(now=-9.5) == []
    assert t.expire(now=-9.0) == [("a", 1)]


def test_default_clock_and_injected_clock(Table: Any) -> None:
    now = [10.0]
    t = Table(10, tick=TICK, clock=lambda: now[0])
    t.upsert("a", 1, 1.0)
    assert t.deadline("a") == 11.0
    now[0] = 10.5
    t.touch("a")
    assert t.deadline("a") == 11.5
    now[0] = 11.5
    assert t.expire() == [("a", 1)]

    import time

    real = Table(10, tick=TICK)
    before = time.monotonic()
    real.upsert("a", 1, 100.0)
    assert before + 100.0 <= real.deadline("a") <= time.monotonic() + 100.0


def test_clock_returning_garbage(Table: Any) -> None:
    t = Table(10, tick=TICK, clock=lambda: float("nan"))
    with pytest.raises(ValueError, match="now must be finite"):
        t.upsert("a", 1, 1.0)
    assert len(t) == 0


def test_expire_cost_does_not_scan(Table: Any) -> None:
    # Entries far in the future are not looked at by an expire that crosses no bucket of
    # theirs: their deadlines stay untouched and nothing is rescheduled (pending stays 0).
    t = Table(10_000, tick=TICK)
    for i in range(5_000):
        t.upsert(i, i, 3600.0, now=0.0)
    for step in range(1, 200):
        assert t.expire(now=step * 0.01) == []
    assert t.stats()["pending"] == 0 and len(t) == 5_000


# -- capacity and eviction --------------------------------------------------------------------


def test_capacity_one(Table: Any) -> None:
    t = Table(1, tick=TICK)
    assert t.upsert("a", 1, 1.0, now=0.0)
    assert t.upsert("a", 2, 1.0, now=0.0) is False
    assert t.drain_evicted() == []
    assert t.upsert("b", 3, 1.0, now=0.0)
    assert t.drain_evicted() == [("a", 2)]
    assert list(t) == ["b"] and len(t) == 1
    assert t.drain_dirty() == [("a", TOMBSTONE), ("b", 3)]
    assert t.expire(now=1.0) == [("b", 3)]
    t.check_invariants()


def test_eviction_takes_least_recently_touched(Table: Any) -> None:
    t = Table(3, tick=TICK)
    for k in "abc":
        t.upsert(k, k, 10.0, now=0.0)
    t.touch("a", now=0.0)
    t.get("b")  # reads do not protect
    t.upsert("d", "d", 10.0, now=0.0)
    t.upsert("e", "e", 10.0, now=0.0)
    assert t.drain_evicted() == [("b", "b"), ("c", "c")]
    assert t.drain_evicted() == []
    assert list(t) == ["e", "d", "a"]
    assert t.stats()["evictions"] == 2


# -- dirty list ---------------------------------------------------------------------------------


def test_drain_dirty_coalesces(Table: Any) -> None:
    t = Table(10, tick=TICK)
    for v in range(100):
        t.upsert("a", v, 1.0, now=0.0)
    t.upsert("b", 0, 1.0, now=0.0)
    t.pop("b")
    t.upsert("c", 1, 1.0, now=0.0)
    assert t.drain_dirty() == [("a", 99), ("b", TOMBSTONE), ("c", 1)]
    assert t.drain_dirty() == []


def test_removed_and_readded_key_comes_out_once(Table: Any) -> None:
    t = Table(10, tick=TICK)
    t.upsert("a", 1, 1.0, now=0.0)
    t.drain_dirty()
    t.pop("a")
    t.upsert("b", 1, 1.0, now=0.0)
    t.upsert("a", 2, 1.0, now=0.0)
    assert t.stats()["tombstones"] == 0
    assert t.drain_dirty() == [("a", 2), ("b", 1)]
    t.check_invariants()


def test_drain_dirty_limit(Table: Any) -> None:
    t = Table(10, tick=TICK)
    for i in range(5):
        t.upsert(i, i, 1.0, now=0.0)
    t.expire(now=1.0)
    assert t.drain_dirty(limit=2) == [(0, TOMBSTONE), (1, TOMBSTONE)]
    assert t.drain_dirty(limit=0) == []
    assert t.stats()["dirty"] == 3 and t.stats()["tombstones"] == 3
    assert t.drain_dirty(limit=10) == [(i, TOMBSTONE) for i in (2, 3, 4)]
    assert t.stats()["tombstones"] == 0


def test_track_dirty_off(Table: Any) -> None:
    t = Table(2, tick=TICK, track_dirty=False)
    t.upsert("a", 1, 1.0, now=0.0)
    t.pop("a")
    t.upsert("b", 1, 1.0, now=0.0)
    t.upsert("c", 1, 1.0, now=0.0)
    t.upsert("d", 1, 1.0, now=0.0)
    assert t.drain_dirty() == []
    assert t.drain_evicted() == [("b", 1)]
    assert t.stats()["tombstones"] == 0
    t.check_invariants()


def test_tombstone_sentinel() -> None:
    assert repr(TOMBSTONE) == "TOMBSTONE"
    assert not TOMBSTONE
    assert pickle.loads(pickle.dumps(TOMBSTONE)) is TOMBSTONE
    assert type(TOMBSTONE)() is TOMBSTONE


# -- bad input: a clear error and nothing changed ----------------------------------------------


class BadHash:
    def __hash__(self) -> int:
        raise ZeroDivisionError("bad hash")


class BadEq:
    def __init__(self, h: int) -> None:
        self.h = h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        raise ArithmeticError("bad eq")


def _filled(Table: Any) -> Any:
    t = Table(4, tick=TICK)
    for i in range(4):
        t.upsert(i, str(i), 1.0 + i, now=0.0)
    t.pop(3)
    t.touch(0, now=0.5)
    return t


BAD_TTLS = [
    (0, ValueError, "ttl must be positive and finite"),
    (0.0, ValueError, "ttl must be positive and finite"),
    (-1.0, ValueError, "ttl must be positive and finite"),
    (float("nan"), ValueError, "ttl must be positive and finite"),
    (float("inf"), ValueError, "ttl must be positive and finite"),
    (-float("inf"), ValueError, "ttl must be positive and finite"),
    ("1", TypeError, "ttl must be a number of seconds"),
    (True, TypeError, "ttl must be a number of seconds"),
    (None, TypeError, "ttl must be a number of seconds"),
    (1j, TypeError, "ttl must be a number of seconds"),
]


@pytest.mark.parametrize(("ttl", "exc", "msg"), BAD_TTLS)
def test_bad_ttl_changes_nothing(Table: Any, ttl: Any, exc: type, msg: str) -> None:
    t = _filled(Table)
    before = snapshot(t)
    calls = [
        lambda: t.upsert("new", 1, ttl, now=1.0),
        lambda: t.upsert(0, 1, ttl, now=1.0),
        lambda: t.upsert_many([("new", 1), (0, 2)], ttl, now=1.0),
    ]
    if ttl is not None:  # None means "keep the entry's ttl" for touch
        calls += [lambda: t.touch(0, ttl, now=1.0), lambda: t.touch_many([0, 1], ttl, now=1.0)]
    for call in calls:
        with pytest.raises(exc, match=msg):
            call()
        assert snapshot(t) == before


BAD_NOWS = [
    (float("nan"), ValueError, "now must be finite"),
    (float("inf"), ValueError, "now must be finite"),
    ("0", TypeError, "now must be a number of seconds"),
    (False, TypeError, "now must be a number of seconds"),
]


@pytest.mark.parametrize(("now", "exc", "msg"), BAD_NOWS)
def test_bad_now_changes_nothing(Table: Any, now: Any, exc: type, msg: str) -> None:
    t = _filled(Table)
    before = snapshot(t)
    for call in [
        lambda: t.upsert("new", 1, 1.0, now=now),
        lambda: t.upsert_many([("new", 1)], 1.0, now=now),
        lambda: t.touch(0, now=now),
        lambda: t.touch_many([0], now=now),
        lambda: t.expire(now=now),
    ]:
        with pytest.raises(exc, match=msg):
            call()
        assert snapshot(t) == before


@pytest.mark.parametrize("key", [[1], {"a": 1}, {1}, bytearray(b"x")])
def test_unhashable_keys(Table: Any, key: Any) -> None:
    t = _filled(Table)
    before = snapshot(t)
    for call in [
        lambda: t.upsert(key, 1, 1.0, now=1.0),
        lambda: t.upsert_many([("new", 1), (key, 1)], 1.0, now=1.0),
        lambda: t.touch(key, now=1.0),
        lambda: t.touch_many([0, key], now=1.0),
        lambda: t.get(key),
        lambda: t.pop(key),
        lambda: key in t,
    ]:
        with pytest.raises(TypeError, match="unhashable type"):
            call()
        assert snapshot(t) == before


def test_key_whose_hash_raises(Table: Any) -> None:
    t = _filled(Table)
    before = snapshot(t)
    for call in [
        lambda: t.upsert(BadHash(), 1, 1.0, now=1.0),
        lambda: t.upsert_many([("new", 1), (BadHash(), 1)], 1.0, now=1.0),
        lambda: t.touch_many([0, BadHash()], now=1.0),
        lambda: t.get(BadHash()),
        lambda: t.pop(BadHash()),
    ]:
        with pytest.raises(ZeroDivisionError, match="bad hash"):
            call()
        assert snapshot(t) == before


def test_key_whose_eq_raises(Table: Any) -> None:
    t = Table(4, tick=TICK)
    first = BadEq(5)
    t.upsert(first, 1, 1.0, now=0.0)
    assert t.get(first) == 1  # identity wins over __eq__, as in dict
    before = snapshot(t)
    other = BadEq(5)  # same hash, different object: __eq__ must run and raises
    for call in [
        lambda: t.upsert(other, 2, 1.0, now=0.0),
        lambda: t.touch(other, now=0.0),
        lambda: t.touch_many([first, other], now=0.0),
        lambda: t.get(other),
        lambda: t.pop(other),
    ]:
        with pytest.raises(ArithmeticError, match="bad eq"):
            call()
        assert snapshot(t) == before


@pytest.mark.parametrize(
    "items",
    [[("a", 1), ("b",)], [("a", 1), ["b", 2]], [("a", 1), "ab"], [("a", 1, 2)], [None]],
)
def test_upsert_many_bad_items(Table: Any, items: Any) -> None:
    t = _filled(Table)
    before = snapshot(t)
    with pytest.raises(TypeError, match=r"items must be \(key, value\) tuples"):
        t.upsert_many(items, 1.0, now=1.0)
    assert snapshot(t) == before


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"capacity": 0}, ValueError, "capacity must be between 1 and"),
        ({"capacity": -5}, ValueError, "capacity must be between 1 and"),
        ({"capacity": 2**40}, ValueError, "capacity must be between 1 and"),
        ({"capacity": 1.5}, TypeError, "capacity must be an int"),
        ({"capacity": True}, TypeError, "capacity must be an int"),
        ({"capacity": 4, "tick": 0.0}, ValueError, "tick must be between"),
        ({"capacity": 4, "tick": math.nan}, ValueError, "tick must be between"),
        ({"capacity": 4, "tick": 120}, ValueError, "tick must be between"),
        ({"capacity": 4, "tick": "1"}, TypeError, "tick must be a number"),
        ({"capacity": 4, "clock": 5}, TypeError, "clock must be a callable"),
    ],
)
def test_constructor_errors(Table: Any, kwargs: dict[str, Any], exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        Table(**kwargs)


def test_drain_dirty_bad_limit(Table: Any) -> None:
    t = _filled(Table)
    before = snapshot(t)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        t.drain_dirty(limit=-1)
    with pytest.raises(TypeError, match="limit must be an int or None"):
        t.drain_dirty(limit=1.0)
    assert snapshot(t) == before


def test_values_referring_to_their_table_are_collected(Table: Any) -> None:
    class Holder:
        table: Any = None

    t = Table(10, tick=TICK)
    holder = Holder()
    holder.table = t
    t.upsert("k", holder, 5.0, now=0.0)
    t.upsert(("key", "refers"), [t], 5.0, now=0.0)
    t.upsert("gone", 1, 5.0, now=0.0)
    t.pop("gone")  # removed but not drained: the key is still held
    ref = weakref.ref(t)
    del t, holder
    gc.collect()
    assert ref() is None


def test_not_picklable(Table: Any) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Table(1))


def test_generic_alias(Table: Any) -> None:
    alias = Table[str, int]
    assert alias.__origin__ is Table


# -- scale --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_million_entries(Table: Any) -> None:
    n = 1_000_000 if Table.__module__.endswith("_fast") else 200_000
    t = Table(n, tick=0.05)
    keys = [f"user:{i}" for i in range(n)]
    assert t.upsert_many([(k, i) for i, k in enumerate(keys)], 30.0, now=0.0) == n
    assert len(t) == n
    assert t.drain_dirty(limit=5) == [(k, i) for i, k in enumerate(keys[:5])]
    half = keys[::2]
    assert t.touch_many(half, now=20.0) == len(half)
    assert t.upsert("one more", 0, 30.0, now=20.0)
    assert t.drain_evicted() == [(keys[1], 1)]
    expired = t.expire(now=30.0)
    assert len(expired) == n // 2 - 1
    assert len(t) == n // 2 + 1
    assert t.expire(now=50.0)[-1] == ("one more", 0) or len(t) == 0
    assert len(t) == 0
    assert len(t.drain_dirty()) == n + 1  # every key, plus "one more", once
    assert t.stats()["tombstones"] == 0
    t.check_invariants()
