"""Hostile clients against the ASGI door (`presence_core.asgi.PresenceApp`) under uvicorn.

Each test here shows one defect an attacker with network access can use (see the docstrings):
they fail until it is fixed.  Everything runs on loopback, in this process; every server, task
and client is stopped however a test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import MutableMapping
from typing import Any

import pytest
import uvicorn
from servers import free_port
from test_asgi import join, track, uvicorn_serving
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from presence_core import Tracker
from presence_core.asgi import PresenceApp, RedactTokens
from presence_core.protocol import PhoenixCore, Session
from presence_core.server import ServerLimits

# The door is the same code over either table: .ci/run runs it once, with the compiled one.
pytestmark = pytest.mark.asgi_door

WAIT = 5.0
IMPLS = ["websockets-sansio", "wsproto"]


def serving(app: Any, exit_within: float = 30.0, **options: Any) -> Any:
    """``app`` under uvicorn on loopback, lifespan on (tests/test_asgi.py's helper)."""
    return uvicorn_serving(app, exit_within, **{"lifespan": "on", **options})


def counting(app: PresenceApp) -> tuple[Any, dict[str, int]]:
    """An ASGI app around ``app`` that counts the WebSocket calls still under way."""
    calls = {"open": 0}

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await app(scope, receive, send)
            return
        calls["open"] += 1
        try:
            await app(scope, receive, send)
        finally:
            calls["open"] -= 1

    return wrapper, calls


async def until(condition: Any, within: float) -> bool:
    """Whether ``condition()`` holds within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


HANDSHAKE = (
    b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def frame(message: Any) -> bytes:
    return Frame(Opcode.TEXT, json.dumps(message).encode()).serialize(mask=True)


# -- the 1012 hand-over ------------------------------------------------------------------------


@pytest.mark.parametrize("ws", IMPLS)
def test_a_client_cannot_leave_ghost_presences_by_closing_with_1012(ws: str) -> None:
    """DEFECT: `PresenceApp.serve` takes any ``websocket.disconnect`` with code 1012 for
    uvicorn's restart, but uvicorn passes on the code of the *client's* close frame too.  Any
    client that closes with 1012 keeps its presences for ``handover_seconds`` (its peers see
    no leave), outside every connection limit: connect, track, close with 1012, again, and one
    address holds as many presences as it has time for, past ``max_connections_per_ip``."""
    app = PresenceApp(
        Tracker(), handover_seconds=30.0, limits=ServerLimits(max_connections_per_ip=1)
    )

    async def main() -> None:
        async with serving(app, ws=ws) as port:
            url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"
            for n in range(4):
                client = await connect(url)
                assert (await join(client, "room", f"ghost{n}"))["status"] == "ok"
                await track(client, "room", {"n": n})
                await client.close(code=1012)  # "service restart", from the client
            assert await until(lambda: app.connections == 0, WAIT)
            left = await until(lambda: not app.tracker.list("room"), 2.0)
            assert left, f"ghosts of closed sockets: {sorted(app.tracker.list('room'))}"

    asyncio.run(main())


# -- slow readers --------------------------------------------------------------------------------


async def self_flooding_zombie(port: int, app: PresenceApp, topic: str) -> asyncio.StreamWriter:
    """A client that joins ``topic`` with ``self: true``, never reads, and broadcasts to
    itself until the server cuts it as a slow reader (its session leaves the core).  Returns
    its writer (the TCP connection stays open), or raises `ConnectionRefusedError` if its
    handshake is refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(HANDSHAKE)
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in head:
        writer.close()
        raise ConnectionRefusedError(head.split(b"\r\n")[0].decode())
    config = {"config": {"broadcast": {"self": True}}}
    writer.write(frame(["1", "1", topic, "phx_join", config]))
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    payload = {"type": "broadcast", "event": "x", "payload": {"pad": "p" * 30_000}}
    push = frame(["1", None, topic, "broadcast", payload])
    async with asyncio.timeout(30):
        while not any(topic in s.channels for s in app.core.sessions.values()):
            await asyncio.sleep(0.01)
        while any(topic in s.channels for s in app.core.sessions.values()):
            writer.write(push)
            await writer.drain()
            await asyncio.sleep(0.005)
    return writer


@pytest.mark.parametrize("ws", IMPLS)
def test_a_slow_reader_cut_with_1013_stays_open_past_max_connections(ws: str) -> None:
    """DEFECT: a slow reader is taken out of the core (`_push`: its presences leave, and it
    stops counting in ``max_connections``) and a 1013 close is queued behind the send its
    writer is blocked in.  A client that never reads never unblocks that send, so the close
    never goes out, ``serve`` never returns and uvicorn keeps the socket, its buffers and its
    task forever (uvicorn's keepalive timeout only closes a transport that cannot drain).
    Broadcasting to itself (``self: true``), one client makes as many such sockets as it likes,
    past ``max_connections``.  `PresenceServer` aborts the transport instead."""
    limits = ServerLimits(
        max_connections=2,
        max_buffered_bytes=1 << 16,
        broadcasts_per_second=1000,
        messages_per_second=1000,
    )
    app = PresenceApp(Tracker(), limits=limits)
    wrapper, calls = counting(app)

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []
        async with serving(wrapper, ws=ws) as port:
            try:
                for n in range(4):
                    with contextlib.suppress(ConnectionRefusedError):
                        writers.append(await self_flooding_zombie(port, app, f"t{n}"))
                assert app.connections == 0  # the core let every one of them go
                bounded = await until(lambda: calls["open"] <= limits.max_connections, 8.0)
                assert bounded, f"{calls['open']} sockets open, max_connections is 2"
            finally:
                for writer in writers:
                    writer.transport.abort()  # before uvicorn's shutdown, which waits for them

    asyncio.run(main())


# -- async hooks ---------------------------------------------------------------------------------


def hanging_auth() -> tuple[Any, asyncio.Event, list[str]]:
    """An async auth hook that never answers for the topic "slow" (until released)."""
    release = asyncio.Event()
    asked: list[str] = []

    async def auth(token: str | None, topic: str | None) -> bool:
        if topic == "slow":
            asked.append(topic)
            await release.wait()
        return True

    return auth, release, asked


def test_a_pending_async_hook_does_not_hide_the_clients_close() -> None:
    """DEFECT: while an async auth hook or policy is under way, `PresenceApp._read` waits for
    it and does not call ``receive``, so the client's close is not seen: the socket stays in
    the core (counted in ``max_connections``), its presences stay (its peers see no leave) and
    the hook's task is not cancelled, until the hook answers or the heartbeat TTL (60 s)
    expires it.  `PresenceServer` still reads a held socket, so that a close or an EOF is seen
    at once."""

    async def main() -> None:
        auth, release, asked = hanging_auth()
        app = PresenceApp(Tracker(), auth=auth)
        try:
            async with serving(app) as port:
                url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"
                async with connect(url) as client:
                    assert (await join(client, "room", "alice"))["status"] == "ok"
                    await track(client, "room", {"n": 1})
                    await client.send(json.dumps(["3", "3", "slow", "phx_join", {}]))
                    assert await until(lambda: bool(asked), WAIT)
                left = await until(lambda: not app.tracker.list("room"), 2.0)
                gone = (app.connections, len(app.driver._waits))
                release.set()  # whatever happened, let everything end
                assert left, "the closed client's presence stays while its hook is pending"
                assert gone == (0, 0)
        finally:
            release.set()

    asyncio.run(main())


def test_a_pending_async_hook_does_not_hold_up_uvicorns_shutdown() -> None:
    """DEFECT: uvicorn's shutdown queues a 1012 disconnect for every socket, then waits for
    every ASGI task to return before the lifespan's shutdown (with no timeout by default).  A
    socket whose async hook never answers never reads that disconnect (see above), so one
    client makes the restart hang: the lifespan never stops the tick, nor cancels the hook."""

    async def main() -> None:
        auth, release, asked = hanging_auth()
        app = PresenceApp(Tracker(), auth=auth)
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio"
        )
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
        task = asyncio.create_task(server.serve())
        client = None
        try:
            assert await until(lambda: server.started, WAIT)
            client = await connect(f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0")
            await client.send(json.dumps(["1", "1", "slow", "phx_join", {}]))
            assert await until(lambda: bool(asked), WAIT)
            server.should_exit = True
            done, _ = await asyncio.wait({task}, timeout=WAIT)
            assert done, "uvicorn's shutdown waits for a hook that never answers"
        finally:
            release.set()
            server.should_exit = True
            done, _ = await asyncio.wait({task}, timeout=WAIT)
            if not done:
                server.force_exit = True
                await asyncio.wait({task}, timeout=WAIT)
            if client is not None:
                client.transport.abort()
            assert not app.driver.running

    asyncio.run(main())


# -- floods --------------------------------------------------------------------------------------


def test_a_rate_limited_flood_does_not_hide_the_clients_close() -> None:
    """DEFECT: `PresenceApp._read` rate limits frames by sleeping, but uvicorn has already
    queued every message of the bytes it read (a read is up to 256 KiB: some 6,000 heartbeats),
    and the client's close or disconnect comes after them.  Sent in one burst, they take the
    socket ``messages_per_second`` at a time: at the default 200/s up to half a minute in which
    the client is gone, its presences stay, its messages are still acted on, and uvicorn's
    shutdown waits for it.  Here 120 heartbeats at 10/s: about eleven seconds."""
    app = PresenceApp(Tracker(), limits=ServerLimits(messages_per_second=10.0))

    async def main() -> None:
        async with serving(app) as port:
            url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"
            async with connect(url) as client:
                assert (await join(client, "room", "flood"))["status"] == "ok"
                await track(client, "room", {"n": 1})
                beat = json.dumps([None, "h", "phoenix", "heartbeat", {}])
                for _ in range(120):
                    await client.send(beat)
            # The client has closed (its close frame answered by uvicorn at once).
            left = await until(lambda: not app.tracker.list("room"), 4.0)
            await until(lambda: app.connections == 0, 20.0)  # a clean stop either way
            assert left, "the client left 4 s ago; its presence stays behind its flood"

    asyncio.run(main())


# -- connection limits ---------------------------------------------------------------------------


class _YieldingSocket:
    """An ASGI server's side of one WebSocket whose ``send`` yields to the loop, as an ASGI
    server that writes through a queue or awaits its transport does (hypercorn, daphne)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.sent: list[MutableMapping[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        await asyncio.sleep(0)
        self.sent.append(message)

    @property
    def accepted(self) -> bool:
        return any(m["type"] == "websocket.accept" for m in self.sent)


@pytest.mark.parametrize(
    "limits",
    [ServerLimits(max_connections_per_ip=1), ServerLimits(max_connections=1)],
    ids=["max_connections_per_ip", "max_connections"],
)
def test_concurrent_handshakes_cannot_pass_the_connection_limits_together(
    limits: ServerLimits,
) -> None:
    """DEFECT: `PresenceApp.serve` checks ``max_connections`` (``len(core.sessions)``) and
    ``max_connections_per_ip`` (``_per_ip``) before ``await send(accept)``, but counts the
    socket only after it.  Under an ASGI server whose ``send`` yields (any that writes through
    a queue), handshakes that arrive together all pass the checks: here 5 sockets from one
    address are accepted where 1 may be."""
    app = PresenceApp(Tracker(), limits=limits)
    scope = {
        "type": "websocket",
        "path": "/socket/websocket",
        "query_string": b"vsn=2.0.0",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "extensions": {"websocket.http.response": {}},
    }

    async def main() -> None:
        sockets = [_YieldingSocket() for _ in range(5)]
        async with app.lifespan():
            tasks = [asyncio.create_task(app(dict(scope), s.receive, s.send)) for s in sockets]
            try:
                await asyncio.sleep(0.2)
                accepted = sum(s.accepted for s in sockets)
            finally:
                for s in sockets:
                    s.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert accepted == 1, f"{accepted} sockets accepted together; the limit is 1"

    asyncio.run(main())


# -- tokens in logs ------------------------------------------------------------------------------


def test_redact_tokens_blanks_a_token_whose_parameter_name_is_percent_encoded() -> None:
    """DEFECT (low): the core reads the handshake's query with ``parse_qs``, which decodes
    parameter names, so ``?api%6Bey=<token>`` authenticates as ``apikey``; `RedactTokens`
    matches the literal names only, and uvicorn logs the raw query, so that token reaches the
    log in full."""
    secret = "eyJ-very-secret-token"
    query = f"api%6Bey={secret}&vsn=2.0.0"
    core = PhoenixCore(Tracker())
    session = Session(1)
    assert core.authenticate(session, origin=None, api_key=None, query=query, now=0.0) is None
    assert session.token == secret  # the core took it as the socket's token
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:50000", f"/socket/websocket?{query}"),
        None,
    )
    RedactTokens().filter(record)
    assert secret not in record.getMessage()
