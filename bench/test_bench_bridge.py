"""What a presence diff costs the Supabase bridge, in a small channel and a big one.

Supabase's Python client (``realtime``) against an in-process `PresenceServer`: the channel
holds N presences (100, then 10,000), the bridge mirrors them, then one presence is updated at
a time, 100 times, each its own ``presence_diff``.  Timed per diff, in the same run: the
bridge's mirror step (`SupabaseBridge._mirror`, which re-reads the keys the diff touched and
applies them to the Tracker, flush included) and, as the anchor, the client's own handling of
the same diff (``presence._on_diff_event``, which the bridge's step follows).  The mirror is
incremental, so its cost should not grow with N; before it was (commit 2652502 and earlier) a
one-key diff at 10,000 presences cost 22 ms.  GC on.

    python -m pytest bench/test_bench_bridge.py -q -s -p no:cacheprovider

It prints; it asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from realtime import AsyncRealtimeClient

from presence_core import Tracker
from presence_core.bridges.supabase import SupabaseBridge
from presence_core.server import PresenceServer

DIFFS = 100


async def _measure(n: int) -> tuple[float, float]:
    """Median microseconds per one-key diff: (the bridge's mirror step, the client's own)."""
    async with PresenceServer(Tracker(), port=0) as server:
        source = server.tracker
        for i in range(n):
            source.track(f"c{i}", "realtime:big", f"user-{i}", {"n": i})
        source.flush()
        tracker = Tracker()
        client = AsyncRealtimeClient(f"ws://127.0.0.1:{server.port}/realtime/v1", token="t")
        try:
            async with SupabaseBridge(tracker, client, ["big"]) as bridge:
                deadline = time.monotonic() + 60
                while tracker.count("big") != n:
                    assert time.monotonic() < deadline, "the bridge never mirrored the channel"
                    await asyncio.sleep(0.05)
                channel: Any = bridge.channel("big")
                ours: list[float] = []
                theirs: list[float] = []
                mirror = bridge._mirror
                presence = channel.presence
                on_diff = presence._on_diff_event

                def timed_mirror(ch: Any) -> None:
                    started = time.perf_counter()
                    mirror(ch)
                    ours.append(time.perf_counter() - started)

                def timed_diff(payload: Any) -> None:
                    # The client's work, without the sync callback (the bridge's step) it ends on.
                    callback, presence.on_sync_callback = presence.on_sync_callback, None
                    started = time.perf_counter()
                    on_diff(payload)
                    theirs.append(time.perf_counter() - started)
                    presence.on_sync_callback = callback
                    if callback is not None:
                        callback()

                bridge._mirror = timed_mirror  # type: ignore[method-assign]
                presence._on_diff_event = timed_diff
                for k in range(DIFFS):
                    source.update(f"c{k}", "realtime:big", f"user-{k}", {"n": -k})
                    source.flush()
                    while tracker.list("big")[f"user-{k}"]["metas"][0]["n"] != -k:
                        assert time.monotonic() < deadline + 60, "a diff never arrived"
                        await asyncio.sleep(0.001)
        finally:
            await client.close()
    return statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6


def test_bridge_diff_cost() -> None:
    rows = [(n, *asyncio.run(_measure(n))) for n in (100, 10_000)]
    print()
    print(f"Supabase bridge, one-key diffs ({DIFFS} each, median us per diff, GC on):")
    print(f"  {'presences':>10} {'bridge mirror':>14} {'client itself':>14} {'ratio':>7}")
    for n, ours, theirs in rows:
        print(f"  {n:>10,} {ours:>14.0f} {theirs:>14.0f} {ours / theirs:>6.2f}x")
    print(f"  the bridge at 10,000 / at 100 presences: {rows[1][1] / rows[0][1]:.2f}x")
