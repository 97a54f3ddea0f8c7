"""The Tracker against its own table and a plain-Python tracker.

Five measurements, each next to a plain-Python equivalent in the same run:

1. ``tracker-1-heartbeat`` / ``tracker-1-heartbeat_many``: 250,000 connections in 4 topics
   each (1,000,000 presences), built once for the module.  A round heartbeats a batch of
   100,000 random connections, with the same loop for `Tracker.heartbeat`, the native
   `PresenceTable.touch` on a table of the same 250,000 ids, and `PlainTracker.heartbeat`;
   ``heartbeat_many`` takes the same batch in chunks of 10,000.
2. ``tracker-2-track``: new presences into a fresh tracker (25,000 connections x 4 topics a
   round), each with its own meta dict built in the loop as if parsed off the wire.  Memory per
   presence is a tracemalloc delta over building 1,000,000 presences (then flushed: steady state),
   next to the cost of the same 1,000,000 meta dicts on their own and to `PlainTracker`'s.
3. ``tracker-3-diff-dict`` / ``tracker-3-diff-raw``: one topic, 2,000 subscribers; a round is one
   ``track()`` + ``flush()``, and a sample is the time from before ``track()`` to the last
   subscriber's callback (``time.perf_counter``).  p50/p95/p99 over 300 samples, garbage
   collector on (a host runs with it on).
4. ``tracker-4-count`` / ``tracker-4-page``: a topic of 100,000 members; ``count`` per call, at
   100,000 and at 10 members, against counting via ``list``; ``page(limit=1000)`` at a random
   cursor against ``list`` of the whole topic.

5. ``tracker-5-gc``: a full ``gc.collect()`` with the 1,000,000 presences of (1) alive, against
   the same collection with the plain tracker's presences alive instead.

Ids are random strings made before anything is timed or traced, so neither timings nor memory
include them.  The garbage collector stays on during timed rounds, as in a real process: a
structure that gives the collector much to walk pays for it here.
The module prints a summary (target, measured, PASS/MISS) after its last test; it asserts no
timing.  ``PRESENCE_BENCH_TRACKER_CONNS`` (default 250,000) and
``PRESENCE_BENCH_TRACKER_MEMBERS`` (default 100,000) shrink the run for a quick look.
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from tracker_baseline import PlainTracker

import presence_core
from presence_core import PresenceTable
from presence_core.tracker import Tracker

CONNS = int(os.environ.get("PRESENCE_BENCH_TRACKER_CONNS", "250000"))
MEMBERS = int(os.environ.get("PRESENCE_BENCH_TRACKER_MEMBERS", "100000"))
TOPICS = ("room:1", "room:2", "room:3", "room:4")
SEED = 20_241_122
TTL = 3600.0  # nothing expires during a run
MAX_CONNECTIONS = 1_000_000  # the Tracker's default; the bare table gets the same capacity

BATCH = min(100_000, CONNS)  # heartbeats per round
MANY_CHUNK = min(10_000, BATCH)  # connections per heartbeat_many / touch_many call
HEARTBEAT_ROUNDS = 10
TRACK_CONNS = min(25_000, CONNS)  # connections per track round (x 4 topics)
TRACK_ROUNDS = 5
SUBSCRIBERS = 2_000
DIFF_SAMPLES = 300
DIFF_WARMUP = 20
DIFF_TOPIC = "room:diff"
DIFF_MEMBERS = 100  # present before the samples start
COUNT_CALLS = 10_000  # count() calls per round
PAGE_LIMIT = 1_000
BIG, SMALL = "room:big", "room:small"
SMALL_MEMBERS = 10

# The targets this module reports on.
HEARTBEAT_TARGET = 2.0  # heartbeat(conn) <= 2x table.touch(key)
MEMORY_TARGET = 2.0  # bytes per presence <= 2x the bare meta dict
DIFF_P99_TARGET_MS = 2.0
COUNT_TARGET = 2.0  # O(1): count at 100k members <= 2x count at 10 members
PAGE_TARGET = 0.05  # a 1,000-key page <= 5% of list() of 100,000 keys (ideal: 1%)
GC_TARGET_MS = 50.0  # a full collection with 1,000,000 presences alive

# name -> measured value, filled by the tests and printed by the summary.
RESULTS: dict[str, float] = {}


def new_meta() -> dict[str, Any]:
    return {"status": "online", "device": "ios", "online_at": 1732300000}


def track_all(subject: Any, pairs: Iterable[tuple[str, str]]) -> None:
    """Every (connection, key) joins every topic, each with a fresh meta: the same loop for all."""
    track = subject.track
    for conn, key in pairs:
        for topic in TOPICS:
            track(conn, topic, key, {"status": "online", "device": "ios", "online_at": 1732300000})


def random_ids(n: int, prefix: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    ids = [f"{prefix}{rng.getrandbits(64):016x}" for _ in range(n)]
    if len(set(ids)) != n:
        raise AssertionError("duplicate benchmark ids")
    return ids


def random_batches(items: list[str], size: int, count: int, seed: int) -> list[list[str]]:
    """``count`` batches of ``size`` items, cut from back-to-back random permutations."""
    rng = random.Random(seed)
    pool: list[str] = []
    out: list[list[str]] = []
    while len(out) < count:
        if len(pool) < size:
            fresh = list(items)
            rng.shuffle(fresh)
            pool.extend(fresh)
        out.append(pool[:size])
        del pool[:size]
    return out


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure(
    benchmark: Any,
    run: Callable[..., Any],
    next_args: Callable[[], tuple[Any, ...]],
    *,
    name: str,
    ops: int,
    rounds: int,
    warmup_rounds: int = 1,
) -> None:
    """Time ``run(*next_args())`` per round, GC on; record the median ns per operation."""
    benchmark.extra_info.update(variant=name, ops=ops)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return next_args(), {}

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None with --benchmark-disable
        RESULTS[name] = stats.stats.median / ops * 1e9


def cycle(items: list[Any]) -> Callable[[], tuple[Any, ...]]:
    """A ``next_args`` handing out ``items`` in order, one per round, from the first."""
    it = iter(items)
    return lambda: (next(it),)


# -- shared subjects ------------------------------------------------------------------------


@dataclass
class Ids:
    conns: list[str]
    keys: list[str]


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids(random_ids(CONNS, "conn-", SEED), random_ids(CONNS, "user-", SEED + 1))


@dataclass
class Big:
    tracker: Tracker
    table: Any
    plain: PlainTracker
    batches: list[list[str]]
    chunked: list[list[list[str]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def big(ids: Ids) -> Big:
    """CONNS connections x 4 topics in a Tracker, in a PlainTracker, and CONNS ids in a table."""
    pairs = list(zip(ids.conns, ids.keys, strict=True))
    gc.collect()
    start = time.perf_counter()
    tracker = Tracker(connection_ttl=TTL, max_connections=MAX_CONNECTIONS)
    track_all(tracker, pairs)
    RESULTS["build.tracker_s"] = time.perf_counter() - start
    start = time.perf_counter()
    tracker.flush()
    RESULTS["build.flush_s"] = time.perf_counter() - start
    assert tracker.totals().presences == CONNS * len(TOPICS)

    start = time.perf_counter()
    plain = PlainTracker(connection_ttl=TTL)
    track_all(plain, pairs)
    plain.flush()
    RESULTS["build.plain_s"] = time.perf_counter() - start

    table = PresenceTable(MAX_CONNECTIONS, track_dirty=False)  # as the Tracker makes its own
    upsert = table.upsert
    value = object()
    for conn in ids.conns:
        upsert(conn, value, TTL)

    batches = random_batches(ids.conns, BATCH, HEARTBEAT_ROUNDS + 1, SEED + 2)
    chunked = [[b[i : i + MANY_CHUNK] for i in range(0, len(b), MANY_CHUNK)] for b in batches]
    gc.collect()
    return Big(tracker, table, plain, batches, chunked)


# -- 1. heartbeat ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="tracker-1-heartbeat")
@pytest.mark.parametrize("variant", ["tracker.heartbeat", "table.touch", "plain.heartbeat"])
def test_heartbeat(benchmark: Any, big: Big, variant: str) -> None:
    """One call per connection, the same loop over the same random batch for each variant."""
    beat = {
        "tracker.heartbeat": big.tracker.heartbeat,
        "table.touch": big.table.touch,
        "plain.heartbeat": big.plain.heartbeat,
    }[variant]
    assert beat(big.batches[0][0]) is True

    def run(batch: list[str]) -> None:
        call = beat
        for conn in batch:
            call(conn)

    measure(benchmark, run, cycle(big.batches), name=variant, ops=BATCH, rounds=HEARTBEAT_ROUNDS)


@pytest.mark.benchmark(group="tracker-1-heartbeat_many")
@pytest.mark.parametrize(
    "variant", ["tracker.heartbeat_many", "table.touch_many", "plain.heartbeat_many"]
)
def test_heartbeat_many(benchmark: Any, big: Big, variant: str) -> None:
    """The same batches as test_heartbeat, in chunks of MANY_CHUNK connections per call."""
    beat_many = {
        "tracker.heartbeat_many": big.tracker.heartbeat_many,
        "table.touch_many": big.table.touch_many,
        "plain.heartbeat_many": big.plain.heartbeat_many,
    }[variant]
    assert beat_many(big.chunked[0][0]) == len(big.chunked[0][0])

    def run(chunks: list[list[str]]) -> None:
        call = beat_many
        for chunk in chunks:
            call(chunk)

    measure(benchmark, run, cycle(big.chunked), name=variant, ops=BATCH, rounds=HEARTBEAT_ROUNDS)


# -- 2. track and memory --------------------------------------------------------------------


@pytest.mark.benchmark(group="tracker-2-track")
@pytest.mark.parametrize("variant", ["tracker.track", "plain.track"])
def test_track(benchmark: Any, ids: Ids, variant: str) -> None:
    """New presences into an empty tracker: TRACK_CONNS connections x 4 topics per round."""
    pairs = list(zip(ids.conns[:TRACK_CONNS], ids.keys[:TRACK_CONNS], strict=True))
    make: Callable[[], Any] = (
        (lambda: Tracker(connection_ttl=TTL, max_connections=MAX_CONNECTIONS))
        if variant == "tracker.track"
        else (lambda: PlainTracker(connection_ttl=TTL))
    )
    measure(
        benchmark,
        track_all,
        lambda: (make(), pairs),
        name=variant,
        ops=len(pairs) * len(TOPICS),
        rounds=TRACK_ROUNDS,
    )


@pytest.mark.parametrize("subject", ["tracker", "plain", "metas"])
def test_memory_per_presence(ids: Ids, subject: str) -> None:
    """tracemalloc delta of building CONNS x 4 presences, per presence (recorded, not asserted).

    ``metas`` is the cost of the same number of meta dicts alone (the list holding them is
    subtracted).  The trackers are flushed before the final reading: pending joins are a
    transient, not what a steady process holds.
    """
    pairs = list(zip(ids.conns, ids.keys, strict=True))
    n = len(pairs) * len(TOPICS)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        if subject == "metas":
            metas = [new_meta() for _ in range(n)]
            grown = tracemalloc.get_traced_memory()[0] - start - sys.getsizeof(metas)
        else:
            if subject == "tracker":
                built: Any = Tracker(connection_ttl=TTL, max_connections=MAX_CONNECTIONS)
            else:
                built = PlainTracker(connection_ttl=TTL)
            track_all(built, pairs)
            RESULTS[f"memory.{subject}.pending"] = (tracemalloc.get_traced_memory()[0] - start) / n
            built.flush()
            grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    RESULTS[f"memory.{subject}"] = grown / n
    RESULTS["memory.n"] = n
    if subject == "tracker":
        assert built.totals().presences == n
        RESULTS["memory.tracker.estimate"] = built.memory_estimate() / n


# -- 3. diff delivery -----------------------------------------------------------------------


def diff_subject(impl: str, raw: bool, stamps: list[float]) -> Any:
    """A tracker with DIFF_MEMBERS present in DIFF_TOPIC and SUBSCRIBERS subscribers to it.

    Every subscriber but the last does nothing; the last notes the time it was called, which is
    the end of the delivery (subscribers are called in subscription order).
    """

    def sink(topic: str, event: str, payload: Any) -> None:
        pass

    def stamp(topic: str, event: str, payload: Any) -> None:
        stamps.append(time.perf_counter())

    subject: Any
    if impl == "tracker":
        subject = Tracker(connection_ttl=TTL, max_connections=MAX_CONNECTIONS)
    else:
        subject = PlainTracker(connection_ttl=TTL)
    for i in range(DIFF_MEMBERS):
        subject.track(f"member-conn-{i}", DIFF_TOPIC, f"member-{i}", new_meta())
    subject.flush()
    for i in range(SUBSCRIBERS):
        subject.subscribe(DIFF_TOPIC, sink if i < SUBSCRIBERS - 1 else stamp, raw=raw)
    stamps.clear()  # the Tracker sends each subscriber the state when it subscribes
    return subject


def diff_latency(benchmark: Any, impl: str, raw: bool) -> None:
    stamps: list[float] = []
    samples: list[float] = []
    subject = diff_subject(impl, raw, stamps)
    track, flush = subject.track, subject.flush
    numbers = iter(range(DIFF_SAMPLES + DIFF_WARMUP))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        i = next(numbers)
        return (f"joiner-conn-{i}", f"joiner-{i}", new_meta()), {}

    def one(conn: str, key: str, meta: dict[str, Any]) -> None:
        start = time.perf_counter()
        track(conn, DIFF_TOPIC, key, meta)
        flush()
        samples.append(stamps[-1] - start)

    gc.collect()
    benchmark.pedantic(one, setup=setup, rounds=DIFF_SAMPLES, warmup_rounds=DIFF_WARMUP)
    if not samples:
        return
    assert len(stamps) == len(samples)  # one delivery to the last subscriber per sample
    kept = sorted(samples[-DIFF_SAMPLES:])
    name = f"diff.{'raw' if raw else 'dict'}.{impl}"
    quantiles = {q: percentile(kept, q) * 1e3 for q in (50, 95, 99)}
    for q, ms in quantiles.items():
        RESULTS[f"{name}.p{q}"] = ms
    RESULTS[f"{name}.max"] = kept[-1] * 1e3
    benchmark.extra_info.update(
        variant=name,
        samples=len(kept),
        subscribers=SUBSCRIBERS,
        p50_ms=round(quantiles[50], 4),
        p95_ms=round(quantiles[95], 4),
        p99_ms=round(quantiles[99], 4),
        max_ms=round(kept[-1] * 1e3, 4),
    )
    print(
        f"\n  {name}: {len(kept)} samples, {SUBSCRIBERS} subscribers: p50 {quantiles[50]:.3f} ms"
        f"  p95 {quantiles[95]:.3f} ms  p99 {quantiles[99]:.3f} ms  max {kept[-1] * 1e3:.3f} ms"
    )


@pytest.mark.benchmark(group="tracker-3-diff-dict")
@pytest.mark.parametrize("impl", ["tracker", "plain"])
def test_diff_dict(benchmark: Any, impl: str) -> None:
    """Dict subscribers: each gets its own copy of the diff."""
    diff_latency(benchmark, impl, raw=False)


@pytest.mark.benchmark(group="tracker-3-diff-raw")
@pytest.mark.parametrize("impl", ["tracker", "plain"])
def test_diff_raw(benchmark: Any, impl: str) -> None:
    """Raw subscribers: one JSON bytes object shared by all."""
    diff_latency(benchmark, impl, raw=True)


# -- 4. count and page ----------------------------------------------------------------------


@dataclass
class Members:
    tracker: Tracker
    plain: PlainTracker
    cursors: list[str]  # random cursors, each with at least PAGE_LIMIT keys after it


@pytest.fixture(scope="module")
def members() -> Members:
    """MEMBERS keys in BIG and SMALL_MEMBERS in SMALL, one connection each, flushed."""
    conns = random_ids(MEMBERS, "member-conn-", SEED + 3)
    keys = random_ids(MEMBERS, "member-", SEED + 4)
    tracker = Tracker(connection_ttl=TTL, max_connections=MAX_CONNECTIONS)
    plain = PlainTracker(connection_ttl=TTL)
    for subject in (tracker, plain):
        track = subject.track
        for conn, key in zip(conns, keys, strict=True):
            track(conn, BIG, key, new_meta())
        for i in range(SMALL_MEMBERS):
            track(f"small-conn-{i}", SMALL, f"small-{i}", new_meta())
        subject.flush()
    # The first page of a big topic builds its sorted key index: a one-off, timed on its own.
    start = time.perf_counter()
    tracker.page(BIG, None, limit=PAGE_LIMIT)
    RESULTS["page.first_ms"] = (time.perf_counter() - start) * 1e3
    ordered = sorted(keys)
    rng = random.Random(SEED + 5)
    cursors = [ordered[rng.randrange(len(ordered) - PAGE_LIMIT)] for _ in range(100)]
    return Members(tracker, plain, cursors)


def repeat(call: Callable[[str], Any], topic: str) -> Callable[[], None]:
    def run() -> None:
        for _ in range(COUNT_CALLS):
            call(topic)

    return run


@pytest.mark.benchmark(group="tracker-4-count")
@pytest.mark.parametrize(
    "variant",
    [
        "tracker.count@100k",
        "tracker.count@10",
        "plain.count@100k",
        "len(tracker.list)@100k",
        "len(plain.list)@100k",
    ],
)
def test_count(benchmark: Any, members: Members, variant: str) -> None:
    """count() per call (COUNT_CALLS a round) against counting by listing (one a round)."""
    t, p = members.tracker, members.plain
    run: Callable[[], Any]
    if variant == "tracker.count@100k":
        run, ops, rounds = repeat(t.count, BIG), COUNT_CALLS, 20
    elif variant == "tracker.count@10":
        run, ops, rounds = repeat(t.count, SMALL), COUNT_CALLS, 20
    elif variant == "plain.count@100k":
        run, ops, rounds = repeat(p.count, BIG), COUNT_CALLS, 20
    elif variant == "len(tracker.list)@100k":
        run, ops, rounds = (lambda: len(t.list(BIG))), 1, 5
    else:
        run, ops, rounds = (lambda: len(p.list(BIG))), 1, 5
    assert t.count(BIG) == p.count(BIG) == MEMBERS
    measure(benchmark, run, tuple, name=variant, ops=ops, rounds=rounds)


@pytest.mark.benchmark(group="tracker-4-page")
@pytest.mark.parametrize(
    "variant", ["tracker.page@100k", "tracker.list@100k", "plain.page@100k", "plain.list@100k"]
)
def test_page(benchmark: Any, members: Members, variant: str) -> None:
    """One page of PAGE_LIMIT keys at a random cursor, against list() of the whole topic."""
    t, p = members.tracker, members.plain
    if variant.endswith(".page@100k"):
        page = t.page if variant.startswith("tracker") else p.page
        state, after = page(BIG, members.cursors[0], limit=PAGE_LIMIT)
        assert len(state) == PAGE_LIMIT and after is not None

        def run(cursor: str) -> None:
            page(BIG, cursor, limit=PAGE_LIMIT)

        rounds = 50 if variant.startswith("tracker") else 5
        measure(benchmark, run, cycle(members.cursors), name=variant, ops=1, rounds=rounds)
    else:
        read = t.list if variant.startswith("tracker") else p.list
        measure(benchmark, lambda: read(BIG), tuple, name=variant, ops=1, rounds=5)


# -- 5. garbage collection ------------------------------------------------------------------


GC_PROBE = """
import gc, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from test_bench_tracker import CONNS, MAX_CONNECTIONS, SEED, TTL, random_ids, track_all
from tracker_baseline import PlainTracker
from presence_core.tracker import Tracker

pairs = list(zip(random_ids(CONNS, "conn-", SEED), random_ids(CONNS, "user-", SEED + 1)))
if sys.argv[2] == "tracker":
    subject = Tracker(connection_ttl=TTL, max_connections=MAX_CONNECTIONS)
else:
    subject = PlainTracker(connection_ttl=TTL)
track_all(subject, pairs)
subject.flush()
del pairs
gc.collect()
times = []
for _ in range(7):
    start = time.perf_counter()
    gc.collect()
    times.append(time.perf_counter() - start)
print(statistics.median(times) * 1e9, len(gc.get_objects()))
"""


@pytest.mark.parametrize("variant", ["tracker", "plain"])
def test_full_collection(variant: str) -> None:
    """Median of 7 full ``gc.collect()`` calls while CONNS x 4 presences are alive.

    Each subject is built in a process of its own, so the collector walks that subject and
    nothing else of this test session.
    """
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", GC_PROBE, os.path.dirname(__file__), variant],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()
    RESULTS[f"gc.{variant}"] = float(out[0])
    RESULTS[f"gc.{variant}.tracked"] = float(out[1])


# -- summary --------------------------------------------------------------------------------


def _ns(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:,.2f} ms"
    if value >= 1e4:
        return f"{value / 1e3:,.1f} us"
    return f"{value:,.0f} ns"


def summary_lines() -> list[str]:
    r = RESULTS
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, measured: str, target: str, ok: bool | None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        rows.append((label, measured, target, verdict))

    def ratio_row(label: str, mine: str, anchor: str, target: float, unit: str = "ns") -> None:
        if mine not in r or anchor not in r:
            row(label, "not run", f"<= {target:g}x", None)
            return
        ratio = r[mine] / r[anchor]
        if unit == "ns":
            text = f"{_ns(r[mine])} vs {_ns(r[anchor])} = {ratio:.2f}x"
        else:
            text = f"{r[mine]:.0f} B vs {r[anchor]:.0f} B = {ratio:.2f}x"
        row(label, text, f"<= {target:g}x", ratio <= target)

    def info(label: str, text: str) -> None:
        row("  " + label, text, "", None)

    presences = CONNS * len(TOPICS)
    ratio_row(
        f"1 heartbeat(conn) vs table.touch(key) ({CONNS:,} conns)",
        "tracker.heartbeat",
        "table.touch",
        HEARTBEAT_TARGET,
    )
    if "tracker.heartbeat" in r and "plain.heartbeat" in r:
        info(
            "plain.heartbeat (dict)",
            f"{_ns(r['plain.heartbeat'])} ({r['tracker.heartbeat'] / r['plain.heartbeat']:.2f}x"
            " tracker/plain)",
        )
    if "tracker.heartbeat_many" in r:
        parts = [f"{_ns(r['tracker.heartbeat_many'])}/conn"]
        if "table.touch_many" in r:
            parts.append(f"table.touch_many {_ns(r['table.touch_many'])}")
        if "plain.heartbeat_many" in r:
            parts.append(f"plain loop {_ns(r['plain.heartbeat_many'])}")
        info(f"heartbeat_many (chunks of {MANY_CHUNK:,})", "; ".join(parts))
    if "build.tracker_s" in r:
        info(
            f"build {presences:,} presences",
            f"Tracker {r['build.tracker_s']:.1f} s "
            f"({r['build.tracker_s'] / presences * 1e6:.2f} us each) + flush "
            f"{r['build.flush_s']:.2f} s; plain {r['build.plain_s']:.1f} s",
        )

    n = int(r.get("memory.n", 0))
    ratio_row(
        f"2 bytes/presence vs bare meta dict (N={n:,})",
        "memory.tracker",
        "memory.metas",
        MEMORY_TARGET,
        unit="B",
    )
    if "memory.tracker" in r:
        info(
            "tracker memory detail",
            f"{r['memory.tracker.pending']:.0f} B before flush; "
            f"memory_estimate() {r['memory.tracker.estimate']:.0f} B",
        )
    if "memory.plain" in r:
        info(
            "plain tracker (holds the meta dicts)",
            f"{r['memory.plain']:.0f} B/presence ({r['memory.plain.pending']:.0f} B before flush)",
        )
    if "tracker.track" in r:
        text = f"{_ns(r['tracker.track'])} = {1e9 / r['tracker.track']:,.0f} presences/s"
        if "plain.track" in r:
            text += (
                f"; plain {_ns(r['plain.track'])} = {1e9 / r['plain.track']:,.0f}/s "
                f"({r['tracker.track'] / r['plain.track']:.2f}x)"
            )
        info(f"track new presence ({TRACK_CONNS:,} conns x 4)", text)

    for kind in ("dict", "raw"):
        name = f"diff.{kind}.tracker"
        label = f"3 diff p99, {SUBSCRIBERS:,} {kind} subscribers"
        if f"{name}.p99" not in r:
            row(label, "not run", f"<= {DIFF_P99_TARGET_MS:g} ms", None)
            continue
        row(
            label,
            f"p50 {r[name + '.p50']:.3f} / p95 {r[name + '.p95']:.3f} / "
            f"p99 {r[name + '.p99']:.3f} ms",
            f"<= {DIFF_P99_TARGET_MS:g} ms",
            r[name + ".p99"] <= DIFF_P99_TARGET_MS,
        )
        plain = f"diff.{kind}.plain"
        if f"{plain}.p99" in r:
            info(
                f"plain, {kind}",
                f"p50 {r[plain + '.p50']:.3f} / p95 {r[plain + '.p95']:.3f} / "
                f"p99 {r[plain + '.p99']:.3f} ms",
            )

    ratio_row(
        f"4 count() at {MEMBERS:,} vs at {SMALL_MEMBERS} members (O(1))",
        "tracker.count@100k",
        "tracker.count@10",
        COUNT_TARGET,
    )
    for variant in ("plain.count@100k", "len(tracker.list)@100k", "len(plain.list)@100k"):
        if variant in r:
            info(variant, _ns(r[variant]))
    ratio_row(
        f"4 page(limit={PAGE_LIMIT:,}) vs list() at {MEMBERS:,}",
        "tracker.page@100k",
        "tracker.list@100k",
        PAGE_TARGET,
    )
    for variant in ("plain.page@100k", "plain.list@100k"):
        if variant in r:
            info(variant, _ns(r[variant]))
    if "page.first_ms" in r:
        info("first page (builds the key index)", f"{r['page.first_ms']:.1f} ms")

    if "gc.tracker" in r:
        gc_ms = r["gc.tracker"] / 1e6
        plain = f"; plain tracker {r['gc.plain'] / 1e6:.1f} ms" if "gc.plain" in r else ""
        info(
            "objects the collector tracks",
            f"Tracker {r['gc.tracker.tracked']:,.0f}"
            + (f"; plain {r['gc.plain.tracked']:,.0f}" if "gc.plain" in r else ""),
        )
        row(
            f"5 full gc.collect() with {presences:,} presences",
            f"{gc_ms:.1f} ms{plain}",
            f"<= {GC_TARGET_MS:g} ms",
            gc_ms <= GC_TARGET_MS,
        )

    width = max(len(label) for label, *_ in rows)
    mwidth = max(len(measured) for _, measured, *_ in rows)
    header = f"{'target':<{width}}  {'measured':<{mwidth}}  {'goal':<9}  verdict"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        "",
        "Tracker targets (medians per operation, garbage collector on)",
        f"python {sys.version.split()[0]}  USING_EXTENSION={presence_core.USING_EXTENSION}  "
        f"{os.cpu_count()} cpus  load {load}",
        header,
        "-" * len(header),
    ]
    for label, measured, target, verdict in rows:
        lines.append(f"{label:<{width}}  {measured:<{mwidth}}  {target:<9}  {verdict}".rstrip())
    return lines


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the summary after the module's last test (whatever subset of it ran)."""
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in summary_lines():
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)
