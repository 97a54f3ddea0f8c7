"""The pure-Python presence table: the reference twin of the Cython one in `_fast.pyx`.

Both implementations keep the same three orders and make the same choices at every step, so
any sequence of calls gives identical results, including the order of `expire()`,
`drain_dirty()`, `drain_evicted()` and iteration.  The test suite checks that with a hypothesis
state machine.  Where the native table uses intrusive linked lists, this one uses insertion-
ordered dicts, which have the same "append at the end, remove from anywhere, iterate from the
front" behaviour, and a deque for the change queue, which is only ever taken from the front.

How entries move
----------------
* **Recency (LRU).** Exact order of last write or touch.  `upsert` and `touch` make an entry the
  most recent; `get`, `deadline` and `in` do not.  A new key in a full table evicts the least
  recent live entry first; evictions are collected for `drain_evicted()`, never dropped.
* **Deadlines (timing wheel).** Four levels of 256 buckets over integer ticks
  (`floor(seconds / tick)`).  An entry sits at the lowest level whose 256-bucket window, counted
  from the wheel's current tick, reaches its deadline tick; beyond the top window it sits in the
  top level's furthest bucket and is looked at again when that bucket comes round.  Extending a
  deadline (a heartbeat) leaves the entry where it is: when its bucket comes due, an entry whose
  deadline has moved is placed again, the rest expire.  Shortening a deadline reschedules at once,
  so a bucket never comes due after the deadline of an entry in it.  Entries whose deadline tick
  is not after the current tick wait in a short *pending* list that every `expire()` checks
  exactly.  So `expire(now)` removes exactly the entries whose deadline is `<= now`, at a cost of
  the buckets crossed plus the entries looked at, never a scan of the table.
* **Changes (dirty list).** An insert, an update, a removal, an expiry or an eviction puts the key
  on the dirty list once; later changes leave it where it is.  `drain_dirty()` reports each such
  key once with its current value, or `TOMBSTONE` if it is gone.  `touch` is not a change: a
  heartbeat moves only the deadline, which the store refreshes on its own schedule.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from ._common import (
    DEFAULT_TICK,
    TOMBSTONE,
    WHEEL_BITS,
    WHEEL_LEVELS,
    WHEEL_SIZE,
    check_capacity,
    check_limit,
    check_now,
    check_tick,
    check_ttl,
    time_to_tick,
)

__all__ = ["PresenceTable"]

K = TypeVar("K")
V = TypeVar("V")

_PENDING = WHEEL_LEVELS * WHEEL_SIZE  # bucket number of the pending list
_MASK = WHEEL_SIZE - 1
_TOP = WHEEL_LEVELS - 1

# Entry layout: a small list is the cheapest mutable record in pure Python.
_VALUE, _DEADLINE, _TTL, _BUCKET = 0, 1, 2, 3


def _check_clock(clock: object) -> Callable[[], float]:
    if clock is None:
        return time.monotonic
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, not {type(clock).__name__}")
    return clock


class PresenceTable(Generic[K, V]):
    """A bounded map of live entries with a deadline each, an LRU order and a change log.

    `capacity` bounds the number of live entries; `tick` is the wheel's resolution in
    seconds (1 ms to 60 s); `clock` returns seconds and is used whenever a call's `now` is
    omitted (default `time.monotonic`); with `track_dirty=False` no change log is kept and
    `drain_dirty()` always returns an empty list.
    """

    __slots__ = (
        "_capacity",
        "_tick",
        "_clock",
        "_track_dirty",
        "_lru",
        "_buckets",
        "_current",
        "_dirty",
        "_dirty_order",
        "_evicted",
        "_version",
        "_counts",
        "__weakref__",
    )

    def __init__(
        self,
        capacity: int,
        *,
        tick: float = DEFAULT_TICK,
        clock: Callable[[], float] | None = None,
        track_dirty: bool = True,
    ) -> None:
        self._capacity = check_capacity(capacity)
        self._tick = check_tick(tick)
        self._clock = _check_clock(clock)
        self._track_dirty = bool(track_dirty)
        self._lru: OrderedDict[Any, list[Any]] = OrderedDict()  # last = most recent
        self._buckets: list[dict[Any, None]] = [{} for _ in range(_PENDING + 1)]
        self._current: int | None = None  # the wheel's tick; set by the first timed call
        # The change queue: a set for "already queued?" and a deque for the order.  (An
        # insertion-ordered dict would do both, but taking from its front after deletions
        # rescans the deleted slots, which makes draining quadratic.)
        self._dirty: set[Any] = set()
        self._dirty_order: deque[Any] = deque()
        self._evicted: list[tuple[Any, Any]] = []
        self._version = 0
        # inserts, updates, touches, removals, expirations, evictions
        self._counts = [0, 0, 0, 0, 0, 0]

    # -- properties -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most live entries the table holds before it evicts."""
        return self._capacity

    @property
    def tick(self) -> float:
        """The timing wheel's resolution in seconds."""
        return self._tick

    # -- time and wheel ---------------------------------------------------------------------

    def _now(self, now: object) -> float:
        if now is None:
            return check_now(self._clock())
        return check_now(now)

    def _schedule(self, key: Any, entry: list[Any], now: float) -> None:
        if self._current is None:
            self._current = time_to_tick(now, self._tick)
        current = self._current
        due = time_to_tick(entry[_DEADLINE], self._tick)
        if due <= current:
            bucket = _PENDING
        else:
            for level in range(WHEEL_LEVELS):
                shift = level * WHEEL_BITS
                if (due >> shift) - (current >> shift) < WHEEL_SIZE:
                    bucket = level * WHEEL_SIZE + ((due >> shift) & _MASK)
                    break
            else:
                # Beyond the top window: park in the furthest top bucket, placed again then.
                shift = _TOP * WHEEL_BITS
                bucket = _TOP * WHEEL_SIZE + (((current >> shift) + _MASK) & _MASK)
        entry[_BUCKET] = bucket
        self._buckets[bucket][key] = None

    def _unschedule(self, key: Any, entry: list[Any]) -> None:
        del self._buckets[entry[_BUCKET]][key]

    def _set_deadline(self, key: Any, entry: list[Any], deadline: float, now: float) -> None:
        # Later deadline: stay in the bucket (found again when it comes due).  Earlier: move now.
        earlier = deadline < entry[_DEADLINE]
        entry[_DEADLINE] = deadline
        if earlier:
            self._unschedule(key, entry)
            self._schedule(key, entry, now)

    # -- removal helpers --------------------------------------------------------------------

    def _mark_dirty(self, key: Any) -> None:
        if self._track_dirty and key not in self._dirty:
            self._dirty.add(key)
            self._dirty_order.append(key)

    def _remove(self, key: Any) -> list[Any]:
        entry = self._lru.pop(key)
        self._unschedule(key, entry)
        self._mark_dirty(key)
        self._version += 1
        return entry

    def _evict_one(self) -> None:
        key = next(iter(self._lru))
        entry = self._remove(key)
        self._evicted.append((key, entry[_VALUE]))
        self._counts[5] += 1

    # -- writes -----------------------------------------------------------------------------

    def _upsert(self, key: Any, value: Any, ttl: float, now: float) -> bool:
        entry = self._lru.get(key)
        deadline = now + ttl
        self._version += 1
        if entry is not None:
            entry[_VALUE] = value
            entry[_TTL] = ttl
            self._lru.move_to_end(key)
            self._set_deadline(key, entry, deadline, now)
            self._mark_dirty(key)
            self._counts[1] += 1
            return False
        if len(self._lru) >= self._capacity:
            self._evict_one()
        entry = [value, deadline, ttl, 0]
        self._lru[key] = entry
        self._schedule(key, entry, now)
        self._mark_dirty(key)
        self._counts[0] += 1
        return True

    def upsert(self, key: K, value: V, ttl: float, now: float | None = None) -> bool:
        """Insert or replace `key` with `value`, live for `ttl` seconds from `now`.

        Makes the entry the most recent and marks it changed.  Returns True if `key` was not
        live before.  Inserting into a full table evicts the least recent entry first (see
        `drain_evicted`).
        """
        ttl_s = check_ttl(ttl)
        now_s = self._now(now)
        hash(key)
        return self._upsert(key, value, ttl_s, now_s)

    def upsert_many(
        self, items: Iterable[tuple[K, V]], ttl: float, now: float | None = None
    ) -> int:
        """`upsert` every `(key, value)` pair in order, with one `ttl` and `now`.

        Every pair and every key's hash is checked before anything changes.  Returns how
        many keys were new.
        """
        ttl_s = check_ttl(ttl)
        now_s = self._now(now)
        pairs = _pairs(items)
        for key, _ in pairs:
            hash(key)
        added = 0
        for key, value in pairs:
            added += self._upsert(key, value, ttl_s, now_s)
        return added

    def touch(self, key: K, ttl: float | None = None, now: float | None = None) -> bool:
        """Refresh `key`: deadline `now + ttl` (its last ttl if omitted), most recent.

        A heartbeat: the value is unchanged and the entry is not marked changed.  Returns
        False if `key` is not live.
        """
        ttl_s = None if ttl is None else check_ttl(ttl)
        now_s = self._now(now)
        entry = self._lru.get(key)
        if entry is None:
            return False
        self._touch(key, entry, ttl_s, now_s)
        return True

    def _touch(self, key: Any, entry: list[Any], ttl: float | None, now: float) -> None:
        if ttl is not None:
            entry[_TTL] = ttl
        self._lru.move_to_end(key)
        self._set_deadline(key, entry, now + entry[_TTL], now)
        self._version += 1
        self._counts[2] += 1

    def touch_many(
        self, keys: Iterable[K], ttl: float | None = None, now: float | None = None
    ) -> int:
        """`touch` every key in order; returns how many were live.

        Every key is hashed and looked up before anything changes.
        """
        ttl_s = None if ttl is None else check_ttl(ttl)
        now_s = self._now(now)
        keys = keys if isinstance(keys, (list, tuple)) else list(keys)
        lru = self._lru
        found = [(key, lru.get(key)) for key in keys]
        touched = 0
        for key, entry in found:
            if entry is not None:
                self._touch(key, entry, ttl_s, now_s)
                touched += 1
        return touched

    def pop(self, key: K, default: Any = None) -> Any:
        """Remove `key` and return its value, or `default` if it is not live."""
        if key not in self._lru:
            return default
        entry = self._remove(key)
        self._counts[3] += 1
        return entry[_VALUE]

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: K, default: Any = None) -> Any:
        """The value of `key`, or `default`.  Does not change recency."""
        entry = self._lru.get(key)
        return default if entry is None else entry[_VALUE]

    def deadline(self, key: K, default: Any = None) -> Any:
        """The deadline (seconds, on the table's clock) of `key`, or `default`."""
        entry = self._lru.get(key)
        return default if entry is None else entry[_DEADLINE]

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def __iter__(self) -> Iterator[K]:
        """Live keys, most recent first.  Changing the table while iterating raises."""
        version = self._version
        for key in reversed(self._lru):
            yield key
            if self._version != version:
                raise RuntimeError("PresenceTable changed during iteration")

    # -- expiry, changes, evictions ---------------------------------------------------------

    def expire(self, now: float | None = None) -> list[tuple[K, V]]:
        """Remove and return, as `(key, value)` pairs, every entry whose deadline is `<= now`."""
        now_s = self._now(now)
        target = time_to_tick(now_s, self._tick)
        expired: list[tuple[Any, Any]] = []
        current = self._current
        if current is None:
            self._current = target
            return expired
        if target > current:
            due = self._collect(current, target)
            self._current = current = target
            for key in due:
                entry = self._lru[key]
                if entry[_DEADLINE] <= now_s:
                    self._expire_one(key, expired)
                else:
                    self._schedule(key, entry, now_s)
        pending = self._buckets[_PENDING]
        if pending:
            for key in list(pending):
                entry = self._lru[key]
                if entry[_DEADLINE] <= now_s:
                    self._expire_one(key, expired)
                elif time_to_tick(entry[_DEADLINE], self._tick) > current:
                    del pending[key]
                    self._schedule(key, entry, now_s)
        return expired

    def _collect(self, current: int, target: int) -> list[Any]:
        # Take every bucket whose span the wheel crosses moving from `current` to `target`.
        due: list[Any] = []
        for level in range(WHEEL_LEVELS):
            shift = level * WHEEL_BITS
            first = (current >> shift) + 1
            last = target >> shift
            if last < first:
                break
            for t in range(first, min(last, first + _MASK) + 1):
                bucket = self._buckets[level * WHEEL_SIZE + (t & _MASK)]
                if bucket:
                    due.extend(bucket)
                    bucket.clear()
        return due

    def _expire_one(self, key: Any, expired: list[tuple[Any, Any]]) -> None:
        entry = self._lru.pop(key)
        # A key collected from a wheel bucket is already out of it; one from pending is not.
        self._buckets[entry[_BUCKET]].pop(key, None)
        self._mark_dirty(key)
        self._version += 1
        self._counts[4] += 1
        expired.append((key, entry[_VALUE]))

    def drain_dirty(self, limit: int | None = None) -> list[tuple[K, Any]]:
        """Take up to `limit` changed keys (all if None), oldest change first.

        Each comes once as `(key, value)` with its current value, or `(key, TOMBSTONE)` if it
        was removed, expired or evicted since the last drain.
        """
        count = len(self._dirty) if limit is None else check_limit(limit)
        out: list[tuple[Any, Any]] = []
        dirty, order, lru = self._dirty, self._dirty_order, self._lru
        for _ in range(min(count, len(order))):
            key = order.popleft()
            dirty.remove(key)
            entry = lru.get(key)
            out.append((key, TOMBSTONE if entry is None else entry[_VALUE]))
        return out

    def drain_evicted(self) -> list[tuple[K, V]]:
        """Take the `(key, value)` pairs evicted by capacity since the last call, oldest first."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def stats(self) -> dict[str, Any]:
        """Sizes and counters of this table (a new dict each call)."""
        inserts, updates, touches, removals, expirations, evictions = self._counts
        tombstones = sum(1 for key in self._dirty if key not in self._lru)
        return {
            "implementation": "python",
            "len": len(self._lru),
            "capacity": self._capacity,
            "tick": self._tick,
            "dirty": len(self._dirty),
            "tombstones": tombstones,
            "pending": len(self._buckets[_PENDING]),
            "evicted_undrained": len(self._evicted),
            "inserts": inserts,
            "updates": updates,
            "touches": touches,
            "removals": removals,
            "expirations": expirations,
            "evictions": evictions,
            "memory_bytes": _sizeof(self),
        }

    def __repr__(self) -> str:
        return f"<PresenceTable len={len(self._lru)} capacity={self._capacity} (python)>"

    def __reduce__(self) -> Any:
        raise TypeError("PresenceTable cannot be pickled")

    def check_invariants(self) -> None:
        """Walk every structure and raise AssertionError on the first inconsistency (O(n))."""
        on_wheel = 0
        for number, bucket in enumerate(self._buckets):
            for key in bucket:
                assert key in self._lru, "dead entry on the wheel"
                assert self._lru[key][_BUCKET] == number, "bucket number"
                on_wheel += 1
        assert on_wheel == len(self._lru), f"wheel holds {on_wheel}, len is {len(self._lru)}"
        assert self._track_dirty or not self._dirty, "dirty keys while not tracking"
        assert len(self._dirty) == len(self._dirty_order), "dirty queue and set differ"


def _pairs(items: Iterable[Any]) -> list[tuple[Any, Any]]:
    pairs = []
    for item in items:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError(f"items must be (key, value) tuples, got {_describe(item)}")
        pairs.append(item)
    return pairs


def _describe(item: object) -> str:
    if isinstance(item, tuple):
        return f"a tuple of length {len(item)}"
    return f"{type(item).__name__}"


def _sizeof(table: PresenceTable[Any, Any]) -> int:
    # Containers only (not keys or values), so it compares with the native table's arrays.
    size = sys.getsizeof(table._lru) + sys.getsizeof(table._dirty) + sys.getsizeof(table._evicted)
    size += sys.getsizeof(table._dirty_order)
    size += sum(sys.getsizeof(entry) for entry in table._lru.values())
    size += sum(sys.getsizeof(bucket) for bucket in table._buckets)
    return size
