"""Our WebSocket server under ``presence-core bench``, against two plain relays in the same run.

Issue 8's targets compare ``presence-core serve`` with relays that have the same fan-out and do
no presence work: ``bench/relays/ws_relay.mjs`` (Node 20, the npm package ``ws``) and
``bench/relays/websockets_relay.py`` (``websockets``' asyncio server and its ``broadcast()``).
Both speak the Phoenix v2 subset the bench client uses: a join gets an ``ok`` reply and an
empty ``presence_state``; a track gets an ``ok`` reply and is relayed to every member of its
topic, the sender included, as one ``presence_diff`` serialized once; a leave or a closed socket
sends the members a leave diff.

Each server runs as a subprocess on a free loopback port, one after the other, and gets the same
load from `presence_core.server.bench.run_bench`: ``BENCH_SERVER_CLIENTS`` (19,900) clients over
``BENCH_SERVER_TOPICS`` (100) topics, so 199 members a topic; ``BENCH_SERVER_RATE`` (199) meta
updates a second in all for ``BENCH_SERVER_DURATION`` (30) seconds, and 5 % of the clients
switching channel once.  Every process started here is stopped by its PID.

The headline is **server CPU seconds per 1,000 delivered messages** (target: ours <= 1.2 x the
Node ``ws`` relay).  CPU comes from ``/proc/<pid>/stat``, sampled every 20 ms by a thread here
and interpolated at the run's start and at its last whole second; messages are the presence
joins the clients received in that same window (each update and each switch's track reaches
every member of its topic as one join, whichever server sends it; ours may put several joins in
one frame, the relays never do).  So CPU and messages cover the same seconds, and a server that
falls behind is charged for what it managed to deliver.  The table also gives the bench's own
figures: all-joined time, connect-to-joined p95, diff propagation p50/p99, channel switch p95,
delivered % and errors, the server's CPU during the run (% of one core) and its RSS at the end.

Nothing here asserts on time or on delivery: the table shows them.  Without ``node`` or
``tests/js/node_modules/ws`` (``npm ci --prefix tests/js``) the Node relay's run is skipped.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import websockets.version

import presence_core
from presence_core.server.bench import BenchConfig, raise_nofile, run_bench
from presence_core.server.loop import uvloop_installed
from presence_core.testing._process import _die_with_parent, _stop_process, free_port

BENCH = Path(__file__).resolve().parent
RELAYS = BENCH / "relays"
JS_DIR = BENCH.parent / "tests" / "js"

CLIENTS = int(os.environ.get("BENCH_SERVER_CLIENTS", "19900"))
TOPICS = int(os.environ.get("BENCH_SERVER_TOPICS", "100"))
RATE = float(os.environ.get("BENCH_SERVER_RATE", "199"))
DURATION = float(os.environ.get("BENCH_SERVER_DURATION", "30"))
SWITCH_FRACTION = 0.05
TARGET = 1.2  # ours <= 1.2 x Node ws, in server CPU seconds per 1,000 delivered messages

SERVERS = ("ours", "node-ws", "websockets")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SAMPLE_EVERY = 0.02

RESULTS: dict[str, dict[str, Any]] = {}


# -- the servers -------------------------------------------------------------------------------


def _node_unavailable() -> str | None:
    """Why the Node relay cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH (install Node.js 20 or later)"
    if not (JS_DIR / "node_modules" / "ws" / "package.json").is_file():
        return "tests/js/node_modules/ws is missing (npm ci --prefix tests/js)"
    return None


def _node_versions() -> str:
    if _node_unavailable() is not None:
        return "node -"
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10)
    manifest = json.loads((JS_DIR / "node_modules" / "ws" / "package.json").read_text())
    return f"node {node.stdout.strip()}, ws {manifest['version']}"


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket/websocket?vsn=2.0.0"

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:].decode("utf-8", "replace")


def _command(name: str, port: int) -> list[str]:
    if name == "ours":
        return [
            sys.executable,
            "-m",
            "presence_core.server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-connections",
            str(max(20_000, CLIENTS + 16)),
            "--log-level",
            "warning",
        ]
    if name == "node-ws":
        return ["node", str(RELAYS / "ws_relay.mjs"), "--port", "0"]
    return [sys.executable, str(RELAYS / "websockets_relay.py"), "--port", "0"]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_started(server: Server) -> None:
    """Ours answers GET /health; a relay prints ``listening <port>`` on stdout."""
    deadline = time.monotonic() + START_TIMEOUT
    if server.name == "ours":
        while not _healthy(server.port):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"presence-core serve did not start:\n{server.log_tail()}")
            time.sleep(0.05)
        return
    assert server.proc.stdout is not None
    ready, _, _ = select.select([server.proc.stdout], [], [], START_TIMEOUT)
    line = server.proc.stdout.readline().decode() if ready else ""
    word, _, port = line.strip().partition(" ")
    if word != "listening" or not port.isdigit():
        raise RuntimeError(f"{server.name} did not start ({line!r}):\n{server.log_tail()}")
    server.port = int(port)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, then SIGKILL if it has not exited in STOP_TIMEOUT seconds."""
    _stop_process(proc, STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def _started(name: str) -> Iterator[Server]:
    """One server on a free loopback port, stopped by its PID however the block ends."""
    port = free_port() if name == "ours" else 0
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            _command(name, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if name == "ours" else subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # Ctrl-C is ours: the bench stops its clients first
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            server = Server(name, proc, log, port)
            _wait_started(server)
            yield server
        finally:
            _stop(proc)


# -- the server's CPU over time ----------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """A thread reading a process's CPU seconds every SAMPLE_EVERY seconds, with wall times."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _sample(self) -> None:
        while True:
            now = time.time()
            try:
                cpu = _cpu_of(self.pid)
            except (OSError, ValueError, IndexError):
                return  # the process is gone
            self.times.append(now)
            self.cpu.append(cpu)
            if self.done.wait(SAMPLE_EVERY):
                return

    def at(self, when: float) -> float | None:
        """CPU seconds at wall time ``when``, interpolated between the two samples around it."""
        i = bisect.bisect_left(self.times, when)
        if i == 0 or i >= len(self.times):
            return None
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1


# -- the runs ----------------------------------------------------------------------------------


def _row(report: dict[str, Any], sampler: CpuSampler) -> dict[str, Any]:
    """What the table shows for one server."""
    seconds = int(DURATION)  # whole seconds from the run's start
    start = report["run_started_at"]
    cpu_start, cpu_end = sampler.at(start), sampler.at(start + seconds)
    messages = sum(row["count"] for row in report["diffs"]["per_second"] if row["second"] < seconds)
    cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    connect, diffs = report["connect"], report["diffs"]
    return {
        "joined": f"{connect['joined']:,}/{connect['clients']:,}",
        "all_joined_s": connect["all_joined_seconds"],
        "joined_p95_ms": connect["connect_to_joined_ms"]["p95"],
        "diff_p50_ms": diffs["latency_ms"]["p50"],
        "diff_p99_ms": diffs["latency_ms"]["p99"],
        "switch_p95_ms": report["switch"]["leave_to_state_ms"]["p95"],
        "delivered_percent": diffs["delivered_percent"],
        "missing": diffs["missing"],
        "errors": report["errors"],
        "error_count": report["error_count"],
        "cpu_percent": report["server"].get("cpu_percent_run"),
        "rss_bytes": report["server"].get("rss_bytes"),
        "window_s": seconds,
        "cpu_s": cpu,
        "messages": messages,
        "cpu_per_1k": None if cpu is None or not messages else cpu / messages * 1000.0,
        "warnings": report["warnings"],
    }


@pytest.mark.parametrize("name", SERVERS)
def test_server(name: str) -> None:
    if name == "node-ws" and (reason := _node_unavailable()) is not None:
        pytest.skip(f"the Node ws relay cannot run: {reason}")
    raise_nofile()  # the servers inherit it: one descriptor per client
    with _started(name) as server, CpuSampler(server.pid) as sampler:
        config = BenchConfig(
            url=server.url,
            server_pid=server.pid,
            clients=CLIENTS,
            topics=TOPICS,
            rate=RATE,
            duration=DURATION,
            switch_fraction=SWITCH_FRACTION,
            progress=sys.stderr.isatty(),
        )
        report = run_bench(config)
    RESULTS[name] = _row(report, sampler)


# -- the summary -------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table() -> list[str]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "",
        f"presence-core bench against each server: {CLIENTS:,} clients, {TOPICS:,} topics, "
        f"{RATE:g} updates/s, {DURATION:g} s, {SWITCH_FRACTION:.0%} switch once",
        f"python {platform.python_version()}, websockets {websockets.version.version}, "
        f"uvloop {uvloop_installed()}, USING_EXTENSION {presence_core.USING_EXTENSION}, "
        f"{_node_versions()}; load average {load}",
        "",
        f"{'server':<11} {'joined':>13} {'all in':>7} {'c2j p95':>8} {'diff p50':>9} "
        f"{'p99':>7} {'sw p95':>7} {'deliv %':>8} {'errors':>6} {'CPU %':>6} {'RSS MiB':>8} "
        f"{'msgs/s':>8} {'CPU s/1k':>9}",
    ]
    for name in SERVERS:
        r = RESULTS.get(name)
        if r is None:
            lines.append(f"{name:<11} (not run)")
            continue
        rss = None if r["rss_bytes"] is None else r["rss_bytes"] / (1 << 20)
        rate = r["messages"] / r["window_s"] if r["window_s"] else None
        lines.append(
            f"{name:<11} {r['joined']:>13} {_num(r['all_joined_s'], '.2f'):>6}s "
            f"{_num(r['joined_p95_ms'], '.1f'):>8} {_num(r['diff_p50_ms'], '.1f'):>9} "
            f"{_num(r['diff_p99_ms'], '.1f'):>7} {_num(r['switch_p95_ms'], '.1f'):>7} "
            f"{_num(r['delivered_percent'], '.3f'):>8} {r['error_count']:>6,} "
            f"{_num(r['cpu_percent'], '.1f'):>6} {_num(rss, '.1f'):>8} {_num(rate, ',.0f'):>8} "
            f"{_num(r['cpu_per_1k'], '.4f'):>9}"
        )
    lines.append(
        "  (times in ms but 'all in'; CPU % of one core during the run; CPU s/1k: server CPU "
        "seconds per 1,000 joins delivered, over the run's whole seconds)"
    )
    ours = RESULTS.get("ours", {}).get("cpu_per_1k")
    for anchor, target in (("node-ws", TARGET), ("websockets", None)):
        theirs = RESULTS.get(anchor, {}).get("cpu_per_1k")
        if ours is None or not theirs:
            continue
        ratio = ours / theirs
        if target is None:
            verdict = "(a data point)"
        else:
            verdict = f"target <= {target}x   {'PASS' if ratio <= target else 'MISS'}"
        lines.append(f"  ours / {anchor:<11} CPU per 1,000 messages  {ratio:5.2f}x   {verdict}")
    for name in SERVERS:
        r = RESULTS.get(name)
        if r is None:
            continue
        if r["errors"]:
            shown = ", ".join(f"{kind} {count:,}" for kind, count in r["errors"].items())
            lines.append(f"  {name} errors: {shown}")
        if r["missing"]:
            lines.append(f"  {name}: {r['missing']:,} diffs missing")
        for warning in r["warnings"]:
            lines.append(f"  {name} warning: {warning}")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in _table():
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)
