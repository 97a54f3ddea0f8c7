"""A naive presence tracker in plain Python: the comparison point for bench/test_bench_tracker.py.

This is what one would write without the native table: dicts all the way down.

* ``topics``: topic -> key -> ref -> meta, the caller's meta dict stored as given (a meta parsed
  off the wire is a fresh dict nobody else holds, so no copy is needed);
* ``deadlines``: connection -> deadline, so a heartbeat is one dict store and expiry a full scan;
* ``held``: connection -> its (topic, key, ref) triples, to remove them on disconnect;
* pending joins and leaves per topic, turned into one ``presence_diff`` per topic by `flush`.

It does what the benchmarks need and no more: no argument checks, limits, rate limits, users,
last seen, metrics or eviction, and no coalescing (a presence that joins and leaves within one
flush is sent both ways).  It is written to be reasonably quick, not to lose.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_right
from collections.abc import Callable, Hashable, Iterable
from itertools import count
from typing import Any

Meta = dict[str, Any]
Hook = Callable[[str, str, Any], object]


def _state(groups: Iterable[tuple[str, dict[str, Meta]]]) -> dict[str, Any]:
    """``{key: {"metas": [{"phx_ref": ref, ...meta}]}}`` built fresh from stored metas."""
    return {
        key: {"metas": [{"phx_ref": ref, **meta} for ref, meta in refs.items()]}
        for key, refs in groups
    }


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a state-shaped payload that shares no mutable object with it."""
    return {key: {"metas": [dict(m) for m in entry["metas"]]} for key, entry in state.items()}


class PlainTracker:
    """Presence with plain dicts: track, heartbeat, expire by scanning, diffs on flush."""

    def __init__(
        self,
        *,
        connection_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        node: str = "plain",
    ) -> None:
        self.ttl = connection_ttl
        self.clock = clock
        self.node = node + "."
        self.refs = count(1)
        self.topics: dict[str, dict[str, dict[str, Meta]]] = {}
        self.deadlines: dict[Hashable, float] = {}
        self.held: dict[Hashable, list[tuple[str, str, str]]] = {}
        self.joins: dict[str, list[tuple[str, str]]] = {}
        self.leaves: dict[str, list[tuple[str, str, Meta]]] = {}
        self.subscribers: dict[str, list[tuple[Hook, bool]]] = {}

    # -- writes ------------------------------------------------------------------------------

    def track(
        self, conn: Hashable, topic: str, key: str, meta: Meta, now: float | None = None
    ) -> str:
        if now is None:
            now = self.clock()
        ref = f"{self.node}{next(self.refs):x}"
        keys = self.topics.get(topic)
        if keys is None:
            keys = self.topics[topic] = {}
        refs = keys.get(key)
        if refs is None:
            keys[key] = {ref: meta}
        else:
            refs[ref] = meta
        self.deadlines[conn] = now + self.ttl
        held = self.held.get(conn)
        if held is None:
            self.held[conn] = [(topic, key, ref)]
        else:
            held.append((topic, key, ref))
        joins = self.joins.get(topic)
        if joins is None:
            self.joins[topic] = [(key, ref)]
        else:
            joins.append((key, ref))
        return ref

    def heartbeat(self, conn: Hashable, now: float | None = None) -> bool:
        if conn not in self.deadlines:
            return False
        self.deadlines[conn] = (self.clock() if now is None else now) + self.ttl
        return True

    def heartbeat_many(self, conns: Iterable[Hashable], now: float | None = None) -> int:
        deadline = (self.clock() if now is None else now) + self.ttl
        deadlines = self.deadlines
        touched = 0
        for conn in conns:
            if conn in deadlines:
                deadlines[conn] = deadline
                touched += 1
        return touched

    def disconnect(self, conn: Hashable) -> int:
        self.deadlines.pop(conn, None)
        held = self.held.pop(conn, ())
        for topic, key, ref in held:
            keys = self.topics[topic]
            refs = keys[key]
            meta = refs.pop(ref)
            if not refs:
                del keys[key]
            self.leaves.setdefault(topic, []).append((key, ref, meta))
        return len(held)

    def expire(self, now: float | None = None) -> list[Hashable]:
        if now is None:
            now = self.clock()
        gone = [conn for conn, deadline in self.deadlines.items() if deadline <= now]
        for conn in gone:
            self.disconnect(conn)
        return gone

    # -- reads -------------------------------------------------------------------------------

    def count(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))

    def list(self, topic: str) -> dict[str, Any]:
        return _state(self.topics.get(topic, {}).items())

    def page(
        self, topic: str, cursor: str | None = None, *, limit: int = 1000
    ) -> tuple[dict[str, Any], str | None]:
        keys = self.topics.get(topic, {})
        ordered = sorted(keys)
        start = 0 if cursor is None else bisect_right(ordered, cursor)
        chosen = ordered[start : start + limit]
        more = start + limit < len(ordered)
        return _state((key, keys[key]) for key in chosen), (chosen[-1] if more else None)

    # -- delivery ----------------------------------------------------------------------------

    def subscribe(self, topic: str, hook: Hook, *, raw: bool = False) -> None:
        self.subscribers.setdefault(topic, []).append((hook, raw))

    def flush(self) -> int:
        """One diff per changed topic: dict hooks get their own copy, raw hooks shared JSON."""
        joins, leaves = self.joins, self.leaves
        self.joins, self.leaves = {}, {}
        for topic in joins.keys() | leaves.keys():
            keys = self.topics.get(topic, {})
            joined: dict[str, dict[str, Meta]] = {}
            for key, ref in joins.get(topic, ()):
                meta = keys.get(key, {}).get(ref)
                if meta is not None:
                    joined.setdefault(key, {})[ref] = meta
            left: dict[str, dict[str, Meta]] = {}
            for key, ref, meta in leaves.get(topic, ()):
                left.setdefault(key, {})[ref] = meta
            diff = {"joins": _state(joined.items()), "leaves": _state(left.items())}
            blob: bytes | None = None
            for hook, raw in self.subscribers.get(topic, ()):
                if raw:
                    if blob is None:
                        blob = json.dumps(diff, separators=(",", ":")).encode()
                    hook(topic, "presence_diff", blob)
                else:
                    hook(topic, "presence_diff", {part: _copy_state(diff[part]) for part in diff})
        return len(joins.keys() | leaves.keys())
