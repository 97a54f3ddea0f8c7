"""The write-behind store against a real valkey-server, in both layouts.

Every test compares Redis with the Tracker: the members hash of every topic must hold exactly
the Tracker's presences (field ``<ref> <key>`` -> the meta bytes), and no other topic key of the
test's prefix may exist.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

pytest.importorskip("redis")

from servers import ValkeyServer, free_port  # noqa: E402

from presence_core import Tracker  # noqa: E402
from presence_core.metrics import REDIS_ERRORS, REDIS_RECONNECTS, Metrics  # noqa: E402
from presence_core.store import Layout, RedisStore  # noqa: E402
from presence_core.store import store as store_module  # noqa: E402
from presence_core.store.layout import member_field, parse_member_field  # noqa: E402
from presence_core.testing import ManualClock  # noqa: E402
from presence_core.tracker.encoding import ref_of  # noqa: E402

LAYOUTS = ["hash_ttl", "zset"]
T = TypeVar("T")
_prefixes = itertools.count()


def fresh_prefix() -> str:
    return f"t{next(_prefixes)}-{random.getrandbits(32):x}"


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


def expected(tracker: Tracker) -> dict[str, dict[bytes, bytes]]:
    out: dict[str, dict[bytes, bytes]] = {}
    for topic in tracker.topics():
        out[topic] = {member_field(p[1], ref_of(p[2])): p[2] for p in tracker.presences(topic)}
    return out


def in_redis(server: ValkeyServer, layout: Layout) -> dict[str, dict[bytes, bytes]]:
    """Every topic's members hash under the layout's prefix, read with redis-py."""
    out: dict[str, dict[bytes, bytes]] = {}
    with server.client(decode_responses=False) as client:
        for key in client.scan_iter(match=layout.prefix.encode() + b":{t:*", count=1000):
            kind, topic, suffix = layout.parse_key(key)
            assert kind == "t"
            if suffix == "m":
                out[topic] = client.hgetall(key)
            else:
                assert suffix == "d"
    return out


def deadlines(server: ValkeyServer, layout: Layout, topic: str) -> dict[bytes, float]:
    with server.client(decode_responses=False) as client:
        return dict(client.zrange(layout.deadlines_key(topic), 0, -1, withscores=True))


async def settle(tracker: Tracker, store: RedisStore, timeout: float = 5.0) -> None:
    tracker.flush()
    await store.drain(timeout)


def assert_equal(server: ValkeyServer, store: RedisStore, tracker: Tracker) -> None:
    want = expected(tracker)
    got = in_redis(server, store.layout)
    assert got == want
    if store.layout_name == "zset":
        for topic, members in want.items():
            assert set(deadlines(server, store.layout, topic)) == set(members)


HOSTILE = [
    "{",
    "}",
    "{room}",
    "a:b:c",
    "line\nbreak",
    "with space",
    "é€😀",
    "%7B",
    "*?[]\\",
    "x" * 250,
]


class Ops:
    """Random Tracker operations over a small population (so they collide often)."""

    def __init__(self, tracker: Tracker, clock: ManualClock | None, seed: int) -> None:
        self.tracker = tracker
        self.clock = clock
        self.rng = random.Random(seed)
        self.topics = ["room:1", "room:2", "{lobby}", "doc 4"]
        self.keys = ["alice", "bob", "carol", "d\nave", "ü"]
        self.conns = list(range(12))

    def step(self) -> None:
        rng, tracker = self.rng, self.tracker
        roll = rng.random()
        conn = rng.choice(self.conns)
        topic, key = rng.choice(self.topics), rng.choice(self.keys)
        if roll < 0.45:
            tracker.track(conn, topic, key, {"s": rng.choice(["on", "away", "busy"])})
        elif roll < 0.60:
            tracker.untrack(conn, topic)
        elif roll < 0.70:
            tracker.disconnect(conn)
        elif roll < 0.85:
            tracker.heartbeat(conn)
        elif self.clock is not None:
            self.clock.advance(rng.uniform(0, 12))
            tracker.expire()
        if rng.random() < 0.2:
            tracker.flush()


def new_store(tracker: Tracker, server: ValkeyServer, layout: str, **kwargs: Any) -> RedisStore:
    kwargs.setdefault("prefix", fresh_prefix())
    kwargs.setdefault("backoff_min", 0.02)
    kwargs.setdefault("backoff_max", 0.2)
    return RedisStore(tracker, server.url, layout=layout, **kwargs)  # type: ignore[arg-type]


# -- convergence ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_operations_converge(valkey: ValkeyServer, layout: str) -> None:
    clock = ManualClock(1000.0)
    tracker = Tracker(clock=clock, connection_ttl=30.0)
    ops = Ops(tracker, clock, seed=7)
    for _ in range(50):  # some state before the store starts: the start writes it back
        ops.step()

    async def main() -> None:
        async with new_store(tracker, valkey, layout) as store:
            assert store.layout_name == layout
            assert_equal(valkey, store, tracker)
            for _round in range(6):
                for _ in range(150):
                    ops.step()
                    if ops.rng.random() < 0.05:
                        await asyncio.sleep(0)  # let the flusher write in between
                await settle(tracker, store)
                assert_equal(valkey, store, tracker)
                assert store.pending == 0
            assert store.errors == 0
            assert sum(len(m) for m in expected(tracker).values()) > 0

    run(main)


def test_auto_detects_hash_field_ttls(valkey: ValkeyServer) -> None:
    async def main() -> None:
        tracker = Tracker()
        tracker.track("c", "room", "alice", {})
        async with new_store(tracker, valkey, "auto") as store:
            assert store.layout_name == "hash_ttl"
            with valkey.client(decode_responses=False) as client:
                key = store.layout.members_key("room")
                (field,) = client.hkeys(key)
                ttl = client.execute_command("HPTTL", key, "FIELDS", 1, field)[0]
                assert 0 < ttl <= store.member_ttl * 1000

    run(main)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hostile_names_round_trip(valkey: ValkeyServer, layout: str) -> None:
    async def main() -> None:
        tracker = Tracker()
        async with new_store(tracker, valkey, layout) as store:
            for i, topic in enumerate(HOSTILE):
                for j, key in enumerate(HOSTILE):
                    tracker.track(f"c{i}-{j}", topic, key, {"k": key})
            await settle(tracker, store)
            assert_equal(valkey, store, tracker)
            got = in_redis(valkey, store.layout)
            assert set(got) == set(HOSTILE)
            for members in got.values():
                assert {parse_member_field(f)[0] for f in members} == set(HOSTILE)
            # Half of them leave: the deletions find their fields.
            for i in range(0, len(HOSTILE), 2):
                for j in range(len(HOSTILE)):
                    tracker.disconnect(f"c{i}-{j}")
            await settle(tracker, store)
            assert_equal(valkey, store, tracker)

    run(main)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_redis_killed_mid_writes_and_restarted_empty(valkey: ValkeyServer, layout: str) -> None:
    metrics = Metrics()
    tracker = Tracker(metrics=metrics)
    ops = Ops(tracker, None, seed=11)
    ops.conns = list(range(200))
    ops.topics = [f"room:{i}" for i in range(20)]
    slowest = 0.0

    async def churn(seconds: float) -> None:
        nonlocal slowest
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(50):
                started = time.perf_counter()
                ops.step()  # never raises, never waits on Redis
                slowest = max(slowest, time.perf_counter() - started)
            tracker.flush()
            await asyncio.sleep(0.001)

    async def main() -> None:
        store = new_store(tracker, valkey, layout)
        await store.start()
        try:
            await churn(0.2)
            valkey.kill()
            await churn(0.3)
            assert not store.connected
            assert store.pending > 0
            valkey.restart()
            await churn(0.2)
            await settle(tracker, store, timeout=10.0)
            assert_equal(valkey, store, tracker)
            assert store.reconnects >= 1
            assert metrics.counter(REDIS_RECONNECTS) >= 1
            assert metrics.counter(REDIS_ERRORS) >= 1
        finally:
            if not valkey.alive():
                valkey.restart()
            await store.stop()

    run(main)
    assert slowest < 0.05


def test_start_while_redis_is_down(valkey_factory: Callable[..., ValkeyServer]) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    async def main() -> None:
        tracker = Tracker()
        tracker.track("c1", "room", "alice", {"a": 1})
        store = RedisStore(tracker, url, prefix=fresh_prefix(), backoff_min=0.02, backoff_max=0.1)
        await store.start()  # does not raise: the store keeps trying
        try:
            assert not store.connected
            tracker.track("c2", "room", "bob", {})
            tracker.flush()
            server = valkey_factory(port=port)
            await settle(tracker, store, timeout=10.0)
            assert store.layout_name == "hash_ttl"
            assert_equal(server, store, tracker)
        finally:
            await store.stop()

    run(main)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_error_reply_keeps_other_commands_and_is_retried_by_the_sweep(
    valkey: ValkeyServer, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        tracker = Tracker()
        store = new_store(tracker, valkey, layout, member_ttl=0.6)
        await store.start()
        try:
            bad = store.layout.members_key("bad")
            with valkey.client() as client:
                client.set(bad, "not a hash")  # every write to it fails with WRONGTYPE
            tracker.track("c1", "bad", "alice", {})
            tracker.track("c1", "good", "bob", {})
            with caplog.at_level(logging.ERROR, "presence_core.store"):
                await settle(tracker, store)
            assert store.errors >= 1
            assert "WRONGTYPE" in caplog.text
            with valkey.client(decode_responses=False) as client:
                got = client.hgetall(store.layout.members_key("good"))
            assert got == expected(tracker)["good"]
            with valkey.client() as client:
                client.delete(bad)
            await asyncio.sleep(0.35)  # the sweep (every 0.2 s) writes the topic in full
            await settle(tracker, store)
            assert_equal(valkey, store, tracker)
        finally:
            await store.stop()

    run(main)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_failing_feed_batch_never_raises_into_the_tracker(
    valkey: ValkeyServer, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        tracker = Tracker()
        tracker.track("c0", "room", "zed", {})
        async with new_store(tracker, valkey, layout) as store:
            real = store_module.presence_field

            def broken(p: Any) -> bytes:
                raise RuntimeError("boom")

            monkeypatch.setattr(store_module, "presence_field", broken)
            tracker.track("c1", "room", "alice", {})
            tracker.untrack("c0", "room")
            tracker.flush()  # does not raise
            monkeypatch.setattr(store_module, "presence_field", real)
            assert store.errors == 1
            assert tracker.metrics.as_dict()["counters"]["hook_errors"] == 0
            await settle(tracker, store)  # the full write-back repairs the joins
            got = in_redis(valkey, store.layout)
            want = expected(tracker)
            assert set(want["room"]) <= set(got["room"])

    run(main)


# -- member TTLs, liveness, stop --------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_member_ttls_refreshed_while_alive_and_expire_after_death(
    valkey: ValkeyServer, layout: str
) -> None:
    ttl = 0.3

    async def main() -> None:
        tracker = Tracker(connection_ttl=60.0)
        for i in range(30):
            tracker.track(i, f"room:{i % 3}", f"user{i}", {"i": i})
        store = new_store(tracker, valkey, layout, member_ttl=ttl, liveness_timeout=ttl)
        await store.start()
        try:
            for _ in range(4):  # four TTLs: only the sweep keeps the members there
                await asyncio.sleep(ttl)
                assert_equal(valkey, store, tracker)
            with valkey.client() as client:
                assert client.exists(store.layout.node_alive_key(store.node))
        finally:
            await store.stop(remove_members=False)  # as a dead process would
        assert in_redis(valkey, store.layout) != {}
        await asyncio.sleep(ttl + 0.15)
        assert in_redis(valkey, store.layout) == {}
        with valkey.client() as client:
            assert not client.exists(store.layout.node_alive_key(store.node))
            assert not client.exists(store.layout.deadlines_key("room:0"))

    run(main)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_graceful_stop_removes_only_own_members(valkey: ValkeyServer, layout: str) -> None:
    prefix = fresh_prefix()

    async def main() -> None:
        mine, theirs = Tracker(), Tracker()
        for i in range(40):
            mine.track(i, f"room:{i % 4}", f"u{i}", {})
            theirs.track(i, f"room:{i % 5}", f"u{i}", {})
        other = new_store(theirs, valkey, layout, prefix=prefix)
        store = new_store(mine, valkey, layout, prefix=prefix)
        await other.start()
        await store.start()
        mine.untrack(0, "room:0")  # a pending deletion at stop
        mine.flush()
        layout_ = store.layout
        with valkey.client() as client:
            assert client.sismember(layout_.nodes_key, mine.node)
            assert client.smembers(layout_.node_topics_key(mine.node)) == {
                f"room:{i}" for i in range(4)
            }
        await store.stop()
        assert in_redis(valkey, layout_) == expected(theirs)
        with valkey.client() as client:
            assert not client.exists(layout_.node_alive_key(mine.node))
            assert not client.exists(layout_.node_topics_key(mine.node))
            assert not client.sismember(layout_.nodes_key, mine.node)
            assert client.sismember(layout_.nodes_key, theirs.node)
        await other.stop()
        assert in_redis(valkey, layout_) == {}

    run(main)


def test_metrics_show_pending_and_lag(valkey: ValkeyServer) -> None:
    metrics = Metrics()
    tracker = Tracker(metrics=metrics)

    async def main() -> None:
        async with new_store(tracker, valkey, "hash_ttl") as store:
            tracker.track("c", "room", "alice", {})
            tracker.flush()
            assert store.pending == 1
            await store.drain(5.0)
            gauges = metrics.as_dict()["gauges"]
            assert gauges["redis_pending"] == 0.0
            assert gauges["redis_flush_lag_seconds"] == 0.0

    run(main)


def test_sweep_writes_back_members_missing_from_redis(
    valkey: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        tracker = Tracker()
        for i in range(5):
            tracker.track(i, "room", f"u{i}", {})
        async with new_store(tracker, valkey, "hash_ttl", member_ttl=0.3) as store:
            await settle(tracker, store)  # no join left pending to write them again
            key = store.layout.members_key("room")
            with valkey.client(decode_responses=False) as client:
                lost = client.hkeys(key)[:2]
                client.hdel(key, *lost)  # lost behind the store's back
            with caplog.at_level(logging.WARNING, "presence_core.store"):
                await asyncio.sleep(0.15)  # one sweep (every 0.1 s) finds them missing (-2)
            assert "2 live members were missing" in caplog.text
            await settle(tracker, store)
            assert_equal(valkey, store, tracker)
            assert store.errors == 0

    run(main)
