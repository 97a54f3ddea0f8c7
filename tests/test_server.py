"""PresenceServer on the wire: frames in, frames out, with a plain WebSocket client.

The real clients (phoenix.js, realtime-js, Supabase's Python client) are driven in
test_server_clients.py; these tests pin the protocol details they depend on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.uri import parse_uri

from presence_core import Limits, Tracker
from presence_core.protocol import core as core_module
from presence_core.server import PresenceServer, Refused, ServerLimits
from presence_core.server import connection as connection_module

T = TypeVar("T")


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


@asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[PresenceServer]:
    tracker = kwargs.pop("tracker", None) or Tracker(connection_ttl=kwargs.pop("ttl", 60.0))
    server = PresenceServer(tracker, host="127.0.0.1", port=0, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Client:
    """A bare protocol client: sends frames, collects what comes back."""

    def __init__(self, ws: ClientConnection, version: int) -> None:
        self.ws = ws
        self.version = version
        self.ref = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, server: PresenceServer, vsn: str = "2.0.0") -> AsyncIterator[Client]:
        url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn={vsn}"
        async with connect(url) as ws:
            yield cls(ws, 2 if vsn.startswith("2") else 1)

    async def push(self, topic: str, event: str, payload: Any, join_ref: str | None = None) -> str:
        self.ref += 1
        ref = str(self.ref)
        if self.version == 2:
            frame = [join_ref, ref, topic, event, payload]
        else:
            frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
            if join_ref is not None:
                frame["join_ref"] = join_ref
        await self.ws.send(json.dumps(frame))
        return ref

    async def recv(self, timeout: float = 2.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        data = json.loads(raw)
        if isinstance(data, list):
            join_ref, ref, topic, event, payload = data
            return {
                "join_ref": join_ref,
                "ref": ref,
                "topic": topic,
                "event": event,
                "payload": payload,
            }
        return data  # type: ignore[no-any-return]

    async def until(self, event: str, timeout: float = 2.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if msg["event"] == event:
                return msg

    async def join(self, topic: str, key: str | None = None, **config: Any) -> str:
        presence = {"key": key or "", "enabled": True}
        ref = await self.push(topic, "phx_join", {"config": {"presence": presence, **config}}, None)
        reply = await self.until("phx_reply")
        assert reply["ref"] == ref and reply["payload"]["status"] == "ok", reply
        return ref


def test_join_replies_then_sends_presence_state_even_when_empty() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as c:
            ref = await c.push("room:1", "phx_join", {"config": {"presence": {"key": "a"}}})
            reply = await c.recv()
            assert reply["event"] == "phx_reply" and reply["ref"] == ref
            assert reply["join_ref"] == ref
            assert reply["payload"] == {"status": "ok", "response": {"postgres_changes": []}}
            state = await c.recv()
            assert state["event"] == "presence_state" and state["payload"] == {}

    run(main)


@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
def test_track_reaches_every_member_as_a_diff_with_both_keys(vsn: str) -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server, vsn) as a, Client.open(server) as b:
            join_a = await a.join("room", "alice")
            await a.until("presence_state")
            await b.join("room", "bob")
            await b.until("presence_state")
            ref = await a.push(
                "room",
                "presence",
                {"type": "presence", "event": "track", "payload": {"s": 1}},
                join_a,
            )
            reply = await a.until("phx_reply")
            assert reply["ref"] == ref and reply["payload"] == {"status": "ok", "response": {}}
            for client in (a, b):
                diff = await client.until("presence_diff")
                assert diff["ref"] is None
                assert set(diff["payload"]) == {"joins", "leaves"}
                assert diff["payload"]["joins"]["alice"]["metas"][0]["s"] == 1

    run(main)


def test_retrack_is_one_diff_and_an_equal_meta_changes_nothing() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as a:
            jr = await a.join("room", "alice")
            await a.until("presence_state")
            track = {"event": "track", "payload": {"s": 1}}  # the Python client's shape
            await a.push("room", "presence", track, jr)
            await a.until("presence_diff")
            await a.push("room", "presence", {"event": "track", "payload": {"s": 2}}, jr)
            diff = (await a.until("presence_diff"))["payload"]
            assert diff["joins"]["alice"]["metas"][0]["s"] == 2
            assert diff["leaves"]["alice"]["metas"][0]["s"] == 1
            assert "phx_ref_prev" in diff["joins"]["alice"]["metas"][0]
            await a.push("room", "presence", {"event": "track", "payload": {"s": 2}}, jr)
            await a.until("phx_reply")
            with pytest.raises(TimeoutError):
                await a.until("presence_diff", timeout=0.2)

    run(main)


def test_heartbeat_replies_with_the_same_ref_and_leave_closes() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as a:
            ref = await a.push("phoenix", "heartbeat", {})
            reply = await a.recv()
            assert reply["topic"] == "phoenix" and reply["ref"] == ref
            assert reply["payload"] == {"status": "ok", "response": {}}
            jr = await a.join("room", "alice")
            await a.until("presence_state")
            await a.push("room", "presence", {"event": "track", "payload": {}}, jr)
            await a.until("presence_diff")
            await a.push("room", "phx_leave", {}, jr)
            assert (await a.until("phx_reply"))["payload"]["status"] == "ok"
            close = await a.until("phx_close")
            assert close["topic"] == "room"
            assert server.tracker.count("room") == 0

    run(main)


def test_a_second_join_closes_the_first_under_its_join_ref() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as a:
            first = await a.join("room", "alice")
            await a.until("presence_state")
            await a.push("room", "phx_join", {"config": {"presence": {"key": "alice"}}})
            close = await a.until("phx_close")
            assert close["join_ref"] == first

    run(main)


def test_broadcast_honours_self_and_ack() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as a, Client.open(server) as b:
            jr = await a.join("room", "a", broadcast={"self": "true", "ack": True})
            await a.until("presence_state")
            await b.join("room", "b")
            await b.until("presence_state")
            body = {"type": "broadcast", "event": "ping", "payload": {"n": 1}}
            ref = await a.push("room", "broadcast", body, jr)
            got_a = [await a.recv(), await a.recv()]
            events = {m["event"] for m in got_a}
            assert events == {"broadcast", "phx_reply"}
            assert any(m["event"] == "phx_reply" and m["ref"] == ref for m in got_a)
            got_b = await b.until("broadcast")
            assert got_b["payload"] == body
            await b.push("room", "broadcast", body)  # b: no self, no ack
            assert (await a.until("broadcast"))["payload"] == body
            with pytest.raises(TimeoutError):
                await b.until("broadcast", timeout=0.2)

    run(main)


def test_realtime_js_binary_broadcast_is_relayed_with_its_bytes() -> None:
    """A kind-3 push is relayed as a text broadcast (every client reads text) whose payload
    is the JSON bytes as sent: ``1e9`` stays ``1e9``."""

    async def main() -> None:
        async with (
            serving() as server,
            Client.open(server) as a,
            Client.open(server) as b,
            Client.open(server, vsn="1.0.0") as c,
        ):
            await a.join("room", "a")
            await b.join("room", "b")
            await c.join("room", "c")
            topic, event, payload = b"room", b"wave", b'{"x":1e9}'
            frame = bytes([3, 1, 1, len(topic), len(event), 0, 1]) + b"1" + b"2" + topic + event
            await a.ws.send(frame + payload)
            for member in (b, c):
                data = await member.ws.recv()
                while '"broadcast"' not in data:
                    data = await member.ws.recv()
                assert '"payload":{"type":"broadcast","event":"wave","payload":{"x":1e9}}' in data


def test_a_silent_connection_leaves_within_its_ttl() -> None:
    async def main() -> None:
        async with serving(ttl=0.5) as server, Client.open(server) as watcher:
            await watcher.join("room", "w")
            await watcher.until("presence_state")
            async with Client.open(server) as silent:
                jr = await silent.join("room", "s")
                await silent.push("room", "presence", {"event": "track", "payload": {}}, jr)
                joined = await watcher.until("presence_diff")
                started = time.monotonic()  # the silent one's last frame came before this
                assert list(joined["payload"]["joins"]) == ["s"]
                leave = None
                while leave is None and time.monotonic() - started < 3.0:
                    await watcher.push("phoenix", "heartbeat", {})  # the watcher stays
                    with contextlib.suppress(TimeoutError):
                        leave = await watcher.until("presence_diff", timeout=0.1)
                assert leave is not None, "the silent connection never left"
                took = time.monotonic() - started
                assert list(leave["payload"]["leaves"]) == ["s"]
                assert took < 0.5 + 0.3, f"left {took:.2f} s after its last frame (ttl 0.5 s)"
                with pytest.raises(ConnectionClosed) as closed:  # sent away, to come back
                    for _ in range(20):
                        await silent.recv(0.5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011

    run(main)


def test_malformed_frames_close_their_socket_and_harm_nobody() -> None:
    """A frame that is not a Phoenix message ends its socket with 1007, as Phoenix's
    serializer does; an oversized one with 1009; the other clients go on."""

    async def main() -> None:
        limits = ServerLimits(max_frame_bytes=1024)
        async with serving(limits=limits) as server, Client.open(server) as good:
            jr = await good.join("room", "good")
            await good.until("presence_state")
            for frame in ["{not json", "42", "[1,2,3]", '{"topic":1}', '["x"]', b"\x07garbage"]:
                async with Client.open(server) as bad:
                    await bad.ws.send(frame)
                    with pytest.raises(ConnectionClosed) as closed:
                        await bad.recv(2.0)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
                    assert closed.value.rcvd.reason.startswith("not a Phoenix message")
            async with Client.open(server) as bad:
                await bad.push("room", "presence", {"event": "track", "payload": {}})  # not joined
                reply = await bad.until("phx_reply")
                assert reply["payload"]["status"] == "error"
                with pytest.raises(ConnectionClosed) as closed:  # oversized: closed with 1009
                    await bad.ws.send("x" * 2000)
                    await bad.recv(1.0)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            await good.push("room", "presence", {"event": "track", "payload": {}}, jr)
            diff = await good.until("presence_diff")
            assert list(diff["payload"]["joins"]) == ["good"]
            server.tracker.sync_metrics()
            scrape = server.tracker.metrics.to_prometheus().decode()
            assert 'presence_disconnects_total{reason="protocol_error"} 6.0' in scrape
            assert 'presence_disconnects_total{reason="limit"} 1.0' in scrape

    run(main)


def test_limits_close_the_channel_not_the_socket() -> None:
    async def main() -> None:
        tracker = Tracker(plans={"default": Limits(rate_per_second=1.0, burst=1)})
        limits = ServerLimits(max_topics_per_connection=1)
        async with serving(tracker=tracker, limits=limits) as server, Client.open(server) as a:
            jr = await a.join("room", "a")
            await a.until("presence_state")
            await a.push("other", "phx_join", {"config": {}})
            refused = await a.until("phx_reply")
            assert refused["payload"]["status"] == "error"
            assert "Too many channels" in refused["payload"]["response"]["reason"]
            await a.push("room", "presence", {"event": "track", "payload": {"n": 1}}, jr)
            await a.until("presence_diff")
            await a.push("room", "presence", {"event": "track", "payload": {"n": 2}}, jr)
            system = await a.until("system")
            assert "rate limit" in system["payload"]["message"]
            assert (await a.until("phx_close"))["topic"] == "room"
            ref = await a.push("phoenix", "heartbeat", {})  # the socket is still there
            assert (await a.until("phx_reply"))["ref"] == ref

    run(main)


def test_auth_hook_refuses_tokens_and_topics() -> None:
    async def auth(token: str | None, topic: str | None) -> bool:
        if token != "good":
            raise Refused("bad token")
        return topic != "secret"

    async def main() -> None:
        async with serving(auth=auth) as server:
            url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0"
            async with connect(url + "&apikey=bad") as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            async with connect(url + "&apikey=good") as ws:
                c = Client(ws, 2)
                await c.join("room", "a")
                await c.push("secret", "phx_join", {"config": {}})
                reply = await c.until("phx_reply")
                assert reply["payload"] == {
                    "status": "error",
                    "response": {"reason": "Unauthorized"},
                }

    run(main)


def test_health_metrics_and_unknown_paths() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as a:
            jr = await a.join("room", "a")
            await a.push("room", "presence", {"event": "track", "payload": {}}, jr)
            await a.until("presence_diff")
            base = f"http://127.0.0.1:{server.port}"

            def get(path: str) -> tuple[int, bytes]:
                try:
                    with urllib.request.urlopen(base + path, timeout=2) as response:
                        return response.status, response.read()
                except urllib.error.HTTPError as exc:
                    return exc.code, exc.read()

            status, body = await asyncio.to_thread(get, "/health")
            assert status == 200
            assert json.loads(body) == {
                "status": "ok",
                "redis": None,
                "node": server.tracker.node,
                "connections": 1,
                "presences": 1,
            }
            status, body = await asyncio.to_thread(get, "/metrics")
            assert status == 200 and b"presence_presences 1.0" in body
            status, _ = await asyncio.to_thread(get, "/elsewhere")
            assert status == 404
            with pytest.raises(InvalidStatus):
                async with connect(f"ws://127.0.0.1:{server.port}/not-a-socket"):
                    pass

    run(main)


def test_stop_sends_clients_away_and_their_presences_leave() -> None:
    async def main() -> None:
        tracker = Tracker()
        server = PresenceServer(tracker, port=0)
        await server.start()
        async with Client.open(server) as a:
            jr = await a.join("room", "a")
            await a.push("room", "presence", {"event": "track", "payload": {}}, jr)
            await a.until("presence_diff")
            await server.stop()
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(10):
                    await a.recv(1.0)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert tracker.totals().presences == 0

    run(main)


def test_joins_and_broadcasts_are_rate_limited_per_socket() -> None:
    async def main() -> None:
        limits = ServerLimits(joins_per_second=2.0, broadcasts_per_second=2.0)
        async with serving(limits=limits) as server, Client.open(server) as a:
            replies = []
            for i in range(3):
                await a.push(f"t{i}", "phx_join", {"config": {}})
                replies.append((await a.until("phx_reply"))["payload"])
            assert [r["status"] for r in replies] == ["ok", "ok", "error"]
            assert "join rate" in replies[2]["response"]["reason"]
            body = {"type": "broadcast", "event": "e", "payload": {}}
            statuses = []
            for _ in range(3):
                await a.push("t0", "broadcast", body)
            await a.push("phoenix", "heartbeat", {})
            while True:
                msg = await a.until("phx_reply")
                if msg["topic"] == "phoenix":
                    break
                statuses.append(msg["payload"]["status"])
            assert statuses == ["error"]  # the third; the first two need no ack

    run(main)


def test_an_async_auth_hook_keeps_the_frames_that_follow_in_order() -> None:
    async def auth(token: str | None, topic: str | None) -> bool:
        await asyncio.sleep(0.05)  # the track below arrives while the join is being decided
        return True

    async def main() -> None:
        async with serving(auth=auth) as server, Client.open(server) as a:
            jr = await a.push("room", "phx_join", {"config": {"presence": {"key": "a"}}})
            await a.push("room", "presence", {"event": "track", "payload": {"n": 1}}, jr)
            assert (await a.until("phx_reply"))["payload"]["status"] == "ok"  # the join
            track = await a.until("phx_reply")
            assert track["payload"] == {"status": "ok", "response": {}}
            diff = await a.until("presence_diff")
            assert diff["payload"]["joins"]["a"]["metas"][0]["n"] == 1

    run(main)


def test_a_fragmented_message_is_put_back_together() -> None:
    async def main() -> None:
        async with serving() as server, Client.open(server) as a:
            frame = json.dumps(
                ["1", "1", "room", "phx_join", {"config": {"presence": {"key": "f"}}}]
            )
            third = len(frame) // 3
            await a.ws.send([frame[:third], frame[third : 2 * third], frame[2 * third :]])
            reply = await a.until("phx_reply")
            assert reply["ref"] == "1" and reply["payload"]["status"] == "ok"

    run(main)


def test_a_client_that_stops_reading_is_cut_and_leaves(caplog: pytest.LogCaptureFixture) -> None:
    """Past `max_buffered_bytes` of unread frames the socket is cut, and its presence leaves."""
    caplog.set_level("INFO", logger="presence_core.audit")

    async def main() -> None:
        limits = ServerLimits(max_buffered_bytes=1 << 16, broadcasts_per_second=100_000.0)
        async with serving(limits=limits) as server, Client.open(server) as talker:
            await talker.join("room", "talker")
            await talker.until("presence_state")
            # A raw socket with a tiny receive buffer that joins, tracks, and then reads nothing.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0"
            protocol = ClientProtocol(parse_uri(url))
            protocol.send_request(protocol.connect())
            for chunk in protocol.data_to_send():
                writer.write(chunk)
            protocol.receive_data(await reader.read(4096))  # the 101
            for push in (
                ["1", "1", "room", "phx_join", {"config": {"presence": {"key": "sleeper"}}}],
                ["1", "2", "room", "presence", {"event": "track", "payload": {}}],
            ):
                protocol.send_text(json.dumps(push).encode())
            for chunk in protocol.data_to_send():
                writer.write(chunk)
            await writer.drain()
            for _ in range(100):
                if server.tracker.count("room") == 1 and "sleeper" in server.tracker.list("room"):
                    break
                await asyncio.sleep(0.02)
            assert "sleeper" in server.tracker.list("room")
            body = {"type": "broadcast", "event": "blob", "payload": {"x": "y" * 60_000}}
            for _ in range(600):  # 36 MB: far past what the kernel's buffers hold
                await talker.push("room", "broadcast", body)
                if "sleeper" not in server.tracker.list("room"):
                    break
                await asyncio.sleep(0)
            for _ in range(100):
                if "sleeper" not in server.tracker.list("room"):
                    break
                await asyncio.sleep(0.02)
            assert list(server.tracker.list("room")) == []  # talker never tracked
            assert server.connections == 1
            cut = [r for r in caplog.records if r.getMessage() == "disconnected"]
            assert [r.audit["reason"] for r in cut] == ["reads too slowly"]  # type: ignore[attr-defined]
            writer.close()

    run(main)


def test_a_socket_that_never_finishes_its_handshake_is_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection_module, "OPEN_TIMEOUT", 0.2)

    async def main() -> None:
        async with serving() as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /socket/websocket HTTP/1.1\r\nHost: x\r\n")  # never finished
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 2.0) == b""  # cut: EOF or reset
            writer.close()

    run(main)


def test_a_reconnect_storm_batches_diffs_and_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Sockets arriving fast make a storm: diffs go out every 0.5 s, each carrying many joins,
    none lost; once the arrivals stop, diffs go out at once again."""
    monkeypatch.setattr(core_module, "_STORM_SOCKETS", 20.0)  # 5 sockets in 0.25 s
    caplog.set_level("INFO", logger="presence_core.protocol")
    clients = 60

    async def main() -> None:
        async with serving() as server, Client.open(server) as watcher:
            await watcher.join("room", "w")
            await watcher.until("presence_state")
            url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0"

            async def arrive(i: int) -> ClientConnection:
                ws = await connect(url)
                c = Client(ws, 2)
                jr = await c.join("room", f"c{i}")
                await c.push("room", "presence", {"event": "track", "payload": {}}, jr)
                return ws

            sockets = await asyncio.gather(*(arrive(i) for i in range(clients)))

            async def drain(ws: ClientConnection) -> None:  # a full queue stops reading
                with contextlib.suppress(ConnectionClosed):
                    async for _ in ws:
                        pass

            drains = [asyncio.ensure_future(drain(ws)) for ws in sockets]
            seen: set[str] = set()
            frames = 0
            while len(seen) < clients:
                diff = await watcher.until("presence_diff", timeout=3.0)
                frames += 1
                seen.update(diff["payload"]["joins"])
            assert seen == {f"c{i}" for i in range(clients)}
            assert frames < clients, "a storm's joins were not batched"
            for _ in range(100):
                if "reconnect storm is over" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert "reconnect storm begins" in caplog.text
            assert "reconnect storm is over" in caplog.text
            started = time.monotonic()
            await sockets[0].close()  # after the storm a leave goes out at once
            leave = await watcher.until("presence_diff")
            assert list(leave["payload"]["leaves"]) == ["c0"]
            assert time.monotonic() - started < 0.4
            await asyncio.gather(*(ws.close() for ws in sockets[1:]))
            await asyncio.gather(*drains)

    run(main)
