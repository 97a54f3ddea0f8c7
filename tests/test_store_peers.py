"""Peers in one event loop: two Trackers, each with its store, on one real valkey-server.

The separate-process cases (convergence, SIGKILL, graceful stop) are in
test_store_processes.py; these reach inside one process to make a subscriber deaf, kill its
connection, or publish garbage.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from servers import ValkeyServer, free_port
from test_store import fresh_prefix, in_redis, run

from presence_core import PresenceTypeError, PresenceValueError, Tracker
from presence_core.metrics import PEER_RESYNCS, REDIS_ERRORS, REDIS_STATUS_READS, Metrics
from presence_core.store import RedisStore
from presence_core.store.peers import GRACE
from presence_core.testing import ClientView

FAST = {
    "liveness_timeout": 1.0,
    "probe_interval": 0.2,
    "reconcile_interval": 60.0,  # only the probes and reconnections reconcile here
    "backoff_min": 0.02,
    "backoff_max": 0.2,
}


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def pair(
    server: ValkeyServer, **options: Any
) -> AsyncIterator[tuple[Tracker, RedisStore, Tracker, RedisStore]]:
    prefix = fresh_prefix()
    a = Tracker(node="node-a", clock=time.time, metrics=Metrics())
    b = Tracker(node="node-b", clock=time.time, metrics=Metrics())
    sa = RedisStore(a, server.url, prefix=prefix, **{**FAST, **options})
    sb = RedisStore(b, server.url, prefix=prefix, **{**FAST, **options})
    await sa.start()
    await sb.start()
    try:
        yield a, sa, b, sb
    finally:
        await sa.stop()
        await sb.stop()


def test_a_deaf_subscriber_recovers_through_a_probe_and_reconciliation(
    valkey: ValkeyServer,
) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, _, b, sb):
            view = ClientView(strict=True, topic="room")
            b.subscribe("room", view)
            # Deaf without an error: what a slot migration's SUNSUBSCRIBE does.
            assert sb.peers is not None and sb.peers._pubsubs
            await sb.peers._pubsubs[0].sunsubscribe()
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 5, "b to hear of alice")
            assert b.metrics.counter(PEER_RESYNCS, "deaf") >= 1  # type: ignore[attr-defined]
            b.flush()
            assert view.state == b.list("room")
            # And it hears diffs again.
            a.untrack("c1", "room")
            a.flush()
            await until(lambda: b.count("room") == 0, 5, "alice to leave at b")

    run(main)


def test_a_killed_subscription_reconnects_and_catches_up(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, _, b, _sb):
            a.track("c1", "room", "early", {})
            a.flush()
            await until(lambda: "early" in b.list("room"), 5, "b to hear of early")
            await asyncio.sleep(GRACE)  # from now on Redis is trusted over pub/sub for early
            with valkey.client() as client:
                client.client_kill_filter(_type="pubsub")
                # Published while b is not subscribed: only reconciliation can bring it.
                a.track("c2", "room", "late", {})
                a.untrack("c1", "room")
                a.flush()
            await until(lambda: set(b.list("room")) == {"late"}, 5, "b to catch up")
            assert b.metrics.counter(PEER_RESYNCS, "reconnect") >= 1  # type: ignore[attr-defined]

    run(main)


def test_garbage_on_a_channel_is_counted_and_ignored(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, sa, b, sb):
            with valkey.client() as client:
                for channel in sa.layout.channels()[:3]:
                    client.execute_command("SPUBLISH", channel, b"not a peer message")
                client.execute_command(
                    "SPUBLISH",
                    sa.layout.channel("room"),
                    b'[1,"node-x","d",[["room",[],["../../etc"]]]]\n',
                )
            await until(
                lambda: b.metrics.counter(REDIS_ERRORS) >= 4,  # type: ignore[attr-defined]
                5,
                "the garbage to be counted",
            )
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 5, "b to hear of alice")

    run(main)


def test_users_reads_memory_then_redis_then_its_cache(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, _, b, sb):
            a.track("c1", "room", "alice", {"status": "away"})
            a.track("c2", "room", "bob", {})
            a.flush()
            await until(lambda: b.count("room") == 2, 5, "b to hear of both")
            left_at = time.time()
            a.disconnect("c2")
            a.flush()
            await until(lambda: b.count("room") == 1, 5, "bob to leave at b")
            await sb.drain(5)
            await asyncio.sleep(0.05)  # a's write of bob's last seen
            got = await sb.users(["alice", "bob", "nobody"])
            assert got["alice"].status == "away" and got["alice"].online
            assert got["bob"].status == "offline"
            assert got["bob"].last_seen == pytest.approx(left_at, abs=1.0)
            assert got["nobody"].last_seen is None
            again = await sb.users(["alice", "bob", "nobody"])
            assert again["bob"] == got["bob"] and again["nobody"] == got["nobody"]
            metrics: Any = b.metrics
            assert metrics.counter(REDIS_STATUS_READS, "memory") == 2
            assert metrics.counter(REDIS_STATUS_READS, "redis") == 2
            assert metrics.counter(REDIS_STATUS_READS, "cache") == 2
            assert (await sb.user("alice")).online

    run(main)


def test_users_answer_from_memory_while_redis_is_down(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_factory()

    async def main() -> None:
        async with pair(server) as (a, sa, _, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await sa.drain(5)
            server.kill()
            got = await sb.users(["alice", "bob"])
            assert got["bob"].status == "offline" and got["bob"].last_seen is None
            server.restart()

    run(main)


def test_redis_restarted_empty_both_views_and_redis_converge(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_factory()

    async def main() -> None:
        async with pair(server) as (a, sa, b, sb):
            for i in range(50):
                a.track(f"a{i}", f"room:{i % 5}", f"ua{i}", {"i": i})
                b.track(f"b{i}", f"room:{i % 5}", f"ub{i}", {"i": i})
            a.flush()
            b.flush()
            server.kill()
            for i in range(0, 50, 2):
                a.disconnect(f"a{i}")
                b.track(f"b{i}", "room:new", f"ub{i}", {})
            a.flush()
            b.flush()
            server.restart()

            def same() -> bool:
                return all(a.list(f"room:{i}") == b.list(f"room:{i}") for i in range(5)) and (
                    a.list("room:new") == b.list("room:new")
                )

            await until(same, 10, "both views to agree")
            await sa.drain(10)
            await sb.drain(10)
            members = in_redis(server, sa.layout)
            refs = {field.split(b" ")[0] for fields in members.values() for field in fields}
            listed = {
                meta["phx_ref"].encode()
                for topic in a.topics()
                for entry in a.list(topic).values()
                for meta in entry["metas"]
            }
            assert refs == listed
            assert len(listed) == 25 + 50 + 25

    run(main)


def test_a_false_lapse_heals_itself(valkey: ValkeyServer) -> None:
    """A live node's liveness key lost (a long pause, a failover): peers drop and may reap it;
    its next heartbeat notices, writes its state back and says hello."""

    async def main() -> None:
        async with pair(valkey) as (a, sa, b, sb):
            for i in range(20):
                a.track(f"c{i}", f"room:{i % 4}", f"u{i}", {})
            a.flush()
            await sa.drain(5)
            await until(lambda: b.totals().presences == 20, 5, "b to see a's presences")
            # Deleted again and again until b drops a: a's next heartbeat (every ninth of the
            # liveness timeout) writes the key back, and a single deletion healed before b's
            # check saw it was a race the test lost once in CI.
            deadline = time.monotonic() + 5
            with valkey.client() as client:
                while b.totals().presences != 0:
                    assert time.monotonic() < deadline, "timed out waiting for b to drop a"
                    client.delete(sa.layout.node_alive_key("node-a"))
                    await asyncio.sleep(0.01)
            await until(lambda: b.totals().presences == 20, 10, "b to see a again")
            await sa.drain(5)
            members = in_redis(valkey, sa.layout)
            assert sum(len(m) for m in members.values()) == 20
            for topic in a.topics():
                assert b.list(topic) == a.list(topic)

    run(main)


def test_status_cache_can_be_off_and_its_ttl_is_checked(valkey: ValkeyServer) -> None:
    tracker = Tracker(metrics=Metrics())
    with pytest.raises(PresenceValueError, match="status_cache_ttl"):
        RedisStore(tracker, valkey.url, status_cache_ttl=0.0001)
    with pytest.raises(PresenceTypeError, match="status_cache_ttl"):
        RedisStore(tracker, valkey.url, status_cache_ttl="2")  # type: ignore[arg-type]

    async def main() -> None:
        async with RedisStore(tracker, valkey.url, prefix=fresh_prefix(), status_cache_ttl=0) as s:
            await s.users(["ann", "bo"])
            await s.users(["ann", "bo"])
        metrics: Any = tracker.metrics
        assert metrics.counter(REDIS_STATUS_READS, "redis") == 4
        assert metrics.counter(REDIS_STATUS_READS, "cache") == 0

    run(main)


def test_pub_sub_memories_stay_bounded_between_reconciliations(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, _, b, sb):
            for i in range(400):  # one connection each: no rate limit in the way
                a.track(f"c{i}", "room", f"u{i}", {"i": i})
                a.flush()
                if i % 50 == 0:
                    await asyncio.sleep(0.01)
            await until(lambda: b.count("room", metas=True) == 400, 5, "b to see them all")
            assert sb.peers is not None
            assert len(sb.peers._joined) >= 300  # remembered for GRACE seconds...
            await asyncio.sleep(GRACE + 2 * FAST["liveness_timeout"] / 9 + 0.1)
            assert len(sb.peers._joined) == 0  # ...then forgotten, without a reconciliation
            assert len(sb.peers._left) == 0

    run(main)


def test_a_leave_lost_while_resubscribing_is_settled_by_a_recheck(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, _, b, sb):
            a.track("c1", "room", "flappy", {})
            a.flush()
            await until(lambda: "flappy" in b.list("room"), 5, "b to hear of flappy")
            with valkey.client() as client:
                client.client_kill_filter(_type="pubsub")
                a.untrack("c1", "room")  # the leave goes out while b is not subscribed
                a.flush()
            # b's reconciliation spares flappy (pub/sub spoke of it within GRACE), then reads
            # the topic again GRACE seconds later.
            await until(lambda: b.count("room") == 0, GRACE + 3, "the ghost to go")
            metrics: Any = b.metrics
            assert metrics.counter(PEER_RESYNCS, "recheck") >= 1

    run(main)


def test_garbage_bye_and_last_seen_are_counted_not_fatal(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, sa, b, sb):
            assert sb.peers is not None
            resyncs = sb.peers.resyncs
            with valkey.client() as client:
                client.execute_command(
                    "SPUBLISH", sa.layout.partition_channel(0), b'[1,"not a node!","b",""]\n'
                )
                client.set(sa.layout.last_seen_key("mallory"), b"12.5")
            await until(lambda: sb.peers is not None and sb.peers.errors >= 1, 5, "the bye")
            assert sb.peers.resyncs == resyncs  # the subscription was kept
            got = await sb.users(["mallory"])
            assert got["mallory"].last_seen is None

    run(main)


def test_users_of_a_stopped_process_were_last_seen_when_it_stopped(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with pair(valkey) as (a, sa, b, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: b.user("alice").online, 5, "b to see alice")
            stopped = time.time()
            await sa.stop()
            await until(lambda: not b.user("alice").online, 5, "alice to leave at b")
            got = await sb.user("alice")
            assert got.last_seen == pytest.approx(stopped, abs=1.0)

    run(main)


def test_a_newer_local_last_seen_wins_over_redis(valkey: ValkeyServer) -> None:
    async def main() -> None:
        tracker = Tracker(clock=time.time)
        async with RedisStore(tracker, valkey.url, prefix=fresh_prefix(), status_cache_ttl=10) as s:
            with valkey.client() as client:
                client.set(s.layout.last_seen_key("bob"), b"1000")  # long ago
            assert (await s.user("bob")).last_seen == 1.0
            tracker.track("c", "room", "bob", {})
            tracker.disconnect("c")
            assert (await s.user("bob")).last_seen == pytest.approx(time.time(), abs=1.0)

    run(main)


def test_stop_is_bounded_by_stop_timeout_when_redis_freezes(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_factory()

    async def main() -> None:
        tracker = Tracker()
        store = RedisStore(tracker, server.url, stop_timeout=1.0, peers=False)
        await store.start()
        tracker.track("c", "room", "ann", {})
        tracker.flush()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            await store.stop()
            assert time.monotonic() - started < 1.0 + 0.5
        finally:
            os.kill(server.pid, signal.SIGCONT)

    run(main)


def test_a_node_name_used_again_after_a_crash_starts_clean(valkey: ValkeyServer) -> None:
    async def main() -> None:
        prefix = fresh_prefix()
        old = Tracker(node="same", clock=time.time)
        watcher = Tracker(node="watcher", clock=time.time)
        s_old = RedisStore(old, valkey.url, prefix=prefix, **FAST)
        s_watch = RedisStore(watcher, valkey.url, prefix=prefix, **FAST)
        await s_old.start()
        await s_watch.start()
        try:
            old.track("c1", "room1", "alice", {})
            old.flush()
            await until(lambda: watcher.count("room1") == 1, 5, "watcher to see alice")
            await s_old.stop(remove_members=False)  # as if it crashed
            new = Tracker(node="same", clock=time.time)
            new.track("c1", "room2", "bob", {})  # the same ref as alice's: same.1
            async with RedisStore(new, valkey.url, prefix=prefix, **FAST) as s_new:
                await until(
                    lambda: watcher.count("room2") == 1 and watcher.count("room1") == 0,
                    5,
                    "watcher to see bob, and alice gone",
                )
                members = in_redis(valkey, s_new.layout)
                assert set(members) == {"room2"}
        finally:
            await s_watch.stop()

    run(main)


def test_diffs_do_not_pile_up_while_redis_is_unreachable() -> None:
    port = free_port()

    async def main() -> None:
        tracker = Tracker(node="lonely")
        store = RedisStore(tracker, f"redis://127.0.0.1:{port}/0", prefix=fresh_prefix(), **FAST)
        await store.start()
        try:
            for i in range(1000):
                tracker.track(f"c{i}", "room", f"u{i}", {})
                tracker.flush()
            # The write-back that ends the outage says hello: the peers reconcile then.
            assert store._outbox == []
            assert store.pending == 1000
        finally:
            await store.stop()

    run(main)
