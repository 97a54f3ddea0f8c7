"""Async subscribers and transports: hooks whose sends are awaited (an ASGI WebSocket's).

`Tracker.subscribe` and `Tracker.add_transport` take an ``async def`` callback as they take a
plain one.  The flush stays synchronous: what it registers for an async callback is an
`AsyncHook`'s `AsyncHook.put`, a raw sync hook that appends the delivery to the hook's own
queue and returns.  A worker task on the event loop awaits the callback with each queued
delivery, one at a time and in order, so a slow socket delays nobody but itself, and a host
needs no queue or writer task of its own per socket.

The flush's code is the same for every hook: a sync hook pays nothing per delivery for this
module (`is_async_callable` is asked once, when it is registered).

Per hook:

* order: deliveries are awaited in the order they were queued (the subscription's
  ``presence_state`` first, then the diffs in flush order), never two at once;
* bound: at most ``max_pending`` deliveries are pending (queued or being awaited).  One more
  *overflows*: the hook is ended at once (its queue dropped, its worker cancelled), the
  overflow is logged (a warning) and counted in ``hook_errors``, and ``on_overflow()`` is
  called, so the host can close the socket, as a server cuts a reader that cannot keep up;
* errors: an `Exception` from the callback is logged and counted in ``hook_errors``, and the
  later deliveries still go, as a sync hook's do; except that a subscription whose initial
  ``presence_state`` failed is ended, since no diff after it could be applied (a sync
  subscriber is not subscribed then either);
* end: ending the hook (unsubscribe, remove, overflow) drops its queue and cancels its worker;
  a callback that ends its own hook is let finish (it is not cancelled under itself).

This module (and asyncio with it) is imported by the first async hook, not by the Tracker: a
sync host does not load asyncio for it.

The worker exists only while deliveries are pending: it is started on the hook's loop by the
first delivery that finds none running, and returns once the queue is empty.  A hook belongs
to the loop that was running when it was registered, and its deliveries must be queued on
that loop's thread (flush there, as an asyncio host does); one queued after that loop closed
ends the hook (logged and counted).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import orjson

from .._validate import check_callable, check_int
from ..errors import PresenceError
from ..phoenix import EVENT_PRESENCE_STATE
from .delivery import Delivery, is_async_callable

__all__ = [
    "DEFAULT_MAX_PENDING",
    "AsyncHook",
    "check_async_options",
    "is_async_callable",
    "running_loop",
]

logger = logging.getLogger("presence_core.tracker")

DEFAULT_MAX_PENDING: Final = 1024
"""Deliveries an async hook may have pending (queued or being awaited) before it overflows."""

_loads = orjson.loads

# The event loop keeps only weak references to tasks: these are the workers (and on_overflow
# coroutines) still running, so that none is collected while pending.
_running: set[asyncio.Future[Any]] = set()


def running_loop(what: str) -> asyncio.AbstractEventLoop:
    """The running event loop, or a `PresenceError` saying why ``what`` needs one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise PresenceError(
            f"{what} with an async callback needs a running event loop, whose tasks will await "
            "its deliveries: call it from a coroutine (inside asyncio.run or your ASGI app)"
        ) from None


def check_async_options(max_pending: int | None, on_overflow: object) -> int:
    if on_overflow is not None:
        check_callable(on_overflow, "on_overflow")
    if max_pending is None:
        return DEFAULT_MAX_PENDING
    return check_int(max_pending, "max_pending", low=1)


class AsyncHook:
    """One async subscriber or transport: its queue, its worker task and its waiters.

    `put` is what the flush calls (registered raw: the queue holds the shared JSON bytes, and
    a dict hook gets its own copy when its turn comes).  ``end`` is the function that
    unsubscribes or removes it, set by the Tracker once it is registered.
    """

    __slots__ = (
        "_busy",
        "_finished",
        "_queued",
        "_state_first",
        "_task",
        "_waiters",
        "callback",
        "delivery",
        "end",
        "ended",
        "loop",
        "max_pending",
        "on_overflow",
        "queue",
        "raw",
        "transport",
    )

    def __init__(
        self,
        callback: Callable[..., Any],
        *,
        raw: bool,
        max_pending: int,
        on_overflow: Callable[[], object] | None,
        loop: asyncio.AbstractEventLoop,
        delivery: Delivery,
        transport: bool,
        send_state: bool = False,
    ) -> None:
        self.callback = callback
        self.raw = bool(raw)
        self.max_pending = max_pending
        self.on_overflow = on_overflow
        self.loop = loop
        self.delivery = delivery
        self.queue: deque[tuple[str, str, bytes]] = deque()
        self.end: Callable[[], None] = self.close
        self.ended = False
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a delivery is being awaited
        self._queued = 0  # deliveries ever queued
        self._finished = 0  # deliveries ever done with (awaited, failed or dropped)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.transport = transport  # all topics' hook (else one topic's subscriber)
        # A subscription's first delivery is its presence_state: if that fails, it ends.
        self._state_first = send_state and not transport

    def __repr__(self) -> str:
        return f"<AsyncHook {self.callback!r} pending={self.pending}>"

    @property
    def pending(self) -> int:
        """Deliveries queued or being awaited."""
        return len(self.queue) + self._busy

    def put(self, topic: str, event: str, payload: bytes) -> None:
        """Queue one delivery (the sync hook the flush calls); overflow if over the bound."""
        queue = self.queue
        if len(queue) + self._busy >= self.max_pending:
            self._overflow()
            return
        queue.append((topic, event, payload))
        self._queued += 1
        if self._task is None:
            self._start()

    def _start(self) -> None:
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            self._fail(
                "its event loop is closed"
                if loop.is_closed()
                else "a delivery was queued outside its event loop's thread (flush there)"
            )
            return
        task = self._task = loop.create_task(self._run(), name=f"presence hook {self.callback!r}")
        _running.add(task)
        task.add_done_callback(_running.discard)

    def _fail(self, why: str) -> None:
        self.delivery.hook_errors += 1
        logger.error("async presence hook %r ended: %s", self.callback, why)
        self.end()

    def _overflow(self) -> None:
        self.delivery.hook_errors += 1
        logger.warning(
            "async presence hook %r has %d deliveries pending (max_pending): ended",
            self.callback,
            self.pending,
        )
        self.end()
        on_overflow = self.on_overflow
        if on_overflow is None:
            return
        try:
            result = on_overflow()
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result, loop=self.loop)
                _running.add(task)
                task.add_done_callback(self._overflow_done)
        except Exception:
            self.delivery.hook_errors += 1
            logger.exception("on_overflow of async presence hook %r failed", self.callback)

    def _overflow_done(self, task: asyncio.Future[Any]) -> None:
        _running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.delivery.hook_errors += 1
            logger.error(
                "on_overflow of async presence hook %r failed",
                self.callback,
                exc_info=task.exception(),
            )

    async def _run(self) -> None:
        queue, callback, raw = self.queue, self.callback, self.raw
        try:
            while queue:
                topic, event, payload = queue.popleft()
                self._busy = True
                try:
                    await callback(topic, event, payload if raw else _loads(payload))
                except Exception:
                    self.delivery.hook_errors += 1
                    logger.exception("async presence hook %r failed for topic %r", callback, topic)
                    if self._state_first and event == EVENT_PRESENCE_STATE and not self.ended:
                        logger.error(
                            "async presence hook %r is unsubscribed from %r: its presence_state "
                            "failed, so no diff could be applied",
                            callback,
                            topic,
                        )
                        self.end()
                finally:
                    self._busy = False
                    self._state_first = False
                    self._finished += 1
                    if self._waiters:
                        self._release()
        finally:
            self._task = None

    def _release(self) -> None:
        waiters, finished = self._waiters, self._finished
        while waiters and waiters[0][0] <= finished:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(None)

    def flushed(self) -> asyncio.Future[None] | None:
        """A future done once every delivery queued so far is done with; None if they are."""
        if self.ended or self._finished >= self._queued:
            return None
        if self._task is None:  # a worker stopped by a BaseException left deliveries queued
            self._start()
            if self.ended:
                return None
        waiters = self._waiters
        while waiters and waiters[-1][1].done():  # given up on (a wait that timed out)
            waiters.pop()
        future: asyncio.Future[None] = self.loop.create_future()
        waiters.append((self._queued, future))
        return future

    def close(self) -> None:
        """Drop the queue, cancel the worker and release the waiters; idempotent."""
        if self.ended:
            return
        self.ended = True
        self.delivery.async_hooks.pop(self, None)
        self.queue.clear()
        self._finished = self._queued
        loop = self.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        task = self._task
        if task is not None and not task.done() and not loop.is_closed():
            if running is not loop:
                loop.call_soon_threadsafe(task.cancel)
            elif task is not asyncio.current_task(loop):
                task.cancel()
            # else the callback ended its own hook: it is let finish, and the queue is empty
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()[1]
            if not future.done() and not loop.is_closed():
                if running is loop:
                    future.set_result(None)
                else:
                    loop.call_soon_threadsafe(_resolve, future)

    def state(self, topic: str, blob: bytes) -> None:
        """Queue ``topic``'s ``presence_state`` (for `Tracker.send_state`)."""
        self.put(topic, EVENT_PRESENCE_STATE, blob)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
