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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

__all__ = [
    "LOAD_SIGNALS",
    "CalendarMode",
    "LoadSample",
    "ScaleAction",
    "ScaleDecision",
    "LoadCalendar",
    "SampleScope",
    "ThresholdScaler",
    "Threshold",
    "ThresholdUnit",
]

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


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSample:
    """What one process looked like at one sampling instant; the input of a `Scaler`.

    Fields are keyword-only: with nine numbers of similar magnitude, a positional mix-up would be
    silent.  Load fields default to zero so a host that does not measure something (say, memory)
    can leave it out, and a zero never triggers a scale-up.

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

    def signal(self, name: str) -> float:
        """The value of the numeric field ``name`` (one of `LOAD_SIGNALS`) as a float."""
        if name not in LOAD_SIGNALS:
            raise ValueError(f"unknown load signal {name!r}; expected one of {LOAD_SIGNALS}")
        return float(getattr(self, name))


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
            raise ValueError(f"action must be one of {_ACTIONS}, got {self.action!r}")
        if self.desired < 0 or self.current < 0:
            raise ValueError(
                f"replica counts must be >= 0, got desired={self.desired} current={self.current}"
            )
        if self.action == "scale_up":
            consistent = self.desired > self.current
        elif self.action == "scale_down":
            consistent = self.desired < self.current
        else:
            consistent = self.desired == self.current
        if not consistent:
            raise ValueError(
                f"{self.action} is inconsistent with desired={self.desired} current={self.current}"
            )
        for name, value in self.signals.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"signal {name!r} must be a number, got {type(value).__name__}")
            if math.isinf(value):
                raise ValueError(f"signal {name!r} must not be infinite")
        # A read-only view over a private copy: whoever receives the decision cannot change what
        # the scaler recorded, and the caller's dict can be reused.
        object.__setattr__(self, "signals", MappingProxyType(dict(self.signals)))


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


def _is_real(value: object) -> bool:
    # bool is an int, but True is a bug in the caller's configuration, not a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite(what: str, value: object) -> float:
    if not _is_real(value):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def _check_int(what: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _fmt(value: float) -> str:
    """A number as a person reads it in a log line: 1,250 or 0.0123 or 12.5."""
    if math.isnan(value):
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


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
        if self.signal not in LOAD_SIGNALS:
            raise ValueError(
                f"unknown signal {self.signal!r}; a threshold must name one of {LOAD_SIGNALS}"
            )
        up = _check_finite(f"{self.signal}: scale_up_above", self.scale_up_above)
        down = _check_finite(f"{self.signal}: scale_down_below", self.scale_down_below)
        if down < 0:
            raise ValueError(f"{self.signal}: scale_down_below must be >= 0, got {down!r}")
        if not up > down:
            raise ValueError(
                f"{self.signal}: scale_up_above ({up!r}) must be greater than scale_down_below "
                f"({down!r}); the gap between them is the hysteresis band"
            )
        unit = self.unit if self.unit is not None else _DEFAULT_UNITS[self.signal]
        if unit not in ("per_replica", "absolute"):
            raise ValueError(
                f"{self.signal}: unit must be 'per_replica', 'absolute' or None, got {unit!r}"
            )
        target = self.target
        if unit == "absolute":
            if target is not None:
                raise ValueError(
                    f"{self.signal}: target only applies to per_replica thresholds; an absolute "
                    f"threshold moves one replica at a time"
                )
        else:
            target = up if target is None else _check_finite(f"{self.signal}: target", target)
            if not down < target <= up:
                raise ValueError(
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
        if isinstance(lead, timedelta):
            lead_td = lead
        elif _is_real(lead) and math.isfinite(lead):
            lead_td = timedelta(seconds=float(lead))
        else:
            raise TypeError(f"lead must be a timedelta or a finite number of seconds, got {lead!r}")
        if not timedelta(0) <= lead_td <= _MAX_LEAD:
            raise ValueError(f"lead must be between 0 and {_MAX_LEAD}, got {lead_td}")
        if tz is not None and not isinstance(tz, tzinfo):
            raise TypeError(f"tz must be a datetime.tzinfo or None, not {type(tz).__name__}")
        self._lead = lead_td
        self._tz = tz
        # 12 x 7 x 24 = 2,016 precomputed cells: a lookup is one index computation, and the
        # look-ahead can afford to visit every hour up to a week out.
        self._table = tuple(
            self._months.get(month, 1.0)
            * self._weekdays.get(weekday, 1.0)
            * self._hours.get(hour, 1.0)
            for month in range(1, 13)
            for weekday in range(7)
            for hour in range(24)
        )

    @staticmethod
    def _check_axis(
        name: str, spec: Mapping[int, float] | None, low: int, high: int
    ) -> dict[int, float]:
        if spec is None:
            return {}
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"{name} must be a mapping of int to multiplier, not {type(spec).__name__}"
            )
        checked: dict[int, float] = {}
        for key, value in spec.items():
            if not isinstance(key, int) or isinstance(key, bool) or not low <= key <= high:
                raise ValueError(f"{name}: keys must be ints in {low}..{high}, got {key!r}")
            factor = _check_finite(f"{name}[{key}]", value)
            if factor <= 0:
                raise ValueError(f"{name}[{key}]: a multiplier must be positive, got {value!r}")
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
            raise TypeError(f"expected a datetime, not {type(dt).__name__}")
        if self._tz is not None and dt.tzinfo is not None:
            return dt.astimezone(self._tz)
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
        span = self._lead if lead is None else lead
        if not timedelta(0) <= span <= _MAX_LEAD:
            raise ValueError(f"lead must be between 0 and {_MAX_LEAD}, got {span}")
        start = self._local(dt)
        end = start + span
        best = self._cell(start)
        boundary = start.replace(minute=0, second=0, microsecond=0) + _HOUR
        while boundary <= end:
            best = max(best, self._cell(boundary))
            boundary += _HOUR
        return best

    def __repr__(self) -> str:
        return (
            f"LoadCalendar(months={self._months!r}, weekdays={self._weekdays!r}, "
            f"hours={self._hours!r}, lead={self._lead!r}, tz={self._tz!r})"
        )


class ThresholdScaler:
    """Thresholds with hysteresis and cooldowns, and an optional calendar; a `Scaler`.

    Args:
        thresholds: One `Threshold` per signal (at least one; no signal twice).
        max_replicas: Never ask for more.  Required: an unbounded policy is a cost incident.
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
        for threshold in thresholds:
            if not isinstance(threshold, Threshold):
                raise TypeError(f"thresholds must be Threshold objects, got {threshold!r}")
            if threshold.signal in seen:
                raise ValueError(f"two thresholds for signal {threshold.signal!r}; give one each")
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
            raise ValueError("a ThresholdScaler needs at least one Threshold")
        self._rules = tuple(rules)
        self._min_replicas = _check_int("min_replicas", min_replicas, 1)
        self._max_replicas = _check_int("max_replicas", max_replicas, 1)
        if self._max_replicas < self._min_replicas:
            raise ValueError(
                f"max_replicas ({max_replicas}) must be >= min_replicas ({min_replicas})"
            )
        self._current = _check_int("current", min_replicas if current is None else current, 1)
        self._up_cooldown_s = _check_finite("up_cooldown_s", up_cooldown_s)
        self._down_cooldown_s = _check_finite("down_cooldown_s", down_cooldown_s)
        if self._up_cooldown_s < 0 or self._down_cooldown_s < 0:
            raise ValueError(
                f"cooldowns must be >= 0 seconds, got up_cooldown_s={up_cooldown_s!r} "
                f"down_cooldown_s={down_cooldown_s!r}"
            )
        self._up_stable_samples = _check_int("up_stable_samples", up_stable_samples, 1)
        self._down_stable_samples = _check_int("down_stable_samples", down_stable_samples, 1)
        self._max_step = None if max_step is None else _check_int("max_step", max_step, 1)
        if calendar is not None and not isinstance(calendar, LoadCalendar):
            raise TypeError(
                f"calendar must be a LoadCalendar or None, not {type(calendar).__name__}"
            )
        self._calendar = calendar
        if calendar_mode not in ("relative", "absolute"):
            raise ValueError(
                f"calendar_mode must be 'relative' or 'absolute', got {calendar_mode!r}"
            )
        self._calendar_mode: CalendarMode = calendar_mode
        if sample_scope not in ("replica", "service"):
            raise ValueError(f"sample_scope must be 'replica' or 'service', got {sample_scope!r}")
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
        replicas = _check_int("replicas", replicas, 1)
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
            factor = peak / now
            how = f"peak {_fmt(peak)} within lead {calendar.lead} / now {_fmt(now)}"
        else:
            factor = peak
            how = f"peak multiplier within lead {calendar.lead}"
        return factor, f"calendar x{_fmt(factor)} ({how})"

    def __call__(self, sample: LoadSample) -> ScaleDecision:
        """Judge one sample; always returns a decision, holds included, with its reason."""
        if not isinstance(sample, LoadSample):
            raise TypeError(f"expected a LoadSample, not {type(sample).__name__}")
        at = _check_finite("sample.at", sample.at)
        current = self._current
        factor, calendar_note = self._calendar_factor(sample)
        notes: list[str] = [] if calendar_note is None else [calendar_note]
        signals: dict[str, float] = {"replicas": float(current), "calendar_factor": factor}

        # Classify every signal against its band and work out what it would size the service
        # to.  Non-finite values (no measurement yet) do not vote either way.
        above: list[tuple[str, int]] = []  # (clause, replicas this signal asks for)
        below: list[tuple[str, int]] = []
        within: list[str] = []
        missing: list[str] = []
        for rule in self._rules:
            raw = sample.signal(rule.signal)
            if not math.isfinite(raw):
                missing.append(rule.signal)
                continue
            total = raw
            if rule.per_replica:
                if self._sample_scope == "replica":
                    per_replica = raw * factor
                    total = per_replica * current
                else:
                    total = raw * factor
                    per_replica = total / current
                sized = max(0, math.ceil(total / rule.target - _EPSILON))
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
        if missing:
            notes.append(f"no data for {', '.join(missing)}")

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

        voting = len(above) + len(below) + len(within)
        self._up_streak = self._up_streak + 1 if above else 0
        self._down_streak = self._down_streak + 1 if voting and len(below) == voting else 0

        if above:
            return self._consider_up(at, above, notes, signals)
        if voting and len(below) == voting:
            return self._consider_down(at, below, notes, signals)
        if not voting:
            return self._hold("no signal has data", notes, signals)
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
