"""What someone else may put in Redis or on the sync channels, against live stores on a real
valkey-server: junk keys, forged messages, and presences the peers did not bring."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from servers import ValkeyServer
from test_store import fresh_prefix
from test_store_peers import until

from presence_core import PresenceValueError, Tracker
from presence_core.store import RedisStore
from presence_core.store import store as store_module
from presence_core.store.connection import ConnectionOptions
from presence_core.store.layout import parse_member_field
from presence_core.store.peers import encode_notice

QUICK = {
    "liveness_timeout": 1.0,
    "check_interval": 0.1,
    "reconcile_interval": 0.5,
    "probe_interval": 0.5,
    "backoff_min": 0.02,
    "backoff_max": 0.2,
}

FAST_IO = {"backoff_min": 0.02, "backoff_max": 0.2, "liveness_timeout": 0.6}


@asynccontextmanager
async def two(
    server: ValkeyServer, **options: Any
) -> AsyncIterator[tuple[Tracker, RedisStore, Tracker, RedisStore]]:
    prefix = fresh_prefix()
    a, b = Tracker(node="A"), Tracker(node="B")
    sa = RedisStore(a, server.url, prefix=prefix, **{**QUICK, **options})
    sb = RedisStore(b, server.url, prefix=prefix, **{**QUICK, **options})
    await sa.start()
    await sb.start()
    try:
        yield a, sa, b, sb
    finally:
        await sb.stop()
        await sa.stop()


async def stays(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        await asyncio.sleep(0.02)
    return True


def test_presences_of_owners_the_peers_did_not_bring_are_left_alone(
    valkey: ValkeyServer,
) -> None:
    """A bridge feeds the remote view under its own node names, which are in no registry."""

    async def main() -> None:
        tracker = Tracker(node="n1")
        store = RedisStore(tracker, valkey.url, prefix=fresh_prefix(), **QUICK)
        await store.start()
        try:
            data = b'{"phx_ref":"sb-1234.1f","s":1}'
            tracker.apply_remote("room", [("alice", data, None)])
            tracker.flush()
            assert await stays(lambda: "alice" in tracker.list("room"), 2.5)
            # A forged bye under that name does not drop it either.
            bye = encode_notice("sb-1234", "b")
            await store._client.spublish(store.layout.partition_channel(0), bye)
            assert await stays(lambda: "alice" in tracker.list("room"), 0.5)
        finally:
            await store.stop()

    asyncio.run(main())


@pytest.mark.parametrize("junk", ["badname", "nonascii", "hugename", "wrongtype_alive"])
def test_junk_in_the_registry_does_not_stop_liveness(valkey: ValkeyServer, junk: str) -> None:
    async def main() -> None:
        async with two(valkey) as (a, sa, b, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 3, "b to see alice")
            r = valkey.client(decode_responses=False)
            nodes = sa.layout.nodes_key
            if junk == "badname":
                r.sadd(nodes, b"bad name")
            elif junk == "nonascii":
                r.sadd(nodes, b"\xff\xfe")
            elif junk == "hugename":
                r.sadd(nodes, b"x" * 100_000)
            else:
                r.sadd(nodes, b"Z")
                r.hset(sa.layout.node_alive_key("Z"), "a", "b")
            r.close()
            await asyncio.sleep(0.3)
            await sa.stop(remove_members=False)  # as a crash: the peer must notice the lapse
            await until(lambda: "alice" not in b.list("room"), 3, "b to drop the lapsed a")

    asyncio.run(main())


@pytest.mark.parametrize("junk", ["badindex", "wrongtype_index", "wrongtype_members", "none"])
def test_junk_in_an_index_does_not_stop_reconciliation(valkey: ValkeyServer, junk: str) -> None:
    async def main() -> None:
        async with two(valkey) as (a, sa, b, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 3, "b to see alice")
            r = valkey.client(decode_responses=False)
            layout = sa.layout
            if junk == "badindex":
                r.sadd(layout.node_topics_key("A"), b"\xff\xfe")
            elif junk == "wrongtype_index":
                r.sadd(layout.nodes_key, b"Y")
                r.set(layout.node_alive_key("Y"), b"1")
                r.set(layout.node_topics_key("Y"), b"not a set")
            elif junk == "wrongtype_members":
                r.sadd(layout.node_topics_key("A"), b"junk")
                r.set(layout.members_key("junk"), b"x")
            # A member of a live peer that pub/sub never announced: only Redis tells.
            r.hset(layout.members_key("room"), b"A.abc bob", b'{"phx_ref":"A.abc"}')
            r.close()
            await until(lambda: "bob" in b.list("room"), 3, "b to reconcile bob")
            assert "alice" in b.list("room")
            # Stopping with junk in its own index still removes its members.
            await sa.stop()
            await until(lambda: "alice" not in b.list("room"), 2, "b to drop a's members")

    asyncio.run(main())


@pytest.mark.parametrize("junk", ["notjson", "mismatch", "hugekey"])
def test_one_bad_member_does_not_freeze_its_topic(valkey: ValkeyServer, junk: str) -> None:
    async def main() -> None:
        async with two(valkey) as (a, sa, b, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 3, "b to see alice")
            r = valkey.client(decode_responses=False)
            key = sa.layout.members_key("room")
            if junk == "notjson":
                r.hset(key, b"A.4 mallory", b'{"phx_ref":"A.4" not json')
            elif junk == "mismatch":  # would flap: added under A.2, removed under A.1
                r.hset(key, b"A.1 mallory", b'{"phx_ref":"A.2","x":1}')
            else:
                r.hset(key, b"A.5 " + b"m" * 10_000, b'{"phx_ref":"A.5"}')
            r.hset(key, b"A.abc bob", b'{"phx_ref":"A.abc"}')
            r.close()
            seen: set[str] = set()

            async def sample() -> None:
                while True:
                    seen.update(b.list("room"))
                    await asyncio.sleep(0.005)

            sampler = asyncio.ensure_future(sample())
            try:
                await until(lambda: "bob" in b.list("room"), 3, "b to reconcile bob")
                await asyncio.sleep(1.2)  # two more reconciliations
            finally:
                sampler.cancel()
            assert "mallory" not in seen

    asyncio.run(main())


@pytest.mark.parametrize("redis_up", [True, False])
def test_junk_in_the_own_index_does_not_stop_start_flush_or_stop(
    valkey: ValkeyServer, redis_up: bool
) -> None:
    async def main() -> None:
        prefix = fresh_prefix()
        r = valkey.client(decode_responses=False)
        store_probe = RedisStore(Tracker(node="A"), valkey.url, prefix=prefix)
        layout = store_probe.layout
        r.sadd(layout.node_topics_key("A"), b"\xff\xfe")  # as an earlier process "left" it
        tracker = Tracker(node="A")
        tracker.track("c1", "room", "alice", {})
        tracker.flush()
        url = valkey.url if redis_up else "redis://127.0.0.1:1/0"
        store = RedisStore(tracker, url, prefix=prefix, **QUICK)
        await store.start()
        try:
            if redis_up:
                await until(lambda: r.hlen(layout.members_key("room")) == 1, 3, "alice written")
                assert store.connected
        finally:
            await store.stop()
        assert r.hlen(layout.members_key("room")) == 0
        r.close()

    asyncio.run(main())


def test_a_forged_bye_is_undone_by_the_reconciliation_it_triggers(valkey: ValkeyServer) -> None:
    async def main() -> None:
        # No periodic reconciliation to help within the test's time.
        async with two(valkey, reconcile_interval=60.0) as (a, sa, b, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 3, "b to see alice")
            channel = sa.layout.partition_channel(0)
            await sb._client.spublish(channel, encode_notice("A", "b"))
            await asyncio.sleep(0.1)
            await until(lambda: "alice" in b.list("room"), 2, "alice back in b's view")

    asyncio.run(main())


def diff(node: str, topic: str, joins: list[Any], leaves: list[str], datas: bytes = b"") -> bytes:
    return orjson.dumps([1, node, "d", [[topic, joins, leaves]]]) + b"\n" + datas


def test_forged_diffs_are_bounded(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with two(valkey, reconcile_interval=60.0) as (a, sa, b, sb):
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 3, "b to see alice")
            (ref,) = [p[2].split(b'"')[3].decode() for p in a.presences("room")]
            channel = sa.layout.channel("room")
            publish = sb._client.spublish
            # A leave of A's ref in a message of another node.
            await publish(channel, diff("Z", "room", [], [ref]))
            # An update that would replace A's presence, from another node.
            data = b'{"phx_ref":"Z.1","evil":true}'
            joins = [["alice", ref, len(data)]]
            await publish(channel, diff("Z", "room", joins, [], data))
            # A meta over max_meta_bytes.
            limit = max(p.max_meta_bytes for p in b.plans.values())
            big = b'{"phx_ref":"Z.2","blob":"' + b"x" * limit + b'"}'
            joins = [["mallory", None, len(big)]]
            await publish(channel, diff("Z", "room", joins, [], big))
            await asyncio.sleep(0.3)
            assert list(b.list("room")) == ["alice"]
            (meta,) = b.list("room")["alice"]["metas"]
            assert meta["phx_ref"] == ref and "evil" not in meta

    asyncio.run(main())


def test_a_hello_does_not_keep_an_unregistered_owner_alive(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with two(valkey, reconcile_interval=60.0) as (a, sa, b, sb):
            channel = sa.layout.channel("room")
            data = b'{"phx_ref":"ghost.1"}'
            joins = [["mallory", None, len(data)]]
            await sa._client.spublish(channel, diff("ghost", "room", joins, [], data))
            await until(lambda: "mallory" in b.list("room"), 2, "the ghost to appear")
            hello = encode_notice("ghost", "h")
            deadline = time.monotonic() + 3.0
            while "mallory" in b.list("room"):
                assert time.monotonic() < deadline, "hellos kept the ghost alive"
                await sa._client.spublish(sa.layout.partition_channel(0), hello)
                await asyncio.sleep(0.1)

    asyncio.run(main())


def test_member_fields_have_refs_as_trackers_make_them() -> None:
    assert parse_member_field(b"A.0123456789abcdef k") == ("k", b"A.0123456789abcdef")
    with pytest.raises(PresenceValueError):
        parse_member_field(b"A." + b"f" * 17 + b" k")


@pytest.mark.parametrize(
    "url",
    [
        "redis://:S3CRET/pw@127.0.0.1:1/0",
        "redis://:S3CRET#pw@127.0.0.1:1/0",
        "redis://:S3CRET?pw@127.0.0.1:1/0",
        "redis://u:S3CRET@127.0.0.1:notaport/0",
        "redis://:S3CRET/0",
    ],
)
def test_a_malformed_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(PresenceValueError) as raised:
        ConnectionOptions.from_url(url)
    chain = [raised.value, raised.value.__cause__, raised.value.__context__]
    assert not any("S3CRET" in str(e) for e in chain if e is not None)


def test_connected_is_false_while_redis_refuses_writes_and_the_log_stays_short(
    valkey_factory: Callable[..., ValkeyServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = valkey_factory()

    async def main() -> None:
        tracker = Tracker(node="A")
        store = RedisStore(tracker, server.url, prefix=fresh_prefix(), peers=False, **FAST_IO)
        await store.start()
        r = server.client()
        try:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1")  # PING answers, every write gets OOM
            for i in range(1000):
                tracker.track(f"c{i}", f"t{i % 20}", f"u{i}", {})
                if i % 50 == 0:
                    tracker.flush()
                    await asyncio.sleep(0.01)
            tracker.flush()
            await until(lambda: not store.connected, 2, "connected to turn False")
            await asyncio.sleep(0.5)
            assert not store.connected
            r.config_set("maxmemory", "0")
            await until(lambda: store.connected, 5, "connected to turn True again")
            members = store.layout.members_key
            await until(
                lambda: sum(r.hlen(members(f"t{j}")) for j in range(20)) == 1000,
                5,
                "what was refused to be written (not at the next sweep)",
            )
        finally:
            r.close()
            await store.stop()

    with caplog.at_level(logging.ERROR, logger="presence_core.store"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 3, [r.getMessage()[:100] for r in errors]


def test_users_does_not_wait_for_a_hung_redis(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_factory()

    async def main() -> None:
        tracker = Tracker(node="A", clock=time.time)
        store = RedisStore(tracker, server.url, prefix=fresh_prefix(), peers=False)
        await store.start()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            await until(lambda: not store.connected, 3, "connected to turn False")
            started = time.monotonic()
            got = await store.users(["nobody", "x"])
            assert time.monotonic() - started < 0.5
            assert got["nobody"].last_seen is None
        finally:
            os.kill(server.pid, signal.SIGCONT)
            await store.stop()

    asyncio.run(main())


def test_last_seen_hints_stay_bounded_during_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_SEEN_MAX", 50, raising=False)

    async def main() -> None:
        tracker = Tracker(node="A")
        # Nothing listens there: the whole test is an outage.
        store = RedisStore(tracker, "redis://127.0.0.1:1/0", peers=False, **FAST_IO)
        await store.start()
        try:
            for i in range(500):
                tracker.track(f"c{i}", "room", f"u{i}", {})
                tracker.flush()
                tracker.untrack(f"c{i}", "room")
                tracker.flush()
            assert len(store._seen) == 50
            assert f"u{499}" in store._seen  # the newest are kept
        finally:
            await store.stop()

    asyncio.run(main())


def test_two_live_processes_sharing_a_node_name_are_reported(
    valkey: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        prefix = fresh_prefix()
        options = {**FAST_IO, "liveness_timeout": 0.3}
        first = RedisStore(Tracker(node="same"), valkey.url, prefix=prefix, **options)
        second = RedisStore(Tracker(node="same"), valkey.url, prefix=prefix, **options)
        await first.start()
        await second.start()
        try:
            await asyncio.sleep(0.6)  # a few heartbeats each
        finally:
            await second.stop()
            await first.stop()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    errors = [r for r in caplog.records if "node name" in r.getMessage()]
    assert errors and all(r.levelno == logging.ERROR for r in errors)
    assert len(errors) <= 2  # one per process at most, however many heartbeats
    assert any(r.name == "presence_core.audit" for r in caplog.records)
