"""``presence-core serve`` as a user runs it: a process, its health, its logs, its stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import ValkeyCluster, ValkeyServer, free_port, pid_alive, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from presence_core.server.cli import _parser, main, redact_url, redis_target

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

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], object] | None = None,
    ) -> tuple[subprocess.Popen[bytes], int, Path]:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as stderr:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [EXE, "serve", "--port", str(port), "--log-json", *args],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                preexec_fn=preexec_fn,
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


def status_of(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_drains_on_sigterm_not_ready_but_still_serving(serve: object) -> None:
    """With --drain-seconds, SIGTERM makes /health/ready answer 503 while the process still
    serves its clients and /health/live stays 200; then it stops gracefully."""
    proc, port, _log = serve("--drain-seconds", "2")  # type: ignore[operator]
    assert status_of(port, "/health/ready") == 200

    async def main() -> None:
        ws = await _track(port, "room", "alice", {})
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: status_of(port, "/health/ready") == 503, 1.5, "not ready")
        assert status_of(port, "/health/live") == 200
        await ws.send(json.dumps([None, "hb", "phoenix", "heartbeat", {}]))
        while json.loads(await asyncio.wait_for(ws.recv(), 5))[1] != "hb":
            pass
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(20):
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    asyncio.run(main())
    assert proc.wait(10) == 0


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


def records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def nofile_of(pid: int) -> tuple[int, int]:
    """The soft and hard open-files limits of a process, from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            unlimited = resource.RLIM_INFINITY
            return (
                unlimited if soft == "unlimited" else int(soft),
                unlimited if hard == "unlimited" else int(hard),
            )
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def test_serve_options_for_limits_and_their_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PRESENCE_CORE_REDIS_URL", raising=False)
    monkeypatch.delenv("PRESENCE_CORE_DASHBOARD_TOKEN", raising=False)
    args = _parser().parse_args(["serve"])
    assert args.max_connections_per_ip is None  # unlimited: behind a proxy, one address
    assert args.messages_per_second == 200.0
    assert args.redis is None and args.dashboard_token is None
    args = _parser().parse_args(
        ["serve", "--max-connections-per-ip", "5", "--messages-per-second", "12.5"]
    )
    assert (args.max_connections_per_ip, args.messages_per_second) == (5, 12.5)

    # Empty variables count as unset.
    monkeypatch.setenv("PRESENCE_CORE_REDIS_URL", "")
    monkeypatch.setenv("PRESENCE_CORE_DASHBOARD_TOKEN", "")
    args = _parser().parse_args(["serve"])
    assert args.redis is None and args.dashboard_token is None
    # The variable is --redis's default; --redis and --redis-cluster on the command line win.
    monkeypatch.setenv("PRESENCE_CORE_REDIS_URL", "redis://:pw@env:6379")
    assert redis_target(_parser().parse_args(["serve"])) == ("redis://:pw@env:6379", False)
    given = _parser().parse_args(["serve", "--redis", "redis://cli:6379"])
    assert redis_target(given) == ("redis://cli:6379", False)
    given = _parser().parse_args(["serve", "--redis-cluster", "redis://node:7000"])
    assert redis_target(given) == ("redis://node:7000", True)
    # --help says where the default comes from.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "$PRESENCE_CORE_REDIS_URL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@host", "redis://user@host"),
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:s3c@ret@host:6380", "rediss://:***@host:6380"),  # "@" in the password
        ("redis://host?password=s3cret&db=2", "redis://host?password=***&db=2"),
        ("unix:///tmp/r.sock?password=s3cret", "unix:///tmp/r.sock?password=***"),
        ("redis://u:s3cret@[::1:6379", "redis://***"),  # unparsable: the scheme alone
    ],
)
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3c" not in redact_url(url)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/<pid>/limits")
def test_serve_starts_with_an_empty_token_raises_its_open_files_limit_and_passes_limits(
    serve: object,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)

    def lower() -> None:  # start the child below its hard limit, as a login shell does
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    env = {**os.environ, "PRESENCE_CORE_DASHBOARD_TOKEN": ""}
    proc, port, log = serve(  # type: ignore[operator]
        "--max-connections-per-ip", "3", "--messages-per-second", "50", env=env, preexec_fn=lower
    )
    soft_now, hard_now = nofile_of(proc.pid)
    assert hard_now == hard
    if hard != resource.RLIM_INFINITY:
        assert soft_now == hard
    else:
        assert soft_now > low
    # The empty token left the dashboard open, as no token does.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/dashboard", timeout=5) as answer:
        assert answer.status == 200
    started = next(r for r in records(log) if r.get("event") == "server_started")
    limits = started["limits"]
    assert isinstance(limits, dict)
    assert limits["max_connections_per_ip"] == 3 and limits["messages_per_second"] == 50.0


def test_serve_takes_redis_from_the_environment_and_never_logs_its_password(
    serve: object, valkey_factory: Callable[..., ValkeyServer]
) -> None:
    redis = valkey_factory(password="pw-not-for-logs")
    env = {**os.environ, "PRESENCE_CORE_REDIS_URL": redis.url}
    proc, port, log = serve(env=env)  # type: ignore[operator]
    assert "pw-not-for-logs" not in " ".join(proc.args)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    text = log.read_text()
    assert "pw-not-for-logs" not in text
    serving = next(str(r["message"]) for r in records(log) if "serving" in str(r["message"]))
    assert f"redis redis://:***@127.0.0.1:{redis.port}" in serving, serving
