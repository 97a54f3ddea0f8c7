"""Regression tests for the server's hardening: what one client can do to the others.

Each test guards one defect found in `PresenceServer` / `Connection` (its docstring names it).
Everything runs on real loopback sockets against an in-process server: `websockets` clients
where a well-behaved client will do, and `Raw`, a WebSocket client on a bare non-blocking
socket, where the bytes on the wire or the reading (or not reading) must be exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from test_server import Client, run, serving
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from presence_core import Limits, Tracker
from presence_core import audit as audit_module
from presence_core.metrics import Metrics
from presence_core.server import PresenceServer, ServerLimits
from presence_core.server import connection as connection_module
from presence_core.server import server as server_module
from presence_core.server.connection import Connection

SLOW = ServerLimits(max_buffered_bytes=1 << 16, broadcasts_per_second=100_000.0)
"""Limits under which a client that stops reading is cut after 64 KiB of unread frames."""


# -- helpers -----------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def server_side(server: PresenceServer, address: Any) -> Connection:
    """The server's open `Connection` for the client socket bound to ``address``."""
    for conn in list(server.core.sessions.values()):
        transport = conn.transport
        if transport is not None and transport.get_extra_info("peername") == address:
            return conn
    raise AssertionError(f"the server has no open connection from {address}")


def socket_ids(server: PresenceServer) -> set[int]:
    """Ids of the connections the server still holds in any way."""
    return {conn.id for conn in list(server._sockets)} | set(server.core.sessions)


def parse(raw: str | bytes) -> dict[str, Any]:
    """A text frame from the server as a v1-shaped dict (v2 arrays are unpacked)."""
    data = json.loads(raw)
    if isinstance(data, list):
        return dict(zip(("join_ref", "ref", "topic", "event", "payload"), data, strict=True))
    return data  # type: ignore[no-any-return]


def v2_push(join_ref: str | None, ref: str, topic: str, event: str, payload: Any) -> str:
    return json.dumps([join_ref, ref, topic, event, payload])


async def tcp(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking socket connected to the server (``rcvbuf``: its receive buffer)."""
    sock = socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


class Raw:
    """A WebSocket client on a bare socket: it writes exactly the bytes it is given and reads
    only when asked, so a `Raw` that is never read fills its kernel buffers."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self.frames: list[Frame] = []  # received, in order
        self.eof = False

    @classmethod
    async def connect(
        cls, server: PresenceServer, vsn: str = "2.0.0", *, rcvbuf: int | None = None
    ) -> Raw:
        sock = await tcp(server.port, rcvbuf)
        url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn={vsn}"
        protocol = ClientProtocol(parse_uri(url))
        protocol.send_request(protocol.connect())
        raw = cls(sock, protocol)
        try:
            await raw.send(b"".join(protocol.data_to_send()))
            while protocol.state is State.CONNECTING and not raw.eof:
                await raw.read()
            assert protocol.state is State.OPEN, protocol.handshake_exc
        except BaseException:
            raw.close()
            raise
        return raw

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def frame(self, text: str) -> bytes:
        """A masked text frame around ``text``, built but not sent."""
        self.protocol.send_text(text.encode())
        return b"".join(self.protocol.data_to_send())

    async def send(self, *chunks: bytes) -> None:
        """Write ``chunks`` in one go (one segment, for what fits in one)."""
        await asyncio.get_running_loop().sock_sendall(self.sock, b"".join(chunks))

    async def read(self, timeout: float = 5.0) -> None:
        """One read from the socket, parsed into `frames` (or `eof`)."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), timeout)
        except ConnectionResetError:
            data = b""
        if data:
            self.protocol.receive_data(data)
        elif not self.eof:
            self.eof = True
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self.frames.append(event)
        self.protocol.data_to_send()  # what it would answer (a close frame): not sent

    def texts(self) -> list[dict[str, Any]]:
        return [parse(bytes(f.data)) for f in self.frames if f.opcode is Opcode.TEXT]

    async def until_closed(self, timeout: float = 5.0) -> Close | None:
        """The server's close frame, or None if the socket ended without one."""
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.frames:
                if frame.opcode is Opcode.CLOSE:
                    return Close.parse(bytes(frame.data))
            if self.eof:
                return None
            await self.read(max(0.01, deadline - time.monotonic()))

    def close(self) -> None:
        self.sock.close()


async def slow_member(server: PresenceServer, topic: str, join_ref: str = "1") -> Raw:
    """A client that joins ``topic`` and then never reads.

    Its receive buffer is small, and so is the server's send buffer for it: loopback grows send
    buffers up to megabytes, which would take megabytes of frames to fill before the server
    holds any of its own.
    """
    raw = await Raw.connect(server, rcvbuf=4096)
    try:
        conn = server_side(server, raw.address)
        sock = conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        join = {"config": {"presence": {"key": "slow"}}}
        await raw.send(raw.frame(v2_push(join_ref, join_ref, topic, "phx_join", join)))
        assert await eventually(
            lambda: conn.id in getattr(server.core.topics.get(topic), "members", ())
        )
    except BaseException:
        raw.close()
        raise
    return raw


async def fill_until_cut(server: PresenceServer, talker: Client, conn_id: int) -> None:
    """Broadcast 8 KB at a time from ``talker`` (joined with ``ack``) until the server cuts
    ``conn_id``, a member that never reads."""
    body = {"type": "broadcast", "event": "fill", "payload": "x" * 8000}
    for _ in range(60):
        ref = await talker.push("room", "broadcast", body)
        assert (await talker.until("phx_reply", timeout=5.0))["ref"] == ref
        if conn_id not in server.core.sessions:
            return
    raise AssertionError("the slow reader was never cut")


async def http_exchange(
    port: int, request: bytes, *, answers: int = 1, timeout: float = 5.0
) -> list[tuple[int, bytes]]:
    """Write ``request`` (raw bytes) and read up to ``answers`` responses, or until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses: list[tuple[int, bytes]] = []
    try:
        writer.write(request)
        buffer = b""
        deadline = time.monotonic() + timeout
        while len(responses) < answers:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = buffer[:end].decode("latin-1").split("\r\n")
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(buffer) >= end + 4 + length:
                    responses.append((int(head[0].split()[1]), buffer[end + 4 : end + 4 + length]))
                    buffer = buffer[end + 4 + length :]
                    continue
            try:
                remaining = max(0.01, deadline - time.monotonic())
                chunk = await asyncio.wait_for(reader.read(1 << 16), remaining)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return responses


async def get(port: int, path: str, headers: bytes = b"") -> tuple[int, bytes]:
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), headers)
    responses = await http_exchange(port, request)
    assert responses, f"GET {path}: no answer"
    return responses[0]


async def collect(client: Client, inbox: list[dict[str, Any]]) -> None:
    """Read everything ``client`` receives into ``inbox``, until it closes."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in client.ws:
            inbox.append(parse(raw))


@dataclass
class Crowd:
    sender: Client
    sender_join: str
    readers: list[Client]
    inboxes: list[list[dict[str, Any]]]
    slow: Raw
    slow_id: int


@asynccontextmanager
async def crowd(server: PresenceServer, topic: str = "room") -> AsyncIterator[Crowd]:
    """A topic of 20: a sender, 9 readers, a client that never reads, 9 more readers.

    The readers' messages are read as they come, by a task each.
    """
    url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0"
    async with AsyncExitStack() as stack:

        async def member(name: str) -> tuple[Client, str]:
            ws = await stack.enter_async_context(connect(url, max_queue=None))
            client = Client(ws, 2)
            return client, await client.join(topic, name)

        sender, sender_join = await member("sender")
        readers = [(await member(f"r{i}"))[0] for i in range(9)]
        slow = await slow_member(server, topic)
        stack.callback(slow.close)
        slow_id = server_side(server, slow.address).id
        readers += [(await member(f"r{i}"))[0] for i in range(9, 18)]
        inboxes: list[list[dict[str, Any]]] = [[] for _ in readers]
        tasks = [
            asyncio.ensure_future(collect(r, box)) for r, box in zip(readers, inboxes, strict=True)
        ]

        async def stop_tasks() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        stack.push_async_callback(stop_tasks)
        yield Crowd(sender, sender_join, readers, inboxes, slow, slow_id)


# -- 1. a slow reader cut during a fan-out -----------------------------------------------------


def broadcast_seqs(inbox: list[dict[str, Any]]) -> list[int]:
    return [m["payload"]["payload"]["seq"] for m in inbox if m["event"] == "broadcast"]


def diff_seqs(inbox: list[dict[str, Any]]) -> list[int]:
    joins = [m["payload"]["joins"] for m in inbox if m["event"] == "presence_diff"]
    return [j["sender"]["metas"][0]["seq"] for j in joins if "sender" in j]


def caught_up(
    c: Crowd, seqs: Callable[[list[dict[str, Any]]], list[int]], seq: int
) -> Callable[[], bool]:
    """Whether every reader's last event is number ``seq``."""
    return lambda: all(seqs(box)[-1:] == [seq] for box in c.inboxes)


async def until_cut(
    server: PresenceServer,
    c: Crowd,
    send: Callable[[int], Any],
    seqs: Callable[[list[dict[str, Any]]], list[int]],
) -> int:
    """Send numbered events one at a time until the slow member is cut (and 3 more); returns
    how many were sent.  Each waits for every reader, so no reader ever lags: only the slow
    member's unread bytes grow."""
    sent = after_cut = 0
    while after_cut < 3 and sent < 60:
        await send(sent)
        sent += 1
        if not await eventually(caught_up(c, seqs, sent - 1), 3.0):
            break  # a reader missed it: the assertions say which
        if c.slow_id not in server.core.sessions:
            after_cut += 1
    return sent


def test_a_slow_reader_cut_during_a_broadcast_costs_the_others_nothing() -> None:
    """Cutting a slow reader while a broadcast walks the topic's members once raised
    "dictionary changed size during iteration": the sender's socket died and the members after
    the slow one missed the broadcast."""

    async def main() -> None:
        async with serving(limits=SLOW) as server, crowd(server) as c:

            async def send(seq: int) -> None:
                body = {"type": "broadcast", "event": "tick", "payload": {"seq": seq}}
                body["payload"]["pad"] = "x" * 8000  # type: ignore[index]
                await c.sender.push("room", "broadcast", body, c.sender_join)

            sent = await until_cut(server, c, send, broadcast_seqs)
            assert c.slow_id not in server.core.sessions, "the slow reader was never cut"
            for i, box in enumerate(c.inboxes):
                assert broadcast_seqs(box) == list(range(sent)), f"reader {i}"
            ref = await c.sender.push("phoenix", "heartbeat", {})
            assert (await c.sender.until("phx_reply", timeout=5.0))["ref"] == ref

    run(main)


def test_a_slow_reader_cut_during_a_diff_costs_the_others_nothing() -> None:
    """The same cut during a presence diff's fan-out: the members after the slow one missed
    that diff (the hook's error was logged and the walk abandoned)."""
    big = Limits(max_meta_bytes=16384, rate_per_second=1000.0, burst=1000)

    async def main() -> None:
        tracker = Tracker(plans={"default": big})
        async with serving(tracker=tracker, limits=SLOW) as server, crowd(server) as c:

            async def send(seq: int) -> None:
                track = {"event": "track", "payload": {"seq": seq, "pad": "x" * 4000}}
                await c.sender.push("room", "presence", track, c.sender_join)

            sent = await until_cut(server, c, send, diff_seqs)
            assert c.slow_id not in server.core.sessions, "the slow reader was never cut"
            for i, box in enumerate(c.inboxes):
                assert diff_seqs(box) == list(range(sent)), f"reader {i}"

    run(main)


# -- 2. a closed connection is freed by reference counting -------------------------------------


def gc_tracked(conn_id: int) -> bool:
    """Whether a `Connection` with this id still exists (garbage in a cycle included)."""
    return any(isinstance(o, Connection) and o.id == conn_id for o in gc.get_objects())


@pytest.mark.parametrize("end", ["closed by its client", "cut as a slow reader"])
def test_a_closed_connection_is_freed_without_the_garbage_collector(end: str) -> None:
    """A connection that ended stayed in a reference cycle (its Sans-I/O protocol and the
    parser generator that refers back to it) until a full collection; with `gc.freeze` or a
    rare collection, every closed socket's state stayed in memory."""

    async def main() -> None:
        async with serving(limits=SLOW) as server, Client.open(server) as talker:
            await talker.join("room", "talker", broadcast={"ack": True})
            if end == "closed by its client":
                async with Client.open(server) as client:
                    await client.join("room", "c")
                    conn = server_side(server, client.ws.local_address)
                    conn_id, ws = conn.id, weakref.ref(conn.ws)
                    del conn
                    assert gc_tracked(conn_id)
            else:
                slow = await slow_member(server, "room")
                try:
                    conn = server_side(server, slow.address)
                    conn_id, ws = conn.id, weakref.ref(conn.ws)
                    del conn
                    await fill_until_cut(server, talker, conn_id)
                finally:
                    slow.close()
            assert await eventually(lambda: conn_id not in socket_ids(server))
            await asyncio.sleep(0.05)  # the transport's last callbacks
            assert ws() is None, "the connection's protocol is only freed by a collection"
            assert not gc_tracked(conn_id), "the connection is only freed by a collection"

    gc.collect()
    gc.disable()
    try:
        run(main)
    finally:
        gc.enable()


def test_a_socket_timed_out_in_its_handshake_is_freed_without_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for a socket cut for never finishing its handshake."""
    monkeypatch.setattr(connection_module, "OPEN_TIMEOUT", 0.2)

    async def main() -> None:
        async with serving() as server:
            sock = await tcp(server.port)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, b"GET /socket/websocket")
                address = sock.getsockname()

                def find() -> list[Connection]:
                    return [
                        o
                        for o in gc.get_objects()
                        if isinstance(o, Connection)
                        and o.transport is not None
                        and o.transport.get_extra_info("peername") == address
                    ]

                assert await eventually(find)
                conn_id, ws = find()[0].id, weakref.ref(find()[0].ws)
                data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 99), 5)
                assert data == b""  # cut
            finally:
                sock.close()
            assert await eventually(lambda: ws() is None and not gc_tracked(conn_id), 1.0), (
                "the connection is only freed by a collection"
            )

    gc.collect()
    gc.disable()
    try:
        run(main)
    finally:
        gc.enable()


# -- 3. frames that are not Phoenix messages ---------------------------------------------------


@pytest.mark.parametrize(
    ("vsn", "frame"),
    [
        ("2.0.0", "{not json"),
        ("2.0.0", "42"),
        ("2.0.0", '[null,"1","room","phx_join"]'),  # a v2 push of the wrong arity
        ("1.0.0", '{"event":"heartbeat","payload":{},"ref":"1"}'),  # a v1 push without topic
    ],
)
def test_a_frame_that_is_not_a_phoenix_message_closes_with_1007(
    vsn: str, frame: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage frames were dropped silently, and each still counted as a heartbeat: a socket
    could stay connected (and keep its presences) sending nothing valid, unseen in the logs."""
    audit_module.reset()
    caplog.set_level(logging.INFO, logger="presence_core.audit")

    async def main() -> None:
        async with serving() as server, Client.open(server, vsn) as c:
            await c.ws.send(frame)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(c.ws.recv(), 5.0)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1007
            assert closed.value.rcvd.reason

    run(main)
    events = [getattr(r, "audit", {}).get("event") for r in caplog.records]
    assert "protocol_error" in events or any(
        getattr(r, "audit", {}).get("reason") == "protocol_error" for r in caplog.records
    ), events


# -- 4. a socket's message rate ----------------------------------------------------------------


def test_a_flood_of_frames_is_answered_at_the_message_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socket could have any number of frames handled at once: 2,000 heartbeats in one write
    were all answered in one go while everyone else waited."""
    # The flooder's frames are still being read, 50 a second, when the server stops: it does
    # not see that socket end, and waits out its closing handshake.
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.2)
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT", 0.2)

    async def main() -> None:
        limits = ServerLimits(messages_per_second=50.0)
        async with serving(limits=limits) as server, Client.open(server) as other:
            flooder = await Raw.connect(server)
            try:
                frames = [
                    flooder.frame(v2_push(None, str(i), "phoenix", "heartbeat", {}))
                    for i in range(2000)
                ]
                await flooder.send(*frames)
                started = time.monotonic()

                async def count_for_a_second() -> int:
                    while (left := started + 1.0 - time.monotonic()) > 0:
                        with contextlib.suppress(TimeoutError):
                            await flooder.read(left)
                        if flooder.eof:
                            break
                    return sum(m["event"] == "phx_reply" for m in flooder.texts())

                counting = asyncio.ensure_future(count_for_a_second())
                ref = await other.push("phoenix", "heartbeat", {})
                assert (await other.until("phx_reply", timeout=5.0))["ref"] == ref
                answered = await counting
                assert answered <= 50 + 50 + 10, f"{answered} answered in the first second"
                before = len(flooder.frames)
                while len(flooder.frames) == before and not flooder.eof:
                    await flooder.read(5.0)
                assert not flooder.eof, "the flooder was disconnected"
                assert all(f.opcode is not Opcode.CLOSE for f in flooder.frames)
            finally:
                flooder.close()

    run(main)


# -- 5. unknown events -------------------------------------------------------------------------


def test_an_unknown_event_on_a_joined_topic_gets_an_error_reply() -> None:
    """An unknown event was answered ``ok``, as if the server had done something with it."""

    async def main() -> None:
        async with serving() as server, Client.open(server) as c:
            jr = await c.join("room", "a")
            ref = await c.push("room", "no_such_event", {"x": 1}, jr)
            reply = await c.until("phx_reply")
            assert reply["ref"] == ref
            assert reply["payload"]["status"] == "error"
            reason = reply["payload"]["response"]["reason"]
            assert isinstance(reason, str) and reason

    run(main)


# -- 6. fragments ------------------------------------------------------------------------------


def test_a_message_of_too_many_fragments_closes_with_1009() -> None:
    """Empty continuation frames grew a message's fragment list without bound (max_size counts
    bytes, and they have none)."""

    async def main() -> None:
        async with serving() as server:
            raw = await Raw.connect(server)
            try:
                raw.protocol.send_text(b"[", fin=False)
                for _ in range(ServerLimits().max_fragments + 6):
                    raw.protocol.send_continuation(b"", fin=False)
                await raw.send(*raw.protocol.data_to_send())
                close = await raw.until_closed()
                assert close is not None and close.code == 1009, close
            finally:
                raw.close()

    run(main)


# -- 7. broadcasts: bytes as sent, bounded by max_frame_bytes ---------------------------------


def user_broadcast_push(
    join_ref: str, ref: str, topic: str, event: str, payload: bytes, *, json_payload: bool = True
) -> bytes:
    """realtime-js's binary broadcast push (kind 3)."""
    parts = [join_ref.encode(), ref.encode(), topic.encode(), event.encode(), b""]  # metadata
    head = bytes([3, *(len(p) for p in parts), 1 if json_payload else 0])
    return head + b"".join(parts) + payload


async def next_broadcast(client: Client, timeout: float = 5.0) -> str | bytes:
    """The next broadcast ``client`` receives, as sent: bytes (a binary frame) or text."""
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(client.ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(raw, bytes) or parse(raw)["event"] == "broadcast":
            return raw


@asynccontextmanager
async def broadcast_audience(server: PresenceServer) -> AsyncIterator[dict[str, Any]]:
    """A sender and three members: realtime-js (v2, with a config), the Python client (v1)
    and phoenix.js (v2, joined without a config)."""
    async with (
        Client.open(server) as sender,
        Client.open(server) as js,
        Client.open(server, "1.0.0") as py,
        Client.open(server) as phoenix,
    ):
        jr = await sender.join("room", "sender", broadcast={"ack": True})
        await js.join("room", "js")
        await py.join("room", "py")
        ref = await phoenix.push("room", "phx_join", {})
        reply = await phoenix.until("phx_reply")
        assert reply["ref"] == ref and reply["payload"]["status"] == "ok", reply
        yield {"sender": sender, "jr": jr, "js": js, "py": py, "phoenix": phoenix}


def test_a_binary_broadcast_reaches_every_client_with_its_bytes_as_sent() -> None:
    """A realtime-js binary broadcast was decoded and re-encoded as text: its bytes were not
    what was sent (``1e9`` became ``1000000000.0``).  It is relayed as text to every client
    (phoenix.js reads no binary broadcast, and a socket does not say which client it is), with
    the JSON payload's bytes as they came."""
    payload = b'{"n":1e9,"s":"x"}'

    async def main() -> None:
        async with serving() as server, broadcast_audience(server) as a:
            await a["sender"].ws.send(user_broadcast_push(a["jr"], "9", "room", "wave", payload))
            for name in ("js", "py", "phoenix"):
                text = await next_broadcast(a[name])
                assert isinstance(text, str), name
                assert payload.decode() in text, (name, text)
                body = parse(text)["payload"]
                assert body == {
                    "type": "broadcast",
                    "event": "wave",
                    "payload": {"n": 1e9, "s": "x"},
                }

    run(main)


def test_a_text_broadcast_payload_is_relayed_verbatim() -> None:
    """A text broadcast was decoded and re-encoded: ``1e9`` reached the members as
    ``1000000000.0``."""

    async def main() -> None:
        async with serving() as server, broadcast_audience(server) as a:
            body = '{"type":"broadcast","event":"e","payload":{"n":1e9}}'
            await a["sender"].ws.send(f'[{json.dumps(a["jr"])},"7","room","broadcast",{body}]')
            for name in ("py", "phoenix"):
                text = await next_broadcast(a[name])
                assert isinstance(text, str) and '{"n":1e9}' in text, (name, text)

    run(main)


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_a_broadcast_too_large_to_relay_is_refused(kind: str) -> None:
    """A broadcast within max_frame_bytes could be relayed as a frame over it (the relay wraps
    it): members got frames larger than any the server would accept."""
    limit = 1024

    async def main() -> None:
        limits = ServerLimits(max_frame_bytes=limit)
        async with (
            serving(limits=limits) as server,
            Client.open(server) as sender,
            Client.open(server, "1.0.0") as member,
        ):
            jr = await sender.join("room", "sender", broadcast={"ack": True})
            await member.join("room", "member")
            if kind == "binary":
                pad = b"x" * (limit - 60)
                frame: str | bytes = user_broadcast_push(jr, "8", "room", "e", b'{"s":"%s"}' % pad)
            else:
                head = f'[{json.dumps(jr)},"8","room","broadcast",'
                body = '{"type":"broadcast","event":"e","payload":{"s":"%s"}}]'
                frame = head + body % ("x" * (limit - 12 - len(head + body)))
            # It fits in a frame; the member's frame around it (v1: ref, topic...) would not.
            assert limit - 40 < len(frame) <= limit - 10, len(frame)
            await sender.ws.send(frame)
            reply = await sender.until("phx_reply", timeout=5.0)
            assert reply["ref"] == "8" and reply["payload"]["status"] == "error", reply
            reason = reply["payload"]["response"]["reason"]
            assert re.search(r"max_frame_bytes|size|too (large|big)|bytes", reason, re.I), reason
            small = {"type": "broadcast", "event": "small", "payload": {}}
            await sender.push("room", "broadcast", small, jr)
            got = await member.until("broadcast", timeout=5.0)
            assert got["payload"]["event"] == "small", "the large broadcast was relayed"

    run(main)


# -- 8. a frame in the handshake's segment -----------------------------------------------------


def test_a_frame_sent_with_the_upgrade_is_answered_after_the_101() -> None:
    """The reply to a frame that came in the same segment as the upgrade request was written
    before the 101: the client read a WebSocket frame where it expected HTTP."""

    async def main() -> None:
        async with serving() as server:
            protocol = ClientProtocol(parse_uri(server.url + "?vsn=2.0.0"))
            protocol.send_request(protocol.connect())
            handshake = b"".join(protocol.data_to_send())
            heartbeat = v2_push(None, "1", "phoenix", "heartbeat", {}).encode()
            frame = Frame(Opcode.TEXT, heartbeat).serialize(mask=True)
            raw = Raw(await tcp(server.port), protocol)
            try:
                await raw.send(handshake + frame)
                data = b""
                loop = asyncio.get_running_loop()
                while len(data) < 12:
                    chunk = await asyncio.wait_for(loop.sock_recv(raw.sock, 1 << 16), 5.0)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 101 "), data[:40]
                protocol.receive_data(data)
                raw.frames = [e for e in protocol.events_received() if isinstance(e, Frame)]
                while not raw.texts():
                    await raw.read()
                reply = raw.texts()[0]
                assert reply["ref"] == "1" and reply["payload"]["status"] == "ok", reply
            finally:
                raw.close()

    run(main)


# -- 9, 10. HTTP edge cases and the dashboard token ------------------------------------------


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_repeated_authorization_header_gets_400(caplog: pytest.LogCaptureFixture) -> None:
    """Two Authorization headers made the token check raise inside ``data_received``: the
    socket died with a traceback in the log instead of an answer."""

    async def main() -> None:
        async with serving(dashboard_token="s3cret") as server:
            headers = b"Authorization: Bearer s3cret\r\nAuthorization: Bearer other\r\n"
            status, _ = await get(server.port, "/api/dashboard", headers)
            assert status == 400

    run(main)
    assert errors_logged(caplog) == []


def test_pipelined_requests_get_answers_not_a_dropped_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two requests in one segment: both answered, or the second refused with 400; never the
    connection dropped with a traceback."""

    async def main() -> None:
        async with serving() as server:
            request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            responses = await http_exchange(server.port, request * 2, answers=2)
            statuses = [status for status, _ in responses]
            assert statuses in ([200, 200], [200, 400], [400]), statuses

    run(main)
    assert errors_logged(caplog) == []


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Authorization: Bearer p\xc3\xa4ss", 200),  # UTF-8 on the wire
        (b"authorization: bearer p\xc3\xa4ss", 200),  # the scheme is case-insensitive
        (b"Authorization: Bearer pass", 401),
    ],
)
def test_a_non_ascii_dashboard_token_in_a_header(header: bytes, status: int) -> None:
    """The header's bytes were compared as websockets decodes them (Latin-1 surrogates), so a
    non-ASCII token never matched; a lowercase ``bearer`` was not recognised."""

    async def main() -> None:
        async with serving(dashboard_token="päss") as server:
            got, body = await get(server.port, "/api/dashboard", header + b"\r\n")
            assert got == status, body

    run(main)


# -- 11, 12. joins the Tracker refuses ---------------------------------------------------------


def test_a_join_of_a_topic_the_tracker_refuses_gets_an_error_and_leaves_nothing() -> None:
    """A topic the Tracker refuses (too long, empty) got no reply at all, and the half-made
    channel stayed, counted against max_topics_per_connection."""

    async def main() -> None:
        limits = ServerLimits(max_topics_per_connection=2)
        async with serving(limits=limits) as server, Client.open(server) as c:
            for topic in ("x" * 300, ""):
                ref = await c.push(topic, "phx_join", {"config": {}})
                reply = await c.until("phx_reply", timeout=5.0)
                assert reply["ref"] == ref and reply["payload"]["status"] == "error", reply
                reason = reply["payload"]["response"]["reason"]
                assert isinstance(reason, str) and reason
                assert topic not in server.core.topics
            await c.join("a", "k")
            await c.join("b", "k")

    run(main)


def test_a_join_with_a_presence_key_over_the_limit_gets_an_error_and_tracks_nothing() -> None:
    """A presence key the Tracker refuses was accepted at the join; its tracks then failed."""

    async def main() -> None:
        async with serving() as server, Client.open(server) as c:
            ref = await c.push("room", "phx_join", {"config": {"presence": {"key": "k" * 10_000}}})
            reply = await c.until("phx_reply", timeout=5.0)
            assert reply["ref"] == ref and reply["payload"]["status"] == "error", reply
            track = {"event": "track", "payload": {}}
            await c.push("room", "presence", track, ref)
            assert (await c.until("phx_reply"))["payload"]["status"] == "error"
            assert server.tracker.totals().presences == 0
            assert "room" not in server.core.topics

    run(main)


# -- 13. a rejoin on a socket being cut --------------------------------------------------------


def test_a_join_after_a_protocol_error_in_the_same_segment_does_not_register() -> None:
    """Frames read after the one that got the socket closed must not make channels: a dead
    connection left in a topic's members stays there."""

    async def main() -> None:
        async with serving() as server, Client.open(server) as keeper:
            await keeper.join("room", "keeper")
            raw = await Raw.connect(server)
            try:
                join = {"config": {"presence": {"key": "r"}}}
                await raw.send(raw.frame(v2_push("1", "1", "room", "phx_join", join)))
                while not any(m["event"] == "phx_reply" for m in raw.texts()):
                    await raw.read()
                conn_id = server_side(server, raw.address).id
                rejoin = raw.frame(v2_push("2", "2", "room", "phx_join", join))
                await raw.send(raw.frame("{not json"), rejoin)
                close = await raw.until_closed()
                assert close is not None and close.code == 1007, close
                assert await eventually(lambda: conn_id not in server.core.sessions)
                await asyncio.sleep(0.05)
                members = server.core.topics["room"].members
                assert conn_id not in members
                assert all(m.open for m in members.values())
            finally:
                raw.close()

    run(main)


def test_a_rejoin_whose_writes_cut_the_socket_does_not_register() -> None:
    """A rejoin first closes the old channel; when that phx_close pushed a slow reader over
    max_buffered_bytes, the socket was cut (and dropped from the topic) and then the join went
    on and registered the dead connection as a member of the topic, for good."""
    high = SLOW.max_buffered_bytes
    old_ref = "j" * 200  # the old join_ref: the phx_close a rejoin sends carries it twice

    async def main() -> None:
        async with serving(limits=SLOW) as server, Client.open(server) as talker:
            await talker.join("room", "talker", broadcast={"ack": True})
            slow = await slow_member(server, "room", join_ref=old_ref)
            try:
                conn = server_side(server, slow.address)
                conn_id, transport = conn.id, conn.transport
                assert transport is not None
                del conn

                async def cast(pad: int) -> None:
                    body = {"type": "broadcast", "event": "fill", "payload": "x" * pad}
                    ref = await talker.push("room", "broadcast", body)
                    assert (await talker.until("phx_reply"))["ref"] == ref

                # Fill the kernel's buffers, then the server's own to just under the limit.
                for _ in range(100):
                    await cast(4000)
                    if transport.get_write_buffer_size():
                        break
                await asyncio.sleep(0.05)
                before = transport.get_write_buffer_size()
                await cast(1000)
                overhead = transport.get_write_buffer_size() - before - 1000
                assert 0 < overhead < 200, overhead  # the kernel holds nothing more
                target = high - 100
                while (room := target - transport.get_write_buffer_size()) >= overhead + 40:
                    await cast(min(4000, room - overhead))
                buffered = transport.get_write_buffer_size()
                assert high - 2 * len(old_ref) < buffered <= high, buffered
                assert conn_id in server.core.sessions
                rejoin = v2_push("r", "r", "room", "phx_join", {"config": {}})
                await slow.send(slow.frame(rejoin))
                assert await eventually(lambda: conn_id not in server.core.sessions), "never cut"
                await asyncio.sleep(0.05)
                members = server.core.topics["room"].members
                assert conn_id not in members, "the cut connection is a member of the topic"
                assert all(m.open for m in members.values())
            finally:
                slow.close()

    run(main)


# -- 14. what makes a reconnect storm ----------------------------------------------------------


HANDSHAKE = (
    b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def sample_storm(server: PresenceServer, samples: list[bool]) -> None:
    while True:
        samples.append(server.core.storm)
        await asyncio.sleep(0.01)


async def storm_while(
    server: PresenceServer,
    arrive: Callable[[int], Awaitable[None]],
    then: Callable[[list[bool]], Awaitable[object]],
) -> list[bool]:
    """``server.core.storm`` every 10 ms while 400 ``arrive(i)`` run, 50 at a time, and while
    ``then(samples)`` runs after them."""
    samples: list[bool] = []
    sampler = asyncio.ensure_future(sample_storm(server, samples))
    gate = asyncio.Semaphore(50)

    async def gated(i: int) -> None:
        async with gate:
            await arrive(i)

    try:
        await asyncio.gather(*(gated(i) for i in range(400)))
        await then(samples)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return samples


async def settle(samples: list[bool]) -> None:
    await asyncio.sleep(0.5)


def test_handshakes_closed_at_once_are_no_reconnect_storm() -> None:
    """Every handshake counted towards a reconnect storm, so 400 probes (load balancers, port
    scans, clients giving up) stretched every diff to the storm's 0.5 s."""

    async def main() -> None:
        async with serving() as server:

            async def probe(i: int) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                try:
                    writer.write(HANDSHAKE)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                    assert head.startswith(b"HTTP/1.1 101 ")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

            samples = await storm_while(server, probe, settle)
            assert samples and not any(samples), f"storm on in {sum(samples)} samples"

    run(main)


def test_sockets_that_join_and_stay_make_a_reconnect_storm() -> None:
    """The other side: 400 sockets that connect, join and stay do make a storm."""

    async def main() -> None:
        async with serving() as server, AsyncExitStack() as stack:
            join = {"config": {"presence": {"key": "k"}}}

            async def arrive(i: int) -> None:
                raw = await Raw.connect(server)
                stack.callback(raw.close)
                await raw.send(raw.frame(v2_push("1", "1", f"room{i % 20}", "phx_join", join)))

            async def storm_begins(samples: list[bool]) -> None:
                await eventually(lambda: any(samples), 1.0)

            samples = await storm_while(server, arrive, storm_begins)
            assert any(samples), "400 joining sockets made no storm"

    run(main)


# -- 15. connections per address ---------------------------------------------------------------


def test_max_connections_per_ip_refuses_with_429_until_one_closes() -> None:
    """ServerLimits.max_connections_per_ip was not enforced."""

    async def main() -> None:
        limits = ServerLimits(max_connections_per_ip=3)
        url_of = "ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0".format
        async with serving(limits=limits) as server, AsyncExitStack() as stack:
            url = url_of(server.port)
            sockets = [await stack.enter_async_context(connect(url)) for _ in range(3)]
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 429
            await sockets[0].close()
            assert await eventually(lambda: server.connections == 2)
            async with connect(url) as ws:
                c = Client(ws, 2)
                ref = await c.push("phoenix", "heartbeat", {})
                assert (await c.until("phx_reply"))["ref"] == ref

    run(main)


# -- 16. the audit log's rate ------------------------------------------------------------------


def test_an_audit_flood_is_capped_and_what_it_held_back_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every refused join wrote an audit record: one socket could write thousands a second."""
    audit_module.reset()
    caplog.set_level(logging.INFO, logger="presence_core.audit")

    def records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "presence_core.audit"]

    async def main() -> None:
        limits = ServerLimits(joins_per_second=1.0, messages_per_second=100_000.0)
        async with serving(limits=limits) as server, Client.open(server) as c:
            await c.join("t", "a")
            for i in range(5000):
                await c.ws.send(v2_push(None, f"j{i}", "t", "phx_join", {"config": {}}))
            ref = await c.push("phoenix", "heartbeat", {})
            while (await c.until("phx_reply", timeout=10.0))["ref"] != ref:
                pass
            assert len(records()) <= 60, f"{len(records())} audit records"

            def suppressed() -> bool:
                return any(getattr(r, "audit", {}).get("suppressed") for r in records())

            deadline = time.monotonic() + 5.0
            while not suppressed() and time.monotonic() < deadline:
                await c.push("t", "phx_join", {"config": {}})  # refused: the join rate
                await asyncio.sleep(0.25)
            assert suppressed(), "no record says how many were suppressed"

    run(main)
    assert len(records()) <= 60, f"{len(records())} audit records"


# -- 17. the per-key meta limit names itself ---------------------------------------------------


def test_a_track_over_max_metas_per_key_names_that_limit() -> None:
    """A track refused by max_metas_per_key was reported as "Client presence rate limit
    exceeded": the client (and its developer) were told the wrong limit."""

    async def main() -> None:
        tracker = Tracker(plans={"default": Limits(max_metas_per_key=3)})
        async with serving(tracker=tracker) as server, AsyncExitStack() as stack:
            for i in range(4):
                c = await stack.enter_async_context(Client.open(server))
                jr = await c.join("room", "alice")
                ref = await c.push("room", "presence", {"event": "track", "payload": {"i": i}}, jr)
                while True:
                    msg = await c.recv(5.0)
                    if msg["event"] == "system" or (
                        msg["event"] == "phx_reply" and msg["ref"] == ref
                    ):
                        break
                if i < 3:
                    assert msg["event"] == "phx_reply" and msg["payload"]["status"] == "ok"
                else:
                    text = json.dumps(msg["payload"])
                    assert "max_metas_per_key" in text, text
                    assert "Client presence rate limit exceeded" not in text
            assert len(server.tracker.list("room")["alice"]["metas"]) == 3

    run(main)


# -- 18. health --------------------------------------------------------------------------------


def test_health_live_ready_and_redis() -> None:
    """/health/live and /health/ready did not exist (orchestrators need both), and /health did
    not say whether Redis is in use."""

    async def main() -> None:
        async with serving() as server:
            assert (await get(server.port, "/health/live"))[0] == 200
            assert (await get(server.port, "/health/ready"))[0] == 200
            status, body = await get(server.port, "/health")
            assert status == 200
            health = json.loads(body)
            assert "redis" in health and health["redis"] is None

    run(main)


def test_a_draining_server_is_not_ready_and_still_serves() -> None:
    """begin_drain: /health/ready answers 503 (the load balancer stops sending clients) while
    the server still serves the ones it has."""

    async def main() -> None:
        async with serving() as server, Client.open(server) as c:
            await c.join("room", "a")
            server.begin_drain()
            assert (await get(server.port, "/health/ready"))[0] == 503
            assert (await get(server.port, "/health/live"))[0] == 200
            ref = await c.push("phoenix", "heartbeat", {})
            assert (await c.until("phx_reply"))["ref"] == ref

    run(main)


# -- 19. disconnects by reason -----------------------------------------------------------------


def test_disconnects_are_counted_by_reason() -> None:
    """Connections the server ended itself were not counted: presence_disconnects_total had no
    samples for slow readers, protocol errors or silent connections."""

    async def main() -> None:
        async with serving(limits=SLOW, ttl=0.5) as server, Client.open(server) as talker:
            await talker.join("room", "talker", broadcast={"ack": True})
            slow = await slow_member(server, "room")
            try:
                await fill_until_cut(server, talker, server_side(server, slow.address).id)
            finally:
                slow.close()
            async with Client.open(server) as bad:
                await bad.ws.send("{not json")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(bad.ws.recv(), 5.0)
            silent = await Raw.connect(server)
            try:
                silent_id = server_side(server, silent.address).id
                for _ in range(300):  # the talker heartbeats; the silent one expires
                    if silent_id not in server.core.sessions:
                        break
                    ref = await talker.push("phoenix", "heartbeat", {})
                    assert (await talker.until("phx_reply"))["ref"] == ref
                    await asyncio.sleep(0.01)
                assert silent_id not in server.core.sessions, "the silent connection never expired"
            finally:
                silent.close()
            server.tracker.sync_metrics()
            metrics = server.tracker.metrics
            assert isinstance(metrics, Metrics)
            text = metrics.to_prometheus().decode()
            for reason in ("slow_reader", "protocol_error", "ttl"):
                pattern = rf'^presence_disconnects_total\{{[^}}]*reason="{reason}"[^}}]*\}} (\S+)$'
                found = re.search(pattern, text, re.M)
                assert found and float(found.group(1)) >= 1, reason

    run(main)


# -- found by the adversarial review of the fixes above ----------------------------------------


@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
def test_a_broadcast_whose_event_is_not_a_string_is_refused(vsn: str) -> None:
    """A broadcast whose event was a number was relayed as is, and realtime-js, which matches
    listeners with ``event.toLocaleLowerCase()``, threw and stopped processing the channel."""

    async def main() -> None:
        async with (
            serving() as server,
            Client.open(server, vsn) as sender,
            Client.open(server) as member,
        ):
            jr = await sender.join("room", "sender")
            await member.join("room", "member")
            for n, event in enumerate([1, {"toString": 1}, None]):
                bad = {"type": "broadcast", "event": event, "payload": {}}
                ref = await sender.push("room", "broadcast", bad, jr)
                reply = await sender.until("phx_reply")
                assert reply["ref"] == ref and reply["payload"]["status"] == "error", (n, reply)
            good = {"type": "broadcast", "event": "fine", "payload": {}}
            await sender.push("room", "broadcast", good, jr)
            got = await member.until("broadcast")
            assert got["payload"]["event"] == "fine", "a broadcast with a bad event was relayed"

    run(main)


def test_a_binary_broadcast_is_checked_before_its_payload_is_read() -> None:
    """A kind-3 push was parsed (JSON) or converted (a binary payload to an array of numbers,
    13 ms a MiB) before its topic, rate and size were checked: a socket sending 1 MiB binary
    frames slowed everyone down though every one was refused."""

    async def main() -> None:
        async with serving() as server, Client.open(server) as sender:
            jr = await sender.join("room", "sender", broadcast={"ack": True})
            # Not a member of "other": refused as such, its body (not JSON) never parsed.
            await sender.ws.send(user_broadcast_push(jr, "5", "other", "e", b"{not json"))
            reply = await sender.until("phx_reply")
            assert reply["ref"] == "5" and reply["payload"]["response"] == {
                "reason": "unmatched topic"
            }
            # A binary payload too large as an array of numbers: refused by its size alone.
            body = bytes(range(256)) * 1200
            push = user_broadcast_push(jr, "6", "room", "e", body, json_payload=False)
            await sender.ws.send(push)
            reply = await sender.until("phx_reply")
            assert reply["ref"] == "6" and reply["payload"]["status"] == "error"
            assert "too large" in reply["payload"]["response"]["reason"]

    run(main)


def test_sockets_before_their_handshake_are_bounded_per_address() -> None:
    """Only completed handshakes were counted: idle TCP connections from one address could
    hold every file descriptor for the open timeout (10 s) and lock everyone out."""

    async def main() -> None:
        limits = ServerLimits(max_connections_per_ip=2)
        async with serving(limits=limits) as server:
            idle = [await tcp(server.port) for _ in range(4)]  # twice the limit: let in
            try:
                extra = await tcp(server.port)
                try:
                    loop = asyncio.get_running_loop()
                    with contextlib.suppress(ConnectionResetError):
                        data = await asyncio.wait_for(loop.sock_recv(extra, 16), 2.0)
                        assert data == b"", data  # cut at once, before any request
                finally:
                    extra.close()
            finally:
                for sock in idle:
                    sock.close()
            assert await eventually(lambda: not server._per_ip)
            async with connect(f"ws://127.0.0.1:{server.port}/socket/websocket") as ws:
                c = Client(ws, 1)
                ref = await c.push("phoenix", "heartbeat", {})
                assert (await c.until("phx_reply"))["ref"] == ref

    run(main)


def test_sockets_that_join_and_leave_at_once_make_no_reconnect_storm() -> None:
    """Sockets that connect, join and close at once, over and over from one client, kept
    storm mode on and every diff at the storm's pace."""

    async def main() -> None:
        async with serving() as server:
            join = {"config": {"presence": {"key": "k"}}}

            async def hit_and_run(i: int) -> None:
                raw = await Raw.connect(server)
                try:
                    await raw.send(raw.frame(v2_push("1", "1", f"room{i % 20}", "phx_join", join)))
                    await raw.read()  # the join's reply: it has joined
                finally:
                    raw.close()

            samples = await storm_while(server, hit_and_run, settle)
            assert samples and not any(samples), f"storm on in {sum(samples)} samples"

    run(main)


def test_a_close_frame_makes_its_presences_leave_at_once() -> None:
    """A client that sent a close frame but kept its TCP connection open stayed present for
    the closing timeout (5 s)."""

    async def main() -> None:
        async with serving() as server, Client.open(server) as watcher:
            await watcher.join("room", "watcher")
            await watcher.until("presence_state")
            raw = await Raw.connect(server)
            try:
                join = {"config": {"presence": {"key": "leaver"}}}
                await raw.send(raw.frame(v2_push("1", "1", "room", "phx_join", join)))
                track = {"event": "track", "payload": {}}
                await raw.send(raw.frame(v2_push("1", "2", "room", "presence", track)))
                joined = await watcher.until("presence_diff")
                assert list(joined["payload"]["joins"]) == ["leaver"]
                raw.protocol.send_close(1000, "bye")
                await raw.send(b"".join(raw.protocol.data_to_send()))
                left = await watcher.until("presence_diff", timeout=1.0)
                assert list(left["payload"]["leaves"]) == ["leaver"]
            finally:
                raw.close()

    run(main)
