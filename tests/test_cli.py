"""``presence-core serve`` as a user runs it: a process, its health, its logs, its stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import ValkeyCluster, ValkeyServer, free_port, pid_alive, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

EXE = shutil.which("presence-core") or str(Path(sys.executable).with_name("presence-core"))


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], int, Path]:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as stderr:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [EXE, "serve", "--port", str(port), "--log-json", *args],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        procs.append(proc)
        wait_until(lambda: healthy(port), 15, "presence-core serve to be healthy")
        return proc, port, log

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        assert not any(pid_alive(p.pid) for p in procs)


async def _track(port: int, topic: str, key: str, meta: dict[str, object]) -> object:
    ws = await connect(f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0")
    await ws.send(json.dumps(["1", "1", topic, "phx_join", {"config": {"presence": {"key": key}}}]))
    await ws.send(json.dumps(["1", "2", topic, "presence", {"event": "track", "payload": meta}]))
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame[3] == "presence_diff":
            return ws


def test_serve_logs_json_and_stops_gracefully_on_sigterm(serve: object) -> None:
    proc, port, log = serve()  # type: ignore[operator]

    async def main() -> None:
        ws = await _track(port, "room", "alice", {"secret": "do-not-log"})
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(20):
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    asyncio.run(main())
    assert proc.wait(10) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    started = next(r for r in records if r.get("event") == "server_started")
    assert started["port"] == port and started["limits"]["max_connections"] == 20_000
    assert "do-not-log" not in log.read_text()


def test_serve_with_redis_shares_presence_between_two_processes(
    serve: object, valkey: ValkeyServer
) -> None:
    valkey.client().flushall()
    _, port_a, _ = serve("--redis", valkey.url)  # type: ignore[operator]
    _, port_b, _ = serve("--redis", valkey.url)  # type: ignore[operator]

    async def main() -> None:
        ws_a = await _track(port_a, "room", "alice", {})
        ws_b = await connect(f"ws://127.0.0.1:{port_b}/socket/websocket?vsn=2.0.0")
        await ws_b.send(json.dumps(["1", "1", "room", "phx_join", {"config": {}}]))
        deadline = time.monotonic() + 5
        seen: dict[str, object] = {}
        while "alice" not in seen and time.monotonic() < deadline:
            frame = json.loads(await asyncio.wait_for(ws_b.recv(), 5))
            if frame[3] == "presence_state":
                seen.update(frame[4])
            elif frame[3] == "presence_diff":
                seen.update(frame[4]["joins"])
        assert "alice" in seen
        await ws_a.close()
        await ws_b.close()

    asyncio.run(main())


def test_serve_with_redis_cluster_shares_presence_between_two_processes(
    serve: object, valkey_cluster: ValkeyCluster
) -> None:
    proc_a, port_a, _ = serve("--redis-cluster", valkey_cluster.url)  # type: ignore[operator]
    proc_b, port_b, _ = serve("--redis-cluster", valkey_cluster.url)  # type: ignore[operator]

    async def until(
        ws: ClientConnection, done: Callable[[dict[str, object], set[str]], bool]
    ) -> None:
        """Read frames until ``done(present, left)`` holds, within 10 s."""
        present: dict[str, object] = {}
        left: set[str] = set()
        async with asyncio.timeout(10):
            while not done(present, left):
                frame = json.loads(await ws.recv())
                if frame[3] == "presence_state":
                    present.update(frame[4])
                elif frame[3] == "presence_diff":
                    present.update(frame[4]["joins"])
                    left.update(frame[4]["leaves"])

    async def join(port: int, key: str) -> ClientConnection:
        """Join and track, leaving every frame to `until` (the state may list the other)."""
        ws = await connect(f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0")
        config = {"config": {"presence": {"key": key}}}
        await ws.send(json.dumps(["1", "1", "room", "phx_join", config]))
        track = {"event": "track", "payload": {"key": key}}
        await ws.send(json.dumps(["1", "2", "room", "presence", track]))
        return ws

    async def main() -> None:
        ws_a = await join(port_a, "alice")
        ws_b = await join(port_b, "bob")
        await until(ws_b, lambda present, left: "alice" in present)  # B has A's member
        await until(ws_a, lambda present, left: "bob" in present)  # and A has B's
        await ws_a.close()
        await until(ws_b, lambda present, left: "alice" in left)  # A's leave crossed too
        await ws_b.close()

    asyncio.run(main())
    for proc in (proc_a, proc_b):  # graceful stops, by PID
        os.kill(proc.pid, signal.SIGTERM)
    assert proc_a.wait(15) == 0 and proc_b.wait(15) == 0


class _Watcher:
    """A v2 client that keeps the set of keys it sees present (state and diffs applied)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.present: set[str] = set()
        self.replies = 0
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def join(cls, port: int, topic: str, key: str, track: bool = True) -> _Watcher:
        ws = await connect(f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0")
        join = {"config": {"presence": {"key": key}}}
        await ws.send(json.dumps(["1", "1", topic, "phx_join", join]))
        if track:
            await ws.send(
                json.dumps(["1", "2", topic, "presence", {"event": "track", "payload": {}}])
            )
        return cls(ws)

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                _, _, _, event, payload = json.loads(raw)
                if event == "presence_state":
                    self.present = set(payload)
                elif event == "presence_diff":
                    self.present -= set(payload["leaves"]) - set(payload["joins"])
                    self.present |= set(payload["joins"])
                elif event == "phx_reply":
                    self.replies += 1

    async def until(self, keys: set[str], timeout: float) -> float:
        """Seconds until exactly ``keys`` are present; fails after ``timeout``."""
        started = time.monotonic()
        while self.present != keys:
            assert time.monotonic() - started < timeout, f"saw {self.present}, want {keys}"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def close(self) -> None:
        await self.ws.close()
        await self.task


def test_serve_keeps_serving_while_redis_is_down_and_converges_after(
    serve: object, valkey_factory: Callable[..., ValkeyServer]
) -> None:
    """Redis SIGKILLed under two `serve --redis`: each keeps serving its own clients at once
    (joins, tracks, diffs, heartbeats never wait on Redis), and once Redis is back, empty,
    both processes see everyone again."""
    redis = valkey_factory()
    _, port_a, _ = serve("--redis", redis.url, "--liveness-timeout", "2")  # type: ignore[operator]
    _, port_b, _ = serve("--redis", redis.url, "--liveness-timeout", "2")  # type: ignore[operator]

    async def main() -> None:
        alice = await _Watcher.join(port_a, "room", "alice")
        bob = await _Watcher.join(port_b, "room", "bob")
        await alice.until({"alice", "bob"}, 10)
        await bob.until({"alice", "bob"}, 10)

        redis.kill()
        carol = await _Watcher.join(port_a, "room", "carol")  # on A, with Redis gone
        took = await alice.until({"alice", "bob", "carol"}, 2)
        print(f"a join on a server without Redis reached its neighbour in {took * 1000:.0f} ms")
        await carol.until({"alice", "bob", "carol"}, 2)
        replies = alice.replies
        await alice.ws.send(json.dumps([None, "9", "phoenix", "heartbeat", {}]))
        for _ in range(100):
            if alice.replies > replies:
                break
            await asyncio.sleep(0.01)
        assert alice.replies > replies, "a heartbeat waited on Redis"
        await asyncio.sleep(3.0)  # past the liveness timeout: no process is declared dead
        assert bob.present == {"alice", "bob"}

        redis.restart()  # empty, on the same port
        took = await bob.until({"alice", "bob", "carol"}, 20)
        print(f"after Redis came back, empty, B saw carol in {took:.2f} s")
        await alice.until({"alice", "bob", "carol"}, 5)
        await carol.close()
        await bob.until({"alice", "bob"}, 10)  # and the leave crosses again
        for watcher in (alice, bob):
            await watcher.close()

    asyncio.run(asyncio.wait_for(main(), 90))
