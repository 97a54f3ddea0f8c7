"""The audit log: one record per security-relevant event, at a bounded rate.

Records go to the ``presence_core.audit`` logger at INFO, with their fields under the record's
``audit`` attribute (``presence-core serve --log-json`` writes them as JSON fields).  They name
connections, topics, limits and reasons, never meta contents or secrets.

Anything a client or a peer can cause (a refused join, a bad sync message) must not be able to
flood the log: each event name may write `BURST` records, then one a `WINDOW`; what is held back
is counted, and the next record of that event that is written (or, at the latest, the next call
of `flush_suppressed`) says how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

__all__ = ["BURST", "WINDOW", "audit", "flush_suppressed", "reset"]

logger = logging.getLogger("presence_core.audit")

BURST: Final = 20  # records of one event written before the limit applies
WINDOW: Final = 1.0  # seconds: then one record of that event per window

# event -> [tokens, last refill (monotonic), suppressed since the last record written]
_buckets: dict[str, list[float]] = {}
_MAX_EVENTS: Final = 1024  # event names are ours, but bound the table all the same


def audit(event: str, **fields: Any) -> bool:
    """Write one audit record for ``event`` unless its rate is spent; True if written.

    A written record carries ``suppressed=N`` when N records of the same event were held back
    since the last one written.
    """
    now = time.monotonic()
    bucket = _buckets.get(event)
    if bucket is None:
        if len(_buckets) >= _MAX_EVENTS:
            _buckets.clear()
        bucket = _buckets[event] = [float(BURST), now, 0.0]
    tokens = min(float(BURST), bucket[0] + (now - bucket[1]) / WINDOW)
    bucket[1] = now
    if tokens < 1.0:
        bucket[0] = tokens
        bucket[2] += 1
        return False
    bucket[0] = tokens - 1.0
    if bucket[2]:
        fields["suppressed"] = int(bucket[2])
        bucket[2] = 0.0
    logger.info(event, extra={"audit": {"event": event, **fields}})
    return True


def flush_suppressed() -> int:
    """Write one summary record per event whose records were held back; returns how many.

    A server calls this now and then (``presence-core serve`` does, every few seconds), so a
    flood that stops is still reported.
    """
    written = 0
    for event, bucket in _buckets.items():
        if bucket[2]:
            n, bucket[2] = int(bucket[2]), 0.0
            logger.info(
                "audit_suppressed",
                extra={"audit": {"event": "audit_suppressed", "of": event, "suppressed": n}},
            )
            written += 1
    return written


def reset() -> None:
    """Forget every event's rate (for tests)."""
    _buckets.clear()
