"""`RedisStore.connected`, the readiness signal, follows the server within 2 s, idle or not.

No test here writes anything after the start: the store must notice on its own, through its
health PINGs, that Redis died, hung, or came back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest

pytest.importorskip("redis")

from servers import ValkeyCluster, ValkeyServer  # noqa: E402
from test_server_hardening import get  # noqa: E402
from test_store import fresh_prefix, run  # noqa: E402

from presence_core import Tracker  # noqa: E402
from presence_core.server import PresenceServer  # noqa: E402
from presence_core.store import RedisStore  # noqa: E402

BOUND = 2.0  # what a readiness check may lag behind Redis


async def flips(store: RedisStore, to: bool, since: float) -> float:
    """Seconds from ``since`` until ``store.connected`` is ``to``; fails past `BOUND`."""
    while store.connected is not to:
        if time.monotonic() - since > BOUND:
            raise AssertionError(f"connected still {not to} after {BOUND} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - since


@pytest.mark.parametrize(
    ("peers", "liveness_timeout", "outage"),
    [
        # The flusher's heartbeat (every liveness_timeout / 3) comes too late to notice.
        (True, 30.0, 1.0),
        (False, 30.0, 1.0),
        # It notices, and its reconnect backoff grows during the outage.
        (True, 9.0, 6.0),
    ],
)
def test_connected_follows_a_killed_and_restarted_server(
    valkey_factory: Callable[..., ValkeyServer], peers: bool, liveness_timeout: float, outage: float
) -> None:
    server = valkey_factory()

    async def main() -> None:
        tracker = Tracker(node="health")
        tracker.track("c1", "room", "alice", {})
        store = RedisStore(
            tracker,
            server.url,
            prefix=fresh_prefix(),
            peers=peers,
            liveness_timeout=liveness_timeout,
        )
        await store.start()
        try:
            assert store.connected
            await asyncio.sleep(0.5)  # idle from here on
            server.kill()
            await flips(store, False, time.monotonic())
            await asyncio.sleep(outage)
            server.restart()
            await flips(store, True, time.monotonic())
            with server.client(decode_responses=False) as client:
                assert client.hlen(store.layout.members_key("room")) == 1  # written back
        finally:
            await store.stop()

    run(main)


def test_connected_follows_a_hung_server(valkey_factory: Callable[..., ValkeyServer]) -> None:
    server = valkey_factory()

    async def main() -> None:
        tracker = Tracker(node="health")
        store = RedisStore(tracker, server.url, prefix=fresh_prefix())
        await store.start()
        try:
            assert store.connected
            os.kill(server.pid, signal.SIGSTOP)
            try:
                await flips(store, False, time.monotonic())
                await asyncio.sleep(0.5)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            await flips(store, True, time.monotonic())
            # Answering again is enough: the data connection never broke.
            assert store.reconnects == 0
        finally:
            await store.stop()

    run(main)


def test_health_settings_are_checked() -> None:
    tracker = Tracker()
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            RedisStore(tracker, "redis://127.0.0.1:1/0", health_interval=bad)
        with pytest.raises(ValueError):
            RedisStore(tracker, "redis://127.0.0.1:1/0", health_timeout=bad)


def test_connected_follows_a_cluster_primary_and_its_promoted_replica(
    valkey_cluster: ValkeyCluster,
) -> None:
    async def main() -> None:
        tracker = Tracker(node="health")
        tracker.track("c1", "room", "alice", {})
        store = RedisStore(tracker, valkey_cluster.url, prefix=fresh_prefix(), cluster=True)
        await store.start()
        try:
            assert store.connected
            _, replica = await asyncio.to_thread(valkey_cluster.kill_master)
            await flips(store, False, time.monotonic())
            await asyncio.to_thread(valkey_cluster.wait_promotion, replica)
            await flips(store, True, time.monotonic())
        finally:
            await store.stop()

    run(main)


def test_health_ready_follows_redis_over_http(
    valkey_factory: Callable[..., ValkeyServer],
) -> None:
    """What an orchestrator sees: ``GET /health/ready`` answers 503 within 2 s of Redis going
    down and 200 within 2 s of its return; ``/health`` says ``degraded`` and ``redis: down``
    meanwhile, and ``/health/live`` stays 200."""
    server = valkey_factory()

    async def until(port: int, code: int, since: float) -> float:
        while (await get(port, "/health/ready"))[0] != code:
            if time.monotonic() - since > BOUND:
                raise AssertionError(f"/health/ready not {code} after {BOUND} s")
            await asyncio.sleep(0.02)
        return time.monotonic() - since

    async def main() -> None:
        tracker = Tracker(node="ready")
        store = RedisStore(tracker, server.url, prefix=fresh_prefix())
        await store.start()
        try:
            async with PresenceServer(tracker, port=0, store=store) as web:
                assert (await get(web.port, "/health/ready"))[0] == 200
                server.kill()
                await until(web.port, 503, time.monotonic())
                code, body = await get(web.port, "/health")
                assert code == 200 and b'"status":"degraded"' in body and b'"redis":"down"' in body
                assert (await get(web.port, "/health/live"))[0] == 200
                server.restart()
                await until(web.port, 200, time.monotonic())
                code, body = await get(web.port, "/health")
                assert b'"status":"ok"' in body and b'"redis":"ok"' in body
        finally:
            await store.stop()

    run(main)
