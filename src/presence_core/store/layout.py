"""The Redis key layout of the presence store, and the commands that write it.

Everything here is pure: names of keys and channels, and RESP argument lists (``list[bytes]``)
ready for a pipelined writer to pack.  Nothing connects to a server.

Names
-----

``P`` is the key prefix (`Layout.prefix`): one namespace or tenant.  It is 1-64 characters of
``[A-Za-z0-9_.-]`` in ``:``-separated parts (``presence``, ``acme:prod``): never ``{`` or ``}``
(it would move every hash tag) nor a glob character (``SCAN MATCH P:*`` stays exact).  Two
layouts with different prefixes never name the same key: every key is the prefix, ``:``, then
either ``{`` or a fixed word, and the prefix holds no ``{``.

Inside a hash tag a name (topic, user key, node) is written escaped, ``E(name)``: the
characters ``% { } * ? [ ] \\``, the ASCII controls and space (U+0000-U+0020, U+007F) and the
C1 controls (U+0080-U+009F) become ``%XX`` per UTF-8 byte; every other character, other
Unicode included, stays as it is, so keys read as the names they hold (``P:{t:room:42}:m``) and
``SCAN MATCH`` patterns built from an escaped name are exact.  Why this encoding:

* injective and reversible (`escape_name` / `unescape_name`): ``%`` itself is escaped, so
  ``%XX`` only ever comes from escaping, and each name has exactly one escaped form;
* slot-stable: ``E(name)`` has no ``{`` or ``}``, so a tag ``{t:E(topic)}`` ends where we
  say it does, and whatever follows it cannot change the slot; the tag is never empty (its
  kind, ``t:`` / ``u:`` / ``n:`` / ``c:``, is inside it): an empty ``{}`` hashes the whole key;
* no hashing: a hashed name could not be listed by ``SCAN`` nor read back for reconciliation.

Keys (``T`` a topic, ``U`` a user's presence key, ``N`` a node = a Tracker's ``node``; ``ttl``
is the member TTL, the store's setting):

================================  ======  ==================================================
key                               type    contents, TTL, writers and readers
================================  ======  ==================================================
``P:{t:E(T)}:m``                  HASH    the topic's members: field ``member_field(key,
                                          ref)`` -> the meta as the Tracker's JSON bytes
                                          (``{"phx_ref":"<ref>",...}``).  Hash-field TTL
                                          layout: every field has its own TTL (``HSETEX PX
                                          ttl``, refreshed by ``HPEXPIRE``), and the key
                                          goes when its last field does.  Fallback layout:
                                          no field TTL; the key itself has ``PEXPIRE ttl``,
                                          renewed by every write of any process, so it only
                                          goes once nobody writes the topic.  Written by the
                                          owner's store (joins, leaves, and the refresh
                                          sweep), cleared of a node's fields by
                                          `REAP_NODE_SCRIPT` (a peer's, when the owner lapses;
                                          the owner's own, when it stops or restarts); read
                                          by reconciliation (``HGETALL``).
``P:{t:E(T)}:d``                  ZSET    fallback layout only: member field -> deadline
                                          (Unix ms).  Same slot as ``:m``.  Written with
                                          ``:m`` (``ZADD``, ``ZADD XX`` by the sweep,
                                          ``ZREM``), key ``PEXPIRE ttl`` as for ``:m``.  The
                                          store reads no deadline: no member expires on its
                                          own in this layout.  `REAP_EXPIRED_SCRIPT` and
                                          `ZSetCommands.expired` can remove due members,
                                          but nothing runs them.
``P:{u:E(U)}:seen``               STRING  last seen, Unix ms, with a long TTL (`last_seen`).
                                          Written by the store of the process where the
                                          user went offline, by a stopping or restarting
                                          process for its users, and by the peer that reaps
                                          a lapsed node for that node's users; read by
                                          ``users()`` for users present nowhere.
``P:{n:E(N)}:alive``              STRING  the node's liveness: any value (an incarnation id),
                                          ``PX`` liveness timeout, renewed by the node's
                                          heartbeat (`node_heartbeat`).  Read by peers:
                                          absent means the node lapsed.
``P:{n:E(N)}:topics``             SET     the topics (UTF-8) where the node has, or had,
                                          members: the index a peer walks to reap them.
                                          ``SADD`` by the node's store (`index_topics`),
                                          ``SREM`` by its sweep for topics it left, key
                                          ``PEXPIRE`` renewed by the heartbeat (liveness +
                                          ttl: past that its members have expired anyway, in
                                          the hash-field TTL layout); deleted by the reaper
                                          when done.
``P:{n:E(N)}:reaper``             STRING  a claim: ``SET NX PX`` by the peer reaping N, so
                                          peers do not all walk the same index (the reap is
                                          idempotent anyway; the claim only saves work).
``P:nodes``                       SET     the registry of node names: ``SADD`` by every
                                          heartbeat, ``SREM`` by the reaper once N's index is
                                          done and by N itself when it stops.  Peers read it
                                          and check each ``:alive``.
================================  ======  ==================================================

No per-user status is kept in Redis: ``users()`` answers a present user from the memory of
the process that asks (its own presences and its peers'), and reads only ``:seen``.
`Layout.user_status_key`, `user_field` and `parse_user_field` name a per-user hash that
nothing writes.

Pub/sub: a topic's diffs go to partition ``crc32(UTF-8 of T) % partitions``; partition ``i``
is the sharded channel ``P:{c:J}:i``, where ``J`` is precomputed (`partition_tags`) so that
partition ``i``'s slot lies in the ``i``-th of ``partitions`` equal slot ranges: shards own
contiguous slot ranges, so the partitions spread over the shards instead of piling onto one.

Owners
------

A member's owner is recorded *in its field*: the field starts with the member's ref, and a
ref is ``<node>.<hex counter>`` made by the Tracker of the process that tracked it (the
counter starts at a random point, so a restarted process never makes its predecessor's
refs).  So the
owner record is written atomically with the member, expires with it (the field TTL covers
both), costs no extra command or byte, and can never disagree with it.  Finding a node's
members in a topic is ``HSCAN key 0 MATCH <node>.*`` (a node name holds no glob character).
The price: a reap scans the topic's hash, not only the node's members.  A reap is rare (a
process died), it runs in bounded chunks (the script takes a cursor and a ``COUNT``), and it
avoids a per-member owner hash or index that every join and leave would have to write.  It
needs node names that no two live processes share: the Tracker's default (random) is so.  A
configured name may be reused by a restart: the new process's store removes what the old one
left before it writes (see `presence_core.store.store`).

Reaping a lapsed node on a cluster: a script may touch only the keys of one slot, and a
node's members are spread over its topics' slots.  So the index of its topics lives in the
node's own slot (``P:{n:E(N)}:topics``), and the removal runs per topic, in that topic's slot:
the reaper reads the index, then runs `REAP_NODE_SCRIPT` on each topic until its cursor comes
back ``0``, then deletes the index and the registry entry.  The walk is not atomic, but each
step is idempotent and each field is removed by exactly one script call (``HDEL`` answers 1
once), which returns it: leaves go out exactly once even when two peers reap together.

Commands
--------

`HashTTLCommands` (``HSETEX``: Valkey >= 9, Redis >= 8) and `ZSetCommands` (the fallback)
build the commands for a batch of feed changes, refreshes, and reaps, one topic at a time
(every command of one topic addresses one slot).  In the hash-field TTL layout a member is never
written with a plain ``HSET``: that would clear its field TTL and the member would never
expire.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Protocol

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .._validate import check_node
from ..errors import PresenceTypeError, PresenceValueError
from ..tracker.encoding import Presence, ref_of

__all__ = [
    "DEFAULT_PARTITIONS",
    "REAP_EXPIRED_SCRIPT",
    "REAP_EXPIRED_SHA",
    "REAP_NODE_SCRIPT",
    "REAP_NODE_SHA",
    "ChangesLike",
    "HashTTLCommands",
    "Layout",
    "ZSetCommands",
    "claim_reap",
    "escape_name",
    "eval_script",
    "evalsha",
    "finish_reap",
    "index_topics",
    "last_seen",
    "member_field",
    "node_heartbeat",
    "owner_of",
    "parse_member_field",
    "parse_user_field",
    "partition_tags",
    "script_load",
    "unescape_name",
    "user_field",
    "presence_field",
]

DEFAULT_PARTITIONS: Final = 16
"""Pub/sub partitions unless a `Layout` says otherwise (every process must use the same)."""

_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*")
_PREFIX_MAX: Final = 64
_REF_RE: Final = re.compile(rb"[A-Za-z0-9_-]{1,32}\.[0-9a-f]{1,16}")  # as a Tracker makes them

# -- names ------------------------------------------------------------------------------------

_ESCAPE_RE: Final = re.compile("[%{}*?\\[\\]\\\\\x00-\x20\x7f-\x9f]")
_ESCAPE_SEQ_RE: Final = re.compile("(?:%[0-9A-F]{2})+")


def _escape_char(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def escape_name(name: str) -> str:
    """``name`` as it appears inside a key: see the module docstring (``E(name)``)."""
    if _ESCAPE_RE.search(name) is None:
        return name
    return _ESCAPE_RE.sub(_escape_char, name)


def _unescape_seq(match: re.Match[str]) -> str:
    return bytes.fromhex(match.group().replace("%", "")).decode("utf-8")


def unescape_name(escaped: str) -> str:
    """The name whose `escape_name` is ``escaped``; ValueError if there is none."""
    if "%" not in escaped:
        name = escaped
    else:
        try:
            name = _ESCAPE_SEQ_RE.sub(_unescape_seq, escaped)
        except UnicodeDecodeError:
            raise PresenceValueError(f"not an escaped name: {escaped!r}") from None
    if escape_name(name) != escaped:  # stray '%', a raw '{', lower-case hex, ...
        raise PresenceValueError(f"not an escaped name: {escaped!r}")
    return name


def member_field(key: str, ref: bytes) -> bytes:
    """The field of the member ``(key, ref)`` in its topic's hash: ``<ref> <key>``.

    The ref comes first and holds no space, so the field splits at its first space whatever
    the key holds (`parse_member_field`), and its owner node is the field's prefix.
    """
    if _REF_RE.fullmatch(ref) is None:
        raise PresenceValueError(f"not a ref: {ref!r}")
    return ref + b" " + key.encode("utf-8")


def parse_member_field(field: bytes) -> tuple[str, bytes]:
    """``(key, ref)`` from a `member_field`; ValueError if it is not one."""
    ref, sep, key = field.partition(b" ")
    if not sep or _REF_RE.fullmatch(ref) is None:
        raise PresenceValueError(f"not a member field: {field!r}")
    return key.decode("utf-8"), ref


def user_field(topic: str, ref: bytes) -> bytes:
    """``<ref> <topic>``: a presence's field in a per-user hash (`Layout.user_status_key`),
    which nothing writes."""
    return member_field(topic, ref)


def parse_user_field(field: bytes) -> tuple[str, bytes]:
    """``(topic, ref)`` from a `user_field`; ValueError if it is not one."""
    return parse_member_field(field)


def owner_of(field: bytes) -> str:
    """The node that owns the member stored under ``field``."""
    return field[: field.index(b".")].decode("ascii")


@lru_cache(maxsize=64)
def partition_tags(partitions: int) -> tuple[str, ...]:
    """For each partition ``i``, a tag ``c:J`` whose slot lies in the ``i``-th slot range.

    The ranges split the 16384 slots into ``partitions`` equal parts.  ``J`` is the smallest
    counter that lands in the range, found by trying ``c:0``, ``c:1``, ... (about
    ``partitions * ln(partitions)`` tries), so every process computes the same tags.
    """
    if not 1 <= partitions <= REDIS_CLUSTER_HASH_SLOTS:
        raise PresenceValueError(
            f"partitions must be 1-{REDIS_CLUSTER_HASH_SLOTS}, got {partitions}"
        )
    tags: list[str | None] = [None] * partitions
    missing = partitions
    j = 0
    while missing:
        tag = f"c:{j}"
        i = key_slot(tag.encode("ascii")) * partitions // REDIS_CLUSTER_HASH_SLOTS
        if tags[i] is None:
            tags[i] = tag
            missing -= 1
        j += 1
    return tuple(t for t in tags if t is not None)


@dataclass(frozen=True)
class Layout:
    """The names of every key and channel under one prefix (see the module docstring).

    Attributes:
        prefix: The namespace or tenant: 1-64 characters of ``[A-Za-z0-9_.-]`` in
            ``:``-separated parts.
        partitions: Pub/sub partitions (1-16384); every process of a namespace must agree.
    """

    prefix: str = "presence"
    partitions: int = DEFAULT_PARTITIONS
    _head: bytes = field(init=False, repr=False, compare=False)
    _tags: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = self.prefix
        if (
            not isinstance(prefix, str)
            or len(prefix) > _PREFIX_MAX
            or _PREFIX_RE.fullmatch(prefix) is None
        ):
            raise PresenceValueError(
                f"prefix must be 1-{_PREFIX_MAX} characters of [A-Za-z0-9_.-] in ':'-separated "
                f"parts, got {prefix!r}"
            )
        if type(self.partitions) is not int:
            raise PresenceTypeError(f"partitions must be an int, got {self.partitions!r}")
        tags = partition_tags(self.partitions)
        head = prefix.encode("ascii") + b":{"
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_tags", tuple(head + t.encode("ascii") + b"}:" for t in tags))

    # -- keys --

    def _key(self, kind: bytes, name: str, suffix: bytes) -> bytes:
        return self._head + kind + escape_name(name).encode("utf-8") + suffix

    def topic_tag(self, topic: str) -> bytes:
        """``t:E(topic)``: the hash tag (without braces) shared by every key of ``topic``."""
        return b"t:" + escape_name(topic).encode("utf-8")

    def members_key(self, topic: str) -> bytes:
        """``P:{t:E(topic)}:m``: the topic's members HASH."""
        return self._key(b"t:", topic, b"}:m")

    def deadlines_key(self, topic: str) -> bytes:
        """``P:{t:E(topic)}:d``: the topic's deadline ZSET (fallback layout)."""
        return self._key(b"t:", topic, b"}:d")

    def user_status_key(self, key: str) -> bytes:
        """``P:{u:E(key)}:s``: a per-user HASH name; nothing writes it (see the module
        docstring)."""
        return self._key(b"u:", key, b"}:s")

    def last_seen_key(self, key: str) -> bytes:
        """``P:{u:E(key)}:seen``: the user's last-seen STRING."""
        return self._key(b"u:", key, b"}:seen")

    def _node_key(self, node: str, suffix: bytes) -> bytes:
        return self._head + b"n:" + _checked_node(node) + suffix

    def node_alive_key(self, node: str) -> bytes:
        """``P:{n:node}:alive``: the node's liveness STRING (with a TTL)."""
        return self._node_key(node, b"}:alive")

    def node_topics_key(self, node: str) -> bytes:
        """``P:{n:node}:topics``: the SET of topics where the node has members."""
        return self._node_key(node, b"}:topics")

    def node_reaper_key(self, node: str) -> bytes:
        """``P:{n:node}:reaper``: a peer's claim to reap the node."""
        return self._node_key(node, b"}:reaper")

    @property
    def nodes_key(self) -> bytes:
        """``P:nodes``: the registry SET of node names."""
        return self.prefix.encode("ascii") + b":nodes"

    def parse_key(self, key: bytes) -> tuple[str, str, str]:
        """``(kind, name, suffix)`` of a key this layout names with a tag, e.g.
        ``("t", topic, "m")``; ValueError for any other key (``SCAN`` reads them back)."""
        head = self._head
        if not key.startswith(head):
            raise PresenceValueError(f"not a key of this layout: {key!r}")
        text = key[len(head) :].decode("utf-8")
        tag, sep, suffix = text.partition("}:")
        kind, colon, escaped = tag.partition(":")
        if not sep or not colon or kind not in ("t", "u", "n", "c"):
            raise PresenceValueError(f"not a key of this layout: {key!r}")
        return kind, unescape_name(escaped), suffix

    # -- channels --

    def partition(self, topic: str) -> int:
        """The pub/sub partition of ``topic``: ``crc32(UTF-8 of topic) % partitions``."""
        return zlib.crc32(topic.encode("utf-8")) % self.partitions

    def partition_channel(self, partition: int) -> bytes:
        """``P:{c:J}:<partition>``: the sharded channel of one partition."""
        return self._tags[partition] + str(partition).encode("ascii")

    def channel(self, topic: str) -> bytes:
        """The sharded channel that carries ``topic``'s diffs."""
        return self.partition_channel(self.partition(topic))

    def channels(self) -> tuple[bytes, ...]:
        """Every partition's channel, in partition order (what a process subscribes to)."""
        return tuple(self.partition_channel(i) for i in range(self.partitions))


# -- commands ---------------------------------------------------------------------------------

Command = list[bytes]


class ChangesLike(Protocol):
    """What the builders read of a `presence_core.tracker.feed.TopicChanges`."""

    @property
    def topic(self) -> str: ...
    @property
    def joins(self) -> Mapping[Presence, bytes | None]: ...
    @property
    def leaves(self) -> Mapping[Presence, None]: ...


def presence_field(presence: Presence) -> bytes:
    """`member_field` of a presence as the Tracker stores it.

    The Tracker's refs are well formed, so this skips `member_field`'s check: it runs once per
    change written.
    """
    return ref_of(presence[2]) + b" " + presence[1].encode("utf-8")


def _ms(value: int) -> bytes:
    if type(value) is not int or value <= 0:
        raise PresenceValueError(f"a duration or time in ms must be a positive int, got {value!r}")
    return b"%d" % value


def _hdel(key: bytes, fields: Sequence[bytes]) -> Command:
    return [b"HDEL", key, *fields]


def _checked_node(node: str) -> bytes:
    return check_node(node).encode("ascii")


@dataclass(frozen=True)
class HashTTLCommands:
    """Commands of the hash-field TTL layout (Valkey >= 9, Redis >= 8).

    A join is ``HSETEX key PX ttl FIELDS n field data ...`` (all a topic's joins of one batch
    in one command: they share the TTL), a leave ``HDEL key field ...``, a refresh
    ``HPEXPIRE key ttl FIELDS n field ...``.  Never a plain ``HSET``: it clears the TTL.
    """

    layout: Layout
    ttl_ms: int

    def __post_init__(self) -> None:
        _ms(self.ttl_ms)

    def changes(self, changes: ChangesLike, now_ms: int | None = None) -> list[Command]:
        """The commands for one topic's changes of one batch: ``HDEL`` then ``HSETEX``.

        An update is a leave of the old ref and a join of the new one (the feed always lists
        the old presence in ``leaves``), so a join's prev ref needs no command.  ``now_ms`` is
        unused (the server keeps the clock); it is there so both layouts take the same call.
        """
        out: list[Command] = []
        key = self.layout.members_key(changes.topic)
        if changes.leaves:
            out.append(_hdel(key, [presence_field(p) for p in changes.leaves]))
        if changes.joins:
            out.append(self._hsetex(key, [(presence_field(p), p[2]) for p in changes.joins]))
        return out

    def join(self, topic: str, members: Iterable[tuple[bytes, bytes]]) -> list[Command]:
        """Write ``(field, data)`` members of ``topic`` with the member TTL (a write-back)."""
        pairs = list(members)
        return [self._hsetex(self.layout.members_key(topic), pairs)] if pairs else []

    def leave(self, topic: str, fields: Iterable[bytes]) -> list[Command]:
        """Remove members of ``topic`` by field."""
        fs = list(fields)
        return [_hdel(self.layout.members_key(topic), fs)] if fs else []

    def refresh(
        self, topic: str, fields: Iterable[bytes], now_ms: int | None = None
    ) -> list[Command]:
        """Move the deadline of members of ``topic`` to now + ttl (``HPEXPIRE``).

        Its reply has one code per field; ``-2`` means the field is gone (expired or reaped),
        which the store should answer with a write-back.
        """
        fs = list(fields)
        if not fs:
            return []
        key = self.layout.members_key(topic)
        return [[b"HPEXPIRE", key, b"%d" % self.ttl_ms, b"FIELDS", b"%d" % len(fs), *fs]]

    def _hsetex(self, key: bytes, pairs: Sequence[tuple[bytes, bytes]]) -> Command:
        cmd = [b"HSETEX", key, b"PX", b"%d" % self.ttl_ms, b"FIELDS", b"%d" % len(pairs)]
        for f, data in pairs:
            cmd.append(f)
            cmd.append(data)
        return cmd

    def reap_node(self, topic: str, node: str, cursor: bytes = b"0", count: int = 1000) -> Command:
        """`REAP_NODE_SCRIPT` (``EVALSHA``) on ``topic`` for the lapsed ``node``."""
        return evalsha(
            REAP_NODE_SHA,
            [self.layout.members_key(topic)],
            [_checked_node(node), cursor, _ms(count)],
        )


@dataclass(frozen=True)
class ZSetCommands:
    """Commands of the fallback layout: a members HASH plus a deadline ZSET per topic.

    A join is ``HSET`` + ``ZADD`` (deadline now + ttl), a leave ``HDEL`` + ``ZREM``, a
    refresh ``ZADD XX``; each join and refresh also renews both keys' ``PEXPIRE`` (the net
    when no process is left to reap).  `expired` lists due members and `reap_expired`
    removes them atomically, but the store runs neither: a member leaves when its owner
    removes it or a peer reaps its lapsed owner.
    """

    layout: Layout
    ttl_ms: int

    def __post_init__(self) -> None:
        _ms(self.ttl_ms)

    def changes(self, changes: ChangesLike, now_ms: int | None = None) -> list[Command]:
        """The commands for one topic's changes of one batch (``now_ms`` is required here)."""
        topic = changes.topic
        out: list[Command] = []
        if changes.leaves:
            out.extend(self.leave(topic, [presence_field(p) for p in changes.leaves]))
        if changes.joins:
            if now_ms is None:
                raise PresenceValueError("the fallback layout needs now_ms for its deadlines")
            out.extend(self.join(topic, [(presence_field(p), p[2]) for p in changes.joins], now_ms))
        return out

    def join(
        self, topic: str, members: Iterable[tuple[bytes, bytes]], now_ms: int
    ) -> list[Command]:
        """Write ``(field, data)`` members of ``topic`` with deadline ``now_ms + ttl``."""
        pairs = list(members)
        if not pairs:
            return []
        key, zkey = self.layout.members_key(topic), self.layout.deadlines_key(topic)
        deadline = _ms(now_ms + self.ttl_ms)
        hset = [b"HSET", key]
        zadd = [b"ZADD", zkey]
        for f, data in pairs:
            hset += (f, data)
            zadd += (deadline, f)
        return [hset, zadd, *self._renew(key, zkey)]

    def leave(self, topic: str, fields: Iterable[bytes]) -> list[Command]:
        """Remove members of ``topic`` by field, from both keys."""
        fs = list(fields)
        if not fs:
            return []
        key, zkey = self.layout.members_key(topic), self.layout.deadlines_key(topic)
        return [_hdel(key, fs), [b"ZREM", zkey, *fs]]

    def refresh(self, topic: str, fields: Iterable[bytes], now_ms: int) -> list[Command]:
        """Move members' deadlines to ``now_ms + ttl`` (``ZADD XX``: never re-adds a member
        that is gone; ``ZADD XX CH`` would count them, plain ``XX`` answers 0)."""
        fs = list(fields)
        if not fs:
            return []
        key, zkey = self.layout.members_key(topic), self.layout.deadlines_key(topic)
        deadline = _ms(now_ms + self.ttl_ms)
        zadd = [b"ZADD", zkey, b"XX"]
        for f in fs:
            zadd += (deadline, f)
        return [zadd, *self._renew(key, zkey)]

    def _renew(self, key: bytes, zkey: bytes) -> list[Command]:
        ttl = b"%d" % self.ttl_ms
        return [[b"PEXPIRE", key, ttl], [b"PEXPIRE", zkey, ttl]]

    def expired(self, topic: str, now_ms: int, limit: int = 1000) -> Command:
        """The query for up to ``limit`` fields of ``topic`` due at ``now_ms``
        (``ZRANGE zkey -inf now BYSCORE LIMIT 0 limit``): read-only; see `reap_expired`."""
        return [
            b"ZRANGE",
            self.layout.deadlines_key(topic),
            b"-inf",
            _ms(now_ms),
            b"BYSCORE",
            b"LIMIT",
            b"0",
            _ms(limit),
        ]

    def reap_expired(self, topic: str, now_ms: int, limit: int = 1000) -> Command:
        """`REAP_EXPIRED_SCRIPT` (``EVALSHA``): remove and return members due at ``now_ms``."""
        layout = self.layout
        return evalsha(
            REAP_EXPIRED_SHA,
            [layout.members_key(topic), layout.deadlines_key(topic)],
            [_ms(now_ms), _ms(limit)],
        )

    def reap_node(self, topic: str, node: str, cursor: bytes = b"0", count: int = 1000) -> Command:
        """`REAP_NODE_SCRIPT` (``EVALSHA``) on ``topic`` for the lapsed ``node``."""
        layout = self.layout
        return evalsha(
            REAP_NODE_SHA,
            [layout.members_key(topic), layout.deadlines_key(topic)],
            [_checked_node(node), cursor, _ms(count)],
        )


# -- node and user commands (the same in both layouts) ----------------------------------------


def node_heartbeat(
    layout: Layout, node: str, incarnation: bytes, liveness_ms: int, index_ttl_ms: int
) -> list[Command]:
    """Renew ``node``'s liveness key and its topic index's TTL, and (re)register it.

    ``index_ttl_ms`` should be the liveness timeout plus the member TTL: past that, every
    member the index names has expired on its own.  The ``SET`` answers the key's previous
    value (``GET``): nil means it had lapsed, and peers may have reaped the node's members.
    """
    return [
        [b"SET", layout.node_alive_key(node), incarnation, b"PX", _ms(liveness_ms), b"GET"],
        [b"PEXPIRE", layout.node_topics_key(node), _ms(index_ttl_ms)],
        [b"SADD", layout.nodes_key, _checked_node(node)],
    ]


def index_topics(layout: Layout, node: str, topics: Iterable[str]) -> list[Command]:
    """Add ``topics`` to ``node``'s topic index (``SADD``; send it before the joins)."""
    members = [t.encode("utf-8") for t in topics]
    return [[b"SADD", layout.node_topics_key(node), *members]] if members else []


def claim_reap(layout: Layout, node: str, me: str, claim_ms: int) -> Command:
    """``SET P:{n:node}:reaper <me> NX PX claim_ms``: the reply is OK for the one claimant."""
    return [b"SET", layout.node_reaper_key(node), _checked_node(me), b"NX", b"PX", _ms(claim_ms)]


def finish_reap(layout: Layout, node: str) -> list[Command]:
    """Once every topic of ``node``'s index is reaped: drop its index and registry entry.

    Two commands in two slots (the node's, and the registry's): send each to its own node.
    """
    return [
        [b"DEL", layout.node_topics_key(node)],
        [b"SREM", layout.nodes_key, _checked_node(node)],
    ]


def last_seen(layout: Layout, key: str, when_ms: int, ttl_ms: int) -> Command:
    """``SET P:{u:E(key)}:seen <when_ms> PX ttl_ms``."""
    return [b"SET", layout.last_seen_key(key), _ms(when_ms), b"PX", _ms(ttl_ms)]


# -- scripts ----------------------------------------------------------------------------------

REAP_NODE_SCRIPT: Final = b"""\
local hash = KEYS[1]
local zset = KEYS[2]
local scan = redis.call('HSCAN', hash, ARGV[2], 'MATCH', ARGV[1] .. '.*', 'COUNT', ARGV[3])
local out = {scan[1]}
local pairs_ = scan[2]
for i = 1, #pairs_, 2 do
  local f = pairs_[i]
  if redis.call('HDEL', hash, f) == 1 then
    out[#out + 1] = f
    out[#out + 1] = pairs_[i + 1]
    if zset then redis.call('ZREM', zset, f) end
  end
end
return out
"""
"""Remove one chunk of a lapsed node's members from one topic, and return them.

KEYS[1]: the topic's members hash (``P:{t:E(T)}:m``); KEYS[2], fallback layout only: its
deadline zset (``P:{t:E(T)}:d``).  ARGV[1]: the node (``[A-Za-z0-9_-]{1,32}``); ARGV[2]: the
``HSCAN`` cursor (``0`` to start); ARGV[3]: the ``HSCAN`` ``COUNT``.

Returns ``[next_cursor, field1, data1, field2, data2, ...]``: the fields it removed (with
``HDEL`` answering 1, so each field is returned by exactly one call, whoever else reaps) and
their metas, for the caller's leaves.  Call again with ``next_cursor`` until it is ``0``.
Idempotent: on a reaped topic it removes and returns nothing.  Fields that expired by their
TTL before the reap are not returned (reads never show them): reconciliation covers those.
"""

REAP_EXPIRED_SCRIPT: Final = b"""\
local hash = KEYS[1]
local zset = KEYS[2]
local due = redis.call('ZRANGE', zset, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
local out = {}
for _, f in ipairs(due) do
  local data = redis.call('HGET', hash, f)
  redis.call('ZREM', zset, f)
  if data then
    redis.call('HDEL', hash, f)
    out[#out + 1] = f
    out[#out + 1] = data
  end
end
return out
"""
"""Fallback layout: remove up to ARGV[2] members due at ARGV[1] (Unix ms), and return them.

Not run by the store (see `ZSetCommands`): a tool for whoever wants deadlines enforced.

KEYS[1]: the topic's members hash; KEYS[2]: its deadline zset.  Returns ``[field1, data1,
...]`` for members that were in the hash (a deadline without a member is dropped silently).
Call again while it returns ``limit`` members.  Idempotent, as `REAP_NODE_SCRIPT`.
"""

REAP_NODE_SHA: Final = hashlib.sha1(REAP_NODE_SCRIPT).hexdigest().encode("ascii")
REAP_EXPIRED_SHA: Final = hashlib.sha1(REAP_EXPIRED_SCRIPT).hexdigest().encode("ascii")


def evalsha(sha: bytes, keys: Sequence[bytes], args: Sequence[bytes]) -> Command:
    """``EVALSHA sha numkeys keys... args...`` (on ``NOSCRIPT``: `script_load` or `eval_script`)."""
    return [b"EVALSHA", sha, b"%d" % len(keys), *keys, *args]


def eval_script(script: bytes, keys: Sequence[bytes], args: Sequence[bytes]) -> Command:
    """``EVAL script numkeys keys... args...``."""
    return [b"EVAL", script, b"%d" % len(keys), *keys, *args]


def script_load(script: bytes) -> Command:
    """``SCRIPT LOAD script`` (send it to every primary: each has its own script cache)."""
    return [b"SCRIPT", b"LOAD", script]
