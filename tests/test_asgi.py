"""The ASGI door (`presence_core.asgi.PresenceApp`) under a real uvicorn, in this process.

The real clients (phoenix.js, realtime-js, Supabase's Python client) run against it in
tests/test_server_clients.py and tests/test_asgi_readme.py; here raw `websockets` clients check
what is particular to the ASGI door: mounting in Starlette (``root_path``) with the host's
lifespan, an app without one, running alone, refusals with an HTTP status, a presence key the
host chose, tokens kept out of uvicorn's logs, slow readers, and uvicorn's 1012 on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from servers import ValkeyServer, free_port
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.websockets import WebSocket
from test_server_auth import VERIFIER, token
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode

from presence_core import Tracker
from presence_core.asgi import PresenceApp, RedactTokens
from presence_core.server import ServerLimits

# The door is the same code over either table: .ci/run runs it once, with the compiled one.
pytestmark = pytest.mark.asgi_door

WAIT = 5.0


@contextlib.asynccontextmanager
async def uvicorn_serving(
    app: Any, exit_within: float = WAIT + 5, **options: Any
) -> AsyncIterator[int]:
    """``app`` under uvicorn on a free loopback port, in this event loop; yields the port.  Its
    shutdown may take up to ``exit_within`` seconds (a test may leave uvicorn something to wait
    for), then it is forced."""
    port = free_port()
    options = {"log_level": "warning", "ws": "websockets-sansio", **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                if task.done():
                    task.result()
                    raise AssertionError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        done, _ = await asyncio.wait({task}, timeout=exit_within)
        if not done:
            server.force_exit = True
            done, _ = await asyncio.wait({task}, timeout=WAIT)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


@contextlib.asynccontextmanager
async def asgi_serving(**kwargs: Any) -> AsyncIterator[PresenceApp]:
    """What tests/test_server.py's ``serving`` gives, through the ASGI door: a started
    `PresenceApp` under uvicorn, with ``port`` set to where it listens."""
    tracker = kwargs.pop("tracker", None) or Tracker(connection_ttl=kwargs.pop("ttl", 60.0))
    app = PresenceApp(tracker, **kwargs)
    async with uvicorn_serving(app, lifespan="on") as port:
        app.port = port  # type: ignore[attr-defined]
        yield app


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


async def aget(port: int, path: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(get, port, path)


async def reply(ws: ClientConnection, ref: str) -> dict[str, Any]:
    """The payload of the reply to ``ref`` (v2 frames), skipping other frames."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = json.loads(await ws.recv())
            if frame[3] == "phx_reply" and frame[1] == ref:
                payload: dict[str, Any] = frame[4]
                return payload


async def next_event(ws: ClientConnection, event: str) -> list[Any]:
    async with asyncio.timeout(WAIT):
        while True:
            frame: list[Any] = json.loads(await ws.recv())
            if frame[3] == event:
                return frame


async def join(ws: ClientConnection, topic: str, key: str = "", ref: str = "1") -> dict[str, Any]:
    payload = {"config": {"presence": {"key": key}}}
    await ws.send(json.dumps([ref, ref, topic, "phx_join", payload]))
    return await reply(ws, ref)


async def track(ws: ClientConnection, topic: str, meta: dict[str, Any], ref: str = "2") -> None:
    push = {"type": "presence", "event": "track", "payload": meta}
    await ws.send(json.dumps(["1", ref, topic, "presence", push]))
    assert (await reply(ws, ref))["status"] == "ok"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_mounted_in_starlette_with_the_hosts_lifespan() -> None:
    """Mounted at /realtime (Starlette puts the prefix in root_path), started by the host's
    lifespan: health, metrics and sockets answer under the prefix."""
    presence = PresenceApp(Tracker())
    app = Starlette(routes=[Mount("/realtime", presence)], lifespan=presence.lifespan)

    async def main() -> None:
        async with uvicorn_serving(app) as port:
            status, body = await aget(port, "/realtime/health")
            assert status == 200 and json.loads(body)["status"] == "ok"
            assert (await aget(port, "/realtime/health/live"))[0] == 200
            status, body = await aget(port, "/realtime/metrics")
            assert status == 200 and b"presence_connections" in body
            assert (await aget(port, "/realtime/nothing"))[0] == 404
            assert (await aget(port, "/health"))[0] == 404  # the host's, not ours
            url = f"ws://127.0.0.1:{port}/realtime/socket/websocket?vsn=2.0.0"
            async with connect(url) as a, connect(url) as b:
                assert (await join(a, "room", "alice"))["status"] == "ok"
                await next_event(a, "presence_state")
                await track(a, "room", {"status": "here"})
                assert (await join(b, "room", "bob"))["status"] == "ok"
                state = (await next_event(b, "presence_state"))[4]
                assert [m["status"] for m in state["alice"]["metas"]] == ["here"]
                # b leaves: a gets the diff; the ASGI door fans out like serve.
                await b.close()
                diff = (await next_event(a, "presence_diff"))[4]
                assert diff["joins"] == {} or "bob" not in diff["joins"]
        assert not presence.driver.running  # the host's lifespan stopped it

    run(main())


def test_a_mounted_app_without_a_lifespan_refuses_sockets_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    presence = PresenceApp(Tracker())
    app = Starlette(routes=[Mount("/realtime", presence)])  # no lifespan: a mistake

    async def main() -> None:
        async with uvicorn_serving(app) as port:
            assert (await aget(port, "/realtime/health"))[0] == 503  # "starting"
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{port}/realtime/socket/websocket"):
                    pass
            assert refused.value.response.status_code == 503

    run(main())
    assert "pass presence.lifespan to the host's lifespan=" in caplog.text


def test_served_alone_it_runs_its_own_lifespan() -> None:
    presence = PresenceApp(Tracker())

    async def main() -> None:
        async with uvicorn_serving(presence, lifespan="on") as port:
            assert presence.driver.running
            assert (await aget(port, "/health"))[0] == 200
            async with connect(f"ws://127.0.0.1:{port}/socket/websocket") as ws:
                await ws.send(
                    json.dumps({"topic": "room", "event": "phx_join", "ref": "1", "payload": {}})
                )
                async with asyncio.timeout(WAIT):
                    answer = json.loads(await ws.recv())
                assert answer["payload"]["status"] == "ok"  # a v1 client
                assert presence.connections == 1
        assert not presence.driver.running

    run(main())


def test_a_bad_token_is_refused_with_401_and_the_reason() -> None:
    presence = PresenceApp(Tracker(), verifier=VERIFIER, key_claim="sub")

    async def main() -> None:
        async with uvicorn_serving(presence, lifespan="on") as port:
            base = f"ws://127.0.0.1:{port}/socket/websocket"
            for query in ("", "?apikey=not-a-jwt"):
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(base + query):
                        pass
                assert refused.value.response.status_code == 401
                assert "error" in json.loads(refused.value.response.body)
            async with connect(f"{base}?vsn=2.0.0&apikey={token('alice')}") as ws:
                assert (await join(ws, "room"))["status"] == "ok"
                await track(ws, "room", {"n": 1})
                assert list(presence.tracker.list("room")) == ["alice"]
                # The key is the token's claim: a join that asks for another is refused.
                answer = await join(ws, "other", "mallory", ref="3")
                assert answer["status"] == "error"

    run(main())


def test_a_host_chosen_key_cannot_be_overridden_by_the_client() -> None:
    presence = PresenceApp(Tracker())

    async def endpoint(websocket: WebSocket) -> None:
        user = websocket.query_params.get("user", "")
        await presence.serve(websocket.scope, websocket.receive, websocket.send, key=user)

    from starlette.routing import WebSocketRoute

    app = Starlette(
        routes=[WebSocketRoute("/socket/websocket", endpoint)], lifespan=presence.lifespan
    )

    async def main() -> None:
        async with uvicorn_serving(app) as port:
            url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&user=alice"
            async with connect(url) as ws:
                refused = await join(ws, "room", "mallory")
                assert refused["status"] == "error"
                assert "chose this socket's presence key" in refused["response"]["reason"]
                assert (await join(ws, "room", "", ref="3"))["status"] == "ok"
                await track(ws, "room", {"n": 1}, ref="4")
                assert list(presence.tracker.list("room")) == ["alice"]
                assert (await join(ws, "hall", "alice", ref="5"))["status"] == "ok"

    run(main())


def test_tokens_in_the_query_stay_out_of_uvicorns_log() -> None:
    """uvicorn logs each accepted socket's path with its query at INFO; RedactTokens blanks
    the token there, before any handler formats the record."""
    presence = PresenceApp(Tracker())
    secret = "eyJ-very-secret-token"
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    logger = logging.getLogger("uvicorn.error")
    keep = Keep(logging.INFO)
    logger.addHandler(keep)
    redactor = RedactTokens.install()
    try:

        async def main() -> None:
            options = {"lifespan": "on", "log_level": "info", "log_config": None}
            async with uvicorn_serving(presence, **options) as port:
                url = f"ws://127.0.0.1:{port}/socket/websocket?apikey={secret}&vsn=2.0.0"
                async with connect(url) as ws:
                    assert (await join(ws, "room"))["status"] == "ok"

        run(main())
    finally:
        logger.removeHandler(keep)
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).removeFilter(redactor)
    text = "\n".join(lines)
    assert "[accepted]" in text
    assert secret not in text
    assert "apikey=[redacted]" in text


async def never_reading(port: int, topic: str) -> asyncio.StreamWriter:
    """A client that joins ``topic`` (v2) and then reads nothing more, ever."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with asyncio.timeout(WAIT):
        assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    join = json.dumps(["1", "1", topic, "phx_join", {"config": {}}]).encode()
    writer.write(Frame(Opcode.TEXT, join).serialize(mask=True))
    # Our own receive buffer as small as the kernel allows, so the server's queue fills soon.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    return writer


def test_a_slow_reader_is_closed_and_the_others_keep_their_frames() -> None:
    """A client that stops reading while its topic is busy fills its queue, not our memory:
    past max_buffered_bytes it is closed (1013) and leaves; the others get every frame."""
    limits = ServerLimits(
        max_buffered_bytes=1 << 16, broadcasts_per_second=10_000, messages_per_second=10_000
    )
    presence = PresenceApp(Tracker(), limits=limits)

    async def main() -> None:
        async with uvicorn_serving(presence, lifespan="on") as port:
            url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"
            async with (
                connect(url) as sender,
                connect(url, max_size=None) as reader,
            ):
                for ws, key in ((sender, "s"), (reader, "r")):
                    assert (await join(ws, "room", key))["status"] == "ok"
                slow = await never_reading(port, "room")
                got = 0

                async def read() -> None:
                    nonlocal got
                    async for message in reader:
                        if json.loads(message)[3] == "broadcast":
                            got += 1

                reading = asyncio.create_task(read())
                # The slow client reads nothing: its TCP buffers fill, then its queue here.
                payload = {"type": "broadcast", "event": "x", "payload": {"pad": "p" * 60_000}}
                frame = json.dumps(["1", None, "room", "broadcast", payload])
                sent = 0
                async with asyncio.timeout(30):
                    while presence.connections == 3:
                        await sender.send(frame)
                        sent += 1
                        await asyncio.sleep(0.002)
                assert "slow" not in presence.tracker.list("room")
                async with asyncio.timeout(WAIT):
                    while got < sent:
                        await asyncio.sleep(0.01)
                assert got == sent
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                slow.close()

    run(main())


def test_a_1012_shutdown_is_a_hand_over_not_a_leave(valkey: ValkeyServer) -> None:
    """uvicorn closes every socket with 1012 before the lifespan's shutdown.  The presences of
    those sockets do not leave at once for the other process's clients: they are left in
    Redis, to expire on their own (and to be claimed by the process the clients reconnect
    to, once hand-over lands)."""
    from presence_core.store import RedisStore

    def app(node: str) -> PresenceApp:
        tracker = Tracker(node=node, connection_ttl=30.0)
        store = RedisStore(tracker, valkey.url, prefix="asgi-handover", liveness_timeout=2.0)
        return PresenceApp(tracker, store=store)

    a, b = app("a"), app("b")

    async def main() -> None:
        async with uvicorn_serving(b, lifespan="on") as port_b:
            url_b = f"ws://127.0.0.1:{port_b}/socket/websocket?vsn=2.0.0"
            async with connect(url_b) as watcher:
                assert (await join(watcher, "room", "w"))["status"] == "ok"
                await next_event(watcher, "presence_state")
                ws = None
                try:
                    async with uvicorn_serving(a, lifespan="on") as port_a:
                        ws = await connect(f"ws://127.0.0.1:{port_a}/socket/websocket?vsn=2.0.0")
                        assert (await join(ws, "room", "alice"))["status"] == "ok"
                        await track(ws, "room", {"n": 1})
                        async with asyncio.timeout(WAIT):
                            while "alice" not in b.tracker.list("room"):
                                await asyncio.sleep(0.02)
                    # uvicorn has closed the socket with 1012, then run the shutdown.
                    async with asyncio.timeout(WAIT):
                        await ws.wait_closed()
                    assert ws.close_code == 1012
                finally:
                    if ws is not None:
                        await ws.close()
                stopped = time.monotonic()
                await asyncio.sleep(0.5)
                assert "alice" in b.tracker.list("room"), "a hand-over was announced as a leave"
                # Nobody claimed it: it expires with a's liveness, and no ghost remains.
                async with asyncio.timeout(WAIT):
                    while "alice" in b.tracker.list("room"):
                        await asyncio.sleep(0.05)
                print(f"handed-over presence expired {time.monotonic() - stopped:.1f} s later")

    run(main())


def test_on_an_address_other_than_loopback_it_refuses_to_authenticate_nobody(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As serve refuses to listen beyond loopback without authentication, the ASGI door
    refuses sockets that reach it there, unless a key, an authenticator or allow_anonymous
    says who may come.  (Plain ASGI calls: no socket is opened.)"""

    async def handshake(app: PresenceApp, server: tuple[str, int], **kw: Any) -> list[Any]:
        sent: list[Any] = []
        inbox = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

        async def receive() -> Any:
            if inbox:
                return inbox.pop(0)
            await asyncio.sleep(3600)

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "websocket",
            "path": "/socket/websocket",
            "query_string": b"vsn=2.0.0",
            "headers": [],
            "server": server,
            "client": ("203.0.113.9", 5555),
            "extensions": {"websocket.http.response": {}},
        }
        async with app.lifespan():
            await app.serve(scope, receive, send, **kw)
        return [m["type"] for m in sent] + [m.get("status") for m in sent[:1]]

    async def main() -> None:
        public = ("10.0.0.5", 4000)
        refused = await handshake(PresenceApp(Tracker()), public)
        assert refused == ["websocket.http.response.start", "websocket.http.response.body", 403]
        assert (await handshake(PresenceApp(Tracker()), public, key="alice"))[0] == (
            "websocket.accept"
        )
        anyone = PresenceApp(Tracker(), allow_anonymous=True)
        assert (await handshake(anyone, public))[0] == "websocket.accept"
        verified = PresenceApp(Tracker(), verifier=VERIFIER)
        assert (await handshake(verified, public))[-1] == 401  # asks for a token instead
        assert (await handshake(PresenceApp(Tracker()), ("127.0.0.1", 4000)))[0] == (
            "websocket.accept"
        )

    run(main())
    assert "authenticates nobody" in caplog.text
