"""Delivery: each flush's batch of changes, to the feed readers first, then to the hooks.

A flush takes one batch from the `ChangeFeed` and turns it into a queue of jobs: one that hands
the whole batch to every feed reader (the Redis store), then one per topic that encodes the
topic's ``presence_diff`` once and calls the topic's subscribers and every transport with it.

Why a queue that outlives the call
----------------------------------
A hook may raise something that is not an `Exception` (``KeyboardInterrupt``, ``SystemExit``,
``asyncio.CancelledError``).  That must propagate, but it must not cost anyone a diff: the queue
keeps the unfinished jobs, each knowing which hooks it has called, and the next flush finishes
them before it takes a new batch.  The hook that raised counts as called.

Which state a new client gets while a flush is under way
--------------------------------------------------------
A topic's hooks are read when its job starts, not when the batch is taken, so a subscriber added
by a hook before that point gets the topic's diff like everyone else; and `state_json` answers
for the moment it is asked:

* a topic whose job has not started yet: the state before its diff (it will be delivered);
* a topic whose job is under way: the state with its diff, unless the state is asked for on
  behalf of a hook that has yet to be called with that diff;
* any other topic: the state as of the last flush, as outside a flush.

So a client never gets a diff twice, and never misses one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import FunctionType, MethodType
from typing import Any, Final, TypeAlias

import orjson

from ..phoenix import EVENT_PRESENCE_DIFF
from .encoding import DATA, KEY, Presence, diff_json, state_json
from .feed import TopicChanges
from .state import PresenceState, Topic, presences_of, ref_number

__all__ = ["Delivery", "Hook", "disable_hook", "is_async_callable", "new_hook"]

logger = logging.getLogger("presence_core.tracker")

Hook: TypeAlias = list[Any]
"""A registered subscriber, transport or reader: ``[callable, raw]``, raw meaning it takes the
payload as JSON bytes.  Removing one swaps the callable for `_removed` (and raw for True, so no
copy is made for it): a flush under way then skips it at no cost per delivery, where a flag to
test would cost every delivery to every hook."""

_loads = orjson.loads
_perf_counter = time.perf_counter


def _removed(*args: object) -> None:
    """What a removed hook's entry calls, should a flush under way still hold it."""


def new_hook(call: Callable[..., object], raw: object) -> Hook:
    return [call, bool(raw)]


def disable_hook(entry: Hook) -> bool:
    """Mark ``entry`` removed; False if it already was."""
    if entry[0] is _removed:
        return False
    entry[0] = _removed
    entry[1] = True
    return True


_CO_COROUTINE: Final = inspect.CO_COROUTINE


def is_async_callable(obj: object) -> bool:
    """Whether calling ``obj`` makes a coroutine: an ``async def`` function or method, a
    `functools.partial` of one, an object whose ``__call__`` is ``async def``, or anything
    marked with `inspect.markcoroutinefunction` (or posing as a coroutine function, as
    `unittest.mock.AsyncMock` does).  Such a hook is awaited by the Tracker
    (`presence_core.tracker.async_hooks`) rather than called within the flush.

    Asked at every subscribe: plain functions, methods and objects of Python classes are
    answered from their code flags, without `inspect`'s slower general walk.
    """
    while type(obj) is functools.partial:
        obj = obj.func
    kind = type(obj)
    if kind is MethodType:
        obj = obj.__func__  # type: ignore[attr-defined]
        kind = type(obj)
    if kind is FunctionType:
        if obj.__code__.co_flags & _CO_COROUTINE:  # type: ignore[attr-defined]
            return True
        # A sync function; markcoroutinefunction (3.12+) leaves a mark in its __dict__.
        return bool(obj.__dict__) and inspect.iscoroutinefunction(obj)
    call = getattr(kind, "__call__", None)  # noqa: B004 - what obj() runs
    if type(call) is FunctionType:  # an object of a Python class
        if call.__code__.co_flags & _CO_COROUTINE:
            return True
        return hasattr(obj, "__code__") and inspect.iscoroutinefunction(obj)
    if isinstance(obj, type):
        return False  # a class: calling it constructs
    if inspect.iscoroutinefunction(obj):  # e.g. a compiled (Cython) async def
        return True
    return inspect.iscoroutinefunction(getattr(obj, "__call__", None))  # noqa: B004


class _ReadersJob:
    __slots__ = ("batch", "index", "readers")

    def __init__(self, batch: list[TopicChanges], readers: tuple[Hook, ...]) -> None:
        self.batch = batch
        self.readers = readers
        self.index = 0


class _TopicJob:
    __slots__ = ("blob", "changes", "cursor", "hooks")

    def __init__(self, changes: TopicChanges) -> None:
        self.changes = changes
        self.hooks: tuple[Hook, ...] | None = None  # read when the job starts
        self.blob = b""
        # The iterator over `hooks` while they are being called.  It knows how many hooks it
        # has handed out, so the fan-out loop stores nothing per hook.
        self.cursor: Iterator[Hook] | None = None

    def remaining(self) -> tuple[Hook, ...]:
        """The hooks not called yet (the one being called counts as called)."""
        hooks, cursor = self.hooks, self.cursor
        if hooks is None or cursor is None:
            return hooks or ()
        return hooks[len(hooks) - cursor.__length_hint__() :]  # type: ignore[attr-defined]

    def owes(self, hook: object) -> bool:
        """Whether the diff is still to be delivered to ``hook`` (or to anyone, if None)."""
        if self.hooks is None:
            return True
        if hook is None:
            return False
        # Equality, not identity: `obj.method` is a new object each time it is read.
        return any(entry[0] == hook for entry in self.remaining())


class Delivery:
    """The readers, the transports and the queue of deliveries; see the module docstring."""

    __slots__ = (
        "_flushing",
        "_inflight",
        "_queue",
        "_state",
        "async_hooks",
        "hook_errors",
        "latencies",
        "readers",
        "transports",
    )

    def __init__(self, state: PresenceState) -> None:
        self._state = state
        self.transports: tuple[Hook, ...] = ()
        self.readers: tuple[Hook, ...] = ()
        self._queue: deque[_ReadersJob | _TopicJob] = deque()
        self._inflight: dict[str, _TopicJob] = {}
        self._flushing = False
        self.hook_errors = 0
        # The live async subscribers and transports (`presence_core.tracker.async_hooks`),
        # for `Tracker.wait_flushed`; the flush itself never looks at them.
        self.async_hooks: dict[Any, None] = {}
        self.latencies: list[float] = []  # seconds, taken by the metrics sync

    def _undelivered(self) -> list[TopicChanges]:
        """Every topic's changes that some reader or hook has yet to get, one entry a topic."""
        queue = self._queue
        if queue and type(queue[0]) is _ReadersJob:
            queued = list(queue[0].batch)  # the readers' batch holds every queued topic
        else:
            queued = [job.changes for job in self._inflight.values()]
        names = {changes.topic for changes in queued}
        for t in self._state.feed.dirty.values():
            if t.name not in names:
                queued.append(TopicChanges(t, t.joins or {}, t.leaves or {}))
        return queued

    def pending(self) -> int:
        """Topics with changes that some reader or hook has yet to get."""
        if not self._queue:
            return len(self._state.feed)
        return len(self._undelivered())

    def pending_changes(self) -> int:
        """Presence changes (joins and leaves) that some reader or hook has yet to get."""
        return sum(len(c.joins) + len(c.leaves) for c in self._undelivered())

    def flush(self, budget: float | None = None) -> int:
        """Finish any interrupted flush, then deliver a new batch; returns topics delivered.

        With a ``budget`` (seconds), no job starts once it is spent (one always does), the rest
        stay queued, and a flush that found jobs queued only works through them: the next one
        takes the new batch.
        """
        if self._flushing:
            return 0
        self._flushing = True
        try:
            start = _perf_counter()
            deadline = None if budget is None else start + budget
            queued = bool(self._queue)
            delivered = self._run(start, deadline)  # empties the queue, unless stopped
            if deadline is not None and queued:
                return delivered
            self._enqueue(self._state.feed.take())
            return delivered + self._run(start, deadline)
        finally:
            self._flushing = False

    def _enqueue(self, batch: list[TopicChanges]) -> None:
        if not batch:
            return
        state, queue, inflight = self._state, self._queue, self._inflight
        readers = self.readers
        if readers:
            queue.append(_ReadersJob(batch, readers))
        transports = self.transports
        for changes in batch:
            t = changes.record
            if transports or t.subscribers:
                job = _TopicJob(changes)
                queue.append(job)
                inflight[t.name] = job
            else:
                # Nobody to tell is the common case of a service that only reads state: the
                # changes were never encoded, and are simply dropped here.
                state.prune(t)

    def _run(self, start: float, deadline: float | None = None) -> int:
        queue = self._queue
        delivered = 0
        while queue:
            if deadline is not None and delivered and _perf_counter() >= deadline:
                break
            job = queue[0]
            if type(job) is _ReadersJob:
                self._read(job)
            elif self._deliver(job):  # type: ignore[arg-type]
                delivered += 1
                self.latencies.append(_perf_counter() - start)
            queue.popleft()
        return delivered

    def _read(self, job: _ReadersJob) -> None:
        readers, batch = job.readers, job.batch
        while job.index < len(readers):
            reader = readers[job.index][0]
            job.index += 1
            try:
                reader(batch)
            except Exception:
                self.hook_errors += 1
                logger.exception("feed reader %r failed", reader)

    def _deliver(self, job: _TopicJob) -> bool:
        t = job.changes.record
        name = t.name
        if job.hooks is None:
            transports = self.transports
            hooks = job.hooks = t.subscribed() + transports if transports else t.subscribed()
            if not hooks:
                self._done(t)
                return False
            job.blob = diff_json(job.changes.joins, job.changes.leaves)
        else:  # resuming a flush that a BaseException interrupted
            hooks = job.hooks = job.remaining()
        blob = job.blob
        cursor = job.cursor = iter(hooks)
        for hook, raw in cursor:
            try:
                # A fresh dict per hook: a client library may mutate what it is given.
                hook(name, EVENT_PRESENCE_DIFF, blob if raw else _loads(blob))
            except Exception:
                self.hook_errors += 1
                logger.exception("presence hook %r failed for topic %r", hook, name)
        self._done(t)
        return True

    def _done(self, t: Topic) -> None:
        del self._inflight[t.name]
        self._state.prune(t)

    def prune(self, t: Topic) -> None:
        """Forget ``t`` if nothing refers to it any more, a delivery under way included."""
        if t.name not in self._inflight:
            self._state.prune(t)

    def state_json(self, t: Topic, hook: object = None) -> bytes:
        """The ``presence_state`` of ``t`` that the diffs still to come apply to exactly.

        ``hook``: the registered hook the state is for, if any (see the module docstring).
        """
        joins: Sequence[dict[Presence, Any]] = (t.joins,) if t.joins else ()
        leaves: Sequence[dict[Presence, None]] = (t.leaves,) if t.leaves else ()
        job = self._inflight.get(t.name) if self._inflight else None
        if job is not None and job.changes.record is t and job.owes(hook):
            joins = (*joins, job.changes.joins)
            # The batch's leaves left first: the receiver holds them until the diff.
            leaves = (job.changes.leaves, *leaves)
        groups: dict[str, list[bytes]] = {}
        for key, held in t.keys.items():
            datas = [
                p[DATA] for p in presences_of(held) if not any(p in pending for pending in joins)
            ]
            if datas:
                groups[key] = datas
        returned: set[str] = set()
        for left in leaves:
            for p in left:
                if any(p in pending for pending in joins):
                    continue  # joined in the diff still to come, gone since: it never shows
                group = groups.get(p[KEY])
                if group is None:
                    groups[p[KEY]] = [p[DATA]]
                else:
                    group.append(p[DATA])
                    returned.add(p[KEY])
        # A key's metas are in creation order, which is ref order (an update makes a new ref
        # and moves to the end): put the presences that left back where the clients saw them.
        for key in returned:
            groups[key].sort(key=ref_number)
        return state_json(groups.items())
