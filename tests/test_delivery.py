"""The change feed and delivery: feed readers, interrupted flushes, state asked for mid-flush."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from presence_core.metrics import HOOK_ERRORS, MetricDef, Metrics
from presence_core.phoenix import EVENT_PRESENCE_DIFF, EVENT_PRESENCE_STATE
from presence_core.testing import ClientView, ManualClock, RecordingTransport
from presence_core.tracker import TopicChanges, Tracker


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def tracker(clock: ManualClock) -> Tracker:
    return Tracker(clock=clock, node="n", connection_ttl=30.0)


class FeedLog:
    """A feed reader that keeps, per batch, what a store would write."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, list[tuple[Any, ...]], list[tuple[Any, ...]]]]] = []

    def __call__(self, batch: Sequence[TopicChanges]) -> None:
        self.batches.append(
            [
                (
                    changes.topic,
                    [(p[1], orjson.loads(p[2]), p[3], prev) for p, prev in changes.joins.items()],
                    [(p[1], orjson.loads(p[2])["phx_ref"], p[3]) for p in changes.leaves],
                )
                for changes in batch
            ]
        )


# -- the feed ----------------------------------------------------------------------------------


def test_a_feed_reader_gets_every_change_though_nobody_listens(tracker: Tracker) -> None:
    log = FeedLog()
    tracker.add_feed_reader(log)
    tracker.track("c1", "a", "alice", {"s": 1})
    tracker.track(7, "b", "bob", {})
    assert tracker.flush() == 0  # no subscriber, no transport: nothing delivered locally
    assert log.batches == [
        [
            ("a", [("alice", {"phx_ref": "n.1", "s": 1}, "c1", None)], []),
            ("b", [("bob", {"phx_ref": "n.2"}, 7, None)], []),
        ]
    ]
    tracker.update("c1", "a", "alice", {"s": 2})
    tracker.disconnect(7)
    tracker.flush()
    assert log.batches[1] == [
        ("a", [("alice", {"phx_ref": "n.3", "s": 2}, "c1", b"n.1")], [("alice", "n.1", "c1")]),
        ("b", [], [("bob", "n.2", 7)]),
    ]


def test_the_feed_coalesces_between_flushes(tracker: Tracker, clock: ManualClock) -> None:
    log = FeedLog()
    tracker.add_feed_reader(log)
    tracker.track("c1", "a", "alice", {})
    tracker.untrack("c1", "a")  # joined and left before anyone read it: in neither
    tracker.track("c2", "a", "bob", {"v": 1})
    tracker.update("c2", "a", "bob", {"v": 2})  # the unread join is replaced, no prev
    tracker.track("c3", "gone", "carol", {})
    clock.advance(31)
    tracker.tick()  # everything expires before it was ever read
    tracker.track("c4", "a", "dave", {})
    tracker.flush()
    assert log.batches == [[("a", [("dave", {"phx_ref": "n.5"}, "c4", None)], [])]]
    assert tracker.flush() == 0 and len(log.batches) == 1  # nothing new: no empty batch


def test_readers_read_before_the_hooks_and_can_be_removed(tracker: Tracker) -> None:
    order: list[str] = []
    remove = tracker.add_feed_reader(lambda batch: order.append("reader"))
    tracker.add_transport(lambda topic, event, payload: order.append("transport"))
    tracker.track("c1", "a", "alice", {})
    tracker.flush()
    assert order == ["reader", "transport"]
    remove()
    remove()  # idempotent
    tracker.track("c1", "b", "alice", {})
    tracker.flush()
    assert order == ["reader", "transport", "transport"]


def test_a_failing_reader_is_counted_and_the_hooks_still_get_their_diffs(
    tracker: Tracker,
) -> None:
    def broken(batch: Sequence[TopicChanges]) -> None:
        raise RuntimeError("store down")

    recorder = RecordingTransport()
    tracker.add_feed_reader(broken)
    tracker.add_transport(recorder)
    tracker.track("c1", "a", "alice", {})
    assert tracker.flush() == 1
    assert len(recorder.diffs("a")) == 1
    assert tracker.metrics.counter(HOOK_ERRORS) == 1  # type: ignore[attr-defined]


# -- a flush interrupted by a BaseException -----------------------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_an_interrupted_flush_loses_no_diff(
    tracker: Tracker, interrupt: type[BaseException]
) -> None:
    views = {name: ClientView(strict=True, topic="a") for name in ("first", "raiser", "last")}
    views_b = {name: ClientView(strict=True, topic="b") for name in ("first", "raiser", "last")}
    raised = []

    def hook(name: str) -> Any:
        def deliver(topic: str, event: str, payload: Any) -> None:
            (views if topic == "a" else views_b)[name](topic, event, payload)
            if name == "raiser" and event == EVENT_PRESENCE_DIFF and not raised:
                raised.append(topic)
                raise interrupt()

        return deliver

    for name in views:
        tracker.subscribe("a", hook(name))
        tracker.subscribe("b", hook(name))
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    with pytest.raises(interrupt):
        tracker.flush()
    assert tracker.pending() == 2  # "a" part-delivered, "b" not yet
    tracker.track("c2", "a", "bob", {})  # a later change waits for the interrupted ones
    assert tracker.pending() == 2  # topics: "a" (undelivered and changed again) and "b"
    assert tracker.flush() == 3  # finishes "a" and "b", then delivers the new batch
    for view in (*views.values(), *views_b.values()):
        topic = view.topic
        assert topic is not None
        assert view.state == tracker.list(topic), view


def test_an_interrupted_feed_reader_resumes_with_the_next_reader(tracker: Tracker) -> None:
    got: list[str] = []

    def interrupted(batch: Sequence[TopicChanges]) -> None:
        got.append("first")
        raise KeyboardInterrupt

    tracker.add_feed_reader(interrupted)
    tracker.add_feed_reader(lambda batch: got.append("second"))
    tracker.track("c1", "a", "alice", {})
    with pytest.raises(KeyboardInterrupt):
        tracker.flush()
    tracker.flush()
    assert got == ["first", "second"]  # the reader that raised counts as having read


# -- the state a new client gets while a flush is under way -------------------------------------


class Router:
    """A transport serving many clients: forwards each topic's events to that topic's views."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.clients: dict[str, list[ClientView]] = {}
        self.on_first_diff: Any = None

    def __call__(self, topic: str, event: str, payload: Any) -> None:
        for view in list(self.clients.get(topic, ())):
            view(topic, event, orjson.loads(orjson.dumps(payload)))
        if event == EVENT_PRESENCE_DIFF and self.on_first_diff is not None:
            action, self.on_first_diff = self.on_first_diff, None
            action()

    def join(self, topic: str) -> ClientView:
        view = ClientView(strict=True, topic=topic)
        self.tracker.send_state(topic, view)
        self.clients.setdefault(topic, []).append(view)
        return view


def test_a_client_joining_mid_flush_gets_each_diff_once(tracker: Tracker) -> None:
    router = Router(tracker)
    tracker.add_transport(router)
    router.join("a")
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    tracker.track("c2", "b", "bob", {})
    joined: list[ClientView] = []
    # While the router delivers topic "a", a client joins topic "b", whose diff comes next.
    router.on_first_diff = lambda: joined.append(router.join("b"))
    tracker.flush()
    (view,) = joined
    assert view.state == tracker.list("b")


def test_a_flush_with_a_budget_leaves_topics_queued_and_new_clients_consistent(
    tracker: Tracker,
) -> None:
    router = Router(tracker)
    tracker.add_transport(router)
    views = {topic: router.join(topic) for topic in "abc"}
    for topic in "abc":
        tracker.track("c1", topic, "alice", {})
    assert tracker.flush(budget=1e-9) == 1  # one topic always goes; b and c stay queued
    late = router.join("c")  # a client of a queued topic: the state before its diff
    assert late.state == {}
    tracker.track("c2", "a", "bob", {})  # a new change, after the queued batch
    assert tracker.flush(budget=1e-9) == 1  # b: only the queue is worked through
    assert tracker.flush(budget=1e-9) == 1  # c, to both of its clients
    assert list(views["a"].state) == ["alice"]
    assert tracker.flush(budget=1e-9) == 1  # now the new batch: bob in a
    assert tracker.flush(budget=1e-9) == 0
    for topic, view in views.items():
        assert view.state == tracker.list(topic)
    assert late.state == tracker.list("c")


def test_a_flush_budget_must_be_positive_seconds(tracker: Tracker) -> None:
    with pytest.raises(ValueError):
        tracker.flush(budget=0)
    with pytest.raises(TypeError):
        tracker.flush(budget="1")  # type: ignore[arg-type]


def test_state_for_a_transport_not_yet_called_leaves_out_the_diff_under_way(
    tracker: Tracker,
) -> None:
    router = Router(tracker)
    late = ClientView(strict=True, topic="a")

    def subscriber(topic: str, event: str, payload: Any) -> None:
        # A subscriber is called before the transports: the router has yet to get this diff.
        if event == EVENT_PRESENCE_DIFF and not router.clients:
            tracker.send_state("a", router)
            router.clients["a"] = [late]

    tracker.subscribe("a", subscriber)
    tracker.add_transport(router)
    tracker.track("c1", "a", "alice", {})
    tracker.flush()
    assert late.state == tracker.list("a")


def test_subscribing_from_a_hook_mid_flush_gets_each_diff_once(tracker: Tracker) -> None:
    views: list[ClientView] = []

    def first(topic: str, event: str, payload: Any) -> None:
        if event == EVENT_PRESENCE_DIFF and not views:
            for name in ("a", "b"):  # "a" is being delivered, "b" is next
                view = ClientView(strict=True, topic=name)
                tracker.subscribe(name, view)
                views.append(view)

    tracker.subscribe("a", first)
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    tracker.flush()
    assert [view.state for view in views] == [tracker.list("a"), tracker.list("b")]
    tracker.disconnect("c1")
    tracker.flush()
    assert [view.state for view in views] == [{}, {}]


def test_initial_state_mid_flush_matches_what_the_caller_will_receive(tracker: Tracker) -> None:
    seen: dict[str, Any] = {}

    def transport(topic: str, event: str, payload: Any) -> None:
        if event == EVENT_PRESENCE_DIFF and topic == "a":
            seen["a"] = tracker.initial_state("a")  # this diff is in hand: included
            seen["b"] = tracker.initial_state("b")  # "b" comes next: left out

    tracker.add_transport(transport)
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "bob", {})
    tracker.flush()
    assert seen == {"a": tracker.list("a"), "b": {}}


# -- metrics sinks that fail ---------------------------------------------------------------------


class BrokenSink:
    def inc(self, metric: MetricDef, n: int = 1, labels: tuple[str, ...] = ()) -> None:
        raise RuntimeError("sink down")

    def set(self, metric: MetricDef, value: float, labels: tuple[str, ...] = ()) -> None:
        raise RuntimeError("sink down")

    def observe(self, metric: MetricDef, seconds: float, labels: tuple[str, ...] = ()) -> None:
        raise RuntimeError("sink down")


def test_a_failing_metrics_sink_never_costs_tick_its_expired_ids(clock: ManualClock) -> None:
    tracker = Tracker(clock=clock, metrics=BrokenSink(), connection_ttl=10.0)
    recorder = RecordingTransport()
    tracker.add_transport(recorder)
    tracker.track("c1", "a", "alice", {})
    tracker.track("c2", "a", "bob", {})
    tracker.flush()
    clock.advance(11)
    assert sorted(tracker.tick()) == ["c1", "c2"]  # type: ignore[type-var]
    assert [e.event for e in recorder.events] == [EVENT_PRESENCE_DIFF] * 2
    tracker.sync_metrics()  # never raises
    assert tracker.load_sample().presences == 0


def test_counts_missed_by_a_failing_sink_are_published_later(clock: ManualClock) -> None:
    sink = Metrics(clock=clock)
    broken = {"on": True}

    class Flaky:
        def inc(self, metric: MetricDef, n: int = 1, labels: tuple[str, ...] = ()) -> None:
            if broken["on"]:
                raise RuntimeError("down")
            sink.inc(metric, n, labels)

        def set(self, metric: MetricDef, value: float, labels: tuple[str, ...] = ()) -> None:
            sink.set(metric, value, labels)

        def observe(self, metric: MetricDef, seconds: float, labels: tuple[str, ...] = ()) -> None:
            sink.observe(metric, seconds, labels)

    tracker = Tracker(clock=clock, metrics=Flaky())
    tracker.track("c1", "a", "alice", {})
    tracker.flush()
    broken["on"] = False
    tracker.flush()
    from presence_core.metrics import OPS

    assert sink.counter(OPS, "track") == 1
    assert sink.counter(HOOK_ERRORS) == 1  # the failed publish itself


def test_state_events_use_the_phoenix_names(tracker: Tracker) -> None:
    recorder = RecordingTransport()
    tracker.subscribe("a", recorder)
    assert [e.event for e in recorder.events] == [EVENT_PRESENCE_STATE]


def test_pending_changes_are_published(clock: ManualClock) -> None:
    from presence_core.metrics import PENDING_CHANGES

    metrics = Metrics(clock=clock)
    tracker = Tracker(clock=clock, metrics=metrics)
    tracker.track("c1", "a", "alice", {})
    tracker.track("c2", "b", "bob", {})
    tracker.flush()
    tracker.update("c1", "a", "alice", {"v": 1})  # a join and a leave
    tracker.disconnect("c2")
    tracker.sync_metrics()
    assert tracker.pending() == 2
    assert metrics.gauge(PENDING_CHANGES) == 3
    tracker.flush()
    assert metrics.gauge(PENDING_CHANGES) == 0


# -- found by review: topics pruned mid-flush, bound methods, readers owed a batch, latencies ---


def test_a_topic_emptied_before_its_delivery_keeps_its_state_for_new_clients(
    tracker: Tracker,
) -> None:
    tracker.track("c1", "a", "u1", {})
    tracker.flush()
    late = ClientView(strict=True, topic="a")
    sent: list[Any] = []

    def router(topic: str, event: str, payload: Any) -> None:
        if topic == "b" and not sent:  # "a" is still to be delivered
            tracker.add_transport(late)
            tracker.send_state("a", late)
            sent.append(tracker.initial_state("a"))

    tracker.add_transport(router)
    tracker.track("c2", "b", "u2", {})  # "b" changes first ...
    tracker.untrack("c1", "a")  # ... then "a" loses its only key: it must not be forgotten yet
    tracker.flush()
    assert sent[0] == {"u1": {"metas": [{"phx_ref": "n.1"}]}}
    assert late.state == tracker.list("a") == {}
    assert "a" not in tracker._state.topics  # forgotten once delivered


def test_a_bound_method_transport_is_recognised_mid_flush(tracker: Tracker) -> None:
    class Socket:
        def __init__(self) -> None:
            self.view = ClientView(strict=True, topic="a")

        def send(self, topic: str, event: str, payload: Any) -> None:
            self.view(topic, event, payload)

    boom = {"on": False}

    def first(topic: str, event: str, payload: Any) -> None:
        if boom.pop("on", False):
            raise KeyboardInterrupt

    tracker.add_transport(first)
    sock = Socket()
    tracker.add_transport(sock.send)
    tracker.send_state("a", sock.send)
    tracker.track("c1", "a", "u1", {})
    boom["on"] = True
    with pytest.raises(KeyboardInterrupt):
        tracker.flush()  # interrupted before sock.send got the diff
    tracker.send_state("a", sock.send)  # the client re-syncs: `sock.send` is a new object
    tracker.flush()
    assert sock.view.state == tracker.list("a")


def test_pending_counts_a_batch_a_reader_still_owes(tracker: Tracker) -> None:
    got: list[int] = []
    interrupt = {"on": True}

    def first(batch: Sequence[TopicChanges]) -> None:
        if interrupt.pop("on", False):
            raise KeyboardInterrupt

    tracker.add_feed_reader(first)
    tracker.add_feed_reader(lambda batch: got.append(len(batch)))
    tracker.track("c1", "a", "k", {})
    with pytest.raises(KeyboardInterrupt):
        tracker.flush()
    assert tracker.pending() == 1 and got == []
    tracker.flush()
    assert tracker.pending() == 0 and got == [1]


def test_latencies_a_failing_sink_refused_are_published_later(clock: ManualClock) -> None:
    inner = Metrics(clock=clock)
    fail = {"on": True}

    class Flaky:
        def inc(self, metric: MetricDef, n: int = 1, labels: tuple[str, ...] = ()) -> None:
            inner.inc(metric, n, labels)

        def set(self, metric: MetricDef, value: float, labels: tuple[str, ...] = ()) -> None:
            inner.set(metric, value, labels)

        def observe(self, metric: MetricDef, seconds: float, labels: tuple[str, ...] = ()) -> None:
            if fail["on"]:
                raise RuntimeError("down")
            inner.observe(metric, seconds, labels)

    from presence_core.metrics import DIFF_PROPAGATION_SECONDS

    tracker = Tracker(clock=clock, metrics=Flaky())
    tracker.add_transport(RecordingTransport())
    for topic in ("a", "b", "c"):
        tracker.track("c1", topic, "k", {})
    assert tracker.flush() == 3
    fail["on"] = False
    tracker.sync_metrics()
    assert inner.as_dict()["histograms"][DIFF_PROPAGATION_SECONDS.name]["count"] == 3


def test_a_new_subscriber_gets_a_leaving_meta_where_the_others_saw_it(tracker: Tracker) -> None:
    tracker.track("c1", "a", "alice", {})
    tracker.track("c2", "a", "alice", {})
    tracker.track("c3", "a", "alice", {})
    tracker.flush()
    flushed = tracker.list("a")
    tracker.disconnect("c2")  # the middle meta leaves; the leave is not flushed yet
    view = ClientView(strict=True, topic="a")
    tracker.subscribe("a", view)
    assert view.state == flushed  # n.1, n.2, n.3: in the order every other client holds
    tracker.flush()
    assert view.state == tracker.list("a")
