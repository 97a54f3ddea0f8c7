"""The live dashboard of `presence-core serve`: the page at ``/`` and its one JSON endpoint.

The page (``static/dashboard.html`` and its script, shipped in the package: no CDN, it works
offline) polls ``GET /api/dashboard`` about once a second and draws everything from that one
answer.  The server's side of it is this module's `Dashboard`:

* `Dashboard.sample` runs once a second from the server's tick.  It reads the Tracker's
  `Metrics` (counters, gauges and a copy of the diff-latency histogram, about 1 KiB) and keeps
  five minutes of one-second points: diff propagation p50/p95/p99 of the diffs of that second
  (from two histogram snapshots, so the writer keeps no window of its own), ops/s,
  connections and presences.  That is all the work there is when nobody looks.
* `Dashboard.answer` builds the JSON from those points and from the live state: totals, ops by
  kind, the last minute's diff quantiles, the Redis store's health and the peers, the limits
  that were hit, the scalers' latest decisions with their reasons.  Two parts cost more and are
  only built when the page asks: the topic list (``?topics=<filter>&topics_offset=<n>``, the
  largest topics first, a walk over every topic) and a page of one topic's members
  (``?topic=<name>&cursor=<key>``, `Tracker.page`, O(page + log n)).

The answer shape is documented on `Dashboard.answer`.  Every figure that ``/metrics`` exports
under the same name is read from the same `Metrics`, so the page and a scrape agree.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ..errors import PresenceValueError
from ..metrics import (
    CONNECTIONS,
    DIFF_PROPAGATION_SECONDS,
    EXPIRIES,
    HOOK_ERRORS,
    LIMIT_HITS,
    OPS,
    OPS_KINDS,
    PENDING_CHANGES,
    PRESENCES,
    TOPICS,
    Histogram,
    Metrics,
)
from ..tracker import Tracker

if TYPE_CHECKING:
    from ..store import RedisStore

__all__ = ["Dashboard"]

HISTORY: Final = 300  # one-second points kept: five minutes
WINDOW: Final = 60  # seconds of the "last minute" figures
RATE_WINDOW: Final = 5  # seconds over which ops per second are averaged
PAGE: Final = 50  # topics or members per page
DECISIONS: Final = 20  # scaler decisions shown
_MIN_ELAPSED: Final = 1.0  # seconds: a rate over less (just after the start) would be noise


class _Snapshot(NamedTuple):
    """What the windows are computed from, taken at each sample."""

    at: float  # time.monotonic(): rates must not jump when the wall clock is stepped
    histogram: Histogram
    ops: dict[str, float]  # by kind
    hits: dict[str, float]  # by limit


def _text(value: str) -> str:
    """``value`` made encodable as JSON: a lone surrogate (from undecodable bytes in a query,
    or a scaler's reason) would make the whole answer fail."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _ms(histogram: Histogram, q: float) -> float | None:
    """A quantile in milliseconds, or None when the histogram is empty (nothing to say)."""
    return None if histogram.count == 0 else round(histogram.quantile(q) * 1000.0, 3)


class Dashboard:
    """The numbers behind the dashboard page, sampled once a second.

    Args:
        tracker: The Tracker the server serves; its metrics sink must be the built-in `Metrics`.
        store: The `RedisStore` attached to it, if any (Redis health and the peers).
        scale_interval: Seconds between two `Tracker.run_scalers` calls by the host (shown
            with the decisions of the Tracker's scalers), or None if not known.
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        store: RedisStore | None = None,
        scale_interval: float | None = None,
    ) -> None:
        if not isinstance(tracker.metrics, Metrics):
            raise PresenceValueError("the dashboard reads the built-in Metrics sink")
        self.tracker = tracker
        self.metrics: Metrics = tracker.metrics
        self.store = store
        self.scale_interval = scale_interval
        self.started = time.time()
        # One point a second: (unix time, p50, p95, p99, ops/s, connections, presences).
        self._points: deque[tuple[float, float | None, float | None, float | None, float, int, int]]
        self._points = deque(maxlen=HISTORY)
        # Newest last, a minute and a second of them.
        self._snapshots: deque[_Snapshot] = deque(maxlen=WINDOW + 1)
        self._last_hit: dict[str, float] = {}  # limit -> unix time its count last grew
        self.sample()

    # -- once a second ----------------------------------------------------------------------

    def sample(self) -> None:
        """Take this second's point (the server's tick calls it once a second)."""
        now, at = time.time(), time.monotonic()
        tracker, metrics = self.tracker, self.metrics
        tracker.sync_metrics()
        histogram = metrics.histogram(DIFF_PROPAGATION_SECONDS)
        ops = {labels[0]: value for labels, value in metrics.series(OPS).items()}
        hits = {labels[0]: value for labels, value in metrics.series(LIMIT_HITS).items()}
        snapshots = self._snapshots
        if snapshots:
            before = snapshots[-1]
            second = histogram.since(before.histogram)
            elapsed = max(at - before.at, _MIN_ELAPSED)
            for limit, count in hits.items():
                if count > before.hits.get(limit, 0.0):
                    self._last_hit[limit] = now
            self._points.append(
                (
                    now,
                    _ms(second, 0.50),
                    _ms(second, 0.95),
                    _ms(second, 0.99),
                    round((sum(ops.values()) - sum(before.ops.values())) / elapsed, 3),
                    int(metrics.gauge(CONNECTIONS)),
                    int(metrics.gauge(PRESENCES)),
                )
            )
        snapshots.append(_Snapshot(at, histogram, ops, hits))

    # -- on request -------------------------------------------------------------------------

    def answer(
        self, query: Mapping[str, Sequence[str]], *, accepting: bool = True
    ) -> dict[str, Any]:
        """The JSON of ``GET /api/dashboard``; ``query`` is the parsed query string.

        Always present: ``node``, ``version``, ``now`` and ``started`` (Unix seconds),
        ``accepting``; ``totals`` (connections, presences, topics, pending_changes, expiries,
        hook_errors); ``ops`` (per kind: ``total`` and ``per_s`` over the last 5 s); ``diff``
        (count and p50/p95/p99 in ms over the last minute, null without diffs); ``history``
        (parallel arrays, one entry per second, oldest first: ``t``, ``p50_ms``, ``p95_ms``,
        ``p99_ms``, ``ops_per_s``, ``connections``, ``presences``); ``redis`` (null without a
        store); ``peers``; ``limits`` (the limits ever hit: total, last minute, last hit time);
        ``scaler`` (null without scalers: the interval and the latest decisions, newest first).

        With ``topics=<filter>`` (and ``topics_offset``): ``topics``, the topics whose name
        contains the filter, largest first, 50 a page.  With ``topic=<name>`` (and ``cursor``):
        ``members``, 50 keys of that topic with their metas, and the next page's cursor.

        Raises:
            PresenceValueError: an offset that is not a non-negative integer.
        """
        from .. import __version__

        tracker, metrics = self.tracker, self.metrics
        now = time.time()
        tracker.sync_metrics()  # the figures a scrape would read now
        ops = {labels[0]: value for labels, value in metrics.series(OPS).items()}
        hits = {labels[0]: value for labels, value in metrics.series(LIMIT_HITS).items()}
        snapshots = self._snapshots
        first = snapshots[0]
        recent = snapshots[max(0, len(snapshots) - 1 - RATE_WINDOW)]
        elapsed = max(time.monotonic() - recent.at, _MIN_ELAPSED)
        minute = snapshots[-1].histogram.since(first.histogram)
        points = list(self._points)
        body: dict[str, Any] = {
            "node": tracker.node,
            "version": __version__,
            "now": now,
            "started": self.started,
            "accepting": accepting,
            "totals": {
                "connections": int(metrics.gauge(CONNECTIONS)),
                "presences": int(metrics.gauge(PRESENCES)),
                "topics": int(metrics.gauge(TOPICS)),
                "pending_changes": int(metrics.gauge(PENDING_CHANGES)),
                "expiries": int(metrics.counter(EXPIRIES)),
                "hook_errors": int(metrics.counter(HOOK_ERRORS)),
            },
            "ops": {
                kind: {
                    "total": int(ops.get(kind, 0)),
                    "per_s": round((ops.get(kind, 0) - recent.ops.get(kind, 0)) / elapsed, 3),
                }
                for kind in OPS_KINDS
            },
            "diff": {
                "count": minute.count,
                "p50_ms": _ms(minute, 0.50),
                "p95_ms": _ms(minute, 0.95),
                "p99_ms": _ms(minute, 0.99),
            },
            "history": {
                name: [point[i] for point in points]
                for i, name in enumerate(
                    ("t", "p50_ms", "p95_ms", "p99_ms", "ops_per_s", "connections", "presences")
                )
            },
            "redis": self._redis(),
            "peers": self._peers(),
            "limits": [
                {
                    "limit": limit,
                    "total": int(count),
                    "last_minute": int(count - first.hits.get(limit, 0)),
                    "last_at": self._last_hit.get(limit),
                }
                for limit, count in sorted(hits.items())
            ],
            "scaler": self._scaler(),
        }
        if "topics" in query:
            body["topics"] = self._topics(_one(query, "topics"), _offset(query))
        if "topic" in query:
            body["members"] = self._members(_one(query, "topic"), _one(query, "cursor") or None)
        return body

    def _redis(self) -> dict[str, Any] | None:
        store = self.store
        if store is None:
            return None
        options = store.options
        where = options.path if options.path else f"{options.host}:{options.port}"
        scheme = "rediss" if options.ssl is not None else "redis"
        return {
            # Never the password: the page is for whoever can reach the port.
            "url": f"{scheme}://{where}/{options.db}",
            "cluster": store.cluster,
            "connected": store.connected,
            "layout": store.layout_name,
            "pending": store.pending,
            "errors": store.errors,
            "reconnects": store.reconnects,
            "flush_lag_s": round(store.flush_lag, 6),
        }

    def _peers(self) -> list[dict[str, Any]]:
        store = self.store
        sync = store.peers if store is not None else None
        live = sync.live_peers if sync is not None else frozenset()
        held = self.tracker.remote_nodes()
        return [
            {"node": node, "live": node in live, "presences": held.get(node, 0)}
            for node in sorted(live | held.keys())
        ]

    def _scaler(self) -> dict[str, Any] | None:
        if not self.tracker.scalers:
            return None
        return {
            "interval_s": self.scale_interval,
            "decisions": [
                {
                    "at": at.timestamp(),
                    "action": decision.action,
                    "desired": decision.desired,
                    "current": decision.current,
                    "reason": _text(decision.reason),
                }
                for at, decision in self.tracker.decisions()[:DECISIONS]
            ],
        }

    def _topics(self, needle: str, offset: int) -> dict[str, Any]:
        tracker = self.tracker
        names = [name for name in tracker.topics() if needle in name]
        if offset >= len(names):  # the list shrank under a later page: show its last page
            offset = max(0, (len(names) - 1) // PAGE * PAGE)
        count = tracker.count
        largest = heapq.nlargest(offset + PAGE, names, key=lambda name: (count(name), name))
        return {
            "filter": _text(needle),
            "offset": offset,
            "limit": PAGE,
            "total": len(names),
            "items": [
                {"topic": name, "keys": count(name), "metas": count(name, metas=True)}
                for name in largest[offset:]
            ],
        }

    def _members(self, topic: str, cursor: str | None) -> dict[str, Any]:
        state, after = self.tracker.page(topic, cursor, limit=PAGE)
        return {
            "topic": topic,
            "cursor": None if cursor is None else _text(cursor),
            "next": after,
            "keys": self.tracker.count(topic),
            "items": [{"key": key, "metas": entry["metas"]} for key, entry in state.items()],
        }


def _one(query: Mapping[str, Sequence[str]], name: str) -> str:
    values = query.get(name)
    return values[0] if values else ""


def _offset(query: Mapping[str, Sequence[str]]) -> int:
    raw = _one(query, "topics_offset") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # "²".isdigit() is True
        raise PresenceValueError(f"topics_offset must be a non-negative integer, got {raw!r}")
    return int(raw)
