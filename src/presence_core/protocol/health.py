"""What ``/health``, ``/health/live``, ``/health/ready`` and ``/metrics`` answer, for any door.

Each function returns ``(status, content_type, body)``; the door writes it.  Health tells the
truth an orchestrator needs: 503 while starting, draining or stopping, ``degraded`` while Redis
(when a store is attached) is unreachable, and readiness also 503 then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from ..metrics import Metrics

if TYPE_CHECKING:
    from ..store import RedisStore
    from ..tracker import Tracker

__all__ = ["Answer", "health", "live", "metrics", "redis_health"]

Answer = tuple[int, str, bytes]
_JSON = "application/json"


def redis_health(store: RedisStore | None) -> str | None:
    """``"ok"`` or ``"down"`` with a store attached, else None."""
    if store is None:
        return None
    return "ok" if store.connected else "down"


def health(
    tracker: Tracker,
    store: RedisStore | None,
    *,
    accepting: bool,
    draining: bool,
    connections: int,
    ready: bool = False,
) -> Answer:
    """``/health`` (or, with ``ready``, ``/health/ready``, which is also 503 while draining or
    while Redis is down)."""
    redis = redis_health(store)
    if not accepting:
        status = "starting" if not draining else "stopping"
    elif draining:
        status = "draining"
    else:
        status = "degraded" if redis == "down" else "ok"
    code = 200 if accepting else 503
    if ready and (draining or redis == "down"):
        code = 503
    body = {
        "status": status,
        "redis": redis,
        "node": tracker.node,
        "connections": connections,
        "presences": tracker.totals().presences,
    }
    return code, _JSON, orjson.dumps(body)


def live() -> Answer:
    """``/health/live``: the process answers."""
    return 200, _JSON, b'{"status":"live"}'


def metrics(tracker: Tracker) -> Answer:
    """``/metrics`` in Prometheus' text format (404 when the Tracker's sink is not ours)."""
    sink = tracker.metrics
    if not isinstance(sink, Metrics):
        return 404, "text/plain", b"metrics go to a custom sink\n"
    tracker.sync_metrics()
    return 200, "text/plain; version=0.0.4", sink.to_prometheus()
