"""Real clients against a real ``presence-core serve``: phoenix.js, realtime-js and Supabase's
Python client ``realtime``, unmodified, sharing one channel's presence and broadcasts.

Each JS client is its own ``node tests/js/live_client.mjs`` process (one WebSocket, one
channel), driven by JSON-lines commands; the Python client runs in the test's event loop; raw
`websockets` connections stand in for clients that misbehave (silent, malformed frames).  The
server runs with ``--connection-ttl 2``, so every well-behaved client must keep sending: the JS
clients heartbeat every 0.5 s (``live_client.mjs``); the Python client cannot heartbeat more
often than every 15 s (``realtime`` 2.34.1 sleeps ``max(hb_interval, 15)``), so `PyClient` sends
the same ``heartbeat`` message it would, through the client's own ``send``, every 0.5 s.

What every test checks is what each client *holds*: its presence state, the metas without
their refs (``{key: [meta, ...]}``), after the server's ``presence_state`` and diffs.

Every process is a child started here and stopped by PID however the test ends (the server
processes and node clients also die with the test process, ``PR_SET_PDEATHSIG``); every wait is
bounded.  Without ``node`` or ``tests/js/node_modules`` these tests skip; with ``CI=true`` they
fail instead: run ``npm ci --prefix tests/js`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from realtime import AsyncRealtimeClient
from realtime.message import Message
from servers import ValkeyServer, _die_with_parent, free_port, pid_alive, wait_until
from websockets.asyncio.client import ClientConnection, connect

JS_DIR = Path(__file__).resolve().parent / "js"
LIVE = JS_DIR / "live_client.mjs"
NPM_HINT = "run `npm ci --prefix tests/js`"
EXE = shutil.which("presence-core") or str(Path(sys.executable).with_name("presence-core"))

TTL = 2.0  # --connection-ttl of every server here
MAX_FRAME = 64 * 1024  # --max-frame-bytes
START_TIMEOUT = 15.0  # a server answering /health 200
WAIT = 8.0  # any state to converge, any reply to come
KEEPALIVE = 0.5  # the Python client's heartbeat here
SILENT_LEAVE = TTL + 1.5  # a silent connection's presence gone at the others
LIVENESS = 2.0  # serve --liveness-timeout for the servers sharing Valkey
REDIS_LEAVE = LIVENESS + 2.0  # a SIGKILLed server's presences gone at its peers (+ a check)
STOP_TIMEOUT = 5.0

State = dict[str, list[dict[str, Any]]]
REF_FIELDS = frozenset({"phx_ref", "phx_ref_prev", "presence_ref"})


# -- availability ----------------------------------------------------------------------------


def _js_unavailable() -> str | None:
    """Why the JS clients cannot run here, or None (the checks of test_js_clients.py)."""
    if shutil.which("node") is None:
        return "node is not on PATH (install Node.js 20 or later)"
    manifest = json.loads((JS_DIR / "package.json").read_text(encoding="utf-8"))
    for name, version in manifest["dependencies"].items():
        installed = JS_DIR / "node_modules" / name / "package.json"
        if not installed.is_file():
            return f"{name} is not installed in tests/js/node_modules"
        found = json.loads(installed.read_text(encoding="utf-8"))["version"]
        if found != version:
            return f"tests/js/node_modules has {name} {found}, package.json pins {version}"
    return None


@pytest.fixture(scope="module", autouse=True)
def js_available() -> None:
    reason = _js_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # as test_js_clients.py
        pytest.fail(
            f"the live client tests cannot run: {reason}; {NPM_HINT} before pytest",
            pytrace=False,
        )
    pytest.skip(f"JavaScript clients unavailable: {reason} ({NPM_HINT} to run these tests)")


# -- presence-core serve ---------------------------------------------------------------------


def health(port: int) -> int | None:
    """The status of GET /health, or None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


DOORS = ("serve", pytest.param("asgi", marks=pytest.mark.asgi_door))


def door_env(args: tuple[str, ...]) -> dict[str, str]:
    """``serve``'s options as the environment the ASGI app reads them from
    (``--liveness-timeout 2`` is ``PRESENCE_CORE_LIVENESS_TIMEOUT=2``)."""
    env: dict[str, str] = {}
    at = 0
    while at < len(args):
        name = "PRESENCE_CORE_" + args[at].removeprefix("--").replace("-", "_").upper()
        if at + 1 < len(args) and not args[at + 1].startswith("--"):
            env[name], at = args[at + 1], at + 2
        else:
            env[name], at = "true", at + 1
    return env


class Serve:
    """One server process on a free port, ready once /health says 200: ``presence-core
    serve``, or (``door="asgi"``) the ASGI app under uvicorn, configured from the same
    options (`presence_core.asgi.from_environment`)."""

    def __init__(self, log_dir: Path, *args: str, door: str = "serve") -> None:
        self.port = free_port()
        self.door = door
        self.log_path = log_dir / f"{door}-{self.port}.log"
        options = ("--connection-ttl", str(TTL), "--max-frame-bytes", str(MAX_FRAME), *args)
        env = None
        if door == "serve":
            argv = [EXE, "serve", "--port", str(self.port), *options]
        else:
            argv = [sys.executable, "-m", "uvicorn", "--factory"]
            argv += ["presence_core.asgi:from_environment", "--port", str(self.port)]
            argv += ["--log-level", "warning", "--timeout-graceful-shutdown", "2"]
            env = {**os.environ, **door_env(options)}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                env=env,
            )
        try:
            wait_until(self._ready, START_TIMEOUT, f"presence-core serve on {self.port}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
        return health(self.port) == 200

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past a bound."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait(STOP_TIMEOUT)
        assert not pid_alive(self.proc.pid)


@pytest.fixture(scope="module", params=DOORS)
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Serve]:
    """One server for the module's single-server tests (each uses its own topic), for each
    front door: ``serve`` and the ASGI app under uvicorn."""
    serve = Serve(tmp_path_factory.mktemp("serve"), door=request.param)
    try:
        yield serve
    finally:
        serve.stop()


# -- clients ---------------------------------------------------------------------------------


def _strip(state: dict[str, list[dict[str, Any]]]) -> State:
    return {
        key: [{k: v for k, v in meta.items() if k not in REF_FIELDS} for meta in metas]
        for key, metas in state.items()
    }


class NodeClient:
    """One ``node live_client.mjs`` process: one phoenix.js or realtime-js client (or, with
    ``argv``, another script of ``tests/js`` that speaks the same commands and events)."""

    def __init__(self, kind: str, base: str, argv: list[str] | None = None) -> None:
        self.name = kind
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["node", "--experimental-websocket", *(argv or [str(LIVE), kind, base])],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"type": "garbage", "line": line.decode("utf-8", "replace")}
            with self._lock:
                self.events.append(event)

    def _of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [event for event in self.events if event.get("type") == kind]

    def state(self) -> State:
        """The state after the client's last presence sync."""
        syncs = self._of("sync")
        return syncs[-1]["state"] if syncs else {}

    def broadcasts(self) -> list[Any]:
        return [event["payload"] for event in self._of("broadcast")]

    def errors(self) -> list[dict[str, Any]]:
        return self._of("error") + self._of("garbage")

    def diagnosis(self) -> str:
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", "replace")[-3000:]
        with self._lock:
            tail = self.events[-20:]
        return f"{self.name}: exit code {self.proc.poll()}, last events {tail}, stderr:\n{err}"

    async def command(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Run one command; its reply, which must be ``ok``."""
        answer = await self.ask(cmd, **fields)
        assert answer["status"] == "ok", f"{self.name} {cmd}: {answer}"
        return answer

    async def ask(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Run one command; its reply, whatever its status."""
        ident = next(self._ids)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"id": ident, "cmd": cmd, **fields}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise AssertionError(f"{cmd}: cannot write ({exc}): {self.diagnosis()}") from exc

        def reply() -> dict[str, Any] | None:
            return next((e for e in self._of("reply") if e.get("id") == ident), None)

        await eventually(lambda: reply() is not None, f"{self.name} to answer {cmd}", self)
        answer = reply()
        assert answer is not None
        return answer

    async def join(
        self, topic: str, key: str, *, self_broadcast: bool = False, ack: bool = False
    ) -> None:
        await self.command(
            "join", topic=topic, key=key, broadcast_self=self_broadcast, broadcast_ack=ack
        )

    async def track(self, meta: dict[str, Any]) -> None:
        await self.command("track", meta=meta)

    async def untrack(self) -> None:
        await self.command("untrack")

    async def broadcast(self, event: str, payload: dict[str, Any]) -> None:
        await self.command("broadcast", event=event, payload=payload)

    def kill(self) -> None:
        """SIGKILL the node process (the client vanishes without a word)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                with contextlib.suppress(OSError):
                    self.proc.stdin.write(b'{"cmd": "exit"}\n')
                    self.proc.stdin.flush()
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        finally:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self._reader.join(STOP_TIMEOUT)
            self._stderr.close()


class PyClient:
    """Supabase's Python client (``realtime``), one channel."""

    def __init__(self, base: str, name: str = "python") -> None:
        self.name = name
        # No reconnects: a client the server sent away must show, not quietly rejoin.
        self.client = AsyncRealtimeClient(f"{base}/realtime/v1", token="test", auto_reconnect=False)
        self.channel: Any = None
        self.received: list[Any] = []
        self._keepalive: asyncio.Task[None] | None = None

    async def join(self, topic: str, key: str, *, self_broadcast: bool = False) -> None:
        config = {
            "broadcast": {"self": self_broadcast, "ack": False},
            "presence": {"key": key, "enabled": True},
            "private": False,
        }
        channel = self.client.channel(topic.removeprefix("realtime:"), {"config": config})
        assert channel.topic == topic
        # The client turns presence on only for a channel with a presence callback.
        channel.on_presence_sync(lambda: None)
        channel.on_broadcast("*", lambda message: self.received.append(message["payload"]))
        await asyncio.wait_for(channel.subscribe(), WAIT)
        assert channel.is_joined, f"{self.name} did not join {topic}"
        self.channel = channel
        self._keepalive = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        beat = Message(topic="phoenix", event="heartbeat", payload={}, ref=None)
        while self.client.is_connected:
            await self.client.send(beat)
            await asyncio.sleep(KEEPALIVE)

    async def track(self, meta: dict[str, Any]) -> None:
        await self.channel.track(meta)

    async def untrack(self) -> None:
        await self.channel.untrack()

    async def broadcast(self, event: str, payload: dict[str, Any]) -> None:
        await self.channel.send_broadcast(event, payload)

    def state(self) -> State:
        if self.channel is None:
            return {}
        return _strip(dict(self.channel.presence_state()))

    def broadcasts(self) -> list[Any]:
        return list(self.received)

    def diagnosis(self) -> str:
        return f"{self.name}: connected={self.client.is_connected}"

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keepalive
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), STOP_TIMEOUT)


Client = NodeClient | PyClient


class Clients:
    """The clients of one test: started through it, all closed (by PID for node) at the end."""

    def __init__(self) -> None:
        self.nodes: list[NodeClient] = []
        self.pythons: list[PyClient] = []
        self.raws: list[ClientConnection] = []

    def node(self, kind: str, base: str) -> NodeClient:
        client = NodeClient(kind, base)
        self.nodes.append(client)
        return client

    def python(self, base: str, name: str = "python") -> PyClient:
        client = PyClient(base, name)
        self.pythons.append(client)
        return client

    async def raw(self, base: str) -> ClientConnection:
        """A bare v2 WebSocket that sends only what the test sends (no pings either)."""
        ws = await connect(
            f"{base}/socket/websocket?vsn=2.0.0", open_timeout=WAIT, ping_interval=None
        )
        self.raws.append(ws)
        return ws

    async def aclose(self) -> None:
        for ws in self.raws:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        for client in self.pythons:
            await client.close()
        self.close_nodes()

    def close_nodes(self) -> None:
        for node in self.nodes:
            node.close()
        assert not any(pid_alive(node.proc.pid) for node in self.nodes)


@pytest.fixture
def clients() -> Iterator[Clients]:
    made = Clients()
    try:
        yield made
    finally:
        made.close_nodes()  # a no-op when the test closed them; kills by PID otherwise


# -- waiting ---------------------------------------------------------------------------------


async def eventually(
    predicate: Callable[[], bool], what: str, *about: Client, timeout: float = WAIT
) -> float:
    """Poll `predicate` (20 ms) until true; seconds taken.  AssertionError past `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            details = "\n".join(f"  {c.name}: state {c.state()}; {c.diagnosis()}" for c in about)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{details}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def converge(members: list[Client], expected: State, timeout: float = WAIT) -> float:
    """Wait until every client holds exactly `expected`; seconds taken."""
    return await eventually(
        lambda: all(c.state() == expected for c in members),
        f"every client to hold {expected}",
        *members,
        timeout=timeout,
    )


def meta(key: str, version: int = 1) -> dict[str, Any]:
    return {"name": key, "version": version, "tags": ["a", key]}


def new_topic(name: str) -> str:
    return f"realtime:{name}-{uuid.uuid4().hex[:8]}"


async def trio(clients: Clients, base: str, topic: str) -> list[Client]:
    """phoenix.js ("phx"), realtime-js ("sb") and the Python client ("py"): joined, tracked,
    and all three holding all three."""
    phx, sb = clients.node("phoenix", base), clients.node("realtime", base)
    py = clients.python(base)
    members: list[Client] = [phx, sb, py]
    for client, key in zip(members, ("phx", "sb", "py"), strict=True):
        await client.join(topic, key)
        await client.track(meta(key))
    await converge(members, {key: [meta(key)] for key in ("phx", "sb", "py")})
    return members


def run(scenario: Callable[[], Awaitable[None]], clients: Clients) -> None:
    """Run an async scenario, closing its clients in the same event loop however it ends."""

    async def main() -> None:
        try:
            await scenario()
        finally:
            await clients.aclose()
        errors = {node.name: node.errors() for node in clients.nodes if node.errors()}
        assert not errors, f"a JS client reported errors: {errors}"

    asyncio.run(main())


# -- raw frames ------------------------------------------------------------------------------


async def reply_to(ws: ClientConnection, ref: str) -> dict[str, Any]:
    """The payload of the phx_reply to `ref`, skipping every other frame."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = json.loads(await ws.recv())
            if frame[3] == "phx_reply" and frame[1] == ref:
                payload: dict[str, Any] = frame[4]
                return payload


async def raw_track(ws: ClientConnection, topic: str, key: str, value: dict[str, Any]) -> None:
    join = {"config": {"presence": {"key": key}}}
    await ws.send(json.dumps(["j1", "j1", topic, "phx_join", join]))
    assert (await reply_to(ws, "j1"))["status"] == "ok"
    track = {"type": "presence", "event": "track", "payload": value}
    await ws.send(json.dumps(["j1", "t1", topic, "presence", track]))
    assert (await reply_to(ws, "t1"))["status"] == "ok"


# -- one server ------------------------------------------------------------------------------


def test_three_clients_see_each_other(server: Serve, clients: Clients) -> None:
    async def scenario() -> None:
        topic = new_topic("see")
        members = await trio(clients, server.base, topic)
        # A late joiner (realtime-js on v1 frames) gets all three in its presence_state.
        late = clients.node("realtime_v1", server.base)
        await late.join(topic, "late")
        await converge([*members, late], {k: [meta(k)] for k in ("phx", "sb", "py")})

    run(scenario, clients)


def test_update_reaches_the_others(server: Serve, clients: Clients) -> None:
    async def scenario() -> None:
        members = await trio(clients, server.base, new_topic("update"))
        versions = {"phx": 1, "sb": 1, "py": 1}
        for client, key in zip(members, ("phx", "sb", "py"), strict=True):
            versions[key] = 2
            await client.track(meta(key, 2))
            await converge(members, {k: [meta(k, v)] for k, v in versions.items()})

    run(scenario, clients)


def test_untrack_leaves(server: Serve, clients: Clients) -> None:
    async def scenario() -> None:
        phx, sb, py = await trio(clients, server.base, new_topic("untrack"))
        await phx.untrack()
        await converge([phx, sb, py], {"sb": [meta("sb")], "py": [meta("py")]})
        await py.untrack()
        await converge([phx, sb, py], {"sb": [meta("sb")]})
        await sb.untrack()
        await converge([phx, sb, py], {})

    run(scenario, clients)


@pytest.mark.parametrize("victim", ["phx", "sb"])
def test_killed_client_leaves(server: Serve, clients: Clients, victim: str) -> None:
    async def scenario() -> None:
        trio_ = await trio(clients, server.base, new_topic("kill"))
        members = dict(zip(("phx", "sb", "py"), trio_, strict=True))
        killed = members.pop(victim)
        assert isinstance(killed, NodeClient)
        killed.kill()
        await converge(list(members.values()), {k: [meta(k)] for k in members})

    run(scenario, clients)


def test_silent_client_leaves_after_the_connection_ttl(server: Serve, clients: Clients) -> None:
    async def scenario() -> None:
        topic = new_topic("silent")
        members = await trio(clients, server.base, topic)
        ws = await clients.raw(server.base)
        await raw_track(ws, topic, "silent", meta("silent"))
        last_frame = time.monotonic()  # the track: it sends nothing more
        everyone = {k: [meta(k)] for k in ("phx", "sb", "py", "silent")}
        await converge(members, everyone)
        await converge(members, {k: [meta(k)] for k in ("phx", "sb", "py")}, timeout=WAIT)
        took = time.monotonic() - last_frame
        print(f"the silent client left at the others {took:.2f} s after its last frame")
        assert took <= SILENT_LEAVE, f"the silent client left {took:.2f} s after its last frame"
        # And the server sent it away (1011: clients come back).
        async with asyncio.timeout(2):
            await ws.wait_closed()
        assert ws.close_code == 1011, ws.close_code

    run(scenario, clients)


def test_broadcast_honours_self(server: Serve, clients: Clients) -> None:
    async def scenario() -> None:
        topic = new_topic("broadcast")
        phx, sb = clients.node("phoenix", server.base), clients.node("realtime", server.base)
        # The JS clients join with ack: their send waits for the server's ok (the live client
        # reports "timed out" otherwise), for a text push (phoenix) and a binary one (sb).
        await phx.join(topic, "phx", self_broadcast=False, ack=True)
        await sb.join(topic, "sb", self_broadcast=True, ack=True)
        # name -> (client, joined with broadcast self)
        senders: dict[str, tuple[Client, bool]] = {
            "phx": (phx, False),
            "sb": (sb, True),  # vsn 2: its broadcasts are binary frames
            "py-self": (clients.python(server.base, "py-self"), True),
            "py": (clients.python(server.base, "py"), False),
        }
        for name in ("py-self", "py"):
            client, wants_self = senders[name]
            await client.join(topic, name, self_broadcast=wants_self)
        for name, (client, _) in senders.items():
            await client.broadcast("ping", {"from": name})

        def expected(receiver: str) -> list[str]:
            wants_self = senders[receiver][1]
            return sorted(s for s in senders if s != receiver or wants_self)

        def got(receiver: str) -> list[str]:
            return sorted(p["from"] for p in senders[receiver][0].broadcasts())

        all_clients = [client for client, _ in senders.values()]
        await eventually(
            lambda: all(got(name) == expected(name) for name in senders),
            "every broadcast at every receiver",
            *all_clients,
        )
        await asyncio.sleep(0.3)  # nothing more (a sender's own copy, a duplicate) comes late
        assert {name: got(name) for name in senders} == {name: expected(name) for name in senders}

    run(scenario, clients)


MALFORMED_TEXT = [
    "{not json",
    "42",  # a JSON number
    '"a string"',
    "null",
    '["1", "m1", "realtime:x", "phx_join"]',  # four elements
    '["1", "m2", "realtime:x", "phx_join", {}, "extra"]',  # six
    "[]",
    '{"topic": "realtime:x", "event": "phx_join"}',  # a v1 object, and incomplete, on v2
    '[null, null, 5, "phx_join", {}]',  # a topic that is not a string
    '["1", "m3", "realtime:y", "phx_join", {"config": {"presence": {"key": 5}}}]',  # key: 5
]
MALFORMED_BINARY = [
    b"\x00garbage",  # an unknown kind
    b"\xff" * 32,
    b"\x03",  # kind 3 and nothing else
    bytes([3, 5, 5, 5, 5, 0, 1]) + b"\xff" * 20,  # header fields that are not UTF-8
    bytes([3, 0, 0, 200, 1, 0, 1]) + b"ab",  # sizes past the end of the frame
]


def test_malformed_frames_leave_the_server_and_the_others_intact(
    server: Serve, clients: Clients
) -> None:
    """A frame that is not a Phoenix message ends its own socket with 1007 (as Phoenix's
    serializer does), and its presence leaves; a Phoenix message with a bad payload gets an
    error reply; the other clients see nothing else."""

    async def scenario() -> None:
        topic = new_topic("malformed")
        members = await trio(clients, server.base, topic)
        three = {k: [meta(k)] for k in ("phx", "sb", "py")}
        # Kind 3 with a joined topic but a body that is not JSON.
        sizes = [2, 2, len(topic.encode()), 4, 0]
        bad_json = bytes([3, *sizes, 1]) + b"j1b1" + topic.encode() + b"ping" + b"{nope"
        for frame in [*MALFORMED_TEXT[:-1], *MALFORMED_BINARY, bad_json]:
            ws = await clients.raw(server.base)
            await raw_track(ws, topic, "raw", meta("raw"))
            await converge(members, {**three, "raw": [meta("raw")]})
            await ws.send(frame)
            async with asyncio.timeout(WAIT):
                await ws.wait_closed()
            assert ws.close_code == 1007, (frame, ws.close_code)
            assert ws.close_reason and ws.close_reason.startswith("not a Phoenix message")
            await converge(members, three)
            assert health(server.port) == 200
        # A Phoenix message whose payload is wrong is answered with an error, and that is all.
        ws = await clients.raw(server.base)
        await ws.send(MALFORMED_TEXT[-1])
        assert (await reply_to(ws, "m3"))["status"] == "error"
        await ws.send(json.dumps([None, "hb", "phoenix", "heartbeat", {}]))
        assert (await reply_to(ws, "hb"))["status"] == "ok"
        assert all(c.state() == three for c in members)
        # An oversized frame closes that connection (1009), and only that one.
        await ws.send("x" * (MAX_FRAME + 1))
        async with asyncio.timeout(WAIT):
            await ws.wait_closed()
        assert ws.close_code == 1009, ws.close_code
        await converge(members, three)
        assert health(server.port) == 200
        # The others are still served: an update reaches them.
        await members[0].track(meta("phx", 2))
        await converge(members, {**three, "phx": [meta("phx", 2)]})

    run(scenario, clients)


# -- two servers sharing presence through Valkey ---------------------------------------------


@pytest.fixture(params=DOORS)
def two_servers(
    valkey: ValkeyServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Serve, Serve]]:
    """Two processes of one front door sharing presence through Valkey (for the ASGI app:
    two uvicorn processes, one worker each, as a process manager would run them)."""
    prefix = f"live-{uuid.uuid4().hex[:8]}"  # keys of our own in the shared valkey
    started: list[Serve] = []
    try:
        for _ in range(2):
            started.append(
                Serve(
                    tmp_path,
                    "--redis",
                    valkey.url,
                    "--prefix",
                    prefix,
                    "--liveness-timeout",
                    str(LIVENESS),
                    door=request.param,
                )
            )
        yield started[0], started[1]
    finally:
        for serve in started:
            serve.stop()


def test_presence_across_two_servers_and_a_killed_server(
    two_servers: tuple[Serve, Serve], clients: Clients
) -> None:
    a, b = two_servers

    async def scenario() -> None:
        topic = new_topic("redis")
        on_a: list[Client] = [clients.node("phoenix", a.base), clients.python(a.base, "a-py")]
        on_b: list[Client] = [clients.node("realtime", b.base), clients.python(b.base, "b-py")]
        keys_a, keys_b = ("a-phx", "a-py"), ("b-sb", "b-py")
        for client, key in zip(on_a + on_b, keys_a + keys_b, strict=True):
            await client.join(topic, key)
            await client.track(meta(key))
        await converge(on_a + on_b, {k: [meta(k)] for k in keys_a + keys_b})
        a.kill()
        took = await converge(on_b, {k: [meta(k)] for k in keys_b}, timeout=REDIS_LEAVE)
        print(f"server A's presences left at B's clients {took:.2f} s after its SIGKILL")
        assert health(b.port) == 200

    run(scenario, clients)
