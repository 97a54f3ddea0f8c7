"""Running a `PhoenixCore` on an asyncio loop: its timers, its flushes and its async hooks.

Both front doors run on asyncio (`presence_core.server.PresenceServer` on its own sockets,
`presence_core.asgi.PresenceApp` under uvicorn, hypercorn or granian), and both need the same
three things done around the protocol core, which never awaits and reads no clock:

* **timers**: a tick every 10 ms hands the core the time (`PhoenixCore.handle_timer`: token
  expiry, the heartbeat TTL, the reconnect-storm window) and flushes what came from elsewhere
  (peers, through Redis);
* **flushes**: a flush runs at the end of the loop iteration that read a change, so the changes
  of every message read in one iteration coalesce into one diff per topic; during a reconnect
  storm flushes are half a second apart (`PhoenixCore.flush_at`); a flush writes for at most
  20 ms before the loop reads its sockets again, and the topics left go out in the next
  iterations, in order;
* **async hooks**: a `Defer` is awaited in a task, and its answer (or exception) goes back to
  `PhoenixCore.settle`; the socket is not read meanwhile.

The door gives `execute`, which does `Send`, `Fanout` and `Close` actions its own way, and
`release`, which reads a socket again once its hook has answered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .protocol import Action, Defer, PhoenixCore, Session

__all__ = ["CoreDriver"]

logger = logging.getLogger("presence_core.driver")

TICK = 0.01  # seconds between two timer checks
FLUSH_SLICE = 0.02  # seconds of fan-out before the loop reads its sockets again


class CoreDriver:
    """Drive ``core`` on the running asyncio loop.

    Args:
        core: The protocol core (construct it with ``wake=driver.drain`` when `execute` writes
            synchronously, so a budgeted flush spends its budget writing).
        execute: Does one batch of the core's `Send`, `Fanout` and `Close` actions, in order.
        release: Reads a socket again once the hook it waited for has answered.
        on_tick: Called every tick with the loop's time, before the core's timers (the
            door's own periodic work: samples, scalers).
    """

    def __init__(
        self,
        core: PhoenixCore,
        execute: Callable[[list[Action]], None],
        *,
        release: Callable[[Session], None],
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.core = core
        self._execute = execute
        self._release = release
        self._on_tick = on_tick
        self._ticker: asyncio.Task[None] | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._waits: dict[int, asyncio.Task[None]] = {}  # async hooks under way, by session

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the tick on the running loop."""
        if self._ticker is None:
            loop = asyncio.get_running_loop()
            self._ticker = loop.create_task(self._tick(), name="presence-tick")

    @property
    def running(self) -> bool:
        return self._ticker is not None

    async def stop(self) -> None:
        """Stop the tick and every hook under way; a final flush delivers what is left."""
        for task in list(self._waits.values()):
            task.cancel()
        if self._waits:
            await asyncio.gather(*self._waits.values(), return_exceptions=True)
        self._waits.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            try:
                await ticker
            except asyncio.CancelledError:
                pass
        self.core.flush(time.time())
        self.drain()

    # -- inputs --------------------------------------------------------------------------------

    def received(self, session: Session, data: bytes, binary: bool) -> None:
        """One message from a socket, to the core."""
        self.core.receive(session, data, binary, time.time())
        self.drain()
        self.flush_soon()

    def ended(self, session: Session) -> None:
        """A socket ended: the hook it waited for is no longer awaited."""
        task = self._waits.pop(session.id, None)
        if task is not None:
            task.cancel()

    def drain(self) -> None:
        """Do what the core asked, in order."""
        core = self.core
        actions = core.actions
        if not actions:
            return
        core.actions = []
        batch: list[Action] = []
        for action in actions:
            if type(action) is Defer:
                if batch:
                    self._execute(batch)
                    batch = []
                self._await(action.session, action.awaitable)
            else:
                batch.append(action)
        if batch:
            self._execute(batch)

    # -- flushes -------------------------------------------------------------------------------

    def flush_soon(self) -> None:
        """Flush once this loop iteration's messages are read (or, in a storm, later)."""
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            delay = self.core.flush_at() - time.time()
            if delay <= 0:
                self._flush_handle = loop.call_soon(self._flush)
            else:
                self._flush_handle = loop.call_later(delay, self._flush)

    def _flush(self, more: bool = False) -> None:
        self._flush_handle = None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self.core.flush(time.time(), budget=FLUSH_SLICE, more=more)
        self.drain()
        if time.perf_counter() - started >= FLUSH_SLICE:
            # Topics may be left: the next slice after this iteration's reads.
            self._flush_handle = loop.call_soon(self._flush, True)
        elif more:
            self.flush_soon()  # the batch is out; what changed meanwhile is next

    async def _tick(self) -> None:
        core = self.core
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            try:
                if self._on_tick is not None:
                    self._on_tick(loop.time())
                storm = core.storm
                core.handle_timer(time.time())
                if storm and not core.storm and self._flush_handle is not None:
                    self._flush_handle.cancel()  # due now, not at the storm's pace
                    self._flush_handle = None
                self.drain()
                self.flush_soon()  # what expired, and what came from peers
            except Exception:
                # A bug must cost one tick, never every timer from now on.
                logger.exception("a presence tick failed")

    # -- async hooks ---------------------------------------------------------------------------

    def _await(self, session: Session, awaitable: Awaitable[Any]) -> None:
        async def settle() -> None:
            answer: Any = None
            error: BaseException | None = None
            try:
                answer = await awaitable
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this wait was cancelled: the socket ended, or the door stops
                error = exc  # the hook's own cancellation (a timeout in it): a refusal
            except Exception as exc:
                error = exc
            if self._waits.get(session.id) is asyncio.current_task():
                del self._waits[session.id]
            self.core.settle(session, answer, error, now=time.time())
            self.drain()
            if session.waiting is None:
                self._release(session)
            self.flush_soon()

        def done(task: asyncio.Task[None]) -> None:
            # Cancelled before it began: the hook's coroutine was never awaited; close it,
            # or it warns when collected.
            if task.cancelled() and inspect.iscoroutine(awaitable):
                awaitable.close()

        task = asyncio.ensure_future(settle())
        task.add_done_callback(done)
        self._waits[session.id] = task  # held here: a task nobody holds may be collected
