"""Metrics: counters, gauges, histogram quantiles, rates, snapshots and Prometheus exposition."""

from __future__ import annotations

import json
import math
import random
import sys
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from presence_core import metrics as m
from presence_core.metrics import BUCKET_BOUNDS, Histogram, Metrics, register_prometheus
from presence_core.typing import MetricsSink, Transport

# One bucket spans this factor; a quantile read from buckets is within it of the exact value.
BUCKET_FACTOR = 2**0.25


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def exact_quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile: the smallest value with at least q of the values at or below."""
    ordered = sorted(values)
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[index]


def within_one_bucket(estimate: float, exact: float) -> bool:
    slack = 1 + 1e-9  # float noise at bucket bounds
    return exact / (BUCKET_FACTOR * slack) <= estimate <= exact * BUCKET_FACTOR * slack


# --- protocols ---------------------------------------------------------------------------


def test_metrics_is_a_metrics_sink_and_functions_are_transports() -> None:
    assert isinstance(Metrics(), MetricsSink)

    def transport(topic: str, event: str, payload: dict[str, Any]) -> None:
        pass

    assert isinstance(transport, Transport)
    assert not isinstance(object(), Transport)


# --- counters and gauges -----------------------------------------------------------------


def test_counters_and_gauges() -> None:
    metrics = Metrics()
    metrics.inc(m.OPS_TRACK)
    metrics.inc(m.OPS_TRACK, 4)
    metrics.inc(m.EXPIRIES, 0)
    assert metrics.counter(m.OPS_TRACK) == 5
    assert metrics.counter(m.EXPIRIES) == 0
    assert metrics.counter("never") == 0
    metrics.set(m.PRESENCES, 10)
    metrics.add(m.PRESENCES, -3)
    metrics.add(m.CONNECTIONS, 2)
    assert metrics.gauge(m.PRESENCES) == 7.0
    assert metrics.gauge(m.CONNECTIONS) == 2.0
    assert metrics.gauge("never") == 0.0


def test_constructor_is_validated() -> None:
    with pytest.raises(ValueError, match="rate_window_s must be a positive finite number"):
        Metrics(rate_window_s=0)
    with pytest.raises(ValueError, match="namespace must be a valid Prometheus name"):
        Metrics(namespace="presence-core")
    with pytest.raises(TypeError, match="clock must be callable"):
        Metrics(clock=1.0)  # type: ignore[arg-type]


# --- histograms --------------------------------------------------------------------------


def test_buckets_are_log_spaced_over_a_microsecond_to_1024_seconds() -> None:
    assert BUCKET_BOUNDS[0] == 2.0**-20
    assert BUCKET_BOUNDS[-1] == 1024.0
    for low, high in pairwise(BUCKET_BOUNDS):
        assert high / low == pytest.approx(BUCKET_FACTOR)


@pytest.mark.parametrize(
    "values",
    [
        [i * 1e-4 for i in range(1, 1001)],  # uniform 0.1 ms .. 100 ms
        [0.002] * 990 + [0.5] * 10,  # a tail exactly at p99
        [10.0 ** random.Random(7).uniform(-5, 2) for _ in range(5000)],  # log-uniform
        [random.Random(8).expovariate(1000) + 1e-5 for _ in range(5000)],  # exponential
        [0.25],
    ],
    ids=["uniform", "tail", "log-uniform", "exponential", "single"],
)
def test_quantiles_are_within_one_bucket(values: list[float]) -> None:
    metrics = Metrics()
    for value in values:
        metrics.observe(m.DIFF_PROPAGATION_SECONDS, value)
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        estimate = metrics.quantile(m.DIFF_PROPAGATION_SECONDS, q)
        assert within_one_bucket(estimate, exact_quantile(values, q)), q


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(min_value=2e-6, max_value=1000.0), min_size=1, max_size=300),
    q=st.floats(min_value=0.0, max_value=1.0),
)
def test_any_quantile_is_within_one_bucket(values: list[float], q: float) -> None:
    histogram = Histogram()
    for value in values:
        histogram.observe(value)
    assert within_one_bucket(histogram.quantile(q), exact_quantile(values, q))
    assert histogram.count == len(values)
    assert histogram.sum == pytest.approx(math.fsum(values))


def test_histogram_edges() -> None:
    metrics = Metrics()
    assert metrics.quantile("nothing", 0.5) == 0.0
    histogram = metrics.histogram("h")
    assert metrics.histogram("h") is histogram
    assert histogram.quantile(0.99) == 0.0  # empty reads as idle
    histogram.observe(math.nan)
    assert histogram.count == 0 and histogram.sum == 0.0
    histogram.observe(0.0)
    histogram.observe(-1.0)  # a clock step backwards lands in the lowest bucket
    assert histogram.count == 2
    assert histogram.quantile(1.0) == BUCKET_BOUNDS[0]
    metrics.observe("h", 5000.0)
    assert metrics.quantile("h", 1.0) == BUCKET_BOUNDS[-1]
    assert histogram.cumulative()[-1] == (math.inf, 3)
    assert histogram.cumulative()[0] == (BUCKET_BOUNDS[0], 2)
    # A value exactly on a bound counts as at or below it, as Prometheus' "le" says.
    on_bound = Histogram()
    on_bound.observe(0.5)
    index = BUCKET_BOUNDS.index(0.5)
    assert on_bound.cumulative()[index] == (0.5, 1)
    assert on_bound.cumulative()[index - 1][1] == 0
    with pytest.raises(ValueError, match="quantile must be between 0 and 1"):
        metrics.quantile("h", 1.5)
    with pytest.raises(ValueError, match="quantile must be between 0 and 1"):
        histogram.quantile(-0.1)


# --- rates -------------------------------------------------------------------------------


def test_rate_over_a_sliding_window() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock, rate_window_s=10.0)
    assert metrics.ops_per_s() == 0.0  # no history yet
    for _ in range(20):  # 100 heartbeats and 50 tracks a second for 20 s
        clock.now += 1.0
        metrics.inc(m.OPS_HEARTBEAT, 100)
        metrics.inc(m.OPS_TRACK, 50)
        rate = metrics.ops_per_s()
        track_rate = metrics.rate(m.OPS_TRACK)
    assert rate == pytest.approx(150.0)
    assert track_rate == pytest.approx(50.0)
    # Each set of names keeps its own history: the first question about a new set has no answer.
    assert metrics.rate(m.OPS_UPDATE, m.OPS_TRACK) == 0.0
    for _ in range(20):  # then it goes quiet: after one window the rate is zero
        clock.now += 1.0
        rate = metrics.ops_per_s()
    assert rate == 0.0
    with pytest.raises(ValueError, match="at least one counter name"):
        metrics.rate()


def test_rate_with_explicit_now_and_repeated_instants() -> None:
    metrics = Metrics()
    metrics.rate("x", now=100.0)
    metrics.inc("x", 30)
    assert metrics.rate("x", now=103.0) == pytest.approx(10.0)
    assert metrics.rate("x", now=103.0) == pytest.approx(10.0)


def test_load_sample_from_the_standard_metrics() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.set(m.PRESENCES, 1200)
    metrics.set(m.CONNECTIONS, 300)
    metrics.set(m.TOPICS, 40)
    metrics.set(m.REDIS_FLUSH_LAG_SECONDS, 0.2)
    for _ in range(100):
        metrics.observe(m.DIFF_PROPAGATION_SECONDS, 0.004)
    metrics.ops_per_s()
    clock.now = 2.0
    metrics.inc(m.OPS_UPDATE, 10)
    sample = metrics.load_sample(memory_bytes=1 << 20)
    assert sample.at == 2.0
    assert (sample.presences, sample.connections, sample.topics) == (1200, 300, 40)
    assert sample.ops_per_s == pytest.approx(5.0)
    assert within_one_bucket(sample.diff_p99_ms, 4.0)
    assert sample.flush_lag_s == 0.2
    assert sample.memory_bytes == 1 << 20
    assert sample.wall_time is None


# --- snapshot ----------------------------------------------------------------------------


def test_as_dict_snapshot() -> None:
    metrics = Metrics()
    assert metrics.as_dict() == {
        "counters": {},
        "gauges": {},
        "histograms": {},
        "status_read_hit_ratio": None,
    }
    metrics.inc(m.STATUS_READS, 40)
    metrics.inc(m.STATUS_READ_HITS, 39)
    metrics.set(m.REDIS_PENDING, 3)
    metrics.observe(m.DIFF_PROPAGATION_SECONDS, 0.001)
    metrics.observe(m.DIFF_PROPAGATION_SECONDS, 0.003)
    snapshot = metrics.as_dict()
    assert snapshot["counters"] == {m.STATUS_READS: 40, m.STATUS_READ_HITS: 39}
    assert snapshot["gauges"] == {m.REDIS_PENDING: 3.0}
    assert snapshot["status_read_hit_ratio"] == pytest.approx(0.975)
    diff = snapshot["histograms"][m.DIFF_PROPAGATION_SECONDS]
    assert diff["count"] == 2
    assert diff["sum"] == pytest.approx(0.004)
    assert within_one_bucket(diff["p50"], 0.001)
    assert within_one_bucket(diff["p95"], 0.003)
    assert within_one_bucket(diff["p99"], 0.003)
    json.dumps(snapshot)  # serialisable as it is
    # The snapshot is a copy: keeping or changing it does not touch the metrics.
    snapshot["counters"][m.STATUS_READS] = 0
    metrics.inc(m.STATUS_READS)
    assert metrics.counter(m.STATUS_READS) == 41
    assert snapshot["counters"][m.STATUS_READS] == 0


# --- Prometheus --------------------------------------------------------------------------


def parse(text: bytes) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def samples(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def test_prometheus_exposition_parses_back() -> None:
    metrics = Metrics()
    metrics.inc(m.OPS_TRACK, 3)
    metrics.inc(m.OPS_HEARTBEAT, 7)
    metrics.inc(m.REDIS_ERRORS, 2)
    metrics.inc("custom-thing.count")
    metrics.set(m.PRESENCES, 12)
    values = [0.0005, 0.002, 0.002, 0.3, 2000.0]
    for value in values:
        metrics.observe(m.DIFF_PROPAGATION_SECONDS, value)

    families = parse(metrics.to_prometheus())

    ops = families["presence_ops"]
    assert ops.type == "counter"
    assert samples(ops) == {
        ("presence_ops_total", (("kind", "heartbeat"),)): 7.0,
        ("presence_ops_total", (("kind", "track"),)): 3.0,
    }
    assert samples(families["presence_redis_errors"]) == {("presence_redis_errors_total", ()): 2.0}
    assert "Failed Redis commands" in families["presence_redis_errors"].documentation
    assert samples(families["presence_custom_thing_count"]) == {
        ("presence_custom_thing_count_total", ()): 1.0
    }
    presences = families["presence_presences"]
    assert presences.type == "gauge"
    assert samples(presences) == {("presence_presences", ()): 12.0}

    histogram = families["presence_diff_propagation_seconds"]
    assert histogram.type == "histogram"
    buckets = [
        (float(s.labels["le"]), s.value) for s in histogram.samples if s.name.endswith("_bucket")
    ]
    assert buckets[-1] == (math.inf, 5.0)
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)
    for bound, count in buckets:
        assert count == sum(1 for v in values if v <= bound)  # exact at power-of-two bounds
    by_name = {s.name: s.value for s in histogram.samples if not s.name.endswith("_bucket")}
    assert by_name["presence_diff_propagation_seconds_count"] == 5.0
    assert by_name["presence_diff_propagation_seconds_sum"] == pytest.approx(math.fsum(values))

    # The exposition reads the metrics afresh each time.
    metrics.inc(m.OPS_TRACK)
    again = parse(metrics.to_prometheus())
    assert samples(again["presence_ops"])[("presence_ops_total", (("kind", "track"),))] == 4.0


def test_register_prometheus_reads_the_live_metrics() -> None:
    metrics = Metrics(namespace="edge")
    registry = CollectorRegistry()
    collector = register_prometheus(metrics, registry)
    metrics.inc(m.EVICTIONS, 5)
    metrics.set(m.TOPICS, 2)
    families = parse(generate_latest(registry))
    assert samples(families["edge_evictions"]) == {("edge_evictions_total", ()): 5.0}
    assert samples(families["edge_topics"]) == {("edge_topics", ()): 2.0}
    registry.unregister(collector)
    assert generate_latest(registry) == b""

    other = CollectorRegistry()
    register_prometheus(metrics, other, namespace="svc")
    assert "svc_evictions" in parse(generate_latest(other))
    with pytest.raises(ValueError, match="namespace must be a valid Prometheus name"):
        register_prometheus(metrics, CollectorRegistry(), namespace="9lives")


def test_missing_prometheus_client_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import prometheus_client` raise ImportError.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'presence-core\[prometheus\]'"):
        Metrics().to_prometheus()
    with pytest.raises(ImportError, match="needs the prometheus-client package"):
        register_prometheus(Metrics())
