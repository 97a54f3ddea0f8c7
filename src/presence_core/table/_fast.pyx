# cython: language_level=3
"""The native presence table.  `_py.py` is its twin and documents the behaviour; this
file must make the same choice at every step (the hypothesis state machine checks it).

Layout
------
Every entry is one 56-byte struct in a single array, addressed by a 32-bit slot number:

    key, value        owned references (value NULL: removed, kept only until drained)
    deadline, ttl     seconds on the table's clock
    lru_prev/next     the recency list (circular, head sentinel LRU)
    wheel_prev/next   the bucket list the entry sits in (circular, a sentinel per bucket)
    dirty_next        the change queue (singly linked; NOT_DIRTY when not queued)
    h32               32 bits of the key's mixed hash, to find the entry's index position

The first slots of the array are list heads, not entries: 1024 wheel buckets, the pending
list, the LRU head and the list of buckets being expired.  Because heads live in the same
array as entries, every list operation is the same two or three stores with no special case.

The key index is our own open-addressing table of 64-bit words `h32 << 32 | slot` (0 = empty),
linear probing at load <= 1/2 and backward-shift deletion, so there are no deleted markers.  A
lookup reads one index word, compares 32 hash bits, then the entry: with the key object itself
being identical in the common case, a hit is two cache lines.  Compared with a dict of boxed
slot numbers this saves the int object (32 bytes and a cache miss) and the dict's own entry.

Why a removed-but-undrained entry keeps its slot: a key that leaves and comes back between two
drains must come out of `drain_dirty()` once, with its latest value.  Keeping the dead entry in
the index and the change queue makes that coalescing free.  They do not count towards capacity
and are freed by `drain_dirty()`; with `track_dirty=False` there are none.
"""

cimport cython
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport (
    Py_EQ, PyObject, PyObject_Hash, PyObject_RichCompareBool, PyTypeObject, inquiry,
    traverseproc, visitproc,
)
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport floor, isfinite
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import types

from presence_core.table import _common
from presence_core.errors import PresenceTypeError
from presence_core.table._common import TOMBSTONE, describe

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define PC_PREFETCH(p) __builtin_prefetch((const void *)(p), 1, 1)
    #else
    #define PC_PREFETCH(p) ((void)0)
    #endif
    #ifdef PRESENCE_CORE_DEBUG
    #define PC_DEBUG 1
    #else
    #define PC_DEBUG 0
    #endif
    """
    void PC_PREFETCH(const void *p) nogil
    const int PC_DEBUG

cdef extern from "Python.h":
    # Each returns the previous state (1: enabled).  Bulk calls pause the collector while they
    # make a tuple per entry; see "The garbage collector" in _py.py.
    int PyGC_Enable()
    int PyGC_Disable()


ctypedef struct Entry:
    PyObject *key
    PyObject *value
    double deadline
    double ttl
    uint32_t lru_prev
    uint32_t lru_next
    uint32_t wheel_prev
    uint32_t wheel_next
    uint32_t dirty_next
    uint32_t h32


cdef enum:
    WHEEL_BITS = 8
    WHEEL_SIZE = 256
    WHEEL_MASK = 255
    WHEEL_LEVELS = 4
    PENDING = 1024          # list head: entries due within the current tick (or in the past)
    LRU = 1025              # list head: recency, next = least recent, prev = most recent
    DUE = 1026              # list head: buckets collected by expire(), being processed
    FIRST_SLOT = 1027       # first slot that holds an entry

cdef enum:
    BATCH_AHEAD = 8         # how far batch calls prefetch ahead of the entry they work on

cdef uint32_t NOT_DIRTY = 0xFFFFFFFF
cdef uint32_t QUEUE_END = 0xFFFFFFFE
cdef uint32_t NO_SLOT = 0xFFFFFFFF
cdef double MAX_TICK_F = 9007199254740992.0  # 2**53, as in _common.MAX_TICK
cdef int64_t REBASE_TICKS = _common.REBASE_TICKS

cdef object _check_ttl = _common.check_ttl
cdef object _check_now = _common.check_now
cdef object _check_limit = _common.check_limit


cdef inline uint32_t _mix32(Py_hash_t h) noexcept nogil:
    # Fibonacci hashing: small ints hash to themselves, so spread them before taking bits.  The
    # index takes the low bits of the result, and bit k of a product depends only on bits <= k
    # of its factors: fold the high half in first, or hashes that differ only above bit 32 + b
    # (ints like i << 46, floats like i / 1024) share one home in an index of 2**b words.
    cdef uint64_t x = <uint64_t>h
    x ^= x >> 32
    return <uint32_t>((x * <uint64_t>0x9E3779B97F4A7C15ULL) >> 32)


cdef inline int64_t _to_tick(double seconds, double tick) noexcept nogil:
    cdef double q = seconds / tick
    if q > MAX_TICK_F:
        q = MAX_TICK_F
    elif q < -MAX_TICK_F:
        q = -MAX_TICK_F
    return <int64_t>floor(q)


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


# The class docstring starts with the constructor's signature in the form CPython reads for
# `__text_signature__` (a line ending in "--"), so help() and inspect.signature() show the real
# one.  Cython's embedded signature is off for the class alone: it put `tick` before the `*`.
@cython.final
@cython.embedsignature(False)
cdef class PresenceTable:
    """PresenceTable(capacity, *, tick=0.01, clock=None, track_dirty=True)
--

    A bounded map of live entries with a deadline each, an LRU order and a change log.

    `capacity` bounds the number of live entries; `tick` is the wheel's resolution in
    seconds (1 ms to 60 s); `clock` returns seconds and is used whenever a call's `now` is
    omitted (default `time.monotonic`); with `track_dirty=False` no change log is kept and
    `drain_dirty()` always returns an empty list.

    Native implementation; see `presence_core.table._py.PresenceTable` for the full contract.
    """

    cdef Entry *_entries
    cdef uint32_t _entries_cap     # slots allocated (list heads included)
    cdef uint32_t _high            # first slot never used; slots below it are used or free
    cdef uint32_t _free_head       # free slots, chained through lru_next
    cdef uint64_t *_index
    cdef uint64_t _index_mask
    cdef uint64_t _index_used      # live + removed-but-undrained entries
    cdef Py_ssize_t _len
    cdef Py_ssize_t _capacity
    cdef double _tick
    cdef object _clock             # None: clock_gettime(CLOCK_MONOTONIC), as time.monotonic
    cdef bint _track_dirty
    cdef uint32_t _dirty_head
    cdef uint32_t _dirty_tail
    cdef Py_ssize_t _dirty_count
    cdef Py_ssize_t _tombstones
    cdef bint _has_current
    cdef int64_t _current
    cdef list _evicted
    cdef uint64_t _version         # recency order or membership changed (iteration guard)
    cdef uint64_t _layout          # slots or index moved (guards key comparisons)
    cdef Py_ssize_t _n_inserts, _n_updates, _n_touches, _n_removals, _n_expirations, _n_evictions
    cdef Py_ssize_t _n_examined, _n_rebases
    cdef object __weakref__

    def __cinit__(self):
        # The list heads and the index exist from here on, so a table whose __init__ never ran
        # (PresenceTable.__new__(PresenceTable)) is an empty table, not a NULL dereference.
        # Its capacity is 0 until __init__ sets it, and an insert then raises (see _upsert).
        self._entries = NULL
        self._index = NULL
        self._evicted = []
        self._tick = _common.DEFAULT_TICK
        self._grow_entries(FIRST_SLOT)
        self._resize_index(2048)
        self._reset()

    def __init__(self, capacity, *, tick=_common.DEFAULT_TICK, clock=None, track_dirty=True):
        cdef Py_ssize_t cap = _common.check_capacity(capacity)
        cdef double tick_s = _common.check_tick(tick)
        if clock is not None and not callable(clock):
            raise PresenceTypeError(
                f"clock must be a callable returning seconds, not {type(clock).__name__}")
        if self._capacity != 0:
            raise RuntimeError("PresenceTable.__init__ called twice")
        self._grow_entries(FIRST_SLOT + <uint32_t>min(cap, 1024))
        self._capacity = cap
        self._tick = tick_s
        self._clock = clock
        self._track_dirty = bool(track_dirty)

    def __dealloc__(self):
        cdef uint32_t s
        cdef Entry *e
        if self._entries != NULL:
            for s in range(FIRST_SLOT, self._high):
                e = &self._entries[s]
                if e.key != NULL:
                    Py_DECREF(<object>e.key)
                    e.key = NULL
                if e.value != NULL:
                    Py_DECREF(<object>e.value)
                    e.value = NULL
            PyMem_Free(self._entries)
            self._entries = NULL
        if self._index != NULL:
            PyMem_Free(self._index)
            self._index = NULL

    def __class_getitem__(cls, item):
        return types.GenericAlias(cls, item)

    def __reduce__(self):
        raise TypeError("PresenceTable cannot be pickled")

    @property
    def capacity(self):
        """The most live entries the table holds before it evicts."""
        return self._capacity

    @property
    def tick(self):
        """The timing wheel's resolution in seconds."""
        return self._tick

    # -- memory ---------------------------------------------------------------------------

    cdef int _grow_entries(self, uint32_t want) except -1:
        cdef Entry *grown
        if want <= self._entries_cap:
            return 0
        grown = <Entry *>PyMem_Realloc(self._entries, <size_t>want * sizeof(Entry))
        if grown == NULL:
            raise MemoryError()
        memset(&grown[self._entries_cap], 0, <size_t>(want - self._entries_cap) * sizeof(Entry))
        self._entries = grown
        self._entries_cap = want
        self._layout += 1
        return 0

    cdef int _resize_index(self, uint64_t size) except -1:
        cdef uint64_t *fresh = <uint64_t *>PyMem_Malloc(<size_t>size * sizeof(uint64_t))
        cdef uint64_t mask = size - 1, i, word, pos
        if fresh == NULL:
            raise MemoryError()
        memset(fresh, 0, <size_t>size * sizeof(uint64_t))
        if self._index != NULL:
            for i in range(self._index_mask + 1):
                word = self._index[i]
                if word != 0:
                    pos = (word >> 32) & mask
                    while fresh[pos] != 0:
                        pos = (pos + 1) & mask
                    fresh[pos] = word
            PyMem_Free(self._index)
        self._index = fresh
        self._index_mask = mask
        self._layout += 1
        return 0

    cdef uint32_t _alloc_slot(self) except? 0:
        cdef uint32_t slot, want
        if self._free_head != NO_SLOT:
            slot = self._free_head
            self._free_head = self._entries[slot].lru_next
            return slot
        if self._high == self._entries_cap:
            # Double, but stop at capacity while the live entries alone need the room; removed-
            # but-undrained entries may push past it, so the array never refuses a slot.
            want = self._entries_cap * 2 if self._entries_cap < 0x40000000 else 0xFFFFFFF0
            if want > FIRST_SLOT + self._capacity and self._entries_cap < FIRST_SLOT + self._capacity:
                want = <uint32_t>(FIRST_SLOT + self._capacity)
            if want <= self._entries_cap:
                raise MemoryError("PresenceTable cannot address more entries")
            self._grow_entries(want)
        slot = self._high
        self._high += 1
        return slot

    cdef inline void _free_slot(self, uint32_t slot) noexcept:
        cdef Entry *e = &self._entries[slot]
        e.key = NULL
        e.value = NULL
        e.dirty_next = NOT_DIRTY
        e.lru_next = self._free_head
        self._free_head = slot

    cdef void _reset(self) noexcept:
        """Make the table empty: list heads on themselves, no entries, an empty index.

        Releases no references: at construction there are none, and the GC clear owns them.
        """
        cdef uint32_t s
        for s in range(FIRST_SLOT):
            self._entries[s].wheel_prev = s
            self._entries[s].wheel_next = s
            self._entries[s].lru_prev = s
            self._entries[s].lru_next = s
        memset(&self._entries[FIRST_SLOT], 0,
               <size_t>(self._entries_cap - FIRST_SLOT) * sizeof(Entry))
        memset(self._index, 0, <size_t>(self._index_mask + 1) * sizeof(uint64_t))
        self._high = FIRST_SLOT
        self._free_head = NO_SLOT
        self._index_used = 0
        self._len = 0
        self._dirty_head = QUEUE_END
        self._dirty_tail = QUEUE_END
        self._dirty_count = 0
        self._tombstones = 0
        self._version += 1
        self._layout += 1

    cdef int _clear_for_gc(self) except -1:
        # Called by the collector to break a cycle through our entries.  The table is made
        # consistent (empty) before any reference is dropped, because a dropped value may run
        # arbitrary code that still reaches this table.
        cdef Py_ssize_t n = 0, i
        cdef uint32_t s
        cdef PyObject **refs
        if self._entries == NULL or self._high == FIRST_SLOT:
            return 0
        refs = <PyObject **>PyMem_Malloc(<size_t>(self._high - FIRST_SLOT) * 2 * sizeof(PyObject *))
        if refs == NULL:
            raise MemoryError()
        for s in range(FIRST_SLOT, self._high):
            if self._entries[s].key != NULL:
                refs[n] = self._entries[s].key
                n += 1
            if self._entries[s].value != NULL:
                refs[n] = self._entries[s].value
                n += 1
        self._reset()
        for i in range(n):
            Py_DECREF(<object>refs[i])
        PyMem_Free(refs)
        return 0

    # -- index ----------------------------------------------------------------------------

    cdef int64_t _find(self, object key, uint32_t h32) except -2:
        """The slot of `key` (live or removed-but-undrained), or -1."""
        cdef uint64_t mask = self._index_mask, pos = h32 & mask, word
        cdef uint32_t slot
        cdef PyObject *other
        cdef uint64_t layout
        cdef int equal
        while True:
            word = self._index[pos]
            if word == 0:
                return -1
            if <uint32_t>(word >> 32) == h32:
                slot = <uint32_t>word
                other = self._entries[slot].key
                if other == <PyObject *>key:
                    return slot
                # __eq__ is arbitrary code: hold the other key and notice if it moved things.
                layout = self._layout
                Py_INCREF(<object>other)
                try:
                    equal = PyObject_RichCompareBool(<object>other, key, Py_EQ)
                finally:
                    Py_DECREF(<object>other)
                if self._layout != layout:
                    raise RuntimeError("PresenceTable changed during a key comparison")
                if equal:
                    return slot
            pos = (pos + 1) & mask

    cdef inline uint64_t _index_pos(self, uint32_t slot) noexcept:
        cdef uint64_t mask = self._index_mask, pos = self._entries[slot].h32 & mask
        while <uint32_t>self._index[pos] != slot:
            pos = (pos + 1) & mask
        return pos

    cdef int _index_add(self, uint32_t slot, uint32_t h32) except -1:
        cdef uint64_t mask, pos
        if (self._index_used + 1) * 2 > self._index_mask + 1:
            self._resize_index((self._index_mask + 1) * 2)
        mask = self._index_mask
        pos = h32 & mask
        while self._index[pos] != 0:
            pos = (pos + 1) & mask
        self._index[pos] = (<uint64_t>h32 << 32) | slot
        self._index_used += 1
        self._layout += 1
        return 0

    cdef void _index_remove(self, uint32_t slot) noexcept:
        # Backward-shift deletion: pull later words of the probe run back over the hole
        # unless their home position lies cyclically in (hole, here].
        cdef uint64_t mask = self._index_mask
        cdef uint64_t hole = self._index_pos(slot), pos = hole, word, home
        while True:
            pos = (pos + 1) & mask
            word = self._index[pos]
            if word == 0:
                break
            home = (word >> 32) & mask
            if hole <= pos:
                if hole < home <= pos:
                    continue
            elif home > hole or home <= pos:
                continue
            self._index[hole] = word
            hole = pos
        self._index[hole] = 0
        self._index_used -= 1
        self._layout += 1

    # -- lists ----------------------------------------------------------------------------

    cdef inline void _lru_append(self, uint32_t slot) noexcept:
        cdef Entry *entries = self._entries
        cdef uint32_t last = entries[LRU].lru_prev
        entries[slot].lru_prev = last
        entries[slot].lru_next = LRU
        entries[last].lru_next = slot
        entries[LRU].lru_prev = slot

    cdef inline void _lru_unlink(self, uint32_t slot) noexcept:
        cdef Entry *entries = self._entries
        cdef uint32_t prev = entries[slot].lru_prev, nxt = entries[slot].lru_next
        entries[prev].lru_next = nxt
        entries[nxt].lru_prev = prev

    cdef inline void _wheel_append(self, uint32_t head, uint32_t slot) noexcept:
        cdef Entry *entries = self._entries
        cdef uint32_t last = entries[head].wheel_prev
        entries[slot].wheel_prev = last
        entries[slot].wheel_next = head
        entries[last].wheel_next = slot
        entries[head].wheel_prev = slot

    cdef inline void _wheel_unlink(self, uint32_t slot) noexcept:
        cdef Entry *entries = self._entries
        cdef uint32_t prev = entries[slot].wheel_prev, nxt = entries[slot].wheel_next
        entries[prev].wheel_next = nxt
        entries[nxt].wheel_prev = prev

    cdef inline void _mark_dirty(self, uint32_t slot) noexcept:
        cdef Entry *entries = self._entries
        if not self._track_dirty or entries[slot].dirty_next != NOT_DIRTY:
            return
        entries[slot].dirty_next = QUEUE_END
        if self._dirty_tail == QUEUE_END:
            self._dirty_head = slot
        else:
            entries[self._dirty_tail].dirty_next = slot
        self._dirty_tail = slot
        self._dirty_count += 1

    # -- time and wheel -------------------------------------------------------------------

    cdef inline double _now(self, object now) except? -1.0:
        cdef double value
        if now is None:
            if self._clock is None:
                return _monotonic()
            now = self._clock()
        if type(now) is float:
            value = <double>now
            if isfinite(value):
                return value
        return <double>_check_now(now)

    cdef inline double _ttl(self, object ttl) except? -1.0:
        cdef double value
        if type(ttl) is float:
            value = <double>ttl
            if value > 0.0 and isfinite(value):
                return value
        return <double>_check_ttl(ttl)

    cdef void _schedule(self, uint32_t slot, double now) noexcept:
        cdef int64_t due, current
        cdef int level, shift
        cdef uint32_t bucket = PENDING
        if not self._has_current:
            self._current = _to_tick(now, self._tick)
            self._has_current = True
        current = self._current
        due = _to_tick(self._entries[slot].deadline, self._tick)
        if due > current:
            for level in range(WHEEL_LEVELS + 1):
                if level == WHEEL_LEVELS:
                    # Beyond the top window: park in the furthest top bucket, placed again then.
                    shift = (WHEEL_LEVELS - 1) * WHEEL_BITS
                    bucket = <uint32_t>((WHEEL_LEVELS - 1) * WHEEL_SIZE
                                        + (((current >> shift) + WHEEL_MASK) & WHEEL_MASK))
                    break
                shift = level * WHEEL_BITS
                if (due >> shift) - (current >> shift) < WHEEL_SIZE:
                    bucket = <uint32_t>(level * WHEEL_SIZE + ((due >> shift) & WHEEL_MASK))
                    break
        self._wheel_append(bucket, slot)

    cdef inline void _set_deadline(self, uint32_t slot, double deadline, double now) noexcept:
        # Later deadline: stay in the bucket (found again when it comes due).  Earlier: move now.
        cdef Entry *e = &self._entries[slot]
        cdef bint earlier = deadline < e.deadline
        e.deadline = deadline
        if earlier:
            self._wheel_unlink(slot)
            self._schedule(slot, now)

    # -- removal --------------------------------------------------------------------------

    cdef object _take(self, uint32_t slot):
        """Unlink a live entry and return `(key, value)`; the table keeps the key if dirty."""
        cdef Entry *e = &self._entries[slot]
        cdef object key = <object>e.key
        cdef object value = <object>e.value
        self._lru_unlink(slot)
        Py_DECREF(value)           # the table's reference; `value` still holds one
        e.value = NULL
        self._len -= 1
        self._version += 1
        if self._track_dirty:
            self._mark_dirty(slot)
            self._tombstones += 1
        else:
            self._index_remove(slot)
            Py_DECREF(key)         # likewise
            self._free_slot(slot)
        return (key, value)

    cdef int _evict_one(self) except -1:
        cdef uint32_t slot = self._entries[LRU].lru_next
        self._wheel_unlink(slot)
        self._evicted.append(self._take(slot))
        self._n_evictions += 1
        return 0

    # -- writes ---------------------------------------------------------------------------

    cdef int _upsert(self, object key, uint32_t h32, object value, double ttl,
                     double now) except -1:
        cdef int64_t found = self._find(key, h32)
        cdef uint32_t slot
        cdef Entry *e
        cdef object old
        self._version += 1
        if found >= 0 and self._entries[found].value != NULL:
            slot = <uint32_t>found
            e = &self._entries[slot]
            old = <object>e.value   # released after the entry is consistent
            Py_DECREF(old)
            Py_INCREF(value)
            e.value = <PyObject *>value
            e.ttl = ttl
            self._lru_unlink(slot)
            self._lru_append(slot)
            self._set_deadline(slot, now + ttl, now)
            self._mark_dirty(slot)
            self._n_updates += 1
            if PC_DEBUG:
                self.check_invariants()
            return 0
        if self._len >= self._capacity:
            if self._capacity == 0:
                raise RuntimeError("PresenceTable.__init__ was not called")
            self._evict_one()
        if found >= 0:
            slot = <uint32_t>found   # removed but not drained: comes back in its old place
            self._tombstones -= 1
        else:
            slot = self._alloc_slot()
            self._index_add(slot, h32)
            e = &self._entries[slot]
            Py_INCREF(key)
            e.key = <PyObject *>key
            e.h32 = h32
            e.dirty_next = NOT_DIRTY
        e = &self._entries[slot]
        Py_INCREF(value)
        e.value = <PyObject *>value
        e.ttl = ttl
        e.deadline = now + ttl
        self._lru_append(slot)
        self._schedule(slot, now)
        self._mark_dirty(slot)
        self._len += 1
        self._n_inserts += 1
        if PC_DEBUG:
            self.check_invariants()
        return 1

    def upsert(self, key, value, ttl, now=None):
        """Insert or replace `key` with `value`, live for `ttl` seconds from `now`.

        Returns True if `key` was not live before.
        """
        cdef double ttl_s = self._ttl(ttl)
        cdef double now_s = self._now(now)
        cdef uint32_t h32 = _mix32(PyObject_Hash(key))
        return self._upsert(key, h32, value, ttl_s, now_s) == 1

    def upsert_many(self, items, ttl, now=None):
        """`upsert` every `(key, value)` pair in order, with one `ttl` and `now`.

        Returns how many keys were new.
        """
        cdef double ttl_s = self._ttl(ttl)
        cdef double now_s = self._now(now)
        # Always a private copy: a key's __hash__ may run code that changes the caller's list.
        cdef list pairs = list(items)
        cdef Py_ssize_t n = PyList_GET_SIZE(pairs), i
        cdef object item
        cdef uint32_t *hashes
        cdef Py_ssize_t added = 0
        for i in range(n):
            item = <object>PyList_GET_ITEM(pairs, i)
            if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
                raise PresenceTypeError(f"items must be (key, value) tuples, got {describe(item)}")
        hashes = <uint32_t *>PyMem_Malloc(<size_t>(n if n > 0 else 1) * sizeof(uint32_t))
        if hashes == NULL:
            raise MemoryError()
        cdef int gc_was_on = 0
        try:
            for i in range(n):
                item = <object>PyList_GET_ITEM(pairs, i)
                hashes[i] = _mix32(PyObject_Hash(<object>PyTuple_GET_ITEM(item, 0)))
            gc_was_on = PyGC_Disable()  # evictions make a tuple each
            for i in range(n):
                if i + BATCH_AHEAD < n:
                    PC_PREFETCH(&self._index[hashes[i + BATCH_AHEAD] & self._index_mask])
                item = <object>PyList_GET_ITEM(pairs, i)
                added += self._upsert(<object>PyTuple_GET_ITEM(item, 0), hashes[i],
                                      <object>PyTuple_GET_ITEM(item, 1), ttl_s, now_s)
        finally:
            if gc_was_on:
                PyGC_Enable()
            PyMem_Free(hashes)
        return added

    cdef inline void _touch(self, uint32_t slot, bint has_ttl, double ttl, double now) noexcept:
        cdef Entry *e = &self._entries[slot]
        if has_ttl:
            e.ttl = ttl
        self._lru_unlink(slot)
        self._lru_append(slot)
        self._set_deadline(slot, now + e.ttl, now)
        self._version += 1
        self._n_touches += 1

    def touch(self, key, ttl=None, now=None):
        """Refresh `key`: deadline `now + ttl` (its last ttl if omitted), most recent.

        Returns False if `key` is not live.
        """
        cdef bint has_ttl = ttl is not None
        cdef double ttl_s = self._ttl(ttl) if has_ttl else 0.0
        cdef double now_s = self._now(now)
        cdef int64_t slot = self._find(key, _mix32(PyObject_Hash(key)))
        if slot < 0 or self._entries[slot].value == NULL:
            return False
        self._touch(<uint32_t>slot, has_ttl, ttl_s, now_s)
        if PC_DEBUG:
            self.check_invariants()
        return True

    def touch_many(self, keys, ttl=None, now=None):
        """`touch` every key in order; returns how many were live.

        All keys are hashed and looked up before anything changes.
        """
        cdef bint has_ttl = ttl is not None
        cdef double ttl_s = self._ttl(ttl) if has_ttl else 0.0
        cdef double now_s = self._now(now)
        # Always a private copy: a key's __hash__ may run code that changes the caller's list.
        cdef list seq = list(keys)
        cdef Py_ssize_t n = PyList_GET_SIZE(seq), i
        cdef uint32_t *work
        cdef int64_t slot
        cdef Py_ssize_t touched = 0
        cdef uint64_t ahead
        cdef Entry *entries
        work = <uint32_t *>PyMem_Malloc(<size_t>(n if n > 0 else 1) * sizeof(uint32_t))
        if work == NULL:
            raise MemoryError()
        try:
            # Pass 1: hash everything, so an unhashable key fails before any lookup.
            for i in range(n):
                work[i] = _mix32(PyObject_Hash(<object>PyList_GET_ITEM(seq, i)))
            # Pass 2: find the slots.  Two steps of lookahead: the index word 2*AHEAD keys on,
            # and the entry that the (by now cached) index word AHEAD keys on points at, so
            # _find usually meets both of its cache lines already loaded.
            for i in range(n):
                if i + 2 * BATCH_AHEAD < n:
                    PC_PREFETCH(&self._index[work[i + 2 * BATCH_AHEAD] & self._index_mask])
                if i + BATCH_AHEAD < n:
                    ahead = self._index[work[i + BATCH_AHEAD] & self._index_mask]
                    if ahead != 0:
                        PC_PREFETCH(&self._entries[<uint32_t>ahead])
                slot = self._find(<object>PyList_GET_ITEM(seq, i), work[i])
                if slot >= 0 and self._entries[slot].value != NULL:
                    work[i] = <uint32_t>slot
                    PC_PREFETCH(&self._entries[slot])
                else:
                    work[i] = NO_SLOT
            # Pass 3: touch, prefetching the recency neighbours that unlinking will write.
            entries = self._entries
            for i in range(n):
                if i + BATCH_AHEAD < n and work[i + BATCH_AHEAD] != NO_SLOT:
                    PC_PREFETCH(&entries[entries[work[i + BATCH_AHEAD]].lru_prev])
                    PC_PREFETCH(&entries[entries[work[i + BATCH_AHEAD]].lru_next])
                # A key's __eq__ in pass 2 may have removed an entry found before it.
                if work[i] != NO_SLOT and entries[work[i]].value != NULL:
                    self._touch(work[i], has_ttl, ttl_s, now_s)
                    touched += 1
        finally:
            PyMem_Free(work)
        if PC_DEBUG:
            self.check_invariants()
        return touched

    def pop(self, key, default=None):
        """Remove `key` and return its value, or `default` if it is not live."""
        cdef int64_t slot = self._find(key, _mix32(PyObject_Hash(key)))
        if slot < 0 or self._entries[slot].value == NULL:
            return default
        self._wheel_unlink(<uint32_t>slot)
        pair = self._take(<uint32_t>slot)
        self._n_removals += 1
        if PC_DEBUG:
            self.check_invariants()
        return pair[1]

    # -- reads ----------------------------------------------------------------------------

    def get(self, key, default=None):
        """The value of `key`, or `default`.  Does not change recency."""
        cdef int64_t slot = self._find(key, _mix32(PyObject_Hash(key)))
        if slot < 0 or self._entries[slot].value == NULL:
            return default
        return <object>self._entries[slot].value

    def deadline(self, key, default=None):
        """The deadline (seconds, on the table's clock) of `key`, or `default`."""
        cdef int64_t slot = self._find(key, _mix32(PyObject_Hash(key)))
        if slot < 0 or self._entries[slot].value == NULL:
            return default
        return self._entries[slot].deadline

    def __len__(self):
        return self._len

    def __contains__(self, key):
        cdef int64_t slot = self._find(key, _mix32(PyObject_Hash(key)))
        return slot >= 0 and self._entries[slot].value != NULL

    def __iter__(self):
        """Live keys, most recent first.  Changing the table while iterating raises."""
        cdef uint64_t version = self._version
        cdef uint32_t slot = self._entries[LRU].lru_prev
        while slot != LRU:
            yield <object>self._entries[slot].key
            if self._version != version:
                raise RuntimeError("PresenceTable changed during iteration")
            slot = self._entries[slot].lru_prev

    # -- expiry, changes, evictions -------------------------------------------------------

    def expire(self, now=None):
        """Remove and return, as `(key, value)` pairs, every entry whose deadline is `<= now`."""
        cdef double now_s = self._now(now)
        cdef int64_t target = _to_tick(now_s, self._tick)
        cdef list expired = []
        cdef uint32_t slot, nxt
        cdef Entry *entries
        cdef int gc_was_on
        if not self._has_current:
            self._current = target
            self._has_current = True
            return expired
        gc_was_on = PyGC_Disable()  # a tuple per expired entry
        try:
            if target < self._current - REBASE_TICKS:
                self._rebase(target, now_s)
            if target > self._current:
                self._collect(self._current, target)
                self._current = target
                while True:
                    entries = self._entries
                    slot = entries[DUE].wheel_next
                    if slot == DUE:
                        break
                    PC_PREFETCH(&entries[entries[slot].wheel_next])
                    self._wheel_unlink(slot)
                    self._n_examined += 1
                    if entries[slot].deadline <= now_s:
                        self._expire_slot(slot, expired)
                    else:
                        self._schedule(slot, now_s)
            entries = self._entries
            slot = entries[PENDING].wheel_next
            while slot != PENDING:
                nxt = entries[slot].wheel_next
                self._n_examined += 1
                if entries[slot].deadline <= now_s:
                    self._wheel_unlink(slot)
                    self._expire_slot(slot, expired)
                elif _to_tick(entries[slot].deadline, self._tick) > self._current:
                    self._wheel_unlink(slot)
                    self._schedule(slot, now_s)
                slot = nxt
        finally:
            if gc_was_on:
                PyGC_Enable()
        if PC_DEBUG:
            self.check_invariants()
        return expired

    cdef void _rebase(self, int64_t target, double now) noexcept:
        # Time went back: make `target` the current tick and place every entry again, taking
        # the buckets in number order (the pending list last), each in its list order.
        cdef uint32_t head, head_first, head_last, due_last, slot
        cdef Entry *entries = self._entries
        for head in range(PENDING + 1):
            head_first = entries[head].wheel_next
            if head_first != head:
                head_last = entries[head].wheel_prev
                due_last = entries[DUE].wheel_prev
                entries[due_last].wheel_next = head_first
                entries[head_first].wheel_prev = due_last
                entries[head_last].wheel_next = DUE
                entries[DUE].wheel_prev = head_last
                entries[head].wheel_next = head
                entries[head].wheel_prev = head
        self._current = target
        while True:
            slot = entries[DUE].wheel_next
            if slot == DUE:
                break
            PC_PREFETCH(&entries[entries[slot].wheel_next])
            self._wheel_unlink(slot)
            self._schedule(slot, now)
            self._n_examined += 1
        self._n_rebases += 1

    cdef void _collect(self, int64_t current, int64_t target) noexcept:
        # Splice every bucket whose span the wheel crosses onto the DUE list, in order.
        cdef int level, shift
        cdef int64_t first, last, t, stop
        cdef uint32_t head, head_first, head_last, due_last
        cdef Entry *entries = self._entries
        for level in range(WHEEL_LEVELS):
            shift = level * WHEEL_BITS
            first = (current >> shift) + 1
            last = target >> shift
            if last < first:
                break
            stop = last if last < first + WHEEL_MASK else first + WHEEL_MASK
            t = first
            while t <= stop:
                head = <uint32_t>(level * WHEEL_SIZE + (t & WHEEL_MASK))
                head_first = entries[head].wheel_next
                if head_first != head:
                    head_last = entries[head].wheel_prev
                    due_last = entries[DUE].wheel_prev
                    entries[due_last].wheel_next = head_first
                    entries[head_first].wheel_prev = due_last
                    entries[head_last].wheel_next = DUE
                    entries[DUE].wheel_prev = head_last
                    entries[head].wheel_next = head
                    entries[head].wheel_prev = head
                t += 1

    cdef int _expire_slot(self, uint32_t slot, list expired) except -1:
        expired.append(self._take(slot))
        self._n_expirations += 1
        return 0

    def drain_dirty(self, limit=None):
        """Take up to `limit` changed keys (all if None), oldest change first.

        Each comes once as `(key, value)` with its current value, or `(key, TOMBSTONE)`.
        """
        cdef Py_ssize_t count = self._dirty_count
        if limit is not None:
            limit = _check_limit(limit)
            if limit < count:   # compared as Python ints: any limit is valid, even 2**64
                count = limit
        cdef list out = []
        cdef int gc_was_on = PyGC_Disable()  # a tuple per key
        try:
            self._drain(count, out)
        finally:
            if gc_was_on:
                PyGC_Enable()
        if PC_DEBUG:
            self.check_invariants()
        return out

    cdef int _drain(self, Py_ssize_t count, list out) except -1:
        cdef Py_ssize_t taken = 0
        cdef uint32_t slot
        cdef Entry *e
        cdef object key
        while self._dirty_head != QUEUE_END and taken < count:
            taken += 1
            slot = self._dirty_head
            e = &self._entries[slot]
            self._dirty_head = e.dirty_next
            if self._dirty_head == QUEUE_END:
                self._dirty_tail = QUEUE_END
            e.dirty_next = NOT_DIRTY
            self._dirty_count -= 1
            key = <object>e.key
            if e.value != NULL:
                out.append((key, <object>e.value))
            else:
                out.append((key, TOMBSTONE))
                self._index_remove(slot)
                Py_DECREF(key)     # the table's reference; the tuple holds its own
                self._free_slot(slot)
                self._tombstones -= 1
        return 0

    def drain_evicted(self):
        """Take the `(key, value)` pairs evicted by capacity since the last call, oldest first."""
        cdef list evicted = self._evicted
        self._evicted = []
        return evicted

    def stats(self):
        """Sizes and counters of this table (a new dict each call)."""
        return {
            "implementation": "cython",
            "len": self._len,
            "capacity": self._capacity,
            "tick": self._tick,
            "dirty": self._dirty_count,
            "tombstones": self._tombstones,
            "pending": self._list_length(PENDING),
            "evicted_undrained": len(self._evicted),
            "inserts": self._n_inserts,
            "updates": self._n_updates,
            "touches": self._n_touches,
            "removals": self._n_removals,
            "expirations": self._n_expirations,
            "evictions": self._n_evictions,
            "expire_examined": self._n_examined,
            "wheel_rebases": self._n_rebases,
            "memory_bytes": self.__sizeof__(),
        }

    cdef Py_ssize_t _list_length(self, uint32_t head) noexcept:
        cdef Py_ssize_t n = 0
        cdef uint32_t slot = self._entries[head].wheel_next
        while slot != head:
            n += 1
            slot = self._entries[slot].wheel_next
        return n

    def __sizeof__(self):
        return (type(self).__basicsize__ + <size_t>self._entries_cap * sizeof(Entry)
                + <size_t>(self._index_mask + 1) * sizeof(uint64_t))

    def __repr__(self):
        return f"<PresenceTable len={self._len} capacity={self._capacity} (cython)>"

    # -- invariants (tests and the debug build) -------------------------------------------

    def _index_displacement(self):
        """The longest and total distance of index words from their home position (O(n)).

        For tests: a hash mix that clusters keys shows here as long probe runs, with no clock.
        """
        cdef uint64_t mask = self._index_mask, i, word, home, distance, longest = 0, total = 0
        for i in range(mask + 1):
            word = self._index[i]
            if word != 0:
                home = (word >> 32) & mask
                distance = (i - home) & mask
                total += distance
                if distance > longest:
                    longest = distance
        return longest, total

    def check_invariants(self):
        """Walk every structure and raise AssertionError on the first inconsistency (O(n))."""
        cdef Entry *entries = self._entries
        cdef uint32_t slot, prev, head
        cdef Py_ssize_t live = 0, on_wheel = 0, dirty = 0, dead = 0, used = 0
        cdef uint64_t i
        prev = LRU
        slot = entries[LRU].lru_next
        while slot != LRU:
            assert entries[slot].lru_prev == prev, "lru back link"
            assert entries[slot].value != NULL, "dead entry on the lru list"
            live += 1
            prev = slot
            slot = entries[slot].lru_next
        assert live == self._len, f"lru holds {live} entries, len is {self._len}"
        for head in range(PENDING + 1):
            prev = head
            slot = entries[head].wheel_next
            while slot != head:
                assert entries[slot].wheel_prev == prev, "wheel back link"
                assert entries[slot].value != NULL, "dead entry on the wheel"
                on_wheel += 1
                prev = slot
                slot = entries[slot].wheel_next
        assert entries[DUE].wheel_next == DUE, "due list not empty"
        assert on_wheel == self._len, f"wheel holds {on_wheel} entries, len is {self._len}"
        slot = self._dirty_head
        while slot != QUEUE_END:
            dirty += 1
            slot = entries[slot].dirty_next
        assert dirty == self._dirty_count, "dirty count"
        for slot in range(FIRST_SLOT, self._high):
            if entries[slot].key != NULL:
                used += 1
                if entries[slot].value == NULL:
                    dead += 1
                    assert entries[slot].dirty_next != NOT_DIRTY, "dead entry not queued"
                assert <uint32_t>self._index[self._index_pos(slot)] == slot, "index"
        assert dead == self._tombstones, "tombstone count"
        assert used == <Py_ssize_t>self._index_used, "index count"
        used = 0
        for i in range(self._index_mask + 1):
            if self._index[i] != 0:
                used += 1
        assert used == <Py_ssize_t>self._index_used, "index words"


# Cyclic GC: Cython's generated traverse/clear only know the object attributes (the clock and
# the eviction list).  Chain our own so the collector also sees every key and value held in the
# C arrays; otherwise a value that refers back to its table would keep both alive forever.
cdef traverseproc _base_traverse = (<PyTypeObject *>PresenceTable).tp_traverse
cdef inquiry _base_clear = (<PyTypeObject *>PresenceTable).tp_clear


cdef int _table_traverse(PyObject *o, visitproc visit, void *arg) noexcept:
    cdef PresenceTable table = <PresenceTable>o
    cdef uint32_t s
    cdef int r = _base_traverse(o, visit, arg)
    if r != 0 or table._entries == NULL:
        return r
    for s in range(FIRST_SLOT, table._high):
        if table._entries[s].key != NULL:
            r = visit(table._entries[s].key, arg)
            if r != 0:
                return r
        if table._entries[s].value != NULL:
            r = visit(table._entries[s].value, arg)
            if r != 0:
                return r
    return 0


cdef int _table_clear(object o) except -1:
    (<PresenceTable>o)._clear_for_gc()
    return _base_clear(o)


(<PyTypeObject *>PresenceTable).tp_traverse = <traverseproc>_table_traverse
(<PyTypeObject *>PresenceTable).tp_clear = <inquiry>_table_clear

