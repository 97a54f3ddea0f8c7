"""The write-behind store: a Tracker's presences, written to Redis as they change.

`RedisStore` reads the Tracker's change feed and keeps Redis equal to the Tracker's state, in
the key layout of `presence_core.store.layout`, without ever making the Tracker wait.

How a change travels
--------------------

1. ``tracker.flush()`` hands each batch of the feed to the store's reader (`RedisStore` is
   attached with `Tracker.add_feed_reader`).  The reader is synchronous and cheap: it copies
   each change into the *pending* table, ``topic -> {member field -> meta bytes | DELETE}``.
   A later change of the same member replaces an earlier one, so pending changes coalesce and
   the table holds at most one entry per live presence plus one per deletion not yet written.
   The meta bytes are the Tracker's own (no copy).  The reader never awaits and never raises
   into the Tracker: a failure is logged, counted in ``redis_errors``, and repaired by a full
   write-back.
2. The flusher (one asyncio task) wakes when pending goes from empty to non-empty, takes the
   whole table, and writes it: per topic one ``HDEL`` of its deletions and one ``HSETEX ... PX
   ttl FIELDS n ...`` of its joins (the fallback layout: ``HSET`` + ``ZADD`` and ``PEXPIRE``),
   at most `_FIELDS_PER_COMMAND` fields per command and about ``max_batch`` members per
   pipeline.  A topic's first join on this connection is preceded by an ``SADD`` to the node's
   topic index (for a peer that reaps this process one day).  Writes are spaced by
   ``flush_interval`` unless pending reaches ``max_batch``, which wakes the flusher at once.
3. Every reply is checked (see "Failures").

Refresh, heartbeats and liveness
--------------------------------

In the hash-field TTL layout every member has its own TTL in Redis (``member_ttl``), so the
members of a process that dies without a word expire within that time even if no peer reaps
them.  In the fallback layout the TTL is the topic keys' (``PEXPIRE``), renewed by every
process that writes the topic, and the deadline ZSET is written but read by nobody: a dead
process's members there leave when a peer reaps them (see `presence_core.store.peers`), or
with the whole topic once no process has written it for ``member_ttl``.  A live process keeps
its members alive with a *sweep* every ``member_ttl / 3``: per topic it holds, one
``HPEXPIRE key ttl FIELDS n ...`` per chunk of `_FIELDS_PER_COMMAND` members (fallback layout:
``ZADD XX`` of the new deadlines, then ``PEXPIRE`` on both keys).  Connection heartbeats
themselves write nothing to Redis: a heartbeat only keeps a connection alive in the local
Tracker, which decides when a presence leaves and writes that leave.  So the store's
steady-state cost is *topics x chunks commands per sweep interval*, whatever the heartbeat
rate: 250k connections in 5,000 topics heartbeating every 25 s with a 60 s connection TTL
(sweep every 60 s) cost 5,000 commands a minute, about 0.008 commands per heartbeat.  An
``HPEXPIRE`` reply of -2 (the field is missing: the member expired or was lost) re-queues that
member's join, so the sweep also repairs Redis.

With the sweep, every ``liveness_timeout / 3`` the node heartbeat (`node_heartbeat`) renews the
node's liveness key, its topic index's TTL and its entry in the node registry.  A topic the node
no longer has members in, and has nothing pending for, is removed from the index by the sweep.

Failures
--------

* **Connection errors** (`StoreConnectionError`: refused, reset, reply timeout).  The taken
  changes go back into pending under any newer ones (newer wins), the store reconnects with
  jittered exponential backoff (``backoff_min`` doubling up to ``backoff_max``), and then writes
  back the full current state: every presence of every topic (``tracker.presences``) and every
  pending deletion.  Pending joins need no replay: the state written back holds every presence
  that is still live.  Nothing accepted is lost, and the Tracker never waits: its changes keep
  coalescing in pending meanwhile.  While Redis is unreachable, pending holds at most one entry
  per live presence plus one per presence that left during the outage.
* **Error replies** of transient server states (``READONLY``, ``LOADING``, ``MASTERDOWN``,
  ``TRYAGAIN``, ``CLUSTERDOWN``, ``BUSY``, ``MOVED``, ``ASK``) are handled like a broken
  connection: reconnect, then write back.
* **Other error replies** (``OOM``, ``WRONGTYPE``, ``NOPERM``...) are logged and counted; the
  other commands of the pipeline keep their effect.  The failed command is not retried at
  once, since the same command would most likely fail the same way and a tight retry loop
  would only add load: its deletions are retried, and its topic's live members are written
  back in full, at the next sweep.  Deletions are always safe to repeat (refs are never
  reused: a Tracker's refs count up from a random start), and a write-back reads the state as
  it is then, so a retry never resurrects a member that left since.

A new connection is always followed by a full write-back, whether or not an error said the
last one broke: the server may have restarted empty in between.

Health
------

`RedisStore.connected` is the readiness signal.  Besides the data connection's state, it
follows a ``PING`` sent every ``health_interval`` on a connection of its own (one per primary
on a cluster), answered within ``health_timeout``: a dead or hung server is noticed without
any traffic, and a server that answers again ends the reconnect backoff at once.  Nothing on
the write path waits for it.

Incarnations
------------

A process restarted under the same node name finds what its earlier incarnation left: members,
liveness key, topic index, registry entry, and the peers' memory of its members.  The first
connection that reaches Redis (at start, or later if Redis was unreachable then) removes them
(`REAP_NODE_SCRIPT` on each topic of the index) and says bye, before anything of the new
process is written, so the peers drop the old members and take the new ones at the hello that
ends the write-back.  The new process's refs differ from the old ones, so a peer that missed
the bye still tells them apart when it reconciles.

Stopping
--------

``await store.stop()`` writes what is pending, then removes every member this process owns
(`REAP_NODE_SCRIPT` on each topic of its index: the members whose ref carries the Tracker's
node), its liveness key, its topic index and its registry entry.  ``stop(remove_members=False)``
writes what is pending and leaves the rest as a crash would: to the peer that reaps the node
once its liveness key lapses, and to the TTLs.

Threads: the store must run on the event loop of the thread that calls ``tracker.flush()``.

Peers and reads
---------------

With ``peers=True`` (the default) the store also shares presence with the other processes of
its namespace: each flush's local changes are published to the peers (one ``SPUBLISH`` per
partition, in the pipeline right after the writes; none while the store has no connection:
the hello that ends the write-back makes the peers reconcile instead), and
`presence_core.store.peers.PeerSync` mirrors theirs into the Tracker's remote view,
reconciles it with Redis, and reaps lapsed peers.  `users` answers from memory first and
reads Redis (last seen) for the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, cast

from .._validate import check_finite, check_int, check_seconds
from ..audit import audit
from ..errors import (
    PresenceError,
    PresenceTypeError,
    PresenceValueError,
    StoreCommandError,
    StoreConnectionError,
)
from ..metrics import (
    REDIS_ERRORS,
    REDIS_FLUSH_LAG_SECONDS,
    REDIS_PENDING,
    REDIS_RECONNECTS,
    REDIS_STATUS_READS,
    MetricDef,
)
from ..table import PresenceTable
from ..tracker import TopicChanges, Tracker
from ..tracker.users import OFFLINE, UserStatus
from ..typing import MetricsSink
from .cluster import ClusterConnection
from .connection import ConnectionOptions, RedisConnection, Reply
from .layout import (
    REAP_NODE_SCRIPT,
    REAP_NODE_SHA,
    HashTTLCommands,
    Layout,
    ZSetCommands,
    evalsha,
    finish_reap,
    index_topics,
    last_seen,
    node_heartbeat,
    parse_member_field,
    presence_field,
    script_load,
)
from .peers import PeerSync, _shown, encode_diff, encode_notice

__all__ = ["LayoutName", "RedisStore"]

logger = logging.getLogger("presence_core.store")

LayoutName: TypeAlias = Literal["auto", "hash_ttl", "zset"]

Command: TypeAlias = list[bytes]


class _Delete:
    """The pending value of a member whose deletion is still to be written."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETE"


DELETE: Final = _Delete()

Pending: TypeAlias = dict[str, dict[bytes, bytes | _Delete]]

_FIELDS_PER_COMMAND: Final = 1000
"""Members per HSETEX / HDEL / HPEXPIRE: big enough to amortise a command, small enough that
no single command holds the server for long."""

_REAP_COUNT: Final = b"1000"
_MISSING: Final = object()

# Error replies that describe the server's state rather than the command: the same command is
# expected to succeed once the store has reconnected (to the promoted primary, after loading).
_TRANSIENT_ERRORS: Final = frozenset(
    {"READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY", "MOVED", "ASK"}
)


# Error replies that say the server stores nothing now, whatever the command: not ready.
_REFUSING_ERRORS: Final = frozenset({"OOM", "MISCONF", "NOPERM", "NOAUTH"})

_SEEN_MAX: Final = 100_000  # last-seen hints kept while they cannot be written

_NAME_SHARED_LOG_INTERVAL: Final = 60.0
_ERROR_LOG_INTERVAL: Final = 10.0  # seconds between two log lines of one kind of error reply


class _Transient(Exception):
    """A pipeline got a transient error reply: reconnect and write back, as for a lost link."""


@dataclass(slots=True)
class _Tag:
    """What one command of a pipeline writes, to act on its error reply."""

    kind: Literal["join", "leave", "index", "refresh", "heartbeat", "other"]
    topic: str | None = None
    fields: Sequence[bytes] = ()
    datas: Sequence[bytes] = ()


@dataclass(slots=True)
class _Batch:
    """Commands of one pipeline, each with its tag, and the members they carry."""

    commands: list[Command] = field(default_factory=list)
    tags: list[_Tag] = field(default_factory=list)
    members: int = 0
    new_topics: list[str] = field(default_factory=list)

    def add(self, commands: Iterable[Command], tag: _Tag) -> None:
        for command in commands:
            self.commands.append(command)
            self.tags.append(tag)
        self.members += len(tag.fields)


def _seen_seconds(reply: Reply) -> float | None:
    """A last-seen key's value (Unix ms) in seconds; None if missing or not ours."""
    if type(reply) is not bytes:
        return None
    try:
        return int(reply) / 1000.0
    except ValueError:
        logger.warning("presence store: a last-seen key holds %r, not Unix ms", reply[:40])
        return None


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _error_kind(error: StoreCommandError) -> str:
    return error.reply.split(" ", 1)[0].upper()


class RedisStore:
    """Writes a Tracker's presences to Redis behind its back (see the module docstring).

    Args:
        tracker: The Tracker whose presences to store.  Its `Tracker.node` names the owner of
            every member written (refs start with it), so it must be unique per process.
        target: A ``redis://`` / ``rediss://`` / ``unix://`` URL, or `ConnectionOptions`.
        prefix: The key prefix (namespace or tenant), see `Layout`.
        member_ttl: Seconds a member lives in Redis without a refresh.  Default: three times
            the Tracker's ``connection_ttl``, so the sweep (every ``member_ttl / 3``) runs once
            per connection TTL; a process that dies leaves its members behind for at most this
            long (a peer's reaper, keyed on the liveness key, is the quicker path).
        liveness_timeout: Seconds the node's liveness key lives without a renewal (renewed
            every third of it).
        flush_interval: Seconds between two writes while changes keep arriving.
        max_batch: Pending members that wake the flusher at once, and the members per pipeline.
        layout: ``"hash_ttl"`` (hash-field TTLs: Valkey >= 9, Redis >= 8), ``"zset"`` (a
            deadline ZSET per topic: any server), or ``"auto"`` (hash-field TTLs if the server
            has ``HSETEX`` and ``HPEXPIRE``, detected on the first connection).
        metrics: Where ``redis_*`` metrics go (default: the Tracker's sink).
        backoff_min, backoff_max: Bounds in seconds of the jittered exponential reconnect
            backoff.
        stop_timeout: Bound in seconds on the final writes of `stop`.
        cluster: ``target`` is one node of a Redis Cluster: write through slot-aware
            pipelines (`ClusterConnection`) and subscribe with ``RedisCluster``.
        peers: Share presence with the other processes of the namespace: publish this
            process's diffs, mirror theirs into the Tracker's remote view, reap lapsed peers
            (see `presence_core.store.peers`).  ``False`` only writes.
        check_interval: Seconds between two reads of the peers' liveness keys (default: a
            ninth of ``liveness_timeout``, so a dead peer's presences leave within about
            ``liveness_timeout + check_interval``: 10 s by default).
        probe_interval: Seconds between two probes of the subscriptions.
        reconcile_interval: Seconds between two periodic reconciliations of the remote view.
        status_cache_ttl, status_cache_size: How long (0: not at all) and how many Redis
            answers of `users` are kept.
        last_seen_ttl: Seconds a user's last-seen time lives in Redis after the user left.
        health_interval, health_timeout: Every ``health_interval`` seconds the server (on a
            cluster: every primary) is sent a ``PING`` on a connection of its own, which must
            answer within ``health_timeout`` seconds; `connected` follows the answers.
    """

    def __init__(
        self,
        tracker: Tracker,
        target: str | ConnectionOptions,
        *,
        prefix: str = "presence",
        member_ttl: float | None = None,
        liveness_timeout: float = 9.0,
        flush_interval: float = 0.005,
        max_batch: int = 10_000,
        layout: LayoutName = "auto",
        metrics: MetricsSink | None = None,
        backoff_min: float = 0.05,
        backoff_max: float = 5.0,
        stop_timeout: float = 5.0,
        cluster: bool = False,
        peers: bool = True,
        check_interval: float | None = None,
        probe_interval: float = 5.0,
        reconcile_interval: float = 30.0,
        status_cache_ttl: float = 2.0,
        status_cache_size: int = 100_000,
        last_seen_ttl: float = 30 * 86400.0,
        health_interval: float = 0.25,
        health_timeout: float = 1.0,
    ) -> None:
        if not isinstance(tracker, Tracker):
            raise PresenceTypeError(f"tracker must be a Tracker, not {type(tracker).__name__}")
        self.tracker = tracker
        self.options = ConnectionOptions.from_url(target) if isinstance(target, str) else target
        self._url = target if isinstance(target, str) else None
        self.layout = Layout(prefix)
        ttl = 3.0 * tracker.connection_ttl if member_ttl is None else member_ttl
        self.member_ttl = check_seconds(ttl, "member_ttl")
        self._ttl_ms = max(1, round(self.member_ttl * 1000))
        self.liveness_timeout = check_seconds(liveness_timeout, "liveness_timeout")
        self._liveness_ms = max(1, round(self.liveness_timeout * 1000))
        self.flush_interval = check_seconds(flush_interval, "flush_interval")
        self.max_batch = check_int(max_batch, "max_batch", low=1)
        if layout not in ("auto", "hash_ttl", "zset"):
            raise PresenceValueError(f"layout must be auto, hash_ttl or zset, got {layout!r}")
        self._layout_choice: LayoutName = layout
        self.metrics: MetricsSink = tracker.metrics if metrics is None else metrics
        self.backoff_min = check_seconds(backoff_min, "backoff_min")
        self.backoff_max = max(self.backoff_min, check_seconds(backoff_max, "backoff_max"))
        self.stop_timeout = check_seconds(stop_timeout, "stop_timeout")
        self.node = tracker.node
        self._incarnation = secrets.token_hex(8).encode("ascii")
        self.cluster = bool(cluster)
        self.peers_enabled = bool(peers)
        if self.peers_enabled and self.options.ssl is not None:
            if self._url is None:
                raise PresenceValueError("peers over TLS need a rediss:// URL as the target")
            if self.cluster:
                raise PresenceValueError("peers on a Redis Cluster over TLS are not supported yet")
        interval = self.liveness_timeout / 9.0 if check_interval is None else check_interval
        self.check_interval = check_seconds(interval, "check_interval")
        self.probe_interval = check_seconds(probe_interval, "probe_interval")
        self.reconcile_interval = check_seconds(reconcile_interval, "reconcile_interval")
        # 0 turns the cache off; otherwise at least the cache's 1 ms resolution.
        cache_ttl = check_finite(status_cache_ttl, "status_cache_ttl", kind="seconds")
        if cache_ttl != 0.0 and not 0.001 <= cache_ttl:
            raise PresenceValueError(
                f"status_cache_ttl must be 0 (no cache) or at least 0.001 s, got {cache_ttl!r}"
            )
        self.status_cache_ttl = cache_ttl
        check_int(status_cache_size, "status_cache_size", low=1)
        self._seen_ms = max(1, round(check_seconds(last_seen_ttl, "last_seen_ttl") * 1000))
        self.health_interval = check_seconds(health_interval, "health_interval")
        self.health_timeout = check_seconds(health_timeout, "health_timeout")
        # Redis answers of users(): key -> last seen (Unix seconds) or None, with a TTL.
        self._status_cache: PresenceTable[str, float | None] = PresenceTable(
            status_cache_size, tick=min(1.0, max(0.001, cache_ttl)), track_dirty=False
        )
        self.peers: PeerSync | None = None
        self._client: Any = None  # the redis-py control-plane client
        self._node_clients: dict[str, Any] = {}  # cluster: one per node, for its shard channels
        self._outbox: list[tuple[bytes, bytes]] = []  # (channel, message) to publish
        self._seen: dict[str, int] = {}  # users who went offline here -> when (Unix ms)

        self._commands: HashTTLCommands | ZSetCommands | None = None
        self._conn: RedisConnection | ClusterConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._detach: Callable[[], None] | None = None
        self._closing = False
        self._started = False

        self._pending: Pending = {}
        self._pending_count = 0
        self._oldest: float | None = None  # monotonic time of the oldest pending change
        self._writeback = True  # the state must be written back in full before changes
        self._cleared = False  # what an earlier process of this node left is gone from Redis
        self._healthy = True  # the last health PING was answered (see `connected`)
        self._refused: str | None = None  # the server refuses writes: why (see `connected`)
        self._error_log: dict[str, list[float]] = {}  # error kind -> [last logged, held back]
        self._rewrite_all = False  # a failover or a lapse: write back in full, index again
        self._primaries: tuple[str, ...] = ()  # a cluster's primaries, to notice a failover
        self._busy = False  # a write or sweep is under way
        self._indexed: set[str] = set()  # topics in the node's index (on this connection)
        self._retry_topics: set[str] = set()
        self._retry_deletions: dict[str, set[bytes]] = {}
        self._next_sweep = 0.0
        self._next_heartbeat = 0.0
        self._errors = 0
        self._reconnects = 0
        self._wake: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._retry: asyncio.Event | None = None  # ends a reconnect backoff early
        self._progress: asyncio.Event | None = None

    # -- public surface ------------------------------------------------------------------------

    @property
    def layout_name(self) -> Literal["hash_ttl", "zset"] | None:
        """``"hash_ttl"`` or ``"zset"`` once known (``None`` before the first connection with
        ``layout="auto"``)."""
        if self._commands is None:
            return None if self._layout_choice == "auto" else self._layout_choice
        return "hash_ttl" if isinstance(self._commands, HashTTLCommands) else "zset"

    @property
    def connected(self) -> bool:
        """Whether Redis is usable now: the signal for a readiness check.

        True when the store holds an open connection, has written the state back since it
        opened it, and the server answered the last health ``PING`` (on a cluster: every
        primary of the slot map did).  The ``PING`` goes every ``health_interval`` on a
        connection of its own and must be answered within ``health_timeout``, so this turns
        False within about ``health_interval + health_timeout`` (1.25 s by default) of the
        server dying or hanging, traffic or not, and True within about ``health_interval``
        of its return plus the write-back.  It is also False while the server refuses writes
        (``OOM``, ``MISCONF``, ``NOPERM``, ``NOAUTH``: it answers ``PING`` but stores nothing),
        from the first refused write until a pipeline of writes goes through.  Reading it
        never waits.
        """
        conn = self._conn
        return (
            conn is not None
            and not conn.is_closed
            and not self._writeback
            and self._healthy
            and self._refused is None
        )

    @property
    def pending(self) -> int:
        """Members with a change not yet written (joins and deletions)."""
        return self._pending_count

    @property
    def flush_lag(self) -> float:
        """Seconds the oldest change not yet written to Redis has waited (0.0 if none)."""
        oldest = self._oldest
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    @property
    def errors(self) -> int:
        """Errors so far: connection failures, error replies and failed feed batches."""
        return self._errors

    @property
    def reconnects(self) -> int:
        """Successful reconnections after a failure."""
        return self._reconnects

    async def user(self, key: str) -> UserStatus:
        """`users` for one key."""
        return (await self.users([key]))[key]

    async def users(self, keys: Iterable[str]) -> dict[str, UserStatus]:
        """Users' statuses, from memory first and from Redis for the rest, in one pipeline.

        Memory is this process's presences and its peers' (the remote view), so a user
        present anywhere is answered without Redis.  For the others, the last-seen time that
        their last process (or the peer that reaped it) wrote when they left
        (``P:{u:E(key)}:seen``, Unix ms) is read in one pipeline, and each answer is kept
        for ``status_cache_ttl`` seconds (at most ``status_cache_size`` of them), so a team
        view polled every second stays local.
        While Redis is unreachable, or `connected` is False for any other reason (a hung
        server), the answer is memory's and the cache's alone: Redis is not asked.  The tier of
        each answer is counted in ``redis_status_reads{tier}``.

        ``last_seen`` of a user offline everywhere is Unix time when it comes from Redis; give
        the Tracker ``clock=time.time`` so that its own last-seen times agree.

        Raises:
            The errors of `Tracker.users` (bad keys); nothing else.
        """
        statuses = self.tracker.users(keys)
        cache = self._status_cache
        cache.expire()
        get = cache.get
        misses: list[str] = []
        hits = 0
        for key, status in statuses.items():
            if status[1] != OFFLINE:
                continue
            cached = get(key, _MISSING)
            if cached is _MISSING:
                misses.append(key)
                continue
            hits += 1
            seen = cast(float | None, cached)
            local = status[8]  # the Tracker's own last seen: keep the later one
            if seen is not None and (local is None or local < seen):
                statuses[key] = UserStatus(key, OFFLINE, None, (), (), 0, 0, None, seen)
        fetched = 0
        conn = self._conn
        # Not while `connected` is False: a hung server would hold the answer for the whole
        # reply timeout, and memory (with the cache) is the best answer there is meanwhile.
        if misses and conn is not None and self.connected:
            try:
                replies = await self._read_last_seen(conn, misses)
            except (StoreConnectionError, StoreCommandError) as exc:
                logger.warning("presence store: status read failed: %s", exc)
            else:
                pairs = zip(misses, replies, strict=True)
                try:  # the common case, inline: every reply nil or Unix ms
                    answers = [(k, None if r is None else int(r) / 1000.0) for k, r in pairs]
                except (ValueError, TypeError):  # an error reply, or a value not ours
                    answers = [(k, _seen_seconds(r)) for k, r in zip(misses, replies, strict=True)]
                for key, seen in answers:
                    if seen is not None:
                        local = statuses[key][8]  # the Tracker's own: keep the later one
                        if local is None or local < seen:
                            statuses[key] = UserStatus(key, OFFLINE, None, (), (), 0, 0, None, seen)
                if self.status_cache_ttl:
                    cache.upsert_many(answers, self.status_cache_ttl)
                fetched = len(misses)
        tiers = (
            ("memory", len(statuses) - len(misses) - hits),
            ("cache", hits),
            ("redis", fetched),
        )
        for tier, n in tiers:
            if n:
                self._inc(REDIS_STATUS_READS, n, (tier,))
        return statuses

    async def _read_last_seen(
        self, conn: RedisConnection | ClusterConnection, keys: Sequence[str]
    ) -> list[Reply]:
        """``GET`` of each user's last-seen key, in one pipeline."""
        last_seen_key = self.layout.last_seen_key
        if isinstance(conn, RedisConnection):
            # One MGET: a server answers it at about twice the speed of as many GETs, and
            # its one reply is parsed in one call.  Written as RESP directly.
            names = list(map(last_seen_key, keys))
            payload = b"*%d\r\n$4\r\nMGET\r\n%b" % (
                len(names) + 1,
                b"".join([b"$%d\r\n%b\r\n" % (len(name), name) for name in names]),
            )
            (reply,) = await conn.pipeline_encoded(payload, ["MGET"], raise_on_error=False)
            if isinstance(reply, StoreCommandError):
                raise reply
            return cast(list[Reply], reply)
        # A cluster routes each command by its key.
        return await conn.pipeline(
            [(b"GET", last_seen_key(key)) for key in keys], raise_on_error=False
        )

    async def start(self) -> None:
        """Connect, detect the layout, attach to the Tracker and write its state back.

        Returns once the state is written, or once the first connection attempt failed with
        `StoreConnectionError` (the store then keeps reconnecting in the background, and the
        Tracker's changes wait in pending).  A refused handshake (``WRONGPASS``, a bad db)
        raises `StoreCommandError`: that is a configuration error, not an outage.
        """
        if self._started:
            raise RuntimeError("the store was already started")
        self._started = True
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._closed = asyncio.Event()
        self._retry = asyncio.Event()
        self._progress = asyncio.Event()
        self._detach = self.tracker.add_feed_reader(self._read_feed)
        try:
            await self._connect()
            await self._clear_earlier_incarnation()
            await self._write_back()
        except (StoreConnectionError, _Transient) as exc:
            self._connection_failed(exc, "start")
        except BaseException:
            self._detach()
            self._detach = None
            raise
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"presence-store-{self.node}")
        self._health_task = loop.create_task(
            self._watch_health(), name=f"presence-store-health-{self.node}"
        )
        if self.peers_enabled:
            self._client = self._control_client()
            self.peers = PeerSync(
                self.tracker,
                self.layout,
                self._client,
                self._subscriptions,
                self._queue_messages,
                zset_layout=self.layout_name == "zset",
                liveness_timeout=self.liveness_timeout,
                check_interval=self.check_interval,
                probe_interval=self.probe_interval,
                reconcile_interval=self.reconcile_interval,
                metrics=self.metrics,
                last_seen_ms=self._seen_ms,
            )
            await self.peers.start()

    def _queue_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Publish ``(channel, message)`` pairs with the next pipeline (for `PeerSync`)."""
        self._outbox.extend(messages)
        self._note_added(0)

    async def _subscriptions(self) -> list[tuple[Any, Sequence[bytes]]]:
        """Which server serves which pub/sub channels now (see `PeerSync`)."""
        channels = self.layout.channels()
        if not self.cluster:
            return [(self._client, channels)]
        conn = self._conn
        own = not isinstance(conn, ClusterConnection)
        if not isinstance(conn, ClusterConnection):  # the flusher is reconnecting: ask apart
            conn = await ClusterConnection.connect(self.options)
        try:
            await conn.refresh()
            groups: dict[str, list[bytes]] = {}
            for channel in channels:
                groups.setdefault(conn.node_for(channel), []).append(channel)
        finally:
            if own:
                conn.close()
        return [(self._node_client(address), group) for address, group in groups.items()]

    def _node_client(self, address: str) -> Any:
        """A redis-py client of one cluster node (for its shard channels), kept for reuse."""
        client = self._node_clients.get(address)
        if client is None:
            from redis.asyncio import Redis

            host, _, port = address.rpartition(":")
            o = self.options
            client = self._node_clients[address] = Redis(
                host=host,
                port=int(port),
                username=o.username,
                password=o.password,
                socket_connect_timeout=o.connect_timeout,
                socket_timeout=o.reply_timeout,
            )
        return client

    def _control_client(self) -> Any:
        """A redis-py asyncio client for the control plane, to the same server(s)."""
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        cls: Any = RedisCluster if self.cluster else Redis
        o = self.options
        timeouts = {"socket_connect_timeout": o.connect_timeout, "socket_timeout": o.reply_timeout}
        if self.cluster:
            # Every node the data plane found, replicas too: redis-py looks for the cluster
            # only among its startup nodes, so a lone seed that dies would leave it blind.
            from redis.asyncio.cluster import ClusterNode

            nodes = self._conn.nodes if isinstance(self._conn, ClusterConnection) else [o]
            startup = [ClusterNode(n.host, n.port) for n in nodes]
            if self._url is not None:
                return cls.from_url(self._url, startup_nodes=startup, **timeouts)
            auth = {"username": o.username, "password": o.password}
            return cls(startup_nodes=startup, **auth, **timeouts)
        if self._url is not None:
            return cls.from_url(self._url, **timeouts)
        where: dict[str, Any] = (
            {"unix_socket_path": o.path} if o.path is not None else {"host": o.host, "port": o.port}
        )
        return cls(**where, username=o.username, password=o.password, db=o.db, **timeouts)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every change the store has received so far is written.

        Call ``tracker.flush()`` first for changes the Tracker still holds.  Raises
        `TimeoutError` after ``timeout`` seconds (default: wait for as long as it takes).
        """
        async with asyncio.timeout(timeout):
            while not self._drained():
                progress = self._progress
                assert progress is not None and self._wake is not None and self._full is not None
                self._wake.set()
                self._full.set()
                if self._task is None or self._task.done():
                    raise RuntimeError("the store is not running")
                await progress.wait()

    async def stop(self, remove_members: bool = True) -> None:
        """Write what is pending, then (by default) remove this process's members from Redis.

        With ``remove_members=False`` the members are left to expire on their own, as if the
        process had died.  Bounded by ``stop_timeout``: whatever cannot be written by then is
        logged and dropped.  The store detaches from the Tracker and closes its connection.
        """
        if not self._started or self._closing:
            return
        self._closing = True
        if self.peers is not None:
            await self.peers.stop()
            # Without the peers' updates the remote view would only go stale.
            self.tracker.drop_remote()
            self.tracker.flush()
        if self._detach is not None:
            self._detach()
        assert self._closed is not None and self._wake is not None and self._full is not None
        assert self._retry is not None
        self._closed.set()
        self._retry.set()
        self._wake.set()
        self._full.set()
        loop = asyncio.get_running_loop()
        health = self._health_task
        if health is not None:
            # Nothing of it is worth waiting for: its connections close as it ends.
            health.cancel()
            await asyncio.wait({health}, timeout=1.0)
        deadline = loop.time() + self.stop_timeout  # one budget for everything below
        task = self._task
        if task is not None:
            # The flusher ends its cycle and exits; one stuck on a dead server is cancelled
            # (changes it had taken go back into pending, for the final writes below).
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout / 2)
            if not done:
                task.cancel()
                # Bounded too: a library call that holds on to the cancellation must not
                # hold the stop (what the flusher had taken is merged back when it ends).
                done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
            if task in done and not task.cancelled() and task.exception() is not None:
                logger.error("presence store flusher failed", exc_info=task.exception())
        try:
            async with asyncio.timeout_at(deadline):
                await self._final(remove_members)
        except (TimeoutError, StoreConnectionError, StoreCommandError, _Transient) as exc:
            self._errors += 1
            self._inc(REDIS_ERRORS, 1)
            logger.warning(
                "presence store stopped with %d changes unwritten: %s", self._pending_count, exc
            )
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            for client in [self._client, *self._node_clients.values()]:
                if client is None:
                    continue
                try:
                    async with asyncio.timeout(2.0):  # nor hang on a dead server
                        await client.aclose()
                except Exception:  # a broken connection may fail to close the same way
                    logger.debug("closing a control client failed", exc_info=True)
                # Whatever the pool still holds (a command that reconnected while the client
                # closed) is dropped too: an open socket would otherwise outlive the loop and
                # be closed by the garbage collector, with a ResourceWarning, much later.
                pool = getattr(client, "connection_pool", None)  # a RedisCluster has none
                if pool is not None:
                    await _drop_sockets(pool)
            self._node_clients.clear()
            self._publish()

    async def __aenter__(self) -> RedisStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return (
            f"<RedisStore {self.options.address} prefix={self.layout.prefix!r} "
            f"layout={self.layout_name} {state} pending={self._pending_count}>"
        )

    # -- the feed reader (synchronous, inside tracker.flush) -----------------------------------

    def _read_feed(self, batch: Sequence[TopicChanges]) -> None:
        try:
            pending = self._pending
            added = 0
            online = self.tracker.online
            seen = self._seen
            now_ms = int(time.time() * 1000)
            for changes in batch:
                topic = changes.topic
                members = pending.get(topic)
                if members is None:
                    members = pending[topic] = {}
                before = len(members)
                for p in changes.leaves:
                    if p[3] is not None:  # remote presences are their owner's to write
                        members[presence_field(p)] = DELETE
                        if not online(p[1]):
                            if len(seen) >= _SEEN_MAX and p[1] not in seen:
                                # A hint, best effort: under churn during an outage the
                                # oldest go, so memory stays bounded.
                                del seen[next(iter(seen))]
                            seen[p[1]] = now_ms
                for p in changes.joins:
                    if p[3] is not None:
                        members[presence_field(p)] = p[2]
                if not members:
                    del pending[topic]
                added += len(members) - before
            if self.peers_enabled and self._conn is not None:
                # Without a connection the diffs would pile up for as long as the outage
                # lasts; the write-back that ends it says hello, and the peers reconcile.
                self._post(batch)
            self._note_added(added)
        except Exception:
            # Some changes of this batch may be lost: the full write-back repairs the joins;
            # lost deletions expire with their member TTL.
            self._errors += 1
            self._writeback = True
            logger.exception("presence store: a feed batch failed; the state will be written back")
            self._inc(REDIS_ERRORS, 1)
            if self._wake is not None:
                self._wake.set()

    def _post(self, batch: Sequence[TopicChanges]) -> None:
        """Queue the batch's local changes for the peers, one message per partition."""
        layout = self.layout
        by_partition: dict[int, list[TopicChanges]] = {}
        for changes in batch:
            by_partition.setdefault(layout.partition(changes.topic), []).append(changes)
        for partition, group in by_partition.items():
            message = encode_diff(self.node, group)
            if message is not None:
                self._outbox.append((layout.partition_channel(partition), message))

    def _note_added(self, added: int) -> None:
        if added <= 0 and not self._pending and not self._outbox and not self._seen:
            return
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._pending_count += added
        if self._wake is not None:
            self._wake.set()
            if self._pending_count >= self.max_batch and self._full is not None:
                self._full.set()
            elif self._outbox and self._full is not None:
                self._full.set()  # peers wait for diffs: publish without the batching delay

    # -- the flusher ---------------------------------------------------------------------------

    def _drained(self) -> bool:
        return not (
            self._pending
            or self._outbox
            or self._seen
            or self._busy
            or self._writeback
            or self._conn is None
        )

    def _cycle_done(self) -> None:
        progress = self._progress
        self._progress = asyncio.Event()
        if progress is not None:
            progress.set()
        self._publish()

    async def _run(self) -> None:
        assert self._wake is not None and self._full is not None
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            try:
                if failures:
                    await self._backoff(failures)
                    if self._closing:
                        break
                if self._conn is None or self._conn.is_closed:
                    assert self._retry is not None
                    self._retry.clear()  # a health PING answered from now on ends the backoff
                    await self._connect()
                    self._reconnects += 1
                    self._inc(REDIS_RECONNECTS, 1)
                    logger.info("presence store reconnected to %s", self.options.address)
                if not self._cleared:
                    # Redis was unreachable at start: an earlier process of this node may
                    # have left members that peers would take for this one's.
                    await self._clear_earlier_incarnation()
                if self._rewrite_all:
                    self._rewrite_all = False
                    self._writeback = True
                    self._indexed.clear()
                if self._writeback:
                    await self._write_back()
                failures = 0
                if not (self._pending or self._outbox or self._seen):
                    await self._sleep(self._wake, self._until_maintenance(loop))
                self._wake.clear()
                if self._pending or self._outbox or self._seen:
                    await self._flush_pending()
                now = loop.time()
                if now >= self._next_sweep or now >= self._next_heartbeat:
                    await self._maintain(loop)
                self._cycle_done()
                if self._pending_count < self.max_batch and not self._closing:
                    await self._sleep(self._full, self.flush_interval)
                    self._full.clear()
            except (StoreConnectionError, _Transient) as exc:
                failures += 1
                self._connection_failed(exc, "write")
                self._cycle_done()
            except Exception:
                # A bug, not an outage: never let it end the flusher.  Write everything back.
                failures += 1
                self._errors += 1
                self._inc(REDIS_ERRORS, 1)
                self._writeback = True
                logger.exception("presence store flusher failed; the state will be written back")
                self._cycle_done()
        self._cycle_done()

    def _until_maintenance(self, loop: asyncio.AbstractEventLoop) -> float:
        return max(0.0, min(self._next_sweep, self._next_heartbeat) - loop.time())

    async def _sleep(self, event: asyncio.Event, timeout: float) -> None:
        if event.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass

    async def _backoff(self, failures: int) -> None:
        # Full jitter between the floor and an exponential ceiling: processes that lost the same
        # server do not come back in step.
        ceiling = min(self.backoff_max, self.backoff_min * 2.0 ** min(failures - 1, 30))
        delay = random.uniform(self.backoff_min, ceiling)
        assert self._retry is not None
        self._publish()
        await self._sleep(self._retry, delay)  # cut short by `stop`, or a server back up

    def _connection_failed(self, exc: Exception, during: str) -> None:
        # Diffs not yet published are dropped: pub/sub is at-most-once anyway, and the hello
        # after the write-back makes every peer reconcile with the state written back.
        self._outbox.clear()
        self._errors += 1
        self._inc(REDIS_ERRORS, 1)
        self._busy = False
        self._writeback = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        logger.warning("presence store: %s failed, reconnecting: %s", during, exc)

    # -- health (see `connected`) ---------------------------------------------------------------

    async def _watch_health(self) -> None:
        """PING the server(s) every ``health_interval`` on connections of their own.

        Own connections, so that a PING never queues behind a large pipeline of the data
        plane, and a PING that times out never breaks the data plane's connection (and the
        commands in flight on it).
        """
        assert self._closed is not None
        conns: dict[str, RedisConnection] = {}
        try:
            while not self._closing:
                try:
                    await self._health_round(conns)
                except Exception:  # a bug: the signal must keep following the server
                    logger.exception("presence store: a health check failed")
                await self._sleep(self._closed, self.health_interval)
        finally:
            for conn in conns.values():
                conn.close()

    async def _health_round(self, conns: dict[str, RedisConnection]) -> None:
        targets = self._health_targets()
        for address in [a for a in conns if a not in targets]:
            conns.pop(address).close()
        results = await asyncio.gather(*(self._ping(conns, o) for o in targets.values()))
        down = [address for address, (ok, _) in zip(targets, results, strict=True) if not ok]
        if down and isinstance(self._conn, ClusterConnection):
            await self._refresh_slots(self._conn)
        self._note_health(down, reconnected=any(ok and new for ok, new in results))

    def _health_targets(self) -> dict[str, ConnectionOptions]:
        conn = self._conn
        if not isinstance(conn, ClusterConnection):
            return {self.options.address: self.options}
        known = {options.address: options for options in conn.nodes}
        targets = {}
        for address in conn.primaries:
            options = known.get(address)
            if options is None:
                host, _, port = address.rpartition(":")
                options = self.options.with_changes(host=host, port=int(port), path=None)
            targets[address] = options
        return targets

    async def _ping(
        self, conns: dict[str, RedisConnection], options: ConnectionOptions
    ) -> tuple[bool, bool]:
        """``(answered, on a new connection)`` for one server."""
        timeout = self.health_timeout
        conn = conns.get(options.address)
        new = False
        try:
            if conn is None or conn.is_closed:
                short = options.with_changes(
                    connect_timeout=min(options.connect_timeout, timeout), reply_timeout=timeout
                )
                conn = conns[options.address] = await RedisConnection.connect(short)
                new = True
            await conn.execute(b"PING")  # a timeout closes that connection
        except StoreCommandError as exc:
            # It answered; only a server that cannot serve yet counts as down.
            return _error_kind(exc) not in ("LOADING", "BUSY", "MASTERDOWN"), new
        except StoreConnectionError:
            return False, new
        return True, new

    async def _refresh_slots(self, conn: ClusterConnection) -> None:
        """Ask the cluster for its slot map: a failover replaces a primary that is down."""
        try:
            async with asyncio.timeout(self.health_timeout):
                await conn.refresh()  # shielded inside: a timeout here leaves it running
        except (TimeoutError, StoreConnectionError, StoreCommandError):
            pass  # the next round asks again

    def _note_health(self, down: list[str], reconnected: bool) -> None:
        healthy = not down
        was, self._healthy = self._healthy, healthy
        if was and not healthy:
            logger.warning(
                "presence store: %s does not answer PING (timeout %s s)",
                ", ".join(down),
                self.health_timeout,
            )
        elif healthy and not was:
            logger.info("presence store: Redis answers PING again")
        conn = self._conn
        if not healthy or (conn is not None and not conn.is_closed):
            return
        # The server answers and the flusher has no connection: it may be asleep until its
        # next heartbeat, or in a backoff sized for a long outage.  Reconnect now.
        assert self._wake is not None and self._retry is not None
        self._wake.set()
        if reconnected or not was:
            self._retry.set()

    async def _connect(self) -> None:
        conn: RedisConnection | ClusterConnection
        if self.cluster:
            conn = await ClusterConnection.connect(self.options)
        else:
            conn = await RedisConnection.connect(self.options)
        try:
            if self._commands is None:
                await self._choose_layout(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # The server may have lost everything (a restart): the index, and the members too,
        # even when no error told the flusher that the last connection broke.
        self._indexed.clear()
        self._writeback = True

    async def _choose_layout(self, conn: RedisConnection | ClusterConnection) -> None:
        choice = self._layout_choice
        if choice == "auto":
            try:
                info = await conn.pipeline([(b"COMMAND", b"INFO", b"HSETEX", b"HPEXPIRE")])
                has_ttl = all(entry is not None for entry in info[0])
            except StoreCommandError as exc:
                logger.warning("COMMAND INFO refused (%s): using the zset layout", exc)
                has_ttl = False
            choice = "hash_ttl" if has_ttl else "zset"
        if choice == "hash_ttl":
            self._commands = HashTTLCommands(self.layout, self._ttl_ms)
        else:
            self._commands = ZSetCommands(self.layout, self._ttl_ms)
        if self.peers is not None:
            self.peers.zset_layout = choice == "zset"

    def _take(self) -> tuple[Pending, float | None]:
        taken, oldest = self._pending, self._oldest
        self._pending = {}
        self._pending_count = 0
        self._oldest = None
        return taken, oldest

    def _merge_back(self, taken: Pending, oldest: float | None, deletions_only: bool) -> None:
        """Put taken changes back under the newer ones (a newer change of a member wins)."""
        pending = self._pending
        added = 0
        for topic, members in taken.items():
            newer = pending.get(topic)
            if newer is None:
                newer = pending[topic] = {}
            before = len(newer)
            for f, value in members.items():
                if deletions_only and value is not DELETE:
                    continue
                newer.setdefault(f, value)
            if not newer:
                del pending[topic]
            added += len(newer) - before
        self._pending_count += added
        if not self._pending:
            self._oldest = None
        elif oldest is not None and (self._oldest is None or oldest < self._oldest):
            self._oldest = oldest
        elif self._oldest is None:
            self._oldest = time.monotonic()

    async def _flush_pending(self) -> None:
        taken, oldest = self._take()
        outbox, self._outbox = self._outbox, []
        seen, self._seen = self._seen, {}
        self._busy = True
        try:
            batches = self._batches(taken)
            # After the writes they describe: on one server a peer that hears a diff can read
            # its members already.  Last seen is best effort (no retry): it is a hint.
            batches[-1].add(self._side_commands(outbox, seen), _Tag("other"))
            await self._send(batches)
        except BaseException:
            self._merge_back(taken, oldest, deletions_only=False)
            for key, when in seen.items():
                if len(self._seen) >= _SEEN_MAX:
                    break
                self._seen.setdefault(key, when)
            raise
        finally:
            self._busy = False

    def _side_commands(
        self, outbox: Sequence[tuple[bytes, bytes]], seen: dict[str, int]
    ) -> list[Command]:
        commands = [[b"SPUBLISH", channel, message] for channel, message in outbox]
        layout, ttl = self.layout, self._seen_ms
        commands.extend(last_seen(layout, key, when, ttl) for key, when in seen.items())
        return commands

    def _batches(
        self, changes: Pending, batches: list[_Batch] | None = None, *, deletions_only: bool = False
    ) -> list[_Batch]:
        """Commands for ``changes`` (deletions, then joins, per topic), in pipelines of about
        ``max_batch`` members, appended to ``batches``."""
        commands = self._commands
        assert commands is not None
        now_ms = int(time.time() * 1000)
        if batches is None:
            batches = [_Batch()]
        for topic, members in changes.items():
            deletions = [f for f, v in members.items() if v is DELETE]
            for chunk in _chunks(deletions, _FIELDS_PER_COMMAND):
                if batches[-1].members >= self.max_batch:
                    batches.append(_Batch())
                batches[-1].add(commands.leave(topic, chunk), _Tag("leave", topic, chunk))
            if not deletions_only:
                joins = [(f, v) for f, v in members.items() if not isinstance(v, _Delete)]
                self._add_joins(batches, topic, joins, now_ms)
        return batches

    def _add_joins(
        self,
        batches: list[_Batch],
        topic: str,
        joins: Sequence[tuple[bytes, bytes]],
        now_ms: int,
    ) -> None:
        commands = self._commands
        assert commands is not None
        for chunk in _chunks(joins, _FIELDS_PER_COMMAND):
            if batches[-1].members >= self.max_batch:
                batches.append(_Batch())
            batch = batches[-1]
            if topic not in self._indexed and topic not in batch.new_topics:
                batch.new_topics.append(topic)
            built = (
                commands.join(topic, chunk)
                if isinstance(commands, HashTTLCommands)
                else commands.join(topic, chunk, now_ms)
            )
            batch.add(built, _Tag("join", topic, [f for f, _ in chunk], [d for _, d in chunk]))

    async def _send(self, batches: Iterable[_Batch]) -> None:
        """Write each batch in its own pipeline, in order, and act on every reply.

        ``batches`` may be a generator: it is advanced only once the previous pipeline was
        answered, so a large write-back or sweep is built while it is written, and the event
        loop runs between two pipelines.
        """
        for batch in batches:
            if not batch.commands:
                continue
            commands, tags = batch.commands, batch.tags
            if batch.new_topics:
                # The index first: a peer that reaps this node must find every topic it joined.
                index = index_topics(self.layout, self.node, batch.new_topics)
                commands = index + commands
                tags = [_Tag("index", fields=[t.encode() for t in batch.new_topics]), *tags]
            conn = self._conn
            if conn is None:
                raise StoreConnectionError("not connected", outcome_unknown=False)
            replies = await conn.pipeline(commands, raise_on_error=False)
            if isinstance(conn, ClusterConnection):
                primaries = tuple(conn.primaries)
                if self._primaries and primaries != self._primaries:
                    # A failover: writes acknowledged by the old primary and not yet
                    # replicated are gone.  Write everything back.
                    self._rewrite("the cluster's primaries changed")
                self._primaries = primaries
            self._check(replies, tags, batch.new_topics)
            self._repair(replies, tags)

    def _check(self, replies: list[Reply], tags: Sequence[_Tag], new_topics: list[str]) -> None:
        index_ok = True
        transient: StoreCommandError | None = None
        refused: str | None = None
        stored = False  # a command that needs memory went through
        for reply, tag in zip(replies, tags, strict=True):
            if not isinstance(reply, StoreCommandError):
                stored = stored or tag.kind in ("join", "refresh", "heartbeat", "index")
                continue
            kind = _error_kind(reply)
            if kind in _TRANSIENT_ERRORS:
                transient = transient or reply
                continue
            if kind in _REFUSING_ERRORS:
                refused = refused or kind
            self._errors += 1
            self._inc(REDIS_ERRORS, 1)
            self._log_error(kind, reply, tag.topic)
            if tag.kind == "index":
                index_ok = False
            elif tag.kind == "leave" and tag.topic is not None:
                self._retry_deletions.setdefault(tag.topic, set()).update(tag.fields)
            elif tag.topic is not None:
                self._retry_topics.add(tag.topic)
        if transient is not None:
            raise _Transient(str(transient))
        if refused is None and not stored:
            refused = self._refused  # deletions pass under OOM: they prove nothing
        if refused != self._refused:
            if refused is None:
                # What was refused meanwhile is written now, not at the next sweep.
                self._rewrite("Redis accepts writes again")
            elif self._refused is None:
                logger.warning("presence store: Redis refuses writes (%s): not ready", refused)
            self._refused = refused
        if index_ok:
            self._indexed.update(new_topics)

    def _log_error(self, kind: str, reply: StoreCommandError, topic: str | None) -> None:
        """Log an error reply, at most once per `_ERROR_LOG_INTERVAL` per kind: under OOM
        every command of every pipeline fails the same way."""
        now = time.monotonic()
        entry = self._error_log.get(kind)
        if entry is not None and now - entry[0] < _ERROR_LOG_INTERVAL:
            entry[1] += 1
            return
        held = 0 if entry is None else int(entry[1])
        self._error_log[kind] = [now, 0.0]
        where = "" if topic is None else f" (topic {_shown(topic)})"
        more = f"; {held} more like it not logged" if held else ""
        logger.error("presence store: %s%s%s", str(reply)[:300], where, more)

    async def _write_back(self) -> None:
        """Write the Tracker's whole state and every pending deletion (after a reconnect).

        Pending joins are dropped rather than written: the state read now holds every presence
        that is still live, and a member that left since has its deletion pending.  Each
        topic's state is read when its turn comes, which is as good: a presence that leaves
        after its topic was read has its deletion pending, written after this.
        """
        taken, oldest = self._take()
        self._busy = True
        self._writeback = True
        try:
            await self._send(self._write_back_batches(taken))
        except BaseException:
            # Only the deletions need keeping: the next write-back reads the state afresh.
            self._merge_back(taken, oldest, deletions_only=True)
            raise
        finally:
            self._busy = False
        self._writeback = False
        self._retry_topics.clear()
        now = asyncio.get_running_loop().time()
        self._next_sweep = now + self.member_ttl / 3.0
        self._next_heartbeat = now + self.liveness_timeout / 3.0

    def _write_back_batches(self, taken: Pending) -> Iterator[_Batch]:
        # The liveness key first, so no peer reaps this node while it writes; the registry
        # entry and the hello to the peers last, once the members are written.
        batches = [_Batch()]
        alive = self.layout.node_alive_key(self.node)
        batches[0].add(
            [[b"SET", alive, self._incarnation, b"PX", b"%d" % self._liveness_ms]], _Tag("other")
        )
        self._batches(taken, batches, deletions_only=True)
        tracker = self.tracker
        for topic in tracker.topics():
            now_ms = int(time.time() * 1000)
            pairs = [(presence_field(p), p[2]) for p in tracker.presences(topic)]
            self._add_joins(batches, topic, pairs, now_ms)
            while len(batches) > 1:
                yield batches.pop(0)
        batches[-1].add(self._heartbeat_commands(), _Tag("heartbeat"))
        if self.peers_enabled:
            hello = encode_notice(self.node, "h")
            batches[-1].add([[b"SPUBLISH", self.layout.partition_channel(0), hello]], _Tag("other"))
        yield from batches

    def _heartbeat_commands(self) -> list[Command]:
        return node_heartbeat(
            self.layout,
            self.node,
            self._incarnation,
            self._liveness_ms,
            self._liveness_ms + self._ttl_ms,
        )

    async def _maintain(self, loop: asyncio.AbstractEventLoop) -> None:
        """The node heartbeat, and the member sweep when it is due."""
        self._busy = True
        try:
            now = loop.time()
            self._next_heartbeat = now + self.liveness_timeout / 3.0
            sweep = now >= self._next_sweep
            if sweep:
                self._next_sweep = now + self.member_ttl / 3.0
            await self._send(self._maintenance_batches(sweep))
        finally:
            self._busy = False

    def _maintenance_batches(self, sweep: bool) -> Iterator[_Batch]:
        """The heartbeat, then (``sweep``) a refresh of every live member, the retries of
        failed writes, and the topics that leave the node's index."""
        batches = [_Batch()]
        batches[0].add(self._heartbeat_commands(), _Tag("heartbeat"))
        if not sweep:
            yield from batches
            return
        commands = self._commands
        assert commands is not None
        tracker = self.tracker
        live = tracker.topics()
        # Failed deletions go out again with the next flush (a deletion is always safe).
        retry, self._retry_deletions = self._retry_deletions, {}
        if retry:
            self._merge_back({t: dict.fromkeys(fs, DELETE) for t, fs in retry.items()}, None, True)
            assert self._wake is not None
            self._wake.set()
        rewrite, self._retry_topics = self._retry_topics, set()
        for topic in live:
            presences = tracker.presences(topic)
            now_ms = int(time.time() * 1000)
            if topic in rewrite or topic not in self._indexed:
                # A failed write, or a topic whose index entry is missing: write it in full.
                pairs = [(presence_field(p), p[2]) for p in presences]
                self._add_joins(batches, topic, pairs, now_ms)
            else:
                for chunk in _chunks(presences, _FIELDS_PER_COMMAND):
                    if batches[-1].members >= self.max_batch:
                        batches.append(_Batch())
                    fields = [presence_field(p) for p in chunk]
                    built = commands.refresh(topic, fields, now_ms)
                    batches[-1].add(built, _Tag("refresh", topic, fields, [p[2] for p in chunk]))
            while len(batches) > 1:
                yield batches.pop(0)
        # Topics where this node has nothing left (and nothing pending) leave its index.
        live_set = set(tracker.topics())
        gone = [t for t in self._indexed if t not in live_set and t not in self._pending]
        if gone:
            self._indexed.difference_update(gone)
            key = self.layout.node_topics_key(self.node)
            batches[-1].add([[b"SREM", key, *(t.encode("utf-8") for t in gone)]], _Tag("other"))
        yield from batches

    def _repair(self, replies: list[Reply], tags: Sequence[_Tag]) -> None:
        """Re-queue the joins of members a refresh found missing (``HPEXPIRE`` answered -2).

        The fallback layout's ``ZADD XX`` cannot tell which member is missing; there a lost
        member comes back with the next write-back (after a reconnect).
        """
        for reply, tag in zip(replies, tags, strict=True):
            if tag.kind == "heartbeat" and reply is None:  # SET ... GET found no key
                self._rewrite("this node's liveness key had lapsed")
            elif tag.kind == "heartbeat" and type(reply) is bytes and reply != self._incarnation:
                self._name_shared(reply)
        if not isinstance(self._commands, HashTTLCommands):
            return
        missing: Pending = {}
        for codes, tag in zip(replies, tags, strict=True):
            if tag.kind != "refresh" or tag.topic is None or not isinstance(codes, list):
                continue
            for f, data, code in zip(tag.fields, tag.datas, codes, strict=False):
                if code == -2:
                    missing.setdefault(tag.topic, {})[f] = data
        if missing:
            n = sum(len(m) for m in missing.values())
            logger.warning("presence store: %d live members were missing from Redis", n)
            self._merge_back(missing, None, deletions_only=False)
            assert self._wake is not None
            self._wake.set()

    def _name_shared(self, other: bytes) -> None:
        """Another live process renewed this node's liveness key since our last heartbeat:
        two processes share the node name, and each one's restart or stop removes the
        other's members.  Nothing here can repair that; say it loudly, not in a flood."""
        self._errors += 1
        self._inc(REDIS_ERRORS, 1)
        audit("store_node_name_shared", node=self.node, other=_shown(other))
        now = time.monotonic()
        last = self._error_log.get("node name shared")
        if last is not None and now - last[0] < _NAME_SHARED_LOG_INTERVAL:
            return
        self._error_log["node name shared"] = [now, 0.0]
        logger.error(
            "presence store: another live process uses the node name %r (its liveness key "
            "held %s, not ours): give every process its own node name",
            self.node,
            _shown(other),
        )

    def _rewrite(self, why: str) -> None:
        """Write the whole state back with the next cycle (and index every topic again)."""
        if not self._rewrite_all:
            logger.warning("presence store: %s; writing the state back", why)
        self._rewrite_all = True
        if self._wake is not None:
            self._wake.set()

    async def _clear_earlier_incarnation(self) -> None:
        """Remove what an earlier process of the same node name left in Redis.

        Runs once, on the first connection that reaches Redis (at start, or whenever Redis
        comes back if it was unreachable then), before this process writes anything.  The
        earlier process's members carry this node's name, so peers would count them as this
        process's for as long as it lives; the bye sent with their removal makes every peer
        drop them from its view at once.  A node name that a live process still uses is a
        configuration error this cannot tell from a restart: give every process its own.
        """
        conn = self._conn
        assert conn is not None
        layout, node = self.layout, self.node
        alive, registered, indexed = await conn.pipeline(
            [
                [b"EXISTS", layout.node_alive_key(node)],
                [b"SISMEMBER", layout.nodes_key, node],
                [b"EXISTS", layout.node_topics_key(node)],
            ],
            raise_on_error=False,  # a registry of the wrong type: not this process's to fix
        )
        if alive or registered or indexed:
            logger.warning(
                "presence store: node %r has members in Redis from an earlier process; "
                "removing them first",
                node,
            )
            await self._remove_own(stopping=False)
        self._cleared = True

    async def _final(self, remove_members: bool) -> None:
        """The last writes of `stop`: one attempt, within ``stop_timeout``."""
        if self._conn is None or self._conn.is_closed:
            await self._connect()
        if remove_members:
            taken, _ = self._take()
            await self._send(self._batches(taken, deletions_only=True))
            await self._remove_own(stopping=True)
        else:
            if not self._cleared:
                await self._clear_earlier_incarnation()
            if self._writeback:
                await self._write_back()
            if self._pending:
                await self._flush_pending()
        self._cycle_done()

    async def _remove_own(self, *, stopping: bool) -> None:
        """Delete every member of this node, its liveness key, index and registry entry.

        The users of the members removed were last seen now, and (``stopping``) so were
        this process's users.
        """
        conn = self._conn
        assert conn is not None and self._commands is not None
        layout, node = self.layout, self.node
        tracker = self.tracker
        users: set[str] = set()
        if stopping:
            users.update(p[1] for topic in tracker.topics() for p in tracker.presences(topic))
        index_key = layout.node_topics_key(node)
        (members,) = await conn.pipeline([[b"SMEMBERS", index_key]], raise_on_error=False)
        topics = set(self._indexed) | set(self.tracker.topics())
        if isinstance(members, StoreCommandError):
            # The index is not a set: what it should list cannot be found; its members
            # expire with their TTL.  The key is deleted below, so the next writes index anew.
            self._junk("this node's topic index", members.reply)
            members = []
        for member in cast(list[bytes], members):
            try:
                topics.add(member.decode("utf-8"))
            except UnicodeDecodeError:  # no topic of ours: nothing was written under it
                self._junk("a topic in this node's index", member)
        node_arg = node.encode("ascii")
        zset = isinstance(self._commands, ZSetCommands)
        cursors = dict.fromkeys(sorted(topics), b"0")
        await conn.pipeline([script_load(REAP_NODE_SCRIPT)])
        while cursors:
            order = list(cursors)
            commands: list[Command] = []
            for topic in order:
                keys = [layout.members_key(topic)]
                if zset:
                    keys.append(layout.deadlines_key(topic))
                commands.append(
                    evalsha(REAP_NODE_SHA, keys, [node_arg, cursors[topic], _REAP_COUNT])
                )
            replies = await conn.pipeline(commands, raise_on_error=False)
            cursors = {}
            for topic, reply in zip(order, replies, strict=True):
                if isinstance(reply, StoreCommandError):
                    # One topic's failure must not keep this node's members in the others.
                    self._errors += 1
                    self._inc(REDIS_ERRORS, 1)
                    logger.error("presence store: removing members of %s: %s", _shown(topic), reply)
                    continue
                for removed in reply[1::2]:
                    try:
                        users.add(parse_member_field(removed)[0])
                    except (PresenceError, UnicodeDecodeError):
                        continue  # not a member field of ours: nobody to mark
                if reply[0] != b"0":
                    cursors[topic] = reply[0]
        if users:
            now_ms = int(time.time() * 1000)
            commands = [last_seen(layout, key, now_ms, self._seen_ms) for key in users]
            await conn.pipeline(commands, raise_on_error=False)  # hints: best effort
        await conn.pipeline(
            [[b"DEL", layout.node_alive_key(node)], *finish_reap(layout, node)],
            raise_on_error=False,  # a registry of the wrong type must not stop the rest
        )
        self._indexed.clear()
        if self.peers_enabled:
            # The peers drop this node's presences now rather than when they notice it gone.
            bye = encode_notice(node, "b")
            await conn.pipeline([[b"SPUBLISH", layout.partition_channel(0), bye]])

    def _junk(self, where: str, value: object) -> None:
        """Count and audit something in Redis the store cannot use (written by someone else:
        rate-limited, and never quoted in full)."""
        self._errors += 1
        self._inc(REDIS_ERRORS, 1)
        audit("store_redis_junk", where=where, value=_shown(value))

    # -- metrics -------------------------------------------------------------------------------

    def _inc(self, metric: MetricDef, amount: int, labels: tuple[str, ...] = ()) -> None:
        try:
            self.metrics.inc(metric, amount, labels)
        except Exception:
            logger.exception("metrics sink %r failed", self.metrics)

    def _publish(self) -> None:
        oldest = self._oldest
        lag = 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)
        try:
            self.metrics.set(REDIS_PENDING, self._pending_count)
            self.metrics.set(REDIS_FLUSH_LAG_SECONDS, lag)
        except Exception:
            logger.exception("metrics sink %r failed", self.metrics)


async def _drop_sockets(pool: Any) -> None:
    """Close a redis-py pool's sockets without waiting for the server, which may be gone.

    Used when a bounded close gave up: a socket left open would be closed by the garbage
    collector later, with a ResourceWarning, after its event loop has ended.
    """
    connections = [
        *getattr(pool, "_available_connections", ()),
        *getattr(pool, "_in_use_connections", ()),
    ]
    for connection in connections:
        try:
            await connection.disconnect(nowait=True)
        except Exception:  # it is being abandoned; nothing more to do
            logger.debug("dropping a socket failed", exc_info=True)
