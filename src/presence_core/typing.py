"""The protocols through which presence_core talks to the outside world.

The Tracker never imports a transport, an autoscaler or a metrics backend.  It calls objects that
satisfy the protocols below, handed to it as keyword arguments or registered later:

- a `Transport` receives every ``presence_state`` and ``presence_diff`` the Tracker emits as a
  dict of its own; a `RawTransport` receives the same payload as JSON bytes; an
  `AsyncTransport` and an `AsyncRawTransport` are their ``async def`` forms, which the Tracker
  awaits for the host, one delivery at a time per hook;
- a `Scaler` receives a `presence_core.scaling.LoadSample` at every sampling interval and may
  answer with a `presence_core.scaling.ScaleDecision`, which the host applies;
- a `MetricsSink` receives counters, gauges and latency observations, each naming one of the
  metrics declared in `presence_core.metrics` (`presence_core.metrics.Metrics` is the built-in
  sink);
- a `Policy` decides what a connection may do on a private channel, from its verified claims.

The protocols that consist of ``__call__`` alone are satisfied by plain functions as well as by
objects.  They are ``runtime_checkable``, but such an ``isinstance`` check only proves that the
object is callable: Python cannot check the signature at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from .auth import Access
    from .metrics import MetricDef
    from .scaling import LoadSample, ScaleDecision

__all__ = [
    "AsyncRawTransport",
    "AsyncTransport",
    "ConnId",
    "MetricsSink",
    "Policy",
    "RawTransport",
    "Scaler",
    "Transport",
]

ConnId: TypeAlias = str | int
"""A connection id: the host's own str (socket id, UUID) or int (64-bit)."""


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


@runtime_checkable
class RawTransport(Protocol):
    """A transport that takes each payload as JSON bytes: ``hook(topic, event, payload_json)``.

    The bytes are immutable, so every raw hook shares one object and a fan-out to thousands of
    sockets costs one call each and no copy.  Register one with ``raw=True``.
    """

    def __call__(self, topic: str, event: str, payload: bytes) -> object:
        """Deliver one presence event for ``topic`` as JSON bytes."""
        ...


@runtime_checkable
class AsyncTransport(Protocol):
    """A transport whose sends are awaited: ``await transport(topic, event, payload)``.

    An ``async def`` function, method or ``__call__`` (an ASGI WebSocket's
    ``await websocket.send_text(...)`` behind it).  `Tracker.subscribe` and
    `Tracker.add_transport` recognise one (`inspect.iscoroutinefunction`) and await its
    deliveries on the event loop that was running when it was registered: per hook one at a
    time, in order (``presence_state`` first, then the diffs in flush order), without delaying
    the flush or any other hook.  At most ``max_pending`` deliveries wait per hook: one more
    ends the hook (``on_overflow``).  The payload is the hook's own dict, as for `Transport`.

    A plain function that returns an awaitable is not recognised: wrap it in an ``async def``.
    """

    async def __call__(self, topic: str, event: str, payload: dict[str, Any]) -> object:
        """Deliver one presence event for ``topic``."""
        ...


@runtime_checkable
class AsyncRawTransport(Protocol):
    """An `AsyncTransport` that takes each payload as JSON bytes (register with ``raw=True``)."""

    async def __call__(self, topic: str, event: str, payload: bytes) -> object:
        """Deliver one presence event for ``topic`` as JSON bytes."""
        ...


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
    """Where the Tracker (and the store) report what they do.

    `presence_core.metrics.Metrics` implements it; a host may pass an adapter to its own backend
    (statsd, OpenTelemetry) instead.  Every call names a metric declared in
    `presence_core.metrics` (a `presence_core.metrics.MetricDef`: name, kind, help, label
    names) and gives the label values in the declared order.  The Tracker batches its counts
    and publishes them once per flush, but implementations should still be cheap and must not
    block.  A sink that raises is logged and counted (``hook_errors``); what it did not take
    is published at the next flush.
    """

    def inc(self, metric: MetricDef, n: int = 1, labels: tuple[str, ...] = ()) -> None:
        """Add ``n`` to the counter ``metric`` (the series with these label values)."""
        ...

    def set(self, metric: MetricDef, value: float, labels: tuple[str, ...] = ()) -> None:
        """Set the gauge ``metric`` to ``value``."""
        ...

    def observe(self, metric: MetricDef, seconds: float, labels: tuple[str, ...] = ()) -> None:
        """Record one duration of ``seconds`` in the histogram ``metric``."""
        ...


@runtime_checkable
class Policy(Protocol):
    """Decides what a connection may do on a *private* channel: ``policy(claims, topic)``.

    ``claims`` are the connection's verified JWT claims (`presence_core.auth.Verified.claims`,
    read-only), or an empty mapping for an anonymous connection; ``topic`` is the channel's
    topic.  Public channels never reach a policy.

    It returns a `presence_core.auth.Access` (``Access.ALL``, ``Access.NONE``, or any mix of
    the four rights), or an awaitable of one, so that a policy may ask a database.  Raising
    refuses the join.

    The server calls it once per (connection, topic, token) and caches the answer until the
    connection's token changes (a refresh by ``access_token``): a policy may be slow, and a
    right it revokes takes effect at the connection's next token.  A synchronous policy should
    not block (it is called from the server's event loop); one that must, can return an
    awaitable instead (``asyncio.to_thread``).
    """

    def __call__(self, claims: Mapping[str, Any], topic: str) -> Access | Awaitable[Access]:
        """What the holder of ``claims`` may do on ``topic``."""
        ...
