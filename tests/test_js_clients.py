"""What the Tracker sends is applied by the real JavaScript clients the way we mean it.

`tests/js/apply.mjs` runs the presence code of the npm packages pinned in
`tests/js/package.json` -- phoenix.js (``Presence.syncState`` / ``syncDiff``, and a whole
``Socket`` + ``Channel`` + ``Presence`` fed our v2 frames) and Supabase's realtime-js (a
``RealtimePresence``, and a whole ``RealtimeClient`` + channel fed our v1 and v2 frames over a
stand-in WebSocket) -- on the ``presence_state`` and ``presence_diff`` payloads each subscriber of
a Tracker received, and prints every client's state after every event.  After each event the
client must hold exactly what the Tracker said: after the ``presence_state``, the state as of the
last flush; after a diff, ``tracker.list(topic)`` right after that flush.  Meta order is compared
too (the clients keep "held metas not being joined, then joiners in payload order", the Tracker
keeps creation order with an update moved to the end: the same thing).

Facts about the clients these tests pin down (read from the installed packages):

* Both apply a diff joins first, then leaves, each in payload order.  A join for a held key
  becomes ``[held metas whose ref is not joining] + [joining metas in payload order]``.  A leave
  removes metas by ref and drops a key left with none; a leave for a key the client does not
  hold is skipped and the diff's later leaves still apply (no early exit, unlike the Python
  client before 2.32.0).
* ``syncState`` matches by ref only: held refs survive as held (a changed meta under an old ref
  is not seen), new refs are appended, absent ones leave.
* phoenix.js keeps a joined meta exactly as received, **including** ``phx_ref_prev``; realtime-js
  hands out ``{presence_ref, ...meta}`` with ``phx_ref`` and ``phx_ref_prev`` removed (so a
  meta's own ``presence_ref`` field is overwritten by the ref) from a JSON clone of its state.
* realtime-js buffers diffs until it has a ``presence_state`` for its current join.
* A presence **key** named ``"__proto__"`` is held by phoenix.js (null-prototype objects) but
  vanishes from realtime-js's ``RealtimePresence.state`` / ``channel.presenceState()``: its
  ``transformState`` assigns keys into a plain ``{}``.  A meta *field* of that name survives in
  both.  The Tracker accepts such a key, so Supabase JS users cannot see it.

Without ``node`` or ``tests/js/node_modules`` (or with packages there that are not the pinned
versions) these tests skip; with ``CI=true`` they fail instead: run ``npm ci --prefix tests/js``
first.
"""

from __future__ import annotations

import copy
import json
import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence_core.errors import NotTracked, PresenceValueError
from presence_core.limits import Limits
from presence_core.phoenix import EVENT_PRESENCE_DIFF as PRESENCE_DIFF
from presence_core.phoenix import EVENT_PRESENCE_STATE as PRESENCE_STATE
from presence_core.phoenix import encode, presence_diff_message, presence_state_message
from presence_core.testing import ClientView, ManualClock
from presence_core.tracker import Tracker

JS_DIR = Path(__file__).resolve().parent / "js"
APPLY = JS_DIR / "apply.mjs"
NPM_HINT = "run `npm ci --prefix tests/js`"
RESPONSE_TIMEOUT = 120.0

TOPIC = "realtime:room"
OTHER_TOPIC = "realtime:other"
TTL = 30.0
ROOMY = Limits(rate_per_second=1e6, burst=10_000)

#: The clients apply.mjs runs for events that carry frames (all of ours do).
CLIENTS = ("phoenix", "realtime", "phoenix_v2", "realtime_v1", "realtime_v2")
#: Those built on phoenix.js's own presence state, which keeps ``phx_ref_prev``.
KEEPS_REF_PREV = frozenset({"phoenix", "phoenix_v2"})

State = dict[str, Any]


# -- the node process ------------------------------------------------------------------------


def _pinned_versions() -> dict[str, str]:
    manifest = json.loads((JS_DIR / "package.json").read_text(encoding="utf-8"))
    return dict(manifest["dependencies"])


def _unavailable() -> str | None:
    """Why the JS clients cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH (install Node.js 20 or later)"
    modules = JS_DIR / "node_modules"
    if not modules.is_dir():
        return "tests/js/node_modules is missing"
    for name, version in _pinned_versions().items():
        manifest = modules / name / "package.json"
        if not manifest.is_file():
            return f"{name} is not installed in tests/js/node_modules"
        installed = json.loads(manifest.read_text(encoding="utf-8"))["version"]
        if installed != version:
            return f"tests/js/node_modules has {name} {installed}, package.json pins {version}"
    return None


class JsClients:
    """One ``node apply.mjs`` process serving requests (JSON lines) until closed."""

    def __init__(self) -> None:
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            ["node", str(APPLY)],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.requests = 0

    def run(self, sequences: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Each sequence's events through fresh clients: per sequence ``{client: result}``."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        request = {"sequences": [{"topic": TOPIC, "events": list(s)} for s in sequences]}
        self._proc.stdin.write(orjson.dumps(request) + b"\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], RESPONSE_TIMEOUT)
        line = self._proc.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"apply.mjs gave no answer: {self._diagnosis()}")
        self.requests += 1
        response = json.loads(line)
        if "error" in response:
            raise AssertionError(f"apply.mjs could not run the request: {response['error']}")
        results: list[dict[str, Any]] = response["results"]
        return results

    def _diagnosis(self) -> str:
        code = self._proc.poll()
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", "replace")[-4000:]
        return f"exit code {code}, stderr:\n{err}"

    def close(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        finally:
            self._proc.stdout.close()
            self._stderr.close()

    def __enter__(self) -> JsClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def js() -> Iterator[JsClients]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # as tests/impls.py
            pytest.fail(
                f"the JavaScript client tests cannot run: {reason}; {NPM_HINT} before pytest",
                pytrace=False,
            )
        pytest.skip(f"JavaScript clients unavailable: {reason} ({NPM_HINT} to run these tests)")
    with JsClients() as clients:
        yield clients


# -- recording what subscribers get ------------------------------------------------------------


def frames(event: str, payload_json: bytes) -> dict[str, str]:
    """The v1 and v2 frames a server would write, built from the payload's exact bytes."""
    msg = (
        presence_state_message(TOPIC, orjson.loads(payload_json))
        if event == PRESENCE_STATE
        else presence_diff_message(TOPIC, orjson.loads(payload_json))
    )
    v1 = encode(msg, 1)
    # v2 the way a raw fan-out writes it: the payload bytes spliced in, not re-encoded.
    v2 = b"[null,null,%s,%s,%s]" % (orjson.dumps(TOPIC), orjson.dumps(event), payload_json)
    assert orjson.loads(v2) == orjson.loads(encode(msg, 2))
    return {"v1": v1.decode(), "v2": v2.decode()}


@dataclass
class Subscriber:
    """One client following TOPIC: the events it got and the state it must hold after each."""

    raw: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    expected: list[State] = field(default_factory=list)
    view: ClientView = field(default_factory=lambda: ClientView(strict=True))

    def __call__(self, topic: str, event: str, payload: Any) -> None:
        assert topic == TOPIC and event in (PRESENCE_STATE, PRESENCE_DIFF)
        data = bytes(payload) if self.raw else orjson.dumps(payload)
        obj = orjson.loads(data)
        self.view(topic, event, copy.deepcopy(obj))
        kind = "state" if event == PRESENCE_STATE else "diff"
        self.events.append({"kind": kind, "payload": obj, "frames": frames(event, data)})


class Scenario:
    """A Tracker, a manual clock and the subscribers of TOPIC, with what each must end up with."""

    def __init__(self) -> None:
        self.clock = ManualClock(1_000.0)
        self.tracker = Tracker(
            clock=self.clock, connection_ttl=TTL, node="t", plans={"default": ROOMY}
        )
        self.flushed: State = {}  # list(TOPIC) as of the last flush
        self.subscribers: list[Subscriber] = []

    def subscribe(self, *, raw: bool = False) -> Subscriber:
        sub = Subscriber(raw=raw)
        self.tracker.subscribe(TOPIC, sub, raw=raw)
        assert len(sub.events) == 1
        sub.expected.append(copy.deepcopy(self.flushed))
        assert sub.view.state == self.flushed
        self.subscribers.append(sub)
        return sub

    def flush(self) -> None:
        before = [len(sub.events) for sub in self.subscribers]
        self.tracker.flush()
        self._after_flush(before)

    def tick(self, seconds: float) -> None:
        before = [len(sub.events) for sub in self.subscribers]
        self.clock.advance(seconds)
        self.tracker.tick()
        self._after_flush(before)

    def _after_flush(self, before: list[int]) -> None:
        now = self.tracker.list(TOPIC)
        for sub, count in zip(self.subscribers, before, strict=True):
            got = len(sub.events) - count
            assert got in (0, 1), f"{got} events in one flush"
            if got:
                sub.expected.append(copy.deepcopy(now))
            else:
                assert now == self.flushed, "TOPIC changed but no diff was sent"
            assert sub.view.state == now
        self.flushed = now

    def check(self, js: JsClients) -> list[dict[str, Any]]:
        """Run every subscriber's events through the JS clients and compare after each event."""
        results = js.run([sub.events for sub in self.subscribers])
        for index, (sub, result) in enumerate(zip(self.subscribers, results, strict=True)):
            assert set(result) == set(CLIENTS)
            for client, outcome in result.items():
                where = f"subscriber {index} ({'raw' if sub.raw else 'dict'}), {client}"
                assert outcome["error"] is None, f"{where}: {outcome['error']}"
                states = outcome["states"]
                assert len(states) == len(sub.events), where
                for step, (got, expected) in enumerate(zip(states, sub.expected, strict=True)):
                    compare(client, got, expected, f"{where}, after event {step}")
        return results


def split_ref_prev(state: State) -> tuple[State, dict[str, str]]:
    """``state`` without ``phx_ref_prev`` fields, and ``{ref: phx_ref_prev}`` of those removed."""
    clean: State = {}
    prevs: dict[str, str] = {}
    for key, entry in state.items():
        metas = []
        for meta in entry["metas"]:
            meta = dict(meta)
            if "phx_ref_prev" in meta:
                prevs[meta["phx_ref"]] = meta.pop("phx_ref_prev")
            metas.append(meta)
        clean[key] = {"metas": metas}
    return clean, prevs


def by_ref(state: State) -> State:
    return {
        key: {"metas": sorted(entry["metas"], key=lambda meta: str(meta["phx_ref"]))}
        for key, entry in state.items()
    }


def compare(client: str, got: State, expected: State, where: str) -> None:
    """``got`` must be ``expected`` exactly, meta order included.

    phoenix.js-based clients may also hold a ``phx_ref_prev`` on metas that joined in an
    update; it must name a ref the key no longer holds.
    """
    if client in KEEPS_REF_PREV:
        got, prevs = split_ref_prev(got)
        held = {meta["phx_ref"] for entry in got.values() for meta in entry["metas"]}
        for ref, prev in prevs.items():
            assert isinstance(prev, str) and prev not in held, (
                f"{where}: {ref} has phx_ref_prev {prev!r}, which the client still holds"
            )
    if got == expected:
        return
    if by_ref(got) == by_ref(expected):
        order = {
            key: (
                [m["phx_ref"] for m in got[key]["metas"]],
                [m["phx_ref"] for m in expected[key]["metas"]],
            )
            for key in expected
            if got[key] != expected[key]
        }
        raise AssertionError(f"{where}: same metas, other order (client, tracker): {order}")
    raise AssertionError(f"{where}:\n client  {got}\n tracker {expected}")


def js_states(results: list[dict[str, Any]], subscriber: int = 0) -> dict[str, State]:
    """Each client's final state for one subscriber."""
    return {name: outcome["states"][-1] for name, outcome in results[subscriber].items()}


# -- deterministic scenarios -----------------------------------------------------------------


def test_join(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("c1", TOPIC, "alice", {"status": "online"})
    s.flush()
    finals = js_states(s.check(js))
    for state in finals.values():
        assert state == {"alice": {"metas": [{"phx_ref": "t.1", "status": "online"}]}}


def test_second_device_for_the_same_key(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("phone", TOPIC, "alice", {"device": "phone"})
    s.flush()
    s.tracker.track("laptop", TOPIC, "alice", {"device": "laptop"})
    s.tracker.track("tablet", TOPIC, "alice", {"device": "tablet"})  # two joins in one diff
    s.flush()
    s.subscribe(raw=True)
    finals = js_states(s.check(js), 1)
    for state in finals.values():
        assert [m["device"] for m in state["alice"]["metas"]] == ["phone", "laptop", "tablet"]


def test_update_carries_phx_ref_prev(js: JsClients) -> None:
    s = Scenario()
    sub = s.subscribe()
    old = s.tracker.track("c1", TOPIC, "alice", {"status": "online"})
    s.tracker.track("c2", TOPIC, "alice", {"status": "away"})
    s.flush()
    new = s.tracker.update("c1", TOPIC, "alice", {"status": "busy"})
    s.flush()
    diff = sub.events[-1]["payload"]
    assert diff["joins"]["alice"]["metas"] == [
        {"phx_ref": new, "phx_ref_prev": old, "status": "busy"}
    ]
    assert [m["phx_ref"] for m in diff["leaves"]["alice"]["metas"]] == [old]
    finals = js_states(s.check(js))
    for client, state in finals.items():
        # The updated meta moves behind the untouched one in every client, as in the Tracker.
        assert [m["status"] for m in state["alice"]["metas"]] == ["away", "busy"]
        busy = state["alice"]["metas"][1]
        if client in KEEPS_REF_PREV:
            assert busy["phx_ref_prev"] == old
        else:
            assert "phx_ref_prev" not in busy


def test_untrack_one_of_two_metas(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("c1", TOPIC, "alice", {"device": "phone"})
    s.tracker.track("c2", TOPIC, "alice", {"device": "laptop"})
    s.flush()
    assert s.tracker.untrack("c1", TOPIC, "alice") == 1
    s.flush()
    for state in js_states(s.check(js)).values():
        assert [m["device"] for m in state["alice"]["metas"]] == ["laptop"]


def test_disconnect(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("c1", TOPIC, "alice", {})
    s.tracker.track("c1", TOPIC, "bob", {})
    s.tracker.track("c1", OTHER_TOPIC, "alice", {})
    s.tracker.track("c2", TOPIC, "bob", {"device": "web"})
    s.flush()
    assert s.tracker.disconnect("c1") == 3
    s.flush()
    for state in js_states(s.check(js)).values():
        assert state == {"bob": {"metas": [{"phx_ref": "t.4", "device": "web"}]}}


def test_expiry_after_a_clock_jump(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("alive", TOPIC, "alice", {})
    s.tracker.track("silent", TOPIC, "alice", {"device": "old"})
    s.tracker.track("silent", TOPIC, "bob", {})
    s.tick(0)
    s.clock.advance(TTL - 1)
    assert s.tracker.heartbeat("alive")
    s.tick(2)  # past the silent connection's deadline only
    assert s.tracker.connected("alive") and not s.tracker.connected("silent")
    for state in js_states(s.check(js)).values():
        assert state == {"alice": {"metas": [{"phx_ref": "t.1"}]}}


def test_late_joiner_gets_the_state_as_of_the_last_flush(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("c1", TOPIC, "alice", {"status": "online"})
    s.tracker.track("c2", TOPIC, "bob", {})
    s.tracker.track("c3", TOPIC, "carol", {})
    s.flush()
    # Pending when the late client subscribes: a join, a cancelled join, a leave, an update.
    s.tracker.track("c4", TOPIC, "dave", {})
    s.tracker.track("c5", TOPIC, "ghost", {})
    s.tracker.disconnect("c5")
    s.tracker.disconnect("c2")
    s.tracker.update("c1", TOPIC, "alice", {"status": "away"})
    late = s.subscribe(raw=True)
    assert late.events[0]["payload"] == s.tracker.initial_state(TOPIC) == s.flushed
    assert s.tracker.list(TOPIC) != s.flushed
    s.flush()
    results = s.check(js)
    for subscriber in (0, 1):
        for state in js_states(results, subscriber).values():
            assert set(state) == {"alice", "carol", "dave"}
            assert state["alice"]["metas"][0]["status"] == "away"


def test_meta_field_named_proto_survives(js: JsClients) -> None:
    s = Scenario()
    s.subscribe()
    s.tracker.track("c1", TOPIC, "alice", {"__proto__": {"polluted": True}, "constructor": 1})
    s.flush()
    for state in js_states(s.check(js)).values():
        assert state["alice"]["metas"][0]["__proto__"] == {"polluted": True}


def test_realtime_js_drops_a_key_named_proto(js: JsClients) -> None:
    """A known realtime-js limitation, pinned so that a fix shows up here; the Tracker refuses
    the key, so no presence of ours can vanish that way.

    phoenix.js holds the key; realtime-js's state getter assigns keys into a plain object, where
    ``"__proto__"`` sets the prototype instead of adding a key.
    """
    state = {
        "__proto__": {"metas": [{"phx_ref": "p1"}]},
        "constructor": {"metas": [{"phx_ref": "c1"}]},
    }
    event = {
        "kind": "state",
        "payload": state,
        "frames": frames(PRESENCE_STATE, orjson.dumps(state)),
    }
    results = js.run([[event]])
    for client, outcome in results[0].items():
        assert outcome["error"] is None
        got = outcome["states"][-1]
        if client in KEEPS_REF_PREV:
            assert got == state
        else:
            assert got == {"constructor": state["constructor"]}, (
                f"{client} now keeps a '__proto__' key: the Tracker could accept it again"
            )
    tracker = Scenario().tracker
    with pytest.raises(PresenceValueError, match="__proto__"):
        tracker.track("c1", TOPIC, "__proto__", {})
    assert tracker.list(TOPIC) == {}


def test_client_rules_on_hand_made_payloads(js: JsClients) -> None:
    """The client behaviour the Tracker relies on, independent of the Tracker."""

    def meta(ref: str, **fields: Any) -> dict[str, Any]:
        return {"phx_ref": ref, **fields}

    def diff(joins: State, leaves: State) -> dict[str, Any]:
        return {"joins": joins, "leaves": leaves}

    state = {"alice": {"metas": [meta("a1", n=1), meta("a2", n=2), meta("a3", n=3)]}}
    payloads: list[tuple[str, Any]] = [
        (PRESENCE_STATE, state),
        # A join for a held key: held metas not joining first, then joiners in payload order;
        # a held ref joining again is replaced and moves to the end.
        (PRESENCE_DIFF, diff({"alice": {"metas": [meta("a5"), meta("a2", n=22)]}}, {})),
        # A leave for an unknown key is skipped; the leaves after it still apply.
        (
            PRESENCE_DIFF,
            diff({}, {"ghost": {"metas": [meta("g")]}, "alice": {"metas": [meta("a1")]}}),
        ),
        # A state matches by ref only: a changed meta under a held ref is not seen.
        (PRESENCE_STATE, {"alice": {"metas": [meta("a3", n=333), meta("a6")]}}),
    ]
    events = [
        {
            "kind": "state" if e == PRESENCE_STATE else "diff",
            "payload": p,
            "frames": frames(e, orjson.dumps(p)),
        }
        for e, p in payloads
    ]
    results = js.run([events])[0]
    expected = [
        state,
        {"alice": {"metas": [meta("a1", n=1), meta("a3", n=3), meta("a5"), meta("a2", n=22)]}},
        {"alice": {"metas": [meta("a3", n=3), meta("a5"), meta("a2", n=22)]}},
        {"alice": {"metas": [meta("a3", n=3), meta("a6")]}},
    ]
    for client, outcome in results.items():
        assert outcome["error"] is None, outcome["error"]
        assert outcome["states"] == expected, client


# -- random operations -----------------------------------------------------------------------

CONNS: tuple[str | int, ...] = ("c1", "c2", "c3", 4)
KEYS = ("alice", "bob", "constructor", "émile 🚀")
TOPICS = (TOPIC, OTHER_TOPIC)
METAS: tuple[dict[str, Any], ...] = (
    {},
    {"status": "online"},
    {"status": "away", "device": "web"},
    {"status": "busy", "custom_status": "in a meeting ☕", "device": "phone"},
    {"online_at": 1_700_000_000.5, "tags": ["a", "b"], "nested": {"x": [1, None, True]}},
    {"__proto__": {"polluted": True}},
)

conns = st.sampled_from(CONNS)
topics = st.sampled_from((TOPIC, TOPIC, TOPIC, OTHER_TOPIC))  # mostly the one subscribed to
keys = st.sampled_from(KEYS)
metas = st.sampled_from(METAS)

track = st.tuples(st.just("track"), conns, topics, keys, metas)
update = st.tuples(st.just("update"), conns, topics, keys, metas)
flush = st.tuples(st.just("flush"))
operations = st.one_of(
    track,
    track,
    update,
    update,
    flush,
    flush,
    st.tuples(st.just("untrack"), conns, topics, st.none() | keys),
    st.tuples(st.just("disconnect"), conns),
    st.tuples(st.just("heartbeat"), conns),
    st.tuples(st.just("expire"), st.sampled_from([5.0, 20.0, 31.0])),  # expire, no flush
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 29.0, 31.0, 100.0])),
    st.tuples(st.just("subscribe"), st.booleans()),
)


def run_operation(s: Scenario, op: tuple[Any, ...]) -> None:
    name, *args = op
    tracker = s.tracker
    if name == "track":
        tracker.track(*args)
    elif name == "update":
        try:
            tracker.update(*args)
        except NotTracked:
            pass
    elif name == "untrack":
        tracker.untrack(*args)
    elif name == "disconnect":
        tracker.disconnect(args[0])
    elif name == "heartbeat":
        tracker.heartbeat(args[0])
    elif name == "expire":
        s.clock.advance(args[0])
        tracker.expire()
    elif name == "tick":
        s.tick(args[0])
    elif name == "flush":
        s.flush()
    elif name == "subscribe":
        if len(s.subscribers) < 6:
            s.subscribe(raw=args[0])
    else:  # pragma: no cover
        raise AssertionError(op)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(operations, min_size=10, max_size=60), raw_first=st.booleans())
def test_js_clients_follow_random_operations(
    js: JsClients, ops: list[tuple[Any, ...]], raw_first: bool
) -> None:
    s = Scenario()
    s.subscribe(raw=raw_first)
    for op in ops:
        run_operation(s, op)
    s.flush()
    s.check(js)
