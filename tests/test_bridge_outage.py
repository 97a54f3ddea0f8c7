"""A `SupabaseBridge` comes back from long outages, with Supabase's client at its defaults.

The client gives up after 5 attempts (about 15 s); the bridge must reconnect it by itself, say
its mirror is stale while the server is away, drop the mirror after ``drop_after``, and be
exact again (mirror == the server's view of the channel, the server holding the bridge's
published presence) within 15 s of the server's return.  A 20 s and a 2 min outage run at the
same time, on two servers, so the test costs the longer one (~2.5 min) once: it is marked
``outage`` for CI to run it in one pass only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from realtime import AsyncRealtimeClient
from servers import free_port
from test_bridge_supabase import WAIT, exact, until

from presence_core import Tracker
from presence_core.bridges.supabase import SupabaseBridge
from presence_core.server import PresenceServer
from presence_core.testing import RecordingTransport

pytestmark = pytest.mark.outage

BACK_WITHIN = 15.0
DROP_AFTER = 30.0


async def outage(down: float) -> None:
    port = free_port()
    server = PresenceServer(Tracker(), port=port)
    await server.start()
    server.tracker.track("s1", "realtime:room", "alice", {"n": 1})
    server.tracker.flush()
    tracker = Tracker()
    diffs = RecordingTransport()
    tracker.subscribe("room", diffs)
    client = AsyncRealtimeClient(f"ws://127.0.0.1:{port}/realtime/v1", token="test")
    events: list[tuple[str, bool]] = []
    bridge = SupabaseBridge(
        tracker, client, ["room"], drop_after=DROP_AFTER, on_stale=lambda *e: events.append(e)
    )
    try:
        await bridge.start()
        tracker.track("c1", "room", "bob", {"n": 2})
        tracker.flush()
        await until(lambda: exact(server, tracker, bridge, "room"), f"{down} s: exact")

        stopped = time.monotonic()
        await server.stop()
        await until(lambda: bridge.stale, f"{down} s: stale", 3)
        assert events == [("room", True)]
        diffs.clear()
        # Stale all along; the mirror kept until drop_after, then dropped with a leave.
        while (elapsed := time.monotonic() - stopped) < down:
            assert bridge.stale and bridge.stale_since("room") is not None
            mirrored = "alice" in tracker.list("room")
            if elapsed < DROP_AFTER - 0.5:
                assert mirrored, f"{down} s: dropped after {elapsed:.1f} s"
            elif elapsed > DROP_AFTER + 2:
                assert not mirrored, f"{down} s: still mirrored after {elapsed:.1f} s"
            await asyncio.sleep(min(0.5, max(down - elapsed, 0.01)))
        leaves = [list(d["leaves"]) for d in diffs.diffs("room")]
        assert leaves == ([["alice"]] if down > DROP_AFTER else []), leaves
        assert not client.is_connected

        server = PresenceServer(Tracker(), port=port)
        await server.start()
        server.tracker.track("s2", "realtime:room", "carol", {"n": 3})
        server.tracker.flush()
        back = time.monotonic()
        await until(
            lambda: exact(server, tracker, bridge, "room") and not bridge.stale,
            f"{down} s: exact again",
            BACK_WITHIN,
        )
        assert time.monotonic() - back < BACK_WITHIN
        assert sorted(tracker.list("room")) == ["bob", "carol"]
        assert events == [("room", True), ("room", False)]
    finally:
        await bridge.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), WAIT)
        await server.stop()


def test_bridges_are_exact_soon_after_a_20_s_and_a_2_min_outage() -> None:
    async def main() -> None:
        await asyncio.gather(outage(20.0), outage(120.0))

    asyncio.run(asyncio.wait_for(main(), 120 + BACK_WITHIN + 60))
