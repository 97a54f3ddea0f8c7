"""The Tracker: who is present in which topic, in the Phoenix Presence model.

A *presence* is (topic, key, ref) with a meta: a connection says "I am `key` in `topic`, with
this meta", and gets back a ref that names this one presence.  A key may be present several times
in a topic (one per connection or device); clients see every meta under the key.  This is what
Phoenix Presence does and what Supabase Realtime and its clients speak, so the payloads here can
go to those clients unchanged.

What the Tracker keeps, and why in that form
--------------------------------------------
* **Connections** live in a native `PresenceTable` keyed by the host's connection id, so a
  heartbeat is one table touch and a silent connection expires through the table's timing wheel.
  The value is a small `_Conn` record: plan, TTL, the connection's presences and its token bucket.
* **A presence** is a tuple ``(topic, key, data)`` where ``data`` is the meta already encoded as
  JSON with its ref: ``{"phx_ref":"<ref>",...meta}``.  The meta has to be encoded anyway (to check
  it is JSON and to measure it against the byte limit), the bytes are a third of the size of the
  dict, every read needs a fresh copy (callers and client libraries mutate what they get), which
  ``orjson.loads`` makes at C speed, and the Redis store will write exactly these bytes.  The ref
  sits first so it can be sliced out without parsing.  Tuples whose items are all str and bytes
  are untracked by the garbage collector, so a million presences do not slow every collection.
* **Topics** map key -> presence (or a list of them, in creation order, when a key has several).
* **Users** map key -> the connection(s) holding a presence with that key, for status reads.
* **Last seen** lives in a second `PresenceTable` keyed by user key, bounded by LRU; its change
  list is what the Redis store will persist.

Diffs
-----
Every change is recorded on its topic as a pending join or leave, keyed by the presence.  A leave
of a presence whose join is still pending cancels the join instead (the two never reach a client),
and an update of such a presence carries the ``phx_ref_prev`` of the join it replaces, so
``phx_ref_prev`` always names a ref the subscribers hold.  `Tracker.flush` turns each topic's
pending changes into one ``presence_diff`` and hands every subscriber and transport its own copy.

Because a leave is only ever recorded for a presence that was joined in an earlier flush, every
leave names a key that each subscriber holds -- as long as each subscriber started from
`Tracker.initial_state` (the state as of the last flush), not from `Tracker.list` (the state now,
including unflushed joins).  That matters: Supabase's Python client before 2.32.0 stops applying a
diff's leaves at the first key it does not hold.

Time
----
Every time-driven call takes ``now=`` (seconds on the Tracker's clock, default
`time.monotonic`).  Latency measurements use `time.perf_counter`, which is real time whatever the
injected clock does.
"""

from __future__ import annotations

import builtins
import logging
import math
import re
import secrets
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count, islice
from types import MappingProxyType
from typing import Any, Final, NamedTuple, NoReturn, TypeAlias

import orjson

from .errors import (
    InvalidMeta,
    MetaTooLarge,
    NotTracked,
    PresenceTypeError,
    PresenceValueError,
    QuotaExceeded,
    RateLimited,
    UnknownPlan,
)
from .limits import DEFAULT_PLAN, MAX_CONNECTION_ID_LENGTH, Limits
from .metrics import (
    CONNECTION_EXPIRIES,
    CONNECTIONS,
    DIFF_PROPAGATION_SECONDS,
    EVICTIONS,
    EXPIRIES,
    HOOK_ERRORS,
    LAST_SEEN_EVICTIONS,
    LIMIT_HITS,
    OPS_DISCONNECT,
    OPS_HEARTBEAT,
    OPS_TRACK,
    OPS_UNTRACK,
    OPS_UPDATE,
    PRESENCES,
    STATUS_READ_HITS,
    STATUS_READS,
    TOPICS,
    Metrics,
)
from .phoenix import EVENT_PRESENCE_DIFF as PRESENCE_DIFF
from .phoenix import EVENT_PRESENCE_STATE as PRESENCE_STATE
from .scaling import LoadSample, ScaleDecision
from .table import PresenceTable
from .table._common import MAX_CAPACITY, check_now, check_ttl
from .typing import ConnId, MetricsSink, RawTransport, Scaler, Transport

__all__ = [
    "AWAY",
    "BUSY",
    "CONNECTION_EXPIRIES",
    "HOOK_ERRORS",
    "LAST_SEEN_EVICTIONS",
    "OFFLINE",
    "ONLINE",
    "STATUS_ORDER",
    "ConnId",
    "Totals",
    "Tracker",
    "UserStatus",
]

logger = logging.getLogger("presence_core.tracker")


ONLINE: Final = "online"
AWAY: Final = "away"
BUSY: Final = "busy"
OFFLINE: Final = "offline"

STATUS_ORDER: Final = (ONLINE, AWAY, BUSY)
"""Statuses a presence can report, most available first; a user's status is the first of these
that any of the user's presences reports, and `OFFLINE` when there is none."""

_STATUS_RANK: Final = {status: rank for rank, status in enumerate(STATUS_ORDER)}


# A presence: (topic, key, data) with data = b'{"phx_ref":"<ref>"...meta fields}'.
_Presence: TypeAlias = tuple[str, str, bytes]
_TOPIC: Final = 0
_KEY: Final = 1
_DATA: Final = 2
_REF_HEAD: Final = b'{"phx_ref":"'
_REF_START: Final = len(_REF_HEAD)
_RESERVED: Final = ("phx_ref", "phx_ref_prev", "presence_ref")
_NODE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_NEG_INF: Final = -math.inf
_MIN_INT_ID: Final = -(2**63)
_MAX_INT_ID: Final = 2**63 - 1

_dumps = orjson.dumps
_loads = orjson.loads
_perf_counter = time.perf_counter

# Paged reads keep a sorted key index for a topic once it is this large; below it, sorting the
# keys on each page is cheaper than maintaining an index on every join and leave.
_INDEX_THRESHOLD: Final = 1024
_BLOCK: Final = 512  # keys per block of the sorted index (split at twice that)

# users() answers this many keys at most per call: a team view is 10-500.
_MAX_BULK_KEYS: Final = 10_000


# -- small records ---------------------------------------------------------------------------


class _Conn:
    """One connection: its plan, TTL, presences, and the token bucket's theoretical arrival time."""

    __slots__ = ("id", "plan", "ttl", "presences", "tat")

    def __init__(self, conn_id: ConnId, plan: Limits, ttl: float) -> None:
        self.id = conn_id
        self.plan = plan
        self.ttl = ttl
        self.presences: list[_Presence] = []
        self.tat = _NEG_INF  # GCRA: the bucket starts full


# A registered subscriber or transport: ``[callable, raw]``, raw meaning it takes the payload as
# JSON bytes.  Removing it swaps the callable for `_removed_hook` (and raw for True, so no copy is
# made for it): a flush already under way then skips it at no cost per delivery, where a flag
# to test would cost every delivery to every hook.
_Hook: TypeAlias = list[Any]


def _removed_hook(topic: str, event: str, payload: object) -> None:
    """What a removed hook's entry calls, should a flush under way still hold it."""


def _new_hook(call: Callable[..., object], raw: object) -> _Hook:
    return [call, bool(raw)]


def _disable_hook(entry: _Hook) -> bool:
    """Mark ``entry`` removed; False if it already was."""
    if entry[0] is _removed_hook:
        return False
    entry[0] = _removed_hook
    entry[1] = True
    return True


class _Topic:
    """One topic: its keys, pending diff, subscribers and (for big paged topics) a key index."""

    __slots__ = ("name", "keys", "metas", "joins", "leaves", "subscribers", "hooks", "index")

    def __init__(self, name: str) -> None:
        self.name = name
        # key -> the key's only presence, or a list of its presences in creation order.  Most
        # keys have one presence, and a tuple in place saves a list per key.
        self.keys: dict[str, _Presence | list[_Presence]] = {}
        self.metas = 0
        # Pending diff, created on first use: joins map a presence to the ref it replaces.
        self.joins: dict[_Presence, bytes | None] | None = None
        self.leaves: dict[_Presence, None] | None = None
        # Subscribers by a token of their own (O(1) to add and remove, however many), created on
        # first use, and the tuple a flush delivers to, rebuilt after a change.
        self.subscribers: dict[int, _Hook] | None = None
        self.hooks: tuple[_Hook, ...] | None = ()
        self.index: _SortedKeys | None = None

    def subscribed(self) -> tuple[_Hook, ...]:
        hooks = self.hooks
        if hooks is None:
            hooks = self.hooks = tuple(self.subscribers.values()) if self.subscribers else ()
        return hooks


class _SortedKeys:
    """Keys in sorted order as a list of sorted blocks: O(log n + block) insert and remove."""

    __slots__ = ("_blocks", "_maxes")

    def __init__(self, keys: Iterable[str]) -> None:
        ordered = sorted(keys)
        self._blocks = [ordered[i : i + _BLOCK] for i in range(0, len(ordered), _BLOCK)]
        self._maxes = [block[-1] for block in self._blocks]

    def add(self, key: str) -> None:
        blocks, maxes = self._blocks, self._maxes
        if not blocks:
            blocks.append([key])
            maxes.append(key)
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
        block = blocks[i]
        insort(block, key)
        if len(block) > 2 * _BLOCK:
            blocks[i : i + 1] = [block[:_BLOCK], block[_BLOCK:]]
            maxes[i : i + 1] = [block[_BLOCK - 1], block[-1]]
        else:
            maxes[i] = block[-1]

    def remove(self, key: str) -> None:
        blocks, maxes = self._blocks, self._maxes
        i = bisect_left(maxes, key)
        block = blocks[i]
        del block[bisect_left(block, key)]
        if block:
            maxes[i] = block[-1]
        else:
            del blocks[i]
            del maxes[i]

    def after(self, cursor: str | None, limit: int) -> list[str]:
        """Up to ``limit`` keys greater than ``cursor`` (from the start if None), ascending."""
        blocks = self._blocks
        if cursor is None:
            i = j = 0
        else:
            i = bisect_right(self._maxes, cursor)
            if i == len(blocks):
                return []
            j = bisect_right(blocks[i], cursor)
        out: list[str] = []
        while i < len(blocks) and len(out) < limit:
            out.extend(blocks[i][j : j + limit - len(out)])
            i += 1
            j = 0
        return out


@dataclass(frozen=True, slots=True)
class UserStatus:
    """One user's presence across every topic and connection of this Tracker.

    How it is derived (the rule, in full):

    * Each presence reports the status in its meta's ``"status"`` field if that is one of
      ``"online"``, ``"away"``, ``"busy"``; any other value, or none, counts as ``"online"``
      (being present at all means online unless the client says otherwise).
    * The user's `status` is the most available status any presence reports, in the order
      online > away > busy: one active device is enough to be reachable, and "busy" (do not
      disturb) is the least available way of being there.  With no presence it is ``"offline"``.
    * `custom_status` is the ``"custom_status"`` str of the most recently tracked or updated
      presence that has one.
    * `devices` are the distinct ``"device"`` strs of the presences, oldest presence first.
    * `last_active` is the last time (Tracker clock) any of the user's connections tracked,
      updated or heartbeated; `last_seen` is the same while the user is online, and after the
      user went offline the time that happened (kept in a bounded LRU table).

    Attributes:
        key: The user's key.
        status: ``"online"``, ``"away"``, ``"busy"`` or ``"offline"``.
        custom_status: Free text the user set, or None.
        devices: Devices the user is present on.
        topics: Topics the user is present in, sorted.
        connections: Live connections with at least one presence of the user.
        presences: Presences of the user, all topics together.
        last_active: See above; None when offline.
        last_seen: See above; None for a user never seen (or forgotten by the LRU table).
    """

    key: str
    status: str
    custom_status: str | None = None
    devices: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    connections: int = 0
    presences: int = 0
    last_active: float | None = None
    last_seen: float | None = None

    @property
    def online(self) -> bool:
        """Whether the user has at least one presence."""
        return self.status != OFFLINE


class Totals(NamedTuple):
    """Process-wide counts, each kept up to date on every change (O(1) to read)."""

    presences: int
    connections: int
    topics: int
    keys: int


# -- argument checks -------------------------------------------------------------------------
# Each raises before anything changes.  The common case (an exact str or float) is checked
# first, because these run on every call.


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_now(now: object) -> float:
    if type(now) is float and now - now == 0.0:  # the common case; false for inf and nan
        return now
    return _presence_error(check_now, now)


def _presence_error(check: Callable[[object], float], value: object) -> float:
    """Run one of the table's own argument checks, raising our subclasses of its errors."""
    try:
        return check(value)
    except TypeError as exc:
        raise PresenceTypeError(str(exc)) from None
    except ValueError as exc:
        raise PresenceValueError(str(exc)) from None


def _checked_clock(clock: Callable[[], float]) -> Callable[[], float]:
    """``clock`` with its readings checked, so a bad one is refused before anything changes."""

    def read() -> float:
        value = clock()
        if type(value) is float and value - value == 0.0:
            return value
        try:
            return _check_now(value)
        except PresenceTypeError:
            raise PresenceTypeError(
                f"clock() must return seconds as a number, not {_type_name(value)}"
            ) from None
        except PresenceValueError:
            raise PresenceValueError(f"clock() must return a finite time, got {value!r}") from None

    return read


def _check_ttl(ttl: object) -> float:
    return _presence_error(check_ttl, ttl)


def _check_text(value: object, what: str, limit: int) -> str:
    if type(value) is not str and not isinstance(value, str):
        raise PresenceTypeError(f"{what} must be a str, not {_type_name(value)}")
    size = len(value)
    if size == 0:
        raise PresenceValueError(f"{what} must not be empty")
    if size > limit:
        raise PresenceValueError(f"{what} is {size} characters long, over the limit of {limit}")
    if not value.isascii():
        # Lone surrogates cannot be encoded as JSON; refuse them here, not in the middle of a
        # flush to thousands of subscribers.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PresenceValueError(f"{what} is not valid Unicode text: {value!r}") from None
    return value


# realtime-js collects presence state in a plain JS object, where this key is the prototype
# slot: a presence under it silently disappears from every Supabase JavaScript client.
_FORBIDDEN_KEY: Final = "__proto__"


def _check_key(key: object, limit: int) -> str:
    _check_text(key, "key", limit)
    if key == _FORBIDDEN_KEY:
        raise PresenceValueError(
            "key '__proto__' cannot be used: Supabase's JavaScript client silently drops it"
        )
    return key  # type: ignore[return-value]


def _is_conn_id(conn: object) -> bool:
    return isinstance(conn, (str, int)) and not isinstance(conn, bool)


_ID_TYPES: Final = frozenset((str, int))


def _conn_ids_only(conns: Iterable[ConnId]) -> Sequence[ConnId]:
    """``conns`` without the items no connection can have as its id (bools, floats...).

    Those would find an int id they compare equal to.  Every item is still hashed, so an
    unhashable one raises TypeError as the table would.
    """
    ids = conns if type(conns) is list or type(conns) is tuple else list(conns)
    if set(map(type, ids)) <= _ID_TYPES:
        return ids
    kept = []
    for conn in ids:
        if _is_conn_id(conn):
            kept.append(conn)
        else:
            hash(conn)
    return kept


def _int_id_out_of_range(conn: int) -> PresenceValueError:
    # Ids are socket ids or counters; a bigger int cannot even go in an error message.
    return PresenceValueError(
        f"an int connection id must fit in 64 bits, got one of {conn.bit_length()} bits"
    )


def _check_conn(conn: object) -> ConnId:
    kind = type(conn)
    if kind is str or (isinstance(conn, str)):
        return _check_text(conn, "connection id", MAX_CONNECTION_ID_LENGTH)
    if kind is int or (isinstance(conn, int) and not isinstance(conn, bool)):
        if not _MIN_INT_ID <= conn <= _MAX_INT_ID:  # type: ignore[operator]
            raise _int_id_out_of_range(conn)  # type: ignore[arg-type]
        return conn  # type: ignore[return-value]
    raise PresenceTypeError(f"connection id must be a str or an int, not {_type_name(conn)}")


def _encode_meta(meta: object, limits: Limits) -> bytes:
    if not isinstance(meta, dict):
        raise InvalidMeta(f"meta must be a dict, not {_type_name(meta)}")
    # dict's own lookup: a subclass may answer `in` otherwise, but orjson writes what it holds.
    has = dict.__contains__
    for name in _RESERVED:
        if has(meta, name):
            raise PresenceValueError(
                f"meta must not contain {name!r}: the Tracker sets refs itself "
                f"(reserved: {', '.join(_RESERVED)})"
            )
    try:
        blob = _dumps(meta)
    except orjson.JSONEncodeError as exc:
        raise InvalidMeta(f"meta is not JSON-serialisable: {exc}") from None
    if len(blob) > limits.max_meta_bytes:
        raise MetaTooLarge(len(blob), limits.max_meta_bytes)
    return blob


def _check_callable(value: object, what: str) -> None:
    if not callable(value):
        raise PresenceTypeError(f"{what} must be callable, not {_type_name(value)}")


# -- presence data -----------------------------------------------------------------------------


def _encode(ref: bytes, blob: bytes) -> bytes:
    """The stored form of a meta: its JSON with ``"phx_ref"`` first."""
    if len(blob) == 2:  # b"{}"
        return _REF_HEAD + ref + b'"}'
    return _REF_HEAD + ref + b'",' + blob[1:]


def _same_meta(data: bytes, ref: bytes, blob: bytes) -> bool:
    """Whether stored ``data`` holds the meta encoded as ``blob``."""
    candidate = _encode(ref, blob)
    if candidate == data:
        return True
    # Equal dicts built in another key order encode to other bytes of the same length; only
    # then is it worth parsing both.
    return len(candidate) == len(data) and _loads(candidate) == _loads(data)


def _ref_of(data: bytes) -> bytes:
    return data[_REF_START : data.index(b'"', _REF_START)]


def _with_prev(data: bytes, prev: bytes) -> bytes:
    end = data.index(b'"', _REF_START)
    return data[:end] + b'","phx_ref_prev":"' + prev + data[end:]


def _state_json(groups: Iterable[tuple[str, Sequence[bytes]]]) -> bytes:
    """``{key: {"metas": [data, ...]}}`` as JSON, from already encoded metas."""
    return (
        b"{"
        + b",".join(
            _dumps(key) + b':{"metas":[' + b",".join(datas) + b"]}" for key, datas in groups
        )
        + b"}"
    )


def _datas(value: _Presence | list[_Presence]) -> list[bytes]:
    if isinstance(value, tuple):
        return [value[_DATA]]
    return [p[_DATA] for p in value]


def _presences(value: _Presence | list[_Presence]) -> Sequence[_Presence]:
    return (value,) if isinstance(value, tuple) else value


# Internal counters, published to the metrics sink by `Tracker.sync_metrics` so that the hot
# paths pay an integer increment rather than a method call.
_COUNTER_NAMES: Final = (
    OPS_TRACK,
    OPS_UPDATE,
    OPS_UNTRACK,
    OPS_HEARTBEAT,
    OPS_DISCONNECT,
    EXPIRIES,
    CONNECTION_EXPIRIES,
    EVICTIONS,
    LAST_SEEN_EVICTIONS,
    LIMIT_HITS,
    HOOK_ERRORS,
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
        transports: Hooks that receive every topic's events (see `add_transport`).
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
        "_clock",
        "_ttl",
        "_plans",
        "_default_limits",
        "_read_key_limit",
        "_read_topic_limit",
        "_conns",
        "_touch",
        "_touch_many",
        "_seen",
        "_seen_ttl",
        "_topics",
        "_users",
        "_dirty",
        "_transports",
        "_scalers",
        "_metrics",
        "_on_evict",
        "_node",
        "_refs",
        "_n_presences",
        "_n_topics",
        "_data_bytes",
        "_counts",
        "_synced",
        "_n_heartbeat",
        "_int_ids",
        "_flushing",
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
        transports: Iterable[Transport] = (),
        scalers: Iterable[Scaler] = (),
        last_seen_capacity: int = 100_000,
        last_seen_ttl: float = 30 * 86400.0,
        record_last_seen_changes: bool = False,
        node: str | None = None,
        on_evict: Callable[[ConnId], object] | None = None,
    ) -> None:
        self._ttl = _check_ttl(connection_ttl)
        for name, value in (
            ("max_connections", max_connections),
            ("last_seen_capacity", last_seen_capacity),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise PresenceTypeError(f"{name} must be an int, not {_type_name(value)}")
            if not 1 <= value <= MAX_CAPACITY:
                raise PresenceValueError(
                    f"{name} must be between 1 and {MAX_CAPACITY}, got {value}"
                )
        if not isinstance(default_plan, str):
            raise PresenceTypeError(f"default_plan must be a str, not {_type_name(default_plan)}")
        if plans is None:
            plans = {default_plan: Limits()}
        if not isinstance(plans, Mapping):
            raise PresenceTypeError(f"plans must be a mapping, not {_type_name(plans)}")
        for name, limits in plans.items():
            if not isinstance(name, str) or not isinstance(limits, Limits):
                raise PresenceTypeError(
                    f"plans must map str names to Limits, got {name!r}: {_type_name(limits)}"
                )
        if default_plan not in plans:
            raise UnknownPlan(f"default_plan {default_plan!r} is not one of {sorted(plans)}")
        self._plans: Mapping[str, Limits] = MappingProxyType(dict(plans))
        self._default_limits = self._plans[default_plan]
        # Reads and subscriptions are not tied to a connection: accept anything some plan allows.
        self._read_key_limit = max(limits.max_key_length for limits in self._plans.values())
        self._read_topic_limit = max(limits.max_topic_length for limits in self._plans.values())
        if clock is not None:
            _check_callable(clock, "clock")
        # time.monotonic needs no checking; any other clock's readings are checked.
        self._clock: Callable[[], float] = (
            time.monotonic if clock is None else _checked_clock(clock)
        )
        self._seen_ttl = _check_ttl(last_seen_ttl)
        if node is None:
            node = secrets.token_urlsafe(6)
        elif not isinstance(node, str) or not _NODE_PATTERN.fullmatch(node):
            raise PresenceValueError(f"node must match [A-Za-z0-9_-]{{1,32}}, got {node!r}")
        self._node = node.encode("ascii") + b"."
        self._refs = count(1)
        if on_evict is not None:
            _check_callable(on_evict, "on_evict")
        self._on_evict = on_evict
        self._transports: tuple[_Hook, ...] = ()
        for transport in transports:
            _check_callable(transport, "a transport")
            self._transports += (_new_hook(transport, False),)
        self._scalers: tuple[Scaler, ...] = ()
        for scaler in scalers:
            _check_callable(scaler, "a scaler")
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
        self._conns: PresenceTable[ConnId, _Conn] = PresenceTable(
            max_connections, clock=table_clock, track_dirty=False
        )
        # Bound once: a heartbeat is then one attribute read and one native call.
        self._touch = self._conns.touch
        self._touch_many = self._conns.touch_many
        # Last-seen times change rarely and live long, so a one-second tick keeps the wheel idle.
        self._seen: PresenceTable[str, float] = PresenceTable(
            last_seen_capacity, tick=1.0, clock=table_clock, track_dirty=record_last_seen_changes
        )
        self._topics: dict[str, _Topic] = {}
        # key -> the connection holding it, or (several) a dict of them in arrival order: a
        # popular key may be held by very many, and each must leave in O(1).
        self._users: dict[str, _Conn | dict[_Conn, None]] = {}
        self._dirty: dict[str, _Topic] = {}
        self._n_presences = 0
        self._n_topics = 0
        self._data_bytes = 0
        self._counts = dict.fromkeys(_COUNTER_NAMES, 0)
        self._synced = dict.fromkeys(_COUNTER_NAMES, 0)
        self._n_heartbeat = 0  # separate from _counts: the heartbeat path is the hottest
        # Whether any connection id is an int: only then can a bool or float (True == 1,
        # 1.0 == 1) passed to heartbeat_many find a connection it does not name.
        self._int_ids = False
        self._flushing = False

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

    def _now(self, now: object) -> float:
        return self._clock() if now is None else _check_now(now)

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
        _check_conn(conn)
        if plan is not None and not isinstance(plan, str):
            raise PresenceTypeError(f"plan must be a str, not {_type_name(plan)}")
        if plan is not None and plan not in self._plans:
            raise UnknownPlan(f"unknown plan {plan!r}; configured plans: {sorted(self._plans)}")
        ttl_s = None if ttl is None else _check_ttl(ttl)
        rec = self._conns.get(conn)
        if rec is not None:
            if plan is not None:
                rec.plan = self._plans[plan]
            if ttl_s is not None:
                rec.ttl = ttl_s
            self._conns.upsert(conn, rec, rec.ttl, now_s)
            return False
        limits = self._default_limits if plan is None else self._plans[plan]
        evicted = self._insert_conn(
            _Conn(conn, limits, self._ttl if ttl_s is None else ttl_s), now_s
        )
        if evicted:
            self._notify_evicted(evicted)
        return True

    def _insert_conn(self, rec: _Conn, now: float) -> builtins.list[ConnId] | None:
        """Add a new connection; returns the ids evicted to make room, for `_notify_evicted`.

        The caller finishes its own change before it calls ``on_evict``, which may call back
        into the Tracker.
        """
        conns = self._conns
        full = len(conns) >= conns.capacity
        conns.upsert(rec.id, rec, rec.ttl, now)
        if type(rec.id) is not str:
            self._int_ids = True
        if not full:
            return None
        ids: builtins.list[ConnId] = []
        for conn_id, evicted in conns.drain_evicted():
            self._drop_conn(evicted, now, now)
            self._counts[EVICTIONS] += 1
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
                self._counts[HOOK_ERRORS] += 1
                logger.exception("on_evict callback failed for %r", conn_id)

    def heartbeat(self, conn: ConnId, *, now: float | None = None) -> bool:
        """Keep ``conn`` and all its presences alive for another TTL; False if it is unknown.

        One native table touch: no per-presence work, however many topics the connection is in.
        An id of the wrong type is simply unknown (no connection can have it), even one that
        compares equal to a connection's int id (``True``, ``1.0``).
        """
        try:
            if type(conn) is str or type(conn) is int or _is_conn_id(conn):
                live = self._touch(conn, None, now)
            else:
                hash(conn)  # an unhashable id is a caller's bug, not an unknown connection
                if now is not None:
                    _check_now(now)
                return False
        except TypeError as exc:  # unhashable id, or a `now` that is not a number
            raise PresenceTypeError(str(exc)) from None
        except ValueError as exc:  # a `now` that is not finite
            raise PresenceValueError(str(exc)) from None
        if live:
            self._n_heartbeat += 1
        return live

    def heartbeat_many(self, conns: Iterable[ConnId], *, now: float | None = None) -> int:
        """`heartbeat` every connection in ``conns`` in one native call; returns how many live."""
        if isinstance(conns, (str, bytes, bytearray)):
            raise PresenceTypeError(
                f"conns must be an iterable of connection ids, not a single {_type_name(conns)}"
            )
        try:
            if self._int_ids:
                conns = _conn_ids_only(conns)
            touched = self._touch_many(conns, None, now)
        except TypeError as exc:
            raise PresenceTypeError(str(exc)) from None
        except ValueError as exc:
            raise PresenceValueError(str(exc)) from None
        self._n_heartbeat += touched
        return touched

    def disconnect(self, conn: ConnId, *, now: float | None = None) -> int:
        """Forget ``conn``: every presence it holds leaves.  Returns how many presences left."""
        now_s = self._now(now)
        _check_conn(conn)
        rec = self._conns.pop(conn)
        if rec is None:
            return 0
        self._counts[OPS_DISCONNECT] += 1
        return self._drop_conn(rec, now_s, now_s)

    def expire(self, *, now: float | None = None) -> list[ConnId]:
        """Drop every connection whose TTL ran out; returns their ids.

        Their presences leave (delivered at the next `flush`).  The last-seen time of a user who
        goes offline this way is the connection's deadline minus its TTL, i.e. its last sign
        of life, to the resolution of the calls to `expire`.
        """
        now_s = self._now(now)
        expired = self._conns.expire(now_s)
        ids: list[ConnId] = []
        removed = 0
        for conn_id, rec in expired:
            removed += self._drop_conn(rec, now_s - rec.ttl, now_s)
            ids.append(conn_id)
        self._counts[EXPIRIES] += removed
        self._counts[CONNECTION_EXPIRIES] += len(ids)
        self._seen.expire(now_s)
        return ids

    def tick(self, *, now: float | None = None) -> list[ConnId]:
        """`expire` then `flush`: what a host calls every 10-100 ms.  Returns expired ids."""
        expired = self.expire(now=now)
        self.flush()
        return expired

    def _drop_conn(self, rec: _Conn, seen_at: float, now: float) -> int:
        presences = rec.presences
        rec.presences = []
        for p in presences:
            self._remove(p)
        for key in {p[_KEY] for p in presences}:
            self._user_remove(key, rec, seen_at, now)
        return len(presences)

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
        now_s = self._clock() if now is None else _check_now(now)
        # The checks are written out for the common case (plain ASCII str within limits) so a
        # valid call costs no function calls; anything else goes to the checker, which raises
        # with the precise message or accepts (non-ASCII text, int connection ids).
        if type(conn) is not str or not 0 < len(conn) <= MAX_CONNECTION_ID_LENGTH:
            _check_conn(conn)
        rec: _Conn | None = self._conns.get(conn)
        limits = self._default_limits if rec is None else rec.plan
        if (
            type(topic) is not str
            or not 0 < len(topic) <= limits.max_topic_length
            or not topic.isascii()
        ):
            _check_text(topic, "topic", limits.max_topic_length)
        if (
            type(key) is not str
            or not 0 < len(key) <= limits.max_key_length
            or not key.isascii()
            or key == _FORBIDDEN_KEY
        ):
            _check_key(key, limits.max_key_length)
        blob = _encode_meta(meta, limits)
        old = None
        shares_key = False  # whether this connection already holds `key` in another topic
        if rec is not None:
            for p in rec.presences:
                if p[_KEY] == key:
                    if p[_TOPIC] == topic:
                        old = p
                        break
                    shares_key = True
            tat = self._admit(rec, now_s)
            if old is not None:
                self._touch(conn, None, now_s)
                rec.tat = tat
                self._counts[OPS_TRACK] += 1
                ref = _ref_of(old[_DATA])
                if _same_meta(old[_DATA], ref, blob):
                    return ref.decode()
                return _ref_of(self._replace(rec, old, blob)).decode()
            self._check_connection_quotas(rec, topic)
        t = self._topics.get(topic)
        held = None if t is None else t.keys.get(key)
        if (
            held is not None
            and (1 if type(held) is tuple else len(held)) >= limits.max_metas_per_key
        ):
            self._refuse(conn, "max_metas_per_key", limits.max_metas_per_key)
        # Every check passed: from here on the call changes state and cannot fail.
        evicted = None
        if rec is None:
            rec = _Conn(conn, limits, self._ttl)
            rec.tat = self._admit(rec, now_s)
            evicted = self._insert_conn(rec, now_s)
            if evicted and t is not None:
                # A connection evicted for room may have held this key here.
                held = t.keys.get(key)
        else:
            self._touch(conn, None, now_s)
            rec.tat = tat
        self._counts[OPS_TRACK] += 1
        ref = self._add(rec, t, topic, key, held, blob, shares_key)
        if evicted:
            self._notify_evicted(evicted)  # last: on_evict may call back into the Tracker
        return ref.decode()

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
        now_s = self._clock() if now is None else _check_now(now)
        _check_conn(conn)
        rec: _Conn | None = self._conns.get(conn)
        limits = self._default_limits if rec is None else rec.plan
        _check_text(topic, "topic", limits.max_topic_length)
        _check_key(key, limits.max_key_length)
        blob = _encode_meta(meta, limits)
        old = None
        if rec is not None:
            for p in rec.presences:
                if p[_KEY] == key and p[_TOPIC] == topic:
                    old = p
                    break
        if rec is None or old is None:
            raise NotTracked(f"connection {conn!r} has no presence as {key!r} in {topic!r}")
        tat = self._admit(rec, now_s)
        self._touch(conn, None, now_s)
        rec.tat = tat
        self._counts[OPS_UPDATE] += 1
        ref = _ref_of(old[_DATA])
        if _same_meta(old[_DATA], ref, blob):
            return ref.decode()
        return _ref_of(self._replace(rec, old, blob)).decode()

    def untrack(
        self, conn: ConnId, topic: str, key: str | None = None, *, now: float | None = None
    ) -> int:
        """Remove ``conn``'s presence(s) in ``topic`` (only as ``key`` if given).

        Returns how many presences left; 0 for an unknown connection or topic.  Never rate
        limited: leaving must always be possible, so topic and key are checked against the most
        permissive plan, not the connection's own (which may have shrunk since it tracked).
        """
        now_s = self._now(now)
        _check_conn(conn)
        _check_text(topic, "topic", self._read_topic_limit)
        if key is not None:
            _check_text(key, "key", self._read_key_limit)
        rec: _Conn | None = self._conns.get(conn)
        if rec is None:
            return 0
        self._counts[OPS_UNTRACK] += 1
        self._touch(conn, None, now_s)
        gone = [p for p in rec.presences if p[_TOPIC] == topic and (key is None or p[_KEY] == key)]
        if not gone:
            return 0
        rec.presences = [p for p in rec.presences if not (p[_TOPIC] == topic and p in gone)]
        for p in gone:
            self._remove(p)
        for left_key in {p[_KEY] for p in gone}:
            if not any(p[_KEY] == left_key for p in rec.presences):
                self._user_remove(left_key, rec, now_s, now_s)
        return len(gone)

    def _admit(self, rec: _Conn, now: float) -> float:
        """The token bucket (GCRA): the new arrival time if this write fits, else raise."""
        limits = rec.plan
        interval = 1.0 / limits.rate_per_second
        tat = rec.tat if rec.tat > now else now
        ahead = tat - now
        allowed = (limits.burst - 1) * interval
        # The slack absorbs float rounding of `tat - now` when the clock reads large values.
        if ahead > allowed + interval * 1e-3:
            self._counts[LIMIT_HITS] += 1
            raise RateLimited(rec.id, ahead - allowed)
        return tat + interval

    def _check_connection_quotas(self, rec: _Conn, topic: str) -> None:
        limits = rec.plan
        presences = rec.presences
        if len(presences) >= limits.max_presences_per_connection:
            self._refuse(
                rec.id, "max_presences_per_connection", limits.max_presences_per_connection
            )
        # Counting distinct topics costs a set, so only when the count could reach the quota.
        if len(presences) >= limits.max_topics_per_connection:
            topics = {p[_TOPIC] for p in presences}
            if topic not in topics and len(topics) >= limits.max_topics_per_connection:
                self._refuse(rec.id, "max_topics_per_connection", limits.max_topics_per_connection)

    def _refuse(self, conn: ConnId, limit: str, value: int) -> NoReturn:
        self._counts[LIMIT_HITS] += 1
        raise QuotaExceeded(conn, limit, value)

    def _new_ref(self) -> bytes:
        return self._node + b"%x" % next(self._refs)

    def _add(
        self,
        rec: _Conn,
        t: _Topic | None,
        topic: str,
        key: str,
        held: _Presence | list[_Presence] | None,
        blob: bytes,
        shares_key: bool,
    ) -> bytes:
        """Add a presence whose checks have passed; returns its ref."""
        if t is None:
            t = self._topics[topic] = _Topic(topic)
        ref = self._node + b"%x" % next(self._refs)
        keys = t.keys
        if held is None:
            p = (t.name, key, _encode(ref, blob))
            keys[key] = p
            if len(keys) == 1:
                self._n_topics += 1
            if t.index is not None:
                t.index.add(key)
        elif isinstance(held, tuple):
            # Share the key object already stored: one str per key per topic.
            p = (t.name, held[_KEY], _encode(ref, blob))
            keys[key] = [held, p]
        else:
            p = (t.name, held[0][_KEY], _encode(ref, blob))
            held.append(p)
        t.metas += 1
        rec.presences.append(p)
        if not shares_key:
            users = self._users
            held_by = users.get(key)
            if held_by is None:
                users[key] = rec
            elif type(held_by) is dict:
                held_by[rec] = None
            else:
                users[key] = {held_by: None, rec: None}  # type: ignore[dict-item]
        self._n_presences += 1
        self._data_bytes += len(p[_DATA])
        joins = t.joins
        if joins is None:
            joins = t.joins = {}
        joins[p] = None
        self._dirty[t.name] = t
        return ref

    def _replace(self, rec: _Conn, old: _Presence, blob: bytes) -> bytes:
        topic, key, _ = old
        t = self._topics[topic]
        new = (topic, key, _encode(self._new_ref(), blob))
        held = t.keys[key]
        if held is old:
            t.keys[key] = new
        else:
            # Remove and append, so a key's metas stay in creation order, which is the order a
            # client ends up with after applying the diff (joins are appended there).
            held.remove(old)  # type: ignore[union-attr]
            held.append(new)  # type: ignore[union-attr]
        presences = rec.presences
        presences[presences.index(old)] = new
        self._data_bytes += len(new[_DATA]) - len(old[_DATA])
        prev = self._leave(t, old)
        joins = t.joins
        if joins is None:
            joins = t.joins = {}
        joins[new] = prev
        self._dirty[topic] = t
        return new[_DATA]

    def _remove(self, p: _Presence) -> None:
        """Take ``p`` out of its topic and record the leave (the caller fixes the connection)."""
        topic, key, data = p
        t = self._topics[topic]
        keys = t.keys
        held = keys[key]
        if held is p:
            del keys[key]
            if t.index is not None:
                t.index.remove(key)
            if not keys:
                self._n_topics -= 1
        else:
            held.remove(p)  # type: ignore[union-attr]
            if len(held) == 1:
                keys[key] = held[0]
        t.metas -= 1
        self._n_presences -= 1
        self._data_bytes -= len(data)
        self._leave(t, p)

    def _leave(self, t: _Topic, p: _Presence) -> bytes | None:
        """Record that ``p`` left; returns the ref a replacing join should name as its prev.

        A presence whose join has not been flushed yet simply vanishes from the pending diff:
        subscribers never heard of it, so a leave would name a ref (maybe a key) they do not
        hold.  Its own prev (if it replaced a flushed presence) passes to its replacement.
        """
        joins = t.joins
        if joins is not None and p in joins:
            return joins.pop(p)
        leaves = t.leaves
        if leaves is None:
            leaves = t.leaves = {}
        leaves[p] = None
        self._dirty[t.name] = t
        return _ref_of(p[_DATA])

    def _user_remove(self, key: str, rec: _Conn, seen_at: float, now: float) -> None:
        users = self._users
        held_by = users.get(key)
        if held_by is rec:
            del users[key]
            seen = self._seen
            full = len(seen) >= seen.capacity
            seen.upsert(key, seen_at, self._seen_ttl, now)
            if full:
                self._counts[LAST_SEEN_EVICTIONS] += len(seen.drain_evicted())
        elif type(held_by) is dict:
            del held_by[rec]
            if len(held_by) == 1:
                users[key] = next(iter(held_by))

    # -- reads -------------------------------------------------------------------------------

    def _topic_of(self, topic: object) -> _Topic | None:
        return self._topics.get(_check_text(topic, "topic", self._read_topic_limit))

    def count(self, topic: str, *, metas: bool = False) -> int:
        """Keys present in ``topic`` (or, with ``metas=True``, presences).  O(1)."""
        t = self._topic_of(topic)
        if t is None:
            return 0
        return t.metas if metas else len(t.keys)

    def totals(self) -> Totals:
        """Presences, connections, topics with a presence, and distinct keys.  O(1)."""
        return Totals(self._n_presences, len(self._conns), self._n_topics, len(self._users))

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
        return _loads(_state_json((key, _datas(held)) for key, held in t.keys.items()))  # type: ignore[no-any-return]

    def initial_state(self, topic: str) -> dict[str, Any]:
        """The ``presence_state`` to send a subscriber that starts following ``topic`` now.

        This is the state as of the last `flush` (unflushed joins left out, unflushed leaves
        still in), so that the next ``presence_diff`` applies to it exactly: it never joins a
        ref twice or leaves a key the subscriber does not hold.
        """
        return _loads(self.initial_state_json(topic))  # type: ignore[no-any-return]

    def initial_state_json(self, topic: str) -> bytes:
        """`initial_state` as JSON bytes, for a transport that writes frames without parsing."""
        t = self._topic_of(topic)
        if t is None:
            return b"{}"
        joins = t.joins or {}
        groups: dict[str, list[bytes]] = {}
        for key, held in t.keys.items():
            datas = [p[_DATA] for p in _presences(held) if p not in joins]
            if datas:
                groups[key] = datas
        if t.leaves:
            for p in t.leaves:
                group = groups.get(p[_KEY])
                if group is None:
                    groups[p[_KEY]] = [p[_DATA]]
                else:
                    # Its position does not matter: the next diff removes it.
                    group.append(p[_DATA])
        return _state_json(groups.items())

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
            raise PresenceTypeError(f"cursor must be a str or None, not {_type_name(cursor)}")
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise PresenceTypeError(f"limit must be an int, not {_type_name(limit)}")
        if limit < 1:
            raise PresenceValueError(f"limit must be >= 1, got {limit}")
        if t is None or not t.keys:
            return {}, None
        keys = t.keys
        if t.index is None and len(keys) > _INDEX_THRESHOLD:
            t.index = _SortedKeys(keys)
        if t.index is not None:
            chosen = t.index.after(cursor, limit + 1)
        else:
            candidates = keys if cursor is None else [k for k in keys if k > cursor]
            chosen = sorted(candidates)[: limit + 1]
        more = len(chosen) > limit
        chosen = chosen[:limit]
        state = _loads(_state_json((key, _datas(keys[key])) for key in chosen))
        return state, (chosen[-1] if more else None)

    def connection_presences(self, conn: ConnId) -> builtins.list[tuple[str, str, str]]:
        """``(topic, key, ref)`` of every presence ``conn`` holds; empty if it is unknown."""
        _check_conn(conn)
        rec = self._conns.get(conn)
        if rec is None:
            return []
        return [(p[_TOPIC], p[_KEY], _ref_of(p[_DATA]).decode()) for p in rec.presences]

    def connected(self, conn: ConnId) -> bool:
        """Whether ``conn`` is a live connection."""
        return _check_conn(conn) in self._conns

    # -- users -------------------------------------------------------------------------------

    def user(self, key: str, *, now: float | None = None) -> UserStatus:
        """``key``'s status across every topic and connection (see `UserStatus` for the rule)."""
        _check_text(key, "key", self._read_key_limit)
        self._check_now_arg(now)
        status = self._user(key)
        self._metrics.inc(STATUS_READS)
        if status.last_seen is not None:
            self._metrics.inc(STATUS_READ_HITS)
        return status

    def users(self, keys: Iterable[str], *, now: float | None = None) -> dict[str, UserStatus]:
        """`user` for many keys at once (a team view: 10-500), in the order given."""
        if isinstance(keys, (str, bytes, bytearray)):
            raise PresenceTypeError(f"keys must be an iterable of str, not a {_type_name(keys)}")
        try:
            items = iter(keys)
        except TypeError:
            raise PresenceTypeError(
                f"keys must be an iterable of str, not {_type_name(keys)}"
            ) from None
        # One more than allowed is enough to refuse: an endless iterable must not hang.
        wanted = builtins.list(islice(items, _MAX_BULK_KEYS + 1))
        if len(wanted) > _MAX_BULK_KEYS:
            raise PresenceValueError(
                f"users() takes at most {_MAX_BULK_KEYS} keys per call, got {len(wanted)}"
            )
        limit = self._read_key_limit
        for key in wanted:
            _check_text(key, "key", limit)
        self._check_now_arg(now)
        out = {key: self._user(key) for key in wanted}
        self._metrics.inc(STATUS_READS, len(out))
        hits = sum(1 for status in out.values() if status.last_seen is not None)
        if hits:
            self._metrics.inc(STATUS_READ_HITS, hits)
        return out

    def _check_now_arg(self, now: object) -> None:
        # Reads take `now` for symmetry (a Redis tier will age cached answers by it).
        if now is not None:
            _check_now(now)

    def _user(self, key: str) -> UserStatus:
        held_by = self._users.get(key)
        if held_by is None:
            seen = self._seen.get(key)
            return UserStatus(key, OFFLINE, last_seen=seen)
        conns: Iterable[_Conn]
        if isinstance(held_by, dict):
            conns = held_by
            n_conns = len(held_by)
        else:
            conns = (held_by,)
            n_conns = 1
        presences: list[tuple[int, _Presence]] = []
        last_active = _NEG_INF
        deadline = self._conns.deadline
        for rec in conns:
            for p in rec.presences:
                if p[_KEY] == key:
                    ref = _ref_of(p[_DATA])
                    presences.append((int(ref[ref.rindex(b".") + 1 :], 16), p))
            last_active = max(last_active, deadline(rec.id, _NEG_INF) - rec.ttl)
        presences.sort(key=_first)
        rank = len(STATUS_ORDER)
        custom: str | None = None
        devices: dict[str, None] = {}
        for _, p in presences:
            meta = _loads(p[_DATA])
            status = meta.get("status")
            rank = min(rank, _STATUS_RANK.get(status, 0) if isinstance(status, str) else 0)
            device = meta.get("device")
            if isinstance(device, str):
                devices[device] = None
            text = meta.get("custom_status")
            if isinstance(text, str):
                custom = text  # later presences are newer
        return UserStatus(
            key,
            STATUS_ORDER[rank],
            custom,
            tuple(devices),
            tuple(sorted({p[_TOPIC] for _, p in presences})),
            n_conns,
            len(presences),
            last_active,
            last_active,
        )

    def last_seen(self, key: str) -> float | None:
        """When ``key`` was last seen: now-ish while online, else when it went offline.

        None if the user was never seen or has been forgotten (LRU capacity or TTL).
        """
        _check_text(key, "key", self._read_key_limit)
        return self._user(key).last_seen

    def drain_last_seen(self, limit: int | None = None) -> builtins.list[tuple[str, Any]]:
        """Changed last-seen entries since the last drain, for a store to persist.

        ``(key, seconds)`` or ``(key, TOMBSTONE)``.  Needs ``record_last_seen_changes=True``;
        otherwise always empty.
        """
        try:
            return self._seen.drain_dirty(limit)
        except TypeError as exc:
            raise PresenceTypeError(str(exc)) from None
        except ValueError as exc:
            raise PresenceValueError(str(exc)) from None

    # -- delivery ----------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        callback: Transport | RawTransport,
        *,
        send_state: bool = True,
        raw: bool = False,
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
        """
        _check_text(topic, "topic", self._read_topic_limit)
        _check_callable(callback, "callback")
        t = self._topics.get(topic)
        if t is None:
            t = self._topics[topic] = _Topic(topic)
        subscribers = t.subscribers
        if subscribers is None:
            subscribers = t.subscribers = {}
        entry = _new_hook(callback, raw)
        token = id(entry)  # unique while the entry lives, and the closure keeps it alive
        subscribers[token] = entry
        t.hooks = None

        def unsubscribe() -> None:
            if not _disable_hook(entry):
                return
            del subscribers[token]
            t.hooks = None
            if (
                not subscribers
                and not t.keys
                and t.name not in self._dirty
                and self._topics.get(t.name) is t
            ):
                del self._topics[t.name]

        if send_state:
            state = self.initial_state_json(topic)
            try:
                callback(topic, PRESENCE_STATE, state if raw else _loads(state))  # type: ignore[arg-type]
            except BaseException:
                unsubscribe()
                raise
        return unsubscribe

    def add_transport(
        self, transport: Transport | RawTransport, *, raw: bool = False
    ) -> Callable[[], None]:
        """Deliver every topic's diffs to ``transport``; returns a function that removes it.

        A transport follows all topics, so the host sends each new client its starting state
        itself, with `send_state` (or `initial_state`).  ``raw`` as in `subscribe`.
        """
        _check_callable(transport, "transport")
        entry = _new_hook(transport, raw)
        self._transports += (entry,)

        def remove() -> None:
            if _disable_hook(entry):
                self._transports = tuple(h for h in self._transports if h is not entry)

        return remove

    def send_state(
        self, topic: str, transport: Transport | RawTransport, *, raw: bool = False
    ) -> None:
        """Send ``transport`` the ``presence_state`` of ``topic`` for a client starting now."""
        _check_callable(transport, "transport")
        state = self.initial_state_json(topic)
        transport(topic, PRESENCE_STATE, state if raw else _loads(state))  # type: ignore[arg-type]

    def pending(self) -> int:
        """Topics with changes waiting for the next `flush`."""
        return len(self._dirty)

    def flush(self) -> int:
        """Deliver each changed topic's coalesced ``presence_diff``; returns how many topics.

        Topics with no subscriber (and no transport attached) have their pending changes
        dropped without encoding them and are not counted.

        Every subscriber of the topic and every transport gets its own copy (raw hooks share
        the immutable JSON bytes).  A hook that raises is logged and counted (``hook_errors``)
        and the others still get theirs.  Changes made by hooks while they run go out with the
        next flush, and so do those of a `flush` called by a hook (itself or through `tick`):
        it returns 0 at once, because delivering then would hand the hooks not yet called the
        newer diff before the one under way.  A hook removed during the flush is not called
        after its removal.  The time from this call to each topic's last delivery is recorded
        in ``diff_propagation_seconds``.
        """
        if self._flushing:
            return 0
        dirty = self._dirty
        if not dirty:
            self.sync_metrics()
            return 0
        self._flushing = True
        try:
            delivered = self._deliver(dirty)
        finally:
            self._flushing = False
        self.sync_metrics()
        return delivered

    def _deliver(self, dirty: dict[str, _Topic]) -> int:
        start = _perf_counter()
        self._dirty = {}
        topics = self._topics
        transports = self._transports
        batch: builtins.list[tuple[str, bytes, tuple[_Hook, ...]]] = []
        for name, t in dirty.items():
            if t.subscribers or transports:
                blob = self._take_diff(t)
            else:
                # Nobody to tell: drop the pending changes without encoding them (a service
                # that only reads state would otherwise encode every change for nothing).
                t.joins = t.leaves = None
                blob = None
            if not t.keys and not t.subscribers and topics.get(name) is t:
                del topics[name]
            if blob is not None:
                batch.append((name, blob, t.subscribed()))
        latencies: builtins.list[float] = []
        errors = 0
        for name, blob, subscribers in batch:
            for hook, raw in subscribers + transports if transports else subscribers:
                try:
                    # A fresh dict per hook: a client library may mutate what it is given.
                    hook(name, PRESENCE_DIFF, blob if raw else _loads(blob))
                except Exception:
                    errors += 1
                    logger.exception("presence hook %r failed for topic %r", hook, name)
            latencies.append(_perf_counter() - start)
        self._counts[HOOK_ERRORS] += errors
        # Recorded after every delivery: a metrics sink that fails must not cost anyone a diff.
        observe = self._metrics.observe
        try:
            for latency in latencies:
                observe(DIFF_PROPAGATION_SECONDS, latency)
        except Exception:
            self._counts[HOOK_ERRORS] += 1
            logger.exception("metrics sink %r failed", self._metrics)
        return len(batch)

    @staticmethod
    def _take_diff(t: _Topic) -> bytes | None:
        joins, leaves = t.joins, t.leaves
        t.joins = t.leaves = None
        if not joins and not leaves:
            return None
        joined: dict[str, list[bytes]] = {}
        if joins:
            for p, prev in joins.items():
                data = p[_DATA] if prev is None else _with_prev(p[_DATA], prev)
                datas = joined.get(p[_KEY])
                if datas is None:
                    joined[p[_KEY]] = [data]
                else:
                    datas.append(data)
        left: dict[str, list[bytes]] = {}
        if leaves:
            for p in leaves:
                datas = left.get(p[_KEY])
                if datas is None:
                    left[p[_KEY]] = [p[_DATA]]
                else:
                    datas.append(p[_DATA])
        return (
            b'{"joins":'
            + _state_json(joined.items())
            + b',"leaves":'
            + _state_json(left.items())
            + b"}"
        )

    # -- metrics and scaling -----------------------------------------------------------------

    def sync_metrics(self) -> None:
        """Publish counters and gauges to the metrics sink (`flush` does it every time)."""
        counts = self._counts
        counts[OPS_HEARTBEAT] = self._n_heartbeat
        synced = self._synced
        inc = self._metrics.inc
        for name in _COUNTER_NAMES:
            delta = counts[name] - synced[name]
            if delta:
                inc(name, delta)
                synced[name] = counts[name]
        gauge = self._metrics.set
        gauge(PRESENCES, self._n_presences)
        gauge(CONNECTIONS, len(self._conns))
        gauge(TOPICS, self._n_topics)

    def memory_estimate(self) -> int:
        """Approximate bytes held for presences, connections and topics (for scalers).

        Counted from sizes that are known exactly (the encoded metas) plus fixed per-object
        costs measured on CPython 3.11; it is an estimate, not a walk of the heap.
        """
        conns = len(self._conns)
        return (
            self._data_bytes
            + self._n_presences * 150  # bytes header, tuple, list and dict slots
            + conns * 200  # record, list, table entry and index
            + len(self._users) * 40
            + len(self._topics) * 250
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
            raise PresenceTypeError(f"wall_time must be a datetime, not {_type_name(wall_time)}")
        if memory_bytes is not None:
            if not isinstance(memory_bytes, int) or isinstance(memory_bytes, bool):
                raise PresenceTypeError(
                    f"memory_bytes must be an int, not {_type_name(memory_bytes)}"
                )
            if memory_bytes < 0:
                raise PresenceValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
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

    def add_scaler(self, scaler: Scaler) -> None:
        """Consult ``scaler`` in `run_scalers` from now on."""
        _check_callable(scaler, "scaler")
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
            raise PresenceTypeError(f"sample must be a LoadSample, not {_type_name(sample)}")
        elif now is not None:
            _check_now(now)
        decisions: builtins.list[ScaleDecision] = []
        for scaler in self._scalers:
            try:
                decision = scaler(sample)
            except Exception:
                self._counts[HOOK_ERRORS] += 1
                logger.exception("scaler %r failed", scaler)
                continue
            if isinstance(decision, ScaleDecision):
                decisions.append(decision)
            elif decision is not None:
                self._counts[HOOK_ERRORS] += 1
                logger.error("scaler %r answered %r, not a ScaleDecision", scaler, decision)
        return decisions

    def __repr__(self) -> str:
        totals = self.totals()
        return (
            f"<Tracker node={self.node!r} presences={totals.presences} "
            f"connections={totals.connections} topics={totals.topics} keys={totals.keys}>"
        )


def _first(item: tuple[int, _Presence]) -> int:
    return item[0]
