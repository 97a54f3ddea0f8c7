"""``presence-core bench``: small real runs, against a server it starts and one already running."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from servers import ValkeyCluster, ValkeyServer, pid_alive
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri
from websockets.utils import accept_key

from presence_core import Tracker
from presence_core.server import PresenceServer
from presence_core.server.bench import TARGET_DEFAULTS, Membership, _Conn, account, checks, main
from presence_core.store import RedisStore

EXE = shutil.which("presence-core") or str(Path(sys.executable).with_name("presence-core"))

# Latency targets no machine misses: a run that tests something else must not fail on a busy
# machine's latencies (the CPU target stays: a tiny run is far from a core).
LOOSE = (
    *("--target", "all_joined_s=600"),
    *("--target", "connect_to_joined_p95_ms=60000"),
    *("--target", "diff_p99_ms=60000"),
    *("--target", "switch_p95_ms=60000"),
)


def _sane(stats: dict[str, Any]) -> None:
    """Percentiles are numbers, in order."""
    assert stats["count"] > 0
    values = [stats[k] for k in ("p50", "p95", "p99", "max") if k in stats]
    assert all(isinstance(v, int | float) and v >= 0 for v in values), stats
    assert values == sorted(values), stats


def _check(report: dict[str, Any], clients: int) -> None:
    assert report["connect"]["joined"] == clients
    assert report["connect"]["failed"] == 0
    assert report["error_count"] == 0, report["errors"]
    diffs = report["diffs"]
    assert diffs["expected"] > 0
    assert diffs["delivered"] == diffs["expected"]
    assert diffs["missing"] == 0
    assert diffs["delivered_percent"] == 100.0
    _sane(report["connect"]["connect_ms"])
    _sane(report["connect"]["connect_to_joined_ms"])
    _sane(diffs["latency_ms"])
    assert report["switch"]["switched"] == clients
    _sane(report["switch"]["leave_to_state_ms"])
    assert report["ops"]["updates_per_second"] > 0
    assert report["connections_held"] == clients
    assert report["server"] == report["servers"][0]
    for server in report["servers"]:
        assert isinstance(server["cpu_percent_run"], float) and server["cpu_percent_run"] >= 0
        assert isinstance(server["rss_bytes"], int) and server["rss_bytes"] > 0
    saturation = report["saturation"]
    assert saturation["cpus"] == os.cpu_count()
    names = [p["name"] for p in saturation["processes"]]
    assert "bench workers" in names and len(names) == len(report["servers"]) + 1
    cpus = [p["cpu_percent"] for p in saturation["processes"]]
    assert cpus == sorted(cpus, reverse=True)  # the busiest first
    assert saturation["used_percent"] == pytest.approx(sum(cpus), abs=0.2)
    for pid in report["worker_pids"]:
        assert not pid_alive(pid), f"worker {pid} still running"


def test_bench_runs_its_own_server(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--clients", "60", "--topics", "3", "--rate", "30", "--duration", "3", *LOOSE]
    started = time.monotonic()
    done = subprocess.run(
        [EXE, "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 30
    report = json.loads(out.read_text())
    assert report["parameters"]["clients"] == 60
    assert report["parameters"]["rate"] == 30
    assert report["server"]["started_here"] is True
    _check(report, 60)
    assert not pid_alive(report["server"]["pid"]), "the server it started is still running"
    assert "100 % of diffs delivered" in done.stdout
    assert "connect-to-joined" in done.stdout
    assert "\nsaturation  box: " in done.stdout
    assert "from other servers" not in done.stdout  # one server


def test_bench_jwt_secret_gives_each_client_a_token_its_server_verifies(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    secret = "bench-secret-" + "s3cr3t" * 6
    args = ["--clients", "30", "--topics", "3", "--rate", "15", "--duration", "2", *LOOSE]
    done = subprocess.run(
        [EXE, "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PRESENCE_CORE_JWT_SECRET": secret},  # the option's default
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    _check(report, 30)  # every client joined with its token, the key its sub: 0 errors
    assert report["parameters"]["jwt"] is True
    assert "--presence-key-claim" in report["server"]["command"]  # the server verified them
    assert report["server"]["cpu_seconds_connect"] >= 0
    assert "a JWT (HS256, sub = presence key) per client" in done.stdout
    for text in (done.stdout, done.stderr, out.read_text()):
        assert secret not in text


def test_bench_against_a_running_server(tmp_path: Path) -> None:
    out = tmp_path / "report.json"

    async def main() -> int:
        async with PresenceServer(Tracker(), port=0) as server:
            proc = await asyncio.create_subprocess_exec(
                EXE,
                "bench",
                "--url",
                server.url,
                "--server-pid",
                str(os.getpid()),
                "--clients",
                "40",
                "--topics",
                "2",
                "--rate",
                "20",
                "--duration",
                "2",
                "--no-progress",
                *LOOSE,
                "--json",
                str(out),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stderr.decode()
            for _ in range(200):  # the clients closed their sockets on the way out
                if server.connections == 0:
                    break
                await asyncio.sleep(0.01)
            return server.connections

    assert asyncio.run(main()) == 0
    report = json.loads(out.read_text())
    assert report["server"]["started_here"] is False
    _check(report, 40)


def _across_servers(report: dict[str, Any], servers: int) -> None:
    """Clients on every server, diffs crossing between them, every server stopped."""
    assert report["parameters"]["servers"] == servers
    assert len(report["servers"]) == len(set(report["parameters"]["urls"])) == servers
    assert sum(s["clients"] for s in report["servers"]) == report["parameters"]["clients"]
    assert all(s["clients"] > 0 for s in report["servers"])
    diffs = report["diffs"]
    assert diffs["from_other_servers"] > 0  # members of one topic sat on different servers
    _sane(diffs["latency_from_other_servers_ms"])
    total = report["servers_total"]
    assert total["known"] == servers
    assert total["rss_bytes"] == sum(s["rss_bytes"] for s in report["servers"])


def test_bench_starts_two_servers_sharing_a_redis_cluster(
    tmp_path: Path, valkey_cluster: ValkeyCluster
) -> None:
    out = tmp_path / "report.json"
    args = ["--clients", "60", "--topics", "3", "--rate", "30", "--duration", "3", *LOOSE]
    args += ["--servers", "2", "--redis-cluster", valkey_cluster.url]
    done = subprocess.run(
        [EXE, "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["server"]["started_here"] is True
    _check(report, 60)
    _across_servers(report, 2)
    for server in report["servers"]:
        assert not pid_alive(server["pid"]), f"server {server['pid']} still running"
        assert "--redis-cluster" in server["command"]
    assert len({s["node"] for s in report["servers"]}) == 2
    text = done.stdout
    assert "servers: 2 started here, sharing redis cluster " in text
    assert "\n  server 2  ws://127.0.0.1:" in text
    assert "\nserver 2    CPU " in text and "\nservers     CPU " in text
    assert "\nsaturation  box: " in text and "server 2: " in text
    assert "busiest server CPU <= 1 core" in text
    assert "100 % of diffs delivered" in text


def test_bench_spreads_its_clients_over_running_servers_sharing_redis(
    tmp_path: Path, valkey: ValkeyServer
) -> None:
    out = tmp_path / "report.json"
    prefix = f"bench-test-{os.getpid()}"

    async def main() -> None:
        a, b = Tracker(clock=time.time), Tracker(clock=time.time)
        async with (
            RedisStore(a, valkey.url, prefix=prefix),
            RedisStore(b, valkey.url, prefix=prefix),
            PresenceServer(a, port=0) as server_a,
            PresenceServer(b, port=0) as server_b,
        ):
            pid = str(os.getpid())  # both in this process: each reports its CPU
            proc = await asyncio.create_subprocess_exec(
                EXE,
                "bench",
                *("--url", server_a.url, "--url", server_b.url),
                *("--server-pid", pid, "--server-pid", pid),
                *("--clients", "40", "--topics", "2", "--rate", "20", "--duration", "2"),
                *("--no-progress", *LOOSE, "--json", str(out)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stderr.decode()

    asyncio.run(main())
    report = json.loads(out.read_text())
    assert report["server"]["started_here"] is False
    _check(report, 40)
    _across_servers(report, 2)


def test_bench_exits_1_when_a_check_is_missed_and_0_when_every_one_is_met(
    tmp_path: Path,
) -> None:
    base = ["--clients", "12", "--topics", "2", "--rate", "12", "--duration", "1"]
    base += ["--no-progress", *LOOSE]

    def bench(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        out = tmp_path / "report.json"
        done = subprocess.run(
            [EXE, "bench", *base, *args, "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        report: dict[str, Any] = json.loads(out.read_text())  # written either way
        return done, {check["name"]: check for check in report["checks"]}

    # No diff crosses a process in no time: a limit of 0 ms is missed.
    done, found = bench("--target", "diff_p99_ms=0")
    assert done.returncode == 1, done.stderr
    line = next(x for x in done.stdout.splitlines() if "diff propagation p99 <= 0 ms" in x)
    assert line.endswith("MISSED")
    assert "presence-core bench: missed: diff propagation p99 <= 0 ms" in done.stderr
    assert found["diff_p99_ms"]["met"] is False and found["diff_p99_ms"]["limit"] == 0
    assert found["diff_p99_ms"]["value"] > 0
    assert all(check["met"] for name, check in found.items() if name != "diff_p99_ms")

    done, found = bench()
    assert done.returncode == 0, done.stderr
    assert "MISSED" not in done.stdout and "missed" not in done.stderr
    assert all(check["met"] is True for check in found.values()), found
    assert set(found) == {*TARGET_DEFAULTS, "errors", "delivered", "joined"}


def test_a_check_that_was_not_measured_fails_nothing() -> None:
    def summary(p: float | None) -> dict[str, Any]:
        return {"count": 0 if p is None else 1, "p95": p, "p99": p}

    report: dict[str, Any] = {
        "parameters": {"targets": {"diff_p99_ms": 10.0}},
        "server": {"cpu_percent_run": None},  # a --url server without --server-pid
        "connect": {
            "clients": 2,
            "joined": 2,
            "all_joined_seconds": 0.5,
            "connect_to_joined_ms": summary(3.0),
        },
        "diffs": {"expected": 4, "delivered": 4, "latency_ms": summary(12.0)},
        "switch": {"leave_to_state_ms": summary(None)},  # --no-switch
        "error_count": 0,
    }
    found = {check["name"]: check for check in checks(report)}
    assert found["server_cpu_percent"]["met"] is None
    assert found["switch_p95_ms"]["met"] is None
    assert found["diff_p99_ms"]["met"] is False  # 12 ms against the given 10
    assert found["connect_to_joined_p95_ms"]["met"] is True  # the default, 100 ms
    assert found["connect_to_joined_p95_ms"]["limit"] == TARGET_DEFAULTS["connect_to_joined_p95_ms"]
    report["diffs"]["delivered"] = 3
    assert {c["name"] for c in checks(report) if c["met"] is False} == {"diff_p99_ms", "delivered"}


def test_bench_refuses_servers_it_cannot_share() -> None:
    cases = [
        (["--servers", "2"], "--redis"),
        (["--url", "ws://127.0.0.1:9/socket", "--servers", "2"], "--url once per server"),
        (["--url", "ws://127.0.0.1:9/socket", "--redis", "redis://x"], "not --url"),
        (
            ["--url", "ws://127.0.0.1:9/s", "--url", "ws://127.0.0.1:8/s", "--server-pid", "1"],
            "once per --url",
        ),
        (["--target", "p100=1"], "'p100' is not a target"),
        (["--target", "diff_p99_ms=-1"], "must be a number >= 0"),
        (["--target", "diff_p99_ms"], "is not NAME=LIMIT"),
    ]
    for args, reason in cases:
        done = subprocess.run([EXE, "bench", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert reason in done.stderr, (args, done.stderr)


def test_bench_says_when_the_machine_cannot_hold_the_clients() -> None:
    done = subprocess.run(
        [EXE, "bench", "--clients", "1000000", "--processes", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert "descriptors" in done.stderr or "ephemeral ports" in done.stderr
    assert "Traceback" not in done.stderr


def test_account_counts_missing_diffs_and_in_flight_ones_only_where_delivered() -> None:
    # topic 0: updates 1 (sent 10, acknowledged 10.1) and 2 (20, 20.1)
    updates = [(1, 0, 10.0, 10.1), (2, 0, 20.0, 20.1), (3, 1, 15.0, 0.0)]
    complete = Membership(0, start=5.0, received=array("q", [1, 2]))
    lost_one = Membership(0, start=5.0, received=array("q", [2]))
    joined_late = Membership(0, start=12.0, received=array("q", [2]))
    # left after update 1's diff and before update 2 was surely flushed: 2 is not expected
    left = Membership(0, start=5.0, end=20.05, max_stamp=15.0, received=array("q", [1]))
    tally = account([complete, lost_one, joined_late, left], updates)
    assert tally["missing"] == 1
    assert tally["delivered"] == 2 + 1 + 1 + 1
    assert tally["expected"] == tally["delivered"] + tally["missing"]
    assert tally["duplicates"] == tally["unexpected"] == 0


def test_account_across_servers_trusts_only_a_later_diff_from_the_same_server() -> None:
    # update 2 was sent through server 0; the members below sit on server 1 and left at 30
    updates = [(1, 0, 10.0, 10.1, 1), (2, 0, 20.0, 20.1, 0)]
    # a later diff came from server 1's clients only: update 2 may still have been crossing
    # through Redis when the member left, so it is not expected
    own_only = Membership(0, start=5.0, end=30.0, max_stamp=25.0, received=array("q", [1]))
    own_only.max_stamp_from = {1: 25.0, 0: 9.0}
    # a later diff from server 0 arrived: update 2's came before it, so it was lost
    lost = Membership(0, start=5.0, end=30.0, max_stamp=25.0, received=array("q", [1]))
    lost.max_stamp_from = {1: 12.0, 0: 25.0}
    tally = account([own_only, lost], updates)
    assert tally["delivered"] == 1 + 1
    assert tally["expected"] == 1 + 2  # update 1 for both, update 2 for `lost` only
    assert tally["missing"] == 1


# -- the bench client's own frame parser -----------------------------------------------------------


class _Transport:
    """What a `_Conn` writes, and whether it closed its socket."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def _client_frame(data: bytes) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of one frame the client wrote; it must be masked."""
    assert data[1] & 0x80, "a client frame must be masked"
    length, start = data[1] & 0x7F, 2
    if length == 126:
        length, start = int.from_bytes(data[2:4], "big"), 4
    mask = data[start : start + 4]
    payload = data[start + 4 : start + 4 + length]
    return data[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return Frame(Opcode(opcode), payload, fin).serialize(mask=False, extensions=[])


def _open_conn() -> tuple[_Conn, _Transport, list[bytes], asyncio.AbstractEventLoop]:
    """A `_Conn` past its handshake, its texts collected instead of read as Phoenix frames."""
    loop = asyncio.new_event_loop()
    worker = SimpleNamespace(
        wsuris=[parse_uri("ws://127.0.0.1:1/socket/websocket?vsn=2.0.0")],
        servers=1,
        loop=loop,
        connect_ms=[],
        spec=SimpleNamespace(heartbeat=3600.0),
    )
    conn = _Conn(worker, 7, 0)  # type: ignore[arg-type]
    texts: list[bytes] = []
    conn._text = lambda data: texts.append(bytes(data))  # type: ignore[method-assign]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    request = transport.written[0].decode()
    key = next(
        line.split(":", 1)[1].strip()
        for line in request.split("\r\n")
        if line.lower().startswith("sec-websocket-key:")
    )
    response = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode()
    # the response and the first frame in one segment: the frame is parsed by the bench
    conn.data_received(response + _server_frame(1, b'"first"'))
    assert conn.framing and texts == [b'"first"']
    transport.written.clear()  # the request and the join
    return conn, transport, texts, loop


def test_the_client_parses_server_frames_however_they_are_split() -> None:
    conn, transport, texts, loop = _open_conn()
    try:
        medium, large = b"m" * 300, b"L" * 70_000  # 2- and 8-byte extended lengths
        stream = (
            _server_frame(1, b"a")
            + _server_frame(1, medium)
            + _server_frame(2, b"binary is ignored")
            + _server_frame(1, b"frag", fin=False)
            + _server_frame(9, b"ping!")  # a control frame between fragments
            + _server_frame(0, b"ment", fin=False)
            + _server_frame(0, b"ed", fin=True)
            + _server_frame(10, b"unsolicited pong")
            + _server_frame(1, large)
        )
        expected = [b'"first"', b"a", medium, b"fragmented", large]
        conn.data_received(stream)  # at once
        assert texts == expected
        for size in (1, 3, 7, 1000):  # and in pieces
            del texts[1:]
            for i in range(0, len(stream), size):
                conn.data_received(stream[i : i + size])
            assert texts == expected, size
            assert not conn.buffer
        pongs = [_client_frame(w) for w in transport.written]
        assert pongs == [(0xA, b"ping!")] * 5
        assert not transport.closed
        assert conn.ws.state is State.OPEN
    finally:
        loop.close()


def test_the_client_answers_a_close_and_a_protocol_error() -> None:
    conn, transport, texts, loop = _open_conn()
    try:
        close = _server_frame(8, (4001).to_bytes(2, "big") + b"bye")
        conn.data_received(close + _server_frame(1, b"after the close"))
        assert [_client_frame(w) for w in transport.written] == [(8, close[2:])]  # echoed
        assert transport.closed and conn.close_code == 4001
        assert texts == [b'"first"']  # nothing read after the close
    finally:
        loop.close()
    conn, transport, texts, loop = _open_conn()
    try:
        masked = Frame(Opcode.TEXT, b"masked").serialize(mask=True, extensions=[])
        conn.data_received(masked)
        opcode, payload = _client_frame(transport.written[0])
        assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1002
        assert transport.closed and conn.close_code is None  # counted as connection_lost
        assert texts == [b'"first"']
    finally:
        loop.close()


def test_bench_plots_latency_connections_and_server_cpu_over_time(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image  # noqa: PLC0415 - optional extra, in the test extra

    out, png = tmp_path / "report.json", tmp_path / "bench.png"
    args = ["--clients", "200", "--topics", "4", "--duration", "3", "--no-progress", *LOOSE]
    done = subprocess.run(
        [EXE, "bench", *args, "--json", str(out), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert 500 <= width <= 2000 and 500 <= height <= 2000, (width, height)

    report = json.loads(out.read_text())
    _check(report, 200)
    timeline = report["timeline"]
    assert 0 < timeline["run_from"] < timeline["run_to"]
    assert timeline["run_to"] - timeline["run_from"] == pytest.approx(3.0, abs=0.01)
    latency = timeline["diff_latency_ms"]
    assert [r["second"] for r in latency] == list(range(len(latency))) and len(latency) >= 3
    for row in latency:
        assert timeline["run_from"] < row["t"] < timeline["run_to"] + 1
        assert 0 <= row["p50"] <= row["p95"] <= row["p99"] <= row["max"]
    assert sum(r["count"] for r in latency) == report["diffs"]["latency_ms"]["count"]
    joined = [c[1] for c in timeline["connections"]]
    assert joined[0] == 0 and joined[-1] == 200 and joined == sorted(joined)
    times = [c[0] for c in timeline["server_cpu_percent"]]
    assert len(times) >= 4 and times == sorted(times)
    assert all(len(c[1]) == 1 and c[1][0] is not None for c in timeline["server_cpu_percent"])
    assert max(c[1][0] for c in timeline["server_cpu_percent"]) > 0


def test_bench_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    png = tmp_path / "bench.png"
    assert main(["--clients", "10", "--duration", "1", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "presence-core[plot]"' in err and "matplotlib" in err
    assert not png.exists()
