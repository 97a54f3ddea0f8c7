"""Counters, gauges and latency histograms: declared once, cheap to write, read by Prometheus.

Every metric is a `MetricDef` declared in this module: its name, kind, help text and label names,
in one place.  `CATALOGUE` lists them all.  Everything else is derived from the declarations:
the Prometheus families (name, type, help, label names), the keys of `Metrics.as_dict`, the
checks on each write.

`Metrics` is the built-in `presence_core.typing.MetricsSink`: it keeps the numbers in plain
dicts, and a collector turns them into ``prometheus_client`` metric families when a scrape asks.
The split is deliberate.  The Tracker writes on its hot paths, so a write must cost a dict update
and nothing more: no lock, no label lookup in a client library, no formatting.  A scrape comes
every few seconds at most and can afford the work of building families, so it does it.  The same
dicts answer in-memory readings (`Metrics.counter`, `Metrics.quantile`, `Metrics.rate`) for
the scaler and for tests, with no Prometheus round trip.

A write is checked in full once per series, when it creates the series: the metric must be a
declaration in this `Metrics`' catalogue, of the kind the method writes, with one str value per
declared label, and the amount must be a count (an int >= 0) or a number.  Later writes to the
same series go straight to the dict, which still refuses anything but a known series of the
right kind and a number; a refused write changes nothing.

Histograms have fixed, log-spaced buckets: four per doubling, from about 1 microsecond
(2**-20 s) to 1024 s, plus one bucket below and one above.  Every bucket spans a factor of
2**0.25 (about 19 %), so a quantile read from the buckets is within one bucket of the exact
value, whatever the distribution, at the cost of one ``log2`` per observation and about 1 KiB per
series.  Prometheus gets the power-of-two bounds only (31 of them, plus ``+Inf``): buckets are
cumulative there, so the coarser view is exact at the bounds it keeps, and a series per bucket
is what a scrape pays for.

Threads: the write methods are meant to be called from one thread (the Tracker's event loop).
Readers on other threads, such as the scrape thread of ``prometheus_client.start_http_server``,
are safe: they copy each series table in one step before reading it, so they see every write that
finished before the copy, never a half-built entry.

``prometheus_client`` is imported on first use only, so a process that never exports metrics
does not pay for importing it.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeAlias

from ._validate import (
    check_callable,
    check_finite,
    check_int,
    check_seconds,
    check_text,
    check_time,
    is_number,
    type_name,
)
from .errors import PresenceTypeError, PresenceValueError
from .scaling import LoadSample

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "BUCKET_BOUNDS",
    "CATALOGUE",
    "CONNECTIONS",
    "CONNECTION_EXPIRIES",
    "DIFF_PROPAGATION_SECONDS",
    "DISCONNECTS",
    "DISCONNECT_REASONS",
    "EVICTIONS",
    "EXPIRIES",
    "HOOK_ERRORS",
    "LAST_SEEN_EVICTIONS",
    "LIMIT_HITS",
    "OPS",
    "OPS_KINDS",
    "PENDING_CHANGES",
    "PRESENCES",
    "REDIS_ERRORS",
    "REDIS_FLUSH_LAG_SECONDS",
    "REDIS_PENDING",
    "PEERS",
    "PEER_LAPSES",
    "PEER_MESSAGES",
    "PEER_RESYNCS",
    "REDIS_RECONNECTS",
    "REDIS_STATUS_READS",
    "SCALER_DECISIONS",
    "SCALER_DESIRED_REPLICAS",
    "STATUS_READS",
    "STATUS_READ_HITS",
    "TOPICS",
    "Histogram",
    "MetricDef",
    "MetricKind",
    "Metrics",
    "PrometheusCollector",
    "register_prometheus",
]

MetricKind: TypeAlias = Literal["counter", "gauge", "histogram"]
_KINDS: Final = ("counter", "gauge", "histogram")
_WRITER: Final = {"counter": "inc()", "gauge": "set()", "histogram": "observe()"}

Labels: TypeAlias = tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class MetricDef:
    """The declaration of one metric: what it is called, what it measures, how it is sliced.

    A declaration is checked when it is made, and each one is its own metric: two declarations
    are never equal, even with the same fields (`Metrics` refuses both in one catalogue anyway),
    and `copy.copy` / `copy.deepcopy` return the declaration itself.  Comparing by identity also
    makes hashing free, which is what every write pays for.

    Attributes:
        name: snake_case, without the namespace: ``Metrics(namespace="presence")`` exports
            ``OPS`` as ``presence_ops_total``.  A counter's name does not end in ``_total``;
            prometheus-client adds it.
        kind: ``"counter"``, ``"gauge"`` or ``"histogram"`` (of seconds).
        help: One sentence, exported as the Prometheus ``HELP`` line.
        labels: The label names; each write passes one value per name, in this order.
    """

    name: str
    kind: MetricKind
    help: str
    labels: Labels = ()

    def __post_init__(self) -> None:
        _check_declaration(self)

    def __copy__(self) -> MetricDef:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> MetricDef:
        return self


# --- Checking declarations -----------------------------------------------------------------

_METRIC_NAME: Final = re.compile(r"[a-z][a-z0-9_]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NAMESPACE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_MAX_HELP: Final = 1024
_MAX_LABEL_VALUE: Final = 256
# The sample names prometheus-client derives from a family's name, by type; two declarations
# whose derived names meet would make a registry refuse the collector.
_SUFFIXES: Final = {
    "counter": ("_total", "_created"),
    "gauge": (),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def _check_catalogue(catalogue: object) -> tuple[MetricDef, ...]:
    if isinstance(catalogue, (str, bytes)) or not isinstance(catalogue, Iterable):
        raise PresenceTypeError(
            f"catalogue must be an iterable of MetricDef, not {type_name(catalogue)}"
        )
    metrics = tuple(catalogue)
    owners: dict[str, int] = {}  # every sample name a scrape can show -> index of its metric
    for index, metric in enumerate(metrics):
        if not isinstance(metric, MetricDef):
            raise PresenceTypeError(f"catalogue entries must be MetricDef, not {type_name(metric)}")
        for suffix in ("", *_SUFFIXES[metric.kind]):
            owner = owners.setdefault(metric.name + suffix, index)
            if owner == index:
                continue
            other = metrics[owner].name
            if other == metric.name:
                raise PresenceValueError(f"catalogue declares {other!r} more than once")
            raise PresenceValueError(
                f"catalogue declares {other!r} and {metric.name!r}, whose Prometheus names "
                f"clash on {metric.name + suffix!r}"
            )
    return metrics


def _check_declaration(metric: MetricDef) -> None:
    name, kind, help_text, labels = metric.name, metric.kind, metric.help, metric.labels
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise PresenceValueError(f"metric name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if kind not in _KINDS:
        raise PresenceValueError(f"{name}: kind must be one of {_KINDS}, got {kind!r}")
    if kind == "counter" and name.endswith("_total"):
        raise PresenceValueError(f"{name}: a counter's name must not end in _total")
    check_text(help_text, f"{name}: help", _MAX_HELP)
    if not isinstance(labels, tuple):
        raise PresenceTypeError(f"{name}: labels must be a tuple of str, not {type_name(labels)}")
    for label in labels:
        if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
            raise PresenceValueError(f"{name}: invalid label name {label!r}")
        if label.startswith("__") or (kind == "histogram" and label == "le"):
            raise PresenceValueError(f"{name}: label name {label!r} is reserved by Prometheus")
    if len(set(labels)) != len(labels):
        raise PresenceValueError(f"{name}: label names repeat in {labels!r}")


# --- The declarations ----------------------------------------------------------------------

PRESENCES: Final = MetricDef("presences", "gauge", "Live presences (topic, key, ref).")
CONNECTIONS: Final = MetricDef("connections", "gauge", "Live connections.")
TOPICS: Final = MetricDef("topics", "gauge", "Topics with at least one presence.")

OPS_KINDS: Final = ("track", "update", "untrack", "heartbeat", "disconnect")
OPS: Final = MetricDef(
    "ops",
    "counter",
    "Tracker operations by kind: track, update, untrack, heartbeat (one per connection, "
    "however many presences it refreshes) and disconnect.",
    ("kind",),
)

EXPIRIES: Final = MetricDef(
    "expiries", "counter", "Presences removed because their connection stopped heartbeating."
)
CONNECTION_EXPIRIES: Final = MetricDef(
    "connection_expiries", "counter", "Connections removed because they stopped heartbeating."
)
EVICTIONS: Final = MetricDef(
    "evictions", "counter", "Entries evicted because a table reached its capacity."
)
LAST_SEEN_EVICTIONS: Final = MetricDef(
    "last_seen_evictions",
    "counter",
    "Last-seen records dropped because the last-seen table reached its capacity.",
)
LIMIT_HITS: Final = MetricDef(
    "limit_hits",
    "counter",
    "Operations refused by a quota or rate limit, by the name of the Limits field that "
    "refused them.",
    ("limit",),
)
DISCONNECT_REASONS: Final = (
    "slow_reader",
    "ttl",
    "limit",
    "refused_handshake",
    "protocol_error",
    "rate",
    "shutdown",
)
DISCONNECTS: Final = MetricDef(
    "disconnects",
    "counter",
    "Connections the server closed itself, by reason: slow_reader (its send buffer stayed "
    "full), ttl (it stopped heartbeating), limit (a quota refused it), refused_handshake, "
    "protocol_error, rate (it sent frames too fast) or shutdown.",
    ("reason",),
)
HOOK_ERRORS: Final = MetricDef(
    "hook_errors",
    "counter",
    "Exceptions raised by subscribers, transports, callbacks, scalers or the metrics sink "
    "(each one is logged).",
)

DIFF_PROPAGATION_SECONDS: Final = MetricDef(
    "diff_propagation_seconds",
    "histogram",
    "Time from a flush to the last hook of a topic receiving its diff, seconds.",
)

STATUS_READS: Final = MetricDef(
    "status_reads", "counter", "User statuses asked for (each key of a bulk read counts)."
)
STATUS_READ_HITS: Final = MetricDef(
    "status_read_hits", "counter", "User statuses answered locally, without Redis."
)
PENDING_CHANGES: Final = MetricDef(
    "pending_changes", "gauge", "Presence changes waiting for the next flush."
)

REDIS_FLUSH_LAG_SECONDS: Final = MetricDef(
    "redis_flush_lag_seconds",
    "gauge",
    "Age of the oldest change not yet written to Redis, seconds.",
)
REDIS_PENDING: Final = MetricDef(
    "redis_pending", "gauge", "Changes waiting to be written to Redis."
)
REDIS_ERRORS: Final = MetricDef(
    "redis_errors", "counter", "Failed Redis commands and connection errors."
)

REDIS_RECONNECTS: Final = MetricDef(
    "redis_reconnects",
    "counter",
    "Connections to Redis opened again after a failure (each followed by a write-back).",
)

REDIS_STATUS_READS: Final = MetricDef(
    "redis_status_reads",
    "counter",
    "User statuses read through the store, by the tier that answered: memory (this process "
    "and its peers' presences), cache (a recent Redis answer) or redis.",
    ("tier",),
)
PEERS: Final = MetricDef("peers", "gauge", "Other live processes sharing presence through Redis.")
PEER_MESSAGES: Final = MetricDef(
    "peer_messages", "counter", "Diff messages received from other processes."
)
PEER_RESYNCS: Final = MetricDef(
    "peer_resyncs",
    "counter",
    "Reconciliations of the remote view with Redis, by reason: start, reconnect, hello (a "
    "peer came back), deaf (a probe went unanswered), recheck (of topics where pub/sub news "
    "was trusted over Redis) or periodic.",
    ("reason",),
)
PEER_LAPSES: Final = MetricDef(
    "peer_lapses",
    "counter",
    "Processes whose liveness key lapsed; their presences left this process's view.",
)

SCALER_DECISIONS: Final = MetricDef(
    "scaler_decisions",
    "counter",
    "Decisions of the scalers consulted by Tracker.run_scalers, by action: scale_up, "
    "scale_down or hold.",
    ("action",),
)
SCALER_DESIRED_REPLICAS: Final = MetricDef(
    "scaler_desired_replicas",
    "gauge",
    "Replicas asked for by the latest scaler decisions (the largest, with several scalers).",
)

CATALOGUE: Final[tuple[MetricDef, ...]] = (
    PRESENCES,
    CONNECTIONS,
    TOPICS,
    OPS,
    EXPIRIES,
    CONNECTION_EXPIRIES,
    EVICTIONS,
    LAST_SEEN_EVICTIONS,
    LIMIT_HITS,
    DISCONNECTS,
    HOOK_ERRORS,
    DIFF_PROPAGATION_SECONDS,
    STATUS_READS,
    STATUS_READ_HITS,
    PENDING_CHANGES,
    REDIS_FLUSH_LAG_SECONDS,
    REDIS_PENDING,
    REDIS_ERRORS,
    REDIS_RECONNECTS,
    REDIS_STATUS_READS,
    PEERS,
    PEER_MESSAGES,
    PEER_RESYNCS,
    PEER_LAPSES,
    SCALER_DECISIONS,
    SCALER_DESIRED_REPLICAS,
)
"""Every metric declared above, in the order scrapes and `Metrics.as_dict` list them."""

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

# The buckets a scrape shows: every fourth bound, the powers of two.
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
    """Durations in fixed log-spaced buckets (see the module docstring); one series of a metric."""

    __slots__ = ("_counts", "_sum")

    def __init__(self) -> None:
        # _counts[i] for i < _OVERFLOW holds values in (BUCKET_BOUNDS[i-1], BUCKET_BOUNDS[i]];
        # _counts[0] also holds everything at or below the first bound, zero included.
        self._counts: list[int] = [0] * (_FINITE + 1)
        self._sum: float = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration.  NaN is ignored: it is a broken clock, not a latency."""
        # The sum first: a value that is not a number fails here, before any bucket moves.
        total = self._sum + seconds
        if _MIN_BOUND < seconds <= _MAX_BOUND:
            self._counts[_ceil(_log2(seconds) * _PER_DOUBLING_F + _INDEX_OFFSET)] += 1
        elif seconds > _MAX_BOUND:
            self._counts[_OVERFLOW] += 1
        elif seconds == seconds:  # false only for NaN
            self._counts[0] += 1
        else:
            return
        self._sum = total

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
        return _quantile(list(self._counts), _check_q(q))

    def copy(self) -> Histogram:
        """A snapshot: later observations change this histogram, not the copy."""
        copy = Histogram()
        copy._counts = list(self._counts)
        copy._sum = self._sum
        return copy

    def since(self, earlier: Histogram) -> Histogram:
        """The observations made after ``earlier``, a `copy` of this histogram taken before.

        The quantiles of the last second or minute come from two snapshots, with no per-window
        series kept by the writer.
        """
        if not isinstance(earlier, Histogram):
            raise PresenceTypeError(f"earlier must be a Histogram, not {type_name(earlier)}")
        delta = Histogram()
        delta._counts = [max(0, a - b) for a, b in zip(self._counts, earlier._counts, strict=True)]
        delta._sum = max(0.0, self._sum - earlier._sum)
        return delta

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)`` for every bound, then ``(inf, count)``."""
        cumulative = list(accumulate(self._counts))
        return [*zip(BUCKET_BOUNDS, cumulative[:-1], strict=True), (math.inf, cumulative[-1])]

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self._sum!r})"


def _check_q(q: object) -> float:
    value = check_finite(q, "quantile")
    if not 0.0 <= value <= 1.0:
        raise PresenceValueError(f"quantile must be between 0 and 1, got {q!r}")
    return value


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


def _summary(histogram: Histogram) -> dict[str, float | int]:
    counts = list(histogram._counts)
    return {
        "count": sum(counts),
        "sum": histogram._sum,
        "p50": _quantile(counts, 0.50),
        "p95": _quantile(counts, 0.95),
        "p99": _quantile(counts, 0.99),
    }


# --- The sink ------------------------------------------------------------------------------


class Metrics:
    """The declared metrics of one process, in memory; the Tracker's default `MetricsSink`.

    Args:
        clock: Seconds for rate windows; the Tracker passes its own injectable clock.
        rate_window_s: How far back `rate` looks, seconds.
        namespace: Prefix of the Prometheus names (``presence_ops_total`` ...).
        catalogue: The metrics this instance serves, `CATALOGUE` by default.  A host that
            reports metrics of its own through the same sink declares them as `MetricDef` and
            passes ``(*CATALOGUE, *its_own)``.  Writing a metric outside the catalogue is refused:
            a scrape and `as_dict` show exactly the catalogue.

    Every unlabelled metric of the catalogue reads and exports as zero (an empty histogram)
    before its first write, so dashboards and alerts find every series name from the start.  A
    labelled series appears on its first write; writing 0 (``inc(OPS, 0, ("track",))``) makes one
    appear without counting anything.
    """

    __slots__ = (
        "_catalogue",
        "_clock",
        "_counters",
        "_declared",
        "_gauges",
        "_histograms",
        "_namespace",
        "_rate_history",
        "_rate_window_s",
        "_registry",
        "_registry_lock",
    )

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 10.0,
        namespace: str = "presence",
        catalogue: Iterable[MetricDef] = CATALOGUE,
    ) -> None:
        self._clock: Callable[[], float] = check_callable(clock, "clock")  # type: ignore[assignment]
        self._rate_window_s = check_seconds(rate_window_s, "rate_window_s")
        if not isinstance(namespace, str):
            raise PresenceTypeError(f"namespace must be a str, not {type_name(namespace)}")
        if not _NAMESPACE.fullmatch(namespace):
            raise PresenceValueError(
                f"namespace must be a valid Prometheus name prefix ([a-zA-Z_][a-zA-Z0-9_]*), "
                f"got {namespace!r}"
            )
        self._namespace = namespace
        self._catalogue = _check_catalogue(catalogue)
        self._declared = {metric.name: metric for metric in self._catalogue}
        # One table of series per metric, keyed by the tuple of label values.  The tables are
        # split by kind so that the kind check costs nothing: inc() looks only in _counters.
        self._counters: dict[MetricDef, dict[Labels, int]] = {}
        self._gauges: dict[MetricDef, dict[Labels, float]] = {}
        self._histograms: dict[MetricDef, dict[Labels, Histogram]] = {}
        # Every series, unlabelled ones included, is created by its first write, so that every
        # first write is checked; readers show an unwritten unlabelled metric as zero.
        for metric in self._catalogue:
            if metric.kind == "counter":
                self._counters[metric] = {}
            elif metric.kind == "gauge":
                self._gauges[metric] = {}
            else:
                self._histograms[metric] = {}
        self._rate_history: dict[MetricDef, deque[tuple[float, int]]] = {}
        self._registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()

    @property
    def namespace(self) -> str:
        """Prefix of the Prometheus names."""
        return self._namespace

    @property
    def catalogue(self) -> tuple[MetricDef, ...]:
        """The metrics this instance serves, in export order."""
        return self._catalogue

    # --- writing ---------------------------------------------------------------------------
    #
    # Each writer tries the plain dict update first.  Anything unusual (a metric outside the
    # catalogue or of another kind, a new series, wrong labels, a value of the wrong type) ends
    # in a KeyError or TypeError there, before anything changed, and goes to _write_slow, which
    # checks the call, then creates the series or explains the refusal.

    def inc(self, metric: MetricDef, n: int = 1, labels: Labels = ()) -> None:
        """Add ``n`` (an int >= 0) to the counter ``metric``, in the series ``labels``.

        ``n`` is checked when the call creates the series; later calls trust it.
        """
        try:
            self._counters[metric][labels] += n
        except (KeyError, TypeError):
            self._write_slow("counter", metric, n, labels)

    def set(self, metric: MetricDef, value: float, labels: Labels = ()) -> None:
        """Set the gauge ``metric``, in the series ``labels``, to ``value`` (an int or float)."""
        try:
            series = self._gauges[metric]
            if labels in series:
                # Adding 0.0 stores a float and refuses a str or None for the price of one
                # addition: a gauge that is not a number would break the next scrape.
                series[labels] = value + 0.0
                return
        except (KeyError, TypeError, OverflowError):
            pass
        self._write_slow("gauge", metric, value, labels)

    def observe(self, metric: MetricDef, seconds: float, labels: Labels = ()) -> None:
        """Record one duration in the histogram ``metric``, series ``labels`` (NaN is ignored)."""
        try:
            self._histograms[metric][labels].observe(seconds)
        except (KeyError, TypeError):
            self._write_slow("histogram", metric, seconds, labels)

    def _write_slow(self, kind: MetricKind, metric: object, value: object, labels: object) -> None:
        table = self._table(metric, kind, _WRITER[kind])
        declared: MetricDef = metric  # type: ignore[assignment]  # _table() checked it
        key = _check_labels(declared, labels)
        if kind == "counter":
            n = check_int(value, f"{declared.name}: n", low=0)
            table[key] = table.get(key, 0) + n
        elif kind == "gauge":
            if not is_number(value):
                raise PresenceTypeError(
                    f"{declared.name}: value must be a number, not {type_name(value)}"
                )
            try:
                table[key] = float(value)  # type: ignore[arg-type]
            except OverflowError:
                raise PresenceValueError(
                    f"{declared.name}: value is out of range for a float, got an int of "
                    f"{int(value).bit_length()} bits"  # type: ignore[call-overload]
                ) from None
        else:
            if not is_number(value):
                raise PresenceTypeError(
                    f"{declared.name}: seconds must be a number, not {type_name(value)}"
                )
            seconds: float = value  # type: ignore[assignment]  # a number, checked above
            histogram = table.get(key)
            if histogram is None:
                histogram = Histogram()
                histogram.observe(seconds)
                table[key] = histogram  # published only once it holds the observation
            else:
                histogram.observe(seconds)

    def _table(self, metric: object, kind: MetricKind, method: str) -> dict[Labels, Any]:
        """The series table of ``metric``, a ``kind`` of this catalogue; or the reason it is not."""
        tables: dict[MetricDef, dict[Labels, Any]]
        if kind == "counter":
            tables = self._counters
        elif kind == "gauge":
            tables = self._gauges
        else:
            tables = self._histograms
        if isinstance(metric, MetricDef):
            try:
                return tables[metric]
            except (KeyError, TypeError):
                pass
        self._refuse(metric, kind, method)

    def _refuse(self, metric: object, kind: MetricKind, method: str) -> NoReturn:
        if not isinstance(metric, MetricDef):
            raise PresenceTypeError(
                f"{method} takes a MetricDef declared in presence_core.metrics, "
                f"not {type_name(metric)}"
            )
        declared = self._declared.get(metric.name)
        if declared is not metric:
            raise PresenceValueError(
                f"{metric.name!r} is not a metric of this Metrics' catalogue"
                + ("" if declared is None else " (it declares another metric by that name)")
            )
        raise PresenceTypeError(
            f"{metric.name} is a {metric.kind}, not a {kind}: {method} cannot take it"
            + (f"; use {_WRITER[metric.kind]}" if method in _WRITER.values() else "")
        )

    # --- reading ---------------------------------------------------------------------------

    def counter(self, metric: MetricDef, *labels: str) -> int:
        """The counter ``metric`` in the series ``labels``; 0 if it was never incremented."""
        table = self._table(metric, "counter", "counter()")
        return table.get(_check_arity(metric, labels), 0)  # type: ignore[no-any-return]

    def gauge(self, metric: MetricDef, *labels: str) -> float:
        """The gauge ``metric`` in the series ``labels``; 0.0 if it was never set."""
        table = self._table(metric, "gauge", "gauge()")
        return float(table.get(_check_arity(metric, labels), 0.0))

    def quantile(self, metric: MetricDef, q: float, *labels: str) -> float:
        """The ``q``-quantile of the histogram ``metric``, series ``labels``, in seconds.

        Within one bucket (a factor of 2**0.25) of the exact quantile of the observations.
        0.0 if nothing was observed: a scaler reads an idle service as idle.
        """
        table = self._table(metric, "histogram", "quantile()")
        q = _check_q(q)
        histogram = table.get(_check_arity(metric, labels))
        if histogram is None:
            return 0.0
        return _quantile(list(histogram._counts), q)

    def histogram(self, metric: MetricDef, *labels: str) -> Histogram:
        """A `Histogram.copy` of the histogram ``metric``, series ``labels`` (empty if unused)."""
        table = self._table(metric, "histogram", "histogram()")
        histogram = table.get(_check_arity(metric, labels))
        return Histogram() if histogram is None else histogram.copy()

    def series(self, metric: MetricDef) -> dict[Labels, float]:
        """Every series of the counter or gauge ``metric``: label values -> value (a copy, as
        a scrape sees it: an unlabelled metric never written reads as one series at zero)."""
        if not isinstance(metric, MetricDef) or metric.kind == "histogram":
            raise PresenceTypeError(
                f"series() reads a counter or a gauge, not {metric!r}; use histogram()"
            )
        self._table(metric, metric.kind, "series()")  # refuses a metric of another catalogue
        return self._series(metric)

    def rate(self, metric: MetricDef, *, now: float | None = None) -> float:
        """Per-second rate of the counter ``metric`` (all its series together) over the window.

        Nothing is recorded on the write path: each call remembers the current total, and the
        rate is measured against the oldest remembered total inside the window (or the newest
        one before it).  So the first call for a metric returns 0.0, and callers should ask at
        a steady interval shorter than ``rate_window_s`` (a scaler's sampling interval is).
        """
        table = self._table(metric, "counter", "rate()")
        at = self._clock() if now is None else check_time(now)
        total: int = sum(table.copy().values())
        history = self._rate_history.get(metric)
        if history is None:
            # Bounded so that a caller polling in a tight loop cannot grow it without limit;
            # the window then shrinks to the last 1,024 calls, which is still a fine average.
            history = self._rate_history[metric] = deque(maxlen=1024)
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
        """Tracker operations per second, all kinds together (the rate of `OPS`)."""
        return self.rate(OPS, now=now)

    def load_sample(
        self,
        *,
        at: float | None = None,
        wall_time: datetime | None = None,
        memory_bytes: int = 0,
    ) -> LoadSample:
        """A `LoadSample` built from the standard metrics, for a `presence_core.typing.Scaler`.

        ``at`` defaults to the clock.  Memory is not something these metrics know, so the host
        passes it.  Diff latencies are converted to milliseconds.  Needs the standard metrics
        (`PRESENCES`, `OPS`, `DIFF_PROPAGATION_SECONDS` ...) in the catalogue.
        """
        now = self._clock() if at is None else check_time(at, "at")
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
        """A snapshot, safe to serialise as JSON and to keep.

        Shape, with every metric of the catalogue under its declared name::

            {"counters": {"expiries": 3, "ops": {"track": 5, "heartbeat": 40}, ...},
             "gauges": {"presences": 12.0, ...},
             "histograms": {"diff_propagation_seconds":
                                {"count": int, "sum": float,
                                 "p50": float, "p95": float, "p99": float}},
             "status_read_hit_ratio": float | None}

        An unlabelled metric maps to its value; a labelled one to a dict keyed by the value of
        its first label (then its second, and so on).  Histogram values are seconds.  The hit
        ratio is None until a status has been read.
        """
        counters = {m.name: _nest(m, self._series(m)) for m in self._counters}
        gauges = {
            m.name: _nest(m, {key: float(v) for key, v in self._series(m).items()})
            for m in self._gauges
        }
        histograms = {
            m.name: _nest(m, {key: _summary(h) for key, h in self._series(m).items()})
            for m in self._histograms
        }
        reads = self._total(STATUS_READS)
        ratio = self._total(STATUS_READ_HITS) / reads if reads else None
        return {
            "counters": counters,
            "gauges": gauges,
            "histograms": histograms,
            "status_read_hit_ratio": ratio,
        }

    def _total(self, metric: MetricDef) -> int:
        table = self._counters.get(metric)
        return 0 if table is None else sum(table.copy().values())

    # --- Prometheus ------------------------------------------------------------------------

    def registry(self) -> CollectorRegistry:
        """A ``prometheus_client`` registry of its own serving these metrics, created once.

        Serve it with ``prometheus_client.start_http_server(port, registry=metrics.registry())``;
        to add these metrics to another registry instead, use `register_prometheus`.

        It also serves prometheus-client's process and garbage-collector series
        (``process_resident_memory_bytes``, ``process_open_fds``,
        ``python_gc_collections_total`` ...), unprefixed, as the default registry does;
        `register_prometheus` adds the declared metrics only, since a registry that has the
        default collectors already serves those.
        """
        registry = self._registry
        if registry is None:
            with self._registry_lock:
                registry = self._registry
                if registry is None:
                    prometheus_client = _import_prometheus()
                    registry = prometheus_client.CollectorRegistry(auto_describe=False)
                    registry.register(PrometheusCollector(self))
                    # Given this registry, not the default: prometheus-client's global REGISTRY
                    # has its own pair already, and each Metrics has a registry of its own.
                    prometheus_client.ProcessCollector(registry=registry)
                    prometheus_client.GCCollector(registry=registry)
                    self._registry = registry
        return registry

    def to_prometheus(self) -> bytes:
        """A scrape of `registry` in the Prometheus text exposition format: these metrics, then
        the process and garbage-collector series."""
        prometheus_client = _import_prometheus()
        text: bytes = prometheus_client.generate_latest(self.registry())
        return text

    def _series(self, metric: MetricDef) -> dict[Labels, Any]:
        """A copy of the series table of ``metric``, safe to read while the writer runs.

        An unlabelled metric that was never written reads as one series at zero.
        """
        kind = metric.kind
        table: dict[Labels, Any]
        if kind == "counter":
            table = self._counters[metric].copy()
        elif kind == "gauge":
            table = self._gauges[metric].copy()
        else:
            table = self._histograms[metric].copy()
        if not table and not metric.labels:
            zero: Any = 0 if kind == "counter" else 0.0 if kind == "gauge" else Histogram()
            table[()] = zero
        return table

    def __repr__(self) -> str:
        series = sum(
            len(table)
            for tables in (self._counters, self._gauges, self._histograms)
            for table in tables.values()
        )
        return (
            f"Metrics(namespace={self._namespace!r}, metrics={len(self._catalogue)}, "
            f"series={series})"
        )


def _check_labels(metric: MetricDef, labels: object) -> Labels:
    if not isinstance(labels, tuple):
        raise PresenceTypeError(
            f"{metric.name}: labels must be a tuple of str (one per label name "
            f"{metric.labels!r}), not {type_name(labels)}"
        )
    _check_arity(metric, labels)
    for name, value in zip(metric.labels, labels, strict=True):
        check_text(value, f"{metric.name}: label {name!r}", _MAX_LABEL_VALUE)
    # A plain tuple: a subclass could hash and compare in ways the hot path does not expect.
    return tuple(labels)


def _check_arity(metric: MetricDef, labels: tuple[object, ...]) -> Labels:
    if len(labels) != len(metric.labels):
        raise PresenceValueError(
            f"{metric.name} has {len(metric.labels)} label(s) {metric.labels!r}, "
            f"got {len(labels)} value(s) {labels!r}"
        )
    return labels  # type: ignore[return-value]


def _nest(metric: MetricDef, table: dict[Labels, Any]) -> Any:
    """``table`` keyed by label values as nested dicts, one level per label name."""
    if not metric.labels:
        return table.get(())
    nested: dict[str, Any] = {}
    for key, value in table.items():
        level = nested
        for part in key[:-1]:
            level = level.setdefault(part, {})
        level[key[-1]] = value
    return nested


# --- Prometheus ----------------------------------------------------------------------------


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "Prometheus export needs the prometheus-client package; "
            "install it with pip install prometheus-client"
        ) from exc
    return prometheus_client


class PrometheusCollector:
    """Exposes a `Metrics` to a ``prometheus_client`` registry, reading it at scrape time.

    `collect` yields one family per declaration of the catalogue, named
    ``<namespace>_<name>`` (prometheus-client adds ``_total`` to counters), with the declared
    help and label names; `describe` yields the same families without samples, so a registry
    can refuse a collector whose names clash with ones it already serves.
    """

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics) -> None:
        if not isinstance(metrics, Metrics):
            raise PresenceTypeError(f"expected a Metrics, not {type_name(metrics)}")
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """Yield every family, without samples (a registry calls this when registering)."""
        for metric in self._metrics.catalogue:
            yield self._family(metric)

    def collect(self) -> Iterator[Metric]:
        """Yield every family with its current samples (a registry calls this per scrape)."""
        metrics = self._metrics
        for metric in metrics.catalogue:
            family = self._family(metric)
            series = metrics._series(metric)
            if metric.kind == "histogram":
                for key, histogram in series.items():
                    counts = list(histogram._counts)
                    cumulative = list(accumulate(counts))
                    buckets = [(_LE_LABELS[i], float(cumulative[i])) for i in _EXPORTED]
                    buckets.append(("+Inf", float(cumulative[-1])))
                    family.add_metric(list(key), buckets, histogram._sum)
            else:
                for key, value in series.items():
                    family.add_metric(list(key), float(value))
            yield family

    def _family(self, metric: MetricDef) -> Any:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        family_type = {
            "counter": CounterMetricFamily,
            "gauge": GaugeMetricFamily,
            "histogram": HistogramMetricFamily,
        }[metric.kind]
        name = f"{self._metrics.namespace}_{metric.name}"
        return family_type(name, metric.help, labels=list(metric.labels))

    def __repr__(self) -> str:
        return f"PrometheusCollector({self._metrics!r})"


def register_prometheus(
    metrics: Metrics, registry: CollectorRegistry | None = None
) -> PrometheusCollector:
    """Serve ``metrics`` from a Prometheus registry (the global ``REGISTRY`` by default).

    Returns the collector, so the caller can ``registry.unregister(collector)`` later.  Raises
    ``ValueError`` (prometheus-client's ``DuplicateTimeseries``) if the registry already serves
    one of the names, for instance the same metrics registered twice.
    """
    prometheus_client = _import_prometheus()
    collector = PrometheusCollector(metrics)
    target: CollectorRegistry = prometheus_client.REGISTRY if registry is None else registry
    target.register(collector)
    return collector
