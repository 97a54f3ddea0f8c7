"""The Tracker: who is present in which topic, in the Phoenix Presence model.

A *presence* is (topic, key, ref) with a meta: a connection says "I am `key` in `topic`, with
this meta", and gets back a ref that names this one presence.  A key may be present several times
in a topic (one per connection or device); clients see every meta under the key.  This is what
Phoenix Presence does and what Supabase Realtime and its clients speak, so the payloads here can
go to those clients unchanged.

The data path, one module each:

* this module checks every call and decides what changes (the hot paths are written out here, so
  a valid call costs few function calls);
* `presence_core.tracker.state` holds topics, presences and the users index, and records every
  change in `presence_core.tracker.feed`;
* connections live in the native `presence_core.table.PresenceTable`: a heartbeat is one table
  touch, and a silent connection expires through the table's timing wheel;
* `presence_core.tracker.delivery` hands each flush's batch of changes to the feed readers (the
  Redis store) and the hooks (subscribers and transports);
* `presence_core.tracker.users` derives a user's status from the user's presences.

Time: every time-driven call takes ``now=`` (seconds on the Tracker's clock, default
`time.monotonic`).  Latency measurements use `time.perf_counter`, which is real time whatever the
injected clock does.
"""

from __future__ import annotations

import builtins
import inspect
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from itertools import count, islice
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn, cast

import orjson

from .._validate import (
    MAX_CONNECTION_ID_LENGTH,
    check_callable,
    check_conn_id,
    check_int,
    check_node,
    check_seconds,
    check_text,
    check_time,
    is_conn_id,
    type_name,
)
from ..errors import (
    KeyMismatch,
    MetaTooLarge,
    NotTracked,
    PresenceTypeError,
    PresenceValueError,
    QuotaExceeded,
    RateLimited,
    UnknownPlan,
)
from ..limits import DEFAULT_PLAN, Limits, admit, spent
from ..metrics import (
    CONNECTION_EXPIRIES,
    CONNECTIONS,
    DIFF_PROPAGATION_SECONDS,
    DISCONNECTS,
    EVICTIONS,
    EXPIRIES,
    HOOK_ERRORS,
    LAST_SEEN_EVICTIONS,
    LIMIT_HITS,
    OPS,
    PENDING_CHANGES,
    PRESENCES,
    SCALER_DECISIONS,
    SCALER_DESIRED_REPLICAS,
    STATUS_READ_HITS,
    STATUS_READS,
    TOPICS,
    MetricDef,
    Metrics,
)
from ..phoenix import EVENT_PRESENCE_STATE
from ..scaling import LoadSample, ScaleDecision
from ..table import PresenceTable
from ..table._common import MAX_CAPACITY
from ..typing import (
    AsyncRawTransport,
    AsyncTransport,
    ConnId,
    MetricsSink,
    RawTransport,
    Scaler,
    Transport,
)
from .delivery import Delivery, Hook, disable_hook, is_async_callable, new_hook
from .encoding import (
    CONN,
    DATA,
    KEY,
    TOPIC,
    Presence,
    encode_meta,
    ref_of,
    same_meta,
    state_json,
    stored,
)
from .feed import TopicChanges
from .state import (
    C_PLAN,
    C_PRESENCES,
    C_TAT,
    C_TTL,
    INDEX_THRESHOLD,
    ConnRecord,
    PresenceState,
    Topic,
    datas_of,
)
from .users import OFFLINE, UserStatus, derive_status

if TYPE_CHECKING:
    from .async_hooks import AsyncHook

__all__ = ["FeedReader", "Totals", "Tracker"]

logger = logging.getLogger("presence_core.tracker")

FeedReader = Callable[[Sequence[TopicChanges]], object]
"""Reads every batch of the change feed: ``reader(batch)``; see `Tracker.add_feed_reader`."""

_NEG_INF: Final = -math.inf

# realtime-js collects presence state in a plain JS object, where this key is the prototype
# slot: a presence under it silently disappears from every Supabase JavaScript client.
_FORBIDDEN_KEY: Final = "__proto__"

# users() answers this many keys at most per call: a team view is 10-500.
_MAX_BULK_KEYS: Final = 10_000
_DECISIONS_KEPT: Final = 50  # scaler decisions remembered for `Tracker.decisions`

_loads = orjson.loads

# Counters the hot paths bump as plain ints in a list, published to the metrics sink by
# `Tracker.sync_metrics`: an item increment costs a fraction of a method call.
_COUNTERS: Final[tuple[tuple[MetricDef, tuple[str, ...]], ...]] = (
    (OPS, ("track",)),
    (OPS, ("update",)),
    (OPS, ("untrack",)),
    (OPS, ("disconnect",)),
    (OPS, ("heartbeat",)),
    (EXPIRIES, ()),
    (CONNECTION_EXPIRIES, ()),
    (EVICTIONS, ()),
    (LAST_SEEN_EVICTIONS, ()),
    (STATUS_READS, ()),
    (STATUS_READ_HITS, ()),
    (HOOK_ERRORS, ()),
)
_TRACK, _UPDATE, _UNTRACK, _DISCONNECT, _HEARTBEAT = 0, 1, 2, 3, 4
_EXPIRIES, _CONN_EXPIRIES, _EVICTIONS, _SEEN_EVICTIONS = 5, 6, 7, 8
_STATUS_READS, _STATUS_HITS, _HOOK_ERRORS = 9, 10, 11


class Totals(NamedTuple):
    """Process-wide counts, each kept up to date on every change (O(1) to read).

    Attributes:
        presences: Every presence, remote ones (held by other processes) included.
        connections: This process's live connections.
        topics: Topics with at least one presence, local or remote.
        keys: Distinct keys held by this process's connections (remote ones are not
            counted: their users are another process's to count).
    """

    presences: int
    connections: int
    topics: int
    keys: int


# -- argument checks -------------------------------------------------------------------------
# The common case (an exact str, a float) is tested inline by the callers; these raise the
# precise error or accept what the inline test could not (non-ASCII text, int ids).


def _check_now(now: object) -> float:
    if type(now) is float and now - now == 0.0:  # the common case; false for inf and nan
        return now
    return check_time(now, "now")


def _checked_clock(clock: Callable[[], float]) -> Callable[[], float]:
    """``clock`` with its readings checked, so a bad one is refused before anything changes."""

    def read() -> float:
        value = clock()
        if type(value) is float and value - value == 0.0:
            return value
        try:
            return check_time(value)
        except PresenceTypeError:
            raise PresenceTypeError(
                f"clock() must return seconds as a number, not {type_name(value)}"
            ) from None
        except PresenceValueError:
            raise PresenceValueError(f"clock() must return a finite time, got {value!r}") from None

    return read


def _check_key(key: object, limit: int) -> str:
    check_text(key, "key", limit)
    if key == _FORBIDDEN_KEY:
        raise PresenceValueError(
            "key '__proto__' cannot be used: Supabase's JavaScript client silently drops it"
        )
    return key  # type: ignore[return-value]


_ID_TYPES: Final = frozenset((str, int))


def _ref_origin() -> int:
    """Where a Tracker's ref counter starts: at random, so a process restarted under the same
    node name never makes a ref its earlier incarnation made (peers and Redis may still hold
    those).  62 bits keep every ref within the 16 hex digits refs are checked for."""
    return 1 + secrets.randbits(62)


_REF_RE: Final = re.compile(rb"[A-Za-z0-9_-]{1,32}\.[0-9a-f]{1,16}")
_REF_HEAD: Final = b'{"phx_ref":"'


def _check_ref(ref: object) -> bytes:
    """A ref made by some Tracker (``<node>.<hex>``, bytes), or raise."""
    if type(ref) is not bytes:
        raise PresenceTypeError(f"a ref must be bytes, not {type_name(ref)}")
    if _REF_RE.fullmatch(ref) is None:
        raise PresenceValueError(f"not a ref made by a Tracker: {ref[:80]!r}")
    return ref


def _remote_ref(data: object, what: str) -> bytes:
    """The ref of stored meta ``data`` from another Tracker, or raise."""
    if type(data) is not bytes:
        raise PresenceTypeError(f"remote {what} must be bytes, not {type_name(data)}")
    if not data.startswith(_REF_HEAD) or data.find(b'"', len(_REF_HEAD)) < 0:
        raise PresenceValueError(f"remote {what} does not start with its phx_ref: {data[:80]!r}")
    return _check_ref(ref_of(data))


def _owner(ref: bytes) -> bytes:
    return ref[: ref.rindex(b".")]


def _conn_ids_only(conns: Iterable[ConnId]) -> Sequence[ConnId]:
    """``conns`` without the items no connection can have as its id (bools, floats...).

    Those would find an int id they compare equal to.  Every item is still hashed, so an
    unhashable one raises TypeError as the table would.
    """
    ids = conns if type(conns) is list or type(conns) is tuple else builtins.list(conns)
    if set(map(type, ids)) <= _ID_TYPES:
        return ids
    kept = []
    for conn in ids:
        if is_conn_id(conn):
            kept.append(conn)
        else:
            hash(conn)
    return kept


def _sync_options_refused(callback: object) -> NoReturn:
    raise PresenceTypeError(
        f"max_pending and on_overflow apply to async callbacks only; {callback!r} is not an "
        "async def function, method or __call__ (a sync hook is called within the flush)"
    )


def _awaitable_refused(callback: object, result: object) -> NoReturn:
    if inspect.iscoroutine(result):
        result.close()  # never awaited, and no warning saying so
    raise PresenceTypeError(
        f"{callback!r} returned an awaitable, which a sync call cannot await: make it an async "
        "def (async callbacks are awaited for you), or wrap it in one"
    )


class Tracker:
    """Presence for one process: track, list, diff, expire, and per-user status.

    Args:
        connection_ttl: Seconds a connection stays alive without a heartbeat (default 60; a
            Phoenix or Supabase client heartbeats every 25-30 s).
        max_connections: Capacity of the connection table.  A new connection beyond it evicts
            the least recently active one, with leaves for its presences (counted in
            ``evictions`` and reported to ``on_evict``).
        plans: Limits by plan name.  Default: one plan, ``"default"``, with `Limits()`.
        default_plan: The plan of connections registered without one.
        clock: Seconds, used whenever a call's ``now`` is omitted (default `time.monotonic`;
            use `time.time` when last-seen times must mean something to other processes).
        metrics: Where counters, gauges and latencies go (default: a new `Metrics`).
        transports: Hooks that receive every topic's events (see `add_transport`).  An async
            one needs a running event loop, as in `add_transport`.
        scalers: Policies consulted by `run_scalers`.
        last_seen_capacity: Users whose last-seen time is remembered after they leave (LRU).
        last_seen_ttl: Seconds a last-seen time is remembered (default 30 days).
        record_last_seen_changes: Keep the last-seen table's change list for a store to drain
            with `drain_last_seen`; off by default, because undrained changes accumulate.
        node: The prefix of every ref this Tracker makes ([A-Za-z0-9_-], up to 32 characters).
            Default: 8 random characters, so refs are unique across processes.
        on_evict: Called with the id of each connection evicted for capacity, so the host can
            close it; called once the call that evicted it has finished, so it may call back
            into the Tracker.
    """

    __slots__ = (
        "_bindings",
        "_clock",
        "_conns",
        "_counts",
        "_decisions",
        "_default_limits",
        "_default_plan",
        "_delivery",
        "_int_ids",
        "_limit_hits",
        "_disconnects",
        "_metrics",
        "_n_heartbeat",
        "_node",
        "_on_evict",
        "_plans",
        "_read_key_limit",
        "_read_topic_limit",
        "_remote_meta_limit",
        "_refs",
        "_scalers",
        "_seen",
        "_seen_ttl",
        "_state",
        "_synced",
        "_touch",
        "_touch_many",
        "_ttl",
        "_upsert",
    )

    def __init__(
        self,
        *,
        connection_ttl: float = 60.0,
        max_connections: int = 1_000_000,
        plans: Mapping[str, Limits] | None = None,
        default_plan: str = DEFAULT_PLAN,
        clock: Callable[[], float] | None = None,
        metrics: MetricsSink | None = None,
        transports: Iterable[Transport | AsyncTransport] = (),
        scalers: Iterable[Scaler] = (),
        last_seen_capacity: int = 100_000,
        last_seen_ttl: float = 30 * 86400.0,
        record_last_seen_changes: bool = False,
        node: str | None = None,
        on_evict: Callable[[ConnId], object] | None = None,
    ) -> None:
        self._ttl = check_seconds(connection_ttl, "connection_ttl")
        check_int(max_connections, "max_connections", low=1, high=MAX_CAPACITY)
        check_int(last_seen_capacity, "last_seen_capacity", low=1, high=MAX_CAPACITY)
        if not isinstance(default_plan, str):
            raise PresenceTypeError(f"default_plan must be a str, not {type_name(default_plan)}")
        if plans is None:
            plans = {default_plan: Limits()}
        if not isinstance(plans, Mapping):
            raise PresenceTypeError(f"plans must be a mapping, not {type_name(plans)}")
        for name, limits in plans.items():
            if not isinstance(name, str) or not isinstance(limits, Limits):
                raise PresenceTypeError(
                    f"plans must map str names to Limits, got {name!r}: {type_name(limits)}"
                )
        if default_plan not in plans:
            raise UnknownPlan(f"default_plan {default_plan!r} is not one of {sorted(plans)}")
        self._plans: Mapping[str, Limits] = MappingProxyType(dict(plans))
        self._default_plan = default_plan
        self._default_limits = self._plans[default_plan]
        # Reads and leaves are not tied to a plan: accept anything some plan allows.
        self._read_key_limit = max(limits.max_key_length for limits in self._plans.values())
        self._read_topic_limit = max(limits.max_topic_length for limits in self._plans.values())
        # A peer's metas obey the limit its own Tracker enforced: the largest of any plan.
        self._remote_meta_limit = max(limits.max_meta_bytes for limits in self._plans.values())
        if clock is not None:
            check_callable(clock, "clock")
        # time.monotonic needs no checking; any other clock's readings are checked.
        self._clock: Callable[[], float] = (
            time.monotonic if clock is None else _checked_clock(clock)
        )
        self._seen_ttl = check_seconds(last_seen_ttl, "last_seen_ttl")
        if node is None:
            node = secrets.token_urlsafe(6)
        else:
            check_node(node)
        self._node = node.encode("ascii") + b"."
        # Refs count up from a random start, so a process restarted under the same node name
        # never makes a ref its earlier incarnation made (peers and Redis may still hold
        # those).  62 bits keep every ref within the 16 hex digits refs are checked for.
        self._refs = count(_ref_origin())
        if on_evict is not None:
            check_callable(on_evict, "on_evict")
        self._on_evict = on_evict
        self._state = PresenceState()
        self._delivery = Delivery(self._state)
        for transport in transports:
            check_callable(transport, "a transport")
            if is_async_callable(transport):
                self._add_async_transport(transport, False, None, None)
            else:
                self._delivery.transports += (new_hook(transport, False),)
        self._scalers: tuple[Scaler, ...] = ()
        self._decisions: deque[tuple[datetime, ScaleDecision]] = deque(maxlen=_DECISIONS_KEPT)
        for scaler in scalers:
            check_callable(scaler, "a scaler")
            self._scalers += (scaler,)
        if metrics is None:
            metrics = Metrics(clock=self._clock)
        for method in ("inc", "set", "observe"):
            if not callable(getattr(metrics, method, None)):
                raise PresenceTypeError(f"metrics must have an {method}() method (MetricsSink)")
        self._metrics = metrics
        # With the default clock the tables read CLOCK_MONOTONIC natively (same as
        # time.monotonic), which spares a Python call on every heartbeat without `now`.
        table_clock = clock
        self._conns: PresenceTable[ConnId, ConnRecord] = PresenceTable(
            max_connections, clock=table_clock, track_dirty=False
        )
        # Bound once: a heartbeat is then one attribute read and one native call.
        self._touch = self._conns.touch
        self._touch_many = self._conns.touch_many
        self._upsert = self._conns.upsert
        # Last-seen times change rarely and live long, so a one-second tick keeps the wheel idle.
        self._seen: PresenceTable[str, float] = PresenceTable(
            last_seen_capacity, tick=1.0, clock=table_clock, track_dirty=record_last_seen_changes
        )
        self._counts = [0] * len(_COUNTERS)
        self._synced = [0] * len(_COUNTERS)
        self._limit_hits: dict[str, list[int]] = {}  # limit -> [count, synced]
        self._disconnects: dict[str, list[int]] = {}  # reason -> [count, synced]
        self._n_heartbeat = 0  # separate from _counts: the heartbeat path is the hottest
        # Whether any connection id is an int: only then can a bool or float (True == 1,
        # 1.0 == 1) passed to heartbeat_many find a connection it does not name.
        self._int_ids = False
        # conn -> {topic (None: every topic): the only key it may track as}; see `bind_key`.
        self._bindings: dict[ConnId, dict[str | None, str]] = {}

    # -- configuration -----------------------------------------------------------------------

    @property
    def plans(self) -> Mapping[str, Limits]:
        """The configured plans (read-only)."""
        return self._plans

    @property
    def metrics(self) -> MetricsSink:
        """The metrics sink this Tracker reports to."""
        return self._metrics

    @property
    def node(self) -> str:
        """The prefix of this Tracker's refs."""
        return self._node[:-1].decode("ascii")

    @property
    def connection_ttl(self) -> float:
        """Seconds a connection registered without its own TTL lives without a heartbeat."""
        return self._ttl

    def _now(self, now: object) -> float:
        return self._clock() if now is None else _check_now(now)

    def _new_ref(self) -> bytes:
        return self._node + b"%x" % next(self._refs)

    # -- connections -------------------------------------------------------------------------

    def connect(
        self,
        conn: ConnId,
        *,
        plan: str | None = None,
        ttl: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Register ``conn`` (or change its plan or TTL); returns True if it was new.

        Registering is optional: `track` registers an unknown connection with the default plan
        and TTL.  Call `connect` first to give a connection another plan.  Changing the plan of
        a live connection applies to its later calls; presences it already holds stay.
        """
        now_s = self._now(now)
        check_conn_id(conn)
        if plan is not None and not isinstance(plan, str):
            raise PresenceTypeError(f"plan must be a str, not {type_name(plan)}")
        if plan is not None and plan not in self._plans:
            raise UnknownPlan(f"unknown plan {plan!r}; configured plans: {sorted(self._plans)}")
        ttl_s = None if ttl is None else check_seconds(ttl, "ttl")
        rec = self._conns.get(conn)
        if rec is not None:
            new_plan = rec[C_PLAN] if plan is None else plan
            new_ttl = rec[C_TTL] if ttl_s is None else ttl_s
            # A smaller plan keeps the debt its bucket can hold, no more: the bucket counts as
            # fully spent, so the change is neither a loophole nor taken for a clock step.
            tat = min(rec[C_TAT], spent(self._plans[new_plan], now_s))
            self._upsert(conn, (conn, new_plan, new_ttl, rec[C_PRESENCES], tat), new_ttl, now_s)
            return False
        record = (
            conn,
            self._default_plan if plan is None else plan,
            self._ttl if ttl_s is None else ttl_s,
            (),
            _NEG_INF,
        )
        evicted = self._insert_conn(record, now_s)
        if evicted:
            self._notify_evicted(evicted)
        return True

    def _insert_conn(self, rec: ConnRecord, now: float) -> builtins.list[ConnId] | None:
        """Add a new connection; returns the ids evicted to make room, for `_notify_evicted`.

        The caller finishes its own change before it calls ``on_evict``, which may call back
        into the Tracker.
        """
        conns = self._conns
        full = len(conns) >= conns.capacity
        conn = rec[0]
        self._upsert(conn, rec, rec[C_TTL], now)
        if type(conn) is not str:
            self._int_ids = True
        if not full:
            return None
        ids: builtins.list[ConnId] = []
        for conn_id, evicted in conns.drain_evicted():
            self._drop_conn(evicted, now, now)
            self._counts[_EVICTIONS] += 1
            ids.append(conn_id)
        return ids

    def _notify_evicted(self, ids: builtins.list[ConnId]) -> None:
        on_evict = self._on_evict
        if on_evict is None:
            return
        for conn_id in ids:
            try:
                on_evict(conn_id)
            except Exception:
                self._counts[_HOOK_ERRORS] += 1
                logger.exception("on_evict callback failed for %r", conn_id)

    def bind_key(
        self, conn: ConnId, key: str, *, topic: str | None = None, now: float | None = None
    ) -> None:
        """Bind ``conn`` to the presence key ``key``: in ``topic`` only, or (``topic=None``) in
        every topic without a binding of its own.

        This is how a host makes identity the server's choice rather than the client's, as
        Phoenix's ``Presence.track(socket.assigns.user_id, ...)`` does: bind the key to the
        verified user (a JWT's ``sub``) once, and a later `track` or `update` under any other
        key raises `KeyMismatch` and changes nothing.  Binding again replaces the key for
        later calls (presences already held stay).  The binding ends when the connection does
        (`disconnect`, expiry, eviction).  An unknown connection is registered first, with
        the default plan, so that its binding ends with it.

        Raises:
            PresenceTypeError, PresenceValueError: a bad connection id, key or topic.
        """
        now_s = self._now(now)
        check_conn_id(conn)
        _check_key(key, self._read_key_limit)
        if topic is not None:
            check_text(topic, "topic", self._read_topic_limit)
        if conn not in self._conns:
            self.connect(conn, now=now_s)
        self._bindings.setdefault(conn, {})[topic] = key

    def unbind_key(self, conn: ConnId, *, topic: str | None = None) -> None:
        """Remove ``conn``'s binding in ``topic`` (None: its every-topic binding), if any."""
        bound = self._bindings.get(conn)
        if bound is not None:
            bound.pop(topic, None)
            if not bound:
                del self._bindings[conn]

    def bound_key(self, conn: ConnId, topic: str) -> str | None:
        """The key ``conn`` is bound to in ``topic`` (see `bind_key`), or None if it is free."""
        bound = self._bindings.get(conn)
        if bound is None:
            return None
        key = bound.get(topic)
        return bound.get(None) if key is None else key

    def heartbeat(self, conn: ConnId, *, now: float | None = None) -> bool:
        """Keep ``conn`` and all its presences alive for another TTL; False if it is unknown.

        One native table touch: no per-presence work, however many topics the connection is in.
        An id of the wrong type is simply unknown (no connection can have it), even one that
        compares equal to a connection's int id (``True``, ``1.0``).
        """
        if type(conn) is str or type(conn) is int or is_conn_id(conn):
            live = self._touch(conn, None, now)
        else:
            try:
                hash(conn)
            except TypeError:  # a caller's bug, not an unknown connection
                raise PresenceTypeError(
                    f"connection id must be a str or an int, not {type_name(conn)}"
                ) from None
            if now is not None:
                _check_now(now)
            return False
        if live:
            self._n_heartbeat += 1
        return live

    def heartbeat_many(self, conns: Iterable[ConnId], *, now: float | None = None) -> int:
        """`heartbeat` every connection in ``conns`` in one native call; returns how many live."""
        if isinstance(conns, (str, bytes, bytearray)):
            raise PresenceTypeError(
                f"conns must be an iterable of connection ids, not a single {type_name(conns)}"
            )
        try:
            if self._int_ids:
                conns = _conn_ids_only(conns)
            touched = self._touch_many(conns, None, now)
        except PresenceTypeError:
            raise
        except TypeError:  # an unhashable item, or not an iterable at all
            raise PresenceTypeError(
                "conns must be an iterable of connection ids (str or int)"
            ) from None
        self._n_heartbeat += touched
        return touched

    def disconnect(self, conn: ConnId, *, now: float | None = None) -> int:
        """Forget ``conn``: every presence it holds leaves.  Returns how many presences left."""
        now_s = self._now(now)
        check_conn_id(conn)
        rec = self._conns.pop(conn)
        if rec is None:
            return 0
        self._counts[_DISCONNECT] += 1
        return self._drop_conn(rec, now_s, now_s)

    def expire(self, *, now: float | None = None) -> builtins.list[ConnId]:
        """Drop every connection whose TTL ran out; returns their ids.

        Their presences leave (delivered at the next `flush`).  The last-seen time of a user who
        goes offline this way is the connection's deadline minus its TTL, i.e. its last sign
        of life, to the resolution of the calls to `expire`.
        """
        now_s = self._now(now)
        expired = self._conns.expire(now_s)
        ids: builtins.list[ConnId] = []
        removed = 0
        for conn_id, rec in expired:
            removed += self._drop_conn(rec, now_s - rec[C_TTL], now_s)
            ids.append(conn_id)
        self._counts[_EXPIRIES] += removed
        self._counts[_CONN_EXPIRIES] += len(ids)
        self._seen.expire(now_s)
        return ids

    def tick(self, *, now: float | None = None) -> builtins.list[ConnId]:
        """`expire` then `flush`: what a host calls every 10-100 ms.  Returns expired ids.

        The ids are the host's to close sockets with, so nothing after the expiry may lose
        them: a hook or metrics sink that fails in the flush is logged and counted.  Only a
        `BaseException` that is not an `Exception` propagates, and the deliveries it
        interrupted are finished by the next flush.
        """
        expired = self.expire(now=now)
        self.flush()
        return expired

    def _drop_conn(self, rec: ConnRecord, seen_at: float, now: float) -> int:
        presences = rec[C_PRESENCES]
        remove = self._state.remove
        for p in presences:
            remove(p)
        conn = rec[0]
        if self._bindings:
            self._bindings.pop(conn, None)
        for key in {p[KEY] for p in presences}:
            self._release(key, conn, seen_at, now)
        return len(presences)

    def _release(self, key: str, conn: ConnId, seen_at: float, now: float) -> None:
        """``conn`` holds no presence as ``key`` any more: remember when the user was seen."""
        if self._state.release(key, conn):
            seen = self._seen
            full = len(seen) >= seen.capacity
            seen.upsert(key, seen_at, self._seen_ttl, now)
            if full:
                self._counts[_SEEN_EVICTIONS] += len(seen.drain_evicted())

    # -- writes ------------------------------------------------------------------------------

    def track(
        self, conn: ConnId, topic: str, key: str, meta: dict[str, Any], *, now: float | None = None
    ) -> str:
        """Make ``conn`` present as ``key`` in ``topic`` with ``meta``; returns the ref.

        Tracking the same (conn, topic, key) again with an equal meta changes nothing and
        returns the existing ref; with a different meta it is an `update`.  An unknown
        connection is registered with the default plan.  The meta is stored as JSON (orjson),
        so what `list` returns is its JSON round trip: tuples come back as lists, datetimes as
        strings.

        Raises:
            PresenceTypeError, PresenceValueError: bad argument types or values.
            InvalidMeta, MetaTooLarge: the meta cannot be stored.
            QuotaExceeded, RateLimited: the connection's plan refuses the call.
        """
        now_s, rec, limits, blob = self._write_args(conn, topic, key, meta, now)
        old = None
        shares_key = False  # whether this connection already holds `key` in another topic
        if rec is None:
            tat = admit(limits, _NEG_INF, now_s, conn)
        else:
            for p in rec[C_PRESENCES]:
                if p[KEY] == key:
                    if p[TOPIC] == topic:
                        old = p
                        break
                    shares_key = True
            try:
                tat = admit(limits, rec[C_TAT], now_s, conn)
            except RateLimited:
                self._limit_hit("rate_per_second")
                raise
            if old is not None:
                self._counts[_TRACK] += 1
                return self._rewrite(rec, old, blob, tat, now_s)
            self._check_connection_quotas(rec, topic, limits)
        state = self._state
        t = state.topics.get(topic)
        held = None if t is None else t.keys.get(key)
        if (
            held is not None
            and (1 if type(held) is tuple else len(held)) >= limits.max_metas_per_key
        ):
            self._refuse(conn, "max_metas_per_key", limits.max_metas_per_key)
        # Every check passed: from here on the call changes state and cannot fail.
        evicted = None
        if rec is None:
            rec = (conn, self._default_plan, self._ttl, (), tat)
            conns = self._conns
            if len(conns) >= conns.capacity:
                # Room is made first, so the new presence cannot be among those evicted.
                evicted = self._insert_conn(rec, now_s)
                if evicted and t is not None:
                    held = t.keys.get(key)  # a connection evicted for room may have held it
            elif type(conn) is not str:
                self._int_ids = True
        if t is None:
            t = state.topics[topic] = Topic(topic)
        self._counts[_TRACK] += 1
        ref = self._node + b"%x" % next(self._refs)
        p = state.add(t, key, held, stored(ref, blob), conn, not shares_key)
        ttl = rec[C_TTL]
        self._upsert(conn, (conn, rec[C_PLAN], ttl, (*rec[C_PRESENCES], p), tat), ttl, now_s)
        if evicted:
            self._notify_evicted(evicted)  # last: on_evict may call back into the Tracker
        return ref.decode()

    def _write_args(
        self, conn: object, topic: object, key: object, meta: object, now: object
    ) -> tuple[float, ConnRecord | None, Limits, bytes]:
        """Check the arguments of `track` and `update`; returns the time, the connection's
        record (None if new), its limits and the meta's JSON.

        The checks are written out for the common case (plain ASCII str within limits), so a
        valid call costs no further calls; anything else goes to the checker, which raises with
        the precise message or accepts (non-ASCII text, int connection ids).  One place for
        both calls: a fast path that skipped a check once let in ids nothing could remove.
        """
        now_s = self._clock() if now is None else _check_now(now)
        if (
            type(conn) is not str
            or not 0 < len(conn) <= MAX_CONNECTION_ID_LENGTH
            or not conn.isascii()
        ):
            check_conn_id(conn)
        rec: ConnRecord | None = self._conns.get(conn)  # type: ignore[call-overload]
        limits = self._default_limits if rec is None else self._plans[rec[C_PLAN]]
        if (
            type(topic) is not str
            or not 0 < len(topic) <= limits.max_topic_length
            or not topic.isascii()
        ):
            check_text(topic, "topic", limits.max_topic_length)
        if (
            type(key) is not str
            or not 0 < len(key) <= limits.max_key_length
            or not key.isascii()
            or key == _FORBIDDEN_KEY
        ):
            _check_key(key, limits.max_key_length)
        if self._bindings:
            bound = self.bound_key(conn, topic)  # type: ignore[arg-type]
            if bound is not None and key != bound:
                raise KeyMismatch(
                    f"connection {conn!r} may track only as its bound key {bound!r} in "
                    f"{topic!r}, not as {key!r}"
                )
        try:
            return now_s, rec, limits, encode_meta(meta, limits)
        except MetaTooLarge:
            self._limit_hit("max_meta_bytes")
            raise

    def update(
        self, conn: ConnId, topic: str, key: str, meta: dict[str, Any], *, now: float | None = None
    ) -> str:
        """Replace the meta of ``conn``'s presence as ``key`` in ``topic``; returns the new ref.

        Subscribers get one diff: the new meta in joins (with ``phx_ref_prev`` naming the old
        ref) and the old meta in leaves.  An equal meta changes nothing and returns the current
        ref.

        Raises:
            NotTracked: there is no such presence.
            and the errors of `track`.
        """
        now_s, rec, limits, blob = self._write_args(conn, topic, key, meta, now)
        old = None
        if rec is not None:
            for p in rec[C_PRESENCES]:
                if p[KEY] == key and p[TOPIC] == topic:
                    old = p
                    break
        if rec is None or old is None:
            raise NotTracked(f"connection {conn!r} has no presence as {key!r} in {topic!r}")
        try:
            tat = admit(limits, rec[C_TAT], now_s, conn)
        except RateLimited:
            self._limit_hit("rate_per_second")
            raise
        self._counts[_UPDATE] += 1
        return self._rewrite(rec, old, blob, tat, now_s)

    def _rewrite(self, rec: ConnRecord, old: Presence, blob: bytes, tat: float, now: float) -> str:
        """Give ``old`` the meta encoded as ``blob`` (a new ref, unless it is the same meta)."""
        conn, plan, ttl, presences, _ = rec
        ref = ref_of(old[DATA])
        if not same_meta(old[DATA], ref, blob):
            ref = self._new_ref()
            new = self._state.replace(old, stored(ref, blob))
            changed = list(presences)  # the cheapest way to replace one item of a tuple
            changed[changed.index(old)] = new
            presences = tuple(changed)
        self._upsert(conn, (conn, plan, ttl, presences, tat), ttl, now)
        return ref.decode()

    def untrack(
        self, conn: ConnId, topic: str, key: str | None = None, *, now: float | None = None
    ) -> int:
        """Remove ``conn``'s presence(s) in ``topic`` (only as ``key`` if given).

        Returns how many presences left; 0 for an unknown connection or topic.  Never rate
        limited: leaving must always be possible, so topic and key are checked against the most
        permissive plan, not the connection's own (which may have shrunk since it tracked).
        """
        now_s = self._now(now)
        check_conn_id(conn)
        check_text(topic, "topic", self._read_topic_limit)
        if key is not None:
            check_text(key, "key", self._read_key_limit)
        rec: ConnRecord | None = self._conns.get(conn)
        if rec is None:
            return 0
        self._counts[_UNTRACK] += 1
        presences = rec[C_PRESENCES]
        gone = [p for p in presences if p[TOPIC] == topic and (key is None or p[KEY] == key)]
        if not gone:
            self._touch(conn, None, now_s)
            return 0
        kept = tuple(p for p in presences if not (p[TOPIC] == topic and p in gone))
        ttl = rec[C_TTL]
        self._upsert(conn, (conn, rec[C_PLAN], ttl, kept, rec[C_TAT]), ttl, now_s)
        for p in gone:
            self._state.remove(p)
        for left_key in {p[KEY] for p in gone}:
            if not any(p[KEY] == left_key for p in kept):
                self._release(left_key, conn, now_s, now_s)
        return len(gone)

    def _check_connection_quotas(self, rec: ConnRecord, topic: str, limits: Limits) -> None:
        presences = rec[C_PRESENCES]
        if len(presences) >= limits.max_presences_per_connection:
            self._refuse(
                rec[0], "max_presences_per_connection", limits.max_presences_per_connection
            )
        # Counting distinct topics costs a set, so only when the count could reach the quota.
        if len(presences) >= limits.max_topics_per_connection:
            topics = {p[TOPIC] for p in presences}
            if topic not in topics and len(topics) >= limits.max_topics_per_connection:
                self._refuse(rec[0], "max_topics_per_connection", limits.max_topics_per_connection)

    def _refuse(self, conn: ConnId, limit: str, value: int) -> NoReturn:
        self._limit_hit(limit)
        raise QuotaExceeded(conn, limit, value)

    def record_limit_hit(self, limit: str) -> None:
        """Count a refusal the host made by a limit of its own (a server's connection or join
        quota) in ``limit_hits``, beside the Tracker's own, published with the next flush."""
        self._limit_hit(check_text(limit, "limit", 256))

    def _limit_hit(self, limit: str) -> None:
        hits = self._limit_hits.get(limit)
        if hits is None:
            hits = self._limit_hits[limit] = [0, 0]
        hits[0] += 1

    def record_disconnect(self, reason: str) -> None:
        """Count a connection the host closed itself (``slow_reader``, ``ttl``, ``limit``,
        ``refused_handshake``, ``protocol_error``...) in ``disconnects``, published with the
        next flush.  See `presence_core.metrics.DISCONNECT_REASONS`."""
        counts = self._disconnects.get(reason)
        if counts is None:
            counts = self._disconnects[check_text(reason, "reason", 64)] = [0, 0]
        counts[0] += 1

    def check_topic(self, topic: object) -> str:
        """``topic`` if this Tracker can hold it (a non-empty str within the length limit),
        else raise `PresenceTypeError` / `PresenceValueError` saying why: what a server asks
        before it makes anything for a join."""
        return check_text(topic, "topic", self._read_topic_limit)

    def check_key(self, key: object) -> str:
        """``key`` if this Tracker can hold it as a presence key, else raise as `check_topic`."""
        return _check_key(key, self._read_key_limit)

    # -- reads -------------------------------------------------------------------------------

    def _topic_of(self, topic: object) -> Topic | None:
        return self._state.topics.get(check_text(topic, "topic", self._read_topic_limit))

    def count(self, topic: str, *, metas: bool = False) -> int:
        """Keys present in ``topic`` (or, with ``metas=True``, presences).  O(1)."""
        t = self._topic_of(topic)
        if t is None:
            return 0
        return t.metas if metas else len(t.keys)

    def totals(self) -> Totals:
        """Presences, connections, topics with a presence, and distinct keys.  O(1)."""
        state = self._state
        return Totals(state.n_presences, len(self._conns), state.n_topics, len(state.users))

    def list(self, topic: str) -> dict[str, Any]:
        """``topic``'s presences now, in the ``presence_state`` shape.

        ``{key: {"metas": [{"phx_ref": ref, ...meta}, ...]}}`` with each key's metas in the
        order they were tracked (an update moves a meta to the end).  A new structure on every
        call: mutate it freely.  This includes changes not flushed yet; to start a new
        subscriber, use `initial_state`.  For a huge topic, prefer `page` or `count`.
        """
        t = self._topic_of(topic)
        if t is None or not t.keys:
            return {}
        return _loads(state_json((key, datas_of(held)) for key, held in t.keys.items()))  # type: ignore[no-any-return]

    def initial_state(self, topic: str) -> dict[str, Any]:
        """The ``presence_state`` to send a subscriber that starts following ``topic`` now.

        This is the state the next ``presence_diff`` applies to exactly (unflushed joins left
        out, unflushed leaves still in), so it never joins a ref twice or leaves a key the
        subscriber does not hold.  Called from a hook during a flush, it also accounts for the
        diffs that flush has yet to deliver (see `presence_core.tracker.delivery`).
        """
        return _loads(self.initial_state_json(topic))  # type: ignore[no-any-return]

    def initial_state_json(self, topic: str) -> bytes:
        """`initial_state` as JSON bytes, for a transport that writes frames without parsing."""
        t = self._topic_of(topic)
        if t is None:
            return b"{}"
        return self._delivery.state_json(t)

    def page(
        self, topic: str, cursor: str | None = None, *, limit: int = 1000
    ) -> tuple[dict[str, Any], str | None]:
        """Up to ``limit`` keys of ``topic`` in key order, after ``cursor``: ``(state, next)``.

        ``state`` has the `list` shape; ``next`` is the cursor for the following page, or None
        after the last one.  Start with ``cursor=None``.  Every key present for the whole
        walk is returned exactly once; keys that join or leave during it may or may not be.
        Costs O(limit + log n) per page: the topic is never copied (a topic over 1,024 keys
        gets a sorted key index the first time it is paged, maintained from then on).
        """
        t = self._topic_of(topic)
        if cursor is not None and not isinstance(cursor, str):
            raise PresenceTypeError(f"cursor must be a str or None, not {type_name(cursor)}")
        check_int(limit, "limit", low=1)
        if t is None or not t.keys:
            return {}, None
        keys = t.keys
        chosen: builtins.list[str]
        if t.index is not None or len(keys) > INDEX_THRESHOLD:
            index = t.sorted_keys()
            after = index.irange(minimum=cursor, inclusive=(False, False)) if cursor else index
            chosen = builtins.list(islice(after, limit + 1))
        else:
            candidates = keys if cursor is None else [k for k in keys if k > cursor]
            chosen = sorted(candidates)[: limit + 1]
        more = len(chosen) > limit
        chosen = chosen[:limit]
        state = _loads(state_json((key, datas_of(keys[key])) for key in chosen))
        return state, (chosen[-1] if more else None)

    def topics(self) -> builtins.list[str]:
        """The topics with at least one presence now."""
        return [name for name, t in self._state.topics.items() if t.keys]

    def presences(self, topic: str) -> builtins.list[Presence]:
        """Every presence in ``topic`` now, as stored: ``(topic, key, data, conn)`` tuples.

        ``data`` is the meta's JSON with its ref first, the bytes a store writes.  For a store
        that writes state back (after Redis lost it) or refreshes its members' TTLs; a new list
        on every call.
        """
        t = self._topic_of(topic)
        if t is None:
            return []
        out: builtins.list[Presence] = []
        for held in t.keys.values():
            if type(held) is tuple:
                if held[CONN] is not None:
                    out.append(held)
            else:
                out.extend(p for p in cast(list[Presence], held) if p[CONN] is not None)
        return out

    # -- the remote view ---------------------------------------------------------------------

    def apply_remote(
        self,
        topic: str,
        joins: Iterable[tuple[str, bytes, bytes | None]] = (),
        leaves: Iterable[bytes] = (),
    ) -> int:
        """Mirror changes of presences that other processes hold; returns how many applied.

        ``joins`` are ``(key, data, prev)``: ``data`` the stored meta as the owning Tracker
        made it (JSON, ``{"phx_ref":"<node>.<hex>",...}``), ``prev`` the ref it replaces (an
        update) or None.  ``leaves`` are refs.  Remote presences show in `list`, `count`,
        `page`, diffs and `user` like local ones, and go to feed readers with ``conn`` None
        (a store must not write them: their owner does).  Applying the same changes again,
        or a leave of a ref not here, changes nothing, so a peer may replay freely.  The
        changes go out with the next `flush`.

        Raises:
            PresenceTypeError, PresenceValueError: a malformed topic, key, meta or ref, a
                ref of this Tracker's own node, or a meta over the largest ``max_meta_bytes``
                of the plans; nothing is applied then.
        """
        check_text(topic, "topic", self._read_topic_limit)
        own = self._node
        max_meta = self._remote_meta_limit
        checked: builtins.list[tuple[str, bytes, bytes | None]] = []
        for item in joins:
            if type(item) is not tuple or len(item) != 3:
                raise PresenceTypeError(
                    f"a remote join must be (key, data, prev), not {repr(item)[:80]}"
                )
            key, data, prev = item
            _check_key(key, self._read_key_limit)
            ref = _remote_ref(data, "data")
            if ref.startswith(own):
                raise PresenceValueError(f"ref {ref!r} is this Tracker's own, not a remote one")
            # The stored form is the meta's JSON with `"phx_ref":"<ref>",` after its brace.
            if len(data) - len(_REF_HEAD) - len(ref) - 1 > max_meta:
                raise PresenceValueError(
                    f"remote meta of {len(data)} bytes is over max_meta_bytes ({max_meta})"
                )
            try:
                meta = _loads(data)
            except orjson.JSONDecodeError:
                meta = None
            if type(meta) is not dict:
                raise PresenceValueError(f"remote data is not a JSON object: {data[:80]!r}")
            if prev is not None:
                _check_ref(prev)
            checked.append((key, data, prev))
        gone = [_check_ref(ref) for ref in leaves]
        state = self._state
        applied = 0
        for key, data, prev in checked:
            applied += state.add_remote(topic, key, data, prev)
        for ref in gone:
            p = state.remote.get(ref)
            if p is not None and p[TOPIC] == topic:
                state.remove_remote(ref)
                applied += 1
        t = state.topics.get(topic)
        if t is not None:
            state.prune(t)
        return applied

    def drop_remote(self, node: str | None = None) -> int:
        """Remove the remote presences of ``node`` (every remote presence if None), with
        their leaves; returns how many.  For a peer known to be gone."""
        state = self._state
        if node is None:
            refs = builtins.list(state.remote)
        else:
            prefix = check_node(node).encode("ascii") + b"."
            refs = [ref for ref in state.remote if ref.startswith(prefix)]
        topics = {state.remote[ref][TOPIC] for ref in refs}
        for ref in refs:
            state.remove_remote(ref)
        for topic in topics:
            t = state.topics.get(topic)
            if t is not None:
                state.prune(t)
        return len(refs)

    def remote_nodes(self) -> dict[str, int]:
        """The nodes that own remote presences here, each with how many.  O(nodes)."""
        return {node.decode("ascii"): n for node, n in self._state.remote_owners.items()}

    def remote_presences(self, topic: str | None = None) -> builtins.list[Presence]:
        """The remote presences in ``topic`` (in every topic if None), as stored."""
        remote = self._state.remote.values()
        if topic is None:
            return builtins.list(remote)
        check_text(topic, "topic", self._read_topic_limit)
        return [p for p in remote if p[TOPIC] == topic]

    def connection_presences(self, conn: ConnId) -> builtins.list[tuple[str, str, str]]:
        """``(topic, key, ref)`` of every presence ``conn`` holds; empty if it is unknown."""
        check_conn_id(conn)
        rec = self._conns.get(conn)
        if rec is None:
            return []
        return [(p[TOPIC], p[KEY], ref_of(p[DATA]).decode()) for p in rec[C_PRESENCES]]

    def connected(self, conn: ConnId) -> bool:
        """Whether ``conn`` is a live connection."""
        return check_conn_id(conn) in self._conns

    # -- users -------------------------------------------------------------------------------

    def user(self, key: str, *, now: float | None = None) -> UserStatus:
        """``key``'s status across every topic and connection (see `UserStatus` for the rule)."""
        check_text(key, "key", self._read_key_limit)
        self._check_now_arg(now)
        status = self._user(key)
        self._counts[_STATUS_READS] += 1
        if status.last_seen is not None:
            self._counts[_STATUS_HITS] += 1
        return status

    def users(self, keys: Iterable[str], *, now: float | None = None) -> dict[str, UserStatus]:
        """`user` for many keys at once (a team view: 10-500), in the order given."""
        if isinstance(keys, (str, bytes, bytearray)):
            raise PresenceTypeError(f"keys must be an iterable of str, not a {type_name(keys)}")
        try:
            items = iter(keys)
        except TypeError:
            raise PresenceTypeError(
                f"keys must be an iterable of str, not {type_name(keys)}"
            ) from None
        # One more than allowed is enough to refuse: an endless iterable must not hang.
        wanted = builtins.list(islice(items, _MAX_BULK_KEYS + 1))
        if len(wanted) > _MAX_BULK_KEYS:
            raise PresenceValueError(
                f"users() takes at most {_MAX_BULK_KEYS} keys per call, got {len(wanted)}"
            )
        limit = self._read_key_limit
        for key in wanted:
            check_text(key, "key", limit)
        self._check_now_arg(now)
        out = {key: self._user(key) for key in wanted}
        self._counts[_STATUS_READS] += len(out)
        self._counts[_STATUS_HITS] += sum(
            1 for status in out.values() if status.last_seen is not None
        )
        return out

    def _check_now_arg(self, now: object) -> None:
        # Reads take `now` for symmetry (a Redis tier will age cached answers by it).
        if now is not None:
            _check_now(now)

    def _user(self, key: str) -> UserStatus:
        state = self._state
        holders = state.holders(key)
        remote = state.remote_of(key)
        if not holders and not remote:
            return UserStatus(key, OFFLINE, last_seen=self._seen.get(key))
        conns = self._conns
        presences: builtins.list[Presence] = []
        last_active = _NEG_INF
        for conn in holders:
            rec = cast(ConnRecord, conns.get(conn))  # a holder is always live
            presences.extend(p for p in rec[C_PRESENCES] if p[KEY] == key)
            last_active = max(last_active, conns.deadline(conn, _NEG_INF) - rec[C_TTL])
        connections = len(holders)
        if remote:
            # Present elsewhere: active now, as far as this process can tell; each owning
            # process counts as one connection (their ids are not mirrored).
            presences.extend(remote)
            connections += len({_owner(ref_of(p[DATA])) for p in remote})
            last_active = self._clock()
        return derive_status(key, presences, connections, last_active)

    def online(self, key: str) -> bool:
        """Whether ``key`` has a presence here, local or remote.  O(1)."""
        state = self._state
        return key in state.users or key in state.remote_users

    def last_seen(self, key: str) -> float | None:
        """When ``key`` was last seen: now-ish while online, else when it went offline.

        None if the user was never seen or has been forgotten (LRU capacity or TTL).
        """
        check_text(key, "key", self._read_key_limit)
        return self._user(key).last_seen

    def drain_last_seen(self, limit: int | None = None) -> builtins.list[tuple[str, Any]]:
        """Changed last-seen entries since the last drain, for a store to persist.

        ``(key, seconds)`` or ``(key, TOMBSTONE)``.  Needs ``record_last_seen_changes=True``;
        otherwise always empty.
        """
        return self._seen.drain_dirty(limit)

    # -- delivery ----------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        callback: Transport | RawTransport | AsyncTransport | AsyncRawTransport,
        *,
        send_state: bool = True,
        raw: bool = False,
        max_pending: int | None = None,
        on_overflow: Callable[[], object] | None = None,
    ) -> Callable[[], None]:
        """Deliver ``topic``'s diffs to ``callback(topic, event, payload)``; returns unsubscribe.

        With ``send_state`` (the default) the callback first gets ``presence_state`` with
        `initial_state`, now, so the diffs that follow apply to it exactly.  Each delivery is
        the callback's own copy.  With ``raw=True`` the payload is the JSON encoding as
        ``bytes`` instead: immutable, so every raw hook shares one object and a fan-out to
        thousands of sockets costs one call each, no copy.  The returned function is
        idempotent; once it has returned, the callback gets nothing more, even from a flush
        under way.  If the callback raises on the state, it is not subscribed and the error
        propagates.  Subscribing and unsubscribing cost O(1) however many subscribers a topic
        has.

        An ``async def`` callback (`AsyncTransport`) is awaited for the host, on the event
        loop running now (without one, `PresenceError`): its deliveries, the state first, are
        queued and awaited one at a time in order, by a task of its own, so a slow one delays
        neither the flush nor other hooks.  ``max_pending`` (default 1024) bounds what it may
        have pending: one delivery more ends the subscription, logged and counted
        (``hook_errors``), and calls ``on_overflow()`` (a coroutine it returns is run as a
        task), so the host can close the socket.  An exception from the callback is logged and
        counted and its later deliveries still go, except that a failed state ends the
        subscription.  Unsubscribing drops what is queued and cancels its task.  See
        `wait_flushed`.  ``max_pending`` and ``on_overflow`` apply to async callbacks only.
        """
        check_text(topic, "topic", self._read_topic_limit)
        check_callable(callback, "callback")
        if is_async_callable(callback):
            return self._subscribe_async(topic, callback, send_state, raw, max_pending, on_overflow)
        if max_pending is not None or on_overflow is not None:
            _sync_options_refused(callback)
        delivery = self._delivery
        t, remove = self._add_subscriber(topic, new_hook(callback, raw))

        def unsubscribe() -> None:
            remove()

        if send_state:
            blob = delivery.state_json(t, callback)
            try:
                result = callback(topic, EVENT_PRESENCE_STATE, blob if raw else _loads(blob))  # type: ignore[arg-type]
            except BaseException:
                unsubscribe()
                raise
            if result is not None and inspect.isawaitable(result):
                unsubscribe()
                _awaitable_refused(callback, result)
        return unsubscribe

    def _subscribe_async(
        self,
        topic: str,
        callback: Callable[..., Any],
        send_state: bool,
        raw: bool,
        max_pending: int | None,
        on_overflow: Callable[[], object] | None,
    ) -> Callable[[], None]:
        hook = self._async_hook(
            callback,
            "subscribe",
            raw,
            max_pending,
            on_overflow,
            transport=False,
            send_state=send_state,
        )
        put = hook.put
        t, remove = self._add_subscriber(topic, new_hook(put, True))  # the queue holds the bytes

        def unsubscribe() -> None:
            if remove():
                hook.close()

        hook.end = unsubscribe
        if send_state:
            put(topic, EVENT_PRESENCE_STATE, self._delivery.state_json(t, put))
        return unsubscribe

    def _add_subscriber(self, topic: str, entry: Hook) -> tuple[Topic, Callable[[], bool]]:
        """Add ``entry`` (a `new_hook`) to ``topic``'s subscribers; returns the topic and a
        function that removes it (True the first time, False after)."""
        delivery = self._delivery
        t = self._state.topic(topic)
        subscribers = t.subscribers
        if subscribers is None:
            subscribers = t.subscribers = {}
        token = id(entry)  # unique while the entry lives, and the closure keeps it alive
        subscribers[token] = entry
        t.hooks = None

        def remove() -> bool:
            if not disable_hook(entry):
                return False
            del subscribers[token]
            t.hooks = None
            delivery.prune(t)
            return True

        return t, remove

    def _add_transport(self, entry: Hook) -> Callable[[], bool]:
        """Add ``entry`` (a `new_hook`) to the transports; returns a function that removes it
        (True the first time, False after)."""
        delivery = self._delivery
        delivery.transports += (entry,)

        def remove() -> bool:
            if not disable_hook(entry):
                return False
            delivery.transports = tuple(h for h in delivery.transports if h is not entry)
            return True

        return remove

    def _async_hook(
        self,
        callback: Callable[..., Any],
        what: str,
        raw: bool,
        max_pending: int | None,
        on_overflow: Callable[[], object] | None,
        *,
        transport: bool,
        send_state: bool = False,
    ) -> AsyncHook:
        """An `AsyncHook` for ``callback`` on the running loop, registered with the delivery
        (``what`` names the call in the error without one)."""
        from .async_hooks import AsyncHook, check_async_options, running_loop

        loop = running_loop(what)
        limit = check_async_options(max_pending, on_overflow)
        delivery = self._delivery
        hook = AsyncHook(
            callback,
            raw=raw,
            max_pending=limit,
            on_overflow=on_overflow,
            loop=loop,
            delivery=delivery,
            transport=transport,
            send_state=send_state,
        )
        delivery.async_hooks[hook] = None
        return hook

    def add_transport(
        self,
        transport: Transport | RawTransport | AsyncTransport | AsyncRawTransport,
        *,
        raw: bool = False,
        max_pending: int | None = None,
        on_overflow: Callable[[], object] | None = None,
    ) -> Callable[[], None]:
        """Deliver every topic's diffs to ``transport``; returns a function that removes it.

        A transport follows all topics, so the host sends each new client its starting state
        itself, with `send_state` (or `initial_state`).  ``raw`` as in `subscribe`.

        An ``async def`` transport is awaited for the host as an async subscriber is (see
        `subscribe`): one delivery at a time, in order, on the event loop running now, at most
        ``max_pending`` (default 1024) pending, beyond which it is removed, logged, counted and
        ``on_overflow()`` is called.  An exception from it is logged and counted, and its later
        deliveries still go.  `send_state` with it queues the state among its deliveries.
        """
        check_callable(transport, "transport")
        if is_async_callable(transport):
            return self._add_async_transport(transport, raw, max_pending, on_overflow)
        if max_pending is not None or on_overflow is not None:
            _sync_options_refused(transport)
        remove_entry = self._add_transport(new_hook(transport, raw))

        def remove() -> None:
            remove_entry()

        return remove

    def _add_async_transport(
        self,
        transport: Callable[..., Any],
        raw: bool,
        max_pending: int | None,
        on_overflow: Callable[[], object] | None,
    ) -> Callable[[], None]:
        hook = self._async_hook(
            transport, "add_transport", raw, max_pending, on_overflow, transport=True
        )
        remove_entry = self._add_transport(new_hook(hook.put, True))

        def remove() -> None:
            if remove_entry():
                hook.close()

        hook.end = remove
        return remove

    def add_feed_reader(self, reader: FeedReader) -> Callable[[], None]:
        """Give ``reader`` every batch of the change feed; returns a function that removes it.

        At each `flush`, before any subscriber or transport, ``reader(batch)`` gets a sequence
        of `presence_core.tracker.TopicChanges`: every presence that joined or left since the
        last flush, coalesced (a presence that joined and left in between is in neither),
        whether or not anyone listens to the topic locally.  This is how the Redis store sees
        every change.  The batch is read-only and only valid during the call: a reader copies
        what it keeps and must not block (hand the work to another task).  A reader that
        raises is logged and counted (``hook_errors``).
        """
        check_callable(reader, "reader")
        entry = new_hook(reader, True)
        delivery = self._delivery
        delivery.readers += (entry,)

        def remove() -> None:
            if disable_hook(entry):
                delivery.readers = tuple(h for h in delivery.readers if h is not entry)

        return remove

    def send_state(
        self,
        topic: str,
        transport: Transport | RawTransport | AsyncTransport | AsyncRawTransport,
        *,
        raw: bool = False,
    ) -> None:
        """Send ``transport`` the ``presence_state`` of ``topic`` for a client starting now.

        Called from inside a flush for a transport that has yet to receive the diff under way,
        the state leaves that diff out, so the client gets it exactly once.

        For an async transport registered with `add_transport`, the state is queued among its
        deliveries (in its own ``raw`` form), so it is awaited before every diff that follows;
        an async callable that is not a registered transport cannot be awaited here and raises
        `PresenceTypeError` (await it yourself with `initial_state_json`).
        """
        check_callable(transport, "transport")
        t = self._topic_of(topic)
        delivery = self._delivery
        if delivery.async_hooks:  # is it a registered async transport? (transports are few)
            from .async_hooks import AsyncHook

            for entry in delivery.transports:
                hook = getattr(entry[0], "__self__", None)
                if type(hook) is AsyncHook and hook.callback == transport:
                    blob = b"{}" if t is None else delivery.state_json(t, hook.put)
                    hook.state(topic, blob)
                    return
        blob = b"{}" if t is None else delivery.state_json(t, transport)
        result = transport(topic, EVENT_PRESENCE_STATE, blob if raw else _loads(blob))  # type: ignore[arg-type]
        if result is not None and inspect.isawaitable(result):
            _awaitable_refused(transport, result)

    def pending(self) -> int:
        """Topics with changes not delivered yet (waiting for the next `flush`)."""
        return self._delivery.pending()

    def flush(self, *, budget: float | None = None) -> int:
        """Deliver each changed topic's coalesced ``presence_diff``; returns how many topics.

        The feed readers get the whole batch first.  Then every subscriber of the topic and
        every transport gets its own copy (raw hooks share the immutable JSON bytes); topics
        nobody hears are not encoded.  A hook that raises an `Exception` is logged and counted
        (``hook_errors``) and the others still get theirs.  Any other `BaseException`
        propagates, and the next flush first finishes the deliveries it interrupted.  Changes
        made by hooks while they run go out with the next flush, and so do those of a `flush`
        called by a hook (itself or through `tick`): it returns 0 at once, because delivering
        then would hand the hooks not yet called the newer diff before the one under way.  A
        hook removed during the flush is not called after its removal.  The time from this
        call to each topic's last delivery is recorded in ``diff_propagation_seconds``.

        ``budget`` (seconds) lets a host keep reading its sockets through a large flush: once
        it is spent no further topic starts (at least one does), the others stay queued, and
        the next call works through them before any new change is taken.  Meanwhile a client
        that subscribes to a queued topic gets the state before its diff, then the diff.

        An async hook is never awaited here: its diff is queued for its own task (see
        `subscribe`), and `wait_flushed` waits for those.
        """
        if budget is not None:
            budget = check_seconds(budget, "budget")
        try:
            return self._delivery.flush(budget)
        finally:
            self.sync_metrics()

    async def wait_flushed(self, *, timeout: float | None = None) -> int:
        """`flush`, then wait until the async hooks have awaited every delivery queued so far.

        Returns what `flush` returned.  It waits for every async subscriber and transport of
        the running event loop, each until it is done with what it had queued when this was
        called (an exception counts as done, and a hook that is ended meanwhile, unsubscribed or
        overflowing, stops being waited for); deliveries queued later are not waited for.
        Sync hooks were called by the flush itself.  With a ``timeout`` (seconds) it raises
        `TimeoutError` once that is spent, and the deliveries go on.  The metrics are published
        again before it returns or raises, so errors the awaits met are counted.
        """
        import asyncio

        if timeout is not None:
            timeout = check_seconds(timeout, "timeout")
        loop = asyncio.get_running_loop()
        flushed = self.flush()
        futures = []
        hook: AsyncHook
        for hook in builtins.list(self._delivery.async_hooks):
            if hook.loop is loop:
                future = hook.flushed()
                if future is not None:
                    futures.append(future)
        try:
            if futures:
                _, waiting = await asyncio.wait(futures, timeout=timeout)
                if waiting:
                    raise TimeoutError(
                        f"{len(waiting)} async presence hooks still had deliveries to await "
                        f"after {timeout} s"
                    )
        finally:
            for future in futures:
                future.cancel()
            self.sync_metrics()
        return flushed

    # -- metrics and scaling -----------------------------------------------------------------

    def sync_metrics(self) -> None:
        """Publish counters and gauges to the metrics sink (`flush` does it every time).

        Never raises: a sink that fails is logged and counted (``hook_errors``), and what it
        did not take is published at the next call.
        """
        try:
            self._publish()
        except Exception:
            self._counts[_HOOK_ERRORS] += 1
            logger.exception("metrics sink %r failed", self._metrics)

    def _publish(self) -> None:
        sink = self._metrics
        counts, synced = self._counts, self._synced
        delivery = self._delivery
        counts[_HEARTBEAT] = self._n_heartbeat
        counts[_HOOK_ERRORS] += delivery.hook_errors
        delivery.hook_errors = 0
        # Each latency is dropped only once the sink took it; a sink that keeps failing costs
        # at most the newest 10,000 of them.
        latencies = delivery.latencies
        del latencies[:-10_000]
        while latencies:
            sink.observe(DIFF_PROPAGATION_SECONDS, latencies[-1])
            latencies.pop()
        for i, (metric, labels) in enumerate(_COUNTERS):
            delta = counts[i] - synced[i]
            if delta:
                sink.inc(metric, delta, labels)
                synced[i] = counts[i]
        for metric, counts_by in ((LIMIT_HITS, self._limit_hits), (DISCONNECTS, self._disconnects)):
            for label, hits in counts_by.items():
                delta = hits[0] - hits[1]
                if delta:
                    sink.inc(metric, delta, (label,))
                    hits[1] = hits[0]
        state = self._state
        sink.set(PRESENCES, state.n_presences)
        sink.set(CONNECTIONS, len(self._conns))
        sink.set(TOPICS, state.n_topics)
        sink.set(PENDING_CHANGES, delivery.pending_changes())

    def memory_estimate(self) -> int:
        """Approximate bytes held for presences, connections and topics (for scalers).

        Counted from sizes that are known exactly (the encoded metas) plus fixed per-object
        costs measured on CPython 3.11; it is an estimate, not a walk of the heap.
        """
        state = self._state
        return (
            state.data_bytes
            + state.n_presences * 150  # bytes header, tuple, dict slots
            + len(self._conns) * 150  # record tuple, table entry and index
            + len(state.users) * 40
            + len(state.topics) * 250
        )

    def load_sample(
        self,
        *,
        now: float | None = None,
        wall_time: datetime | None = None,
        memory_bytes: int | None = None,
    ) -> LoadSample:
        """A `LoadSample` of this process for a scaler.

        ``wall_time`` defaults to the current UTC time; ``memory_bytes`` to `memory_estimate`
        (pass the process RSS instead if your thresholds are written for it).  Ops per second
        and diff latency quantiles need the built-in `Metrics`; with another sink they read 0.
        """
        now_s = self._now(now)
        if wall_time is None:
            wall_time = datetime.now(UTC)
        elif not isinstance(wall_time, datetime):
            raise PresenceTypeError(f"wall_time must be a datetime, not {type_name(wall_time)}")
        if memory_bytes is not None:
            check_int(memory_bytes, "memory_bytes", low=0)
        self.sync_metrics()
        memory = self.memory_estimate() if memory_bytes is None else memory_bytes
        metrics = self._metrics
        if isinstance(metrics, Metrics):
            return metrics.load_sample(at=now_s, wall_time=wall_time, memory_bytes=memory)
        totals = self.totals()
        return LoadSample(
            at=now_s,
            wall_time=wall_time,
            presences=totals.presences,
            connections=totals.connections,
            topics=totals.topics,
            memory_bytes=memory,
        )

    @property
    def scalers(self) -> tuple[Scaler, ...]:
        """The scalers `run_scalers` consults, in order."""
        return self._scalers

    def add_scaler(self, scaler: Scaler) -> None:
        """Consult ``scaler`` in `run_scalers` from now on."""
        check_callable(scaler, "scaler")
        self._scalers += (scaler,)

    def run_scalers(
        self, *, now: float | None = None, sample: LoadSample | None = None
    ) -> builtins.list[ScaleDecision]:
        """Give every scaler a load sample (`load_sample` if not given); returns their decisions.

        Scalers that answer None are left out.  A scaler that raises or answers something other
        than a `ScaleDecision` is logged and counted (``hook_errors``) and the others are still
        consulted.  The Tracker never acts on a decision: the host applies it (and tells a
        `ThresholdScaler` the new replica count).
        """
        if sample is None:
            sample = self.load_sample(now=now)
        elif not isinstance(sample, LoadSample):
            raise PresenceTypeError(f"sample must be a LoadSample, not {type_name(sample)}")
        elif now is not None:
            _check_now(now)
        decisions: builtins.list[ScaleDecision] = []
        for scaler in self._scalers:
            try:
                decision = scaler(sample)
            except Exception:
                self._counts[_HOOK_ERRORS] += 1
                logger.exception("scaler %r failed", scaler)
                continue
            if isinstance(decision, ScaleDecision):
                decisions.append(decision)
            elif decision is not None:
                self._counts[_HOOK_ERRORS] += 1
                logger.error("scaler %r answered %r, not a ScaleDecision", scaler, decision)
        if decisions:
            self._record_decisions(sample, decisions)
        return decisions

    def _record_decisions(
        self, sample: LoadSample, decisions: builtins.list[ScaleDecision]
    ) -> None:
        at = sample.wall_time or datetime.now(UTC)
        self._decisions.extend((at, decision) for decision in decisions)
        sink = self._metrics
        try:
            for decision in decisions:
                sink.inc(SCALER_DECISIONS, 1, (decision.action,))
            sink.set(SCALER_DESIRED_REPLICAS, max(decision.desired for decision in decisions))
        except Exception:
            self._counts[_HOOK_ERRORS] += 1
            logger.exception("metrics sink %r failed", sink)

    def decisions(self) -> builtins.list[tuple[datetime, ScaleDecision]]:
        """The latest scaler decisions `run_scalers` received (up to 50), newest first, each
        with the wall time of the sample it judged: what a dashboard shows."""
        return builtins.list(reversed(self._decisions))

    def __repr__(self) -> str:
        totals = self.totals()
        return (
            f"<Tracker node={self.node!r} presences={totals.presences} "
            f"connections={totals.connections} topics={totals.topics} keys={totals.keys}>"
        )
