"""The change feed: every accepted presence change, coalesced per topic until the next flush.

Each change is recorded on its topic as a pending join or leave, keyed by the presence tuple.
A leave of a presence whose join is still pending cancels the join instead (the two never reach
anyone), and an update of such a presence carries the ``phx_ref_prev`` of the join it replaces,
so ``phx_ref_prev`` always names a ref that readers of earlier batches hold.  So every leave in a
batch names a presence joined in an earlier batch: a subscriber that started from the state as
of the last flush holds every key a diff removes.  (That matters: Supabase's Python client before
2.32.0 stops applying a diff's leaves at the first key it does not hold.)

`ChangeFeed.take` hands out everything pending as one batch of `TopicChanges`, which the Tracker
gives first to its feed readers (the Redis store) and then to the local fan-out.  Both read the
same batch, so the store sees every change whether or not anyone listens locally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .encoding import DATA, Presence, ref_of

if TYPE_CHECKING:
    from .state import Topic

__all__ = ["ChangeFeed", "TopicChanges"]


class TopicChanges:
    """One topic's coalesced changes in one batch of the feed.

    Attributes:
        topic: The topic's name.
        joins: Presences that joined, each mapped to the ref it replaces (an update's
            ``phx_ref_prev``) or None, in the order they joined.
        leaves: Presences that left, in the order they left.

    Presences are ``(topic, key, data, conn)`` tuples; see `presence_core.tracker.encoding`.
    A reader must treat the batch as read-only: the fan-out reads it after the readers.
    """

    __slots__ = ("joins", "leaves", "record", "topic")

    def __init__(
        self, record: Topic, joins: dict[Presence, bytes | None], leaves: dict[Presence, None]
    ) -> None:
        self.record = record
        self.topic = record.name
        self.joins = joins
        self.leaves = leaves

    def __repr__(self) -> str:
        return f"<TopicChanges {self.topic!r} joins={len(self.joins)} leaves={len(self.leaves)}>"


_EMPTY_JOINS: dict[Presence, bytes | None] = {}
_EMPTY_LEAVES: dict[Presence, None] = {}


class ChangeFeed:
    """Pending changes by topic, in the order topics first changed since the last `take`.

    A join is recorded on its topic by `PresenceState.add` and `PresenceState.replace`
    themselves (``t.joins[p] = prev``, then ``dirty[t.name] = t``): they run on every track
    and update, and a call here would cost each of them.  A leave needs the coalescing rule
    below, so it comes through `left`.
    """

    __slots__ = ("dirty",)

    def __init__(self) -> None:
        self.dirty: dict[str, Topic] = {}

    def __len__(self) -> int:
        """Topics with pending changes."""
        return len(self.dirty)

    def __contains__(self, topic: str) -> bool:
        return topic in self.dirty

    def left(self, t: Topic, p: Presence) -> bytes | None:
        """Record that ``p`` left ``t``; returns the ref a replacing join should name as prev.

        A presence whose join is still pending simply vanishes from the feed: nobody heard of
        it.  Its own prev (if it replaced an older presence) passes to its replacement.
        """
        joins = t.joins
        if joins is not None and p in joins:
            return joins.pop(p)
        leaves = t.leaves
        if leaves is None:
            leaves = t.leaves = {}
        leaves[p] = None
        self.dirty[t.name] = t
        return ref_of(p[DATA])

    def take(self) -> list[TopicChanges]:
        """Everything pending, one `TopicChanges` per topic with a change left after coalescing."""
        dirty = self.dirty
        if not dirty:
            return []
        self.dirty = {}
        batch = []
        for t in dirty.values():
            joins, leaves = t.joins, t.leaves
            t.joins = t.leaves = None
            if joins or leaves:
                batch.append(TopicChanges(t, joins or _EMPTY_JOINS, leaves or _EMPTY_LEAVES))
        return batch
