"""The remote view: presences held by other processes, mirrored into a Tracker."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from presence_core import Limits, PresenceTypeError, PresenceValueError, Tracker
from presence_core.testing import ClientView, ManualClock, RecordingTransport
from presence_core.tracker import TopicChanges


def remote_join(other: Tracker, topic: str, key: str) -> tuple[str, bytes, bytes | None]:
    """The stored form of the presence ``other`` holds as ``key`` in ``topic``."""
    (p,) = [p for p in other.presences(topic) if p[1] == key]
    return (key, p[2], None)


@pytest.fixture
def pair() -> tuple[Tracker, Tracker]:
    clock = ManualClock(100.0)
    return Tracker(node="here", clock=clock), Tracker(node="there", clock=clock)


def test_remote_presences_show_in_lists_counts_and_diffs(pair: tuple[Tracker, Tracker]) -> None:
    here, there = pair
    view = ClientView(strict=True, topic="room")
    recorder = RecordingTransport()
    here.subscribe("room", view)
    here.subscribe("room", recorder)
    here.track("c1", "room", "alice", {"device": "web"})
    ref = there.track("c9", "room", "bob", {"device": "ios"})
    assert here.apply_remote("room", [remote_join(there, "room", "bob")]) == 1
    here.flush()
    assert set(here.list("room")) == {"alice", "bob"}
    assert here.list("room")["bob"]["metas"][0]["phx_ref"] == ref
    assert here.count("room") == 2
    assert view.state == here.list("room")
    assert "bob" in recorder.diffs("room")[-1]["joins"]
    # A store writes only what this process owns.
    assert [p[1] for p in here.presences("room")] == ["alice"]
    assert [p[1] for p in here.remote_presences("room")] == ["bob"]


def test_feed_readers_see_remote_changes_without_a_connection(
    pair: tuple[Tracker, Tracker],
) -> None:
    here, there = pair
    batches: list[list[TopicChanges]] = []
    here.add_feed_reader(lambda batch: batches.append(list(batch)))
    there.track("c9", "room", "bob", {})
    here.apply_remote("room", [remote_join(there, "room", "bob")])
    here.flush()
    (changes,) = batches[-1]
    assert [p[3] for p in changes.joins] == [None]


def test_an_update_elsewhere_is_one_diff_with_phx_ref_prev(pair: tuple[Tracker, Tracker]) -> None:
    here, there = pair
    view = ClientView(strict=True, topic="room")
    here.subscribe("room", view)
    old_ref = there.track("c9", "room", "bob", {"status": "online"})
    here.apply_remote("room", [remote_join(there, "room", "bob")])
    here.flush()
    there.update("c9", "room", "bob", {"status": "away"})
    key, data, _ = remote_join(there, "room", "bob")
    recorder = RecordingTransport()
    here.subscribe("room", recorder, send_state=False)
    here.apply_remote("room", [(key, data, old_ref.encode())], [old_ref.encode()])
    here.flush()
    (diff,) = recorder.diffs("room")
    assert diff["joins"]["bob"]["metas"][0]["phx_ref_prev"] == old_ref
    assert diff["leaves"]["bob"]["metas"][0]["phx_ref"] == old_ref
    assert here.list("room")["bob"]["metas"][0]["status"] == "away"
    assert view.state == here.list("room")


def test_replays_and_unknown_leaves_change_nothing(pair: tuple[Tracker, Tracker]) -> None:
    here, there = pair
    there.track("c9", "room", "bob", {})
    join = remote_join(there, "room", "bob")
    assert here.apply_remote("room", [join]) == 1
    assert here.apply_remote("room", [join]) == 0
    assert here.apply_remote("room", [], [b"there.ff", b"gone.1"]) == 0
    assert here.count("room", metas=True) == 1
    ref = join[1][12 : join[1].index(b'"', 12)]
    assert here.apply_remote("other", [], [ref]) == 0  # a ref leaves only its own topic
    assert here.apply_remote("room", [], [ref, ref]) == 1
    assert here.count("room") == 0
    assert here.topics() == []


def test_local_and_remote_presences_share_a_key(pair: tuple[Tracker, Tracker]) -> None:
    here, there = pair
    view = ClientView(strict=True, topic="room")
    here.subscribe("room", view)
    here.track("c1", "room", "alice", {"device": "web"})
    there.track("c9", "room", "alice", {"device": "ios"})
    join = remote_join(there, "room", "alice")
    here.apply_remote("room", [join])
    here.flush()
    assert len(here.list("room")["alice"]["metas"]) == 2
    status = here.user("alice")
    assert status.devices == ("web", "ios")
    assert status.connections == 2
    here.disconnect("c1")
    here.flush()
    assert here.user("alice").online  # still present elsewhere
    assert here.drop_remote("there") == 1
    here.flush()
    assert not here.user("alice").online
    assert view.state == {}


def test_drop_remote_removes_one_node_or_all(pair: tuple[Tracker, Tracker]) -> None:
    here, there = pair
    third = Tracker(node="third")
    there.track("a", "t1", "bob", {})
    third.track("b", "t2", "carol", {})
    here.apply_remote("t1", [remote_join(there, "t1", "bob")])
    here.apply_remote("t2", [remote_join(third, "t2", "carol")])
    assert here.drop_remote("there") == 1
    assert here.topics() == ["t2"]
    assert here.drop_remote() == 1
    assert here.remote_presences() == []
    with pytest.raises(PresenceValueError):
        here.drop_remote("not a node!")


@pytest.mark.parametrize(
    ("joins", "leaves", "error"),
    [
        ([("bob", b'{"phx_ref":"here.1"}', None)], [], PresenceValueError),  # own node
        ([("bob", b'{"phx_ref":"x.1",', None)], [], PresenceValueError),  # not JSON
        ([("bob", b'{"a":1}', None)], [], PresenceValueError),  # no ref first
        ([("bob", b'{"phx_ref":"x y.1"}', None)], [], PresenceValueError),  # bad ref
        ([("bob", '{"phx_ref":"x.1"}', None)], [], PresenceTypeError),  # str data
        ([("__proto__", b'{"phx_ref":"x.1"}', None)], [], PresenceValueError),
        ([("bob", b'{"phx_ref":"x.1"}')], [], PresenceTypeError),  # not a triple
        ([("bob", b'{"phx_ref":"x.1"}', b"nope")], [], PresenceValueError),  # bad prev
        ([], ["x.1"], PresenceTypeError),  # str ref
    ],
)
def test_malformed_remote_changes_are_refused_whole(
    pair: tuple[Tracker, Tracker], joins: list[Any], leaves: list[Any], error: type[Exception]
) -> None:
    here, there = pair
    there.track("c9", "room", "bob", {})
    good = remote_join(there, "room", "bob")
    with pytest.raises(error):
        here.apply_remote("room", [good, *joins], leaves)
    assert here.count("room") == 0
    assert here.pending() == 0


def test_remote_nodes_count_presences_per_owner(pair: tuple[Tracker, Tracker]) -> None:
    here, there = pair
    there.track("a", "t1", "bob", {})
    there.track("b", "t1", "carol", {})
    old = there.track("a", "t2", "bob", {"v": 1})
    for topic in ("t1", "t2"):
        here.apply_remote(topic, [(p[1], p[2], None) for p in there.presences(topic)])
    assert here.remote_nodes() == {"there": 3}
    there.update("a", "t2", "bob", {"v": 2})
    (p,) = there.presences("t2")
    here.apply_remote("t2", [(p[1], p[2], old.encode())], [old.encode()])
    assert here.remote_nodes() == {"there": 3}
    here.drop_remote("there")
    assert here.remote_nodes() == {}


def test_a_remote_meta_at_the_size_limit_is_applied_and_one_byte_over_is_not() -> None:
    """Peers enforce the meta limit their own Tracker enforced: a meta exactly at
    ``max_meta_bytes`` goes through, one byte more is refused."""
    limit = 200
    clock = ManualClock(100.0)
    plans = {"default": Limits(max_meta_bytes=limit)}
    here = Tracker(node="here", clock=clock, plans=plans)
    there = Tracker(node="there", clock=clock, plans={"default": Limits(max_meta_bytes=2 * limit)})
    for n, key in ((limit, "fits"), (limit + 1, "over")):
        meta = {"s": "x" * (n - len(b'{"s":""}'))}
        assert len(orjson.dumps(meta)) == n
        there.track(f"c-{key}", "room", key, meta)
    assert here.apply_remote("room", [remote_join(there, "room", "fits")]) == 1
    with pytest.raises(PresenceValueError, match="max_meta_bytes"):
        here.apply_remote("room", [remote_join(there, "room", "over")])
    assert list(here.list("room")) == ["fits"]
