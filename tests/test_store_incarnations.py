"""A process restarted under the same node name while Redis is unreachable.

The earlier incarnation did not stop gracefully: its members, liveness key and registry entry
are still in Redis (or Redis lost them, and only the peers remember them).  Once Redis answers,
a peer must see exactly the new incarnation's users.  The earlier incarnation is kept alive in
the peers' eyes (a long liveness timeout), so only the new process's own work can fix their view.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis")

from servers import ValkeyServer  # noqa: E402
from test_store import fresh_prefix, in_redis, run  # noqa: E402
from test_store_peers import until  # noqa: E402

from presence_core import Tracker  # noqa: E402
from presence_core.store import RedisStore  # noqa: E402
from presence_core.store.layout import parse_member_field  # noqa: E402

pytestmark = pytest.mark.random_refs  # restarts must not reuse refs

OPTIONS: dict[str, Any] = {
    "liveness_timeout": 30.0,  # the crashed incarnation never lapses during a test
    "check_interval": 0.1,
    "probe_interval": 0.2,
    "reconcile_interval": 60.0,  # only hellos, byes and reconnections reconcile here
    "backoff_min": 0.02,
    "backoff_max": 0.2,
}


def members(server: ValkeyServer, store: RedisStore, topic: str) -> list[str]:
    fields = in_redis(server, store.layout).get(topic, {})
    return sorted(parse_member_field(field)[0] for field in fields)


async def crash_after_tracking(old: Tracker, store: RedisStore, watcher: Tracker) -> None:
    old.track("c1", "room", "alice", {})
    old.track("c2", "room", "carol", {})
    old.flush()
    await until(lambda: set(watcher.list("room")) == {"alice", "carol"}, 5, "alice and carol")
    # As a crash would: members, liveness key and registry entry all stay behind.
    await store.stop(remove_members=False)


def test_restarted_while_redis_hangs_clears_its_earlier_incarnation_once_redis_answers(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_factory()

    async def main() -> None:
        prefix = fresh_prefix()
        watcher = Tracker(node="watcher", clock=time.time)
        old = Tracker(node="n1", clock=time.time)
        s_watch = RedisStore(watcher, server.url, prefix=prefix, **OPTIONS)
        s_old = RedisStore(old, server.url, prefix=prefix, **OPTIONS)
        await s_watch.start()
        await s_old.start()
        s_new: RedisStore | None = None
        try:
            await crash_after_tracking(old, s_old, watcher)
            new = Tracker(node="n1", clock=time.time)
            new.track("c1", "room", "bob", {})
            new.flush()
            # A hung server keeps its data: the earlier incarnation's members are still
            # there when it answers again.
            os.kill(server.pid, signal.SIGSTOP)
            try:
                quick = f"{server.url}?socket_timeout=0.3&socket_connect_timeout=0.3"
                s_new = RedisStore(new, quick, prefix=prefix, **OPTIONS)
                await s_new.start()
                assert not s_new.connected
            finally:
                os.kill(server.pid, signal.SIGCONT)
            await until(lambda: set(watcher.list("room")) == {"bob"}, 5, "only bob at the peer")
            await until(lambda: s_new is not None and s_new.connected, 5, "the new store")
            await s_new.drain(5)
            assert members(server, s_new, "room") == ["bob"]
            assert set(watcher.list("room")) == {"bob"}
        finally:
            if s_new is not None:
                await s_new.stop()
            await s_watch.stop()

    run(main)


def test_restarted_while_redis_is_down_and_comes_back_empty_replaces_the_old_users(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    server = valkey_factory()

    async def main() -> None:
        prefix = fresh_prefix()
        watcher = Tracker(node="watcher", clock=time.time)
        old = Tracker(node="n1", clock=time.time)
        s_watch = RedisStore(watcher, server.url, prefix=prefix, **OPTIONS)
        s_old = RedisStore(old, server.url, prefix=prefix, **OPTIONS)
        await s_watch.start()
        await s_old.start()
        s_new: RedisStore | None = None
        try:
            await crash_after_tracking(old, s_old, watcher)
            old_refs = {m["phx_ref"] for metas in old.list("room").values() for m in metas["metas"]}
            server.kill()
            new = Tracker(node="n1", clock=time.time)
            new.track("c1", "room", "bob", {})
            new.flush()
            s_new = RedisStore(new, server.url, prefix=prefix, **OPTIONS)
            await s_new.start()  # refused: it keeps trying in the background
            assert not s_new.connected
            # Redis comes back empty: only the peer remembers alice and carol.
            server.restart()
            await until(lambda: set(watcher.list("room")) == {"bob"}, 5, "only bob at the peer")
            await until(lambda: s_new is not None and s_new.connected, 5, "the new store")
            await s_new.drain(5)
            assert members(server, s_new, "room") == ["bob"]
            new_refs = {m["phx_ref"] for metas in new.list("room").values() for m in metas["metas"]}
            assert not old_refs & new_refs
        finally:
            if s_new is not None:
                await s_new.stop()
            await s_watch.stop()

    run(main)


def test_refs_differ_between_two_trackers_of_one_node() -> None:
    first, second = Tracker(node="n1"), Tracker(node="n1")
    a = first.track("c", "room", "alice", {})
    b = second.track("c", "room", "alice", {})
    assert a != b
    assert a.rpartition(".")[0] == b.rpartition(".")[0] == "n1"
