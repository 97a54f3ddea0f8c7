"""Metrics: declarations, in-memory readings, rates, quantiles, snapshots and Prometheus export."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from presence_core import metrics as m
from presence_core.errors import PresenceTypeError, PresenceValueError
from presence_core.metrics import (
    BUCKET_BOUNDS,
    CATALOGUE,
    DIFF_PROPAGATION_SECONDS,
    LIMIT_HITS,
    OPS,
    OPS_KINDS,
    Histogram,
    MetricDef,
    Metrics,
    PrometheusCollector,
    register_prometheus,
)
from presence_core.typing import MetricsSink

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


def declared_in_module() -> dict[str, MetricDef]:
    return {name: value for name, value in vars(m).items() if isinstance(value, MetricDef)}


# --- declarations --------------------------------------------------------------------------


def test_every_metric_is_declared_once_and_catalogued() -> None:
    names = [metric.name for metric in CATALOGUE]
    assert len(names) == len(set(names))
    module_level = declared_in_module()
    assert set(module_level.values()) == set(CATALOGUE)
    assert len(module_level) == len(CATALOGUE)  # no declaration under two module names
    for attribute, metric in module_level.items():
        assert attribute in m.__all__
        assert attribute == metric.name.upper()  # the constant is named after the metric
        assert re.fullmatch(r"[a-z][a-z0-9_]*", metric.name)
        assert metric.kind in ("counter", "gauge", "histogram")
        assert metric.help.strip() and metric.help.endswith(".")
        assert isinstance(metric.labels, tuple)
    assert OPS.labels == ("kind",)
    assert LIMIT_HITS.labels == ("limit",)
    assert OPS_KINDS == ("track", "update", "untrack", "heartbeat", "disconnect")
    assert DIFF_PROPAGATION_SECONDS.kind == "histogram"
    # No string-name constants or help table left over from the old scheme.
    assert not any(isinstance(getattr(m, name), str) for name in m.__all__)
    assert not hasattr(m, "_HELP")


def test_a_declaration_is_its_own_metric() -> None:
    twin = MetricDef("ops", "counter", OPS.help, ("kind",))
    assert twin != OPS and hash(twin) != hash(OPS)
    assert copy.copy(OPS) is OPS and copy.deepcopy([OPS])[0] is OPS
    assert MetricDef("x", "gauge", "An x.").labels == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPS.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (("Bad-Name", "gauge", "B."), PresenceValueError, "snake_case"),
        ((None, "gauge", "B."), PresenceValueError, "snake_case"),
        (("x", "summary", "S."), PresenceValueError, "kind must be one of"),
        (("x_total", "counter", "T."), PresenceValueError, "must not end in _total"),
        (("x", "gauge", ""), PresenceValueError, "help must not be empty"),
        (("x", "gauge", 3), PresenceTypeError, "help must be a str"),
        (("x", "gauge", "X.", ("a b",)), PresenceValueError, "invalid label name"),
        (("x", "gauge", "X.", ("__a",)), PresenceValueError, "reserved"),
        (("x", "histogram", "X.", ("le",)), PresenceValueError, "reserved"),
        (("x", "gauge", "X.", ("a", "a")), PresenceValueError, "repeat"),
        (("x", "gauge", "X.", ["a"]), PresenceTypeError, "labels must be a tuple"),
        (("x", "gauge", "X.", "a"), PresenceTypeError, "labels must be a tuple"),
    ],
)
def test_declarations_are_checked_when_made(
    fields: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        MetricDef(*fields)


@pytest.mark.parametrize(
    ("catalogue", "error", "message"),
    [
        ([OPS, OPS], PresenceValueError, "declares 'ops' more than once"),
        (
            [OPS, MetricDef("ops", "gauge", "Other.")],
            PresenceValueError,
            "declares 'ops' more than once",
        ),
        (
            [MetricDef("x", "counter", "X."), MetricDef("x_created", "gauge", "Y.")],
            PresenceValueError,
            "clash on 'x_created'",
        ),
        (
            [MetricDef("h_count", "gauge", "G."), MetricDef("h", "histogram", "H.")],
            PresenceValueError,
            "clash on 'h_count'",
        ),
        ([("ops", "counter", "Ops.", ())], PresenceTypeError, "must be MetricDef"),
        ("ops", PresenceTypeError, "iterable of MetricDef"),
        (None, PresenceTypeError, "iterable of MetricDef"),
    ],
)
def test_catalogues_are_checked(catalogue: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Metrics(catalogue=catalogue)


def test_constructor_is_validated() -> None:
    with pytest.raises(PresenceValueError, match="rate_window_s must be positive and finite"):
        Metrics(rate_window_s=0)
    with pytest.raises(PresenceTypeError, match="rate_window_s must be a number"):
        Metrics(rate_window_s="10")  # type: ignore[arg-type]
    with pytest.raises(PresenceValueError, match="namespace must be a valid Prometheus name"):
        Metrics(namespace="presence-core")
    with pytest.raises(PresenceTypeError, match="namespace must be a str"):
        Metrics(namespace=None)  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError, match="clock must be callable"):
        Metrics(clock=1.0)  # type: ignore[arg-type]
    assert Metrics(namespace="edge").namespace == "edge"
    assert Metrics().catalogue == CATALOGUE


def test_metrics_is_a_metrics_sink() -> None:
    assert isinstance(Metrics(), MetricsSink)


# --- writing and reading -------------------------------------------------------------------


def test_counters_and_gauges() -> None:
    metrics = Metrics()
    # Every declared metric reads as zero before its first write.
    for metric in CATALOGUE:
        labels = ("x",) * len(metric.labels)
        if metric.kind == "counter":
            assert metrics.counter(metric, *labels) == 0
        elif metric.kind == "gauge":
            assert metrics.gauge(metric, *labels) == 0.0
        else:
            assert metrics.quantile(metric, 0.5, *labels) == 0.0
    metrics.inc(OPS, labels=("track",))
    metrics.inc(OPS, 4, ("track",))
    metrics.inc(OPS, 2, ("heartbeat",))
    metrics.inc(m.EXPIRIES, 0)
    metrics.inc(m.EVICTIONS)
    assert metrics.counter(OPS, "track") == 5
    assert metrics.counter(OPS, "heartbeat") == 2
    assert metrics.counter(OPS, "update") == 0
    assert metrics.counter(m.EXPIRIES) == 0
    assert metrics.counter(m.EVICTIONS) == 1
    metrics.inc(LIMIT_HITS, 3, ("max_metas_per_key",))
    assert metrics.counter(LIMIT_HITS, "max_metas_per_key") == 3
    metrics.set(m.PRESENCES, 10)
    metrics.set(m.PRESENCES, 7)
    metrics.set(m.REDIS_FLUSH_LAG_SECONDS, 0.25)
    assert metrics.gauge(m.PRESENCES) == 7.0
    assert type(metrics.gauge(m.PRESENCES)) is float
    assert metrics.gauge(m.REDIS_FLUSH_LAG_SECONDS) == 0.25


def test_a_host_can_declare_metrics_of_its_own() -> None:
    queue = MetricDef("queue_depth", "gauge", "Jobs waiting.", ("queue", "priority"))
    metrics = Metrics(catalogue=(*CATALOGUE, queue))
    metrics.set(queue, 3, ("mail", "high"))
    metrics.set(queue, 5, ("mail", "low"))
    metrics.set(queue, 1, ("sms", "high"))
    assert metrics.gauge(queue, "mail", "low") == 5.0
    assert metrics.as_dict()["gauges"]["queue_depth"] == {
        "mail": {"high": 3.0, "low": 5.0},
        "sms": {"high": 1.0},
    }
    # ...and a Metrics serves exactly its catalogue.
    with pytest.raises(PresenceValueError, match="'queue_depth' is not a metric of this"):
        Metrics().set(queue, 1, ("mail", "high"))
    only_ops = Metrics(catalogue=[OPS])
    with pytest.raises(PresenceValueError, match="'presences' is not a metric of this"):
        only_ops.set(m.PRESENCES, 1)
    assert only_ops.catalogue == (OPS,)


D = DIFF_PROPAGATION_SECONDS
TypeE, ValueE = PresenceTypeError, PresenceValueError
LOOKALIKE = MetricDef("ops", "counter", OPS.help, ("kind",))  # equal fields, another declaration
UNDECLARED = MetricDef("other", "counter", "Other.")

# Each call is refused, whether or not its series exists already; the ids say why.
BAD_CALLS: list[tuple[str, Callable[[Metrics], object], type[Exception], str]] = [
    ("str-name", lambda x: x.inc("ops"), TypeE, "takes a MetricDef"),  # type: ignore[arg-type]
    ("tuple", lambda x: x.set(("presences", "gauge", "Live.", ()), 1), TypeE, "takes a MetricDef"),  # type: ignore[arg-type]
    ("unhashable", lambda x: x.inc([1]), TypeE, "takes a MetricDef"),  # type: ignore[arg-type]
    ("gauge-as-counter", lambda x: x.inc(m.PRESENCES), TypeE, "use set()"),
    ("counter-as-histogram", lambda x: x.observe(m.EXPIRIES, 1.0), TypeE, "not a histogram"),
    ("histogram-as-gauge", lambda x: x.set(D, 1.0), TypeE, "use observe()"),
    ("lookalike", lambda x: x.inc(LOOKALIKE, 1, ("track",)), ValueE, "another metric by that name"),
    ("undeclared", lambda x: x.inc(UNDECLARED), ValueE, "'other' is not a metric of this"),
    ("missing-labels", lambda x: x.inc(OPS), ValueE, "got 0 value(s)"),
    ("extra-labels", lambda x: x.inc(m.EXPIRIES, 1, ("a",)), ValueE, "got 1 value(s)"),
    ("too-many", lambda x: x.inc(OPS, 1, ("track", "x")), ValueE, "got 2 value(s)"),
    ("str-labels", lambda x: x.inc(OPS, 1, "track"), TypeE, "labels must be a tuple"),  # type: ignore[arg-type]
    ("list-labels", lambda x: x.inc(OPS, 1, ["track"]), TypeE, "labels must be a tuple"),  # type: ignore[arg-type]
    ("int-label", lambda x: x.inc(OPS, 1, (1,)), TypeE, "label 'kind' must be a str"),  # type: ignore[arg-type]
    ("empty-label", lambda x: x.inc(OPS, 1, ("",)), ValueE, "must not be empty"),
    ("long-label", lambda x: x.inc(OPS, 1, ("k" * 300,)), ValueE, "over the limit"),
    ("surrogate", lambda x: x.inc(OPS, 1, ("\ud800",)), ValueE, "not valid Unicode"),
    ("str-n", lambda x: x.inc(m.EXPIRIES, "1"), TypeE, "n must be an int"),  # type: ignore[arg-type]
    ("str-gauge", lambda x: x.set(m.PRESENCES, "1"), TypeE, "must be a number"),  # type: ignore[arg-type]
    ("none-gauge", lambda x: x.set(m.PRESENCES, None), TypeE, "must be a number"),  # type: ignore[arg-type]
    ("huge-gauge", lambda x: x.set(m.PRESENCES, 10**400), ValueE, "out of range"),
    ("str-seconds", lambda x: x.observe(D, "1"), TypeE, "must be a number"),  # type: ignore[arg-type]
    ("decimal", lambda x: x.observe(D, Decimal("0.5")), TypeE, "must be a number"),  # type: ignore[arg-type]
    ("read-gauge-as-counter", lambda x: x.counter(m.PRESENCES), TypeE, "counter() cannot take it"),
    ("read-labels", lambda x: x.counter(OPS), ValueE, "got 0 value(s)"),
    ("rate-of-gauge", lambda x: x.rate(m.PRESENCES), TypeE, "rate() cannot take it"),
    ("quantile-range", lambda x: x.quantile(D, 1.5), ValueE, "between 0 and 1"),
    ("quantile-type", lambda x: x.quantile(D, "p99"), TypeE, "quantile must be a number"),  # type: ignore[arg-type]
]  # fmt: skip


def busy_series() -> Metrics:
    metrics = Metrics()
    metrics.inc(OPS, 2, ("track",))
    metrics.inc(m.EXPIRIES, 1)
    metrics.set(m.PRESENCES, 4)
    metrics.observe(D, 0.01)
    return metrics


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_bad_calls_raise_our_errors_and_change_nothing(
    call: Callable[[Metrics], object], error: type[Exception], message: str
) -> None:
    # On a fresh instance, where the call would create the series, and on one where every
    # series it could touch exists already: the write path then starts with the plain update.
    for metrics in (Metrics(), busy_series()):
        before = (metrics.as_dict(), declared_exposition(metrics))
        with pytest.raises(error, match=re.escape(message)):
            call(metrics)
        assert (metrics.as_dict(), declared_exposition(metrics)) == before


# The amount of a counter is checked when the write creates the series; later writes to the
# series trust it, as the MetricsSink contract asks (the Tracker only adds positive deltas).
FIRST_WRITES: list[tuple[str, Callable[[Metrics], object], type[Exception], str]] = [
    ("negative", lambda x: x.inc(OPS, -1, ("track",)), ValueE, "n must be >= 0"),
    ("negative-unlabelled", lambda x: x.inc(m.EXPIRIES, -1), ValueE, "n must be >= 0"),
    ("bool-n", lambda x: x.inc(OPS, True, ("track",)), TypeE, "n must be an int"),
    ("float-n", lambda x: x.inc(m.EVICTIONS, 1.5), TypeE, "n must be an int"),  # type: ignore[arg-type]
    ("bool-gauge", lambda x: x.set(m.TOPICS, True), TypeE, "must be a number"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in FIRST_WRITES],
    ids=[case[0] for case in FIRST_WRITES],
)
def test_first_writes_check_the_value(
    call: Callable[[Metrics], object], error: type[Exception], message: str
) -> None:
    metrics = Metrics()
    before = (metrics.as_dict(), declared_exposition(metrics))
    with pytest.raises(error, match=re.escape(message)):
        call(metrics)
    assert (metrics.as_dict(), declared_exposition(metrics)) == before


def test_our_errors_are_also_the_builtin_ones() -> None:
    with pytest.raises(TypeError):
        Metrics().inc("ops")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Metrics().inc(OPS)


# --- histograms ----------------------------------------------------------------------------


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
        metrics.observe(DIFF_PROPAGATION_SECONDS, value)
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        estimate = metrics.quantile(DIFF_PROPAGATION_SECONDS, q)
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


def test_labelled_histograms_keep_their_series_apart() -> None:
    rpc = MetricDef("rpc_seconds", "histogram", "RPC time.", ("method",))
    metrics = Metrics(catalogue=(rpc,))
    assert metrics.quantile(rpc, 0.5, "get") == 0.0
    for _ in range(10):
        metrics.observe(rpc, 0.001, ("get",))
        metrics.observe(rpc, 1.0, ("put",))
    assert within_one_bucket(metrics.quantile(rpc, 0.5, "get"), 0.001)
    assert within_one_bucket(metrics.quantile(rpc, 0.5, "put"), 1.0)
    histograms = metrics.as_dict()["histograms"]["rpc_seconds"]
    assert set(histograms) == {"get", "put"}
    assert histograms["put"]["count"] == 10


def test_histogram_edges() -> None:
    histogram = Histogram()
    assert histogram.quantile(0.99) == 0.0  # empty reads as idle
    histogram.observe(math.nan)
    assert histogram.count == 0 and histogram.sum == 0.0
    histogram.observe(0.0)
    histogram.observe(-1.0)  # a clock step backwards lands in the lowest bucket
    assert histogram.count == 2
    assert histogram.quantile(1.0) == BUCKET_BOUNDS[0]
    histogram.observe(5000.0)
    assert histogram.quantile(1.0) == BUCKET_BOUNDS[-1]
    assert histogram.cumulative()[-1] == (math.inf, 3)
    assert histogram.cumulative()[0] == (BUCKET_BOUNDS[0], 2)
    # A value exactly on a bound counts as at or below it, as Prometheus' "le" says.
    on_bound = Histogram()
    on_bound.observe(0.5)
    index = BUCKET_BOUNDS.index(0.5)
    assert on_bound.cumulative()[index] == (0.5, 1)
    assert on_bound.cumulative()[index - 1][1] == 0
    with pytest.raises(PresenceValueError, match="quantile must be between 0 and 1"):
        histogram.quantile(-0.1)
    # NaN through the sink is ignored too.
    metrics = Metrics()
    metrics.observe(DIFF_PROPAGATION_SECONDS, math.nan)
    assert metrics.as_dict()["histograms"]["diff_propagation_seconds"]["count"] == 0


# --- rates ---------------------------------------------------------------------------------


def test_rate_over_a_sliding_window() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock, rate_window_s=10.0)
    assert metrics.ops_per_s() == 0.0  # no history yet
    assert metrics.rate(m.REDIS_ERRORS) == 0.0
    for _ in range(20):  # 100 heartbeats, 50 tracks and 2 Redis errors a second for 20 s
        clock.now += 1.0
        metrics.inc(OPS, 100, ("heartbeat",))
        metrics.inc(OPS, 50, ("track",))
        metrics.inc(m.REDIS_ERRORS, 2)
        rate = metrics.ops_per_s()
        errors = metrics.rate(m.REDIS_ERRORS)
    assert rate == pytest.approx(150.0)  # the sum over every kind
    assert errors == pytest.approx(2.0)
    # Each metric keeps its own history: the first question about another has no answer.
    assert metrics.rate(m.EXPIRIES) == 0.0
    for _ in range(20):  # then it goes quiet: after one window the rate is zero
        clock.now += 1.0
        rate = metrics.ops_per_s()
    assert rate == 0.0


def test_rate_with_explicit_now_and_repeated_instants() -> None:
    metrics = Metrics()
    metrics.rate(m.EVICTIONS, now=100.0)
    metrics.inc(m.EVICTIONS, 30)
    assert metrics.rate(m.EVICTIONS, now=103.0) == pytest.approx(10.0)
    assert metrics.rate(m.EVICTIONS, now=103.0) == pytest.approx(10.0)
    with pytest.raises(PresenceValueError, match="now must be finite"):
        metrics.rate(m.EVICTIONS, now=math.nan)


def test_load_sample_from_the_standard_metrics() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.set(m.PRESENCES, 1200)
    metrics.set(m.CONNECTIONS, 300)
    metrics.set(m.TOPICS, 40)
    metrics.set(m.REDIS_FLUSH_LAG_SECONDS, 0.2)
    for _ in range(100):
        metrics.observe(DIFF_PROPAGATION_SECONDS, 0.004)
    metrics.ops_per_s()
    clock.now = 2.0
    metrics.inc(OPS, 6, ("update",))
    metrics.inc(OPS, 4, ("untrack",))
    sample = metrics.load_sample(memory_bytes=1 << 20)
    assert sample.at == 2.0
    assert (sample.presences, sample.connections, sample.topics) == (1200, 300, 40)
    assert sample.ops_per_s == pytest.approx(5.0)
    assert within_one_bucket(sample.diff_p99_ms, 4.0)
    assert sample.flush_lag_s == 0.2
    assert sample.memory_bytes == 1 << 20
    assert sample.wall_time is None
    assert metrics.load_sample(at=7.0).at == 7.0


# --- snapshot ------------------------------------------------------------------------------


def test_as_dict_snapshot() -> None:
    metrics = Metrics()
    empty = metrics.as_dict()
    # Every declared metric is there from the start, under its declared name.
    assert set(empty) == {"counters", "gauges", "histograms", "status_read_hit_ratio"}
    for kind, section in (
        ("counter", "counters"),
        ("gauge", "gauges"),
        ("histogram", "histograms"),
    ):
        assert list(empty[section]) == [x.name for x in CATALOGUE if x.kind == kind]
    assert empty["counters"]["ops"] == {}
    assert empty["counters"]["expiries"] == 0
    assert empty["gauges"]["presences"] == 0.0
    assert empty["histograms"]["diff_propagation_seconds"] == {
        "count": 0,
        "sum": 0.0,
        "p50": 0.0,
        "p95": 0.0,
        "p99": 0.0,
    }
    assert empty["status_read_hit_ratio"] is None

    metrics.inc(m.STATUS_READS, 40)
    metrics.inc(m.STATUS_READ_HITS, 39)
    metrics.inc(OPS, 3, ("track",))
    metrics.inc(OPS, 9, ("heartbeat",))
    metrics.inc(LIMIT_HITS, 1, ("rate_per_second",))
    metrics.set(m.REDIS_PENDING, 3)
    metrics.observe(DIFF_PROPAGATION_SECONDS, 0.001)
    metrics.observe(DIFF_PROPAGATION_SECONDS, 0.003)
    snapshot = metrics.as_dict()
    assert snapshot["counters"]["status_reads"] == 40
    assert snapshot["counters"]["ops"] == {"track": 3, "heartbeat": 9}
    assert snapshot["counters"]["limit_hits"] == {"rate_per_second": 1}
    assert snapshot["gauges"]["redis_pending"] == 3.0
    assert snapshot["status_read_hit_ratio"] == pytest.approx(0.975)
    diff = snapshot["histograms"]["diff_propagation_seconds"]
    assert diff["count"] == 2
    assert diff["sum"] == pytest.approx(0.004)
    assert within_one_bucket(diff["p50"], 0.001)
    assert within_one_bucket(diff["p95"], 0.003)
    assert within_one_bucket(diff["p99"], 0.003)
    assert json.loads(json.dumps(snapshot)) == snapshot  # JSON-safe as it is
    # The snapshot is a copy: keeping or changing it does not touch the metrics.
    snapshot["counters"]["ops"]["track"] = 0
    metrics.inc(OPS, 1, ("track",))
    assert metrics.counter(OPS, "track") == 4
    assert snapshot["counters"]["ops"]["track"] == 0


# --- Prometheus ----------------------------------------------------------------------------


def parse(text: bytes) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


# The families of prometheus-client's process and GC collectors, which every scrape adds.
RUNTIME = ("process_", "python_gc_")


def declared(families: dict[str, Any]) -> list[str]:
    """The names of ``families`` less the process and GC ones."""
    return [name for name in families if not name.startswith(RUNTIME)]


def declared_exposition(metrics: Metrics) -> list[str]:
    """`Metrics.to_prometheus` less the process and GC lines, whose values move on their own."""
    lines = metrics.to_prometheus().decode().splitlines()
    return [
        line
        for line in lines
        if not line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(RUNTIME)
    ]


def samples(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def busy_metrics() -> tuple[Metrics, list[float]]:
    """A Metrics with every declared metric written, some of them in several series."""
    metrics = Metrics()
    values = [0.0005, 0.002, 0.002, 0.3, 2000.0]
    for i, metric in enumerate(CATALOGUE):
        if metric.kind == "counter" and metric is OPS:
            for j, kind in enumerate(OPS_KINDS):
                metrics.inc(OPS, j + 1, (kind,))
        elif metric.kind == "counter" and metric is LIMIT_HITS:
            metrics.inc(LIMIT_HITS, 2, ("rate_per_second",))
            metrics.inc(LIMIT_HITS, 5, ("max_metas_per_key",))
        elif metric.kind == "counter":
            metrics.inc(metric, i, tuple(f"{label}-{i}" for label in metric.labels))
        elif metric.kind == "gauge":
            metrics.set(metric, i + 0.5)
        else:
            for value in values:
                metrics.observe(metric, value)
    return metrics, values


def test_prometheus_exposition_shows_every_declaration_and_the_in_memory_values() -> None:
    metrics, values = busy_metrics()
    families = parse(metrics.to_prometheus())
    assert declared(families) == [f"presence_{metric.name}" for metric in CATALOGUE]
    for metric in CATALOGUE:
        family = families[f"presence_{metric.name}"]
        assert family.type == metric.kind
        assert family.documentation == metric.help
        for sample in family.samples:
            own = {k: v for k, v in sample.labels.items() if k != "le"}
            assert tuple(own) == metric.labels
            key = tuple(own.values())
            if metric.kind == "counter":
                assert sample.name == f"presence_{metric.name}_total"
                assert sample.value == metrics.counter(metric, *key)
            elif metric.kind == "gauge":
                assert sample.name == f"presence_{metric.name}"
                assert sample.value == metrics.gauge(metric, *key)
    assert samples(families["presence_ops"]) == {
        ("presence_ops_total", (("kind", kind),)): float(j + 1) for j, kind in enumerate(OPS_KINDS)
    }
    assert samples(families["presence_limit_hits"]) == {
        ("presence_limit_hits_total", (("limit", "max_metas_per_key"),)): 5.0,
        ("presence_limit_hits_total", (("limit", "rate_per_second"),)): 2.0,
    }

    histogram = families["presence_diff_propagation_seconds"]
    buckets = [
        (float(s.labels["le"]), s.value) for s in histogram.samples if s.name.endswith("_bucket")
    ]
    assert [bound for bound, _ in buckets[:-1]] == [2.0**e for e in range(-20, 11)]
    assert buckets[-1] == (math.inf, 5.0)
    for bound, count in buckets:
        assert count == sum(1 for v in values if v <= bound)  # exact at power-of-two bounds
    by_name = {s.name: s.value for s in histogram.samples if not s.name.endswith("_bucket")}
    assert by_name["presence_diff_propagation_seconds_count"] == 5.0
    assert by_name["presence_diff_propagation_seconds_sum"] == pytest.approx(math.fsum(values))

    # The exposition reads the metrics afresh each time.
    metrics.inc(OPS, 10, ("track",))
    again = parse(metrics.to_prometheus())
    assert samples(again["presence_ops"])[("presence_ops_total", (("kind", "track"),))] == 11.0


def test_unwritten_metrics_are_exported_too() -> None:
    families = parse(Metrics().to_prometheus())
    assert declared(families) == [f"presence_{metric.name}" for metric in CATALOGUE]
    assert samples(families["presence_expiries"]) == {("presence_expiries_total", ()): 0.0}
    assert samples(families["presence_presences"]) == {("presence_presences", ()): 0.0}
    assert samples(families["presence_ops"]) == {}  # labelled: no series until written
    histogram = samples(families["presence_diff_propagation_seconds"])
    assert histogram[("presence_diff_propagation_seconds_count", ())] == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_* reads /proc")
def test_the_exposition_has_the_process_and_gc_series() -> None:
    metrics = Metrics()
    families = parse(metrics.to_prometheus())  # parses: the text is well formed
    names = [s.name for family in families.values() for s in family.samples]
    assert names.count("process_resident_memory_bytes") == 1
    assert "process_open_fds" in names and "process_cpu_seconds_total" in names
    gc_generations = {
        s.labels["generation"]
        for s in families["python_gc_collections"].samples
        if s.name == "python_gc_collections_total"
    }
    assert gc_generations == {"0", "1", "2"}
    # The declared families come first, then the runtime ones.
    assert list(families)[: len(CATALOGUE)] == [f"presence_{x.name}" for x in CATALOGUE]
    # Each Metrics registers its own pair in its own registry: many instances, and a scrape of
    # each still shows every series once, while the global registry is left as it was.
    from prometheus_client import REGISTRY

    global_before = [family.name for family in REGISTRY.collect()]
    others = [Metrics(namespace=f"n{i}") for i in range(3)]
    for other in others:
        text = other.to_prometheus().decode()
        assert text.count("\nprocess_resident_memory_bytes ") == 1
        assert text.count('\npython_gc_collections_total{generation="0"} ') == 1
    assert [family.name for family in REGISTRY.collect()] == global_before
    # register_prometheus adds the declared families only: a registry with the default
    # collectors already has the process ones.
    registry = CollectorRegistry()
    register_prometheus(metrics, registry)
    assert declared(parse(generate_latest(registry))) == list(parse(generate_latest(registry)))


def test_the_registry_is_created_once() -> None:
    metrics = Metrics(namespace="edge")
    registry = metrics.registry()
    assert metrics.registry() is registry
    metrics.inc(m.EVICTIONS, 5)
    scraped = generate_latest(registry).decode().splitlines()
    assert scraped[: len(declared_exposition(metrics))] == declared_exposition(metrics)
    assert "edge_evictions" in parse(metrics.to_prometheus())


def test_register_prometheus_on_a_registry_and_unregister() -> None:
    metrics = Metrics(namespace="edge")
    registry = CollectorRegistry()
    collector = register_prometheus(metrics, registry)
    assert isinstance(collector, PrometheusCollector)
    metrics.inc(m.EVICTIONS, 5)
    metrics.set(m.TOPICS, 2)
    families = parse(generate_latest(registry))
    assert samples(families["edge_evictions"]) == {("edge_evictions_total", ()): 5.0}
    assert samples(families["edge_topics"]) == {("edge_topics", ()): 2.0}
    # describe() names every family, so the registry refuses a second copy...
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_prometheus(metrics, registry)
    # ...and collectors that clash with one of ours.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("edge_ops", "Clashes with edge_ops_total.", registry=registry)
    registry.unregister(collector)
    assert generate_latest(registry) == b""
    register_prometheus(metrics, registry)  # the names are free again
    assert "edge_topics" in parse(generate_latest(registry))
    with pytest.raises(PresenceTypeError, match="expected a Metrics"):
        register_prometheus(object(), CollectorRegistry())  # type: ignore[arg-type]


def test_register_prometheus_defaults_to_the_global_registry() -> None:
    from prometheus_client import REGISTRY

    collector = register_prometheus(Metrics(namespace="presence_core_test"))
    try:
        assert "presence_core_test_topics" in parse(generate_latest(REGISTRY))
    finally:
        REGISTRY.unregister(collector)
    assert "presence_core_test_topics" not in parse(generate_latest(REGISTRY))


def test_a_scrape_on_another_thread_while_writing() -> None:
    metrics = Metrics()
    registry = CollectorRegistry()
    register_prometheus(metrics, registry)
    stop = threading.Event()
    scrapes: list[int] = []
    failures: list[BaseException] = []

    def scraper() -> None:
        try:
            while not stop.is_set():
                parse(generate_latest(registry))
                metrics.as_dict()
                metrics.ops_per_s()
                scrapes.append(1)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often
    thread = threading.Thread(target=scraper)
    thread.start()
    writes = 0
    try:
        # Write until the scraper has read the tables many times over (or give up on a
        # starved scheduler), so that scrapes really overlap the writes.
        while (len(scrapes) < 10 or writes < 20_000) and writes < 2_000_000 and not failures:
            # New label values keep growing the series tables while the scraper copies them.
            metrics.inc(LIMIT_HITS, 1, (f"limit_{writes % 500}",))
            metrics.inc(OPS, 1, (OPS_KINDS[writes % 5],))
            metrics.set(m.PRESENCES, writes)
            metrics.observe(DIFF_PROPAGATION_SECONDS, writes * 1e-6)
            writes += 1
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert failures == []
    assert len(scrapes) >= 10
    assert sum(metrics.as_dict()["counters"]["limit_hits"].values()) == writes
    final = parse(metrics.to_prometheus())
    assert samples(final["presence_presences"]) == {("presence_presences", ()): writes - 1.0}


def test_missing_prometheus_client_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import prometheus_client` raise ImportError.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match="pip install prometheus-client"):
        Metrics().to_prometheus()
    with pytest.raises(ImportError, match="needs the prometheus-client package"):
        register_prometheus(Metrics())
    # In-memory readings never need it.
    metrics = Metrics()
    metrics.inc(OPS, 1, ("track",))
    assert metrics.as_dict()["counters"]["ops"] == {"track": 1}
