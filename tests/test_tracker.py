"""The Tracker: operations, diffs and their coalescing, expiry, users, paging, validation."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections import OrderedDict
from typing import Any

import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from presence_core.errors import (
    InvalidMeta,
    MetaTooLarge,
    NotTracked,
    PresenceError,
    PresenceTypeError,
    PresenceValueError,
    QuotaExceeded,
    RateLimited,
    UnknownPlan,
)
from presence_core.limits import Limits
from presence_core.metrics import (
    CONNECTIONS,
    DIFF_PROPAGATION_SECONDS,
    EVICTIONS,
    EXPIRIES,
    HOOK_ERRORS,
    LAST_SEEN_EVICTIONS,
    OPS,
    PRESENCES,
    STATUS_READ_HITS,
    STATUS_READS,
    TOPICS,
    MetricDef,
    Metrics,
)
from presence_core.scaling import LoadSample, ScaleDecision
from presence_core.testing import ClientView, ManualClock, RecordingTransport
from presence_core.tracker import STATUS_ORDER, Totals, Tracker, UserStatus
from presence_core.tracker.tracker import _COUNTERS

ROOM = "room:1"


def metas(*pairs: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"metas": [{"phx_ref": ref, **meta} for ref, meta in pairs]}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def tracker(clock: ManualClock) -> Tracker:
    return Tracker(clock=clock, node="n", connection_ttl=30.0)


@pytest.fixture
def recorder(tracker: Tracker) -> RecordingTransport:
    recorder = RecordingTransport()
    tracker.add_transport(recorder)
    return recorder


# -- track / list --------------------------------------------------------------------------------


def test_track_returns_refs_and_list_has_the_presence_state_shape(tracker: Tracker) -> None:
    r1 = tracker.track("c1", ROOM, "alice", {"status": "online"})
    r2 = tracker.track("c2", ROOM, "alice", {"status": "away"})
    r3 = tracker.track("c2", ROOM, "bob", {})
    assert (r1, r2, r3) == ("n.1", "n.2", "n.3")
    assert tracker.list(ROOM) == {
        "alice": metas((r1, {"status": "online"}), (r2, {"status": "away"})),
        "bob": metas((r3, {})),
    }
    assert tracker.list("elsewhere") == {}


def test_refs_differ_between_trackers_by_default() -> None:
    a, b = Tracker(), Tracker()
    assert a.node != b.node
    assert a.track(1, ROOM, "k", {}, now=0).startswith(a.node + ".")


def test_list_returns_fresh_copies(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {"nested": {"n": 1}})
    first = tracker.list(ROOM)
    first["alice"]["metas"][0]["nested"]["n"] = 2
    first["alice"]["metas"][0].pop("phx_ref")
    first["bob"] = {}
    assert tracker.list(ROOM) == {"alice": metas(("n.1", {"nested": {"n": 1}}))}


def test_meta_is_copied_at_track(tracker: Tracker) -> None:
    meta = {"tags": ["a"]}
    tracker.track("c1", ROOM, "alice", meta)
    meta["tags"].append("b")
    assert tracker.list(ROOM)["alice"]["metas"][0]["tags"] == ["a"]


def test_meta_is_stored_as_its_json_round_trip(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {"pair": (1, 2), "nan": math.nan})
    assert tracker.list(ROOM)["alice"]["metas"][0] == {
        "phx_ref": "n.1",
        "pair": [1, 2],
        "nan": None,
    }


def test_retrack_with_equal_meta_is_a_no_op(tracker: Tracker, recorder: RecordingTransport) -> None:
    ref = tracker.track("c1", ROOM, "alice", {"a": 1, "b": 2})
    tracker.flush()
    recorder.clear()
    # Equal as a dict, even in another key order.
    assert tracker.track("c1", ROOM, "alice", {"b": 2, "a": 1}) == ref
    assert tracker.track("c1", ROOM, "alice", {"a": 1, "b": 2}) == ref
    assert tracker.pending() == 0
    assert tracker.flush() == 0
    assert recorder.events == []


def test_retrack_with_a_new_meta_is_an_update(
    tracker: Tracker, recorder: RecordingTransport
) -> None:
    old = tracker.track("c1", ROOM, "alice", {"status": "online"})
    tracker.flush()
    new = tracker.track("c1", ROOM, "alice", {"status": "away"})
    assert new != old
    tracker.flush()
    assert recorder.diffs(ROOM)[-1] == {
        "joins": {"alice": {"metas": [{"phx_ref": new, "phx_ref_prev": old, "status": "away"}]}},
        "leaves": {"alice": metas((old, {"status": "online"}))},
    }
    assert tracker.totals() == Totals(presences=1, connections=1, topics=1, keys=1)


def test_one_connection_may_hold_several_keys_and_topics(tracker: Tracker) -> None:
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "a", "alias", {})
    tracker.track("c1", "b", "alice", {})
    assert tracker.connection_presences("c1") == [
        ("a", "alice", "n.1"),
        ("a", "alias", "n.2"),
        ("b", "alice", "n.3"),
    ]
    assert tracker.totals() == Totals(presences=3, connections=1, topics=2, keys=2)
    assert tracker.user("alice").presences == 2


def test_metas_of_a_key_stay_in_creation_order_and_update_moves_to_the_end(
    tracker: Tracker,
) -> None:
    tracker.track("c1", ROOM, "alice", {"d": 1})
    tracker.track("c2", ROOM, "alice", {"d": 2})
    tracker.track("c3", ROOM, "alice", {"d": 3})
    tracker.update("c1", ROOM, "alice", {"d": 4})
    assert [m["d"] for m in tracker.list(ROOM)["alice"]["metas"]] == [2, 3, 4]
    tracker.untrack("c3", ROOM)
    tracker.untrack("c2", ROOM)
    assert tracker.list(ROOM) == {"alice": metas(("n.4", {"d": 4}))}


# -- update / untrack / disconnect -------------------------------------------------------------


def test_update(tracker: Tracker) -> None:
    old = tracker.track("c1", ROOM, "alice", {"s": 1})
    new = tracker.update("c1", ROOM, "alice", {"s": 2})
    assert new != old
    assert tracker.list(ROOM) == {"alice": metas((new, {"s": 2}))}
    assert tracker.update("c1", ROOM, "alice", {"s": 2}) == new  # equal meta: no-op


def test_update_of_an_unknown_presence_raises(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {})
    for conn, topic, key in (("c2", ROOM, "alice"), ("c1", "other", "alice"), ("c1", ROOM, "bob")):
        with pytest.raises(NotTracked):
            tracker.update(conn, topic, key, {})
    with pytest.raises(LookupError):  # NotTracked is a LookupError too
        tracker.update("c9", ROOM, "alice", {})


def test_untrack(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c1", ROOM, "alias", {})
    tracker.track("c1", "other", "alice", {})
    assert tracker.untrack("c1", ROOM, "alias") == 1
    assert tracker.untrack("c1", ROOM, "alias") == 0
    tracker.track("c1", ROOM, "alias", {})
    assert tracker.untrack("c1", ROOM) == 2
    assert tracker.untrack("unknown", ROOM) == 0
    assert tracker.list(ROOM) == {}
    assert tracker.totals() == Totals(presences=1, connections=1, topics=1, keys=1)


def test_disconnect(tracker: Tracker, recorder: RecordingTransport) -> None:
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    tracker.track("c2", "a", "bob", {})
    tracker.flush()
    assert tracker.disconnect("c1") == 2
    assert tracker.disconnect("c1") == 0
    assert not tracker.connected("c1")
    tracker.flush()
    assert recorder.diffs("a")[-1] == {"joins": {}, "leaves": {"alice": metas(("n.1", {}))}}
    assert recorder.diffs("b")[-1] == {"joins": {}, "leaves": {"alice": metas(("n.2", {}))}}
    assert tracker.totals() == Totals(presences=1, connections=1, topics=1, keys=1)


def test_count_and_totals(tracker: Tracker) -> None:
    assert tracker.count(ROOM) == 0
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c2", ROOM, "alice", {})
    tracker.track("c2", ROOM, "bob", {})
    tracker.track("c2", "other", "bob", {})
    assert tracker.count(ROOM) == 2
    assert tracker.count(ROOM, metas=True) == 3
    assert tracker.totals() == Totals(presences=4, connections=2, topics=2, keys=2)
    tracker.disconnect("c2")
    assert tracker.totals() == Totals(presences=1, connections=1, topics=1, keys=1)


def test_integer_connection_ids(tracker: Tracker) -> None:
    tracker.track(7, ROOM, "alice", {})
    assert tracker.heartbeat(7)
    assert tracker.connection_presences(7) == [(ROOM, "alice", "n.1")]
    assert tracker.disconnect(7) == 1


# -- heartbeats, expiry, eviction ----------------------------------------------------------------


def test_heartbeat_keeps_every_presence_of_a_connection_alive(
    tracker: Tracker, clock: ManualClock, recorder: RecordingTransport
) -> None:
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    tracker.track("c2", "a", "bob", {})
    tracker.flush()
    for _ in range(5):
        clock.advance(20)
        assert tracker.heartbeat("c1")
        assert tracker.expire() in ([], ["c2"])
    assert tracker.totals() == Totals(presences=2, connections=1, topics=2, keys=1)
    tracker.flush()
    assert recorder.diffs("a")[-1] == {"joins": {}, "leaves": {"bob": metas(("n.3", {}))}}
    clock.advance(31)
    assert tracker.tick() == ["c1"]
    assert tracker.totals() == Totals(0, 0, 0, 0)
    assert recorder.diffs("b")[-1]["leaves"] == {"alice": metas(("n.2", {}))}


def test_heartbeat_of_unknown_or_wrongly_typed_connections(tracker: Tracker) -> None:
    assert tracker.heartbeat("nobody") is False
    assert tracker.heartbeat(1.5) is False  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError):
        tracker.heartbeat(["unhashable"])  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError):
        tracker.heartbeat("c1", now="soon")  # type: ignore[arg-type]
    with pytest.raises(PresenceValueError):
        tracker.heartbeat("c1", now=math.nan)


def test_heartbeat_many(tracker: Tracker, clock: ManualClock) -> None:
    for conn in ("c1", "c2", "c3"):
        tracker.track(conn, ROOM, conn, {})
    clock.advance(25)
    assert tracker.heartbeat_many(["c1", "c2", "zz"]) == 2
    clock.advance(10)
    assert tracker.expire() == ["c3"]
    with pytest.raises(PresenceTypeError):
        tracker.heartbeat_many([["x"]])  # type: ignore[list-item]


def test_writes_count_as_activity(tracker: Tracker, clock: ManualClock) -> None:
    tracker.track("c1", ROOM, "alice", {"v": 0})
    for v in range(1, 4):
        clock.advance(20)
        tracker.update("c1", ROOM, "alice", {"v": v})
        assert tracker.expire() == []
    clock.advance(31)
    assert tracker.expire() == ["c1"]


def test_connect_sets_plan_and_ttl(clock: ManualClock) -> None:
    tracker = Tracker(clock=clock, plans={"default": Limits(), "big": Limits(burst=1000)})
    assert tracker.connect("c1", plan="big", ttl=5)
    assert not tracker.connect("c1", ttl=100)  # existing: ttl changes, plan stays
    clock.advance(50)
    assert tracker.expire() == []
    assert tracker.connect("c2", ttl=5)
    clock.advance(6)
    assert tracker.expire() == ["c2"]
    with pytest.raises(UnknownPlan):
        tracker.connect("c3", plan="gold")


def test_expiry_with_now_arguments_and_no_clock() -> None:
    tracker = Tracker(connection_ttl=10)
    tracker.track("c1", ROOM, "alice", {}, now=100.0)
    assert tracker.expire(now=105.0) == []
    assert tracker.heartbeat("c1", now=108.0)
    assert tracker.expire(now=117.0) == []
    assert tracker.expire(now=118.5) == ["c1"]
    assert tracker.last_seen("alice") == pytest.approx(108.5)


def test_capacity_evicts_the_least_recently_active_connection(clock: ManualClock) -> None:
    evicted: list[object] = []
    tracker = Tracker(clock=clock, max_connections=2, on_evict=evicted.append)
    recorder = RecordingTransport()
    tracker.add_transport(recorder)
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c2", ROOM, "bob", {})
    tracker.flush()
    clock.advance(1)
    tracker.heartbeat("c1")
    tracker.track("c3", ROOM, "carol", {})  # c2 is the least recent
    assert evicted == ["c2"]
    assert sorted(tracker.list(ROOM)) == ["alice", "carol"]
    tracker.flush()
    assert recorder.diffs(ROOM)[-1]["leaves"] == {
        "bob": metas((recorder.diffs(ROOM)[0]["joins"]["bob"]["metas"][0]["phx_ref"], {}))
    }
    assert tracker.metrics.counter(EVICTIONS) == 1  # type: ignore[attr-defined]


def test_failing_on_evict_is_logged_and_counted(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(conn: object) -> None:
        raise RuntimeError("no")

    tracker = Tracker(clock=clock, max_connections=1, on_evict=boom)
    tracker.track("c1", ROOM, "a", {})
    with caplog.at_level(logging.ERROR, logger="presence_core.tracker"):
        tracker.track("c2", ROOM, "b", {})
    assert "on_evict" in caplog.text
    tracker.sync_metrics()
    assert tracker.metrics.counter(HOOK_ERRORS) == 1  # type: ignore[attr-defined]
    assert tracker.list(ROOM).keys() == {"b"}


# -- diffs and coalescing ------------------------------------------------------------------------


def test_join_and_leave_in_one_flush_cancel(tracker: Tracker, recorder: RecordingTransport) -> None:
    tracker.track("c1", ROOM, "alice", {})
    tracker.untrack("c1", ROOM)
    tracker.track("c2", ROOM, "bob", {})
    tracker.disconnect("c2")
    assert tracker.flush() == 0
    assert recorder.events == []


def test_track_then_updates_in_one_flush_join_once_without_prev(
    tracker: Tracker, recorder: RecordingTransport
) -> None:
    tracker.track("c1", ROOM, "alice", {"v": 1})
    tracker.update("c1", ROOM, "alice", {"v": 2})
    last = tracker.update("c1", ROOM, "alice", {"v": 3})
    tracker.flush()
    assert recorder.diffs(ROOM) == [{"joins": {"alice": metas((last, {"v": 3}))}, "leaves": {}}]


def test_updates_of_a_flushed_presence_chain_phx_ref_prev(
    tracker: Tracker, recorder: RecordingTransport
) -> None:
    first = tracker.track("c1", ROOM, "alice", {"v": 1})
    tracker.flush()
    tracker.update("c1", ROOM, "alice", {"v": 2})
    last = tracker.update("c1", ROOM, "alice", {"v": 3})
    tracker.flush()
    assert recorder.diffs(ROOM)[-1] == {
        "joins": {"alice": {"metas": [{"phx_ref": last, "phx_ref_prev": first, "v": 3}]}},
        "leaves": {"alice": metas((first, {"v": 1}))},
    }


def test_update_then_leave_in_one_flush_leaves_the_flushed_ref_only(
    tracker: Tracker, recorder: RecordingTransport
) -> None:
    first = tracker.track("c1", ROOM, "alice", {"v": 1})
    tracker.flush()
    tracker.update("c1", ROOM, "alice", {"v": 2})
    tracker.untrack("c1", ROOM, "alice")
    tracker.flush()
    assert recorder.diffs(ROOM)[-1] == {"joins": {}, "leaves": {"alice": metas((first, {"v": 1}))}}


def test_diffs_are_per_topic(tracker: Tracker, recorder: RecordingTransport) -> None:
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    tracker.track("c1", "c", "alice", {})
    tracker.untrack("c1", "c")
    assert tracker.pending() == 3
    assert tracker.flush() == 2
    assert recorder.topics() == ["a", "b"]


def test_subscribers_get_state_then_diffs_of_their_topic_only(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {})
    tracker.flush()
    sub = RecordingTransport()
    unsubscribe = tracker.subscribe(ROOM, sub)
    assert sub.states(ROOM) == [{"alice": metas(("n.1", {}))}]
    tracker.track("c2", ROOM, "bob", {})
    tracker.track("c2", "other", "bob", {})
    tracker.flush()
    assert [e.topic for e in sub] == [ROOM, ROOM]
    unsubscribe()
    unsubscribe()  # idempotent
    tracker.track("c3", ROOM, "carol", {})
    tracker.flush()
    assert len(sub) == 2


def test_subscribe_without_state(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {})
    sub = RecordingTransport()
    tracker.subscribe(ROOM, sub, send_state=False)
    tracker.flush()
    assert [e.event for e in sub] == ["presence_diff"]


def test_initial_state_is_the_state_as_of_the_last_flush(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {"v": 1})
    tracker.track("c2", ROOM, "bob", {})
    tracker.flush()
    tracker.untrack("c2", ROOM)  # pending leave: still in the initial state
    tracker.update("c1", ROOM, "alice", {"v": 2})  # pending: the old meta is what was flushed
    tracker.track("c3", ROOM, "carol", {})  # pending join: not yet
    assert tracker.initial_state(ROOM) == {
        "alice": metas(("n.1", {"v": 1})),
        "bob": metas(("n.2", {})),
    }
    assert tracker.list(ROOM) == {
        "alice": metas(("n.3", {"v": 2})),
        "carol": metas(("n.4", {})),
    }
    late = ClientView(strict=True)
    tracker.subscribe(ROOM, late)
    tracker.flush()
    assert late.state == tracker.list(ROOM)


def test_a_late_subscriber_never_gets_a_leave_for_a_key_it_does_not_hold(
    tracker: Tracker,
) -> None:
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c2", ROOM, "bob", {})
    tracker.flush()
    tracker.disconnect("c1")
    tracker.disconnect("c2")
    late = ClientView(strict=True)
    tracker.subscribe(ROOM, late)  # strict: raises on any leave it cannot apply
    tracker.flush()
    assert late.state == {} == tracker.list(ROOM)


def test_every_hook_gets_its_own_copy(tracker: Tracker) -> None:
    seen: list[dict[str, Any]] = []

    def vandal(topic: str, event: str, payload: dict[str, Any]) -> None:
        # What Supabase's Python client does to the metas it receives, and worse.
        for entry in payload["joins"].values():
            for meta in entry["metas"]:
                meta["presence_ref"] = meta.pop("phx_ref")
        payload["joins"]["intruder"] = {"metas": []}

    def witness(topic: str, event: str, payload: dict[str, Any]) -> None:
        seen.append(payload)

    tracker.subscribe(ROOM, vandal, send_state=False)
    tracker.subscribe(ROOM, witness, send_state=False)
    tracker.add_transport(vandal)
    tracker.track("c1", ROOM, "alice", {"d": {"x": 1}})
    tracker.flush()
    assert seen == [{"joins": {"alice": metas(("n.1", {"d": {"x": 1}}))}, "leaves": {}}]
    assert tracker.list(ROOM) == {"alice": metas(("n.1", {"d": {"x": 1}}))}


def test_raw_hooks_share_the_json_bytes(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {"v": 1})
    tracker.flush()
    expected_state = (ROOM, "presence_state", b'{"alice":{"metas":[{"phx_ref":"n.1","v":1}]}}')
    got: list[tuple[str, str, Any]] = []
    tracker.subscribe(ROOM, lambda *event: got.append(event), raw=True)
    tracker.send_state(ROOM, lambda *event: got.append(event), raw=True)
    assert got == [expected_state, expected_state]
    got.clear()
    tracker.add_transport(lambda *event: got.append(event), raw=True)
    tracker.track("c2", ROOM, "bob", {})
    tracker.flush()
    assert got[0][2] is got[1][2]  # one bytes object for every raw hook
    assert orjson.loads(got[0][2]) == {"joins": {"bob": metas(("n.2", {}))}, "leaves": {}}
    assert tracker.initial_state_json("nowhere") == b"{}"


def test_a_failing_hook_does_not_stop_the_others(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(topic: str, event: str, payload: dict[str, Any]) -> None:
        raise ValueError("broken hook")

    good = RecordingTransport()
    tracker.subscribe(ROOM, broken, send_state=False)
    tracker.subscribe(ROOM, good, send_state=False)
    tracker.track("c1", ROOM, "alice", {})
    with caplog.at_level(logging.ERROR, logger="presence_core.tracker"):
        assert tracker.flush() == 1
    assert len(good) == 1
    assert "broken hook" in caplog.text
    assert tracker.metrics.counter(HOOK_ERRORS) == 1  # type: ignore[attr-defined]


def test_changes_made_by_hooks_go_out_with_the_next_flush(tracker: Tracker) -> None:
    got = RecordingTransport()

    def echo(topic: str, event: str, payload: dict[str, Any]) -> None:
        got(topic, event, payload)
        if "alice" in payload["joins"]:
            tracker.track("c2", ROOM, "bob", {})

    tracker.subscribe(ROOM, echo, send_state=False)
    tracker.track("c1", ROOM, "alice", {})
    assert tracker.flush() == 1
    assert [list(d["joins"]) for d in got.diffs()] == [["alice"]]
    assert tracker.flush() == 1
    assert [list(d["joins"]) for d in got.diffs()] == [["alice"], ["bob"]]


def test_transports_and_send_state(tracker: Tracker) -> None:
    transport = RecordingTransport()
    remove = tracker.add_transport(transport)
    tracker.track("c1", ROOM, "alice", {})
    tracker.send_state(ROOM, transport)
    assert transport.states(ROOM) == [{}]  # nothing flushed yet
    tracker.flush()
    tracker.send_state(ROOM, transport)
    assert transport.states(ROOM)[-1] == {"alice": metas(("n.1", {}))}
    remove()
    remove()
    tracker.track("c2", ROOM, "bob", {})
    tracker.flush()
    assert len(transport.diffs()) == 1


def test_empty_topics_are_forgotten(tracker: Tracker) -> None:
    unsubscribe = tracker.subscribe("watched", RecordingTransport())
    tracker.track("c1", "t", "alice", {})
    tracker.track("c1", "watched", "alice", {})
    tracker.flush()
    tracker.disconnect("c1")
    tracker.flush()
    assert set(tracker._state.topics) == {"watched"}  # kept while subscribed
    unsubscribe()
    assert tracker._state.topics == {}


def test_flush_records_diff_propagation(tracker: Tracker) -> None:
    for i in range(3):
        tracker.subscribe(ROOM, RecordingTransport(), send_state=False)
        tracker.subscribe(f"t{i}", RecordingTransport(), send_state=False)
        tracker.track(f"c{i}", f"t{i}", "k", {})
    tracker.track("c9", ROOM, "k", {})
    tracker.track("c9", "unheard", "k", {})
    assert tracker.flush() == 4  # the topic nobody hears is not encoded or counted
    histograms = tracker.metrics.as_dict()["histograms"]  # type: ignore[attr-defined]
    assert histograms[DIFF_PROPAGATION_SECONDS.name]["count"] == 4
    tracker.subscribe("unheard", RecordingTransport())
    assert tracker.flush() == 0  # its dropped changes do not come back later


# -- users ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "offline"),
        (["busy"], "busy"),
        (["busy", "away"], "away"),
        (["away", "busy", "online"], "online"),
        ([None], "online"),  # no status field
        (["typing"], "online"),  # an unknown status still means present
        (["busy", 3], "online"),  # so does a non-str one
    ],
)
def test_user_status_is_the_most_available(
    tracker: Tracker, statuses: list[object], expected: str
) -> None:
    for i, status in enumerate(statuses):
        meta = {} if status is None else {"status": status}
        tracker.track(f"c{i}", f"topic{i % 2}", "alice", meta)
    user = tracker.user("alice")
    assert user.status == expected
    assert user.online is (expected != "offline")


def test_user_status_details(tracker: Tracker, clock: ManualClock) -> None:
    tracker.track("phone", "a", "alice", {"device": "phone", "custom_status": "commuting"})
    clock.advance(5)
    tracker.track("laptop", "b", "alice", {"device": "laptop", "custom_status": "in a meeting"})
    tracker.track("laptop", "a", "alice", {"device": "laptop", "status": "busy"})
    clock.advance(5)
    tracker.heartbeat("phone")
    assert tracker.user("alice") == UserStatus(
        key="alice",
        status="online",
        custom_status="in a meeting",
        devices=("phone", "laptop"),
        topics=("a", "b"),
        connections=2,
        presences=3,
        last_active=1010.0,
        last_seen=1010.0,
    )
    # Updating the older presence makes it the newest.
    tracker.update("phone", "a", "alice", {"device": "phone", "custom_status": "driving"})
    assert tracker.user("alice").custom_status == "driving"


def test_last_seen_outlives_the_presence(tracker: Tracker, clock: ManualClock) -> None:
    assert tracker.last_seen("alice") is None
    assert tracker.user("alice") == UserStatus("alice", "offline")
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c2", ROOM, "alice", {})
    clock.advance(10)
    tracker.disconnect("c1")
    assert tracker.user("alice").online
    clock.advance(10)
    tracker.disconnect("c2")
    assert tracker.last_seen("alice") == 1020.0
    assert tracker.user("alice") == UserStatus("alice", "offline", last_seen=1020.0)


def test_last_seen_is_bounded(clock: ManualClock) -> None:
    tracker = Tracker(clock=clock, last_seen_capacity=2, last_seen_ttl=100)
    for key in ("a", "b", "c"):
        tracker.track(key, ROOM, key, {})
        clock.advance(1)
        tracker.disconnect(key)
    assert [tracker.last_seen(k) for k in ("a", "b", "c")] == [None, 1002.0, 1003.0]
    tracker.sync_metrics()
    assert tracker.metrics.counter(LAST_SEEN_EVICTIONS) == 1  # type: ignore[attr-defined]
    clock.advance(200)
    tracker.expire()
    assert tracker.last_seen("c") is None


def test_drain_last_seen(clock: ManualClock) -> None:
    tracker = Tracker(clock=clock, record_last_seen_changes=True)
    tracker.track("c1", ROOM, "alice", {})
    tracker.disconnect("c1")
    assert tracker.drain_last_seen() == [("alice", 1000.0)]
    assert tracker.drain_last_seen() == []
    assert Tracker().drain_last_seen() == []


def test_users_bulk(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {"status": "away"})
    tracker.track("c2", ROOM, "bob", {})
    tracker.disconnect("c2")
    result = tracker.users(["carol", "alice", "bob"])
    assert list(result) == ["carol", "alice", "bob"]
    assert [u.status for u in result.values()] == ["offline", "away", "offline"]
    tracker.sync_metrics()
    metrics = tracker.metrics
    assert metrics.counter(STATUS_READS) == 3  # type: ignore[attr-defined]
    assert metrics.counter(STATUS_READ_HITS) == 2  # type: ignore[attr-defined]
    with pytest.raises(PresenceTypeError):
        tracker.users("alice")
    with pytest.raises(PresenceTypeError):
        tracker.users(["alice", 3])  # type: ignore[list-item]
    with pytest.raises(PresenceValueError):
        tracker.users(["k"] * 10_001)


# -- paging --------------------------------------------------------------------------------------


def walk(tracker: Tracker, topic: str, limit: int) -> list[dict[str, Any]]:
    pages, cursor = [], None
    while True:
        state, cursor = tracker.page(topic, cursor, limit=limit)
        pages.append(state)
        if cursor is None:
            return pages


@pytest.mark.parametrize("size", [0, 1, 7, 300, 2500])
def test_paging_returns_every_key_once_in_order(tracker: Tracker, size: int) -> None:
    for i in range(size):
        tracker.track(f"c{i}", ROOM, f"user{i:05}", {"i": i})
    pages = walk(tracker, ROOM, 100)
    keys = [key for page in pages for key in page]
    assert keys == sorted(f"user{i:05}" for i in range(size))
    merged = {key: entry for page in pages for key, entry in page.items()}
    assert merged == tracker.list(ROOM)


def test_paging_a_changing_topic(tracker: Tracker) -> None:
    for i in range(3000):
        tracker.track(f"c{i}", ROOM, f"user{i:05}", {})
    stable = {f"user{i:05}" for i in range(3000) if i % 3}
    seen: list[str] = []
    cursor = None
    step = 0
    while True:
        state, cursor = tracker.page(ROOM, cursor, limit=250)
        seen.extend(state)
        # Churn between pages: every third user leaves, newcomers join everywhere.
        for i in range(3 * step, 3000, 3 * 12):
            tracker.disconnect(f"c{i}")
        tracker.track(f"n{step}", ROOM, f"user{(step * 997) % 3000:05}x", {})
        step += 1
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert stable <= set(seen)


def test_page_arguments(tracker: Tracker) -> None:
    assert tracker.page("nothing") == ({}, None)
    with pytest.raises(PresenceValueError):
        tracker.page(ROOM, limit=0)
    with pytest.raises(PresenceTypeError):
        tracker.page(ROOM, limit=1.5)  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError):
        tracker.page(ROOM, cursor=3)  # type: ignore[arg-type]


# -- metrics and scaling -------------------------------------------------------------------------


def test_metrics_are_published_on_flush(tracker: Tracker, clock: ManualClock) -> None:
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c2", ROOM, "bob", {})
    tracker.heartbeat("c1")
    tracker.heartbeat("c1")
    clock.advance(31)
    tracker.tick()
    metrics = tracker.metrics
    assert isinstance(metrics, Metrics)
    assert metrics.counter(OPS, "track") == 2
    assert metrics.counter(OPS, "heartbeat") == 2
    assert metrics.counter(EXPIRIES) == 2
    assert (metrics.gauge(PRESENCES), metrics.gauge(CONNECTIONS), metrics.gauge(TOPICS)) == (
        0,
        0,
        0,
    )


def test_load_sample_and_scalers(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {})
    sample = tracker.load_sample()
    assert (sample.presences, sample.connections, sample.topics) == (1, 1, 1)
    assert sample.at == 1000.0 and sample.memory_bytes > 0

    decisions: list[LoadSample] = []

    def scaler(s: LoadSample) -> ScaleDecision | None:
        decisions.append(s)
        return ScaleDecision("hold", 1, 1, "fine") if len(decisions) == 1 else None

    tracker.add_scaler(scaler)
    assert [d.action for d in tracker.run_scalers()] == ["hold"]
    assert tracker.run_scalers(sample=sample) == []
    assert decisions[-1] is sample
    with pytest.raises(PresenceTypeError):
        tracker.run_scalers(sample={"presences": 1})  # type: ignore[arg-type]


def test_a_custom_metrics_sink(clock: ManualClock) -> None:
    calls: list[tuple[str, str, float, tuple[str, ...]]] = []

    class Sink:
        def inc(self, metric: MetricDef, n: int = 1, labels: tuple[str, ...] = ()) -> None:
            calls.append(("inc", metric.name, n, labels))

        def set(self, metric: MetricDef, value: float, labels: tuple[str, ...] = ()) -> None:
            calls.append(("set", metric.name, value, labels))

        def observe(self, metric: MetricDef, seconds: float, labels: tuple[str, ...] = ()) -> None:
            calls.append(("observe", metric.name, seconds, labels))

    tracker = Tracker(clock=clock, metrics=Sink())
    tracker.track("c1", ROOM, "alice", {})
    tracker.flush()
    assert ("inc", OPS.name, 1, ("track",)) in calls
    assert ("set", PRESENCES.name, 1, ()) in calls
    assert tracker.load_sample().presences == 1
    with pytest.raises(PresenceTypeError):
        Tracker(metrics=object())  # type: ignore[arg-type]


# -- constructor ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"connection_ttl": 0}, PresenceValueError),
        ({"connection_ttl": math.inf}, PresenceValueError),
        ({"connection_ttl": "60"}, PresenceTypeError),
        ({"max_connections": 0}, PresenceValueError),
        ({"max_connections": 1.0}, PresenceTypeError),
        ({"last_seen_capacity": True}, PresenceTypeError),
        ({"last_seen_ttl": -1}, PresenceValueError),
        ({"plans": {"pro": Limits()}}, UnknownPlan),
        ({"plans": {"default": {}}}, PresenceTypeError),
        ({"plans": [("default", Limits())]}, PresenceTypeError),
        ({"clock": 5}, PresenceTypeError),
        ({"node": "has.dot"}, PresenceValueError),
        ({"node": ""}, PresenceValueError),
        ({"transports": [None]}, PresenceTypeError),
        ({"scalers": ["no"]}, PresenceTypeError),
        ({"on_evict": 1}, PresenceTypeError),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Tracker(**kwargs)


def test_errors_are_presence_errors() -> None:
    assert issubclass(InvalidMeta, TypeError) and issubclass(InvalidMeta, PresenceError)
    assert issubclass(MetaTooLarge, ValueError) and issubclass(MetaTooLarge, PresenceError)
    assert issubclass(UnknownPlan, ValueError)


def test_repr(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {})
    assert repr(tracker) == "<Tracker node='n' presences=1 connections=1 topics=1 keys=1>"


# -- bad input changes nothing -------------------------------------------------------------------


def snapshot(tracker: Tracker) -> Any:
    """Everything observable about a tracker, plus the internals a refused call could touch."""
    state = tracker._state
    topics = sorted(state.topics)
    conns = sorted(tracker._conns, key=repr)
    records = {c: tracker._conns.get(c) for c in conns}
    return (
        tracker.totals(),
        {
            t: (tracker.list(t), tracker.initial_state(t), tracker.count(t, metas=True))
            for t in topics
        },
        {
            c: (tracker.connection_presences(c), r, tracker._conns.deadline(c))
            for c, r in records.items()
            if r is not None
        },
        {k: tracker._user(k) for k in ("alice", "bob", "carol", "dave")},
        {
            k: sorted(map(repr, v if isinstance(v, (list, dict)) else [v]))
            for k, v in state.users.items()
        },
        tracker.pending(),
        state.data_bytes,
        len(tracker._seen),
        # Counters (a refusal may count itself in limit_hits, nothing else; the snapshot's own
        # status reads count themselves) and the tables.
        [
            n
            for n, (metric, _) in zip(tracker._counts, _COUNTERS, strict=True)
            if metric not in (STATUS_READS, STATUS_READ_HITS)
        ],
        tracker._n_heartbeat,
        tracker._conns.stats(),
        tracker._seen.stats(),
        {t: tracker.user(t).status for t in ("alice", "bob", "carol", "dave", "erin")},
    )


@pytest.fixture
def busy(clock: ManualClock) -> Tracker:
    tracker = Tracker(
        clock=clock,
        node="n",
        plans={
            "default": Limits(max_meta_bytes=64, max_metas_per_key=3),
            "tight": Limits(rate_per_second=1, burst=1),
            "small": Limits(
                max_presences_per_connection=2, max_topics_per_connection=2, max_metas_per_key=3
            ),
        },
    )
    tracker.track("c1", ROOM, "alice", {"status": "online"})
    tracker.track("c2", ROOM, "alice", {"status": "away"})
    tracker.track("c2", "other", "bob", {})
    tracker.flush()
    tracker.update("c1", ROOM, "alice", {"status": "busy"})  # pending changes too
    tracker.track("c3", ROOM, "carol", {})
    tracker.disconnect("c2")
    tracker.track("c2", ROOM, "dave", {})
    tracker.connect("slow", plan="tight")
    tracker.track("slow", ROOM, "alice", {})  # spends its only token
    tracker.connect("small", plan="small")
    tracker.track("small", ROOM, "erin", {})
    tracker.track("small", "other", "erin", {})  # at its presence and topic quotas
    tracker.track(7, "other", "erin", {})  # an int id, which True and 7.0 compare equal to
    tracker.track(8, "other", "erin", {})  # erin now has max_metas_per_key metas in "other"
    return tracker


class Unserialisable:
    pass


class Sneaky(dict[str, Any]):
    def __contains__(self, key: object) -> bool:
        return False


def deep(depth: int) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for _ in range(depth):
        meta = {"a": meta}
    return meta


BAD_CALLS: list[tuple[str, Any, type[Exception]]] = [
    # connection ids
    ("track conn None", lambda t: t.track(None, ROOM, "k", {}), PresenceTypeError),
    ("track conn float", lambda t: t.track(1.5, ROOM, "k", {}), PresenceTypeError),
    ("track conn bool", lambda t: t.track(True, ROOM, "k", {}), PresenceTypeError),
    ("track conn empty", lambda t: t.track("", ROOM, "k", {}), PresenceValueError),
    ("track conn long", lambda t: t.track("c" * 257, ROOM, "k", {}), PresenceValueError),
    ("track conn list", lambda t: t.track(["c1"], ROOM, "k", {}), PresenceTypeError),
    # The fast path of track once skipped the id check for non-ASCII ids: a lone surrogate got
    # in, and disconnect, untrack and update then refused the id, so nothing could remove it.
    ("track conn surrogate", lambda t: t.track("c\ud800", ROOM, "k", {}), PresenceValueError),
    ("track conn surrogate 2", lambda t: t.track("\udfff", ROOM, "k", {}), PresenceValueError),
    ("connect conn surrogate", lambda t: t.connect("c\ud800"), PresenceValueError),
    # topics and keys
    ("track topic int", lambda t: t.track("c1", 1, "k", {}), PresenceTypeError),
    ("track topic empty", lambda t: t.track("c1", "", "k", {}), PresenceValueError),
    ("track topic long", lambda t: t.track("c1", "t" * 257, "k", {}), PresenceValueError),
    ("track topic surrogate", lambda t: t.track("c1", "t\ud800", "k", {}), PresenceValueError),
    ("track key bytes", lambda t: t.track("c1", ROOM, b"k", {}), PresenceTypeError),
    ("track key empty", lambda t: t.track("c1", ROOM, "", {}), PresenceValueError),
    ("track key long", lambda t: t.track("c9", ROOM, "k" * 257, {}), PresenceValueError),
    ("track key surrogate", lambda t: t.track("c1", ROOM, "\udfff", {}), PresenceValueError),
    ("track key __proto__", lambda t: t.track("c1", ROOM, "__proto__", {}), PresenceValueError),
    ("update key __proto__", lambda t: t.update("c1", ROOM, "__proto__", {}), PresenceValueError),
    # metas
    ("meta list", lambda t: t.track("c1", ROOM, "k", []), InvalidMeta),
    ("meta None", lambda t: t.track("c9", ROOM, "k", None), InvalidMeta),
    ("meta object", lambda t: t.track("c1", ROOM, "k", {"o": Unserialisable()}), InvalidMeta),
    ("meta int key", lambda t: t.track("c1", ROOM, "k", {1: "x"}), InvalidMeta),
    ("meta nested", lambda t: t.track("c1", ROOM, "k", {"a": {"b": {2}}}), InvalidMeta),
    ("meta phx_ref", lambda t: t.track("c1", ROOM, "k", {"phx_ref": "x"}), PresenceValueError),
    ("meta prev", lambda t: t.track("c1", ROOM, "k", {"phx_ref_prev": "x"}), PresenceValueError),
    (
        "meta presence_ref",
        lambda t: t.track("c1", ROOM, "k", {"presence_ref": 1}),
        PresenceValueError,
    ),
    ("meta too big", lambda t: t.track("c1", ROOM, "k", {"x": "y" * 60}), MetaTooLarge),
    ("meta too big new", lambda t: t.track("c9", ROOM, "k", {"x": "y" * 60}), MetaTooLarge),
    # time
    ("track now str", lambda t: t.track("c1", ROOM, "k", {}, now="1"), PresenceTypeError),
    ("track now nan", lambda t: t.track("c1", ROOM, "k", {}, now=math.nan), PresenceValueError),
    ("track now inf", lambda t: t.track("c9", ROOM, "k", {}, now=math.inf), PresenceValueError),
    ("track now bool", lambda t: t.track("c1", ROOM, "k", {}, now=True), PresenceTypeError),
    # update
    ("update untracked", lambda t: t.update("c1", ROOM, "zed", {}), NotTracked),
    ("update unknown conn", lambda t: t.update("c9", ROOM, "alice", {}), NotTracked),
    (
        "update bad meta",
        lambda t: t.update("c1", ROOM, "alice", {"phx_ref": 1}),
        PresenceValueError,
    ),
    ("update meta big", lambda t: t.update("c1", ROOM, "alice", {"x": "y" * 99}), MetaTooLarge),
    ("update bad key", lambda t: t.update("c1", ROOM, 5, {}), PresenceTypeError),
    (
        "update bad now",
        lambda t: t.update("c1", ROOM, "alice", {}, now=-math.inf),
        PresenceValueError,
    ),
    # untrack, disconnect, connect, heartbeat, expire
    ("untrack bad topic", lambda t: t.untrack("c1", None), PresenceTypeError),
    ("untrack bad key", lambda t: t.untrack("c1", ROOM, ""), PresenceValueError),
    ("untrack bad conn", lambda t: t.untrack(2.0, ROOM), PresenceTypeError),
    ("untrack bad now", lambda t: t.untrack("c1", ROOM, now="x"), PresenceTypeError),
    ("disconnect bad conn", lambda t: t.disconnect(b"c1"), PresenceTypeError),
    ("disconnect bad now", lambda t: t.disconnect("c1", now=math.nan), PresenceValueError),
    ("connect unknown plan", lambda t: t.connect("c1", plan="gold"), UnknownPlan),
    ("connect plan type", lambda t: t.connect("c1", plan=1), PresenceTypeError),
    ("connect ttl zero", lambda t: t.connect("c1", ttl=0), PresenceValueError),
    ("connect ttl nan", lambda t: t.connect("c9", ttl=math.nan), PresenceValueError),
    ("connect ttl inf", lambda t: t.connect("c1", ttl=math.inf), PresenceValueError),
    ("connect ttl str", lambda t: t.connect("c1", ttl="5"), PresenceTypeError),
    ("connect ttl bool", lambda t: t.connect("c1", ttl=True), PresenceTypeError),
    ("heartbeat unhashable", lambda t: t.heartbeat({}), PresenceTypeError),
    ("heartbeat bad now", lambda t: t.heartbeat("c1", now="x"), PresenceTypeError),
    (
        "heartbeat_many bad now",
        lambda t: t.heartbeat_many(["c1"], now=math.inf),
        PresenceValueError,
    ),
    ("expire bad now", lambda t: t.expire(now="x"), PresenceTypeError),
    ("tick bad now", lambda t: t.tick(now=math.nan), PresenceValueError),
    # limits
    ("rate limited", lambda t: t.track("slow", ROOM, "bob", {}), PresenceError),
    ("rate limited update", lambda t: t.update("slow", ROOM, "alice", {"v": 1}), PresenceError),
    # reads and delivery
    ("count bad topic", lambda t: t.count(3), PresenceTypeError),
    ("list bad topic", lambda t: t.list(""), PresenceValueError),
    ("page bad limit", lambda t: t.page(ROOM, limit=-1), PresenceValueError),
    ("user bad key", lambda t: t.user(None), PresenceTypeError),
    ("user bad now", lambda t: t.user("alice", now="x"), PresenceTypeError),
    ("users bad key", lambda t: t.users(["alice", ""]), PresenceValueError),
    ("subscribe bad callback", lambda t: t.subscribe(ROOM, "nope"), PresenceTypeError),
    ("subscribe bad topic", lambda t: t.subscribe(1, print), PresenceTypeError),
    ("add_transport bad", lambda t: t.add_transport(None), PresenceTypeError),
    ("drain_last_seen bad", lambda t: t.drain_last_seen(-1), PresenceValueError),
    ("connection_presences bad", lambda t: t.connection_presences([]), PresenceTypeError),
    # more of every public call: wrong types, bools for ints, non-finite times, huge input
    ("track conn float equal", lambda t: t.track(7.0, ROOM, "k", {}), PresenceTypeError),
    ("track key int", lambda t: t.track("c1", ROOM, 5, {}), PresenceTypeError),
    ("track topic huge", lambda t: t.track("c1", "t" * 10**6, "k", {}), PresenceValueError),
    ("track now -inf", lambda t: t.track("c1", ROOM, "k", {}, now=-math.inf), PresenceValueError),
    ("track now complex", lambda t: t.track("c1", ROOM, "k", {}, now=1j), PresenceTypeError),
    ("meta deep", lambda t: t.track("c1", ROOM, "k", deep(300)), InvalidMeta),
    ("meta big int", lambda t: t.track("c1", ROOM, "k", {"n": 2**64}), InvalidMeta),
    ("meta bytes", lambda t: t.track("c1", ROOM, "k", {"b": b"x"}), InvalidMeta),
    ("meta tuple key", lambda t: t.track("c1", ROOM, "k", {("a",): 1}), InvalidMeta),
    ("meta surrogate", lambda t: t.track("c1", ROOM, "k", {"s": "\ud800"}), InvalidMeta),
    ("meta huge", lambda t: t.track("c1", ROOM, "k", {"x": "y" * 10**6}), MetaTooLarge),
    ("update conn bool", lambda t: t.update(True, ROOM, "alice", {}), PresenceTypeError),
    ("update meta list", lambda t: t.update("c1", ROOM, "alice", [1]), InvalidMeta),
    ("untrack conn bool", lambda t: t.untrack(True, ROOM), PresenceTypeError),
    ("disconnect conn bool", lambda t: t.disconnect(True), PresenceTypeError),
    ("disconnect conn float", lambda t: t.disconnect(7.0), PresenceTypeError),
    ("connect conn None", lambda t: t.connect(None), PresenceTypeError),
    ("connect now inf", lambda t: t.connect("c1", now=math.inf), PresenceValueError),
    ("heartbeat_many str", lambda t: t.heartbeat_many("c1"), PresenceTypeError),
    ("heartbeat_many bytes", lambda t: t.heartbeat_many(b"\x07"), PresenceTypeError),
    ("heartbeat_many None", lambda t: t.heartbeat_many(None), PresenceTypeError),
    ("heartbeat_many bad now", lambda t: t.heartbeat_many([7], now="x"), PresenceTypeError),
    ("heartbeat wrong id bad now", lambda t: t.heartbeat(7.0, now="x"), PresenceTypeError),
    ("expire now bool", lambda t: t.expire(now=False), PresenceTypeError),
    # quotas at their limit + 1
    ("quota presences", lambda t: t.track("small", "third", "erin", {}), QuotaExceeded),
    ("quota metas per key", lambda t: t.track("c9", "other", "erin", {}), QuotaExceeded),
    ("rate limited retrack", lambda t: t.track("slow", ROOM, "alice", {"v": 2}), RateLimited),
    # reads
    ("count None", lambda t: t.count(None), PresenceTypeError),
    ("list huge topic", lambda t: t.list("t" * 10**6), PresenceValueError),
    ("initial_state bytes", lambda t: t.initial_state(b"r"), PresenceTypeError),
    ("initial_state_json None", lambda t: t.initial_state_json(None), PresenceTypeError),
    ("page cursor int", lambda t: t.page(ROOM, 5), PresenceTypeError),
    ("page limit bool", lambda t: t.page(ROOM, limit=True), PresenceTypeError),
    ("page limit float", lambda t: t.page(ROOM, limit=1.5), PresenceTypeError),
    ("page limit zero", lambda t: t.page(ROOM, limit=0), PresenceValueError),
    ("users None", lambda t: t.users(None), PresenceTypeError),
    ("users int", lambda t: t.users(5), PresenceTypeError),
    ("users bytes", lambda t: t.users(b"ab"), PresenceTypeError),
    ("users endless", lambda t: t.users(itertools.repeat("alice")), PresenceValueError),
    ("users bad now", lambda t: t.users(["alice"], now=math.nan), PresenceValueError),
    ("last_seen int", lambda t: t.last_seen(5), PresenceTypeError),
    ("connected None", lambda t: t.connected(None), PresenceTypeError),
    ("send_state bad transport", lambda t: t.send_state(ROOM, None), PresenceTypeError),
    ("send_state bad topic", lambda t: t.send_state(1, print), PresenceTypeError),
    ("add_scaler bad", lambda t: t.add_scaler(None), PresenceTypeError),
    ("run_scalers bad sample", lambda t: t.run_scalers(sample={}), PresenceTypeError),
    ("load_sample bad now", lambda t: t.load_sample(now="x"), PresenceTypeError),
    ("load_sample bad wall_time", lambda t: t.load_sample(wall_time="x"), PresenceTypeError),
    ("load_sample bad memory", lambda t: t.load_sample(memory_bytes="x"), PresenceTypeError),
    ("load_sample memory bool", lambda t: t.load_sample(memory_bytes=True), PresenceTypeError),
    ("load_sample memory < 0", lambda t: t.load_sample(memory_bytes=-1), PresenceValueError),
    ("drain_last_seen bool", lambda t: t.drain_last_seen(True), PresenceTypeError),
    # a dict subclass that hides a reserved key from `in`; int ids too big to even print
    ("meta hides phx_ref", lambda t: t.track("c1", ROOM, "k", Sneaky(phx_ref="x")), PresenceError),
    ("track huge int conn", lambda t: t.track(10**5000, ROOM, "k", {}), PresenceValueError),
    ("update huge int conn", lambda t: t.update(-(2**63) - 1, ROOM, "k", {}), PresenceValueError),
    ("untrack huge int conn", lambda t: t.untrack(2**64, ROOM), PresenceValueError),
    ("connect huge int conn", lambda t: t.connect(2**63), PresenceValueError),
]


@pytest.mark.parametrize(
    ("call", "error"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_a_refused_call_changes_nothing(busy: Tracker, call: Any, error: type[Exception]) -> None:
    before = snapshot(busy)
    with pytest.raises(error) as info:
        call(busy)
    assert isinstance(info.value, PresenceError)
    assert str(info.value)  # a message that says what was wrong
    assert snapshot(busy) == before
    # ...and the tracker still works normally afterwards.
    busy.track("c1", ROOM, "alice", {"status": "online", "after": True})
    busy.flush()


# -- presence_core.testing -----------------------------------------------------------------------


def test_recording_transport_filters() -> None:
    recorder = RecordingTransport()
    recorder("a", "presence_state", {})
    recorder("b", "presence_diff", {"joins": {}, "leaves": {}})
    recorder("a", "presence_diff", {"joins": {"k": {"metas": []}}, "leaves": {}})
    assert len(recorder) == 3 and recorder.topics() == ["a", "b"]
    assert recorder.states() == [{}]
    assert recorder.diffs("a") == [{"joins": {"k": {"metas": []}}, "leaves": {}}]
    assert [e.topic for e in recorder.filter(event="presence_diff")] == ["b", "a"]
    recorder.clear()
    assert list(recorder) == [] and "events=0" in repr(recorder)


def test_manual_clock() -> None:
    clock = ManualClock(5)
    assert clock() == 5.0 and clock.advance(2.5) == 7.5
    clock.set(1)
    assert clock() == 1.0
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_client_view_applies_like_a_client_and_catches_bad_streams() -> None:
    view = ClientView(topic="t")
    view("other", "presence_state", {"x": metas(("0", {}))})  # not its topic
    view("t", "presence_state", {"a": metas(("1", {"v": 1}), ("2", {}))})
    view(
        "t", "presence_diff", {"joins": {"a": metas(("3", {}))}, "leaves": {"a": metas(("1", {}))}}
    )
    assert view.state == {"a": metas(("2", {}), ("3", {}))}
    view("t", "presence_diff", {"joins": {}, "leaves": {"ghost": metas(("9", {}))}})  # lenient

    strict = ClientView(strict=True)
    strict.apply_state({"a": metas(("1", {}))})
    bad_diffs = [
        {"joins": {}, "leaves": {"ghost": metas(("9", {}))}},
        {"joins": {}, "leaves": {"a": metas(("9", {}))}},
        {"joins": {"a": metas(("1", {}))}, "leaves": {}},
        {"joins": {"b": metas(("5", {}))}, "leaves": {"b": metas(("5", {}))}},
        {"joins": {"a": {"metas": [{"phx_ref": "6", "phx_ref_prev": "1"}]}}, "leaves": {}},
    ]
    for diff in bad_diffs:
        with pytest.raises(AssertionError):
            strict.apply_diff(diff)


# -- ids of another type, clocks that misbehave --------------------------------------------------


def test_heartbeat_with_an_id_of_another_type_finds_no_connection(
    tracker: Tracker, clock: ManualClock
) -> None:
    # True == 1 and 1.0 == 1 in Python, but no connection has a bool or float id.
    tracker.track(1, ROOM, "alice", {})
    tracker.track("a", ROOM, "bob", {})
    clock.advance(20)
    assert tracker.heartbeat(True) is False  # type: ignore[arg-type]
    assert tracker.heartbeat(1.0) is False  # type: ignore[arg-type]
    assert tracker.heartbeat_many([True, 1.0, "a"]) == 1  # type: ignore[list-item]
    with pytest.raises(PresenceTypeError):
        tracker.heartbeat_many([1.0, ["unhashable"]])  # type: ignore[list-item]
    with pytest.raises(PresenceTypeError):
        tracker.heartbeat_many("a")  # a str is not a batch of ids
    clock.advance(15)
    assert tracker.expire() == [1]  # only "a" was refreshed
    tracker.sync_metrics()
    assert tracker.metrics.counter(OPS, "heartbeat") == 1  # type: ignore[attr-defined]


def test_a_clock_that_returns_garbage_is_refused_before_anything_changes() -> None:
    readings: list[object] = [1000.0]
    tracker = Tracker(clock=lambda: readings[-1], node="n")  # type: ignore[arg-type,return-value]
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c1", ROOM, "bob", {})
    tracker.track("c2", "other", "carol", {})
    tracker.flush()
    for bad in (math.nan, math.inf, None, "soon"):
        readings.append(bad)
        before = snapshot(tracker)
        for call in (
            lambda: tracker.track("c1", "x", "dave", {}),
            lambda: tracker.update("c1", ROOM, "alice", {"v": 1}),
            lambda: tracker.untrack("c1", ROOM),
            lambda: tracker.disconnect("c1"),
            lambda: tracker.connect("c3"),
            lambda: tracker.expire(),
            lambda: tracker.tick(),
            lambda: tracker.load_sample(),
        ):
            with pytest.raises(PresenceError, match="clock"):
                call()
            assert snapshot(tracker) == before
    readings.append(1001.0)
    assert tracker.disconnect("c1") == 2
    assert tracker.last_seen("alice") == 1001.0


# -- hooks that misbehave ------------------------------------------------------------------------


def test_a_subscriber_whose_initial_state_raises_is_not_left_subscribed(tracker: Tracker) -> None:
    calls: list[str] = []

    def broken(topic: str, event: str, payload: Any) -> None:
        calls.append(event)
        raise RuntimeError("socket closed")

    with pytest.raises(RuntimeError):
        tracker.subscribe("lonely", broken)
    assert "lonely" not in tracker._state.topics  # nothing left behind for an empty topic
    with pytest.raises(RuntimeError):
        tracker.subscribe(ROOM, broken)
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c1", "lonely", "alice", {})
    tracker.flush()
    assert calls == ["presence_state", "presence_state"]  # never a diff
    assert tracker.metrics.counter(HOOK_ERRORS) == 0  # type: ignore[attr-defined]


def test_hooks_that_mutate_their_payload_cannot_corrupt_anything(tracker: Tracker) -> None:
    def vandal(topic: str, event: str, payload: Any) -> None:
        # What Supabase's Python client does, and worse.
        entries = payload.values() if event == "presence_state" else payload["joins"].values()
        for entry in entries:
            for meta in entry["metas"]:
                meta["presence_ref"] = meta.pop("phx_ref")
                meta["status"] = "vandalised"
            entry["metas"].append({"phx_ref": "forged"})
        payload.clear()

    view = ClientView(strict=True)
    tracker.add_transport(vandal)
    tracker.subscribe(ROOM, vandal)
    tracker.subscribe(ROOM, view)
    tracker.track("c1", ROOM, "alice", {"status": "away", "tags": ["x"]})
    tracker.flush()
    tracker.update("c1", ROOM, "alice", {"status": "busy", "tags": ["y"]})
    tracker.send_state(ROOM, vandal)
    tracker.flush()
    expected = {"alice": metas(("n.2", {"status": "busy", "tags": ["y"]}))}
    assert tracker.list(ROOM) == view.state == tracker.initial_state(ROOM) == expected
    assert tracker.user("alice").status == "busy"


def test_a_flush_called_from_a_hook_never_reorders_diffs(tracker: Tracker) -> None:
    # The first hook reacts to a join by untracking it and flushing at once.  Flushing there
    # would hand the later hooks the leave before the join they have not been given yet.
    def impatient(topic: str, event: str, payload: Any) -> None:
        if event == "presence_diff" and "alice" in payload["joins"]:
            tracker.untrack("c1", ROOM)
            assert tracker.flush() == 0  # deferred: goes out with the next flush
            tracker.tick()

    tracker.subscribe(ROOM, impatient)
    view = ClientView(strict=True)
    tracker.subscribe(ROOM, view)
    transport_view = ClientView(strict=True, topic=ROOM)
    tracker.add_transport(transport_view)
    tracker.send_state(ROOM, transport_view)
    tracker.track("c1", ROOM, "alice", {})
    assert tracker.flush() == 1
    assert view.state == transport_view.state == {"alice": metas(("n.1", {}))}
    assert tracker.pending() == 1
    assert tracker.flush() == 1
    assert view.state == transport_view.state == tracker.list(ROOM) == {}
    assert tracker.metrics.counter(HOOK_ERRORS) == 0  # type: ignore[attr-defined]


def test_a_hook_removed_during_a_flush_gets_nothing_more(tracker: Tracker) -> None:
    got: list[tuple[str, str]] = []
    removers: dict[str, Any] = {}

    def first(topic: str, event: str, payload: Any) -> None:
        got.append(("first", topic))
        # A socket closes: the host removes its other hooks, and this one too.
        removers["second"]()
        removers["transport"]()
        removers["first"]()

    def second(topic: str, event: str, payload: Any) -> None:
        got.append(("second", topic))

    def transport(topic: str, event: str, payload: Any) -> None:
        got.append(("transport", topic))

    others = RecordingTransport()
    removers["first"] = tracker.subscribe(ROOM, first, send_state=False)
    removers["second"] = tracker.subscribe(ROOM, second, send_state=False)
    tracker.subscribe(ROOM, others, send_state=False)
    removers["transport"] = tracker.add_transport(transport)
    tracker.track("c1", ROOM, "alice", {})
    tracker.track("c1", "zzz", "alice", {})
    tracker.flush()
    assert got == [("first", ROOM)]
    assert len(others.diffs(ROOM)) == 1  # the others still get theirs
    tracker.track("c2", ROOM, "bob", {})
    tracker.flush()
    assert got == [("first", ROOM)] and len(others.diffs(ROOM)) == 2


def test_hooks_may_subscribe_and_track_during_delivery(tracker: Tracker) -> None:
    late = ClientView(strict=True)

    def recruiter(topic: str, event: str, payload: Any) -> None:
        if event == "presence_diff" and "alice" in payload["joins"]:
            tracker.subscribe(ROOM, late)  # starts from the state this diff leads to
            tracker.track("c2", ROOM, "bob", {})

    tracker.subscribe(ROOM, recruiter, send_state=False)
    tracker.track("c1", ROOM, "alice", {})
    tracker.flush()
    tracker.flush()
    assert late.state == tracker.list(ROOM)
    assert sorted(late.state) == ["alice", "bob"]


def test_a_failing_metrics_sink_loses_no_diff(clock: ManualClock) -> None:
    class BrokenSink:
        def inc(self, name: str, n: int = 1) -> None:
            pass

        def set(self, name: str, value: float) -> None:
            pass

        def observe(self, name: str, seconds: float) -> None:
            raise RuntimeError("sink down")

    tracker = Tracker(clock=clock, metrics=BrokenSink(), node="n")
    view_a, view_b = ClientView(strict=True), ClientView(strict=True)
    tracker.subscribe("a", view_a)
    tracker.subscribe("b", view_b)
    tracker.track("c1", "a", "alice", {})
    tracker.track("c1", "b", "alice", {})
    assert tracker.flush() == 2
    assert view_a.state == tracker.list("a") and view_b.state == tracker.list("b")


# -- capacity evictions and on_evict -------------------------------------------------------------


def test_on_evict_may_call_back_into_the_tracker(clock: ManualClock) -> None:
    # The host closes the evicted socket, which flushes and reconnects things synchronously.
    def on_evict(conn: object) -> None:
        assert conn not in tracker._conns  # gone, with its presences, before the call
        tracker.flush()
        tracker.track("side", "elsewhere", "zed", {})

    tracker = Tracker(clock=clock, node="n", max_connections=2, on_evict=on_evict)
    view = ClientView(strict=True)
    tracker.subscribe(ROOM, view)
    tracker.track("c1", ROOM, "alice", {})
    tracker.flush()
    clock.advance(1)
    tracker.connect("side")
    tracker.track("c2", ROOM, "bob", {})  # c1 is evicted; ROOM is empty for a moment
    assert tracker.list("elsewhere") == {"zed": metas(("n.3", {}))}
    tracker.flush()
    assert tracker.list(ROOM) == view.state == {"bob": metas(("n.2", {}))}
    assert tracker.count(ROOM) == 1 and ROOM in tracker._state.topics
    totals = tracker.totals()
    assert totals.presences == sum(tracker.count(t, metas=True) for t in tracker._state.topics)
    assert tracker.disconnect("c2") == 1
    tracker.flush()
    assert view.state == tracker.list(ROOM) == {}


# -- costs that must not grow with the size of a key or a topic ----------------------------------


def _median_seconds(calls: list[Any]) -> float:
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_a_key_held_by_many_connections_leaves_in_constant_time() -> None:
    # A popular key ("anonymous", a bot, a shared kiosk account) may be held by a great many
    # connections across topics; each one leaving must not scan all the others.
    tracker = Tracker(node="n", clock=ManualClock(0.0))
    n = 20_000
    for i in range(n):
        tracker.track(i, f"doc{i % 500}", "anonymous", {})
        tracker.track(-1 - i, f"doc{i % 500}", f"user{i}", {})
    # The most recent holders are the ones a scan would reach last.
    shared = _median_seconds([lambda i=i: tracker.disconnect(i) for i in range(n - 1, n - 41, -1)])
    alone = _median_seconds([lambda i=i: tracker.disconnect(-1 - i) for i in range(40)])
    assert shared < 5 * alone + 20e-6, (shared, alone)


def test_subscribing_to_a_big_topic_costs_the_same_as_to_a_small_one(tracker: Tracker) -> None:
    def hook(topic: str, event: str, payload: Any) -> None:
        pass

    n = 40_000
    removers = [tracker.subscribe(ROOM, hook, send_state=False, raw=True) for _ in range(n)]
    big = _median_seconds(
        [lambda: removers.append(tracker.subscribe(ROOM, hook, send_state=False))] * 40
    )
    last = _median_seconds([removers.pop() for _ in range(40)])
    small = _median_seconds(
        [lambda: tracker.subscribe("small", hook, send_state=False)() for _ in range(40)]
    )
    assert big < 5 * small + 20e-6, (big, small)
    assert last < 5 * small + 20e-6, (last, small)


# -- the Tracker against a naive model of presence -----------------------------------------------

MODEL_CONNS: tuple[str | int, ...] = ("c1", "c2", "c3", 4, 5)
MODEL_TOPICS = ("a", "b", "c")
MODEL_KEYS = ("k1", "k2", "k3")
MODEL_METAS: tuple[dict[str, Any], ...] = (
    {},
    {"status": "away"},
    {"status": "busy", "device": "phone", "custom_status": "driving"},
    {"status": "online", "device": "web"},
    {"device": "web", "custom_status": "lunch", "n": [1, 2]},
)
MODEL_TTL = 30.0
MODEL_CAPACITY = 3
MODEL_LIMITS = Limits(
    max_presences_per_connection=3,
    max_topics_per_connection=2,
    max_metas_per_key=2,
    rate_per_second=1e6,
    burst=10_000,
)


class _ModelConn:
    def __init__(self, now: float) -> None:
        self.last = now  # last sign of life
        self.presences: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}


def _seq(ref: str) -> int:
    return int(ref.rsplit(".", 1)[1], 16)


class TrackerVersusNaiveModel(RuleBasedStateMachine):
    """Presence as a few dicts, recomputed from scratch for every read."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(1000.0)
        self.evicted: list[object] = []
        self.tracker = Tracker(
            clock=self.clock,
            node="m",
            connection_ttl=MODEL_TTL,
            max_connections=MODEL_CAPACITY,
            plans={"default": MODEL_LIMITS},
            on_evict=self.evicted.append,
        )
        self.conns: OrderedDict[str | int, _ModelConn] = OrderedDict()  # least recent first
        self.seen: dict[str, float] = {}
        self.views = {topic: ClientView(strict=True) for topic in MODEL_TOPICS}
        for topic, view in self.views.items():
            self.tracker.subscribe(topic, view)

    # -- the model ---------------------------------------------------------------------------

    def online(self, key: str) -> bool:
        return any(k == key for c in self.conns.values() for (_, k) in c.presences)

    def touch(self, conn: str | int) -> None:
        self.conns[conn].last = self.clock.now
        self.conns.move_to_end(conn)

    def drop(self, conn: str | int, seen_at: float) -> None:
        keys = {k for (_, k) in self.conns.pop(conn).presences}
        for key in keys:
            if not self.online(key):
                self.seen[key] = seen_at

    def refusal(self, conn: str | int, topic: str, key: str) -> bool:
        rec = self.conns.get(conn)
        held = rec.presences if rec is not None else {}
        topics = {t for (t, _) in held}
        metas = sum(1 for c in self.conns.values() if (topic, key) in c.presences)
        return (
            len(held) >= MODEL_LIMITS.max_presences_per_connection
            or (topic not in topics and len(topics) >= MODEL_LIMITS.max_topics_per_connection)
            or metas >= MODEL_LIMITS.max_metas_per_key
        )

    def new_conn(self, conn: str | int) -> None:
        if len(self.conns) >= MODEL_CAPACITY:
            victim = next(iter(self.conns))
            self.drop(victim, self.clock.now)
            assert self.evicted.pop(0) == victim
        self.conns[conn] = _ModelConn(self.clock.now)

    def write(self, conn: str | int, topic: str, key: str, meta: dict[str, Any], ref: str) -> None:
        rec = self.conns[conn]
        old = rec.presences.get((topic, key))
        if old is not None and old[1] == meta:
            assert ref == old[0]  # an equal meta changes nothing
        else:
            assert old is None or _seq(ref) > _seq(old[0])
            rec.presences[(topic, key)] = (ref, meta)
        self.touch(conn)

    # -- rules -------------------------------------------------------------------------------

    @rule(
        conn=st.sampled_from(MODEL_CONNS),
        topic=st.sampled_from(MODEL_TOPICS),
        key=st.sampled_from(MODEL_KEYS),
        meta=st.sampled_from(MODEL_METAS),
    )
    def track(self, conn: str | int, topic: str, key: str, meta: dict[str, Any]) -> None:
        rec = self.conns.get(conn)
        if (rec is None or (topic, key) not in rec.presences) and self.refusal(conn, topic, key):
            with pytest.raises(QuotaExceeded):
                self.tracker.track(conn, topic, key, meta)
            return
        ref = self.tracker.track(conn, topic, key, meta)
        if rec is None:
            self.new_conn(conn)
        self.write(conn, topic, key, meta, ref)

    @rule(
        conn=st.sampled_from(MODEL_CONNS),
        topic=st.sampled_from(MODEL_TOPICS),
        key=st.sampled_from(MODEL_KEYS),
        meta=st.sampled_from(MODEL_METAS),
    )
    def update(self, conn: str | int, topic: str, key: str, meta: dict[str, Any]) -> None:
        rec = self.conns.get(conn)
        if rec is None or (topic, key) not in rec.presences:
            with pytest.raises(NotTracked):
                self.tracker.update(conn, topic, key, meta)
            return
        self.write(conn, topic, key, meta, self.tracker.update(conn, topic, key, meta))

    @rule(
        conn=st.sampled_from(MODEL_CONNS),
        topic=st.sampled_from(MODEL_TOPICS),
        key=st.none() | st.sampled_from(MODEL_KEYS),
    )
    def untrack(self, conn: str | int, topic: str, key: str | None) -> None:
        rec = self.conns.get(conn)
        gone = [] if rec is None else [p for p in rec.presences if p[0] == topic]
        gone = [p for p in gone if key is None or p[1] == key]
        assert self.tracker.untrack(conn, topic, key) == len(gone)
        if rec is not None:
            self.touch(conn)
            for p in gone:
                del rec.presences[p]
            for _, k in gone:
                if not self.online(k):
                    self.seen[k] = self.clock.now

    @rule(conn=st.sampled_from(MODEL_CONNS))
    def connect(self, conn: str | int) -> None:
        assert self.tracker.connect(conn) is (conn not in self.conns)
        if conn in self.conns:
            self.touch(conn)
        else:
            self.new_conn(conn)

    @rule(conn=st.sampled_from(MODEL_CONNS))
    def disconnect(self, conn: str | int) -> None:
        expected = len(self.conns[conn].presences) if conn in self.conns else 0
        assert self.tracker.disconnect(conn) == expected
        if conn in self.conns:
            self.drop(conn, self.clock.now)

    @rule(conn=st.sampled_from(MODEL_CONNS), many=st.booleans())
    def heartbeat(self, conn: str | int, many: bool) -> None:
        if many:
            assert self.tracker.heartbeat_many([conn]) == (conn in self.conns)
        else:
            assert self.tracker.heartbeat(conn) is (conn in self.conns)
        if conn in self.conns:
            self.touch(conn)

    @rule(seconds=st.sampled_from([0.25, 5.0, 20.0, 30.0, 45.0]), expire=st.booleans())
    def time_passes(self, seconds: float, expire: bool) -> None:
        now = self.clock.advance(seconds)
        if not expire:
            return  # connections past their deadline linger until the next expire()
        gone = [c for c, rec in self.conns.items() if rec.last + MODEL_TTL <= now]
        assert sorted(map(repr, self.tracker.expire())) == sorted(map(repr, gone))
        for conn in gone:
            self.drop(conn, now - MODEL_TTL)

    @rule()
    def flush(self) -> None:
        self.tracker.flush()
        for topic, view in self.views.items():
            assert view.state == self.tracker.list(topic)
            assert self.tracker.initial_state(topic) == view.state

    # -- what the reads must say -------------------------------------------------------------

    def expected_list(self, topic: str) -> dict[str, Any]:
        by_key: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for rec in self.conns.values():
            for (t, key), (ref, meta) in rec.presences.items():
                if t == topic:
                    by_key.setdefault(key, []).append((ref, meta))
        return {
            key: {"metas": [{"phx_ref": ref, **meta} for ref, meta in sorted(held, key=_by_seq)]}
            for key, held in by_key.items()
        }

    @invariant()
    def topics_agree(self) -> None:
        tracker = self.tracker
        for topic in MODEL_TOPICS:
            expected = self.expected_list(topic)
            assert tracker.list(topic) == expected
            assert tracker.count(topic) == len(expected)
            assert tracker.count(topic, metas=True) == sum(
                len(e["metas"]) for e in expected.values()
            )
            assert tracker.page(topic, limit=2)[0] == dict(sorted(expected.items())[:2])
        presences = [
            (t, k, ref) for rec in self.conns.values() for (t, k), (ref, _) in rec.presences.items()
        ]
        assert tracker.totals() == Totals(
            presences=len(presences),
            connections=len(self.conns),
            topics=len({t for t, _, _ in presences}),
            keys=len({k for _, k, _ in presences}),
        )
        for conn in MODEL_CONNS:
            rec = self.conns.get(conn)
            assert tracker.connected(conn) is (rec is not None)
            held = (
                [] if rec is None else [(t, k, ref) for (t, k), (ref, _) in rec.presences.items()]
            )
            assert sorted(tracker.connection_presences(conn)) == sorted(held)

    @invariant()
    def users_agree(self) -> None:
        statuses = self.tracker.users(MODEL_KEYS)
        for key in MODEL_KEYS:
            got = statuses[key]
            holders = {c: r for c, r in self.conns.items() if any(k == key for _, k in r.presences)}
            mine = sorted(
                (ref, meta, t)
                for rec in holders.values()
                for (t, k), (ref, meta) in rec.presences.items()
                if k == key
            )
            mine.sort(key=lambda item: _seq(item[0]))
            if not mine:
                assert got == UserStatus(key, "offline", last_seen=self.seen.get(key))
                continue
            reported = [m.get("status") for _, m, _ in mine]
            status = min(
                (STATUS_ORDER.index(s) if s in STATUS_ORDER else 0 for s in reported),
                default=0,
            )
            customs = [m["custom_status"] for _, m, _ in mine if "custom_status" in m]
            last = max(r.last for r in holders.values())
            assert got.status == STATUS_ORDER[status]
            assert got.custom_status == (customs[-1] if customs else None)
            assert got.devices == tuple(
                dict.fromkeys(m["device"] for _, m, _ in mine if "device" in m)
            )
            assert got.topics == tuple(sorted({t for _, _, t in mine}))
            assert (got.connections, got.presences) == (len(holders), len(mine))
            assert got.last_active == pytest.approx(last) and got.last_seen == got.last_active


def _by_seq(item: tuple[str, Any]) -> int:
    return _seq(item[0])


TrackerVersusNaiveModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestTrackerVersusNaiveModel = TrackerVersusNaiveModel.TestCase


def test_a_failing_scaler_does_not_stop_the_others(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sample: LoadSample) -> ScaleDecision | None:
        raise RuntimeError("scaler down")

    def confused(sample: LoadSample) -> ScaleDecision | None:
        return "scale up, please"  # type: ignore[return-value]

    def steady(sample: LoadSample) -> ScaleDecision | None:
        return ScaleDecision("hold", 1, 1, "fine")

    for scaler in (broken, confused, steady):
        tracker.add_scaler(scaler)
    with caplog.at_level(logging.ERROR, logger="presence_core.tracker"):
        assert [d.action for d in tracker.run_scalers()] == ["hold"]
    assert "scaler down" in caplog.text and "scale up, please" in caplog.text
    tracker.sync_metrics()
    assert tracker.metrics.counter(HOOK_ERRORS) == 2  # type: ignore[attr-defined]
    with pytest.raises(PresenceTypeError):
        tracker.run_scalers(now="soon", sample=tracker.load_sample())  # type: ignore[arg-type]


def test_a_non_ascii_connection_id_can_be_removed_as_it_was_tracked(tracker: Tracker) -> None:
    conn = "sock-é-🙂"
    tracker.track(conn, ROOM, "k", {})
    tracker.update(conn, ROOM, "k", {"v": 1})
    assert tracker.untrack(conn, ROOM) == 1
    tracker.track(conn, ROOM, "k", {})
    assert tracker.disconnect(conn) == 1
    assert tracker.totals() == Totals(0, 0, 0, 0)


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_integers_beyond_float_range_are_refused_clearly(clock: ManualClock, value: int) -> None:
    tracker = Tracker(clock=clock)
    for call in (
        lambda: tracker.track("c1", ROOM, "k", {}, now=value),
        lambda: tracker.heartbeat("c1", now=value),
        lambda: tracker.heartbeat_many(["c1"], now=value),
        lambda: tracker.expire(now=value),
        lambda: tracker.tick(now=value),
        lambda: tracker.connect("c1", ttl=value),
        lambda: Tracker(connection_ttl=value),
        lambda: Tracker(last_seen_ttl=value),
    ):
        with pytest.raises(PresenceValueError):
            call()
    assert tracker.totals() == Totals(0, 0, 0, 0)


@pytest.mark.parametrize("value", [10**5000, -(10**5000)], ids=["huge", "-huge"])
def test_ints_too_long_to_print_are_refused_clearly(value: int) -> None:
    for call in (
        lambda: Tracker(max_connections=value),
        lambda: Tracker(last_seen_capacity=value),
        lambda: Tracker().page("t", limit=-abs(value)),
        lambda: Tracker().load_sample(memory_bytes=-abs(value)),
    ):
        with pytest.raises(PresenceValueError, match="bits"):
            call()


def test_an_update_from_true_to_1_is_a_change(tracker: Tracker) -> None:
    # Equal as Python values (True == 1), different as JSON: clients see the difference.
    first = tracker.track("c1", ROOM, "k", {"muted": True, "n": 1})
    second = tracker.update("c1", ROOM, "k", {"muted": 1, "n": True})
    assert second != first
    assert tracker.list(ROOM)["k"]["metas"] == [{"phx_ref": second, "muted": 1, "n": True}]
    assert tracker.update("c1", ROOM, "k", {"n": True, "muted": 1}) == second  # key order only


def test_topics_and_presences_as_stored(tracker: Tracker) -> None:
    tracker.track("c1", ROOM, "alice", {"s": 1})
    tracker.track("c2", ROOM, "alice", {})
    tracker.track("c2", "other", "bob", {})
    tracker.untrack("c2", "other")
    assert tracker.topics() == [ROOM]
    assert tracker.presences(ROOM) == [
        (ROOM, "alice", b'{"phx_ref":"n.1","s":1}', "c1"),
        (ROOM, "alice", b'{"phx_ref":"n.2"}', "c2"),
    ]
    assert tracker.presences("other") == [] and tracker.presences("nowhere") == []
