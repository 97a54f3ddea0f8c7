"""What the Tracker knows: topics with their presences, connections, and who holds each key.

* **Connections** live in a native `PresenceTable` keyed by the host's connection id (see
  `presence_core.tracker.tracker`); the value is a connection record, a plain tuple
  ``(id, plan, ttl, presences, tat)``: the plan's name, the TTL in seconds, the connection's
  presences in creation order, and the token bucket's theoretical arrival time.  Every write
  replaces the record.  A tuple of str, float and untracked tuples is untracked by the garbage
  collector, so a million connections cost a full collection nothing (a record class and a list
  per connection cost about 40 ms per collection at 250k connections).
* **A topic** maps key -> the key's presence, or a list of them in creation order when a key has
  several (one per connection or device).  Most keys have one, and a tuple in place saves a list
  per key.  Topics over `INDEX_THRESHOLD` keys that are paged get a sorted key index.
* **Users** map key -> the id of the connection holding a presence with that key, or (several)
  a dict of them in arrival order: a popular key may be held by very many, and each must leave
  in O(1).

* **The remote view**: presences held by other processes (mirrored from Redis by the store, or
  from Supabase Realtime by a bridge) live in the same topics, with ``conn`` None, so lists,
  counts and diffs show them with the local ones.  They are also indexed by ref (refs are
  unique across processes) and by key, and never enter the users index of connections.

`PresenceState` changes topics, users and counts together and records each change in the
`ChangeFeed`; the Tracker decides what may change and keeps connection records.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from ..typing import ConnId
from .encoding import DATA, KEY, TOPIC, Presence, ref_of
from .feed import ChangeFeed

__all__ = [
    "C_ID",
    "C_PLAN",
    "C_PRESENCES",
    "C_TAT",
    "C_TTL",
    "INDEX_THRESHOLD",
    "ConnRecord",
    "PresenceState",
    "Topic",
]

ConnRecord: TypeAlias = tuple[ConnId, str, float, tuple[Presence, ...], float]
"""``(id, plan name, ttl, presences, tat)``; see the module docstring."""

C_ID: Final = 0
C_PLAN: Final = 1
C_TTL: Final = 2
C_PRESENCES: Final = 3
C_TAT: Final = 4

INDEX_THRESHOLD: Final = 1024
"""Keys a topic needs before paging keeps a sorted index; below it, sorting a page is cheaper
than maintaining an index on every join and leave."""

Held: TypeAlias = Presence | list[Presence]
"""What a topic holds for one key: its presence, or its presences in creation order."""


class Topic:
    """One topic: its keys, pending changes (see `ChangeFeed`), subscribers and key index."""

    __slots__ = ("hooks", "index", "joins", "keys", "leaves", "metas", "name", "subscribers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: dict[str, Held] = {}
        self.metas = 0
        # Pending changes, created on first use: joins map a presence to the ref it replaces.
        self.joins: dict[Presence, bytes | None] | None = None
        self.leaves: dict[Presence, None] | None = None
        # Subscribers by a token of their own (O(1) to add and remove, however many), created on
        # first use, and the tuple a flush delivers to, rebuilt after a change.
        self.subscribers: dict[int, list[Any]] | None = None
        self.hooks: tuple[list[Any], ...] | None = ()
        self.index: SortedList | None = None

    def subscribed(self) -> tuple[list[Any], ...]:
        """The subscribers' hook entries, as a tuple that stays valid while they change."""
        hooks = self.hooks
        if hooks is None:
            hooks = self.hooks = tuple(self.subscribers.values()) if self.subscribers else ()
        return hooks

    def sorted_keys(self) -> SortedList:
        """The key index, built on first use and maintained from then on."""
        if self.index is None:
            self.index = SortedList(self.keys)
        return self.index


def presences_of(held: Held) -> list[Presence]:
    """The presences a topic holds for one key, oldest first."""
    return [held] if isinstance(held, tuple) else held


def datas_of(held: Held) -> list[bytes]:
    """The stored metas a topic holds for one key, oldest first."""
    if isinstance(held, tuple):
        return [held[DATA]]
    return [p[DATA] for p in held]


class PresenceState:
    """Topics, the users index and the counts, changed together; every change goes to the feed."""

    __slots__ = (
        "data_bytes",
        "feed",
        "n_presences",
        "n_topics",
        "remote",
        "remote_owners",
        "remote_users",
        "topics",
        "users",
    )

    def __init__(self) -> None:
        self.topics: dict[str, Topic] = {}
        self.users: dict[str, ConnId | dict[ConnId, None]] = {}
        self.remote: dict[bytes, Presence] = {}  # ref -> a presence held elsewhere
        # key -> its remote presence, or (several) ref -> presence: a dict per key would be
        # one more object for every full garbage collection to walk.
        self.remote_users: dict[str, Presence | dict[bytes, Presence]] = {}
        self.remote_owners: dict[bytes, int] = {}  # owner node -> its remote presences
        self.feed = ChangeFeed()
        self.n_presences = 0
        self.n_topics = 0  # topics with at least one presence
        self.data_bytes = 0

    def topic(self, name: str) -> Topic:
        """The topic ``name``, created if new."""
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = Topic(name)
        return t

    def add(
        self,
        t: Topic,
        key: str,
        held: Held | None,
        data: bytes,
        conn: ConnId | None,
        new_holder: bool,
    ) -> Presence:
        """Add a presence whose checks have passed; the hot path of `Tracker.track`.

        ``held`` is what ``t`` holds for ``key``; ``new_holder`` says that ``conn`` held no
        presence as ``key`` before.  The feed's and the users index's bookkeeping is written
        out here rather than called: this runs once per track.
        """
        keys = t.keys
        if held is None:
            p = (t.name, key, data, conn)
            keys[key] = p
            if len(keys) == 1:
                self.n_topics += 1
            if t.index is not None:
                t.index.add(key)
        elif isinstance(held, tuple):
            # Share the key object already stored: one str per key per topic.
            p = (t.name, held[KEY], data, conn)
            keys[key] = [held, p]
        else:
            p = (t.name, held[0][KEY], data, conn)
            held.append(p)
        t.metas += 1
        self.n_presences += 1
        self.data_bytes += len(data)
        if new_holder:
            users = self.users
            held_by = users.get(key)
            if held_by is None:
                users[key] = conn  # type: ignore[assignment]
            elif type(held_by) is dict:
                held_by[conn] = None  # type: ignore[index]
            else:
                users[key] = {held_by: None, conn: None}  # type: ignore[dict-item]
        joins = t.joins  # recording the join: see `ChangeFeed`
        if joins is None:
            joins = t.joins = {}
        joins[p] = None
        self.feed.dirty[t.name] = t
        return p

    def replace(self, old: Presence, data: bytes) -> Presence:
        """Replace ``old`` by a presence with stored meta ``data`` (a new ref); one diff."""
        topic, key, old_data, conn = old
        t = self.topics[topic]
        new = (topic, key, data, conn)
        held = t.keys[key]
        if held is old:
            t.keys[key] = new
        else:
            # Remove and append, so a key's metas stay in creation order, which is the order a
            # client ends up with after applying the diff (joins are appended there).
            held.remove(old)  # type: ignore[union-attr]
            held.append(new)  # type: ignore[union-attr]
        self.data_bytes += len(data) - len(old_data)
        prev = self.feed.left(t, old)
        joins = t.joins  # recording the join, as in `add`
        if joins is None:
            joins = t.joins = {}
        joins[new] = prev
        self.feed.dirty[topic] = t
        return new

    def remove(self, p: Presence) -> None:
        """Take ``p`` out of its topic and record the leave (the caller fixes the connection)."""
        topic, key, data, _ = p
        t = self.topics[topic]
        keys = t.keys
        held = keys[key]
        if held is p:
            del keys[key]
            if t.index is not None:
                t.index.remove(key)
            if not keys:
                self.n_topics -= 1
        else:
            held.remove(p)  # type: ignore[union-attr]
            if len(held) == 1:
                keys[key] = held[0]
        t.metas -= 1
        self.n_presences -= 1
        self.data_bytes -= len(data)
        self.feed.left(t, p)

    def add_remote(self, topic: str, key: str, data: bytes, prev: bytes | None) -> bool:
        """Mirror a presence held elsewhere; False if its ref is already here.

        ``prev`` names the ref it replaces (an update elsewhere): if that presence is here, it
        is replaced in one diff, as a local update is.
        """
        ref = ref_of(data)
        remote = self.remote
        if ref in remote:
            return False
        old = remote.pop(prev, None) if prev is not None else None
        if old is not None and old[TOPIC] == topic and old[KEY] == key:
            self._forget_remote_user(old, prev)  # type: ignore[arg-type]
            p = self.replace(old, data)
        else:
            if old is not None:  # not the same presence after all: keep it
                remote[prev] = old  # type: ignore[index]
            t = self.topic(topic)
            p = self.add(t, key, t.keys.get(key), data, None, False)
        remote[ref] = p
        owner = ref[: ref.rindex(b".")]
        self.remote_owners[owner] = self.remote_owners.get(owner, 0) + 1
        users = self.remote_users
        held = users.get(key)
        if held is None:
            users[key] = p
        elif type(held) is tuple:
            users[key] = {ref_of(held[DATA]): held, ref: p}
        else:
            held[ref] = p  # type: ignore[index]
        return True

    def remove_remote(self, ref: bytes) -> Presence | None:
        """Take the remote presence ``ref`` out (recording the leave); None if it is not here."""
        p = self.remote.pop(ref, None)
        if p is None:
            return None
        self._forget_remote_user(p, ref)
        self.remove(p)
        return p

    def _forget_remote_user(self, p: Presence, ref: bytes) -> None:
        owners = self.remote_owners
        owner = ref[: ref.rindex(b".")]
        left = owners[owner] - 1
        if left:
            owners[owner] = left
        else:
            del owners[owner]
        users = self.remote_users
        held = users[p[KEY]]
        if type(held) is tuple:
            del users[p[KEY]]
            return
        del held[ref]  # type: ignore[union-attr]
        if len(held) == 1:
            users[p[KEY]] = next(iter(held.values()))

    def remote_of(self, key: str) -> list[Presence]:
        """The remote presences of ``key``, in the order they arrived."""
        held = self.remote_users.get(key)
        if held is None:
            return []
        if type(held) is tuple:
            return [held]
        return list(held.values())  # type: ignore[union-attr]

    def release(self, key: str, conn: ConnId) -> bool:
        """Record that ``conn`` holds no presence as ``key`` any more; True if nobody does."""
        users = self.users
        held_by = users.get(key)
        if type(held_by) is dict:
            del held_by[conn]
            if len(held_by) == 1:
                users[key] = next(iter(held_by))
            return False
        del users[key]
        return True

    def holders(self, key: str) -> tuple[ConnId, ...]:
        """The connections holding a presence as ``key``, in arrival order."""
        held_by = self.users.get(key)
        if held_by is None:
            return ()
        if type(held_by) is dict:
            return tuple(held_by)
        return (held_by,)  # type: ignore[return-value]

    def prune(self, t: Topic) -> None:
        """Forget ``t`` if nothing refers to it any more: no key, subscriber or pending change."""
        if (
            not t.keys
            and not t.subscribers
            and t.name not in self.feed
            and self.topics.get(t.name) is t
        ):
            del self.topics[t.name]


def ref_number(data: bytes) -> int:
    """The counter part of a stored meta's ref (``node.<hex>``): creation order in a Tracker."""
    ref = ref_of(data)
    return int(ref[ref.rindex(b".") + 1 :], 16)
