"""Counters, gauges and latency histograms: cheap to write, readable as a dict or by Prometheus.

`Metrics` is the built-in `presence_core.typing.MetricsSink`.  Writing sits on the Tracker's hot
paths, so `Metrics.inc`, `Metrics.set` and `Metrics.observe` take no lock and allocate nothing
beyond the numbers themselves.  Reading (`Metrics.as_dict`, `Metrics.quantile`, Prometheus
scrapes) does the work instead.

Histograms have fixed, log-spaced buckets: four per doubling, from about 1 microsecond
(2**-20 s) to 1024 s, plus one bucket below and one above.  Every bucket spans a factor of
2**0.25 (about 19 %), so a quantile read from the buckets is within one bucket of the exact
value, whatever the distribution, at the cost of one ``log2`` per observation and about 1 KiB per
histogram.

Threads: the write methods are meant to be called from one thread (the Tracker's event loop).
Readers on other threads, such as the scrape thread of ``prometheus_client.start_http_server``,
are safe: they copy each table in one step before reading it, so they see every write that
finished before the copy, never a half-built entry.

Prometheus support needs the optional extra ``presence-core[prometheus]``; nothing here imports
``prometheus_client`` until it is used.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Final

from presence_core.scaling import LoadSample

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "BUCKET_BOUNDS",
    "CONNECTIONS",
    "CONNECTION_EXPIRIES",
    "DIFF_PROPAGATION_SECONDS",
    "EVICTIONS",
    "EXPIRIES",
    "HOOK_ERRORS",
    "LAST_SEEN_EVICTIONS",
    "LIMIT_HITS",
    "OPS_COUNTERS",
    "OPS_DISCONNECT",
    "OPS_HEARTBEAT",
    "OPS_TRACK",
    "OPS_UNTRACK",
    "OPS_UPDATE",
    "PRESENCES",
    "REDIS_ERRORS",
    "REDIS_FLUSH_LAG_SECONDS",
    "REDIS_PENDING",
    "STATUS_READS",
    "STATUS_READ_HITS",
    "STATUS_READ_HIT_RATIO",
    "TOPICS",
    "Histogram",
    "Metrics",
    "PrometheusCollector",
    "register_prometheus",
]

# --- The names the Tracker and the Redis store report under -------------------------------

PRESENCES: Final = "presences"
"""Gauge: live presences (topic, key, ref) in this process."""
CONNECTIONS: Final = "connections"
"""Gauge: live connections."""
TOPICS: Final = "topics"
"""Gauge: topics with at least one presence."""

OPS_TRACK: Final = "ops_track"
"""Counter: track operations."""
OPS_UPDATE: Final = "ops_update"
"""Counter: update operations."""
OPS_UNTRACK: Final = "ops_untrack"
"""Counter: untrack operations."""
OPS_HEARTBEAT: Final = "ops_heartbeat"
"""Counter: heartbeats (one per connection, however many presences it refreshes)."""
OPS_DISCONNECT: Final = "ops_disconnect"
"""Counter: disconnects."""
OPS_COUNTERS: Final = (OPS_TRACK, OPS_UPDATE, OPS_UNTRACK, OPS_HEARTBEAT, OPS_DISCONNECT)
"""Every operation counter; their summed rate is the ``ops_per_s`` of a load sample."""

EXPIRIES: Final = "expiries"
"""Counter: presences removed because their connection stopped heartbeating."""
EVICTIONS: Final = "evictions"
"""Counter: entries evicted because a table reached its capacity."""
LIMIT_HITS: Final = "limit_hits"
"""Counter: operations refused by a quota or rate limit."""
CONNECTION_EXPIRIES: Final = "connection_expiries"
"""Counter: connections removed because they stopped heartbeating."""
LAST_SEEN_EVICTIONS: Final = "last_seen_evictions"
"""Counter: last-seen records dropped because the last-seen table reached its capacity."""
HOOK_ERRORS: Final = "hook_errors"
"""Counter: exceptions raised by subscribers, transports, eviction callbacks or scalers (logged)."""

DIFF_PROPAGATION_SECONDS: Final = "diff_propagation_seconds"
"""Histogram: from a `Tracker.flush()` call to the last hook of a topic receiving its diff."""

STATUS_READS: Final = "status_reads"
"""Counter: user statuses asked for (each key of a bulk read counts)."""
STATUS_READ_HITS: Final = "status_read_hits"
"""Counter: statuses answered locally, without Redis."""
STATUS_READ_HIT_RATIO: Final = "status_read_hit_ratio"
"""Derived in `Metrics.as_dict`: status_read_hits / status_reads."""

REDIS_FLUSH_LAG_SECONDS: Final = "redis_flush_lag_seconds"
"""Gauge: age of the oldest change not yet written to Redis, seconds."""
REDIS_PENDING: Final = "redis_pending"
"""Gauge: changes waiting to be written to Redis."""
REDIS_ERRORS: Final = "redis_errors"
"""Counter: failed Redis commands and connection errors."""

_HELP: Final = {
    PRESENCES: "Live presences in this process.",
    CONNECTIONS: "Live connections in this process.",
    TOPICS: "Topics with at least one presence.",
    EXPIRIES: "Presences removed because their connection stopped heartbeating.",
    EVICTIONS: "Entries evicted because a table reached its capacity.",
    LIMIT_HITS: "Operations refused by a quota or rate limit.",
    CONNECTION_EXPIRIES: "Connections removed because they stopped heartbeating.",
    LAST_SEEN_EVICTIONS: "Last-seen records dropped at the last-seen table's capacity.",
    HOOK_ERRORS: "Exceptions raised by subscribers, transports, callbacks or scalers.",
    DIFF_PROPAGATION_SECONDS: "Time from a flush to the last hook of a topic receiving its diff.",
    STATUS_READS: "User statuses asked for.",
    STATUS_READ_HITS: "User statuses answered without Redis.",
    REDIS_FLUSH_LAG_SECONDS: "Age of the oldest change not yet written to Redis.",
    REDIS_PENDING: "Changes waiting to be written to Redis.",
    REDIS_ERRORS: "Failed Redis commands and connection errors.",
}

# --- Histogram buckets ---------------------------------------------------------------------

_PER_DOUBLING: Final = 4
_LOW_EXP: Final = -20
_HIGH_EXP: Final = 10
_FINITE: Final = (_HIGH_EXP - _LOW_EXP) * _PER_DOUBLING + 1  # bounds 2**-20 .. 2**10 inclusive

BUCKET_BOUNDS: Final[tuple[float, ...]] = tuple(
    2.0 ** (_LOW_EXP + i / _PER_DOUBLING) for i in range(_FINITE)
)
"""Upper bounds (inclusive) of the finite buckets, seconds; one more bucket holds the rest."""

_MIN_BOUND: Final = BUCKET_BOUNDS[0]
_MAX_BOUND: Final = BUCKET_BOUNDS[-1]
_OVERFLOW: Final = _FINITE  # index of the bucket above the last bound

# Prometheus stores one series per bucket, so scrapes get the power-of-two bounds only (31 of
# them).  Buckets are cumulative there, so the coarser view is exact at the bounds it keeps.
_EXPORTED: Final = tuple(range(0, _FINITE, _PER_DOUBLING))
# repr() of a float round-trips exactly, which is all the exposition format asks of "le".
_LE_LABELS: Final = tuple(repr(bound) for bound in BUCKET_BOUNDS)

# observe() computes ceil((log2(x) - _LOW_EXP) * _PER_DOUBLING) in the expanded form below:
# one multiply-add on floats is measurably cheaper there than int arithmetic and a subtraction,
# and it is exact at the power-of-two bounds, which is where Prometheus reads the buckets.
_PER_DOUBLING_F: Final = float(_PER_DOUBLING)
_INDEX_OFFSET: Final = float(-_LOW_EXP * _PER_DOUBLING)
_log2 = math.log2
_ceil = math.ceil


class Histogram:
    """Latency observations in fixed log-spaced buckets (see the module docstring).

    Obtain one from `Metrics.histogram` and keep it: calling `observe` on the handle skips the
    name lookup, which is worth it on the hottest paths.
    """

    __slots__ = ("_counts", "_sum")

    def __init__(self) -> None:
        # _counts[i] for i < _OVERFLOW holds values in (BUCKET_BOUNDS[i-1], BUCKET_BOUNDS[i]];
        # _counts[0] also holds everything at or below the first bound, zero included.
        self._counts: list[int] = [0] * (_FINITE + 1)
        self._sum: float = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration.  NaN is ignored: it is a broken clock, not a latency."""
        if _MIN_BOUND < seconds <= _MAX_BOUND:
            self._counts[_ceil(_log2(seconds) * _PER_DOUBLING_F + _INDEX_OFFSET)] += 1
        elif seconds > _MAX_BOUND:
            self._counts[_OVERFLOW] += 1
        elif seconds == seconds:  # false only for NaN
            self._counts[0] += 1
        else:
            return
        self._sum += seconds

    @property
    def count(self) -> int:
        """How many durations were observed."""
        return sum(self._counts)

    @property
    def sum(self) -> float:
        """The total of the observed durations, seconds."""
        return self._sum

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0 <= q <= 1) in seconds; 0.0 when nothing was observed.

        The answer lies in the bucket holding the exact quantile, placed inside it by geometric
        interpolation.  Values at or below the first bound read as that bound, values above the
        last as the last: the buckets do not know more.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
        return _quantile(list(self._counts), q)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)`` for every bound, then ``(inf, count)``."""
        cumulative = list(accumulate(self._counts))
        return [*zip(BUCKET_BOUNDS, cumulative[:-1], strict=True), (math.inf, cumulative[-1])]


def _quantile(counts: list[int], q: float) -> float:
    total = sum(counts)
    if total == 0:
        return 0.0
    # Rank among the observations, 1-based; q = 0 asks for the smallest.
    rank = max(1.0, q * total)
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == 0:
                return _MIN_BOUND
            if i == _OVERFLOW:
                return _MAX_BOUND
            low, high = BUCKET_BOUNDS[i - 1], BUCKET_BOUNDS[i]
            fraction = (rank - seen) / n
            return float(low * (high / low) ** fraction)
        seen += n
    return _MAX_BOUND  # unreachable: rank <= total


class Metrics:
    """Named counters, gauges and latency histograms, created on first use.

    Args:
        clock: Seconds for rate windows; the Tracker passes its own injectable clock.
        rate_window_s: How far back `rate` looks.
        namespace: Prefix of the Prometheus names (``presence_ops_total`` ...).
    """

    __slots__ = (
        "_clock",
        "_counters",
        "_gauges",
        "_histograms",
        "_namespace",
        "_prometheus_registry",
        "_rate_history",
        "_rate_window_s",
    )

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 10.0,
        namespace: str = "presence",
    ) -> None:
        if not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        if (
            not isinstance(rate_window_s, (int, float))
            or isinstance(rate_window_s, bool)
            or not 0 < rate_window_s < math.inf
        ):
            raise ValueError(
                f"rate_window_s must be a positive finite number, got {rate_window_s!r}"
            )
        if not isinstance(namespace, str) or not _PROMETHEUS_NAME.fullmatch(namespace):
            raise ValueError(
                f"namespace must be a valid Prometheus name prefix ([a-zA-Z_][a-zA-Z0-9_]*), "
                f"got {namespace!r}"
            )
        self._clock = clock
        self._rate_window_s = float(rate_window_s)
        self._namespace = namespace
        self._counters: dict[str, int] = {}
        self._gauges: dict[str, float] = {}
        self._histograms: dict[str, Histogram] = {}
        self._rate_history: dict[tuple[str, ...], deque[tuple[float, int]]] = {}
        self._prometheus_registry: CollectorRegistry | None = None

    @property
    def namespace(self) -> str:
        """Prefix of the Prometheus names."""
        return self._namespace

    # --- writing (hot paths) ---------------------------------------------------------------

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` (>= 0, unchecked: this is a hot path) to the counter ``name``."""
        counters = self._counters
        counters[name] = counters.get(name, 0) + n

    def set(self, name: str, value: float) -> None:
        """Set the gauge ``name`` to ``value``."""
        self._gauges[name] = value

    def add(self, name: str, delta: float) -> None:
        """Move the gauge ``name`` by ``delta`` (which may be negative)."""
        gauges = self._gauges
        gauges[name] = gauges.get(name, 0) + delta

    def observe(self, name: str, seconds: float) -> None:
        """Record one duration in the histogram ``name`` (NaN is ignored)."""
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = Histogram()
        histogram.observe(seconds)

    def histogram(self, name: str) -> Histogram:
        """The histogram ``name``, created if new; keep it to observe without the lookup."""
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = Histogram()
        return histogram

    # --- reading ---------------------------------------------------------------------------

    def counter(self, name: str) -> int:
        """The counter ``name``; 0 if it was never incremented."""
        return self._counters.get(name, 0)

    def gauge(self, name: str) -> float:
        """The gauge ``name``; 0.0 if it was never set."""
        return float(self._gauges.get(name, 0.0))

    def quantile(self, name: str, q: float) -> float:
        """The ``q``-quantile of the histogram ``name`` in seconds; 0.0 if nothing was observed.

        Within one bucket (a factor of 2**0.25) of the exact quantile of the observations.
        Reading an idle histogram as 0.0 lets a scaler read an idle service as idle.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
        histogram = self._histograms.get(name)
        if histogram is None:
            return 0.0
        return _quantile(list(histogram._counts), q)

    def rate(self, *names: str, now: float | None = None) -> float:
        """Per-second rate of the sum of the counters ``names`` over the last window.

        Nothing is recorded on the write path: each call remembers the current total, and the
        rate is measured against the oldest remembered total inside the window (or the newest
        one before it).  So the first call for a set of names returns 0.0, and callers should
        ask at a steady interval shorter than ``rate_window_s`` (a scaler's sampling interval
        is).
        """
        if not names:
            raise ValueError("rate() needs at least one counter name")
        at = self._clock() if now is None else now
        counters = self._counters
        total = 0
        for name in names:
            total += counters.get(name, 0)
        history = self._rate_history.get(names)
        if history is None:
            # Bounded so that a caller polling in a tight loop cannot grow it without limit;
            # the window then shrinks to the last 1,024 calls, which is still a fine average.
            history = self._rate_history[names] = deque(maxlen=1024)
        history.append((at, total))
        horizon = at - self._rate_window_s
        # Keep the newest point at or before the horizon as the base, so the rate spans the
        # whole window once enough history exists.
        while len(history) > 2 and history[1][0] <= horizon:
            history.popleft()
        base_at, base_total = history[0]
        elapsed = at - base_at
        if elapsed <= 0:
            return 0.0
        return (total - base_total) / elapsed

    def ops_per_s(self, now: float | None = None) -> float:
        """Tracker operations per second, all kinds together (see `OPS_COUNTERS`)."""
        return self.rate(*OPS_COUNTERS, now=now)

    def load_sample(
        self,
        *,
        at: float | None = None,
        wall_time: datetime | None = None,
        memory_bytes: int = 0,
    ) -> LoadSample:
        """A `LoadSample` built from the standard metrics, for a `presence_core.typing.Scaler`.

        ``at`` defaults to the clock.  Memory is not something these metrics know, so the host
        passes it.  Diff latencies are converted to milliseconds.
        """
        now = self._clock() if at is None else at
        return LoadSample(
            at=now,
            wall_time=wall_time,
            presences=int(self.gauge(PRESENCES)),
            connections=int(self.gauge(CONNECTIONS)),
            topics=int(self.gauge(TOPICS)),
            ops_per_s=self.ops_per_s(now=now),
            diff_p50_ms=self.quantile(DIFF_PROPAGATION_SECONDS, 0.50) * 1000.0,
            diff_p95_ms=self.quantile(DIFF_PROPAGATION_SECONDS, 0.95) * 1000.0,
            diff_p99_ms=self.quantile(DIFF_PROPAGATION_SECONDS, 0.99) * 1000.0,
            memory_bytes=memory_bytes,
            flush_lag_s=self.gauge(REDIS_FLUSH_LAG_SECONDS),
        )

    def as_dict(self) -> dict[str, Any]:
        """A snapshot, safe to serialise and to keep.

        Shape::

            {"counters": {name: int}, "gauges": {name: float},
             "histograms": {name: {"count": int, "sum": float,
                                   "p50": float, "p95": float, "p99": float}},
             "status_read_hit_ratio": float | None}

        Histogram values are seconds.  The hit ratio is None until a status has been read.
        """
        counters = dict(self._counters)
        gauges = {name: float(value) for name, value in dict(self._gauges).items()}
        histograms: dict[str, dict[str, float | int]] = {}
        for name, histogram in dict(self._histograms).items():
            counts = list(histogram._counts)
            histograms[name] = {
                "count": sum(counts),
                "sum": histogram.sum,
                "p50": _quantile(counts, 0.50),
                "p95": _quantile(counts, 0.95),
                "p99": _quantile(counts, 0.99),
            }
        reads = counters.get(STATUS_READS, 0)
        ratio = counters.get(STATUS_READ_HITS, 0) / reads if reads else None
        return {
            "counters": counters,
            "gauges": gauges,
            "histograms": histograms,
            STATUS_READ_HIT_RATIO: ratio,
        }

    def to_prometheus(self) -> bytes:
        """These metrics in the Prometheus text exposition format.

        Needs ``prometheus-client`` (``pip install 'presence-core[prometheus]'``).  To serve
        them from an existing registry instead, use `register_prometheus`.
        """
        registry = self._prometheus_registry
        if registry is None:
            prometheus_client = _import_prometheus()
            registry = prometheus_client.CollectorRegistry(auto_describe=False)
            registry.register(PrometheusCollector(self))
            self._prometheus_registry = registry
        from prometheus_client import generate_latest

        return generate_latest(registry)

    def _snapshot(
        self,
    ) -> tuple[dict[str, int], dict[str, float], list[tuple[str, list[int], float]]]:
        histograms = [(name, list(h._counts), h._sum) for name, h in dict(self._histograms).items()]
        return dict(self._counters), dict(self._gauges), histograms

    def __repr__(self) -> str:
        return (
            f"Metrics(counters={len(self._counters)}, gauges={len(self._gauges)}, "
            f"histograms={len(self._histograms)})"
        )


# --- Prometheus --------------------------------------------------------------------------

_PROMETHEUS_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NOT_IN_NAME: Final = re.compile(r"[^a-zA-Z0-9_]")
_OPS_PREFIX: Final = "ops_"


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "Prometheus export needs the prometheus-client package; install it with "
            "pip install 'presence-core[prometheus]'"
        ) from exc
    return prometheus_client


def _prometheus_name(namespace: str, name: str) -> str:
    # Metric names are free-form strings here; Prometheus allows far less.
    return f"{namespace}_{_NOT_IN_NAME.sub('_', name)}"


class PrometheusCollector:
    """Exposes a `Metrics` to a ``prometheus_client`` registry, reading it at scrape time.

    Nothing is recorded twice: each scrape turns the current counters, gauges and histograms
    into metric families.  The operation counters ``ops_<kind>`` become one counter
    ``<namespace>_ops_total`` with a ``kind`` label, the Prometheus way to slice one quantity.
    Histograms are exported at their power-of-two bounds.
    """

    def __init__(self, metrics: Metrics, namespace: str | None = None) -> None:
        _import_prometheus()
        if not isinstance(metrics, Metrics):
            raise TypeError(f"expected a Metrics, not {type(metrics).__name__}")
        self._metrics = metrics
        self._namespace = metrics.namespace if namespace is None else namespace
        if not _PROMETHEUS_NAME.fullmatch(self._namespace):
            raise ValueError(f"namespace must be a valid Prometheus name, got {self._namespace!r}")

    def collect(self) -> Iterator[Metric]:
        """Yield one metric family per counter, gauge and histogram (a registry calls this)."""
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ns = self._namespace
        counters, gauges, histograms = self._metrics._snapshot()

        ops: list[tuple[str, int]] = []
        for name, value in sorted(counters.items()):
            if name.startswith(_OPS_PREFIX) and len(name) > len(_OPS_PREFIX):
                ops.append((name[len(_OPS_PREFIX) :], value))
                continue
            help_text = _HELP.get(name, f"presence-core counter {name}.")
            yield CounterMetricFamily(_prometheus_name(ns, name), help_text, value=value)
        if ops:
            family = CounterMetricFamily(
                f"{ns}_ops", "Tracker operations by kind.", labels=["kind"]
            )
            for kind, value in ops:
                family.add_metric([kind], value)
            yield family

        for name, level in sorted(gauges.items()):
            help_text = _HELP.get(name, f"presence-core gauge {name}.")
            yield GaugeMetricFamily(_prometheus_name(ns, name), help_text, value=float(level))

        for name, counts, total_seconds in sorted(histograms, key=_first):
            cumulative = list(accumulate(counts))
            buckets = [(_LE_LABELS[i], float(cumulative[i])) for i in _EXPORTED]
            buckets.append(("+Inf", float(cumulative[-1])))
            help_text = _HELP.get(name, f"presence-core histogram {name}.")
            yield HistogramMetricFamily(
                _prometheus_name(ns, name), help_text, buckets=buckets, sum_value=total_seconds
            )


def _first(item: tuple[str, list[int], float]) -> str:
    return item[0]


def register_prometheus(
    metrics: Metrics,
    registry: CollectorRegistry | None = None,
    *,
    namespace: str | None = None,
) -> PrometheusCollector:
    """Serve ``metrics`` from a Prometheus registry (the global one by default).

    Returns the collector, so the caller can ``registry.unregister(collector)`` later.  Raises
    ImportError with installation advice when ``prometheus-client`` is missing.
    """
    prometheus_client = _import_prometheus()
    collector = PrometheusCollector(metrics, namespace)
    target: CollectorRegistry = prometheus_client.REGISTRY if registry is None else registry
    target.register(collector)
    return collector
