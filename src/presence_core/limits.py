"""Per-plan limits: sizes, quotas and write rates a connection may use.

A host configures one `Limits` per plan (free, pro, an enterprise tenant...) and passes them to
the Tracker as ``plans={"free": Limits(...), "pro": Limits(...)}``; each connection is registered
with a plan name and every call made for it is checked against that plan.  The defaults suit a
typical Supabase-style service: keys are user ids, metas are a few fields, a client joins a
handful of channels.

The write rate is a token bucket per connection (implemented as GCRA, the "generic cell rate
algorithm", which is the same bucket kept as one timestamp instead of a token count and a
timestamp): a connection may make ``burst`` writes at once and ``rate_per_second`` writes per
second after that.  Only writes that add or change presences (``track``, ``update``) spend
tokens: leaving, disconnecting and heartbeating are never refused, because refusing them would
keep stale presences alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Final

from ._validate import check_int, is_number, type_name
from .errors import PresenceTypeError, PresenceValueError, RateLimited

__all__ = ["DEFAULT_PLAN", "Limits", "admit"]

DEFAULT_PLAN: Final = "default"
"""The plan name a connection gets when the host does not name one."""

_MAX_BURST: Final = 2**53

# Fields that are counts and must be positive ints; the rest are checked one by one below.
_COUNTS: Final = (
    "max_key_length",
    "max_topic_length",
    "max_meta_bytes",
    "max_presences_per_connection",
    "max_topics_per_connection",
    "max_metas_per_key",
    "burst",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one connection on a plan may do.

    Attributes:
        max_key_length: Longest presence key, in characters.
        max_topic_length: Longest topic name, in characters.
        max_meta_bytes: Largest meta, measured as its orjson encoding in bytes.
        max_presences_per_connection: Presences one connection may hold at once.
        max_topics_per_connection: Distinct topics one connection may be present in.
        max_metas_per_key: Metas one key may have in one topic (one per connection or device),
            counted over all connections.
        rate_per_second: Sustained writes (track/update) per second per connection.
        burst: Writes a connection may make at once before the sustained rate applies.
    """

    max_key_length: int = 256
    max_topic_length: int = 256
    max_meta_bytes: int = 2048
    max_presences_per_connection: int = 100
    max_topics_per_connection: int = 100
    max_metas_per_key: int = 100
    rate_per_second: float = 20.0
    burst: int = 100

    def __post_init__(self) -> None:
        for name in _COUNTS:
            check_int(getattr(self, name), f"Limits.{name}", low=1)
        rate = self.rate_per_second
        if not is_number(rate):
            raise PresenceTypeError(
                f"Limits.rate_per_second must be a number, not {type_name(rate)}"
            )
        if not (0 < rate < math.inf):
            raise PresenceValueError(
                f"Limits.rate_per_second must be positive and finite, got {rate!r}"
            )
        rate = float(rate)
        # The bucket works in float seconds: a burst beyond 2**53 is not exact, and an interval
        # or tolerance that overflows to inf would make the bucket admit everything.
        if self.burst > _MAX_BURST:
            raise PresenceValueError(f"Limits.burst must be at most 2**53, got {self.burst}")
        if not math.isfinite((self.burst - 1) / rate) or not math.isfinite(1.0 / rate):
            raise PresenceValueError(
                f"Limits.rate_per_second {rate!r} with burst {self.burst} puts the token "
                "bucket beyond float range"
            )
        object.__setattr__(self, "rate_per_second", rate)

    @property
    def emission_interval(self) -> float:
        """Seconds one write costs in the token bucket (1 / rate_per_second)."""
        return 1.0 / self.rate_per_second

    @property
    def burst_tolerance(self) -> float:
        """How far ahead of the clock the bucket may run: (burst - 1) writes' worth, seconds."""
        return (self.burst - 1) / self.rate_per_second

    def as_dict(self) -> dict[str, float]:
        """The limits by field name (for logs, config dumps and tests)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def spent(limits: Limits, now: float) -> float:
    """The ``tat`` of a bucket with no write left at ``now``: the furthest ahead one can be.

    An admitted write leaves ``tat`` at most ``burst x interval`` (plus float rounding) ahead
    of the clock, and only a write can move it.
    """
    interval = 1.0 / limits.rate_per_second
    return now + limits.burst * interval


def admit(limits: Limits, tat: float, now: float, conn: str | int) -> float:
    """Spend one write from a connection's token bucket; returns the bucket's new ``tat``.

    ``tat`` is the bucket's theoretical arrival time (``-inf`` for a full bucket).  Raises
    `RateLimited` if the write does not fit, leaving the bucket as it was.

    A clock that steps backwards (an NTP step under ``clock=time.time``) would leave ``tat``
    further ahead of ``now`` than any sequence of admitted writes can put it, and the connection
    would be refused for the length of the step.  A ``tat`` beyond that bound is brought back
    to leave exactly this write in the bucket: the write is admitted and the bucket is then
    fully spent, the most it can legitimately be.  The clamp takes effect only through an
    admitted write, so it cannot leave a connection refused until the clock catches up; a step
    too small to be told from a full bucket costs at most its own length, under one interval.
    """
    interval = 1.0 / limits.rate_per_second
    allowed = (limits.burst - 1) * interval
    ahead = tat - now
    if ahead <= 0.0:
        return now + interval
    # Beyond what admitted writes can leave (allowed + interval, plus rounding slack): the
    # clock went back since the last write.
    if ahead > allowed + interval * 1.002:
        tat = now + allowed
        ahead = allowed
    # The slack absorbs float rounding of `tat - now` when the clock reads large values.
    if ahead > allowed + interval * 1e-3:
        raise RateLimited(conn, ahead - allowed)
    return tat + interval
