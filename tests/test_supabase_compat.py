"""What the Tracker sends is applied by Supabase's own client presence code the way we mean it.

A hypothesis state machine drives a Tracker with random track / update / untrack / disconnect /
heartbeat calls and clock jumps (expiry) over a few connections, topics and keys, and feeds one
topic's ``presence_state`` and every ``presence_diff`` into the real Supabase client presence
logic (`tests/supabase_client.py`): clients that follow the topic from the start, clients that
join late (with whatever changes are pending at that moment), a client with the pre-2.32 leave
quirk and one that receives the events as Phoenix v1 frames through the client's own parser.
After every flush each client's view must equal ``tracker.list(topic)`` exactly, meta order
included.  A strict `ClientView` also fails the run on any leave for a key or ref the client
does not hold, or on a ref joined twice.

Ordering: the Supabase client keeps a key's metas as "held metas not being joined, then joiners
in payload order".  The Tracker keeps a key's metas in creation order and every join carries a
ref newer than any flushed one, so the two orders agree and the comparison needs no sorting.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from supabase_client import SupabasePresenceClient

from presence_core.errors import NotTracked
from presence_core.limits import Limits
from presence_core.phoenix import EVENT_PRESENCE_DIFF as PRESENCE_DIFF
from presence_core.phoenix import EVENT_PRESENCE_STATE as PRESENCE_STATE
from presence_core.phoenix import encode, presence_diff_message, presence_state_message
from presence_core.testing import ClientView, ManualClock
from presence_core.tracker import Tracker

TOPIC = "realtime:room"
TOPICS = (TOPIC, "realtime:other")
CONNS = ("c1", "c2", "c3", "c4", 5)
KEYS = ("alice", "bob", "carol")
METAS = (
    {},
    {"status": "online"},
    {"status": "away", "device": "web"},
    {"status": "busy", "custom_status": "in a meeting", "device": "phone"},
    {"online_at": 1_700_000_000.5, "tags": ["a", "b"]},
)
TTL = 30.0

# Generous limits: this test is about diffs, not about refusals.
ROOMY = Limits(rate_per_second=1e6, burst=10_000)


def feed(client: SupabasePresenceClient) -> Any:
    """A subscriber that hands each event to a Supabase client presence object."""

    def hook(topic: str, event: str, payload: dict[str, Any]) -> None:
        if event == PRESENCE_STATE:
            client.apply_state(payload)
        elif event == PRESENCE_DIFF:
            client.apply_diff(payload)

    return hook


def feed_frames(client: SupabasePresenceClient) -> Any:
    """A subscriber that encodes each event as a Phoenix v1 frame and lets the client parse it."""

    def hook(topic: str, event: str, payload: dict[str, Any]) -> None:
        if event == PRESENCE_STATE:
            client.apply_frame(encode(presence_state_message(topic, payload), 1))
        else:
            client.apply_frame(encode(presence_diff_message(topic, payload), 1))

    return hook


class TrackerVersusSupabaseClient(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(1_000.0)
        self.tracker = Tracker(
            clock=self.clock, connection_ttl=TTL, node="t", plans={"default": ROOMY}
        )
        self.clients: list[SupabasePresenceClient] = []
        self.views: list[ClientView] = []

    def follow(self, client: SupabasePresenceClient, *, frames: bool = False) -> None:
        self.clients.append(client)
        self.tracker.subscribe(TOPIC, feed_frames(client) if frames else feed(client))

    @initialize()
    def start(self) -> None:
        self.follow(SupabasePresenceClient())
        self.follow(SupabasePresenceClient(emulate_leave_quirk=True))
        self.follow(SupabasePresenceClient(), frames=True)
        self.watch()

    def watch(self) -> None:
        view = ClientView(strict=True)
        self.views.append(view)
        self.tracker.subscribe(TOPIC, view)

    @rule(
        conn=st.sampled_from(CONNS),
        topic=st.sampled_from(TOPICS),
        key=st.sampled_from(KEYS),
        meta=st.sampled_from(METAS),
    )
    def track(self, conn: str | int, topic: str, key: str, meta: dict[str, Any]) -> None:
        self.tracker.track(conn, topic, key, meta)

    @rule(
        conn=st.sampled_from(CONNS),
        topic=st.sampled_from(TOPICS),
        key=st.sampled_from(KEYS),
        meta=st.sampled_from(METAS),
    )
    def update(self, conn: str | int, topic: str, key: str, meta: dict[str, Any]) -> None:
        try:
            self.tracker.update(conn, topic, key, meta)
        except NotTracked:
            pass

    @rule(
        conn=st.sampled_from(CONNS),
        topic=st.sampled_from(TOPICS),
        key=st.none() | st.sampled_from(KEYS),
    )
    def untrack(self, conn: str | int, topic: str, key: str | None) -> None:
        self.tracker.untrack(conn, topic, key)

    @rule(conn=st.sampled_from(CONNS))
    def disconnect(self, conn: str | int) -> None:
        self.tracker.disconnect(conn)

    @rule(conn=st.sampled_from(CONNS))
    def heartbeat(self, conn: str | int) -> None:
        self.tracker.heartbeat(conn)

    @rule(seconds=st.sampled_from([0.5, 5.0, 20.0, 29.0, 31.0, 100.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.tracker.expire()

    @precondition(lambda self: len(self.clients) < 6)
    @rule(quirky=st.booleans())
    def late_join(self, quirky: bool) -> None:
        # Whatever is pending right now, the state it gets must fit the next diff.
        self.follow(SupabasePresenceClient(emulate_leave_quirk=quirky))
        self.watch()

    @rule()
    def flush(self) -> None:
        self.tracker.flush()
        expected = self.tracker.list(TOPIC)
        for client in self.clients:
            assert client.state() == expected
        for view in self.views:
            assert view.state == expected

    @invariant()
    def counts_agree(self) -> None:
        totals = self.tracker.totals()
        assert totals.presences == sum(self.tracker.count(t, metas=True) for t in TOPICS)
        assert totals.topics == sum(1 for t in TOPICS if self.tracker.count(t))


TrackerVersusSupabaseClient.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestTrackerVersusSupabaseClient = TrackerVersusSupabaseClient.TestCase


# -- the scenarios the state machine must be able to hit, pinned down --------------------------


def test_leave_quirk_scenario_with_a_late_joiner() -> None:
    """A client joining while leaves and cancelled joins are pending gets no unheld leave."""
    clock = ManualClock()
    tracker = Tracker(clock=clock, node="t")
    tracker.track("c1", TOPIC, "alice", {})
    tracker.track("c2", TOPIC, "bob", {})
    tracker.flush()
    tracker.track("c3", TOPIC, "ghost", {})  # joins and leaves inside one flush
    tracker.disconnect("c3")
    tracker.disconnect("c1")  # a pending leave of a key the late client must still hold
    late = SupabasePresenceClient(emulate_leave_quirk=True)
    tracker.subscribe(TOPIC, feed(late))
    assert late.state().keys() == {"alice", "bob"}
    tracker.flush()
    assert late.state() == tracker.list(TOPIC) == {"bob": {"metas": [{"phx_ref": "t.2"}]}}


def test_update_reaches_the_client_as_a_replacement() -> None:
    tracker = Tracker(node="t")
    client = SupabasePresenceClient()
    tracker.subscribe(TOPIC, feed(client))
    tracker.track("c1", TOPIC, "alice", {"status": "online"}, now=0)
    tracker.track("c2", TOPIC, "alice", {"status": "away"}, now=0)
    tracker.flush()
    tracker.update("c1", TOPIC, "alice", {"status": "busy"}, now=1)
    tracker.flush()
    # The updated meta moved behind the untouched one, on both sides.
    assert client.state() == tracker.list(TOPIC)
    assert [m["status"] for m in client.state()["alice"]["metas"]] == ["away", "busy"]
