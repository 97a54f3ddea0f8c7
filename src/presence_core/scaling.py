"""The built-in scaling policy: thresholds with hysteresis and cooldowns, plus a load calendar.

`ThresholdScaler` implements the `presence_core.typing.Scaler` protocol.  It reads one
`LoadSample` per interval and always answers with a `ScaleDecision` whose ``reason`` says which
signal drove it, the value, the threshold, the calendar multiplier and the cooldown or hysteresis
state.  It never actuates anything.

Two kinds of signal
-------------------
*Per-replica* signals are load that spreads over replicas: presences, connections, topics,
ops/s, memory.  Their `Threshold` bounds are per replica, and when one is breached the policy
sizes the service directly: ``desired = ceil(total load x calendar factor / target)``, where
``target`` is the per-replica load to aim for (by default the upper bound).

*Absolute* signals are symptoms that do not divide by the replica count in any predictable way:
diff propagation latency, Redis flush lag.  When one is breached the policy asks for one more
replica; when it is fine it allows at most one replica fewer at a time.

Hysteresis and cooldowns
------------------------
A scale-up happens when any signal is above its upper bound (for ``up_stable_samples``
consecutive samples).  A scale-down happens only when every signal is below its lower bound for
``down_stable_samples`` consecutive samples, and never to fewer replicas than the per-replica
signals need at their targets.  After any scaling decision, further scale-ups wait
``up_cooldown_s`` and scale-downs wait ``down_cooldown_s``, measured on ``sample.at``.

The replica-count contract
--------------------------
The scaler's idea of the running replica count changes only when the host says so, through the
constructor's ``current`` and `ThresholdScaler.set_current`.  A decision is a request, not a fact:
the host may apply it late, partly or not at all, and the scaler does not guess.  So the host
calls ``set_current(n)`` whenever its actuator reports a new count (after applying a decision, or
after someone scaled by hand).  Until then the scaler keeps judging against the old count, and
its cooldown keeps it from asking again and again while a scale-up is still starting.

The calendar
------------
`LoadCalendar` holds expected load multipliers by month x weekday x hour, so the service can grow
before a known peak instead of during it.  The observed load already contains the season it was
measured in, so by default (``calendar_mode="relative"``) the policy multiplies per-replica load
by ``peak within lead / multiplier now``: an hour before the evening peak that is 2.2 and capacity
is added ahead; during the peak it is 1.0 and the load is not counted twice.  With
``calendar_mode="absolute"`` the policy multiplies by the peak multiplier itself, which reads the
calendar as extra seasonal headroom.

Extreme numbers
---------------
Every valid `LoadSample` gets a decision, however large its numbers.  Arithmetic saturates
instead of overflowing: a load, a calendar factor or a product beyond float range counts as the
largest float, and a replica count sized from it counts as `REPLICA_LIMIT` (then capped at
``max_replicas`` as usual).  Configuration is checked when it is built: a calendar hour whose
multipliers multiply out of float range, and replica counts above `REPLICA_LIMIT`, are refused
with `presence_core.errors.PresenceValueError`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

from ._validate import check_finite, check_int, check_time, is_int, is_number, type_name
from .errors import PresenceTypeError, PresenceValueError

__all__ = [
    "LOAD_SIGNALS",
    "CalendarMode",
    "LoadSample",
    "ScaleAction",
    "ScaleDecision",
    "LoadCalendar",
    "REPLICA_LIMIT",
    "SampleScope",
    "ThresholdScaler",
    "Threshold",
    "ThresholdUnit",
]

#: The largest replica count the scaler works with: the range of Kubernetes' int32 ``replicas``.
#: Replica counts given to it (``max_replicas``, ``current``...) must not exceed it, and a count
#: sized from extreme load saturates at it before ``max_replicas`` caps it.
REPLICA_LIMIT: Final = 2**31 - 1

# The largest finite float: where saturating arithmetic stops.
_FLOAT_MAX: Final = sys.float_info.max

# Every numeric field of LoadSample, in declaration order.  A scaling threshold names one of
# these; keeping the list next to the dataclass means a new field cannot be forgotten by the
# validator below.
LOAD_SIGNALS: Final = (
    "presences",
    "connections",
    "topics",
    "ops_per_s",
    "diff_p50_ms",
    "diff_p95_ms",
    "diff_p99_ms",
    "memory_bytes",
    "flush_lag_s",
)
# The signals LoadSample declares as counts: they stay ints, however large.
_COUNT_SIGNALS: Final = frozenset({"presences", "connections", "topics", "memory_bytes"})


def _check_count(value: object, what: str, low: int = 1) -> int:
    """``value`` as a replica count in ``[low, REPLICA_LIMIT]``."""
    return check_int(value, what, low=low, high=REPLICA_LIMIT)


def _saturated(value: int | float) -> float:
    """``value`` (finite, or an int of any size) as a float, the largest float past the range."""
    if type(value) is float:
        return value
    try:
        return float(value)
    except OverflowError:
        return _FLOAT_MAX if value > 0 else -_FLOAT_MAX


def _times(a: float, b: float) -> float:
    """``a x b`` for finite non-negative floats, saturating at the largest float."""
    product = a * b
    return product if product <= _FLOAT_MAX else _FLOAT_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSample:
    """What one process looked like at one sampling instant; the input of a `Scaler`.

    Fields are keyword-only: with nine numbers of similar magnitude, a positional mix-up would be
    silent.  Load fields default to zero so a host that does not measure something (say, memory)
    can leave it out, and a zero never triggers a scale-up.

    Every field is checked on construction, so a scaler can trust what it reads: ``at`` is a
    finite number (stored as a float), ``wall_time`` a datetime or None, the counts
    (``presences``, ``connections``, ``topics``, ``memory_bytes``) ints >= 0 of any size, and the
    other loads finite numbers >= 0 (stored as floats).  A bool is not a number.  A value of the
    wrong type raises `presence_core.errors.PresenceTypeError`, one out of range (negative, NaN,
    infinite) `presence_core.errors.PresenceValueError`.  There is no "not measured" value: a
    host without a measurement leaves the field at 0.

    Attributes:
        at: Seconds from the host's clock (the Tracker's injectable clock, monotonic by default).
            Cooldowns are measured on this axis, so it must not jump backwards.
        wall_time: The calendar time of the sample, used only for calendar lookups (month,
            weekday, hour).  ``None`` makes a policy skip its calendar.
        presences: Live presences (topic, key, ref) in this process.
        connections: Live connections.
        topics: Topics with at least one presence.
        ops_per_s: Tracker operations (track, update, untrack, heartbeat, disconnect) per second
            over the recent window.
        diff_p50_ms: Median diff propagation latency, milliseconds.
        diff_p95_ms: 95th percentile diff propagation latency, milliseconds.
        diff_p99_ms: 99th percentile diff propagation latency, milliseconds.
        memory_bytes: Memory attributed to presence state (or the process RSS; the host decides
            and configures thresholds to match).
        flush_lag_s: Age of the oldest change not yet written to Redis; 0 when no store is
            attached.
    """

    at: float
    wall_time: datetime | None = None
    presences: int = 0
    connections: int = 0
    topics: int = 0
    ops_per_s: float = 0.0
    diff_p50_ms: float = 0.0
    diff_p95_ms: float = 0.0
    diff_p99_ms: float = 0.0
    memory_bytes: int = 0
    flush_lag_s: float = 0.0

    def __post_init__(self) -> None:
        # A sample is a record that scalers trust: check every field here, once, so that a
        # policy never meets a negative load, a string or a bool.  Counts stay ints of any
        # size; the other fields become finite floats.
        object.__setattr__(self, "at", check_time(self.at, "at"))
        wall_time = self.wall_time
        if wall_time is not None and not isinstance(wall_time, datetime):
            raise PresenceTypeError(
                f"wall_time must be a datetime or None, not {type_name(wall_time)}"
            )
        for name in LOAD_SIGNALS:
            value = getattr(self, name)
            if name in _COUNT_SIGNALS:
                check_int(value, name, low=0)
                continue
            number = check_finite(value, name)
            if number < 0.0:
                raise PresenceValueError(f"{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, number)

    def signal(self, name: str) -> float:
        """The value of the numeric field ``name`` (one of `LOAD_SIGNALS`) as a float.

        A count too large for a float reads as the largest float.
        """
        if name not in LOAD_SIGNALS:
            raise PresenceValueError(
                f"unknown load signal {name!r}; expected one of {LOAD_SIGNALS}"
            )
        return _saturated(getattr(self, name))


ScaleAction = Literal["scale_up", "scale_down", "hold"]
_ACTIONS: Final = ("scale_up", "scale_down", "hold")


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """A scaler's answer to one sample: what the replica count should become, and why.

    The scaler never actuates.  The host reads the decision, applies it through whatever it owns
    (a Kubernetes deployment, a process supervisor) or deliberately ignores it, and reports the
    replica count it ends up with back to the scaler.  ``hold`` means "do nothing": for a hold,
    ``desired`` equals ``current`` and an actuator that sets replicas to ``desired`` must not act
    on it, since ``current`` may lag behind a scale-up that is still under way.

    Attributes:
        action: ``"scale_up"``, ``"scale_down"`` or ``"hold"``.
        desired: The replica count the scaler asks for.
        current: The replica count the scaler believed was running when it decided.
        reason: A human-readable account: which signal, its value, the threshold it was compared
            with, any calendar multiplier, and the cooldown or hysteresis state.  Meant for logs
            and dashboards, not for parsing.
        signals: The values the decision was based on, by name (read-only).
    """

    action: ScaleAction
    desired: int
    current: int
    reason: str
    # A mapping is not hashable, so it stays out of the generated __hash__; decisions are still
    # comparable for equality.
    signals: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise PresenceValueError(f"action must be one of {_ACTIONS}, got {self.action!r}")
        check_int(self.desired, "desired", low=0, high=REPLICA_LIMIT)
        check_int(self.current, "current", low=0, high=REPLICA_LIMIT)
        if not isinstance(self.reason, str):
            raise PresenceTypeError(f"reason must be a str, not {type_name(self.reason)}")
        if self.action == "scale_up":
            consistent = self.desired > self.current
        elif self.action == "scale_down":
            consistent = self.desired < self.current
        else:
            consistent = self.desired == self.current
        if not consistent:
            raise PresenceValueError(
                f"{self.action} is inconsistent with desired={self.desired} current={self.current}"
            )
        if not isinstance(self.signals, Mapping):
            raise PresenceTypeError(f"signals must be a mapping, not {type_name(self.signals)}")
        signals: dict[str, float] = {}
        for name, value in self.signals.items():
            if not isinstance(name, str):
                raise PresenceTypeError(f"signal names must be str, not {type_name(name)}")
            # Finite, so that decisions compare equal to themselves (nan != nan).
            signals[name] = check_finite(value, f"signal {name!r}")
        # A read-only view over a private copy: whoever receives the decision cannot change what
        # the scaler recorded, and the caller's dict can be reused.
        object.__setattr__(self, "signals", MappingProxyType(signals))


ThresholdUnit = Literal["per_replica", "absolute"]
CalendarMode = Literal["relative", "absolute"]
SampleScope = Literal["replica", "service"]

# Load spreads over replicas; latency and lag do not, so they get the one-step rule.
_DEFAULT_UNITS: Final[Mapping[str, ThresholdUnit]] = {
    "presences": "per_replica",
    "connections": "per_replica",
    "topics": "per_replica",
    "ops_per_s": "per_replica",
    "memory_bytes": "per_replica",
    "diff_p50_ms": "absolute",
    "diff_p95_ms": "absolute",
    "diff_p99_ms": "absolute",
    "flush_lag_s": "absolute",
}

# A week of look-ahead covers every weekday x hour cell; longer leads would only add month
# boundaries and make each sample cost thousands of lookups.
_MAX_LEAD: Final = timedelta(days=7)
_HOUR: Final = timedelta(hours=1)

# Guards ceil() against float noise: 300 / 100 * 1.0 must size to 3 replicas, not 4.
_EPSILON: Final = 1e-9


def _fmt(value: float) -> str:
    """A number as a person reads it in a log line: 1,250 or 0.0123 or 12.5 or 3.2e+18."""
    if math.isnan(value):
        return "nan"
    if 1000 <= abs(value) < 1e15:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _size(total: float, target: float) -> int:
    """``ceil(total / target)`` replicas, saturating at `REPLICA_LIMIT`."""
    # total is finite and >= 0 and target > 0, but a tiny target can still overflow the ratio.
    ratio = total / target - _EPSILON
    if ratio >= REPLICA_LIMIT:
        return REPLICA_LIMIT
    return max(0, math.ceil(ratio))


@dataclass(frozen=True, slots=True)
class Threshold:
    """The bounds of one signal.

    Attributes:
        signal: A numeric field of `LoadSample` (see `LOAD_SIGNALS`).
        scale_up_above: Scale up when the signal is above this.
        scale_down_below: Allow a scale-down when the signal is below this.  Must be lower than
            ``scale_up_above``: the gap between the two is the hysteresis band that keeps the
            policy from flapping.  A lower bound of 0 means this signal never allows scaling down.
        unit: ``"per_replica"`` (bounds are load per replica; breaches size the service) or
            ``"absolute"`` (bounds apply to the value as it is; breaches move one step).  ``None``
            picks the natural unit of the signal: absolute for ``diff_*_ms`` and ``flush_lag_s``,
            per replica for the rest.  Always concrete after construction.
        target: Per-replica load to size for when scaling (per-replica thresholds only).
            Defaults to ``scale_up_above``; a lower value leaves headroom after a scale-up.  Must
            lie in ``(scale_down_below, scale_up_above]`` so a freshly sized service sits inside
            the band.  ``None`` for absolute thresholds.
    """

    signal: str
    scale_up_above: float
    scale_down_below: float
    unit: ThresholdUnit | None = None
    target: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.signal, str):
            raise PresenceTypeError(f"signal must be a str, not {type_name(self.signal)}")
        if self.signal not in LOAD_SIGNALS:
            raise PresenceValueError(
                f"unknown signal {self.signal!r}; a threshold must name one of {LOAD_SIGNALS}"
            )
        up = check_finite(self.scale_up_above, f"{self.signal}: scale_up_above")
        down = check_finite(self.scale_down_below, f"{self.signal}: scale_down_below")
        if down < 0:
            raise PresenceValueError(f"{self.signal}: scale_down_below must be >= 0, got {down!r}")
        if not up > down:
            raise PresenceValueError(
                f"{self.signal}: scale_up_above ({up!r}) must be greater than scale_down_below "
                f"({down!r}); the gap between them is the hysteresis band"
            )
        unit = self.unit if self.unit is not None else _DEFAULT_UNITS[self.signal]
        if unit not in ("per_replica", "absolute"):
            raise PresenceValueError(
                f"{self.signal}: unit must be 'per_replica', 'absolute' or None, got {unit!r}"
            )
        target = self.target
        if unit == "absolute":
            if target is not None:
                raise PresenceValueError(
                    f"{self.signal}: target only applies to per_replica thresholds; an absolute "
                    f"threshold moves one replica at a time"
                )
        else:
            target = up if target is None else check_finite(target, f"{self.signal}: target")
            if not down < target <= up:
                raise PresenceValueError(
                    f"{self.signal}: target ({target!r}) must be in (scale_down_below, "
                    f"scale_up_above] = ({down!r}, {up!r}]"
                )
        object.__setattr__(self, "scale_up_above", up)
        object.__setattr__(self, "scale_down_below", down)
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "target", target)


class _Rule(NamedTuple):
    # Threshold with the optional fields resolved, so the per-sample loop needs no None checks.
    signal: str
    up: float
    down: float
    target: float  # 0.0 for absolute rules, never read for them
    per_replica: bool


class LoadCalendar:
    """Expected load multipliers by month (1-12) x weekday (0 = Monday .. 6) x hour (0-23).

    Built from a compact spec: each of ``months``, ``weekdays`` and ``hours`` maps some of its
    values to a multiplier, every unlisted value counts as 1.0, and the multiplier of an hour is
    the product of the three.  For example ``LoadCalendar(months={6: 1.8}, hours={18: 2.2})``
    expects 3.96 x baseline on June evenings at 18:00.

    ``lead`` is how far ahead the calendar looks: `peak` returns the largest multiplier between a
    time and ``lead`` after it, which is what lets a scaler add capacity before a peak starts
    (replicas take time to start and warm up).

    ``tz``: the calendar reads the month, weekday and hour of the datetime it is given.  With
    ``tz`` set, an aware datetime is first converted to that zone, so peaks written in local time
    hold whatever zone the host's clock is in; a naive datetime is taken as already local.  The
    look-ahead steps over wall-clock hours, so across a DST change it may look one hour more or
    less ahead than ``lead``; multipliers are hourly, which makes that harmless.
    """

    __slots__ = ("_hours", "_lead", "_months", "_table", "_tz", "_weekdays")

    def __init__(
        self,
        months: Mapping[int, float] | None = None,
        weekdays: Mapping[int, float] | None = None,
        hours: Mapping[int, float] | None = None,
        *,
        lead: timedelta | float = timedelta(0),
        tz: tzinfo | None = None,
    ) -> None:
        self._months = self._check_axis("months", months, 1, 12)
        self._weekdays = self._check_axis("weekdays", weekdays, 0, 6)
        self._hours = self._check_axis("hours", hours, 0, 23)
        self._lead = _check_lead(lead)
        if tz is not None and not isinstance(tz, tzinfo):
            raise PresenceTypeError(f"tz must be a datetime.tzinfo or None, not {type_name(tz)}")
        self._tz = tz
        # 12 x 7 x 24 = 2,016 precomputed cells: a lookup is one index computation, and the
        # look-ahead can afford to visit every hour up to a week out.
        table: list[float] = []
        for month in range(1, 13):
            for weekday in range(7):
                for hour in range(24):
                    cell = (
                        self._months.get(month, 1.0)
                        * self._weekdays.get(weekday, 1.0)
                        * self._hours.get(hour, 1.0)
                    )
                    # Each factor is positive and finite, but their product may not be: an
                    # infinite multiplier would make every load infinite, and a zero one would
                    # leave the relative mode dividing by zero.
                    if not 0.0 < cell <= _FLOAT_MAX:
                        raise PresenceValueError(
                            f"months[{month}] x weekdays[{weekday}] x hours[{hour}] = {cell!r}: "
                            f"every hour's multiplier must be positive and within float range"
                        )
                    table.append(cell)
        self._table = tuple(table)

    @staticmethod
    def _check_axis(
        name: str, spec: Mapping[int, float] | None, low: int, high: int
    ) -> dict[int, float]:
        if spec is None:
            return {}
        if not isinstance(spec, Mapping):
            raise PresenceTypeError(
                f"{name} must be a mapping of int to multiplier, not {type_name(spec)}"
            )
        checked: dict[int, float] = {}
        for key, value in spec.items():
            if not is_int(key) or not low <= key <= high:
                raise PresenceValueError(f"{name}: keys must be ints in {low}..{high}, got {key!r}")
            factor = check_finite(value, f"{name}[{key}]")
            if factor <= 0:
                raise PresenceValueError(
                    f"{name}[{key}]: a multiplier must be positive, got {value!r}"
                )
            checked[key] = factor
        return checked

    @classmethod
    def wedding_season(
        cls, *, lead: timedelta | float = timedelta(hours=1), tz: tzinfo | None = None
    ) -> LoadCalendar:
        """The load pattern of wedding coordination, our first users: an example calendar.

        Weddings cluster in May, June, September and October, and the day's coordination peaks
        from 17:00 to 20:00, tailing off in the hour after.  Fridays and Saturdays are busier.
        The numbers are illustrative; measure your own service and write its calendar the same
        way.  The default ``lead`` of one hour adds capacity an hour before the evening peak.
        """
        return cls(
            months={5: 1.5, 6: 1.8, 9: 1.5, 10: 1.6},
            weekdays={4: 1.2, 5: 1.4},
            hours={17: 2.0, 18: 2.2, 19: 2.2, 20: 1.5},
            lead=lead,
            tz=tz,
        )

    @property
    def lead(self) -> timedelta:
        """How far ahead `peak` looks."""
        return self._lead

    @property
    def tz(self) -> tzinfo | None:
        """The zone the calendar's hours are written in, or None to read datetimes as given."""
        return self._tz

    def _local(self, dt: datetime) -> datetime:
        if not isinstance(dt, datetime):
            raise PresenceTypeError(f"expected a datetime, not {type_name(dt)}")
        if self._tz is not None and dt.tzinfo is not None:
            try:
                return dt.astimezone(self._tz)
            except OverflowError:
                # Within hours of datetime.min / max the converted time does not exist; read
                # the hour as given rather than fail (years 1 and 9999 have no seasons to miss).
                return dt
        return dt

    def _cell(self, dt: datetime) -> float:
        return self._table[(dt.month - 1) * 168 + dt.weekday() * 24 + dt.hour]

    def multiplier(self, dt: datetime) -> float:
        """The expected load multiplier of the hour that contains ``dt``."""
        return self._cell(self._local(dt))

    def peak(self, dt: datetime, lead: timedelta | None = None) -> float:
        """The largest multiplier over ``[dt, dt + lead]`` (``lead`` defaults to the calendar's).

        Multipliers change only on the hour, so this visits ``dt`` and each hour boundary up to
        ``dt + lead``.
        """
        span = self._lead if lead is None else _check_lead(lead)
        start = self._local(dt)
        best = self._cell(start)
        boundary = start.replace(minute=0, second=0, microsecond=0)
        # Stepping past datetime.max ends the look-ahead: there are no later hours to read.
        for _ in range(_hours_ahead(start, span)):
            try:
                boundary += _HOUR
            except OverflowError:
                break
            best = max(best, self._cell(boundary))
        return best

    def __repr__(self) -> str:
        return (
            f"LoadCalendar(months={self._months!r}, weekdays={self._weekdays!r}, "
            f"hours={self._hours!r}, lead={self._lead!r}, tz={self._tz!r})"
        )


def _check_lead(lead: object) -> timedelta:
    """``lead`` (a timedelta or seconds) as a timedelta in ``[0, _MAX_LEAD]``."""
    if isinstance(lead, timedelta):
        span = lead
    elif is_number(lead):
        seconds = check_finite(lead, "lead")
        # Range first: timedelta(seconds=1e300) overflows.
        if not 0.0 <= seconds <= _MAX_LEAD.total_seconds():
            raise PresenceValueError(f"lead must be between 0 and {_MAX_LEAD}, got {lead!r} s")
        span = timedelta(seconds=seconds)
    else:
        raise PresenceTypeError(
            f"lead must be a timedelta or a number of seconds, not {type_name(lead)}"
        )
    if not timedelta(0) <= span <= _MAX_LEAD:
        raise PresenceValueError(f"lead must be between 0 and {_MAX_LEAD}, got {span}")
    return span


def _hours_ahead(start: datetime, span: timedelta) -> int:
    """How many hour boundaries lie in ``(start, start + span]``."""
    into_hour = timedelta(
        minutes=start.minute, seconds=start.second, microseconds=start.microsecond
    )
    return (into_hour + span) // _HOUR


class ThresholdScaler:
    """Thresholds with hysteresis and cooldowns, and an optional calendar; a `Scaler`.

    Args:
        thresholds: One `Threshold` per signal (at least one; no signal twice).
        max_replicas: Never ask for more.  Required: an unbounded policy is a cost incident.
            At most `REPLICA_LIMIT`, like every replica count the scaler is given.
        min_replicas: Never ask for fewer (>= 1).
        current: The replica count running now; defaults to ``min_replicas``.  Afterwards only
            `set_current` changes it (see the module docstring for why).
        up_cooldown_s: After a scaling decision, no scale-up for this many seconds of
            ``sample.at``: new replicas need time to start and take load before the signals mean
            anything again.
        down_cooldown_s: After a scaling decision, no scale-down for this long.  Usually longer
            than ``up_cooldown_s``: removing capacity too early costs more than keeping it.
        up_stable_samples: Consecutive samples with a breach before scaling up (1 = at once).
        down_stable_samples: Consecutive samples with every signal below its lower bound before
            scaling down.
        max_step: Most replicas added or removed by one decision; ``None`` for no limit.
        calendar: Expected load multipliers, applied to per-replica signals; ``None`` for none.
        calendar_mode: ``"relative"`` (default) multiplies by ``peak within lead / multiplier
            now``, for pre-scaling without counting the current season twice; ``"absolute"``
            multiplies by the peak multiplier itself.
        sample_scope: ``"replica"`` (default) if a sample describes one replica of an evenly
            balanced service, the usual case when each process samples itself: the service total
            is then the value times the replica count.  ``"service"`` if the host sums the load
            of all replicas into each sample.

    Each decision's ``signals`` holds ``replicas`` (the count it judged against),
    ``calendar_factor`` (1.0 without a calendar) and, per threshold, the value compared with the
    bounds: per replica and calendar-adjusted for per-replica thresholds, as sampled otherwise.

    Not thread-safe: call it from one thread with samples in time order, as the Tracker does.
    """

    __slots__ = (
        "_calendar",
        "_calendar_mode",
        "_current",
        "_down_cooldown_s",
        "_down_stable_samples",
        "_down_streak",
        "_last_scale_at",
        "_max_replicas",
        "_max_step",
        "_min_replicas",
        "_rules",
        "_sample_scope",
        "_up_cooldown_s",
        "_up_stable_samples",
        "_up_streak",
    )

    def __init__(
        self,
        thresholds: Iterable[Threshold],
        *,
        max_replicas: int,
        min_replicas: int = 1,
        current: int | None = None,
        up_cooldown_s: float = 60.0,
        down_cooldown_s: float = 300.0,
        up_stable_samples: int = 1,
        down_stable_samples: int = 3,
        max_step: int | None = None,
        calendar: LoadCalendar | None = None,
        calendar_mode: CalendarMode = "relative",
        sample_scope: SampleScope = "replica",
    ) -> None:
        rules: list[_Rule] = []
        seen: set[str] = set()
        if not isinstance(thresholds, Iterable):
            raise PresenceTypeError(
                f"thresholds must be an iterable of Threshold, not {type_name(thresholds)}"
            )
        for threshold in thresholds:
            if not isinstance(threshold, Threshold):
                raise PresenceTypeError(f"thresholds must be Threshold objects, got {threshold!r}")
            if threshold.signal in seen:
                raise PresenceValueError(
                    f"two thresholds for signal {threshold.signal!r}; give one each"
                )
            seen.add(threshold.signal)
            rules.append(
                _Rule(
                    threshold.signal,
                    threshold.scale_up_above,
                    threshold.scale_down_below,
                    threshold.target if threshold.target is not None else 0.0,
                    threshold.unit == "per_replica",
                )
            )
        if not rules:
            raise PresenceValueError("a ThresholdScaler needs at least one Threshold")
        self._rules = tuple(rules)
        self._min_replicas = _check_count(min_replicas, "min_replicas")
        self._max_replicas = _check_count(max_replicas, "max_replicas")
        if self._max_replicas < self._min_replicas:
            raise PresenceValueError(
                f"max_replicas ({max_replicas}) must be >= min_replicas ({min_replicas})"
            )
        self._current = _check_count(min_replicas if current is None else current, "current")
        self._up_cooldown_s = check_finite(up_cooldown_s, "up_cooldown_s")
        self._down_cooldown_s = check_finite(down_cooldown_s, "down_cooldown_s")
        if self._up_cooldown_s < 0 or self._down_cooldown_s < 0:
            raise PresenceValueError(
                f"cooldowns must be >= 0 seconds, got up_cooldown_s={up_cooldown_s!r} "
                f"down_cooldown_s={down_cooldown_s!r}"
            )
        self._up_stable_samples = check_int(up_stable_samples, "up_stable_samples", low=1)
        self._down_stable_samples = check_int(down_stable_samples, "down_stable_samples", low=1)
        self._max_step = None if max_step is None else _check_count(max_step, "max_step")
        if calendar is not None and not isinstance(calendar, LoadCalendar):
            raise PresenceTypeError(
                f"calendar must be a LoadCalendar or None, not {type_name(calendar)}"
            )
        self._calendar = calendar
        if calendar_mode not in ("relative", "absolute"):
            raise PresenceValueError(
                f"calendar_mode must be 'relative' or 'absolute', got {calendar_mode!r}"
            )
        self._calendar_mode: CalendarMode = calendar_mode
        if sample_scope not in ("replica", "service"):
            raise PresenceValueError(
                f"sample_scope must be 'replica' or 'service', got {sample_scope!r}"
            )
        self._sample_scope: SampleScope = sample_scope
        self._last_scale_at: float | None = None
        self._up_streak = 0
        self._down_streak = 0

    @property
    def current(self) -> int:
        """The replica count the scaler believes is running."""
        return self._current

    @property
    def min_replicas(self) -> int:
        """The floor of every decision."""
        return self._min_replicas

    @property
    def max_replicas(self) -> int:
        """The ceiling of every decision."""
        return self._max_replicas

    def set_current(self, replicas: int) -> None:
        """Tell the scaler how many replicas are running now.

        Call it whenever the actuator reports a new count: after applying a decision, or after a
        change the scaler did not ask for.  A change restarts the hysteresis counts, because
        samples taken at the old count say little about per-replica load at the new one.
        Cooldowns are not touched: they run from the decision, not from its application.
        """
        replicas = _check_count(replicas, "replicas")
        if replicas != self._current:
            self._current = replicas
            self._up_streak = 0
            self._down_streak = 0

    def _calendar_factor(self, sample: LoadSample) -> tuple[float, str | None]:
        calendar = self._calendar
        if calendar is None:
            return 1.0, None
        if sample.wall_time is None:
            return 1.0, "calendar skipped: sample has no wall_time"
        now = calendar.multiplier(sample.wall_time)
        peak = calendar.peak(sample.wall_time)
        if self._calendar_mode == "relative":
            # Both are positive and finite (the calendar checks its cells), but a tiny hour
            # next to a huge one can still overflow the ratio.
            factor = min(peak / now, _FLOAT_MAX)
            how = f"peak {_fmt(peak)} within lead {calendar.lead} / now {_fmt(now)}"
        else:
            factor = peak
            how = f"peak multiplier within lead {calendar.lead}"
        return factor, f"calendar x{_fmt(factor)} ({how})"

    def __call__(self, sample: LoadSample) -> ScaleDecision:
        """Judge one sample; always returns a decision, holds included, with its reason."""
        if not isinstance(sample, LoadSample):
            raise PresenceTypeError(f"expected a LoadSample, not {type_name(sample)}")
        # LoadSample checked its fields: every value below is finite and >= 0, and the
        # arithmetic saturates (see "Extreme numbers" in the module docstring).
        at = sample.at
        current = self._current
        factor, calendar_note = self._calendar_factor(sample)
        notes: list[str] = [] if calendar_note is None else [calendar_note]
        signals: dict[str, float] = {"replicas": float(current), "calendar_factor": factor}

        # Classify every signal against its band and work out what it would size the service
        # to.
        above: list[tuple[str, int]] = []  # (clause, replicas this signal asks for)
        below: list[tuple[str, int]] = []
        within: list[str] = []
        for rule in self._rules:
            raw = sample.signal(rule.signal)
            total = raw
            if rule.per_replica:
                if self._sample_scope == "replica":
                    per_replica = _times(raw, factor)
                    total = _times(per_replica, current)
                else:
                    total = _times(raw, factor)
                    per_replica = total / current
                sized = _size(total, rule.target)
                shown = f"{rule.signal} {_fmt(per_replica)}/replica"
                if factor != 1.0:
                    base = raw if self._sample_scope == "replica" else raw / current
                    shown += f" ({_fmt(base)} x calendar {_fmt(factor)})"
                value = per_replica
            else:
                sized = 0
                shown = f"{rule.signal} {_fmt(raw)}"
                value = raw
            signals[rule.signal] = value
            if value > rule.up:
                if rule.per_replica:
                    need = f"needs ceil({_fmt(total)} / {_fmt(rule.target)}) = {sized}"
                    if sized == REPLICA_LIMIT:
                        need += " (saturated at REPLICA_LIMIT)"
                else:
                    sized = current + 1
                    need = "one step up"
                above.append((f"{shown} > scale_up_above {_fmt(rule.up)}, {need}", sized))
            elif value < rule.down:
                if rule.per_replica:
                    need = f"sized {sized} at target {_fmt(rule.target)}"
                else:
                    sized = current - 1
                    need = "allows one step down"
                below.append((f"{shown} < scale_down_below {_fmt(rule.down)}, {need}", sized))
            else:
                within.append(f"{shown} within [{_fmt(rule.down)}, {_fmt(rule.up)}]")

        # Replica bounds come from configuration, not from load: a count outside them (replicas
        # crashed, someone scaled by hand) is corrected at once, whatever the cooldowns and
        # streaks say.  Coming up from below, a breach may ask for more than the floor.
        if current < self._min_replicas:
            desired = max([self._min_replicas, *(sized for _, sized in above)])
            desired = min(desired, self._max_replicas)
            why = "; ".join([f"below min_replicas {self._min_replicas}", *(c for c, _ in above)])
            return self._scale(at, "scale_up", desired, why, notes, signals)
        if current > self._max_replicas:
            why = f"above max_replicas {self._max_replicas}"
            return self._scale(at, "scale_down", self._max_replicas, why, notes, signals)

        all_below = len(below) == len(self._rules)
        self._up_streak = self._up_streak + 1 if above else 0
        self._down_streak = self._down_streak + 1 if all_below else 0

        if above:
            return self._consider_up(at, above, notes, signals)
        if all_below:
            return self._consider_down(at, below, notes, signals)
        clauses = [clause for clause, _ in below] + within
        return self._hold("signals within bands: " + "; ".join(clauses), notes, signals)

    def _consider_up(
        self,
        at: float,
        above: list[tuple[str, int]],
        notes: list[str],
        signals: dict[str, float],
    ) -> ScaleDecision:
        current = self._current
        why = "; ".join(clause for clause, _ in above)
        if self._up_streak < self._up_stable_samples:
            return self._hold(
                f"{why}; breach seen {self._up_streak}/{self._up_stable_samples} samples",
                notes,
                signals,
            )
        if current >= self._max_replicas:
            return self._hold(
                f"{why}; already at max_replicas {self._max_replicas}", notes, signals
            )
        wait = self._cooldown_left(at, self._up_cooldown_s)
        if wait > 0:
            return self._hold(f"{why}; scale_up cooling down, {_fmt(wait)} s left", notes, signals)
        desired = max(current + 1, max(sized for _, sized in above))
        limits: list[str] = []
        if self._max_step is not None and desired > current + self._max_step:
            desired = current + self._max_step
            limits.append(f"limited by max_step {self._max_step}")
        if desired > self._max_replicas:
            desired = self._max_replicas
            limits.append(f"capped at max_replicas {self._max_replicas}")
        return self._scale(at, "scale_up", desired, "; ".join([why, *limits]), notes, signals)

    def _consider_down(
        self,
        at: float,
        below: list[tuple[str, int]],
        notes: list[str],
        signals: dict[str, float],
    ) -> ScaleDecision:
        current = self._current
        why = "all signals below their lower bounds: " + "; ".join(clause for clause, _ in below)
        if self._down_streak < self._down_stable_samples:
            return self._hold(
                f"{why}; stable {self._down_streak}/{self._down_stable_samples} samples",
                notes,
                signals,
            )
        if current <= self._min_replicas:
            return self._hold(
                f"{why}; already at min_replicas {self._min_replicas}", notes, signals
            )
        # The most demanding signal decides: never shrink below what any signal still needs at
        # its target, or the next sample would breach the upper bound and undo this decision.
        desired = max(sized for _, sized in below)
        if desired >= current:
            return self._hold(
                f"{why}; but sized at target the load still needs {desired} replicas",
                notes,
                signals,
            )
        wait = self._cooldown_left(at, self._down_cooldown_s)
        if wait > 0:
            return self._hold(
                f"{why}; scale_down cooling down, {_fmt(wait)} s left", notes, signals
            )
        limits: list[str] = []
        if self._max_step is not None and desired < current - self._max_step:
            desired = current - self._max_step
            limits.append(f"limited by max_step {self._max_step}")
        if desired < self._min_replicas:
            desired = self._min_replicas
            limits.append(f"floored at min_replicas {self._min_replicas}")
        return self._scale(at, "scale_down", desired, "; ".join([why, *limits]), notes, signals)

    def _cooldown_left(self, at: float, cooldown_s: float) -> float:
        if self._last_scale_at is None:
            return 0.0
        # A sample older than the last decision (a clock that went backwards) counts as
        # inside the cooldown rather than as a licence to scale again.
        return max(0.0, self._last_scale_at + cooldown_s - at)

    def _scale(
        self,
        at: float,
        action: ScaleAction,
        desired: int,
        why: str,
        notes: list[str],
        signals: dict[str, float],
    ) -> ScaleDecision:
        self._last_scale_at = at
        self._up_streak = 0
        self._down_streak = 0
        current = self._current
        reason = "; ".join([f"{action} {current} -> {desired}: {why}", *notes])
        return ScaleDecision(action, desired, current, reason, signals)

    def _hold(self, why: str, notes: list[str], signals: dict[str, float]) -> ScaleDecision:
        current = self._current
        reason = "; ".join([f"hold at {current}: {why}", *notes])
        return ScaleDecision("hold", current, current, reason, signals)

    def __repr__(self) -> str:
        return (
            f"ThresholdScaler(current={self._current}, min_replicas={self._min_replicas}, "
            f"max_replicas={self._max_replicas}, signals={[r.signal for r in self._rules]})"
        )
