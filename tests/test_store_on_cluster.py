"""RedisStore on a real 3-master, 3-replica Valkey cluster: slot-aware writes, sharded pub/sub
between two Trackers, and a master SIGKILLed under writes."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from servers import ValkeyCluster
from test_store import expected, fresh_prefix, in_redis, run
from test_store_peers import until

from presence_core import Tracker
from presence_core.store import Layout, RedisStore
from presence_core.testing import ClientView

TOPICS = [f"room:{i}" for i in range(24)] + ["{lobby}", "ünï\ncode"]


def cluster_content(cluster: ValkeyCluster, layout: Layout) -> dict[str, dict[bytes, bytes]]:
    """Every topic's members hash, read from each master."""
    out: dict[str, dict[bytes, bytes]] = {}
    for master in cluster.masters():
        out.update(in_redis(master, layout))
    return out


def union(*trackers: Tracker) -> dict[str, dict[bytes, bytes]]:
    out: dict[str, dict[bytes, bytes]] = {}
    for tracker in trackers:
        for topic, members in expected(tracker).items():
            out.setdefault(topic, {}).update(members)
    return out


def stores(cluster: ValkeyCluster, prefix: str, *trackers: Tracker) -> list[RedisStore]:
    options: dict[str, Any] = {
        "prefix": prefix,
        "cluster": True,
        "liveness_timeout": 4.0,  # longer than a failover here (node timeout 1 s)
        "probe_interval": 0.3,
        "backoff_min": 0.02,
        "backoff_max": 0.3,
    }
    return [RedisStore(t, cluster.url, **options) for t in trackers]


def test_two_trackers_share_presence_across_shards(valkey_cluster: ValkeyCluster) -> None:
    a, b = Tracker(node="ca", clock=time.time), Tracker(node="cb", clock=time.time)
    prefix = fresh_prefix()

    async def main() -> None:
        sa, sb = stores(valkey_cluster, prefix, a, b)
        await sa.start()
        await sb.start()
        try:
            views = {topic: ClientView(strict=True, topic=topic) for topic in TOPICS}
            for topic, view in views.items():
                b.subscribe(topic, view)
            for i, topic in enumerate(TOPICS * 4):
                a.track(f"a{i % 40}", topic, f"user-{i}", {"i": i})
            a.flush()
            await until(lambda: b.totals().presences == a.totals().presences, 10, "b to see all")
            for topic in TOPICS:
                assert b.list(topic) == a.list(topic)
            b.flush()
            assert all(view.state == b.list(topic) for topic, view in views.items())
            await sa.drain(10)
            assert cluster_content(valkey_cluster, sa.layout) == union(a)
            # The partitions' channels are spread over all three shards.
            masters = {sa._conn.node_for(c) for c in sa.layout.channels()}  # type: ignore[union-attr]
            assert len(masters) == 3
        finally:
            await sa.stop()
            await sb.stop()
        assert cluster_content(valkey_cluster, sa.layout) == {}

    run(main)


def test_a_master_killed_under_writes_loses_nothing(valkey_cluster: ValkeyCluster) -> None:
    a, b = Tracker(node="ka", clock=time.time), Tracker(node="kb", clock=time.time)
    prefix = fresh_prefix()
    rng = random.Random(5)

    def churn() -> None:
        for _ in range(40):
            tracker = rng.choice((a, b))
            conn = f"{tracker.node}-{rng.randrange(60)}"
            if rng.random() < 0.7:
                key = f"u{rng.randrange(90)}"
                tracker.track(conn, rng.choice(TOPICS), key, {"r": rng.random()})
            else:
                tracker.disconnect(conn)
        a.flush()
        b.flush()

    async def main() -> None:
        async with asyncio.timeout(120):  # a hang is a failure with a traceback, not a stall
            await body()

    async def body() -> None:
        sa, sb = stores(valkey_cluster, prefix, a, b)
        await sa.start()
        await sb.start()
        try:
            for _ in range(10):
                churn()
                await asyncio.sleep(0.005)
            _, replica = valkey_cluster.kill_master()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:  # keep writing through the failover
                churn()
                await asyncio.sleep(0.01)
            await asyncio.to_thread(valkey_cluster.wait_promotion, replica)
            for _ in range(5):
                churn()
                await asyncio.sleep(0.005)
            await sa.drain(20)
            await sb.drain(20)
            assert cluster_content(valkey_cluster, sa.layout) == union(a, b)

            def agree() -> bool:
                return all(a.list(t) == b.list(t) or _same(a.list(t), b.list(t)) for t in TOPICS)

            try:
                await until(agree, 15, "both Trackers to list the same presences")
            except TimeoutError:
                bad = {t: (a.list(t), b.list(t)) for t in TOPICS if not _same(a.list(t), b.list(t))}
                raise AssertionError(f"{bad}\n{a.remote_nodes()} {b.remote_nodes()}") from None
        finally:
            await sa.stop()
            await sb.stop()

    run(main)


def _same(x: dict[str, Any], y: dict[str, Any]) -> bool:
    """Equal lists up to the order of a key's metas (each process appends its own first)."""

    def norm(state: dict[str, Any]) -> dict[str, list[str]]:
        return {k: sorted(m["phx_ref"] for m in v["metas"]) for k, v in state.items()}

    return norm(x) == norm(y)
