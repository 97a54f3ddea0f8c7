"""Helpers for testing code that uses presence_core.

* `RecordingTransport` -- a transport (or subscriber) that keeps every event it receives, with
  filters, so a test can assert on what clients would have been sent.
* `ManualClock` -- a clock that moves only when told, for deterministic TTL tests.
* `ClientView` -- what a Phoenix/Supabase client holds after applying the ``presence_state`` and
  ``presence_diff`` events it was sent, applied by the same rules those clients use.  With
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

from .phoenix import EVENT_PRESENCE_DIFF as PRESENCE_DIFF
from .phoenix import EVENT_PRESENCE_STATE as PRESENCE_STATE

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
        return self.payloads(topic, PRESENCE_DIFF)

    def states(self, topic: str | None = None) -> list[dict[str, Any]]:
        """The ``presence_state`` payloads (for ``topic`` if given)."""
        return self.payloads(topic, PRESENCE_STATE)

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
    """A clock for tests: ``clock()`` returns the current time, which moves only when told."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (>= 0); returns the new time."""
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r}")
        self.now += seconds
        return self.now

    def set(self, now: float) -> None:
        """Jump to ``now``."""
        self.now = float(now)

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now})"


class ClientView:
    """A client's view of one topic, built from the events it receives.

    Callable as a transport or subscriber: ``view(topic, event, payload)``.  Only the first
    topic it sees is followed (pass ``topic=`` to choose); events for other topics are ignored.

    The rules are the ones Phoenix's JavaScript client and Supabase's clients apply:

    * a ``presence_state`` replaces the view, except that metas whose ref the view already holds
      are kept as they are (clients match by ref only);
    * a ``presence_diff`` applies its joins first: the key's metas become the held metas whose
      ref is not joining, followed by the joining metas in payload order; then its leaves:
      metas are removed by ref and a key with none left is dropped.

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
        if event == PRESENCE_STATE:
            self.apply_state(payload)
        elif event == PRESENCE_DIFF:
            self.apply_diff(payload)

    @property
    def state(self) -> dict[str, Any]:
        """The view in the ``presence_state`` shape (a deep copy)."""
        return {key: {"metas": copy.deepcopy(metas)} for key, metas in self._state.items()}

    def apply_state(self, payload: dict[str, Any]) -> None:
        """Apply a ``presence_state`` payload."""
        held = {meta["phx_ref"]: meta for metas in self._state.values() for meta in metas}
        fresh: dict[str, list[dict[str, Any]]] = {}
        for key, entry in payload.items():
            metas = []
            for meta in entry["metas"]:
                ref = meta["phx_ref"]
                metas.append(held[ref] if ref in held else _clean(meta))
            if metas:
                fresh[key] = metas
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
            if not current:
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


def _clean(meta: dict[str, Any]) -> dict[str, Any]:
    clean = copy.deepcopy(meta)
    clean.pop("phx_ref_prev", None)
    return clean
