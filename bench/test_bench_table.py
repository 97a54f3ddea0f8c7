"""The native presence table against dict, cachetools.TTLCache and lru-dict.

Each group times one workload on every implementation over the same keys, so the ratios
pytest-benchmark prints in a group compare like with like.  Per-key workloads run a Python loop
over a batch of random existing keys, written the same way for every container; a round is one
batch, and each benchmark takes its batches from a random order of the keys no other benchmark
used (see conftest.py).  ns/op is the round time divided by the batch size; the summary at the
end of the run prints it, with each target next to its anchor (conftest.TARGETS).

On a shared machine the speed of memory drifts over seconds, more than the differences we
measure; a test that lands in a slow stretch looks slow.  So each of our rows that has a target
also times its anchor in the untimed setup of every round, just before our round, and records
the median of the per-round ratios (`extra_info["paired"]`).  That ratio decides PASS or MISS.

The garbage collector is ON during every timed call, for every contender, as users run them:
a call that makes many tracked objects (TTLCache's links, a million result tuples) pays for the
collections it sets off, which traverse everything the process holds, including the other
containers built for this session.  Builds and other untimed setup may collect first.
`ours_pure` is the pure-Python twin, a data point, not a contender.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from cachetools import TTLCache
from table_workload import (
    AGING_ORDER,
    BUILD_NOW,
    BUILDERS,
    NOW,
    OURS,
    OURS_PURE,
    TTL,
    VALUE,
    N,
    Prebuilt,
    PurePresenceTable,
    Workload,
)

import presence_core

BATCH = min(100_000, N // 10)  # keys per round for touch, insert and get
MANY_BATCH = min(10_000, N // 100)  # keys per touch_many call (target: a batch of 10k)

Run = Callable[[Any], Any]


class Paired(NamedTuple):
    """An anchor timed in the setup of each of our rounds: `run(next_arg())`."""

    name: str
    run: Run
    next_arg: Callable[[], Any]


def measure(
    benchmark: Any,
    target: Run,
    next_arg: Callable[[], Any],
    *,
    name: str,
    ops: int,
    rounds: int,
    warmup_rounds: int = 0,
    paired: Paired | None = None,
) -> Any:
    """Time `target(next_arg())` once per round; `next_arg` runs untimed before each round.

    The collector stays on throughout, in our rounds and the anchor's alike.
    """
    benchmark.extra_info.update(impl=name, ops=ops)
    anchor_times: list[float] = []

    def setup() -> tuple[tuple[Any], dict[str, Any]]:
        if paired is not None:
            anchor_arg = paired.next_arg()
            start = time.perf_counter()
            paired.run(anchor_arg)
            anchor_times.append(time.perf_counter() - start)
        arg = next_arg()
        return (arg,), {}

    assert gc.isenabled(), "the benchmarks measure with the garbage collector on"
    result = benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    if paired is not None and benchmark.stats:
        ours = benchmark.stats.stats.data
        anchors = anchor_times[warmup_rounds:]
        benchmark.extra_info["paired"] = {
            "anchor": paired.name,
            "ratio": statistics.median(o / a for o, a in zip(ours, anchors, strict=True)),
            "anchor_ns": statistics.median(anchors) / ops * 1e9,
        }
    return result


def batches_of(workload: Workload, size: int) -> Callable[[], list[str]]:
    """Batches of `size` keys, round after round, from a random order no one else uses."""
    return itertools.cycle(workload.fresh_batches(size)).__next__


# -- loops: one shape for every container ---------------------------------------------------


def reset_loop(container: Any) -> Run:
    """`container[key] = value` for each key: the dict, lru-dict and TTLCache heartbeat."""
    value = VALUE

    def run(batch: list[str]) -> None:
        for key in batch:
            container[key] = value

    return run


def touch_now_loop(table: Any) -> Run:
    touch = table.touch
    now = NOW

    def run(batch: list[str]) -> None:
        for key in batch:
            touch(key, now=now)

    return run


def touch_clock_loop(table: Any) -> Run:
    touch = table.touch

    def run(batch: list[str]) -> None:
        for key in batch:
            touch(key)

    return run


def touch_many_call(table: Any) -> Run:
    touch_many = table.touch_many
    now = NOW

    def run(batch: list[str]) -> None:
        touch_many(batch, now=now)

    return run


def upsert_loop(table: Any) -> Run:
    upsert = table.upsert
    value = VALUE
    ttl = TTL
    now = NOW

    def run(batch: list[str]) -> None:
        for key in batch:
            upsert(key, value, ttl, now=now)

    return run


def get_loop(container: Any) -> Run:
    get = container.get

    def run(batch: list[str]) -> None:
        for key in batch:
            _ = get(key)

    return run


def subscript_loop(container: Any) -> Run:
    def run(batch: list[str]) -> None:
        for key in batch:
            _ = container[key]

    return run


def loop_only(container: Any) -> Run:
    """Nothing but the loop: what every per-key row pays before doing its work."""

    def run(batch: list[str]) -> None:
        for _key in batch:
            pass

    return run


# -- 1. heartbeat: touch one existing key ---------------------------------------------------

TOUCH: dict[str, tuple[str | None, Callable[[Any], Run]]] = {
    "ours-now": (OURS, touch_now_loop),  # touch(k, now=NOW)
    "ours-clock": (OURS, touch_clock_loop),  # touch(k): the table reads its clock
    "ours_pure-now": (OURS_PURE, touch_now_loop),
    "lru_dict": ("lru_dict", reset_loop),
    "ttlcache": ("ttlcache", reset_loop),  # re-setting refreshes the TTL
    "dict": ("dict", reset_loop),
    "loop-only": (None, loop_only),  # the floor: iterating random keys costs a miss each
}


@pytest.mark.benchmark(group="1-touch")
@pytest.mark.parametrize("variant", list(TOUCH))
def test_touch(benchmark: Any, workload: Workload, prebuilt: Prebuilt, variant: str) -> None:
    impl, make = TOUCH[variant]
    container = prebuilt(impl) if impl else None
    paired = None
    if variant in ("ours-now", "ours-clock"):
        paired = Paired("lru_dict", reset_loop(prebuilt("lru_dict")), batches_of(workload, BATCH))
    measure(
        benchmark,
        make(container),
        batches_of(workload, BATCH),
        name=variant,
        ops=BATCH,
        rounds=7,
        warmup_rounds=1,
        paired=paired,
    )
    assert container is None or len(container) == N


# -- 2. insert a new key --------------------------------------------------------------------

TakeOut = Callable[[list[str]], None]


def take_out_ours(table: Any) -> TakeOut:
    def take_out(batch: list[str]) -> None:
        table.drain_dirty()  # the last round's inserts, as the Tracker's flush would
        pop = table.pop
        for key in batch:
            pop(key)
        # Removed keys stay until drained (so a quick return coalesces); drain them so that
        # the timed round inserts new keys into free slots rather than reviving old ones.
        table.drain_dirty()

    return take_out


def take_out_pure(table: Any) -> TakeOut:
    # The twin is never drained here (its drain_dirty() is quadratic at 1M, see README):
    # every key is already on its change log, so pop and upsert only find it there.
    def take_out(batch: list[str]) -> None:
        pop = table.pop
        for key in batch:
            pop(key)

    return take_out


def take_out_mapping(container: Any) -> TakeOut:
    def take_out(batch: list[str]) -> None:
        for key in batch:
            del container[key]

    return take_out


INSERT: dict[str, tuple[str, Callable[[Any], Run], Callable[[Any], TakeOut]]] = {
    OURS: (OURS, upsert_loop, take_out_ours),
    OURS_PURE: (OURS_PURE, upsert_loop, take_out_pure),
    "lru_dict": ("lru_dict", reset_loop, take_out_mapping),
    "ttlcache": ("ttlcache", reset_loop, take_out_mapping),
    "dict": ("dict", reset_loop, take_out_mapping),
}


def insert_round(workload: Workload, prebuilt: Prebuilt, variant: str) -> Paired:
    """The insert workload of `variant`: before each round its batch is taken out, untimed."""
    impl, make, make_take_out = INSERT[variant]
    container = prebuilt(impl)
    take_out = make_take_out(container)
    batches = batches_of(workload, BATCH)

    def next_batch() -> list[str]:
        batch = batches()
        take_out(batch)
        return batch

    return Paired(variant, make(container), next_batch)


@pytest.mark.benchmark(group="2-insert")
@pytest.mark.parametrize("variant", list(INSERT))
def test_insert(benchmark: Any, workload: Workload, prebuilt: Prebuilt, variant: str) -> None:
    """Insert a batch of new keys into a container holding N minus the batch, up to N.

    Before each round (untimed) the round's batch is taken out of the full container; the
    round puts it back.  Capacity is exactly N everywhere, so nothing is evicted.
    """
    mine = insert_round(workload, prebuilt, variant)
    paired = insert_round(workload, prebuilt, "lru_dict") if variant == OURS else None
    measure(
        benchmark,
        mine.run,
        mine.next_arg,
        name=variant,
        ops=BATCH,
        rounds=5,
        warmup_rounds=1,
        paired=paired,
    )
    container = prebuilt(INSERT[variant][0])
    assert len(container) == N
    if variant in (OURS, OURS_PURE):
        assert container.drain_evicted() == []
        assert container.stats()["evictions"] == 0


# -- 3. get an existing key -----------------------------------------------------------------

GET: dict[str, tuple[str, Callable[[Any], Run]]] = {
    OURS: (OURS, get_loop),  # table.get(k)
    OURS_PURE: (OURS_PURE, get_loop),
    "dict-get": ("dict", get_loop),  # d.get(k): the same call shape and contract as ours
    "dict-subscript": ("dict", subscript_loop),  # d[k]: no method call
    "lru_dict-get": ("lru_dict", get_loop),  # lru-dict's get also moves the key to the front
    "ttlcache-subscript": ("ttlcache", subscript_loop),
}


@pytest.mark.benchmark(group="3-get")
@pytest.mark.parametrize("variant", list(GET))
def test_get(benchmark: Any, workload: Workload, prebuilt: Prebuilt, variant: str) -> None:
    impl, make = GET[variant]
    container = prebuilt(impl)
    assert container.get(workload.keys[0]) is VALUE
    paired = None
    if variant == OURS:
        paired = Paired("dict-get", get_loop(prebuilt("dict")), batches_of(workload, BATCH))
    measure(
        benchmark,
        make(container),
        batches_of(workload, BATCH),
        name=variant,
        ops=BATCH,
        rounds=7,
        warmup_rounds=1,
        paired=paired,
    )


# -- 4. touch_many: a batch of heartbeats ---------------------------------------------------

TOUCH_MANY: dict[str, tuple[str, Callable[[Any], Run]]] = {
    "ours-touch_many": (OURS, touch_many_call),  # touch_many(batch, now=NOW)
    "ours-touch": (OURS, touch_now_loop),  # the same size of batch, one touch() per key
    "ours_pure-touch_many": (OURS_PURE, touch_many_call),
    "dict": ("dict", reset_loop),
    "lru_dict": ("lru_dict", reset_loop),
}


@pytest.mark.benchmark(group="4-touch_many")
@pytest.mark.parametrize("variant", list(TOUCH_MANY))
def test_touch_many(benchmark: Any, workload: Workload, prebuilt: Prebuilt, variant: str) -> None:
    impl, make = TOUCH_MANY[variant]
    paired = None
    if variant == "ours-touch_many":
        paired = Paired("dict", reset_loop(prebuilt("dict")), batches_of(workload, MANY_BATCH))
    measure(
        benchmark,
        make(prebuilt(impl)),
        batches_of(workload, MANY_BATCH),
        name=variant,
        ops=MANY_BATCH,
        rounds=30,
        warmup_rounds=2,
        paired=paired,
    )


# -- 5. expire all N ------------------------------------------------------------------------

# Entries arrive evenly over [0, SPREAD), then each gets one heartbeat, in a random order,
# evenly over [SPREAD, 2 * SPREAD): deadlines end up spread over thousands of wheel ticks and
# several buckets, the expiry order no longer follows memory order (as in a live table), and
# no deadline (at least TTL = 60 s) passes before EXPIRE_AT.
SPREAD = 20.0
EXPIRE_AT = 3600.0


class ManualClock:
    """A timer for TTLCache that reads what the benchmark sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def expiring_ours(keys: list[str], order: list[str], cls: Any = presence_core.PresenceTable) -> Any:
    table = cls(len(keys))
    upsert, touch = table.upsert, table.touch
    step = SPREAD / len(keys)
    for i, key in enumerate(keys):
        upsert(key, VALUE, TTL, now=i * step)
    for i, key in enumerate(order):
        touch(key, now=SPREAD + i * step)
    if cls is not PurePresenceTable:  # see take_out_pure
        table.drain_dirty()
    return table


def expiring_pure(keys: list[str], order: list[str]) -> Any:
    return expiring_ours(keys, order, PurePresenceTable)


def expiring_ttlcache(keys: list[str], order: list[str]) -> TTLCache[str, Any]:
    clock = ManualClock()
    cache: TTLCache[str, Any] = TTLCache(maxsize=len(keys), ttl=TTL, timer=clock)
    step = SPREAD / len(keys)
    for i, key in enumerate(keys):
        clock.now = i * step
        cache[key] = VALUE
    for i, key in enumerate(order):
        clock.now = SPREAD + i * step
        cache[key] = VALUE
    clock.now = EXPIRE_AT  # the timer moves past every deadline; expire() reads it
    return cache


def expiring_dict(keys: list[str], order: list[str]) -> dict[str, float]:
    step = SPREAD / len(keys)
    deadlines = {key: i * step + TTL for i, key in enumerate(keys)}
    for i, key in enumerate(order):
        deadlines[key] = SPREAD + i * step + TTL
    return deadlines


def expire_ours(table: Any) -> list[Any]:
    return table.expire(now=EXPIRE_AT)


def expire_ttlcache(cache: TTLCache[str, Any]) -> Any:
    return cache.expire()


def expire_dict_scan(deadlines: dict[str, float]) -> list[str]:
    """What a plain dict of key -> deadline needs: a scan of everything, then the deletes."""
    now = EXPIRE_AT
    expired = [key for key, deadline in deadlines.items() if deadline <= now]
    for key in expired:
        del deadlines[key]
    return expired


EXPIRE: dict[str, tuple[Callable[[list[str], list[str]], Any], Run, int]] = {
    OURS: (expiring_ours, expire_ours, 3),
    OURS_PURE: (expiring_pure, expire_ours, 1),  # building the twin at 1M takes ~15 s
    "ttlcache": (expiring_ttlcache, expire_ttlcache, 3),
    "dict-scan": (expiring_dict, expire_dict_scan, 3),
}


@pytest.mark.benchmark(group="5-expire_all")
@pytest.mark.parametrize("variant", list(EXPIRE))
def test_expire_all(benchmark: Any, workload: Workload, variant: str) -> None:
    """Expire every one of N entries in one call; each round gets a freshly built container."""
    build, expire, rounds = EXPIRE[variant]
    keys, order = workload.keys, workload.order(AGING_ORDER)

    def fresh() -> Any:
        gc.collect()  # free the last round's container (TTLCache's links are cycles) first
        return build(keys, order)

    expired = measure(benchmark, expire, fresh, name=variant, ops=len(keys), rounds=rounds)
    assert len(expired) == len(keys)


# -- 6. drain_dirty all N -------------------------------------------------------------------

# A table whose every entry changed since the last flush, in a random order: its change queue
# no longer follows memory order, as after a busy interval of a live table.  The target's
# anchor is TTLCache.expire() from group 5 (TTLCache has no change log to drain).
CHANGED: Any = {"status": "away", "device": "web"}


def changed_ours(keys: list[str], order: list[str], cls: Any = presence_core.PresenceTable) -> Any:
    table = cls(len(keys))
    upsert = table.upsert
    for key in keys:
        upsert(key, VALUE, TTL, now=BUILD_NOW)
    table.drain_dirty()
    for key in order:
        upsert(key, CHANGED, TTL, now=NOW)
    return table


def changed_pure(keys: list[str], order: list[str]) -> Any:
    return changed_ours(keys, order, PurePresenceTable)


def drain_all(table: Any) -> list[Any]:
    return table.drain_dirty()


DRAIN: dict[str, tuple[Callable[[list[str], list[str]], Any], int]] = {
    OURS: (changed_ours, 3),
    OURS_PURE: (changed_pure, 1),  # building the twin at 1M takes ~15 s
}


@pytest.mark.benchmark(group="6-drain_all")
@pytest.mark.parametrize("variant", list(DRAIN))
def test_drain_all(benchmark: Any, workload: Workload, variant: str) -> None:
    """Drain the change log of N changed entries in one call; a freshly built table per round."""
    build, rounds = DRAIN[variant]
    keys, order = workload.keys, workload.order(AGING_ORDER)

    def fresh() -> Any:
        gc.collect()  # free the last round's table and its result first
        return build(keys, order)

    drained = measure(benchmark, drain_all, fresh, name=variant, ops=len(keys), rounds=rounds)
    assert len(drained) == len(keys) and drained[0][1] is CHANGED


# -- 7. bytes per entry ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", [OURS, OURS_PURE, "dict", "lru_dict", "ttlcache"])
def test_bytes_per_entry(
    workload: Workload, memory_results: dict[str, dict[str, float]], impl: str
) -> None:
    """Memory the container allocates for N entries, by tracemalloc, per entry.

    The keys exist before tracing starts and every entry shares one value object, so the
    delta is the container's own memory: what a million presences cost beyond their data.
    The summary prints the table; this test only records.
    """
    keys = workload.keys
    result: dict[str, float] = {}
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        if impl == OURS:
            container = presence_core.PresenceTable(len(keys))  # track_dirty=True
            upsert = container.upsert
            for key in keys:
                upsert(key, VALUE, TTL, now=0.0)
            result["before_drain"] = (tracemalloc.get_traced_memory()[0] - start) / len(keys)
            drained = len(container.drain_dirty())  # the list is gone before we measure
        else:
            container = BUILDERS[impl](keys)
        result["bytes"] = (tracemalloc.get_traced_memory()[0] - start) / len(keys)
    finally:
        tracemalloc.stop()
    assert len(container) == len(keys)
    if impl == OURS:
        assert drained == len(keys)
        result["getsizeof"] = sys.getsizeof(container)
        result["memory_bytes"] = container.stats()["memory_bytes"]
    memory_results[impl] = result
