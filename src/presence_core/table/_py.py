"""The pure-Python presence table: the reference twin of the Cython one in `_fast.pyx`.

Both implementations keep the same three orders and make the same choices at every step, so
any sequence of calls gives identical results, including the order of `expire()`,
`drain_dirty()`, `drain_evicted()` and iteration.  The test suite checks that with a hypothesis
state machine.  Where the native table uses intrusive linked lists, this one uses insertion-
ordered dicts, which have the same "append at the end, remove from anywhere, iterate from the
front" behaviour, and a deque for the change queue, which is only ever taken from the front.
Every structure holds the entry's own key object (`entry[_KEY]`), never the one a call passed in.

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
* **Time going backwards.**  The wheel's current tick only moves forward with `expire()`.  If the
  clock steps back (an NTP step under `clock=time.time`, or a caller's `now` from another
  source), writes made at the earlier time whose deadline tick is not after the current tick
  wait on the pending list.  When `expire(now)` finds `now` more than `REBASE_TICKS` (16) ticks
  behind the current tick, it first moves the wheel back: the current tick becomes `now`'s and
  every entry is placed again from its real deadline, buckets in number order, then the pending
  list, each in its list order.  That costs O(n) once per step back, after which `expire()`
  costs what it did before the step.  A smaller step back is left alone: only entries due
  within it can wait on the pending list, and they expire within it.  Either way `expire(now)`
  still removes exactly the entries whose deadline is `<= now`.  `stats()` counts the entries
  `expire()` looked at (`expire_examined`: collected from due buckets, on the pending list, or
  placed again by a move back) and the moves back (`wheel_rebases`).
* **Changes (dirty list).** An insert, an update, a removal, an expiry or an eviction puts the key
  on the dirty list once; later changes leave it where it is.  `drain_dirty()` reports each such
  key once with its current value, or `TOMBSTONE` if it is gone.  `touch` is not a change: a
  heartbeat moves only the deadline, which the store refreshes on its own schedule.
* **Key objects.** Of equal keys (`1`, `1.0`, `True`), the table keeps the object it was first
  given, as a dict does, and returns that one everywhere: iteration, `expire()`, `drain_dirty()`,
  `drain_evicted()`.  A key removed and given again before the next `drain_dirty()` comes back
  as the same entry, so it keeps its first key object too.
* **Re-entrancy.** A replaced value is released only when the entry is consistent again, at the
  end of the call, so its `__del__` may use the table.  A key's `__eq__` may change the table
  while `touch_many` looks keys up; an entry it removed is then not touched.
* **The garbage collector.**  `expire()`, `drain_dirty()` and `upsert_many()` (whose evictions
  `drain_evicted()` returns) may each make a tuple per entry, a million at once.  Each new
  tracked object counts towards the next collection, and a million of them set off several
  full collections in the middle of the call, each traversing every key and value the table
  holds.  So these calls pause the collector while they run and restore its previous state
  (enabled or not) before they return, also when they raise.  The objects they made are
  counted by the next collection as usual.
"""

from __future__ import annotations

import gc
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar, overload

from ..errors import PresenceTypeError
from ._common import (
    DEFAULT_TICK,
    REBASE_TICKS,
    TOMBSTONE,
    WHEEL_BITS,
    WHEEL_LEVELS,
    WHEEL_SIZE,
    Tombstone,
    check_capacity,
    check_limit,
    check_now,
    check_tick,
    check_ttl,
    describe,
    time_to_tick,
)

__all__ = ["PresenceTable"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")  # the type of a `default` argument

_PENDING = WHEEL_LEVELS * WHEEL_SIZE  # bucket number of the pending list
_MASK = WHEEL_SIZE - 1
_TOP = WHEEL_LEVELS - 1

# Entry layout: a small list is the cheapest mutable record in pure Python.  A removed entry
# whose key is still queued for `drain_dirty()` is kept (value None, bucket _DEAD) in `_dirty`,
# like the native table's removed-but-undrained slot: a key that comes back reuses it.
_VALUE, _DEADLINE, _TTL, _BUCKET, _KEY = 0, 1, 2, 3, 4
_DEAD = -1


def _check_clock(clock: object) -> Callable[[], float]:
    if clock is None:
        return time.monotonic
    if not callable(clock):
        raise PresenceTypeError(
            f"clock must be a callable returning seconds, not {type(clock).__name__}"
        )
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
        self._buckets: list[dict[Any, list[Any]]] = [{} for _ in range(_PENDING + 1)]
        self._current: int | None = None  # the wheel's tick; set by the first timed call
        # The change queue: a dict key -> entry for "already queued?" and a deque for the order.
        # (An insertion-ordered dict would do both, but taking from its front after deletions
        # rescans the deleted slots, which makes draining quadratic.)
        self._dirty: dict[Any, list[Any]] = {}
        self._dirty_order: deque[Any] = deque()
        self._evicted: list[tuple[Any, Any]] = []
        self._version = 0
        # inserts, updates, touches, removals, expirations, evictions, expire_examined,
        # wheel_rebases
        self._counts = [0, 0, 0, 0, 0, 0, 0, 0]

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

    def _schedule(self, entry: list[Any], now: float) -> None:
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
        self._buckets[bucket][entry[_KEY]] = entry

    def _unschedule(self, entry: list[Any]) -> None:
        del self._buckets[entry[_BUCKET]][entry[_KEY]]

    def _set_deadline(self, entry: list[Any], deadline: float, now: float) -> None:
        # Later deadline: stay in the bucket (found again when it comes due).  Earlier: move now.
        earlier = deadline < entry[_DEADLINE]
        entry[_DEADLINE] = deadline
        if earlier:
            self._unschedule(entry)
            self._schedule(entry, now)

    # -- removal helpers --------------------------------------------------------------------

    def _mark_dirty(self, entry: list[Any]) -> None:
        key = entry[_KEY]
        if self._track_dirty and key not in self._dirty:
            self._dirty[key] = entry
            self._dirty_order.append(key)

    def _take(self, entry: list[Any]) -> Any:
        # Remove a live entry that is already off the wheel and return its value; the table
        # keeps the entry (with its key) only while the key is queued for drain_dirty().
        value = entry[_VALUE]
        del self._lru[entry[_KEY]]
        entry[_VALUE] = None
        entry[_BUCKET] = _DEAD
        self._mark_dirty(entry)
        self._version += 1
        return value

    def _evict_one(self) -> None:
        entry = next(iter(self._lru.values()))
        self._unschedule(entry)
        self._evicted.append((entry[_KEY], self._take(entry)))
        self._counts[5] += 1

    # -- writes -----------------------------------------------------------------------------

    def _upsert(self, key: Any, value: Any, ttl: float, now: float) -> bool:
        entry = self._lru.get(key)
        deadline = now + ttl
        self._version += 1
        if entry is not None:
            old = entry[_VALUE]
            entry[_VALUE] = value
            entry[_TTL] = ttl
            self._lru.move_to_end(entry[_KEY])
            self._set_deadline(entry, deadline, now)
            self._mark_dirty(entry)
            self._counts[1] += 1
            del old  # only now, with the entry consistent: its __del__ may use this table
            return False
        entry = self._dirty.get(key)  # removed but not drained: comes back as the same entry
        if len(self._lru) >= self._capacity:
            self._evict_one()
        if entry is None:
            entry = [value, deadline, ttl, _DEAD, key]
        else:
            entry[_VALUE] = value
            entry[_DEADLINE] = deadline
            entry[_TTL] = ttl
        self._lru[entry[_KEY]] = entry
        self._schedule(entry, now)
        self._mark_dirty(entry)
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
        pairs = _pairs(list(items))  # all of `items` first, then the checks, as the native table
        for key, _ in pairs:
            hash(key)
        added = 0
        paused = gc.isenabled()  # evictions make a tuple each: see "The garbage collector"
        if paused:
            gc.disable()
        try:
            for key, value in pairs:
                added += self._upsert(key, value, ttl_s, now_s)
        finally:
            if paused:
                gc.enable()
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
        self._touch(entry, ttl_s, now_s)
        return True

    def _touch(self, entry: list[Any], ttl: float | None, now: float) -> None:
        if ttl is not None:
            entry[_TTL] = ttl
        self._lru.move_to_end(entry[_KEY])
        self._set_deadline(entry, now + entry[_TTL], now)
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
        # A private copy (a key's __hash__ may change the caller's list), all hashed first.
        keys = list(keys)
        for key in keys:
            hash(key)
        lru = self._lru
        found = [lru.get(key) for key in keys]
        touched = 0
        for entry in found:
            # A key's __eq__ during the lookups may have removed an entry found before it.
            if entry is not None and entry[_BUCKET] != _DEAD:
                self._touch(entry, ttl_s, now_s)
                touched += 1
        return touched

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: D | None = None) -> V | D | None:
        """Remove `key` and return its value, or `default` if it is not live."""
        entry = self._lru.get(key)
        if entry is None:
            return default
        self._unschedule(entry)
        value = self._take(entry)
        self._counts[3] += 1
        return value  # type: ignore[no-any-return]

    # -- reads ------------------------------------------------------------------------------

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: D | None = None) -> V | D | None:
        """The value of `key`, or `default`.  Does not change recency."""
        entry = self._lru.get(key)
        return default if entry is None else entry[_VALUE]

    @overload
    def deadline(self, key: K) -> float | None: ...
    @overload
    def deadline(self, key: K, default: D) -> float | D: ...
    def deadline(self, key: K, default: D | None = None) -> float | D | None:
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
        paused = gc.isenabled()  # a tuple per expired entry: see "The garbage collector"
        if paused:
            gc.disable()
        try:
            if target < current - REBASE_TICKS:
                self._rebase(target, now_s)
                current = target
            if target > current:
                due = self._collect(current, target)
                self._current = current = target
                self._counts[6] += len(due)
                for entry in due:
                    if entry[_DEADLINE] <= now_s:
                        self._expire_one(entry, expired)
                    else:
                        self._schedule(entry, now_s)
            pending = self._buckets[_PENDING]
            if pending:
                self._counts[6] += len(pending)
                for entry in list(pending.values()):
                    if entry[_DEADLINE] <= now_s:
                        self._unschedule(entry)
                        self._expire_one(entry, expired)
                    elif time_to_tick(entry[_DEADLINE], self._tick) > current:
                        self._unschedule(entry)
                        self._schedule(entry, now_s)
        finally:
            if paused:
                gc.enable()
        return expired

    def _rebase(self, target: int, now: float) -> None:
        # Time went back: make `target` the current tick and place every entry again, taking
        # the buckets in number order (the pending list last), each in its list order.
        entries: list[list[Any]] = []
        for bucket in self._buckets:
            if bucket:
                entries.extend(bucket.values())
                bucket.clear()
        self._current = target
        for entry in entries:
            self._schedule(entry, now)
        self._counts[6] += len(entries)
        self._counts[7] += 1

    def _collect(self, current: int, target: int) -> list[list[Any]]:
        # Take every bucket whose span the wheel crosses moving from `current` to `target`.
        due: list[list[Any]] = []
        for level in range(WHEEL_LEVELS):
            shift = level * WHEEL_BITS
            first = (current >> shift) + 1
            last = target >> shift
            if last < first:
                break
            for t in range(first, min(last, first + _MASK) + 1):
                bucket = self._buckets[level * WHEEL_SIZE + (t & _MASK)]
                if bucket:
                    due.extend(bucket.values())
                    bucket.clear()
        return due

    def _expire_one(self, entry: list[Any], expired: list[tuple[Any, Any]]) -> None:
        # The entry is already off the wheel.
        expired.append((entry[_KEY], self._take(entry)))
        self._counts[4] += 1

    def drain_dirty(self, limit: int | None = None) -> list[tuple[K, V | Tombstone]]:
        """Take up to `limit` changed keys (all if None), oldest change first.

        Each comes once as `(key, value)` with its current value, or `(key, TOMBSTONE)` if it
        was removed, expired or evicted since the last drain.
        """
        count = len(self._dirty) if limit is None else check_limit(limit)
        out: list[tuple[Any, Any]] = []
        dirty, order = self._dirty, self._dirty_order
        paused = gc.isenabled()  # a tuple per key: see "The garbage collector"
        if paused:
            gc.disable()
        try:
            for _ in range(min(count, len(order))):
                key = order.popleft()
                entry = dirty.pop(key)
                out.append((key, TOMBSTONE if entry[_BUCKET] == _DEAD else entry[_VALUE]))
        finally:
            if paused:
                gc.enable()
        return out

    def drain_evicted(self) -> list[tuple[K, V]]:
        """Take the `(key, value)` pairs evicted by capacity since the last call, oldest first."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def stats(self) -> dict[str, Any]:
        """Sizes and counters of this table (a new dict each call)."""
        inserts, updates, touches, removals, expirations, evictions, examined, rebases = (
            self._counts
        )
        tombstones = sum(1 for entry in self._dirty.values() if entry[_BUCKET] == _DEAD)
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
            "expire_examined": examined,
            "wheel_rebases": rebases,
            "memory_bytes": _sizeof(self),
        }

    def __repr__(self) -> str:
        return f"<PresenceTable len={len(self._lru)} capacity={self._capacity} (python)>"

    def __reduce__(self) -> Any:
        raise TypeError("PresenceTable cannot be pickled")

    def check_invariants(self) -> None:
        """Walk every structure and raise AssertionError on the first inconsistency (O(n))."""
        for key, entry in self._lru.items():
            assert entry[_KEY] is key and entry[_BUCKET] != _DEAD, "lru entry"
        on_wheel = 0
        for number, bucket in enumerate(self._buckets):
            for key, entry in bucket.items():
                assert self._lru.get(key) is entry, "dead entry on the wheel"
                assert entry[_KEY] is key and entry[_BUCKET] == number, "bucket number"
                on_wheel += 1
        assert on_wheel == len(self._lru), f"wheel holds {on_wheel}, len is {len(self._lru)}"
        assert self._track_dirty or not self._dirty, "dirty keys while not tracking"
        assert len(self._dirty) == len(self._dirty_order), "dirty queue and set differ"
        for key, entry in self._dirty.items():
            assert entry[_KEY] is key, "dirty key object"
            if entry[_BUCKET] == _DEAD:
                assert entry[_VALUE] is None and key not in self._lru, "removed entry"
            else:
                assert self._lru.get(key) is entry, "dirty entry"


def _pairs(items: Iterable[Any]) -> list[tuple[Any, Any]]:
    pairs = []
    for item in items:
        if type(item) is not tuple or len(item) != 2:
            raise PresenceTypeError(f"items must be (key, value) tuples, got {describe(item)}")
        pairs.append(item)
    return pairs


def _sizeof(table: PresenceTable[Any, Any]) -> int:
    # Containers only (not keys or values), so it compares with the native table's arrays.
    size = sys.getsizeof(table._lru) + sys.getsizeof(table._dirty) + sys.getsizeof(table._evicted)
    size += sys.getsizeof(table._dirty_order)
    size += sum(sys.getsizeof(entry) for entry in table._lru.values())
    size += sum(sys.getsizeof(bucket) for bucket in table._buckets)
    return size
