"""Helpers for testing code that uses presence_core.

* `RecordingTransport` -- a transport (or subscriber) that keeps every event it receives, with
  filters, so a test can assert on what clients would have been sent.
* `ManualClock` -- a clock that moves only when told, for deterministic TTL tests.
* `ClientView` -- what a Phoenix/Supabase client holds after applying the ``presence_state`` and
  ``presence_diff`` events it was sent, applied exactly as phoenix.js's ``Presence.syncState`` /
  ``Presence.syncDiff`` apply them (key and meta order included).  With
  ``strict=True`` it raises as soon as an event could not have been applied cleanly (a leave for
  a key or ref it does not hold, a ref joined twice), which is how a test proves the stream it
  received is consistent.

Typical use::

    clock = ManualClock()
    tracker = Tracker(clock=clock)
    recorder = RecordingTransport()
    view = ClientView(strict=True)
    tracker.subscribe("room:1", recorder)
    tracker.subscribe("room:1", view)
    tracker.track("conn-1", "room:1", "alice", {"status": "online"})
    tracker.flush()
    assert view.state == tracker.list("room:1")
    assert recorder.diffs("room:1")[0]["joins"].keys() == {"alice"}
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .._validate import check_time
from ..errors import PresenceValueError
from ..phoenix import EVENT_PRESENCE_DIFF, EVENT_PRESENCE_STATE

__all__ = ["ClientView", "Event", "ManualClock", "RecordingTransport"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event a transport received."""

    topic: str
    event: str
    payload: dict[str, Any]


class RecordingTransport:
    """A transport that records ``(topic, event, payload)`` for later assertions.

    It keeps the payloads it is given; the Tracker hands each hook its own copy, so they stay as
    they were delivered.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        self.events.append(Event(topic, event, payload))

    def filter(self, topic: str | None = None, event: str | None = None) -> list[Event]:
        """The events for ``topic`` and of kind ``event`` (either may be None for any)."""
        return [
            e
            for e in self.events
            if (topic is None or e.topic == topic) and (event is None or e.event == event)
        ]

    def payloads(self, topic: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        """The payloads of `filter`."""
        return [e.payload for e in self.filter(topic, event)]

    def diffs(self, topic: str | None = None) -> list[dict[str, Any]]:
        """The ``presence_diff`` payloads (for ``topic`` if given)."""
        return self.payloads(topic, EVENT_PRESENCE_DIFF)

    def states(self, topic: str | None = None) -> list[dict[str, Any]]:
        """The ``presence_state`` payloads (for ``topic`` if given)."""
        return self.payloads(topic, EVENT_PRESENCE_STATE)

    def topics(self) -> list[str]:
        """Topics that received events, in order of their first event."""
        return list(dict.fromkeys(e.topic for e in self.events))

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.events.clear()

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __repr__(self) -> str:
        return f"<RecordingTransport events={len(self.events)}>"


class ManualClock:
    """A clock for tests: ``clock()`` returns the current time, which moves only when told.

    Readings are finite floats; a start, jump or step that is not a finite number raises
    `presence_core.errors.PresenceTypeError` / `presence_core.errors.PresenceValueError`.  (To
    test a clock that misbehaves, pass the Tracker a function of your own.)
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = check_time(start, "start")

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (>= 0); returns the new time."""
        step = check_time(seconds, "seconds")
        if step < 0:
            raise PresenceValueError(f"a clock only moves forward, got {seconds!r}")
        now = self.now + step
        if now - now != 0.0:
            raise PresenceValueError(f"advancing {self.now!r} by {seconds!r} leaves float range")
        self.now = now
        return now

    def set(self, now: float) -> None:
        """Jump to ``now``."""
        self.now = check_time(now, "now")

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now})"


class ClientView:
    """A client's view of one topic, built from the events it receives.

    Callable as a transport or subscriber: ``view(topic, event, payload)``.  Only the first
    topic it sees is followed (pass ``topic=`` to choose); events for other topics are ignored.

    The rules are those of phoenix.js's ``Presence.syncState`` and ``Presence.syncDiff``
    (phoenix 1.8, ``assets/js/phoenix/presence.js``), which Supabase's realtime-js runs too;
    ``tests/test_testing.py`` checks the view against the real code:

    * a ``presence_diff`` applies its joins first: the key's metas become the held metas whose
      ref is not joining, in held order, followed by the joining metas in payload order (a
      joining key the view does not hold is added as it comes, even with no metas).  Then its
      leaves: metas are removed by ref, a key left with none is dropped, and a leave for a key
      the view does not hold is skipped.
    * a ``presence_state`` is matched against the view key by key and ref by ref.  A held key
      absent from the state is dropped.  A held key in the state keeps its held metas whose ref
      is in the state, as they are held (a changed meta under a held ref is not seen) and in
      held order, followed by the state's metas with refs it did not hold, in state order; it
      is dropped if that leaves nothing.  Keys the view did not hold are added in state order.
    * keys keep the position they were first added at; `state` lists them as a JavaScript
      object does: keys that are array indices ("0", "42", not "042") first in numeric order,
      then the others in that order.

    ``phx_ref_prev`` is dropped, as Supabase's clients do (phoenix.js keeps it on the meta).
    With ``strict=True`` an event that a client could not apply cleanly raises `AssertionError`:
    a leave for a key or ref the view does not hold, a join of a ref it already holds, a ref
    that joins and leaves in the same diff, or a ``phx_ref_prev`` that does not name a held ref
    of the same key leaving in the same diff."""

    def __init__(self, *, strict: bool = False, topic: str | None = None) -> None:
        self.strict = strict
        self.topic = topic
        self._state: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        if self.topic is None:
            self.topic = topic
        elif topic != self.topic:
            return
        if event == EVENT_PRESENCE_STATE:
            self.apply_state(payload)
        elif event == EVENT_PRESENCE_DIFF:
            self.apply_diff(payload)

    @property
    def state(self) -> dict[str, Any]:
        """The view in the ``presence_state`` shape (a deep copy), keys in JavaScript order."""
        return {key: {"metas": copy.deepcopy(self._state[key])} for key in _js_order(self._state)}

    def apply_state(self, payload: dict[str, Any]) -> None:
        """Apply a ``presence_state`` payload."""
        # syncState turns the state into a diff against what is held -- per key, joins are the
        # metas with refs not held under that key, leaves the held metas with refs not in the
        # state -- and applies it with syncDiff.  Worked out per key, that is what follows.
        fresh: dict[str, list[dict[str, Any]]] = {}
        for key, held in self._state.items():
            if key not in payload:
                continue  # leaves with all its metas
            incoming = payload[key]["metas"]
            refs = {meta["phx_ref"] for meta in incoming}
            held_refs = {meta["phx_ref"] for meta in held}
            metas = [meta for meta in held if meta["phx_ref"] in refs]
            metas += [_clean(meta) for meta in incoming if meta["phx_ref"] not in held_refs]
            # Emptied by its leaves, the key goes; held with no metas and given none, it stays
            # (there was nothing to join or leave).
            if metas or not held:
                fresh[key] = metas
        for key, entry in payload.items():
            if key not in self._state:
                fresh[key] = [_clean(meta) for meta in entry["metas"]]
        self._state = fresh

    def apply_diff(self, payload: dict[str, Any]) -> None:
        """Apply a ``presence_diff`` payload."""
        state = self._state
        if self.strict:
            self._check_diff(payload)
        for key, entry in payload["joins"].items():
            joining = [_clean(meta) for meta in entry["metas"]]
            refs = {meta["phx_ref"] for meta in joining}
            held = state.get(key, [])
            if self.strict:
                again = refs.intersection(meta["phx_ref"] for meta in held)
                if again:
                    raise AssertionError(f"join of refs already held under {key!r}: {again}")
            kept = [meta for meta in held if meta["phx_ref"] not in refs]
            state[key] = kept + joining
        for key, entry in payload["leaves"].items():
            current = state.get(key)
            if current is None:
                if self.strict:
                    raise AssertionError(f"leave for key {key!r}, which the client does not hold")
                continue
            refs = {meta["phx_ref"] for meta in entry["metas"]}
            if self.strict:
                missing = refs.difference(meta["phx_ref"] for meta in current)
                if missing:
                    raise AssertionError(f"leave of refs not held under {key!r}: {missing}")
            remaining = [meta for meta in current if meta["phx_ref"] not in refs]
            if remaining:
                state[key] = remaining
            else:
                del state[key]

    def _check_diff(self, payload: dict[str, Any]) -> None:
        # Checks that need the view as it was before the diff: refs named as replaced must be
        # held under the same key and leave in the same diff; no ref both joins and leaves.
        leaving = {
            (key, meta["phx_ref"])
            for key, entry in payload["leaves"].items()
            for meta in entry["metas"]
        }
        for key, entry in payload["joins"].items():
            held = {meta["phx_ref"] for meta in self._state.get(key, [])}
            for meta in entry["metas"]:
                if (key, meta["phx_ref"]) in leaving:
                    raise AssertionError(f"ref {meta['phx_ref']!r} joins and leaves in one diff")
                prev = meta.get("phx_ref_prev")
                if prev is not None and (prev not in held or (key, prev) not in leaving):
                    raise AssertionError(
                        f"phx_ref_prev {prev!r} under {key!r} is not a held ref leaving now"
                    )

    def __repr__(self) -> str:
        return f"<ClientView topic={self.topic!r} keys={len(self._state)}>"


def _is_array_index(key: str) -> bool:
    # "0", "7", "42" but not "042", "-1", "1.5" or 2**32 - 1: the keys a JavaScript object lists
    # first, in numeric order, whatever order they were added in.
    if len(key) > 10 or not (key.isascii() and key.isdigit()):  # 2**32 - 2 has 10 digits
        return False
    return (key == "0" or key[0] != "0") and int(key) <= 2**32 - 2


def _js_order(keys: dict[str, Any]) -> list[str]:
    """``keys`` in the order a JavaScript object with them, added in this order, lists them."""
    indices = sorted((key for key in keys if _is_array_index(key)), key=int)
    return indices + [key for key in keys if not _is_array_index(key)]


def _clean(meta: dict[str, Any]) -> dict[str, Any]:
    clean = copy.deepcopy(meta)
    clean.pop("phx_ref_prev", None)
    return clean
