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
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from servers import free_port

from presence_core import PresenceError, Tracker
from presence_core.bridges import supabase
from presence_core.bridges.supabase import (
    BRIDGE_FIELD,
    SIGNATURE_FIELD,
    BridgeError,
    SupabaseBridge,
)
from presence_core.server import PresenceServer
from presence_core.testing import RecordingTransport

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


def test_two_bridges_with_a_shared_secret_see_each_others_users_not_each_others_bridges() -> None:
    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            t1, t2 = Tracker(), Tracker()
            c1, c2 = client_for(server.port), client_for(server.port)
            try:
                async with (
                    SupabaseBridge(t1, c1, topics={"room": "lobby"}, secret="shared") as b1,
                    SupabaseBridge(t2, c2, topics={"room": "lobby"}, secret=b"shared") as b2,
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

                    def counted(ch: Any, key: str, held: Any) -> dict[str, tuple[str, Any]]:
                        reads.append(key)
                        return wanted(ch, key, held)

                    bridge._wanted = counted  # type: ignore[method-assign,assignment]
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


# -- forged bridge metas ----------------------------------------------------------------------


def forged(bridge_id: str, **extra: Any) -> dict[str, Any]:
    """A meta that poses as a bridge's, listing two users, one with a ref of a made-up node."""
    keys = {"ghost": [{"phx_ref": "evil.1", "n": 1}], "ghost-2": [{"n": 2}]}
    return {BRIDGE_FIELD: bridge_id, "keys": keys, **extra}


def signed_meta(secret: bytes, channel: str, bridge_id: str, keys: Any) -> dict[str, Any]:
    """A bridge meta signed as `SIGNATURE_FIELD` documents it."""
    body = orjson.dumps(
        ["presence-core-bridge/1", channel, bridge_id, keys], option=orjson.OPT_SORT_KEYS
    )
    sig = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {BRIDGE_FIELD: bridge_id, "keys": keys, SIGNATURE_FIELD: sig}


def test_a_forged_bridge_meta_is_one_plain_presence_not_ghosts() -> None:
    dana = {"dana": [{"phx_ref": "evil.9", "n": 4}]}

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            tracker, client = Tracker(), client_for(server.port)
            bridge = SupabaseBridge(tracker, client, ["room"], bridge_id="b1", secret=b"s3cret")
            node = bridge.node_of("room")
            members = [
                Plain(server.port, "room", "mallory", forged("evil")),  # unsigned
                Plain(server.port, "room", "trent", forged("evil", sig="0" * 64)),  # bad sig
                # Posing as the bridge itself, under its key: not hidden from the mirror.
                Plain(server.port, "room", bridge.key, forged("b1", sig="0" * 64)),
                # A peer that has the secret: its users are mirrored, but not its refs.
                Plain(server.port, "room", "peer", signed_meta(b"s3cret", "room", "peer-1", dana)),
            ]
            try:
                await bridge.start()
                for member in members:
                    await member.join()
                await until(lambda: len(tracker.remote_presences("room")) >= 3, "the members")
                await asyncio.sleep(0.3)
                await until(lambda: "dana" in tracker.list("room"), "the peer's user")
                assert sorted(tracker.list("room")) == sorted(
                    ["mallory", "trent", bridge.key, "dana"]
                )
                assert tracker.remote_nodes() == {node: 4}
                assert tracker.list("room")["dana"]["metas"][0]["n"] == 4
                # Every ref is the bridge's own, none read from a meta.
                for p in tracker.remote_presences("room"):
                    assert p[2].startswith(f'{{"phx_ref":"{node}.'.encode())
                metas = tracker.list("room")["mallory"]["metas"]
                # Its meta is data as any member's: what it lists does not become presences.
                assert len(metas) == 1 and metas[0]["keys"] == forged("evil")["keys"]
                # They leave: nothing of theirs stays behind.
                for member in members:
                    await member.close()
                await until(lambda: tracker.count("room") == 0, "the members' leaves")
                assert tracker.remote_nodes() == {}
            finally:
                await bridge.stop()
                for member in members:
                    await member.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)

    run(main)


def test_bridges_without_a_shared_secret_see_each_others_bridge_only() -> None:
    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            t1, t2 = Tracker(), Tracker()
            c1, c2 = client_for(server.port), client_for(server.port)
            try:
                async with (
                    SupabaseBridge(t1, c1, ["room"], secret="one") as b1,
                    SupabaseBridge(t2, c2, ["room"]) as b2,
                ):
                    t1.track("x", "room", "ann", {"n": 1})
                    t1.flush()
                    t2.track("y", "room", "ben", {"n": 2})
                    t2.flush()
                    await until(lambda: sorted(t1.list("room")) == sorted(["ann", b2.key]), "t1")
                    await until(lambda: sorted(t2.list("room")) == sorted(["ben", b1.key]), "t2")
                    # b1 signs, b2 has no secret to check it with: still one presence.
                    meta = t2.list("room")[b1.key]["metas"][0]
                    assert len(meta[SIGNATURE_FIELD]) == 64 and meta["keys"] == {"ann": [{"n": 1}]}
                    assert t1.remote_nodes() == {b1.node_of("room"): 1}
            finally:
                for c in (c1, c2):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(c.close(), WAIT)

    run(main)


def test_new_arguments_are_checked_and_the_secret_never_shows() -> None:
    tracker = Tracker()
    client = AsyncRealtimeClient("ws://127.0.0.1:9/realtime/v1", token="t", auto_reconnect=False)
    bad: list[dict[str, Any]] = [
        {"secret": 5},
        {"secret": ""},
        {"secret": b""},
        {"secret": "\ud800"},
        {"drop_after": 0},
        {"drop_after": -1.0},
        {"drop_after": float("nan")},
        {"drop_after": "30"},
        {"drop_after": True},
        {"on_stale": "log"},
        {"heartbeat_timeout": 0},
        {"heartbeat_timeout": float("nan")},
        {"heartbeat_timeout": "10"},
    ]
    for kwargs in bad:
        with pytest.raises(PresenceError) as info:
            SupabaseBridge(tracker, client, ["room"], **kwargs)
        assert "\ud800" not in str(info.value)
    bridge = SupabaseBridge(
        tracker,
        client,
        ["room"],
        secret="hunter2-secret",
        drop_after=float("inf"),
        heartbeat_timeout=float("inf"),
    )
    assert bridge.signed and not bridge.stale and bridge.stale_since("room") is None
    assert "hunter2" not in repr(bridge) and "hunter2" not in repr(vars(bridge))
    assert not SupabaseBridge(tracker, client, ["room"]).signed


# -- outages ----------------------------------------------------------------------------------


def _plain(metas: list[dict[str, Any]]) -> list[bytes]:
    return sorted(orjson.dumps({k: v for k, v in m.items() if k != "phx_ref"}) for m in metas)


def mirror_view(tracker: Tracker, topic: str) -> dict[str, list[bytes]]:
    """The bridge's mirror of ``topic``: key -> its metas without refs, canonical."""
    found: dict[str, list[dict[str, Any]]] = {}
    for p in tracker.remote_presences(topic):
        found.setdefault(p[1], []).append(orjson.loads(p[2]))
    return {key: _plain(metas) for key, metas in found.items()}


def server_view(server: PresenceServer, name: str, bridge: SupabaseBridge) -> dict[str, Any]:
    """What the server holds in channel ``name`` but the bridge's own presence, like
    `mirror_view`."""
    listing = server.tracker.list(f"realtime:{name}")
    return {k: _plain(v["metas"]) for k, v in listing.items() if k != bridge.key}


def exact(server: PresenceServer, tracker: Tracker, bridge: SupabaseBridge, topic: str) -> bool:
    """The mirror is the server's view of the channel, and the server holds the bridge's
    published presence of ``topic``'s local presences."""
    if mirror_view(tracker, topic) != server_view(server, topic, bridge):
        return False
    held = server.tracker.list(f"realtime:{topic}").get(bridge.key)
    local: dict[str, list[dict[str, Any]]] = {}
    for _, key, data, _ in tracker.presences(topic):
        local.setdefault(key, []).append(
            {k: v for k, v in orjson.loads(data).items() if k != "phx_ref"}
        )
    if not local:
        return held is None
    return (
        held is not None
        and len(held["metas"]) == 1
        and held["metas"][0][BRIDGE_FIELD] == bridge.bridge_id
        and held["metas"][0]["keys"] == local
    )


def test_a_bridge_whose_client_gave_up_comes_back_and_drops_a_stale_mirror() -> None:
    async def main() -> None:
        port = free_port()
        server = PresenceServer(Tracker(), port=port)
        await server.start()
        server.tracker.track("s1", "realtime:room", "alice", {"n": 1})
        server.tracker.flush()
        tracker = Tracker()
        diffs = RecordingTransport()
        tracker.subscribe("room", diffs)
        # This client gives up at its first failed attempt: the bridge alone reconnects it.
        client = AsyncRealtimeClient(
            f"ws://127.0.0.1:{port}/realtime/v1", token="test", max_retries=1
        )
        events: list[tuple[str, bool]] = []
        bridge = SupabaseBridge(
            tracker, client, ["room"], drop_after=1.0, on_stale=lambda *e: events.append(e)
        )
        try:
            await bridge.start()
            assert not bridge.stale and bridge.stale_since("room") is None
            tracker.track("c1", "room", "bob", {"n": 2})
            tracker.flush()
            await until(lambda: exact(server, tracker, bridge, "room"), "exact")

            down = time.monotonic()
            await server.stop()
            await until(lambda: bridge.stale, "stale", 3)
            assert events == [("room", True)]
            since = bridge.stale_since("room")
            assert since is not None and since >= down
            assert "alice" in tracker.list("room")  # kept while younger than drop_after
            diffs.clear()
            await until(lambda: sorted(tracker.list("room")) == ["bob"], "mirror dropped", 5)
            assert time.monotonic() - since >= 1.0
            assert [list(d["leaves"]) for d in diffs.diffs("room")] == [["alice"]]
            assert tracker.remote_nodes() == {} and bridge.stale
            await asyncio.sleep(1.0)
            assert not client.is_connected

            server = PresenceServer(Tracker(), port=port)
            await server.start()
            server.tracker.track("s2", "realtime:room", "carol", {"n": 3})
            server.tracker.flush()
            back = time.monotonic()
            await until(lambda: exact(server, tracker, bridge, "room"), "exact again", 15)
            await until(lambda: not bridge.stale, "fresh")
            assert time.monotonic() - back < 15
            assert sorted(tracker.list("room")) == ["bob", "carol"]
            assert events == [("room", True), ("room", False)]
        finally:
            await bridge.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), WAIT)
            await server.stop()

    run(main)


def test_a_channel_closed_on_a_live_socket_is_joined_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client never rejoins a channel that was closed (by the server, or left): the
    # bridge re-creates it after a grace, shortened here.
    monkeypatch.setattr(supabase, "_REJOIN_GRACE", 0.3)

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            server.tracker.track("s1", "realtime:room", "alice", {"n": 1})
            server.tracker.flush()
            tracker, client = Tracker(), client_for(server.port)
            events: list[tuple[str, bool]] = []
            bridge = SupabaseBridge(tracker, client, ["room"], on_stale=lambda *e: events.append(e))
            try:
                await bridge.start()
                tracker.track("c1", "room", "bob", {"n": 2})
                tracker.flush()
                await until(lambda: exact(server, tracker, bridge, "room"), "exact")
                old = bridge.channel("room")
                assert old is not None
                await old.unsubscribe()
                await until(lambda: bridge.stale, "stale", 3)
                await until(lambda: server.tracker.count("realtime:room") == 1, "bridge left")
                server.tracker.track("s2", "realtime:room", "carol", {"n": 3})
                server.tracker.flush()
                await until(lambda: not bridge.stale, "fresh", 5)
                await until(lambda: exact(server, tracker, bridge, "room"), "exact again", 5)
                assert bridge.channel("room") is not old
                assert sorted(tracker.list("room")) == ["alice", "bob", "carol"]
                assert events == [("room", True), ("room", False)]
            finally:
                await bridge.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)

    run(main)


# -- hostile metas, a dead listener, a silent server -----------------------------------------


def test_a_meta_json_cannot_encode_is_skipped_and_the_client_keeps_listening() -> None:
    """An integer beyond 64 bits in a member's meta: Supabase's server relays it and the
    client parses it into a Python int, which orjson cannot write.  Our server refuses such
    metas, so it is added where the bridge reads the channel's state (the one simulated part);
    the rest is the real client.  Before, the encoding error escaped the sync callback and
    ended the client's listener: every later change went unseen while the bridge looked
    healthy."""

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            tracker, client = Tracker(), client_for(server.port)
            bridge = SupabaseBridge(tracker, client, ["room"])
            wanted = bridge._wanted

            def huge(ch: Any, key: str, metas: Any) -> dict[Any, tuple[str, Any]]:
                metas = [dict(m, n=2**70) if m.get("huge") else m for m in metas]
                return wanted(ch, key, metas)

            bridge._wanted = huge  # type: ignore[method-assign]
            mallory = Plain(server.port, "room", "mallory", {"huge": True})
            carol = Plain(server.port, "room", "carol", {"n": 1})
            try:
                await bridge.start()
                await mallory.join()
                await asyncio.sleep(0.5)
                await carol.join()
                await until(lambda: "carol" in tracker.list("room"), "carol after mallory")
                assert sorted(tracker.list("room")) == ["carol"]
                assert bridge.skipped >= 1
                listener = client._listen_task
                assert listener is not None and not listener.done()
                assert not bridge.stale
                await carol.close()
                await until(lambda: tracker.count("room") == 0, "carol's leave")
            finally:
                await bridge.stop()
                for member in (mallory, carol):
                    await member.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)

    run(main)


def test_an_error_in_a_callback_goes_stale_and_rebuilds_the_mirror(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever raises in the bridge's sync callback (here a stand-in for a bug, raising three
    times with a member's data in its message) stays out of the client: the mirror goes stale,
    one ERROR line says so without the message, and the bridge rebuilds the mirror from the
    channel's state by itself, no further change in the channel needed."""

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            server.tracker.track("s1", "realtime:room", "alice", {"n": 1})
            server.tracker.flush()
            tracker, client = Tracker(), client_for(server.port)
            events: list[tuple[str, bool]] = []
            bridge = SupabaseBridge(tracker, client, ["room"], on_stale=lambda *e: events.append(e))
            apply = bridge._apply
            fail = [3]

            def flaky(*args: Any) -> None:
                if fail[0]:
                    fail[0] -= 1
                    # Half done, as a bug might leave it: a presence in the Tracker, not in the
                    # mirror.
                    ref = f"{bridge.node_of('room')}.ffff"
                    tracker.apply_remote("room", [("ghost", orjson.dumps({"phx_ref": ref}), None)])
                    raise KeyError("member-secret-data")
                apply(*args)

            carol = Plain(server.port, "room", "carol", {"n": 3})
            try:
                await bridge.start()
                bridge._apply = flaky  # type: ignore[method-assign]
                await carol.join()
                await until(lambda: bridge.stale, "stale")
                await until(lambda: not bridge.stale, "rebuilt", 5)
                assert exact(server, tracker, bridge, "room")
                assert sorted(tracker.list("room")) == ["alice", "carol"]
                assert events == [("room", True), ("room", False)]
                listener = client._listen_task
                assert listener is not None and not listener.done()
                errors = [r for r in caplog.records if r.levelname == "ERROR"]
                assert len(errors) == 1 and "KeyError" in errors[0].getMessage()
                assert "member-secret-data" not in caplog.text
                await carol.close()
                await until(lambda: sorted(tracker.list("room")) == ["alice"], "carol's leave")
            finally:
                await bridge.stop()
                await carol.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)

    caplog.set_level("INFO", logger=supabase.__name__)
    run(main)


def test_a_client_whose_listener_died_is_reconnected() -> None:
    """Another channel of the same client, the application's, raises in its callback: the
    client's listener ends and the socket stays open, unread.  The bridge takes it as a
    dropped socket: stale, reconnected, channel rejoined, mirror exact again."""

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            server.tracker.track("s1", "realtime:room", "alice", {"n": 1})
            server.tracker.flush()
            tracker, client = Tracker(), client_for(server.port)
            events: list[tuple[str, bool]] = []
            bridge = SupabaseBridge(tracker, client, ["room"], on_stale=lambda *e: events.append(e))
            carol = Plain(server.port, "room", "carol", {"n": 3})
            raised = [False]

            def buggy() -> None:
                if not raised[0]:
                    raised[0] = True
                    raise RuntimeError("the application's bug")

            try:
                await bridge.start()
                tracker.track("c1", "room", "bob", {"n": 2})
                tracker.flush()
                await until(lambda: exact(server, tracker, bridge, "room"), "exact")
                other = client.channel("other")
                other.on_presence_sync(buggy)
                await asyncio.wait_for(other.subscribe(), WAIT)
                await until(lambda: raised[0], "the application's callback")
                listener = client._listen_task
                # On loopback the way back can take less than one look at `stale`.
                await until(lambda: len(events) == 2, "stale and back", 10)
                assert events == [("room", True), ("room", False)] and not bridge.stale
                assert listener is not None and listener.done()
                assert client._listen_task is not listener
                await carol.join()
                await until(lambda: exact(server, tracker, bridge, "room"), "exact again", 10)
                assert sorted(tracker.list("room")) == ["alice", "bob", "carol"]
            finally:
                await bridge.stop()
                await carol.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)

    run(main)


def test_member_chosen_presence_refs_never_collide_in_the_mirror() -> None:
    """The client lets a meta's own ``presence_ref`` field override the server's ref, and
    Supabase's server relays such fields: members choose the ids the client reports.  Our
    server refuses the field, so this drives the bridge's sync step directly.  Before, two
    metas with the same presence_ref shared one mirror entry: a ghost stayed in the Tracker
    and the next sync raised KeyError (which, raised in the client's callback, killed it)."""
    tracker = Tracker()
    client = AsyncRealtimeClient("ws://127.0.0.1:9/realtime/v1", token="t", auto_reconnect=False)
    secret = b"s3cret"
    bridge = SupabaseBridge(tracker, client, ["room"], bridge_id="b1", secret=secret)
    bridge._started = True
    ch = bridge._channels["room"]
    listed = signed_meta(secret, "room", "peer", {"dana": [{"n": 4}]})
    state: dict[str, list[dict[str, Any]]] = {
        "a1": [{"presence_ref": "X", "who": "a1"}],
        "a2": [{"presence_ref": "X", "who": "a2"}, {"presence_ref": "X", "who": "a2b"}],
        # The id a listed presence of another bridge once had, chosen by a plain member.
        "b": [{"presence_ref": "P/0/dana", "who": "b"}],
        "peer": [dict(listed, presence_ref="P")],
    }

    def view() -> dict[str, list[str]]:
        return {
            k: sorted(str(m.get("who", m.get("n"))) for m in v["metas"])
            for k, v in tracker.list("room").items()
        }

    def sync(*keys: str) -> None:
        bridge._apply(ch, state, keys or list(state))
        assert len(tracker.remote_presences("room")) == len(ch.mirror)

    sync()
    assert view() == {"a1": ["a1"], "a2": ["a2", "a2b"], "b": ["b"], "dana": ["4"]}
    del state["a1"]
    sync("a1")
    assert view() == {"a2": ["a2", "a2b"], "b": ["b"], "dana": ["4"]}
    state["a2"] = [{"presence_ref": "X", "who": "a2", "v": 2}, {"presence_ref": "X", "who": "a2b"}]
    sync("a2")
    assert sorted(m.get("v", 1) for m in tracker.list("room")["a2"]["metas"]) == [1, 2]
    assert view()["a2"] == ["a2", "a2b"]
    state.clear()
    sync("a2", "b", "peer")
    assert tracker.list("room") == {} and tracker.remote_presences() == []
    assert ch.mirror == {} and ch.sources == {}


def test_a_silent_server_is_taken_for_down_within_the_heartbeat_timeout() -> None:
    """The server stops answering with the socket still open (a hung process, a dead route).
    A proxy between client and server stops forwarding: before, the bridge said nothing for
    40 s (until websockets' own keepalive gave up).  Now it is stale within its
    heartbeat_timeout, and back, exact, soon after the server answers again."""
    frozen = asyncio.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while frozen.is_set():
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        async with PresenceServer(Tracker(), port=0) as server:
            links: set[asyncio.Task[Any]] = set()

            async def link(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                sr, sw = await asyncio.open_connection("127.0.0.1", server.port)
                for task in (pipe(r, sw), pipe(sr, w)):
                    links.add(asyncio.get_running_loop().create_task(task))

            proxy = await asyncio.start_server(link, "127.0.0.1", 0)
            port = proxy.sockets[0].getsockname()[1]
            server.tracker.track("s1", "realtime:room", "alice", {"n": 1})
            server.tracker.flush()
            tracker = Tracker()
            client = AsyncRealtimeClient(
                f"ws://127.0.0.1:{port}/realtime/v1", token="test", initial_backoff=0.2, timeout=1
            )
            bridge = SupabaseBridge(tracker, client, ["room"], heartbeat_timeout=1.5)
            try:
                await bridge.start()
                tracker.track("c1", "room", "bob", {"n": 2})
                tracker.flush()
                await until(lambda: exact(server, tracker, bridge, "room"), "exact")
                await asyncio.sleep(2.0)  # pings answered: no false alarm
                assert not bridge.stale
                frozen.set()
                hung = time.monotonic()
                await until(lambda: bridge.stale, "stale", 5)
                assert time.monotonic() - hung < 2.5
                server.tracker.track("s2", "realtime:room", "carol", {"n": 3})
                server.tracker.flush()
                frozen.clear()
                await until(lambda: not bridge.stale, "fresh", 10)
                await until(lambda: exact(server, tracker, bridge, "room"), "exact again", 10)
                assert sorted(tracker.list("room")) == ["alice", "bob", "carol"]
            finally:
                frozen.clear()
                await bridge.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), WAIT)
                proxy.close()
                for task in links:
                    task.cancel()
                await asyncio.gather(*links, return_exceptions=True)

    run(main)
