"""Delivery under re-entrancy and interrupts, driven by hypothesis.

Hooks run random Tracker calls while a flush delivers (track, untrack, subscribe, unsubscribe,
a new client of a transport, a client re-syncing, a nested flush, an interrupt that propagates),
with a connection table small enough to evict.  After every step a settled Tracker must have
told each client exactly its `list()` (every client is a strict `ClientView`, which refuses a
diff it could not apply cleanly), and a store fed by the change feed must hold exactly the
Tracker's presences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from presence_core import PresenceError, Tracker
from presence_core.testing import ClientView, ManualClock
from presence_core.tracker import TopicChanges

TOPICS = ("a", "b")
KEYS = ("k1", "k2")
CONNS: tuple[str | int, ...] = ("c1", "c2", "c3", "c4", 5)


class Interrupt(BaseException):
    """Raised by a hook, as KeyboardInterrupt or a cancelled task would be."""


Action = tuple[Any, ...]

ACTIONS = st.one_of(
    st.tuples(
        st.sampled_from(("track", "update")),
        st.sampled_from(CONNS),
        st.sampled_from(TOPICS),
        st.sampled_from(KEYS),
        st.integers(0, 2),
    ),
    st.tuples(st.just("untrack"), st.sampled_from(CONNS), st.sampled_from(TOPICS)),
    st.tuples(st.sampled_from(("disconnect", "heartbeat")), st.sampled_from(CONNS)),
    st.tuples(st.just("advance"), st.sampled_from((1.0, 6.0, 11.0))),
    st.tuples(st.sampled_from(("flush", "tick", "interrupt"))),
    st.tuples(
        st.sampled_from(("subscribe", "transport", "transport_from_initial_state")),
        st.sampled_from(TOPICS),
    ),
    st.tuples(st.sampled_from(("remove", "resync")), st.integers(0, 5)),
)


class Client:
    """One client of a topic, as a subscriber or behind a transport."""

    def __init__(self, machine: DeliveryMachine, topic: str) -> None:
        self.machine = machine
        self.topic = topic
        self.view = ClientView(strict=True, topic=topic)

    def __call__(self, topic: str, event: str, payload: Any) -> None:
        try:
            self.view(topic, event, payload)
        except AssertionError as exc:
            self.machine.failures.append(f"a client of {self.topic!r} got {event}: {exc}")
        self.machine.in_hook()


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []
        self.clock = ManualClock(100.0)
        self.tracker = Tracker(clock=self.clock, node="n", max_connections=3, connection_ttl=10.0)
        self.stored: dict[tuple[str, str], str] = {}
        self.tracker.add_feed_reader(self.store)
        self.clients: list[tuple[Client, Callable[[], None]]] = []
        self.queued: list[Action] = []  # what hooks do, one action per hook call

    # -- the hooks -------------------------------------------------------------------------

    def store(self, batch: Sequence[TopicChanges]) -> None:
        for changes in batch:
            for p in changes.leaves:
                ref = orjson.loads(p[2])["phx_ref"]
                if self.stored.pop((changes.topic, ref), None) is None:
                    self.failures.append(f"the feed removed {ref}, never added")
            for p, prev in changes.joins.items():
                ref = orjson.loads(p[2])["phx_ref"]
                if (changes.topic, ref) in self.stored:
                    self.failures.append(f"the feed added {ref} twice")
                if prev is not None and (changes.topic, prev.decode()) in self.stored:
                    left = {orjson.loads(q[2])["phx_ref"] for q in changes.leaves}
                    if prev.decode() not in left:
                        self.failures.append(f"{ref} replaces {prev!r}, which does not leave")
                self.stored[(changes.topic, ref)] = p[1]
        self.in_hook()

    def client(self, topic: str) -> Client:
        return Client(self, topic)

    def in_hook(self) -> None:
        if self.queued:
            self.do(self.queued.pop(0))

    # -- actions ---------------------------------------------------------------------------

    def do(self, action: Action) -> None:
        kind, *args = action
        tracker = self.tracker
        try:
            if kind == "track":
                tracker.track(args[0], args[1], args[2], {"v": args[3]})
            elif kind == "update":
                tracker.update(args[0], args[1], args[2], {"v": args[3]})
            elif kind == "untrack":
                tracker.untrack(args[0], args[1])
            elif kind == "disconnect":
                tracker.disconnect(args[0])
            elif kind == "heartbeat":
                tracker.heartbeat(args[0])
            elif kind == "advance":
                self.clock.advance(args[0])
                tracker.expire()
            elif kind == "flush":
                tracker.flush()
            elif kind == "tick":
                tracker.tick()
            elif kind == "interrupt":
                raise Interrupt
            elif kind == "subscribe":
                client = self.client(args[0])
                self.clients.append((client, tracker.subscribe(args[0], client)))
            elif kind == "transport":
                client = self.client(args[0])
                remove = tracker.add_transport(client)
                tracker.send_state(args[0], client)
                self.clients.append((client, remove))
            elif kind == "transport_from_initial_state":
                client = self.client(args[0])
                client.view.apply_state(tracker.initial_state(args[0]))
                self.clients.append((client, tracker.add_transport(client)))
            elif kind == "remove" and self.clients:
                self.clients.pop(args[0] % len(self.clients))[1]()
            elif kind == "resync" and self.clients:
                client = self.clients[args[0] % len(self.clients)][0]
                tracker.send_state(client.topic, client)
        except PresenceError:
            pass  # an update of nothing, a quota: refused, and nothing changed

    @rule(action=ACTIONS)
    def call(self, action: Action) -> None:
        if action[0] != "interrupt":  # only hooks interrupt
            self.do(action)

    @rule(actions=st.lists(ACTIONS, max_size=6))
    def flush_while_hooks_act(self, actions: list[Action]) -> None:
        self.queued = list(actions)
        try:
            self.tracker.flush()
        except Interrupt:
            pass
        self.queued = []

    @invariant()
    def nothing_went_wrong(self) -> None:
        assert not self.failures, self.failures[:3]

    @rule()
    def everyone_agrees_once_settled(self) -> None:
        self.queued = []
        self.tracker.flush()
        assert self.tracker.pending() == 0
        assert not self.failures, self.failures[:3]
        for client, _ in self.clients:
            assert client.view.state == self.tracker.list(client.topic), client.topic
        present = {
            (topic, meta["phx_ref"]): key
            for topic in TOPICS
            for key, value in self.tracker.list(topic).items()
            for meta in value["metas"]
        }
        assert self.stored == present


DeliveryMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestDelivery = DeliveryMachine.TestCase
