"""Async subscribers and transports: the Tracker awaits their deliveries for the host.

Each test runs its own event loop (`asyncio.run`), as a host does.  What is checked: the order
of the awaited deliveries, one at a time; that a slow hook delays neither the flush nor another
hook; the per-hook bound (``max_pending``) and what an overflow does; errors; unsubscribing
mid-queue; `Tracker.wait_flushed`; the errors for a missing loop; async transports.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from unittest.mock import AsyncMock

import orjson
import pytest

from presence_core import AsyncRawTransport, AsyncTransport, PresenceError
from presence_core import typing as presence_typing
from presence_core.errors import PresenceTypeError, PresenceValueError
from presence_core.limits import Limits
from presence_core.metrics import HOOK_ERRORS, Metrics
from presence_core.testing import ClientView, RecordingTransport
from presence_core.tracker import Tracker
from presence_core.tracker.async_hooks import DEFAULT_MAX_PENDING, is_async_callable

T = TypeVar("T")
ROOM = "room:1"
Event = tuple[str, str, Any]


def run(main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` in a loop of its own, as a host runs; a hang fails after 30 s."""

    async def wrapped() -> T:
        return await asyncio.wait_for(main(), 30)

    return asyncio.run(wrapped())


def hook_errors(tracker: Tracker) -> int:
    tracker.sync_metrics()
    metrics = tracker.metrics
    assert isinstance(metrics, Metrics)
    return metrics.counter(HOOK_ERRORS)


class Recorder:
    """An async hook that records what it is awaited with, optionally held at a gate."""

    def __init__(self, delay: float = 0.0) -> None:
        self.events: list[Event] = []
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.most_active = 0
        self.cancelled = 0
        self.started = 0

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def __call__(self, topic: str, event: str, payload: Any) -> None:
        self.started += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay * random.random())
            else:
                await asyncio.sleep(0)
            self.events.append((topic, event, payload))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def kinds(self) -> list[str]:
        return [event for _, event, _ in self.events]


async def settle(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def unlimited() -> Tracker:
    """A Tracker whose rate limit no test here reaches."""
    return Tracker(plans={"default": Limits(rate_per_second=1e6, burst=1_000_000)})


def workers() -> list[asyncio.Task[Any]]:
    """The async hooks' worker tasks running now."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("presence hook")]


def churn(tracker: Tracker, rng: random.Random, step: int, topics: tuple[str, ...]) -> None:
    """A few random tracks, updates (a track again) and untracks."""
    for _ in range(rng.randint(1, 4)):
        conn = f"c{rng.randint(0, 15)}"
        topic = rng.choice(topics)
        if rng.random() < 0.3:
            tracker.untrack(conn, topic)
        else:
            tracker.track(conn, topic, f"k{conn}", {"step": step})


# -- order ---------------------------------------------------------------------------------------


def test_deliveries_are_awaited_in_order_one_at_a_time() -> None:
    """Under many flushes, a slow async subscriber is awaited with exactly what a sync one is
    called with (the state first, then each diff in flush order), never two at once, and the
    client it feeds ends up with the Tracker's state."""
    rng = random.Random(17)

    async def main() -> None:
        tracker = unlimited()
        tracker.track("c0", ROOM, "kc0", {"step": -1})
        tracker.flush()
        sync = RecordingTransport()
        slow = Recorder(delay=0.002)
        view = ClientView(strict=True)

        async def into_view(topic: str, event: str, payload: Any) -> None:
            await asyncio.sleep(0)
            view(topic, event, payload)

        tracker.subscribe(ROOM, sync)
        tracker.subscribe(ROOM, slow)
        tracker.subscribe(ROOM, into_view)
        for step in range(300):
            churn(tracker, rng, step, (ROOM,))
            tracker.flush()
            if step % 7 == 0:
                await asyncio.sleep(0)
        assert len(slow.events) < len(sync.events)  # the awaits lag behind the flushes
        await tracker.wait_flushed()
        assert slow.events == [(e.topic, e.event, e.payload) for e in sync.events]
        assert slow.kinds()[0] == "presence_state" and set(slow.kinds()[1:]) == {"presence_diff"}
        assert slow.most_active == 1
        assert view.state == tracker.list(ROOM)

    run(main)


def test_raw_and_dict_payloads() -> None:
    async def main() -> None:
        tracker = Tracker()
        raw, plain, other = Recorder(), Recorder(), Recorder()

        async def mutate(topic: str, event: str, payload: Any) -> None:
            payload.clear()  # its own copy: nobody else sees this

        tracker.subscribe(ROOM, raw, raw=True)
        tracker.subscribe(ROOM, mutate)
        tracker.subscribe(ROOM, plain)
        tracker.subscribe(ROOM, other)
        tracker.track("c1", ROOM, "alice", {"x": 1})
        await tracker.wait_flushed()
        assert [type(p) for _, _, p in raw.events] == [bytes, bytes]
        assert [orjson.loads(p) for _, _, p in raw.events] == [p for _, _, p in plain.events]
        assert plain.events == other.events and plain.events[1][2]["joins"]["alice"]
        assert plain.events[1][2] is not other.events[1][2]

    run(main)


def test_state_is_first_even_when_subscribed_from_a_flush() -> None:
    """An async subscriber added by a sync hook while a flush delivers gets the state the diffs
    still to come apply to, then each diff once."""

    async def main() -> None:
        tracker = Tracker()
        tracker.track("c1", ROOM, "alice", {})
        tracker.flush()
        view = ClientView(strict=True)
        added: list[object] = []

        async def late(topic: str, event: str, payload: Any) -> None:
            view(topic, event, payload)

        def first(topic: str, event: str, payload: Any) -> None:
            if event == "presence_diff" and not added:
                added.append(tracker.subscribe(ROOM, late))

        tracker.subscribe(ROOM, first)
        tracker.track("c2", ROOM, "bob", {})
        tracker.flush()
        tracker.untrack("c1", ROOM)
        await tracker.wait_flushed()
        assert view.state == tracker.list(ROOM) and set(view.state) == {"bob"}

    run(main)


# -- a slow hook delays nobody else ------------------------------------------------------------


def test_a_slow_subscriber_delays_neither_the_flush_nor_a_fast_one() -> None:
    async def main() -> None:
        tracker = Tracker()
        slow, fast = Recorder(), Recorder()
        slow.hold()  # awaits until released
        tracker.subscribe(ROOM, slow)
        tracker.subscribe(ROOM, fast)
        for i in range(20):
            tracker.track(f"c{i}", ROOM, f"k{i}", {})
            start = time.perf_counter()
            assert tracker.flush() == 1
            assert time.perf_counter() - start < 0.05  # the flush never awaits
        await settle(lambda: len(fast.events) == 21)
        assert slow.events == [] and slow.started == 1 and slow.active == 1
        slow.release()
        await tracker.wait_flushed()
        assert slow.events == fast.events and len(slow.events) == 21

    run(main)


# -- the bound ---------------------------------------------------------------------------------


def test_overflow_ends_the_subscription_and_notifies(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        tracker = Tracker()
        stuck, other = Recorder(), Recorder()
        stuck.hold()
        notices: list[str] = []
        unsubscribe = tracker.subscribe(
            ROOM, stuck, max_pending=3, on_overflow=lambda: notices.append("overflow")
        )
        tracker.subscribe(ROOM, other)
        await settle(lambda: stuck.started == 1)  # the state is being awaited: 1 pending
        for i in range(2):  # 2 more diffs: 3 pending, the bound
            tracker.track(f"c{i}", ROOM, f"k{i}", {})
            tracker.flush()
        assert notices == [] and hook_errors(tracker) == 0
        tracker.track("c9", ROOM, "k9", {})
        tracker.flush()  # a 4th: over the bound
        assert notices == ["overflow"]
        assert hook_errors(tracker) == 1
        await settle(lambda: stuck.cancelled == 1)  # the await under way was cancelled
        tracker.track("c10", ROOM, "k10", {})
        tracker.flush()
        stuck.release()
        await tracker.wait_flushed()
        assert stuck.events == [] and stuck.started == 1  # nothing more, ever
        assert len(other.events) == 5  # the others are not affected
        unsubscribe()  # still idempotent
        assert notices == ["overflow"]
        assert tracker.metrics.counter(HOOK_ERRORS) == 1  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING, logger="presence_core.tracker"):
        run(main)
    assert any("max_pending" in r.getMessage() for r in caplog.records)


def test_overflow_of_a_fast_burst_and_the_default_bound() -> None:
    """The bound counts what is queued as well as what is awaited: a burst of more deliveries
    than ``max_pending`` in one go overflows even a fast hook; the default is 1024."""

    async def main() -> None:
        tracker = unlimited()
        topics = [f"t{i}" for i in range(DEFAULT_MAX_PENDING + 1)]
        first, second = Recorder(), Recorder()
        notices: list[str] = []
        tracker.add_transport(first, on_overflow=lambda: notices.append("first"))
        for i, topic in enumerate(topics[:-1]):
            tracker.track(f"c{i}", topic, "k", {})
        await tracker.wait_flushed()  # 1024 diffs queued at once: they fit
        assert len(first.events) == DEFAULT_MAX_PENDING and notices == []
        tracker.add_transport(second, on_overflow=lambda: notices.append("second"))
        tracker.untrack("c0", "t0")
        for i, topic in enumerate(topics[1:]):
            tracker.track(f"d{i}", topic, "k", {})
        await tracker.wait_flushed()  # 1025 at once: both overflow
        assert notices == ["first", "second"]
        assert len(first.events) == DEFAULT_MAX_PENDING and second.events == []
        assert tracker.metrics.counter(HOOK_ERRORS) == 2  # type: ignore[attr-defined]

    run(main)


def test_an_async_on_overflow_is_awaited() -> None:
    """``on_overflow`` may return a coroutine (``lambda: websocket.close(1013)``): it is run."""

    async def main() -> None:
        tracker = Tracker()
        closed = asyncio.Event()

        async def close() -> None:
            await asyncio.sleep(0)
            closed.set()

        stuck = Recorder()
        stuck.hold()
        tracker.subscribe(ROOM, stuck, max_pending=1, on_overflow=close)
        tracker.track("c1", ROOM, "k", {})
        tracker.flush()
        await asyncio.wait_for(closed.wait(), 5)

    run(main)


# -- errors ------------------------------------------------------------------------------------


def test_an_exception_is_logged_and_counted_and_later_deliveries_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        tracker = Tracker()
        got: list[Event] = []

        async def flaky(topic: str, event: str, payload: Any) -> None:
            await asyncio.sleep(0)
            if event == "presence_diff" and "bob" in payload["joins"]:
                raise RuntimeError("socket hiccup")
            got.append((topic, event, payload))

        tracker.subscribe(ROOM, flaky)
        for conn, key in (("c1", "alice"), ("c2", "bob"), ("c3", "carol")):
            tracker.track(conn, ROOM, key, {})
            tracker.flush()
        await tracker.wait_flushed()
        assert [list(p.get("joins", p)) for _, _, p in got] == [[], ["alice"], ["carol"]]
        assert tracker.metrics.counter(HOOK_ERRORS) == 1  # type: ignore[attr-defined]

    with caplog.at_level(logging.ERROR, logger="presence_core.tracker"):
        run(main)
    failures = [r for r in caplog.records if r.exc_info and "socket hiccup" in str(r.exc_info[1])]
    assert len(failures) == 1


def test_a_failed_state_ends_the_subscription() -> None:
    """As a sync subscriber whose state raises is not subscribed: no diff could be applied."""

    async def main() -> None:
        tracker = Tracker()
        calls: list[str] = []

        async def refuses_state(topic: str, event: str, payload: Any) -> None:
            calls.append(event)
            if event == "presence_state":
                raise RuntimeError("closed")

        tracker.subscribe(ROOM, refuses_state)
        await tracker.wait_flushed()
        tracker.track("c1", ROOM, "k", {})
        assert await tracker.wait_flushed() == 0  # nobody subscribed any more
        assert calls == ["presence_state"]
        assert hook_errors(tracker) == 1

    run(main)


# -- unsubscribing -----------------------------------------------------------------------------


def test_unsubscribe_mid_queue_drops_the_queue_and_cancels_the_worker() -> None:
    async def main() -> None:
        tracker = Tracker()
        stuck = Recorder()
        stuck.hold()
        unsubscribe = tracker.subscribe(ROOM, stuck)
        for i in range(5):
            tracker.track(f"c{i}", ROOM, f"k{i}", {})
            tracker.flush()
        await settle(lambda: stuck.started == 1)
        assert len(workers()) == 1
        unsubscribe()
        await settle(lambda: not workers())  # the worker is gone
        assert stuck.cancelled == 1
        stuck.release()
        tracker.track("c9", ROOM, "k9", {})
        assert await tracker.wait_flushed() == 0  # nobody listens any more
        await asyncio.sleep(0.01)
        assert stuck.events == [] and stuck.started == 1
        unsubscribe()  # idempotent

    run(main)


def test_a_callback_may_unsubscribe_itself_and_finish() -> None:
    async def main() -> None:
        tracker = Tracker()
        done: list[str] = []
        unsubscribe: Callable[[], None] | None = None

        async def once(topic: str, event: str, payload: Any) -> None:
            assert unsubscribe is not None
            unsubscribe()
            await asyncio.sleep(0.001)  # not cancelled under itself
            done.append(event)

        unsubscribe = tracker.subscribe(ROOM, once)
        tracker.track("c1", ROOM, "k", {})
        tracker.flush()  # queued behind the state, then dropped by the unsubscribe
        await settle(lambda: not workers())
        assert done == ["presence_state"]

    run(main)


def test_a_loop_that_ends_with_work_queued_leaves_no_pending_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio.run cancels the worker like any task; a later flush ends the hook."""
    tracker = Tracker()
    stuck = Recorder()

    async def main() -> None:
        stuck.hold()
        tracker.subscribe(ROOM, stuck)
        tracker.track("c1", ROOM, "k", {})
        tracker.flush()
        await settle(lambda: stuck.started == 1)

    with caplog.at_level(logging.DEBUG):
        run(main)
        gc.collect()
        assert stuck.cancelled == 1
        tracker.track("c2", ROOM, "k2", {})
        tracker.flush()  # the hook's loop is closed: it is ended
        tracker.track("c3", ROOM, "k3", {})
        tracker.flush()
        gc.collect()
    assert hook_errors(tracker) == 1
    asyncio_said = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.INFO]
    assert not asyncio_said  # no "Task was destroyed but it is pending"
    assert any("event loop is closed" in r.getMessage() for r in caplog.records)


# -- wait_flushed --------------------------------------------------------------------------------


def test_wait_flushed_flushes_and_returns_once_the_awaits_ran() -> None:
    async def main() -> None:
        tracker = Tracker()
        a, b = Recorder(delay=0.01), Recorder(delay=0.01)
        tracker.subscribe(ROOM, a)
        tracker.subscribe("room:2", b)
        assert await tracker.wait_flushed() == 0
        assert len(a.events) == len(b.events) == 1  # the states
        tracker.track("c1", ROOM, "alice", {})
        tracker.track("c1", "room:2", "alice", {})
        assert tracker.pending() == 2
        assert await tracker.wait_flushed() == 2  # what its flush delivered
        assert tracker.pending() == 0
        assert a.kinds() == b.kinds() == ["presence_state", "presence_diff"]
        assert a.active == b.active == 0

    run(main)


def test_wait_flushed_with_a_timeout() -> None:
    async def main() -> None:
        tracker = Tracker()
        stuck, fast = Recorder(), Recorder()
        stuck.hold()
        tracker.subscribe(ROOM, stuck)
        tracker.subscribe(ROOM, fast)
        tracker.track("c1", ROOM, "k", {})
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await tracker.wait_flushed(timeout=0.05)
        assert 0.04 < time.monotonic() - start < 2.0
        assert len(fast.events) == 2 and stuck.events == []
        stuck.release()  # the deliveries went on
        await tracker.wait_flushed(timeout=5)
        assert stuck.events == fast.events
        with pytest.raises(PresenceValueError):
            await tracker.wait_flushed(timeout=0)

    run(main)


def test_wait_flushed_does_not_wait_for_a_hook_ended_meanwhile() -> None:
    async def main() -> None:
        tracker = Tracker()
        stuck = Recorder()
        stuck.hold()
        unsubscribe = tracker.subscribe(ROOM, stuck)
        waiting = asyncio.ensure_future(tracker.wait_flushed())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        unsubscribe()
        await asyncio.wait_for(waiting, 5)

    run(main)


def test_wait_flushed_counts_the_errors_of_the_awaits() -> None:
    async def main() -> None:
        tracker = Tracker()

        async def broken(topic: str, event: str, payload: Any) -> None:
            raise ValueError("no")

        tracker.add_transport(broken)
        tracker.track("c1", ROOM, "k", {})
        await tracker.wait_flushed()
        assert tracker.metrics.counter(HOOK_ERRORS) == 1  # type: ignore[attr-defined]

    run(main)


# -- without a loop, and misuse ------------------------------------------------------------------


async def _noop(topic: str, event: str, payload: Any) -> None:
    pass


def test_an_async_callback_needs_a_running_loop() -> None:
    tracker = Tracker()
    with pytest.raises(PresenceError, match="running event loop"):
        tracker.subscribe(ROOM, _noop)
    with pytest.raises(PresenceError, match="running event loop"):
        tracker.add_transport(_noop)
    with pytest.raises(PresenceError, match="running event loop"):
        Tracker(transports=[_noop])
    assert tracker.topics() == [] and tracker.flush() == 0


def test_options_for_async_callbacks_only_and_checked() -> None:
    tracker = Tracker()
    with pytest.raises(PresenceTypeError, match="async callbacks only"):
        tracker.subscribe(ROOM, RecordingTransport(), max_pending=10)
    with pytest.raises(PresenceTypeError, match="async callbacks only"):
        tracker.add_transport(RecordingTransport(), on_overflow=lambda: None)

    async def main() -> None:
        with pytest.raises(PresenceValueError):
            tracker.subscribe(ROOM, _noop, max_pending=0)
        with pytest.raises(PresenceTypeError):
            tracker.add_transport(_noop, on_overflow="close")  # type: ignore[arg-type]

    run(main)


def test_a_sync_callable_that_returns_an_awaitable_is_refused() -> None:
    """A decorated coroutine function that hides what it is can't be awaited by a sync call:
    the state delivery shows it, and the coroutine is closed (no "never awaited" warning)."""
    tracker = Tracker()

    def hidden(topic: str, event: str, payload: Any) -> Any:
        return _noop(topic, event, payload)

    with pytest.raises(PresenceTypeError, match="awaitable"):
        tracker.subscribe(ROOM, hidden)
    with pytest.raises(PresenceTypeError, match="awaitable"):
        tracker.send_state(ROOM, hidden)
    tracker.track("c1", ROOM, "k", {})
    assert tracker.flush() == 0  # it was not subscribed
    gc.collect()


def test_what_counts_as_async() -> None:
    class Socket:
        async def send(self, topic: str, event: str, payload: Any) -> None:
            pass

        async def __call__(self, topic: str, event: str, payload: Any) -> None:
            pass

    class SyncSocket:
        def __call__(self, topic: str, event: str, payload: Any) -> None:
            pass

    def decorated(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any) -> Any:
            return f(*args)

        return wrapper

    sock = Socket()
    async_hooks = [_noop, sock.send, sock, functools.partial(_noop, ROOM), AsyncMock()]
    async_hooks += [functools.partial(sock, ROOM), Socket.send]
    if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+
        async_hooks.append(inspect.markcoroutinefunction(decorated(_noop)))
    for hook in async_hooks:
        assert is_async_callable(hook), hook
    sync_hooks = [print, lambda t, e, p: None, SyncSocket(), RecordingTransport(), Socket, len]
    sync_hooks += [SyncSocket().__call__, decorated(print), functools.partial(print, 1)]
    for hook in sync_hooks:
        assert not is_async_callable(hook), hook
    assert isinstance(sock, AsyncTransport) and isinstance(sock, AsyncRawTransport)
    assert "AsyncTransport" in presence_typing.__all__


# -- transports ----------------------------------------------------------------------------------


def test_an_async_transport_gets_every_topic_in_order_and_its_states() -> None:
    async def main() -> None:
        rng = random.Random(5)
        tracker = unlimited()
        topics = ("a", "b", "c")
        sync = RecordingTransport()
        slow = Recorder(delay=0.001)
        tracker.add_transport(sync)
        remove = tracker.add_transport(slow, raw=True)
        views = {t: ClientView(strict=True) for t in topics}
        for topic in topics:
            tracker.send_state(topic, sync)
            tracker.send_state(topic, slow)  # queued among its deliveries
        for step in range(100):
            churn(tracker, rng, step, topics)
            tracker.flush()
        await tracker.wait_flushed()
        expected = [(e.topic, e.event, e.payload) for e in sync.events]
        assert [(t, e, orjson.loads(p)) for t, e, p in slow.events] == expected
        for topic, event, payload in slow.events:
            views[topic](topic, event, orjson.loads(payload))
        for topic in topics:
            assert views[topic].state == tracker.list(topic)
        remove()
        remove()
        tracker.track("c99", "a", "k", {})
        await tracker.wait_flushed()
        assert len(slow.events) == len(expected)
        with pytest.raises(PresenceTypeError, match="awaitable"):
            tracker.send_state("a", slow)  # no longer a registered transport

    run(main)


def test_send_state_from_a_flush_to_an_async_transport() -> None:
    """A sync transport that starts a client of an async transport while a flush delivers: the
    state queued for it leaves out the diff it has yet to get, so the client gets each once."""

    async def main() -> None:
        tracker = Tracker()
        tracker.track("c1", ROOM, "alice", {})
        tracker.flush()
        view = ClientView(strict=True)

        async def socket(topic: str, event: str, payload: Any) -> None:
            await asyncio.sleep(0)
            view(topic, event, payload)

        started: list[bool] = []

        def gateway(topic: str, event: str, payload: Any) -> None:
            if not started:
                started.append(True)
                tracker.send_state(ROOM, socket)

        tracker.add_transport(gateway)  # called before the async one
        tracker.add_transport(socket)
        tracker.track("c2", ROOM, "bob", {})
        tracker.flush()
        tracker.untrack("c1", ROOM)
        await tracker.wait_flushed()
        assert view.state == tracker.list(ROOM) and set(view.state) == {"bob"}

    run(main)


def test_a_slow_async_transport_overflows_alone() -> None:
    async def main() -> None:
        tracker = Tracker()
        stuck, fast = Recorder(), Recorder()
        stuck.hold()
        notices: list[str] = []
        tracker.add_transport(stuck, max_pending=5, on_overflow=lambda: notices.append("cut"))
        tracker.add_transport(fast, max_pending=5)
        for i in range(8):
            tracker.track(f"c{i}", ROOM, f"k{i}", {})
            tracker.flush()
            await settle(lambda: len(fast.events) == i + 1)  # noqa: B023
            assert notices == ([] if i < 5 else ["cut"])
        assert stuck.cancelled == 1 and stuck.events == []
        assert hook_errors(tracker) == 1

    run(main)
