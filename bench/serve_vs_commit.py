"""Compare ``presence-core serve``'s CPU per delivered message between two checkouts, run by run.

    python bench/serve_vs_commit.py --old-src /tmp/old/src --new-src /tmp/new/src \
        --bench-src /tmp/new/src --clients 2000 10000 --topics 20 100 --pairs 5 \
        --duration 30 --pause 10 --idle-below 60 --max-other 30

With ``--old-door serve --new-door asgi`` (and one ``src`` for both) it compares the front
doors instead: ``serve`` against the ASGI app alone under uvicorn (``--factory
presence_core.asgi:from_environment``, uvloop, httptools, websockets-sansio), the same load.

``--old-src`` and ``--new-src`` are ``src`` folders with their extension built in place (e.g.
``git worktree add /tmp/old COMMIT && cd /tmp/old && python setup.py build_ext --inplace``).
Each run starts a fresh ``python -m presence_core.server.cli serve --port P`` with
``PYTHONPATH=<src>`` (loopback, in-process state, default options, GC on, logs to a file),
drives it with ``presence-core bench --url ... --server-pid PID --json ...`` (the same load
generator for both: ``--bench-src``, default the installed package), then stops the server by
its PID.  Runs alternate old/new, new/old, old/new ... (ABBA), one fresh server each, with a
pause between them for the sockets to drain.

Per run: the server's CPU during the bench's run phase (``server.cpu_percent_run`` times the
run's wall time, ``--duration`` plus the bench's 1 s settle) divided by the messages the
clients received: ``diffs.delivered`` (the meta updates' diffs, one per update per member: the
bench's delivery accounting) and, second, ``diffs.frames_received`` (every ``presence_diff``
frame, the channel switches' included).  The workload is the same for both (same seed, same
presence operations), so the first is CPU per unit of the same work; the second also moves
with how many diffs a server coalesces into one frame (fewer, fuller frames cost more each).
The table per size prints the median CPU-µs per message of each, the median of the per-pair
ratios NEW / OLD (above 1: NEW costs more), connect-to-joined p95, and whether every client
joined within the bench's timeout.  Nothing asserts.

On a shared machine (a VM, neighbours, frequency changes) the CPU a fixed piece of work costs
drifts by several % from one run to the next, for every process alike.  The bench's client
workers run the same code and do the same work against both servers, so the table also gives
the server's CPU over the workers' CPU, run by run, and its per-pair ratio: the machine's speed
cancels out of it (what a server's frame count changes in the workers' parsing does not).

A run that overlaps a process matching ``--busy-pattern`` (default: a pytest session) is
listed.  Before each pair the script waits (up to ``--wait-idle`` s) until the machine uses
less than ``--idle-below`` % of a core for ``--quiet-for`` s.  A pair in which other
processes used more than ``--max-other`` % of a core during a run (the bench's
``saturation.other_percent``) is thrown away and run again (up to ``--retries`` pairs per
size).  Every run, kept or not, is in ``runs.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

SETTLE = 1.0  # presence-core bench's pause between "go" and the run's start (its _SETTLE)

PROBE = (
    "import sys, presence_core, presence_core.table as t; "
    "print(presence_core.__file__, presence_core.USING_EXTENSION, "
    "getattr(t, 'PresenceTable').__module__)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy(pattern: str) -> list[str]:
    """Command lines of other processes matching pattern (pgrep -af), this script excluded."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    mine = {os.getpid()}
    return [
        line
        for line in out.splitlines()
        if line.split(" ", 1)[0].isdigit()
        and int(line.split(" ", 1)[0]) not in mine
        and "serve_vs_commit" not in line
        and "pgrep" not in line
    ]


def _timewait() -> int | None:
    out = subprocess.run(["ss", "-s"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("TCP:") and "timewait" in line:
            return int(line.split("timewait", 1)[1].split(",")[0].split(")")[0])
    return None


def _box_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


def box_busy(seconds: float = 5.0) -> float:
    """CPU the whole machine used over ``seconds``, in % of one core."""
    b0, _ = _box_ticks()
    time.sleep(seconds)
    b1, _ = _box_ticks()
    return (b1 - b0) / os.sysconf("SC_CLK_TCK") / seconds * 100.0


def probe(python: str, src: str) -> str:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [python, "-c", PROBE], env=env, cwd="/tmp", capture_output=True, text=True, check=True
    ).stdout.strip()
    path, ext, _ = out.split(" ")
    if not path.startswith(str(Path(src).resolve())):
        raise SystemExit(f"PYTHONPATH={src} imports {path}: not that tree")
    if ext != "True":
        raise SystemExit(f"PYTHONPATH={src}: USING_EXTENSION is {ext} (build it in place)")
    return out


class Watch(threading.Thread):
    """Polls for busy processes while a run goes on; remembers what it saw."""

    def __init__(self, pattern: str) -> None:
        super().__init__(daemon=True)
        self.pattern = pattern
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen.update(_busy(self.pattern))
            self.stop.wait(2.0)


def one_run(
    args: argparse.Namespace,
    label: str,
    src: str,
    clients: int,
    topics: int,
    outdir: Path,
    tag: str,
) -> dict[str, Any]:
    port = _free_port()
    log = open(outdir / f"{tag}-server.log", "wb")
    env = {**os.environ, "PYTHONPATH": src}
    env.pop("PRESENCE_CORE_REDIS_URL", None)
    env.pop("REDIS_URL", None)
    door = args.old_door if label == "old" else args.new_door
    if door == "serve":
        argv = [args.python, "-m", "presence_core.server.cli", "serve", "--port", str(port)]
    else:  # the ASGI app, alone under uvicorn as its README runs it (uvloop, httptools)
        argv = [args.python, "-m", "uvicorn", "--factory", "presence_core.asgi:from_environment"]
        argv += ["--port", str(port), "--loop", "uvloop", "--http", "httptools"]
        argv += ["--ws", "websockets-sansio", "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(
        argv,
        env=env,
        cwd="/tmp",
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    pid = server.pid
    watch = Watch(args.busy_pattern)
    watch.start()
    try:
        deadline = time.monotonic() + 30
        while not _healthy(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{label} server did not start; see {log.name}")
            time.sleep(0.05)
        cpu0 = _cpu_seconds(pid)
        report_path = outdir / f"{tag}.json"
        cmd = [
            args.python,
            "-m",
            "presence_core.server.bench",
            "--url",
            f"ws://127.0.0.1:{port}/socket/websocket",
            "--server-pid",
            str(pid),
            "--clients",
            str(clients),
            "--topics",
            str(topics),
            "--duration",
            str(args.duration),
            "--timeout",
            str(args.timeout),
            "--no-progress",
            "--json",
            str(report_path),
        ]
        if args.rate is not None:
            cmd += ["--rate", str(args.rate)]
        cmd += shlex.split(args.bench_args)
        benv = dict(os.environ)
        if args.bench_src:
            benv["PYTHONPATH"] = args.bench_src
        t = time.monotonic()
        bench = subprocess.run(cmd, env=benv, cwd="/tmp", capture_output=True, text=True)
        bench_wall = time.monotonic() - t
        cpu1 = _cpu_seconds(pid)
    finally:
        watch.stop.set()
        if server.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                server.wait(5)
        log.close()
    if not report_path.exists():
        raise SystemExit(
            f"{label}: bench wrote no report (exit {bench.returncode}):\n{bench.stderr[-3000:]}"
        )
    rep = json.loads(report_path.read_text())
    workers = sum(x or 0.0 for x in rep.get("clients_cpu_percent") or [])
    srv = rep["server"]
    d = rep["diffs"]
    c = rep["connect"]
    run_cpu = (srv["cpu_percent_run"] or 0.0) / 100.0 * (args.duration + SETTLE)
    whole_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "label": label,
        "tag": tag,
        "clients": clients,
        "topics": topics,
        "pid": pid,
        "bench_exit": bench.returncode,
        "bench_wall_s": round(bench_wall, 1),
        "cpu_percent_run": srv["cpu_percent_run"],
        "run_cpu_s": run_cpu,
        "cpu_s_connect": srv.get("cpu_seconds_connect"),
        "whole_bench_cpu_s": whole_cpu,
        "delivered": d["delivered"],
        "expected": d["expected"],
        "missing": d["missing"],
        "frames": d["frames_received"],
        "us_per_diff": run_cpu * 1e6 / d["delivered"] if d["delivered"] else float("nan"),
        "us_per_frame": run_cpu * 1e6 / d["frames_received"]
        if d["frames_received"]
        else float("nan"),
        "joined": c["joined"],
        "failed": c["failed"],
        "all_joined_s": c["all_joined_seconds"],
        "c2j_p95_ms": (c["connect_to_joined_ms"] or {}).get("p95"),
        "diff_p99_ms": (d["latency_ms"] or {}).get("p99"),
        "errors": rep["errors"],
        "warnings": rep["warnings"],
        "other_percent": (rep.get("saturation") or {}).get("other_percent"),
        "workers_percent": sum(x or 0.0 for x in rep.get("clients_cpu_percent") or []),
        "server_per_worker": (rep["server"]["cpu_percent_run"] or 0.0) / workers
        if workers
        else None,
        "rss_mb": (srv.get("rss_peak_bytes") or 0) / 2**20,
        "busy": sorted(watch.seen),
        "timewait_after": None,
    }


def show_run(r: dict[str, Any]) -> None:
    errs = ",".join(f"{k}={v}" for k, v in r["errors"].items()) or "-"
    busy = f" pytest-seen:{len(r['busy'])}" if r["busy"] else ""
    print(
        f"  {r['tag']:<14} {r['label']:<3} cpu_run {r['cpu_percent_run']:>5}%  "
        f"{r['us_per_diff']:7.2f} us/diff {r['us_per_frame']:7.2f} us/frame  "
        f"delivered {r['delivered']:,}/{r['expected']:,} frames {r['frames']:,}  "
        f"joined {r['joined']}/{r['clients']} in {r['all_joined_s']} s  "
        f"c2j p95 {r['c2j_p95_ms']} ms  diff p99 {r['diff_p99_ms']} ms  "
        f"rss {r['rss_mb']:.0f} MB  bench-workers {r['workers_percent']:.0f}%  "
        f"other {r['other_percent']}%  timewait {r['timewait_after']}  "
        f"exit {r['bench_exit']}  errors {errs}{busy}",
        flush=True,
    )


def table(clients: int, topics: int, pairs: list[tuple[dict, dict]], timeout: float) -> str:
    old = [o for o, _ in pairs]
    new = [n for _, n in pairs]
    med = statistics.median

    def m(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return med(vals) if vals else float("nan")

    ratios = [n["us_per_diff"] / o["us_per_diff"] for o, n in pairs]
    fratios = [n["us_per_frame"] / o["us_per_frame"] for o, n in pairs]
    wratios = [
        n["server_per_worker"] / o["server_per_worker"]
        for o, n in pairs
        if n["server_per_worker"] and o["server_per_worker"]
    ]
    lines = [
        f"\n{clients:,} clients, {topics} topics, {len(pairs)} pairs "
        f"(per-pair ratios NEW/OLD per delivered diff: {', '.join(f'{x:.3f}' for x in ratios)};"
        f" per frame: {', '.join(f'{x:.3f}' for x in fratios)};"
        f" server/workers CPU: {', '.join(f'{x:.3f}' for x in wratios)})",
        f"{'':36}{'old':>11}{'new':>11}{'new/old':>9}",
        f"{'server CPU-us per delivered diff':36}{m(old, 'us_per_diff'):11.3f}"
        f"{m(new, 'us_per_diff'):11.3f}{med(ratios):9.3f}   (median of per-pair ratios)",
        f"{'server CPU-us per diff frame':36}{m(old, 'us_per_frame'):11.3f}"
        f"{m(new, 'us_per_frame'):11.3f}{med(fratios):9.3f}",
        f"{'server CPU / bench workers CPU':36}{m(old, 'server_per_worker'):11.3f}"
        f"{m(new, 'server_per_worker'):11.3f}"
        f"{med(wratios) if wratios else float('nan'):9.3f}   (speed control, see above)",
        f"{'diff frames received (median)':36}{m(old, 'frames'):11,.0f}{m(new, 'frames'):11,.0f}",
        f"{'server CPU % during run':36}{m(old, 'cpu_percent_run'):11.1f}"
        f"{m(new, 'cpu_percent_run'):11.1f}",
        f"{'delivered update diffs (median)':36}{m(old, 'delivered'):11,.0f}"
        f"{m(new, 'delivered'):11,.0f}",
        f"{'connect-to-joined p95 ms (median)':36}{m(old, 'c2j_p95_ms'):11.1f}"
        f"{m(new, 'c2j_p95_ms'):11.1f}",
        f"{'all joined s (median)':36}{m(old, 'all_joined_s'):11.2f}{m(new, 'all_joined_s'):11.2f}",
        f"{'server CPU s, connect (median)':36}{m(old, 'cpu_s_connect'):11.2f}"
        f"{m(new, 'cpu_s_connect'):11.2f}",
    ]
    for name, rows in (("old", old), ("new", new)):
        ok = sum(1 for r in rows if r["joined"] == r["clients"] and not r["failed"])
        full = sum(1 for r in rows if r["delivered"] == r["expected"] and r["expected"])
        errs = sum(sum(r["errors"].values()) for r in rows)
        noisy = sum(1 for r in rows if r.get("noisy"))
        lines.append(
            f"{name}: all {clients:,} joined within the bench's {timeout:g} s timeout in "
            f"{ok}/{len(rows)} runs; 100 % delivered in {full}/{len(rows)}; errors {errs}; "
            f"runs that overlapped other work {noisy}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-src", required=True)
    p.add_argument("--new-src", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[2000, 10000])
    p.add_argument(
        "--topics",
        type=int,
        nargs="+",
        default=[20],
        help="one per --clients value, or one for all",
    )
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=None, help="bench --rate (default: its own)")
    p.add_argument(
        "--bench-args",
        default="",
        help="more presence-core bench options, one string (e.g. '--switch-fraction 0.3')",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="bench --timeout (join)")
    p.add_argument("--pause", type=float, default=10.0, help="seconds between runs")
    p.add_argument(
        "--max-timewait",
        type=int,
        default=12000,
        help="after a run, wait (up to 90 s more) until ss -s counts at most this many "
        "TIME_WAIT sockets",
    )
    p.add_argument("--python", default=sys.executable)
    p.add_argument(
        "--old-door",
        choices=("serve", "asgi"),
        default="serve",
        help="the front door the old side runs: presence-core serve, or the ASGI app under "
        "uvicorn (with --old-src = --new-src this compares the doors)",
    )
    p.add_argument("--new-door", choices=("serve", "asgi"), default="serve")
    p.add_argument(
        "--bench-src",
        default=None,
        help="PYTHONPATH for the load generator (default: the installed package)",
    )
    p.add_argument("--out", default=None, help="folder for the reports and server logs")
    p.add_argument("--busy-pattern", default="pytest")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=900.0,
        help="wait up to this long for no --busy-pattern process before each pair",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=10,
        help="pairs that overlapped other work thrown away per size, at most (past that they "
        "are kept and counted as noisy in the table)",
    )
    p.add_argument(
        "--quiet-for",
        type=float,
        default=15.0,
        help="seconds the machine must stay under --idle-below before a pair",
    )
    p.add_argument(
        "--idle-below",
        type=float,
        default=60.0,
        help="before a pair, wait until the machine uses less than this %% of a core",
    )
    p.add_argument(
        "--max-other",
        type=float,
        default=30.0,
        help="a run whose other processes (the bench's saturation.other_percent) used more "
        "than this %% of a core overlapped other work: its pair is repeated",
    )
    p.add_argument(
        "--strict-busy",
        action="store_true",
        help="also treat any --busy-pattern process as busy, even an idle one",
    )
    args = p.parse_args()
    if len(args.topics) == 1:
        args.topics = args.topics * len(args.clients)
    if len(args.topics) != len(args.clients):
        p.error("--topics: one value, or one per --clients value")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    outdir = Path(args.out or tempfile.mkdtemp(prefix="serve_vs_commit-"))
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"reports and server logs in {outdir}; RLIMIT_NOFILE {hard}")
    for label, src in (("old", args.old_src), ("new", args.new_src)):
        print(f"{label}: PYTHONPATH={src}: {probe(args.python, src)}")
    print(
        "load generator:",
        probe(args.python, args.bench_src) if args.bench_src else "installed presence_core",
    )
    tables = []
    everything: list[dict] = []
    for clients, topics in zip(args.clients, args.topics, strict=True):
        print(f"\n== {clients:,} clients, {topics} topics, {args.duration:g} s", flush=True)
        pairs: list[tuple[dict, dict]] = []
        i = 0
        retries = 0
        while len(pairs) < args.pairs:
            waited = time.monotonic()
            quiet = 0
            while time.monotonic() - waited < args.wait_idle:
                load = box_busy()
                busy = _busy(args.busy_pattern)
                if load < args.idle_below and not (busy and args.strict_busy):
                    quiet += 1
                    if quiet * 5.0 >= args.quiet_for:
                        break
                    continue
                quiet = 0
                print(
                    f"  machine busy ({load:.0f} % of a core), waiting:",
                    "; ".join(s[:80] for s in busy),
                    flush=True,
                )
                time.sleep(25)
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            got: dict[str, dict] = {}
            for label in order:
                src = args.old_src if label == "old" else args.new_src
                r = one_run(args, label, src, clients, topics, outdir, f"c{clients}-p{i}-{label}")
                time.sleep(args.pause)
                drain = time.monotonic() + 90.0
                while (_timewait() or 0) > args.max_timewait and time.monotonic() < drain:
                    time.sleep(5)
                r["timewait_after"] = _timewait()
                everything.append(r)
                show_run(r)
                got[label] = r
            i += 1
            noisy = [
                r["tag"]
                for r in got.values()
                if (r["other_percent"] or 0.0) > args.max_other or (args.strict_busy and r["busy"])
            ]
            for r in got.values():
                r["noisy"] = r["tag"] in noisy
            if noisy and retries < args.retries:
                retries += 1
                print(f"  {', '.join(noisy)}: other processes were busy; repeating the pair")
                continue
            pairs.append((got["old"], got["new"]))
            if noisy:
                print(f"  {', '.join(noisy)}: other processes were busy; kept (retries spent)")
        t = table(clients, topics, pairs, args.timeout)
        tables.append(t)
        print(t, flush=True)
    (outdir / "runs.json").write_text(json.dumps(everything, indent=1))
    print("\n" + "=" * 78 + "\n" + "\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
