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
from typing import Any

from servers import pid_alive

from presence_core import Tracker
from presence_core.server import PresenceServer
from presence_core.server.bench import Membership, account

EXE = shutil.which("presence-core") or str(Path(sys.executable).with_name("presence-core"))


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
    server = report["server"]
    assert isinstance(server["cpu_percent_run"], float) and server["cpu_percent_run"] >= 0
    assert isinstance(server["rss_bytes"], int) and server["rss_bytes"] > 0
    for pid in report["worker_pids"]:
        assert not pid_alive(pid), f"worker {pid} still running"


def test_bench_runs_its_own_server(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--clients", "60", "--topics", "3", "--rate", "30", "--duration", "3"]
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
