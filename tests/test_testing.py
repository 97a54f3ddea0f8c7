"""presence_core.testing: ClientView applies events exactly as phoenix.js does, and the helpers.

The comparisons with the real client run `tests/js/apply.mjs` through the `JsClients` driver of
`tests/test_js_clients.py`, on hand-made payloads that the Tracker would never send (states that
arrive while refs are held, keys that look like array indices, keys with no metas): ClientView is
a model of the client, so it must follow the client on any stream, not only on ours.  Like those
tests, they skip without node or `tests/js/node_modules` and fail instead with ``CI=true``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_js_clients import NPM_HINT, JsClients, _unavailable

from presence_core.errors import PresenceTypeError, PresenceValueError
from presence_core.phoenix import EVENT_PRESENCE_DIFF, EVENT_PRESENCE_STATE
from presence_core.testing import ClientView, ManualClock, RecordingTransport

State = dict[str, Any]


def meta(ref: str, **fields: Any) -> dict[str, Any]:
    return {"phx_ref": ref, **fields}


def entry(*metas: dict[str, Any]) -> dict[str, Any]:
    return {"metas": list(metas)}


def diff(joins: State | None = None, leaves: State | None = None) -> dict[str, Any]:
    return {"joins": joins or {}, "leaves": leaves or {}}


def refs(state: State) -> list[tuple[str, list[str]]]:
    """Keys and refs in order: what the order tests compare."""
    return [(key, [m["phx_ref"] for m in value["metas"]]) for key, value in state.items()]


def ordered(state: State) -> list[tuple[str, list[dict[str, Any]]]]:
    """``state`` with its key order made significant for ``==``."""
    return [(key, value["metas"]) for key, value in state.items()]


# -- presence_state while refs are held ----------------------------------------------------------


def test_a_state_keeps_held_metas_first_in_held_order() -> None:
    view = ClientView()
    view.apply_state({"alice": entry(meta("a1"), meta("a2"), meta("a3"))})
    view.apply_state({"alice": entry(meta("a4"), meta("a3"), meta("a1"))})
    # phoenix.js: held metas still present (a1, a3) in held order, then the new one.
    assert refs(view.state) == [("alice", ["a1", "a3", "a4"])]


def test_a_state_keeps_held_keys_in_place_and_appends_new_ones() -> None:
    view = ClientView()
    view.apply_state({"bob": entry(meta("b1")), "alice": entry(meta("a1"))})
    view.apply_state(
        {"carol": entry(meta("c1")), "alice": entry(meta("a1")), "bob": entry(meta("b2"))}
    )
    assert [key for key, _ in refs(view.state)] == ["bob", "alice", "carol"]
    assert refs(view.state)[0] == ("bob", ["b2"])


def test_a_state_matches_refs_per_key() -> None:
    view = ClientView()
    view.apply_state({"alice": entry(meta("r1", where="alice"))})
    # The same ref under another key is a different presence for the client.
    view.apply_state({"bob": entry(meta("r1", where="bob"))})
    assert view.state == {"bob": entry(meta("r1", where="bob"))}


def test_a_state_does_not_see_changes_under_a_held_ref() -> None:
    view = ClientView()
    view.apply_state({"alice": entry(meta("a1", status="online"))})
    view.apply_state({"alice": entry(meta("a1", status="away"), meta("a2"))})
    assert view.state == {"alice": entry(meta("a1", status="online"), meta("a2"))}


def test_keys_without_metas_are_held_as_the_client_holds_them() -> None:
    view = ClientView()
    view.apply_state({"ghost": entry(), "alice": entry(meta("a1"))})
    assert view.state == {"ghost": entry(), "alice": entry(meta("a1"))}
    view.apply_state({"ghost": entry(), "alice": entry()})  # alice's meta leaves: alice goes
    assert view.state == {"ghost": entry()}
    view.apply_diff(diff(leaves={"ghost": entry()}))  # a leave empties nothing, but it counts
    assert view.state == {}
    view.apply_diff(diff(joins={"empty": entry()}))
    assert view.state == {"empty": entry()}


def test_state_lists_keys_in_javascript_object_order() -> None:
    view = ClientView()
    keys = ["b", "10", "2", "a", "01", "-1", "4294967294", "4294967295", "0", "1.5", "²"]
    view.apply_state({key: entry(meta(f"r{i}")) for i, key in enumerate(keys)})
    # Array indices first in numeric order, then the other keys in insertion order.
    assert list(view.state) == [
        "0",
        "2",
        "10",
        "4294967294",
        "b",
        "a",
        "01",
        "-1",
        "4294967295",
        "1.5",
        "²",
    ]


def test_a_leave_for_a_key_held_without_metas_drops_it() -> None:
    view = ClientView()
    view.apply_diff(diff(joins={"k": entry()}))
    view.apply_diff(diff(leaves={"k": entry(meta("x"))}))
    assert view.state == {}


# -- presence_diff ----------------------------------------------------------------------------


def test_a_diff_join_for_a_held_ref_moves_it_to_the_end() -> None:
    view = ClientView()
    view.apply_state({"alice": entry(meta("a1"), meta("a2"), meta("a3"))})
    view.apply_diff(diff(joins={"alice": entry(meta("a5"), meta("a2", n=2))}))
    assert view.state == {"alice": entry(meta("a1"), meta("a3"), meta("a5"), meta("a2", n=2))}


def test_a_diff_drops_phx_ref_prev_and_copies_what_it_keeps() -> None:
    view = ClientView(strict=True)
    view.apply_state({"alice": entry(meta("a1"))})
    joined = meta("a2", phx_ref_prev="a1", tags=["x"])
    view.apply_diff(diff(joins={"alice": entry(joined)}, leaves={"alice": entry(meta("a1"))}))
    joined["tags"].append("y")
    assert view.state == {"alice": entry(meta("a2", tags=["x"]))}


def test_client_view_follows_one_topic() -> None:
    view = ClientView()
    view("t", EVENT_PRESENCE_STATE, {"a": entry(meta("1"))})
    view("other", EVENT_PRESENCE_STATE, {"x": entry(meta("9"))})
    view("t", "broadcast", {"x": entry(meta("9"))})
    view("t", EVENT_PRESENCE_DIFF, diff(joins={"b": entry(meta("2"))}))
    assert view.topic == "t" and list(view.state) == ["a", "b"]
    assert "keys=2" in repr(view)


# -- against the real phoenix.js ---------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[JsClients]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the JavaScript clients cannot run: {reason}; {NPM_HINT}", pytrace=False)
        pytest.skip(f"JavaScript clients unavailable: {reason} ({NPM_HINT} to run these tests)")
    with JsClients() as clients:
        yield clients


def without_ref_prev(state: State) -> State:
    return {
        key: {"metas": [{k: v for k, v in m.items() if k != "phx_ref_prev"} for m in e["metas"]]}
        for key, e in state.items()
    }


def check_against_js(node: JsClients, sequences: list[list[tuple[str, Any]]]) -> None:
    """Apply each sequence to a fresh ClientView and to phoenix.js; same state after each event.

    Key order and meta order count.  realtime-js, which runs the same presence code behind
    its own state getter, must agree too.
    """
    events = [
        [{"kind": "state" if e == EVENT_PRESENCE_STATE else "diff", "payload": p} for e, p in seq]
        for seq in sequences
    ]
    results = node.run(events)
    for index, (sequence, result) in enumerate(zip(sequences, results, strict=True)):
        view = ClientView()
        for step, (event, payload) in enumerate(sequence):
            view("realtime:room", event, payload)
            for client in ("phoenix", "realtime"):
                outcome = result[client]
                assert outcome["error"] is None, f"sequence {index}, {client}: {outcome['error']}"
                got = without_ref_prev(outcome["states"][step])
                assert ordered(view.state) == ordered(got), (
                    f"sequence {index}, event {step}, {client}:\n"
                    f" client    {refs(got)}\n view      {refs(view.state)}"
                )


TRICKY: dict[str, list[tuple[str, Any]]] = {
    "state over held refs": [
        (EVENT_PRESENCE_STATE, {"alice": entry(meta("a1"), meta("a2"), meta("a3"))}),
        (EVENT_PRESENCE_STATE, {"alice": entry(meta("a4"), meta("a3"), meta("a1", n=1))}),
    ],
    "state reorders keys": [
        (EVENT_PRESENCE_STATE, {"bob": entry(meta("b1")), "alice": entry(meta("a1"))}),
        (
            EVENT_PRESENCE_STATE,
            {"carol": entry(meta("c1")), "alice": entry(meta("a2")), "bob": entry(meta("b1"))},
        ),
    ],
    "numeric keys": [
        (
            EVENT_PRESENCE_STATE,
            {k: entry(meta(f"r{k}")) for k in ["b", "10", "2", "a", "01", "4294967295", "0"]},
        ),
        (EVENT_PRESENCE_DIFF, diff(joins={"z": entry(meta("z")), "7": entry(meta("7"))})),
    ],
    "a ref moves between keys": [
        (EVENT_PRESENCE_STATE, {"alice": entry(meta("r1", w="a")), "bob": entry(meta("r2"))}),
        (EVENT_PRESENCE_STATE, {"bob": entry(meta("r1", w="b"), meta("r2"))}),
    ],
    "keys without metas": [
        (EVENT_PRESENCE_STATE, {"ghost": entry(), "alice": entry(meta("a1"))}),
        (EVENT_PRESENCE_STATE, {"ghost": entry(), "alice": entry()}),
        (EVENT_PRESENCE_DIFF, diff(joins={"empty": entry()}, leaves={"ghost": entry()})),
        (EVENT_PRESENCE_DIFF, diff(joins={"empty": entry(meta("e1"))})),
    ],
    "a key leaves and comes back": [
        (EVENT_PRESENCE_STATE, {"a": entry(meta("1")), "b": entry(meta("2"))}),
        (EVENT_PRESENCE_DIFF, diff(leaves={"a": entry(meta("1"))})),
        (EVENT_PRESENCE_DIFF, diff(joins={"a": entry(meta("3"))})),
        (EVENT_PRESENCE_STATE, {"a": entry(meta("3")), "c": entry(meta("4"))}),
    ],
    "update, unknown leave, rejoin": [
        (EVENT_PRESENCE_STATE, {"alice": entry(meta("a1"), meta("a2"))}),
        (
            EVENT_PRESENCE_DIFF,
            diff(
                joins={"alice": entry(meta("a3", phx_ref_prev="a1"), meta("a2", n=2))},
                leaves={"ghost": entry(meta("g")), "alice": entry(meta("a1"))},
            ),
        ),
        (EVENT_PRESENCE_STATE, {"alice": entry(meta("a5"), meta("a2"), meta("a2"))}),
    ],
}


def test_tricky_sequences_match_phoenix_js(node: JsClients) -> None:
    check_against_js(node, list(TRICKY.values()))


_keys = st.sampled_from(["alice", "bob", "2", "10", "01", "constructor"])
_refs = st.sampled_from(["r1", "r2", "r3", "r4", "r5"])
_metas = st.builds(
    lambda ref, n, prev: {"phx_ref": ref, "n": n, **({"phx_ref_prev": prev} if prev else {})},
    _refs,
    st.integers(0, 3),
    st.none() | _refs,
)
_states = st.dictionaries(_keys, st.lists(_metas, max_size=3).map(lambda ms: {"metas": ms}))
_events = st.one_of(
    st.tuples(st.just(EVENT_PRESENCE_STATE), _states),
    st.tuples(
        st.just(EVENT_PRESENCE_DIFF),
        st.builds(lambda joins, leaves: {"joins": joins, "leaves": leaves}, _states, _states),
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    sequences=st.lists(
        st.tuples(st.tuples(st.just(EVENT_PRESENCE_STATE), _states), st.lists(_events, max_size=6)),
        min_size=1,
        max_size=4,
    )
)
def test_random_streams_match_phoenix_js(
    node: JsClients, sequences: list[tuple[tuple[str, Any], list[tuple[str, Any]]]]
) -> None:
    # Each sequence starts with a state: realtime-js holds diffs back until it has one.
    check_against_js(node, [[first, *rest] for first, rest in sequences])


# -- ManualClock and RecordingTransport -------------------------------------------------------


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(5)
    assert clock() == 5.0 and type(clock()) is float
    assert clock.advance(2.5) == 7.5 and clock.advance(0) == 7.5
    clock.set(-3)
    assert clock() == -3.0 and "now=-3.0" in repr(clock)


@pytest.mark.parametrize(
    "bad",
    [math.nan, math.inf, "1", None, True, 10**400],
    ids=["nan", "inf", "str", "None", "True", "huge int"],
)
def test_manual_clock_refuses_what_is_not_a_finite_time(bad: Any) -> None:
    clock = ManualClock()
    for call in (lambda: ManualClock(bad), lambda: clock.set(bad), lambda: clock.advance(bad)):
        with pytest.raises((PresenceTypeError, PresenceValueError)):
            call()
    assert clock() == 0.0


def test_manual_clock_only_moves_forward_and_stays_finite() -> None:
    clock = ManualClock(1e308)
    with pytest.raises(PresenceValueError, match="only moves forward"):
        clock.advance(-1)
    with pytest.raises(PresenceValueError, match="float range"):
        clock.advance(1e308)
    assert clock() == 1e308


def test_recording_transport_records_and_filters() -> None:
    recorder = RecordingTransport()
    recorder("a", EVENT_PRESENCE_STATE, {})
    recorder("b", EVENT_PRESENCE_DIFF, diff())
    assert recorder.states() == [{}] and recorder.diffs() == [diff()]
    assert recorder.diffs("a") == [] and recorder.topics() == ["a", "b"]
    assert [e.event for e in recorder] == [EVENT_PRESENCE_STATE, EVENT_PRESENCE_DIFF]
