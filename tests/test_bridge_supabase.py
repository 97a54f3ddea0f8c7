"""`presence_core.bridges.supabase` end to end: Supabase's Python client ``realtime``, unmodified,
against an in-process `PresenceServer`, which speaks the Supabase Realtime protocol.

A plain client tracks in the channel and must show in the bridged Tracker's view; the bridged
Tracker's local presence must reach the plain client and leave it again; counts stay exact (no
echo either way); and the server is replaced by a new one on the same port mid-run, after which
the client reconnects and both the mirror and the published presence recover.  Every wait is
bounded; every server, client and bridge is stopped however the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from presence_core import PresenceError, Tracker
from presence_core.bridges.supabase import BRIDGE_FIELD, BridgeError, SupabaseBridge
from presence_core.server import PresenceServer

WAIT = 15.0


async def until(check: Callable[[], bool], what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def client_for(port: int) -> AsyncRealtimeClient:
    return AsyncRealtimeClient(
        f"ws://127.0.0.1:{port}/realtime/v1", token="test", initial_backoff=0.2, max_retries=30
    )


class Plain:
    """A plain client in the channel: tracks as ``key`` and re-tracks after each rejoin."""

    def __init__(self, port: int, name: str, key: str, meta: dict[str, Any]) -> None:
        self.client = client_for(port)
        self.name, self.key, self.meta = name, key, meta
        self.channel: Any = None

    async def join(self) -> None:
        config: Any = {"presence": {"key": self.key, "enabled": True}}
        self.channel = self.client.channel(self.name, {"config": config})
        self.channel.on_presence_sync(lambda: None)

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            if state == RealtimeSubscribeStates.SUBSCRIBED:
                asyncio.get_running_loop().create_task(self.channel.track(self.meta))

        await asyncio.wait_for(self.channel.subscribe(on_state), WAIT)
        assert self.channel.is_joined

    def state(self) -> dict[str, list[dict[str, Any]]]:
        return {
            key: [{k: v for k, v in m.items() if k != "presence_ref"} for m in metas]
            for key, metas in self.channel.presence_state().items()
        }

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), WAIT)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 90))


def published(bridge: SupabaseBridge, keys: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {bridge.key: [{BRIDGE_FIELD: bridge.bridge_id, "keys": keys}]}


def test_mirror_publish_no_echo_and_a_server_restart() -> None:
    async def main() -> None:
        server = PresenceServer(Tracker(), port=0)
        await server.start()
        port = server.port
        tracker = Tracker()
        client = client_for(port)
        bridge = SupabaseBridge(tracker, client, topics=["room"], bridge_id="b1")
        alice = Plain(port, "room", "alice", {"status": "online"})
        try:
            await bridge.start()
            await alice.join()
            # In: the plain client's presence is mirrored, as a remote presence of the bridge.
            await until(lambda: tracker.count("room") == 1, "alice mirrored")
            assert tracker.list("room")["alice"]["metas"][0]["status"] == "online"
            assert tracker.remote_nodes() == {bridge.node_of("room"): 1}
            # The bridge publishes nothing while the Tracker holds no local presence.
            assert alice.state() == {"alice": [{"status": "online"}]}

            # Out: a local track reaches the plain client, as the bridge's one presence.
            tracker.track("c1", "room", "bob", {"status": "away"})
            tracker.flush()
            want = {"alice": [{"status": "online"}]} | published(
                bridge, {"bob": [{"status": "away"}]}
            )
            await until(lambda: alice.state() == want, "bob published")
            # No echo: the bridge's own presence came back through the channel, unmirrored.
            await asyncio.sleep(0.3)
            assert tracker.count("room") == 2
            assert sorted(tracker.list("room")) == ["alice", "bob"]
            assert tracker.remote_nodes() == {bridge.node_of("room"): 1}
            assert server.tracker.count("realtime:room") == 2  # alice and the bridge

            # An update re-tracks; an untrack leaves.
            tracker.track("c2", "room", "carol", {"status": "busy"})
            tracker.flush()
            both = {"bob": [{"status": "away"}], "carol": [{"status": "busy"}]}
            await until(
                lambda: (
                    alice.state() == {"alice": [{"status": "online"}]} | published(bridge, both)
                ),
                "carol",
            )
            tracker.untrack("c1", "room", "bob")
            tracker.untrack("c2", "room", "carol")
            tracker.flush()
            await until(lambda: alice.state() == {"alice": [{"status": "online"}]}, "bridge left")
            assert tracker.count("room") == 1
            assert server.tracker.count("realtime:room") == 1

            # A leave in the channel leaves the mirror.
            await alice.channel.untrack()
            await until(lambda: tracker.count("room") == 0, "alice's leave mirrored")
            assert tracker.remote_nodes() == {}
            await alice.channel.track(alice.meta)
            await until(lambda: tracker.count("room") == 1, "alice back")

            # A server restart: a new server on the same port, empty.  Both clients reconnect,
            # rejoin and track again (the bridge by itself); the mirror and the published
            # presence recover, with exact counts.
            tracker.track("c1", "room", "bob", {"status": "away"})
            tracker.flush()
            await until(lambda: "presence-core-" in str(alice.state()), "bob published again")
            mirrored_before = {p[2] for p in tracker.remote_presences("room")}
            refs_before = {
                m["presence_ref"] for ms in alice.channel.presence_state().values() for m in ms
            }
            await server.stop()
            server = PresenceServer(Tracker(), port=port)
            await server.start()
            want = {"alice": [{"status": "online"}]} | published(
                bridge, {"bob": [{"status": "away"}]}
            )
            await until(lambda: alice.state() == want, "recovered published presence", 30)
            await until(lambda: server.tracker.count("realtime:room") == 2, "new server's view", 30)
            await until(lambda: tracker.count("room") == 2, "recovered mirror", 30)
            assert sorted(tracker.list("room")) == ["alice", "bob"]
            assert len(tracker.remote_presences("room")) == 1
            # Both came back through a resync: the new server's refs, and a rebuilt mirror.
            await until(
                lambda: {p[2] for p in tracker.remote_presences("room")}.isdisjoint(
                    mirrored_before
                ),
                "mirror rebuilt",
            )
            refs_after = {
                m["presence_ref"] for ms in alice.channel.presence_state().values() for m in ms
            }
            assert len(refs_after) == 2 and refs_after.isdisjoint(refs_before)

            # A presence that left while the server was away does not linger in the mirror.
            await alice.channel.untrack()
            await until(lambda: tracker.count("room") == 1, "leave after restart")
        finally:
            await bridge.stop()
            await alice.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), WAIT)
            await server.stop()
        assert tracker.remote_nodes() == {}
        assert sorted(tracker.list("room")) == ["bob"]  # local presence stays

    run(main)


def both_listed(tracker: Tracker) -> bool:
    return sorted(tracker.list("lobby")) == ["ann", "ben"]


def test_two_bridges_see_each_others_users_not_each_others_bridges() -> None:
    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            t1, t2 = Tracker(), Tracker()
            c1, c2 = client_for(server.port), client_for(server.port)
            try:
                async with (
                    SupabaseBridge(t1, c1, topics={"room": "lobby"}) as b1,
                    SupabaseBridge(t2, c2, topics={"room": "lobby"}) as b2,
                ):
                    t1.track("x", "lobby", "ann", {"n": 1})
                    t1.flush()
                    t2.track("y", "lobby", "ben", {"n": 2})
                    t2.flush()
                    for t in (t1, t2):
                        await until(partial(both_listed, t), "both users")
                    await asyncio.sleep(0.3)
                    assert t1.count("lobby") == t2.count("lobby") == 2
                    assert t1.remote_nodes() == {b1.node_of("lobby"): 1}
                    assert t2.remote_nodes() == {b2.node_of("lobby"): 1}
                    assert t1.list("lobby")["ben"]["metas"][0]["n"] == 2
                    t2.untrack("y", "lobby", "ben")
                    t2.flush()
                    await until(lambda: t1.count("lobby") == 1, "ben left t1")
            finally:
                for c in (c1, c2):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(c.close(), WAIT)

    run(main)


def test_bad_input_and_a_refused_join() -> None:
    tracker = Tracker()
    client = AsyncRealtimeClient("ws://127.0.0.1:9/realtime/v1", token="t", auto_reconnect=False)
    for topics in ("room", [], [""], [5], {"a": "x", "b": "x"}):
        with pytest.raises(PresenceError):
            SupabaseBridge(tracker, client, topics=topics)  # type: ignore[arg-type]
    with pytest.raises(PresenceError):
        SupabaseBridge(object(), client, topics=["room"])  # type: ignore[arg-type]
    with pytest.raises(PresenceError):
        SupabaseBridge(tracker, client, topics=["room"], timeout=0)

    async def refused() -> None:
        async def auth(token: str | None, topic: str | None) -> bool:
            return topic is None  # the socket, but no channel

        async with PresenceServer(Tracker(), port=0, auth=auth) as server:
            c = client_for(server.port)
            bridge = SupabaseBridge(tracker, c, topics=["room"], timeout=5)
            try:
                with pytest.raises(BridgeError):
                    await bridge.start()
                assert tracker.remote_nodes() == {}
            finally:
                await bridge.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(), WAIT)

    run(refused)


def test_a_diff_in_a_big_channel_rereads_only_the_keys_it_touched() -> None:
    big = 3_000

    def metas(tracker: Tracker, topic: str) -> dict[str, list[dict[str, Any]]]:
        return {
            key: [{k: v for k, v in m.items() if k != "phx_ref"} for m in entry["metas"]]
            for key, entry in tracker.list(topic).items()
        }

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            source = server.tracker
            for i in range(big):
                source.track(f"c{i}", "realtime:big", f"user-{i}", {"n": i})
            source.flush()
            tracker, client = Tracker(), client_for(server.port)
            try:
                async with SupabaseBridge(tracker, client, ["big"]) as bridge:
                    await until(lambda: tracker.count("big") == big, "the whole channel")
                    assert metas(tracker, "big") == metas(source, "realtime:big")
                    reads: list[str] = []
                    wanted = bridge._wanted

                    def counted(key: str, held: Any) -> dict[str, tuple[str, Any]]:
                        reads.append(key)
                        return wanted(key, held)

                    bridge._wanted = counted  # type: ignore[method-assign]
                    source.update("c1", "realtime:big", "user-1", {"n": -1})
                    source.untrack("c2", "realtime:big", "user-2")
                    source.track("c-new", "realtime:big", "user-new", {"n": "new"})
                    source.flush()
                    await until(lambda: "user-new" in tracker.list("big"), "the diff")
                    await until(lambda: tracker.count("big") == big, "the leave")
                    assert sorted(reads) == ["user-1", "user-2", "user-new"]
                    assert metas(tracker, "big") == metas(source, "realtime:big")
                    assert tracker.remote_nodes() == {bridge.node_of("big"): big}
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)

    run(main)
