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

from presence_core.server.cli import (
    Redactor,
    _env_names,
    _options,
    _parsers,
    main,
    parse_args,
    redact_url,
    redis_target,
)

EXE = shutil.which("presence-core") or str(Path(sys.executable).with_name("presence-core"))
# Every variable serve reads: the tests' servers start without the ones the caller's shell has.
SERVE_VARIABLES = {name for a in _options(_parsers()[1]) for name in _env_names(a.dest)}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables serve reads, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SERVE_VARIABLES}
    return {**env, **extra}


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
        log_json: bool = True,
    ) -> tuple[subprocess.Popen[bytes], int, Path]:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as output:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [EXE, "serve", "--port", str(port), *(["--log-json"] * log_json), *args],
                stdout=output,
                stderr=output,
                env=clean_env() if env is None else env,
                preexec_fn=preexec_fn,
            )
        procs.append(proc)

        def up() -> bool:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()}"
            return healthy(port)

        wait_until(up, 15, "presence-core serve to be healthy")
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
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args(["serve"], {})
    assert args.max_connections_per_ip is None  # unlimited: behind a proxy, one address
    assert args.messages_per_second == 200.0
    assert args.redis is None and args.dashboard_token is None
    assert args.host == "127.0.0.1" and args.allowed_origins is None
    args = parse_args(
        ["serve", "--max-connections-per-ip", "5", "--messages-per-second", "12.5"], {}
    )
    assert (args.max_connections_per_ip, args.messages_per_second) == (5, 12.5)

    # Empty variables count as unset.
    args = parse_args(
        ["serve"], {"PRESENCE_CORE_REDIS_URL": "", "PRESENCE_CORE_DASHBOARD_TOKEN": ""}
    )
    assert args.redis is None and args.dashboard_token is None
    # The variable gives --redis; --redis and --redis-cluster on the command line win.
    env = {"PRESENCE_CORE_REDIS_URL": "redis://:pw@env:6379"}
    assert redis_target(parse_args(["serve"], env)) == ("redis://:pw@env:6379", False)
    given = parse_args(["serve", "--redis", "redis://cli:6379"], env)
    assert redis_target(given) == ("redis://cli:6379", False)
    given = parse_args(["serve", "--redis-cluster", "redis://node:7000"], env)
    assert redis_target(given) == ("redis://node:7000", True)
    # --help says where the default comes from.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "$PRESENCE_CORE_REDIS_URL" in capsys.readouterr().out


def test_serve_options_come_from_environment_variables() -> None:
    env = {
        "PRESENCE_CORE_PORT": "5001",
        "PRESENCE_CORE_CONNECTION_TTL": "2.5",
        "PRESENCE_CORE_HOST": "::1",
        "PRESENCE_CORE_LOG_JSON": "Yes",
        "PRESENCE_CORE_NO_DASHBOARD": "off",
        "PRESENCE_CORE_PRIVATE_ONLY": "1",
        "PRESENCE_CORE_LOG_LEVEL": "DEBUG",
        "PRESENCE_CORE_SCALE": "connections=1:2, diff_p99_ms=3:4",
        "PRESENCE_CORE_ALLOWED_ORIGINS": "https://a.example, HTTPS://B.example/",
        "PRESENCE_CORE_JWT_SECRET": "s3cret-from-env",
        "PRESENCE_CORE_PRESENCE_KEY_CLAIM": "sub",
        "PRESENCE_CORE_MAX_CONNECTIONS_PER_IP": "7",
        "PRESENCE_CORE_NODE": "",  # empty: unset
    }
    args = parse_args(["serve"], env)
    assert (args.port, args.connection_ttl, args.host) == (5001, 2.5, "::1")
    assert args.log_json is True and args.no_dashboard is False and args.private_only is True
    assert args.log_level == "debug" and args.node is None
    assert [t.signal for t in args.scale] == ["connections", "diff_p99_ms"]
    assert args.allowed_origins == ["https://a.example", "https://b.example"]
    assert args.jwt_secret == "s3cret-from-env" and args.presence_key_claim == "sub"
    assert args.max_connections_per_ip == 7
    # Every option has its variable, named after it.
    assert {"PRESENCE_CORE_REDIS_PASSWORD", "PRESENCE_CORE_ALLOW_ANONYMOUS"} <= SERVE_VARIABLES
    assert "PRESENCE_CORE_MAX_BUFFERED_BYTES" in SERVE_VARIABLES and "REDIS_URL" in SERVE_VARIABLES
    # The command line wins, and repeating a list option there replaces the variable's list.
    args = parse_args(["serve", "--port", "6000", "--allowed-origins", "https://c.example"], env)
    assert args.port == 6000 and args.allowed_origins == ["https://c.example"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PRESENCE_CORE_LOG_JSON": "maybe"}, "$PRESENCE_CORE_LOG_JSON: expected true or false"),
        ({"PRESENCE_CORE_PORT": "abc"}, "$PRESENCE_CORE_PORT: invalid port: 'abc'"),
        ({"PRESENCE_CORE_LOG_LEVEL": "loud"}, "$PRESENCE_CORE_LOG_LEVEL: invalid choice: 'loud'"),
        ({"PRESENCE_CORE_SCALE": "nope=1:2"}, "$PRESENCE_CORE_SCALE: 'nope=1:2' is not SIGNAL"),
        (
            {"PRESENCE_CORE_ALLOWED_ORIGINS": "a.example"},
            "$PRESENCE_CORE_ALLOWED_ORIGINS: 'a.example' is not an origin",
        ),
        ({"PRESENCE_CORE_REDIS_PASSWORD": "pw"}, "--redis-password needs --redis"),
    ],
)
def test_a_bad_environment_value_exits_2_naming_the_variable(
    env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["serve"], env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"presence-core serve: error: {message}" in err, err


def test_redis_url_from_the_environment_and_the_password_merged_into_it() -> None:
    url = "redis://:pw@env:6379/0"
    assert redis_target(parse_args(["serve"], {"REDIS_URL": url})) == (url, False)
    # $PRESENCE_CORE_REDIS_URL wins over $REDIS_URL, a more specific option over both.
    env = {"REDIS_URL": url, "PRESENCE_CORE_REDIS_URL": "redis://ours:6379"}
    assert redis_target(parse_args(["serve"], env)) == ("redis://ours:6379", False)
    env["PRESENCE_CORE_REDIS_CLUSTER"] = "redis://node:7000"
    assert redis_target(parse_args(["serve"], env)) == ("redis://node:7000", True)
    # The command line wins over any variable, whichever of the two it names.
    given = parse_args(["serve", "--redis", "redis://cli:6379"], env)
    assert redis_target(given) == ("redis://cli:6379", False)
    # The password goes into the URL, percent-encoded; the log shows it as ***.
    env = {"REDIS_URL": "redis://user@h:6379/0", "PRESENCE_CORE_REDIS_PASSWORD": "p@ss/w:rd"}
    target, _ = redis_target(parse_args(["serve"], env))
    assert target == "redis://user:p%40ss%2Fw%3Ard@h:6379/0"
    assert redact_url(target) == "redis://user:***@h:6379/0"
    given = parse_args(
        ["serve", "--redis-cluster", "redis://:old@n:7000", "--redis-password", "new"], {}
    )
    assert redis_target(given) == ("redis://:new@n:7000", True)
    given = parse_args(["serve", "--redis", "unix:///tmp/r.sock?db=1", "--redis-password", "x"], {})
    assert redis_target(given) == ("unix:///tmp/r.sock?db=1&password=x", False)


def test_serve_options_from_a_toml_file_under_the_environment_and_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        "port = 4100\n"
        "[serve]\n"
        'host = "localhost"\n'
        "max_connections = 50\n"
        "connection-ttl = 3\n"  # an int for a float option
        "log-json = true\n"
        'allowed-origins = ["https://a.example", "https://b.example"]\n'
        'jwt-secret = "from-the-file"\n'
        'dashboard-token = ""\n'  # empty: unset
    )
    args = parse_args(["serve", "--config", str(config)], {})
    assert (args.port, args.host, args.max_connections) == (4100, "localhost", 50)
    assert args.connection_ttl == 3.0 and args.log_json is True
    assert args.allowed_origins == ["https://a.example", "https://b.example"]
    assert args.jwt_secret == "from-the-file" and args.dashboard_token is None
    # file < environment < command line; $PRESENCE_CORE_CONFIG names the file too.
    env = {"PRESENCE_CORE_CONFIG": str(config), "PRESENCE_CORE_PORT": "4200"}
    assert parse_args(["serve"], env).port == 4200
    assert parse_args(["serve", "--port", "4300"], env).port == 4300
    assert parse_args(["serve"], {}).port == 4000

    for text, message in [
        ("[serve]\njwt_secret = 'a'\nmax-conections = 5\n", "unknown option 'max-conections'"),
        ("port = 'abc'\n", ": port: invalid port: 'abc'"),
        ("port = 1.5\n", ": port: invalid port: '1.5'"),
        ("jwt-secret = 12\n", ": jwt-secret: expected a string, not a int"),
        ("log-json = 'maybe'\n", ": log-json: expected true or false"),
        ("log-level = 'loud'\n", ": log-level: invalid choice: 'loud'"),
        ("port = 1\n[serve]\nport = 2\n", "'port' is given twice"),
        ("config = 'other.toml'\n", "unknown option 'config'"),
        ("port = \n", "not valid TOML"),
    ]:
        config.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["serve", "--config", str(config)], {})
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"presence-core serve: error: --config {config}" in err and message in err, err
    with pytest.raises(SystemExit):
        parse_args(["serve", "--config", str(tmp_path / "missing.toml")], {})
    assert "No such file" in capsys.readouterr().err


def test_options_that_need_a_jwt_key_exit_2_without_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in SERVE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # --policy may add the current directory
    for argv in (
        ["--presence-key-claim", "sub"],
        ["--private-only"],
        ["--jwt-audience", "authenticated"],
        ["--policy", "json:loads", "--private-only"],  # a policy is no verifier
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "needs a JWT key to check tokens with: pass --jwt-secret or --jwks" in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--policy", "no_such_module_here:policy"])
    assert exit_info.value.code == 2
    assert "--policy no_such_module_here:policy: cannot import" in capsys.readouterr().err
    # --help shows no value given by the environment.
    monkeypatch.setenv("PRESENCE_CORE_JWT_SECRET", "jwt-secret-in-env")
    monkeypatch.setenv("PRESENCE_CORE_DASHBOARD_TOKEN", "token-in-env")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "PRESENCE_CORE_JWT_SECRET" in out and "-in-env" not in out


def test_the_redactor_hides_secrets_in_every_encoding() -> None:
    redact = Redactor(['s3cret/pass"wörd', None, "", "abc"])
    assert redact('pw s3cret/pass"wörd') == "pw ***"
    assert redact("redis://:s3cret%2Fpass%22w%C3%B6rd@h") == "redis://:***@h"
    assert redact(json.dumps({"m": 's3cret/pass"wörd'})) == '{"m": "***"}'
    assert redact("abc") == "abc"  # too short to be told from text


def test_serve_refuses_other_addresses_without_auth_and_bad_values_without_a_traceback() -> None:
    runs = {
        "open": ["--host", "0.0.0.0"],
        "level": ["--log-level", "foo"],
        "env": [],
    }
    envs = {"env": clean_env(PRESENCE_CORE_MAX_TOPICS="ten")}
    procs = {
        name: subprocess.Popen(
            [EXE, "serve", "--port", str(free_port()), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=envs.get(name, clean_env()),
        )
        for name, argv in runs.items()
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 2, (name, err)
            assert b"Traceback" not in out + err and out == b"", (name, out, err)
            outputs[name] = err.decode()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert (
        "presence-core serve: error: refusing to listen on 0.0.0.0 without authentication: "
        "pass --jwt-secret or --jwks (and --presence-key-claim sub) to verify clients, or "
        "--allow-anonymous to serve anyone who can reach the port"
    ) in outputs["open"]
    assert "argument --log-level: invalid choice: 'foo'" in outputs["level"]
    assert "$PRESENCE_CORE_MAX_TOPICS: invalid int value: 'ten'" in outputs["env"]


def test_serve_listens_on_every_address_with_allow_anonymous_and_warns(serve: object) -> None:
    proc, port, log = serve("--host", "0.0.0.0", "--allow-anonymous")  # type: ignore[operator]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    found = records(log)
    serving = next(str(r["message"]) for r in found if "serving" in str(r["message"]))
    assert f"ws://0.0.0.0:{port}/" in serving and "auth: anonymous allowed" in serving
    assert any(
        r["level"] == "warning" and "nothing is authenticated" in str(r["message"]) for r in found
    )


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


def test_serve_never_shows_its_secrets_even_at_debug_level(
    serve: object, valkey_factory: Callable[..., ValkeyServer]
) -> None:
    """A Redis password in $REDIS_URL, a JWT secret on the command line, a dashboard token in
    the environment and a client's token: none appears in the output, which says what is on."""
    import jwt

    redis = valkey_factory(password="redis-pw-not-for-logs")
    secret = "jwt-secret-not-for-logs-0123456789abcdef"
    env = clean_env(REDIS_URL=redis.url, PRESENCE_CORE_DASHBOARD_TOKEN="dash-token-not-for-logs")
    proc, port, log = serve(  # type: ignore[operator]
        "--jwt-secret", secret, "--log-level", "debug", env=env, log_json=False
    )
    claims = {"sub": "alice", "role": "authenticated", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, secret, algorithm="HS256")

    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/realtime/v1/websocket?vsn=2.0.0&apikey={token}"
        async with connect(url) as ws:
            join = {"config": {"presence": {"key": "alice"}}, "access_token": token}
            await ws.send(json.dumps(["1", "1", "realtime:room", "phx_join", join]))
            while json.loads(await asyncio.wait_for(ws.recv(), 5))[3] != "phx_reply":
                pass

    asyncio.run(main())
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    text = log.read_text()
    assert f"redis redis://:***@127.0.0.1:{redis.port}" in text and "auth: JWT secret" in text
    for shown in ("redis-pw-not-for-logs", secret, "dash-token-not-for-logs", token):
        assert shown not in text, shown

    # A wrong password: the start fails with one line, and quotes neither password.
    env = clean_env(
        PRESENCE_CORE_REDIS=f"redis://:other-pw-not-for-logs@127.0.0.1:{redis.port}",
        PRESENCE_CORE_REDIS_PASSWORD="wrong-pw-not-for-logs",
    )
    failed = subprocess.run(
        [EXE, "serve", "--port", str(free_port()), "--log-level", "debug"],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    output = (failed.stdout + failed.stderr).decode()
    assert failed.returncode == 2 and "presence-core serve: error:" in output, output
    assert "Traceback" not in output and "not-for-logs" not in output, output
