"""What the live dashboard costs the server, against a ``/metrics`` scrape of the same process.

The page polls ``/api/dashboard`` once a second and the server samples its metrics once a
second, so an open page costs one `Dashboard.sample` plus one answer (built and serialized) a
second; the topic list and member pages only when the operator browses.  Each is timed on a
Tracker at the size of the server benchmark (19,900 connections, 100 topics of 199 keys, aged
by updates, leaves and joins, with diff latencies observed) and the topic list again with
10,000 topics; a member page also on a topic of 100,000 keys.  The anchor is a ``/metrics``
scrape of the same Tracker (`Tracker.sync_metrics` then `Metrics.to_prometheus`), measured in
the same run.  The garbage collector stays on.

    python -m pytest bench/test_bench_dashboard.py -q -s -p no:cacheprovider

It prints; it asserts nothing about speed.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import orjson

from presence_core import Tracker
from presence_core.metrics import DIFF_PROPAGATION_SECONDS, Metrics
from presence_core.server.dashboard import HISTORY, Dashboard

CONNECTIONS = 19_900
TOPICS = 100
ROUNDS = 7


def _median_us(fn: Callable[[], object], repeat: int) -> float:
    """The median over `ROUNDS` rounds of the mean time of one call, in microseconds."""
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        rounds.append((time.perf_counter() - started) / repeat * 1e6)
    return statistics.median(rounds)


def _aged_tracker(connections: int, topics: int) -> Tracker:
    rng = random.Random(7)
    tracker = Tracker(metrics=Metrics())
    for i in range(connections):
        tracker.track(i, f"realtime:room-{i % topics}", f"user-{i}", {"status": "online"})
    tracker.flush()
    for _ in range(5):  # updates, leaves and joins: a table that has lived a while
        for i in rng.sample(range(connections), connections // 20):
            tracker.update(i, f"realtime:room-{i % topics}", f"user-{i}", {"s": rng.random()})
        tracker.flush()
        for i in rng.sample(range(connections), connections // 50):
            tracker.disconnect(i)
            tracker.track(i, f"realtime:room-{i % topics}", f"user-{i}", {"status": "back"})
        tracker.flush()
    metrics = tracker.metrics
    assert isinstance(metrics, Metrics)
    for _ in range(20_000):
        metrics.observe(DIFF_PROPAGATION_SECONDS, rng.lognormvariate(-6.0, 1.0))
    return tracker


def _with_history(dashboard: Dashboard) -> Dashboard:
    for _ in range(HISTORY):  # five minutes of points, as on a server that has run a while
        dashboard.sample()
    return dashboard


def test_dashboard_costs() -> None:
    tracker = _aged_tracker(CONNECTIONS, TOPICS)
    dashboard = _with_history(Dashboard(tracker))
    metrics = tracker.metrics
    assert isinstance(metrics, Metrics)

    def scrape() -> bytes:
        tracker.sync_metrics()
        return metrics.to_prometheus()

    def overview() -> bytes:
        return orjson.dumps(dashboard.answer({}))

    def topic_list() -> bytes:
        return orjson.dumps(dashboard.answer({"topics": [""]}))

    def members() -> bytes:
        return orjson.dumps(dashboard.answer({"topic": ["realtime:room-7"]}))

    many = _aged_tracker(20_000, 10_000)
    many_dashboard = _with_history(Dashboard(many))

    big = Tracker(metrics=Metrics())
    for i in range(100_000):
        big.track(i, "realtime:stadium", f"fan-{i:06}", {"seat": i})
    big.flush()
    big_dashboard = _with_history(Dashboard(big))
    big.page("realtime:stadium", limit=1)  # the topic's key index is built once, on first paging

    anchor = _median_us(scrape, 200)
    rows = [
        ("/metrics scrape (anchor)", anchor),
        ("sample (once a second)", _median_us(dashboard.sample, 200)),
        ("answer: overview", _median_us(overview, 200)),
        ("answer: + topic list, 100 topics", _median_us(topic_list, 100)),
        (
            "answer: + topic list, 10,000 topics",
            _median_us(lambda: orjson.dumps(many_dashboard.answer({"topics": [""]})), 10),
        ),
        ("answer: + members page, 199 keys", _median_us(members, 100)),
        (
            "answer: + members page, 100,000 keys",
            _median_us(
                lambda: orjson.dumps(
                    big_dashboard.answer({"topic": ["realtime:stadium"], "cursor": ["fan-050000"]})
                ),
                100,
            ),
        ),
    ]
    size = len(overview())
    print()
    print(f"dashboard costs at {CONNECTIONS:,} connections in {TOPICS} topics (GC on, median of")
    print(f"{ROUNDS} rounds); ratios against a /metrics scrape of the same Tracker:")
    for name, us in rows:
        print(f"  {name:<40} {us:>10.1f} us  {us / anchor:>6.2f} x scrape")
    per_second = rows[1][1] + rows[2][1]
    print(f"  an open page: sample + overview = {per_second:.0f} us a second")
    print(f"  = {per_second / 1e4:.3f} % of one core; overview answer {size:,} bytes")
