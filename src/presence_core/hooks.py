"""The protocols through which the Tracker talks to the outside world, and the records they pass.

The Tracker never imports a transport, an autoscaler or a metrics backend.  It calls objects that
satisfy the protocols below, handed to it as keyword arguments or registered later:

- a `Transport` receives every ``presence_state`` and ``presence_diff`` the Tracker emits;
- a `Scaler` receives a `LoadSample` at every sampling interval and may answer with a
  `ScaleDecision`, which the Tracker passes on to the host (the host owns the actuator);
- a `MetricsSink` receives counters, gauges and latency observations (`presence_core.metrics.
  Metrics` is the built-in one).

The two protocols that consist of ``__call__`` alone are satisfied by plain functions as well as by
objects.  They are ``runtime_checkable`` so the Tracker can reject a non-callable with a clear
message, but note that such an ``isinstance`` check only proves the object is callable: Python
cannot check the signature at run time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, runtime_checkable

__all__ = [
    "LOAD_SIGNALS",
    "PRESENCE_DIFF",
    "PRESENCE_STATE",
    "LoadSample",
    "MetricsSink",
    "ScaleAction",
    "ScaleDecision",
    "Scaler",
    "Transport",
]

PRESENCE_STATE: Final = "presence_state"
"""Event name of a full snapshot of a topic: ``{key: {"metas": [...]}}``."""

PRESENCE_DIFF: Final = "presence_diff"
"""Event name of an incremental change: ``{"joins": {...}, "leaves": {...}}``."""


@runtime_checkable
class Transport(Protocol):
    """Receives the presence events of every topic and delivers them to clients.

    Called as ``transport(topic, event, payload)`` where ``event`` is `PRESENCE_STATE` or
    `PRESENCE_DIFF` and ``payload`` is in the Phoenix Presence shape.

    Ownership: the payload handed to a transport is the transport's to keep.  The Tracker gives
    each hook its own copy, so a transport (or a client library underneath it) may mutate, store
    or forward the dict without corrupting the Tracker's state or what other hooks receive.
    Supabase's Python client, for one, renames ``phx_ref`` inside the dicts it is given.

    A transport runs on the Tracker's thread, inside the flush of a tick: it should hand the
    payload off (enqueue, write to a buffer) rather than block.
    """

    def __call__(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        """Deliver one presence event for ``topic``."""
        ...


# Every numeric field of LoadSample, in declaration order.  A scaling threshold names one of
# these; keeping the list next to the dataclass means a new field cannot be forgotten by the
# validator in `presence_core.scaling`.
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


@runtime_checkable
class Scaler(Protocol):
    """A scaling policy: reads one `LoadSample` per interval, may return a `ScaleDecision`.

    Returning ``None`` means the policy has nothing to say (for example a policy that only speaks
    when it changes its mind).  The built-in `presence_core.scaling.ThresholdScaler` always
    returns a decision, holds included, each with its reason.

    The Tracker calls its scaler from one thread, with samples in time order.
    """

    def __call__(self, sample: LoadSample) -> ScaleDecision | None:
        """Judge one sample."""
        ...


@runtime_checkable
class MetricsSink(Protocol):
    """Where the Tracker reports what it does.

    `presence_core.metrics.Metrics` implements it; a host may pass an adapter to its own backend
    (statsd, OpenTelemetry) instead.  These calls sit on hot paths, so implementations should be
    cheap and must not block.  Metric names are the constants in `presence_core.metrics`.
    """

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``."""
        ...

    def set(self, name: str, value: float) -> None:
        """Set the gauge ``name`` to ``value``."""
        ...

    def observe(self, name: str, seconds: float) -> None:
        """Record one latency of ``seconds`` in the histogram ``name``."""
        ...
