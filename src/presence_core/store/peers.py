"""Peers: the other processes that share presence through Redis, mirrored into the Tracker.

Every process is a *node* (its Tracker's ``node``).  Its `RedisStore` writes the node's own
presences; `PeerSync` keeps the Tracker's *remote view* (`Tracker.apply_remote`) equal to what
the other nodes hold, so `Tracker.list` and its diffs show everyone, on every process.

Three paths, from fastest to surest:

1. **Diffs on sharded pub/sub.**  The store publishes each flush's coalesced changes of local
   presences (`encode_diff`) on the topic's partition channel (`Layout.channel`), in the same
   pipeline right after the writes.  Every node subscribes to every partition (``SSUBSCRIBE``:
   on a cluster each channel lives on the shard of its slot) and applies what it receives, then
   flushes the Tracker, so a diff reaches another process's clients in about one round trip.
   Applying is idempotent (by ref), so a duplicate message changes nothing.
2. **Reconciliation from Redis.**  Pub/sub is at-most-once and can go deaf without an error
   (output-buffer kill, failover, a slot migration's unsolicited ``SUNSUBSCRIBE``).  So the view
   is compared with Redis itself (every live node's topic index, then each topic's members
   hash) at start, after every reconnection of the subscriber, when a peer says ``hello`` (it
   wrote its state back after an outage), when a probe goes unanswered, and every
   ``reconcile_interval``.  Races with messages in flight are settled by two short memories:
   a ref that left from `GRACE` seconds before the reconciliation started is not added back
   (the read may predate the leave), and a ref that joined since then is not removed (its
   write may not have landed yet on another shard).
3. **Liveness.**  Every node renews ``P:{n:N}:alive`` (the store's heartbeat).  Every
   ``check_interval`` each node reads the registry and the liveness keys; a node whose key
   lapsed leaves this process's view at once (`Tracker.drop_remote`: its leaves go to local
   clients exactly once, since the view forgets a ref once).  One peer claims the lapsed node
   (``SET NX``) and removes its members from Redis with `REAP_NODE_SCRIPT`, topic by topic,
   then drops its index and registry entry.  The member TTL stays as the safety net.  A node
   that is not in the registry at all (reaped, or lost with a Redis restart) leaves the view
   once it has been missing for ``liveness_timeout``: long enough for a store that lost Redis
   to write its state back and register again.

Deafness is also probed: every ``probe_interval`` each node publishes a probe on every
partition and expects to hear its own probes back; a partition that stays silent makes the
node resubscribe and reconcile.

Besides diffs and probes, a node says ``hello`` when it has written its state back (its peers
reconcile) and ``bye`` when it has removed its members, at a graceful stop or when it clears
what an earlier process of its name left (its peers drop its presences at once).  Anyone who
can publish on the channels can send anything: a message that cannot be used is counted in
``redis_errors`` and audited (`presence_core.audit`: a bounded number of records, never the
message itself), and reconciliations run at most once per ``min(check_interval, GRACE)``
however many hellos arrive.

The control plane (subscriptions, reconciling reads, reaps) uses redis-py (with hiredis when
installed): `redis.asyncio.Redis`, or `redis.asyncio.RedisCluster` on a cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, Final, TypeAlias

import orjson
from redis.exceptions import ResponseError

from .._validate import check_node
from ..audit import audit
from ..errors import PresenceError, PresenceValueError
from ..metrics import PEER_LAPSES, PEER_MESSAGES, PEER_RESYNCS, PEERS, REDIS_ERRORS, MetricDef
from ..tracker import TopicChanges, Tracker
from ..tracker.encoding import CONN, DATA, KEY, ref_of
from ..typing import MetricsSink
from .layout import REAP_NODE_SCRIPT, Layout, parse_member_field

__all__ = ["GRACE", "PeerSync", "decode_message", "encode_diff", "encode_notice"]

logger = logging.getLogger("presence_core.store.peers")

GRACE: Final = 1.0
"""Seconds a reconciliation trusts pub/sub over a Redis read: a ref that joined or left less
than this before the reconciliation started, or while it ran, keeps what pub/sub said.  On one
server a diff is published after its writes, in the same pipeline; on a cluster they go to
different shards at the same moment, so they may be seen a few milliseconds apart."""

_VERSION: Final = 1
_RECONCILE_TOPICS: Final = 200  # topics read per round trip
_POLL: Final = 0.25  # seconds the receiver waits for a message before it checks its flags
_STOP_TIMEOUT: Final = 2.0  # seconds a stop waits for a task or a subscription to close
_BURST: Final = 0.002  # seconds of received messages applied before one flush delivers them

Joins: TypeAlias = list[tuple[str, bytes, bytes | None]]
Diff: TypeAlias = tuple[str, Joins, list[bytes]]
"""One topic's changes in a message: ``(topic, joins as (key, data, prev), leaves as refs)``."""


# -- messages ----------------------------------------------------------------------------------
#
# A message is a JSON header, a newline, then the metas' bytes back to back:
#   [1, node, "d", [[topic, [[key, prev | null, len(data)], ...], [ref, ...]], ...]] \n datas
# so metas travel as the Tracker's own bytes, never parsed or re-encoded on either side.
# Notices ("h": hello, "p": probe, "b": bye) carry an argument instead of diffs and no datas.


def encode_diff(node: str, batch: Iterable[TopicChanges]) -> bytes | None:
    """One message with the local changes of ``batch`` (remote presences are left out: their
    owner publishes them); None if nothing is local."""
    groups: list[Any] = []
    datas: list[bytes] = []
    for changes in batch:
        joins = []
        for p, prev in changes.joins.items():
            if p[CONN] is not None:
                data = p[DATA]
                joins.append((p[KEY], None if prev is None else prev.decode("ascii"), len(data)))
                datas.append(data)
        leaves = [ref_of(p[DATA]).decode("ascii") for p in changes.leaves if p[CONN] is not None]
        if joins or leaves:
            groups.append((changes.topic, joins, leaves))
    if not groups:
        return None
    return orjson.dumps((_VERSION, node, "d", groups)) + b"\n" + b"".join(datas)


def encode_notice(node: str, kind: str, argument: str = "") -> bytes:
    """A ``hello`` (``"h"``: wrote its state back), ``probe`` (``"p"``) or ``bye`` (``"b"``:
    stopped, its members removed) message."""
    return orjson.dumps((_VERSION, node, kind, argument)) + b"\n"


def decode_message(message: bytes) -> tuple[str, str, Any]:
    """``(node, kind, body)``: for a diff the body is a list of `Diff`; for a notice its
    argument.  Raises `PresenceValueError` for anything else.

    The error says what is wrong in a few fixed words, never what the message holds: anyone
    who can publish on the channels chooses that, and the reason is logged.
    """
    try:
        end = message.index(b"\n")
        version, node, kind, body = orjson.loads(message[:end])
    except (ValueError, TypeError):
        raise PresenceValueError("not a peer message") from None
    if version != _VERSION:
        raise PresenceValueError("unknown version")
    if not isinstance(node, str) or kind not in ("d", "h", "p", "b"):
        raise PresenceValueError("not a peer message")
    if kind != "d":
        return node, kind, body
    diffs: list[Diff] = []
    at = end + 1
    try:
        for topic, joins, leaves in body:
            decoded: Joins = []
            for key, prev, size in joins:
                decoded.append(
                    (key, message[at : at + size], None if prev is None else prev.encode("ascii"))
                )
                at += size
            diffs.append((topic, decoded, [ref.encode("ascii") for ref in leaves]))
    except (ValueError, TypeError, AttributeError):
        raise PresenceValueError("malformed peer diff") from None
    if at != len(message):
        raise PresenceValueError("malformed peer diff: its metas do not add up")
    return node, kind, diffs


def _owner(ref: bytes) -> str:
    return ref[: ref.rindex(b".")].decode("ascii")


_REF_HEAD: Final = b'{"phx_ref":"'
_JUNK_MEMORY: Final = 4096  # distinct junk items remembered, so each is reported once


def _prev_ok(prev: bytes | None, prefix: bytes) -> bool:
    """An update replaces a presence of the same node."""
    return prev is None or prev.startswith(prefix)


def _shown(value: object) -> str:
    """A value someone else wrote, fit for a log line or an audit record: its repr, cut
    short (a registry entry or a topic may be megabytes)."""
    if isinstance(value, bytes | str):
        return repr(value[:80]) + ("..." if len(value) > 80 else "")
    return repr(value)[:100]


class PeerSync:
    """Keeps a Tracker's remote view equal to its peers' presences (see the module docstring).

    Made and driven by `RedisStore` (``peers=True``): the store publishes, this subscribes,
    reconciles and watches liveness.  ``client`` is a redis-py asyncio client (`Redis` or
    `RedisCluster`) for the control plane; ``subscriptions()`` says which server serves which
    channels now: ``[(redis-py Redis client of one server, channels), ...]``; ``publish``
    queues ``(channel, message)`` pairs for the store to send with its next pipeline.
    """

    def __init__(
        self,
        tracker: Tracker,
        layout: Layout,
        client: Any,
        subscriptions: Callable[[], Awaitable[list[tuple[Any, Sequence[bytes]]]]],
        publish: Callable[[list[tuple[bytes, bytes]]], None],
        *,
        zset_layout: bool,
        liveness_timeout: float,
        check_interval: float,
        probe_interval: float,
        reconcile_interval: float,
        metrics: MetricsSink,
        last_seen_ms: int = 30 * 86_400_000,
    ) -> None:
        self.tracker = tracker
        self.layout = layout
        self.client = client
        self.zset_layout = zset_layout
        self.node = tracker.node
        self.liveness_timeout = liveness_timeout
        self.check_interval = check_interval
        self.probe_interval = probe_interval
        self.reconcile_interval = reconcile_interval
        self.metrics = metrics
        self.last_seen_ms = last_seen_ms
        self.channels = layout.channels()
        self._by_channel = {c: i for i, c in enumerate(self.channels)}
        self._subscriptions = subscriptions
        self._publish = publish
        self._own = orjson.dumps((_VERSION, self.node))[:-1] + b","  # b'[1,"node",'
        self._own_probe = self._own + b'"p"'
        self._pubsubs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Future[None]] = set()  # one per subscription, while it runs
        self._closing = False
        self._resync = asyncio.Event()
        self._resync_reasons: set[str] = set()
        self._joined: dict[bytes, float] = {}  # refs that joined within GRACE: ref -> when
        self._left: dict[bytes, float] = {}  # refs that left within GRACE
        self._unregistered: dict[str, float] = {}  # owner -> when first seen unregistered
        # The owners this sync learnt from Redis or from pub/sub.  The remote view may hold
        # others (a bridge feeds presences under its own node names): those are never
        # dropped for being absent from the registry.
        self._owners: set[str] = set()
        self._junk_seen: set[tuple[str, int]] = set()
        self._recheck: dict[str, float] = {}  # topic -> when to reconcile it again
        self._probe: str | None = None
        self._resubscribe: str | None = None  # why the receiver must subscribe afresh
        self._heard: set[int] = set()
        self._reap = client.register_script(REAP_NODE_SCRIPT)
        self.live_peers: frozenset[str] = frozenset()
        self.messages = 0
        self.resyncs = 0
        self.lapses = 0
        self.errors = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, reconcile once, and start the receiving and watching tasks.

        When Redis cannot be reached the tasks start anyway and keep retrying.
        """
        try:
            await self._subscribe()
            await self.reconcile("start")
        except Exception as exc:  # the loops retry
            self._failed("start", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._receive(), name=f"presence-peers-rx-{self.node}"),
            loop.create_task(self._watch(), name=f"presence-peers-watch-{self.node}"),
        ]

    async def stop(self) -> None:
        """Stop receiving, and close every subscription.

        The readers are waited for as well as the tasks that start them: a reader still
        running when its subscription is closed would reconnect it (redis-py reconnects a
        pub/sub read that fails), and that socket would outlive the store.  A task is
        cancelled again until it ends, within `_STOP_TIMEOUT`: one stuck in a library call on
        a dead server must not hold the stop.  One that ends later still closes its own
        sockets (see `_read` and `_subscribe`).
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOP_TIMEOUT
        pending: set[asyncio.Future[None]] = {*self._tasks, *self._readers}
        while pending:
            for task in pending:
                task.cancel()
            left = deadline - loop.time()
            if left <= 0:
                logger.warning(
                    "%d peer tasks did not stop in time; they close their own "
                    "sockets when they end",
                    len(pending),
                )
                break
            _, pending = await asyncio.wait(pending, timeout=min(0.1, left))
        self._tasks = []
        await self._unsubscribe()

    def request_resync(self, reason: str) -> None:
        """Reconcile soon (the watcher runs it), e.g. after the store's own reconnection."""
        self._resync_reasons.add(reason)
        self._resync.set()

    # -- receiving ---------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        """Subscribe afresh: one subscription per server, to the channels it serves."""
        await self._unsubscribe()
        for client, channels in await self._subscriptions():
            if self._closing:  # stopped meanwhile: open nothing more
                return
            pubsub = client.pubsub()
            self._pubsubs.append(pubsub)
            try:
                for channel in channels:  # one by one: a cluster refuses channels of two slots
                    await pubsub.ssubscribe(channel)
            finally:
                if self._closing:  # a stop came during the subscribe: it is this task's to close
                    await _close_pubsub(pubsub)

    async def _unsubscribe(self) -> None:
        pubsubs, self._pubsubs = self._pubsubs, []
        for pubsub in pubsubs:
            await _close_pubsub(pubsub)

    async def _receive(self) -> None:
        """Keep subscribed, and read every subscription at once (see `_read`)."""
        failures = 0
        while not self._closing:
            try:
                if failures or not self._pubsubs:
                    if failures:
                        await asyncio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
                    await self._subscribe()
                    self.request_resync(self._resubscribe or "reconnect")
                self._resubscribe = None
                failures = 0
                readers = [asyncio.ensure_future(self._read(p)) for p in self._pubsubs]
                for reader in readers:  # what `stop` waits for, even if this task ends first
                    self._readers.add(reader)
                    reader.add_done_callback(self._readers.discard)
                try:
                    # Until one fails or the watcher asks for new subscriptions.
                    done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for reader in readers:
                        reader.cancel()
                    await asyncio.gather(*readers, return_exceptions=True)
                for reader in done:
                    reader.result()  # raise what ended it
                await self._unsubscribe()  # the watcher asked: subscribe afresh
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Connection errors, timeouts, a failover, a slot that moved: subscribe again
                # (to the servers that own the channels now), then reconcile.
                failures += 1
                self._failed("receive", exc)
                await self._unsubscribe()

    async def _read(self, pubsub: Any) -> None:
        """Apply one subscription's messages until it fails or the watcher wants a new one.

        Each server's subscription is read by its own task: a message never waits behind
        another server's poll.
        """
        # The subscription's connection, held here: closing the subscription hands it back to
        # the pool, where a read that fails here would reconnect it.
        connection = pubsub.connection
        try:
            await self._read_until_asked(pubsub)
        finally:
            if self._closing and connection is not None:
                await connection.disconnect(nowait=True)

    async def _read_until_asked(self, pubsub: Any) -> None:
        while self._resubscribe is None and not self._closing:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=_POLL)
            if message is None:
                continue
            applied = self._on_message(message)
            # Take what else already arrived, so a burst costs one flush, but deliver within
            # `_BURST` seconds: the first diff of a burst must not wait for the whole burst.
            deadline = time.perf_counter() + _BURST
            while time.perf_counter() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=0.0)
                if message is None:
                    break
                applied |= self._on_message(message)
            if applied:
                self.tracker.flush()

    def _on_message(self, message: dict[str, Any]) -> bool:
        """Act on one message; True if it changed the remote view."""
        kind = message.get("type")
        if kind in (b"sunsubscribe", "sunsubscribe") and not self._closing:
            # Unasked: a slot migration moved the channel.  Deaf from now on, so say so.
            self._resubscribe = "deaf"
            return False
        if kind not in ("smessage", "message"):
            return False
        data = message.get("data")
        if not isinstance(data, bytes):
            return False
        if data.startswith(self._own):
            # Our own message, echoed: only a probe matters, and only its header is read.
            if not data.startswith(self._own_probe):
                return False
        try:
            node, kind, body = decode_message(data)
        except PresenceError as exc:
            self._invalid(message, str(exc), len(data))
            return False
        if node == self.node:
            if kind == "p" and body == self._probe:
                channel = message.get("channel")
                index = self._by_channel.get(channel) if isinstance(channel, bytes) else None
                if index is not None:
                    self._heard.add(index)
            return False
        try:
            check_node(node)
        except PresenceError:
            what = {"h": "hello", "b": "bye", "p": "probe"}.get(kind, "diff")
            self._invalid(message, f"a {what} from no valid node", len(data))
            return False
        if kind == "h":
            # Not proof of life: anyone can say hello.  Only the registry ends the
            # "unregistered" countdown (`check_liveness`).
            self.request_resync("hello")
            return False
        if kind == "b":
            if node in self._owners:
                self._drop(node, "stopped")  # flushes itself
            # A forged bye drops a live peer's presences: Redis, read soon, puts them back.
            self.request_resync("bye")
            return False
        if kind != "d":
            return False
        self.messages += 1
        self._inc(PEER_MESSAGES, 1)
        now = time.monotonic()
        applied = False
        refused: PresenceError | None = None
        prefix = node.encode("ascii") + b"."
        head = _REF_HEAD + prefix
        for topic, joins, leaves in body:
            # A node speaks for its own presences only.
            mine = [j for j in joins if j[1].startswith(head) and _prev_ok(j[2], prefix)]
            gone = [ref for ref in leaves if ref.startswith(prefix)]
            if len(mine) != len(joins) or len(gone) != len(leaves):
                refused = PresenceValueError("a ref of another node")
            if mine:
                self._owners.add(node)
            n, error = self._apply(topic, mine, gone)
            applied |= n > 0
            refused = error or refused
            joined, left = self._joined, self._left
            for _, data, _ in mine:
                ref = ref_of(data)
                joined.pop(ref, None)  # to the end: the memories stay in arrival order
                joined[ref] = now
            for ref in gone:
                left.pop(ref, None)
                left[ref] = now
        if refused is not None:
            # The Tracker's message may quote the diff: only its kind is recorded.
            reason = f"diff refused by the tracker ({type(refused).__name__})"
            self._invalid(message, reason, len(data))
        return applied

    def _apply(
        self, topic: str, joins: Joins, leaves: list[bytes]
    ) -> tuple[int, PresenceError | None]:
        """`Tracker.apply_remote`, item by item if the whole refuses: one bad member must
        not keep a topic's good ones out.  Returns (applied, the last refusal or None)."""
        if not joins and not leaves:
            return 0, None
        try:
            return self.tracker.apply_remote(topic, joins, leaves), None
        except PresenceError as exc:
            if len(joins) + len(leaves) == 1:
                return 0, exc
            refused = exc
        applied = 0
        for join in joins:
            try:
                applied += self.tracker.apply_remote(topic, (join,))
            except PresenceError as exc:
                refused = exc
        for ref in leaves:
            try:
                applied += self.tracker.apply_remote(topic, (), (ref,))
            except PresenceError as exc:
                refused = exc
        return applied, refused

    # -- watching: liveness, probes, reconciliation ------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.probe_interval
        next_reconcile = loop.time() + self.reconcile_interval
        # Reconciliations are spaced: a hello is a request anyone who can publish can send,
        # and each one would otherwise cost a full read of the namespace.
        spacing = min(self.check_interval, GRACE)
        last_resync = -math.inf
        while not self._closing:
            try:
                try:
                    async with asyncio.timeout(self.check_interval):
                        await self._resync.wait()
                except TimeoutError:
                    pass
                wait = last_resync + spacing - loop.time()
                if wait > 0 and self._resync.is_set():
                    await asyncio.sleep(wait)
                now = loop.time()
                # The next reconciliation starts after now: what pub/sub said before
                # now - GRACE is in Redis by then (see `GRACE`), so it need not be kept.
                self._forget_before(time.monotonic() - GRACE)
                await self.check_liveness()
                if now >= next_probe:
                    next_probe = now + self.probe_interval
                    if not await self._probe_round():
                        self._resubscribe = "deaf"
                if now >= next_reconcile:
                    self.request_resync("periodic")
                await self._recheck_due()
                if self._resync.is_set():
                    reasons = self._resync_reasons
                    self._resync_reasons = set()
                    self._resync.clear()
                    last_resync = loop.time()
                    try:
                        await self.reconcile(_main_reason(reasons))
                    except BaseException:
                        # Not done: ask again (the loop backs off by one check interval).
                        self._resync_reasons |= reasons
                        self._resync.set()
                        raise
                    next_reconcile = now + self.reconcile_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed("watch", exc)
                await asyncio.sleep(self.check_interval)  # not a tight loop while Redis is down

    async def _recheck_due(self) -> None:
        """Reconcile the topics whose reconciliation spared a ref `GRACE` seconds ago."""
        now = time.monotonic()
        due = [topic for topic, when in self._recheck.items() if when <= now]
        if not due:
            return
        for topic in due:
            del self._recheck[topic]
        try:
            await self.reconcile("recheck", due)
        except BaseException:
            for topic in due:
                self._recheck.setdefault(topic, now)
            raise

    async def _probe_round(self) -> bool:
        """Check the last round of probes, then publish the next; False if one went unheard."""
        heard_all = self._probe is None or len(self._heard) == len(self.channels)
        if not heard_all:
            missing = len(self.channels) - len(self._heard)
            logger.warning("%d of %d partitions did not echo a probe", missing, len(self.channels))
        self._probe = secrets.token_hex(4)
        self._heard = set()
        if self._pubsubs:
            # Through the data plane, as the diffs go: the probe tests the path they take.
            message = encode_notice(self.node, "p", self._probe)
            self._publish([(channel, message) for channel in self.channels])
        return heard_all

    async def check_liveness(self) -> None:
        """Read the registry and liveness keys; drop lapsed and long-unregistered peers."""
        registry, live, lapsed = await self._nodes()
        self.live_peers = frozenset(live)
        self._set(PEERS, len(live))
        now = time.monotonic()
        # Only owners this sync learnt: the others in the view are someone else's to manage.
        self._owners.intersection_update(self.tracker.remote_nodes())
        owners = self._owners
        for owner in owners - registry:
            since = self._unregistered.setdefault(owner, now)
            if now - since >= self.liveness_timeout:
                self._drop(owner, "unregistered")
        for owner in list(self._unregistered):
            if owner not in owners or owner in registry:
                del self._unregistered[owner]
        for node in lapsed:
            if node in owners:
                self._drop(node, "lapsed")
            try:
                await self._reap_node(node)
            except ResponseError as exc:  # a key of the wrong type: the next lapsed one
                self._failed(f"reaping {node}", exc)

    async def _nodes(self) -> tuple[set[str], set[str], list[str]]:
        """``(registered, live, lapsed)``: the registry's valid node names, and the others
        than this one whose liveness key is there or gone.  Entries that are not node names
        are skipped and reported once; a liveness key that cannot be read (of the wrong
        type) leaves its node neither live nor lapsed."""
        layout = self.layout
        registry: set[str] = set()
        for raw in await self.client.smembers(layout.nodes_key):
            try:
                # A node name is at most 32 characters: a long entry is not decoded at all.
                registry.add(check_node(raw.decode("ascii") if len(raw) <= 32 else None))
            except (PresenceError, UnicodeDecodeError, AttributeError, TypeError):
                self._junk("registry entry", raw)
        others = sorted(registry - {self.node})
        alive = await self._multi("get", [layout.node_alive_key(n) for n in others])
        live: set[str] = set()
        lapsed: list[str] = []
        for node, value in zip(others, alive, strict=True):
            if isinstance(value, Exception):
                self._junk("liveness key", node)
            elif value is None:
                lapsed.append(node)
            else:
                live.add(node)
        return registry, live, lapsed

    def _drop(self, node: str, why: str) -> None:
        dropped = self.tracker.drop_remote(node)
        self._unregistered.pop(node, None)
        if dropped:
            self.lapses += 1
            self._inc(PEER_LAPSES, 1)
            logger.info("peer %s %s: %d presences left", node, why, dropped)
            self.tracker.flush()

    async def _reap_node(self, node: str) -> None:
        """Remove a lapsed node's members from Redis, if this process wins the claim."""
        layout = self.layout
        claim_ms = max(1000, round(self.liveness_timeout * 1000))
        won = await self.client.set(layout.node_reaper_key(node), self.node, nx=True, px=claim_ms)
        if not won:
            return
        topics = await self.client.smembers(layout.node_topics_key(node))
        removed = 0
        alive_key = layout.node_alive_key(node)
        for raw in topics:
            if await self.client.exists(alive_key):
                # It came back (a false lapse: a failover outlasted its liveness timeout, or a
                # long pause): leave the rest to it, it writes its state back.
                logger.warning("lapsed peer %s came back; reap stopped", node)
                return
            topic = self._topic(raw)
            if topic is None:
                continue
            keys = [layout.members_key(topic)]
            if self.zset_layout:
                keys.append(layout.deadlines_key(topic))
            cursor = b"0"
            while True:
                try:
                    reply = await self._reap(keys=keys, args=[node, cursor, 1000])
                except ResponseError as exc:
                    # A key of the wrong type: its members, if any, expire with their TTL.
                    self._failed(f"reaping {node} in {_shown(topic)}", exc)
                    break
                removed += (len(reply) - 1) // 2
                await self._last_seen(reply[1::2])
                cursor = reply[0]
                if cursor in (b"0", 0, "0"):
                    break
        await self.client.delete(layout.node_topics_key(node))
        await self.client.srem(layout.nodes_key, node)
        logger.info("reaped lapsed peer %s: %d members in %d topics", node, removed, len(topics))

    async def _last_seen(self, fields: Sequence[bytes]) -> None:
        """The users of reaped members were last seen now (their process died)."""
        users = set()
        for field in fields:
            try:
                users.add(parse_member_field(field)[0])
            except (PresenceError, UnicodeDecodeError):
                continue
        if not users:
            return
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for key in users:
            pipe.set(self.layout.last_seen_key(key), now_ms, px=self.last_seen_ms)
        await pipe.execute(raise_on_error=False)  # a hint: one that fails is not retried

    async def reconcile(self, reason: str, only: Collection[str] | None = None) -> None:
        """Make the remote view equal to the live peers' members in Redis (see the module
        docstring for the races this settles); ``only`` limits it to some topics.

        A ref that pub/sub spoke of within `GRACE` keeps what pub/sub said, but its topic is
        read again `GRACE` seconds later: had the subscription been down, the message that
        would have settled it is lost, and only Redis can.
        """
        started = time.monotonic()
        layout = self.layout
        _, live, _ = await self._nodes()
        view: dict[bytes, Any] = {ref_of(p[DATA]): p for p in self.tracker.remote_presences()}
        if only is None:
            indexes = await self._multi(
                "smembers", [layout.node_topics_key(n) for n in sorted(live)]
            )
            topics: set[str] = set()
            for node, index in zip(sorted(live), indexes, strict=True):
                if isinstance(index, Exception):
                    self._junk("topic index", node)
                    continue
                topics.update(t for t in map(self._topic, index) if t is not None)
            topics.update(p[0] for p in view.values())
        else:
            topics = set(only)
            view = {ref: p for ref, p in view.items() if p[0] in topics}
        wanted: dict[bytes, tuple[str, str, bytes]] = {}
        unread: set[str] = set()  # topics whose hash could not be read: their view stays
        ordered = sorted(topics)
        for start in range(0, len(ordered), _RECONCILE_TOPICS):
            chunk = ordered[start : start + _RECONCILE_TOPICS]
            hashes = await self._multi("hgetall", [layout.members_key(t) for t in chunk])
            for topic, members in zip(chunk, hashes, strict=True):
                if isinstance(members, Exception):
                    self._junk("topic hash", topic)
                    unread.add(topic)
                    continue
                for field, data in members.items():
                    member = self._member(field, data, live)
                    if member is not None:
                        key, ref = member
                        wanted[ref] = (topic, key, data)
        self._forget_before(started - GRACE)
        joins: dict[str, Joins] = {}
        leaves: dict[str, list[bytes]] = {}
        spared: set[str] = set()
        for ref, (topic, key, data) in wanted.items():
            if ref not in view:
                if ref in self._left:
                    spared.add(topic)
                else:
                    joins.setdefault(topic, []).append((key, data, None))
        for ref, p in view.items():
            if ref not in wanted and _owner(ref) in live and p[0] not in unread:
                if ref in self._joined:
                    spared.add(p[0])
                else:
                    leaves.setdefault(p[0], []).append(ref)
        due = time.monotonic() + GRACE
        for topic in spared:
            self._recheck.setdefault(topic, due)
        changed = 0
        for topic_joins in joins.values():
            self._owners.update(_owner(ref_of(data)) for _, data, _ in topic_joins)
        for topic in sorted(set(joins) | set(leaves)):
            n, refused = self._apply(topic, joins.get(topic, []), leaves.get(topic, []))
            changed += n
            if refused is not None:
                self._junk("member", (topic, type(refused).__name__))
        self.resyncs += 1
        self._inc(PEER_RESYNCS, 1, (reason,))
        if changed:
            logger.info("reconciled the remote view (%s): %d changes", reason, changed)
            self.tracker.flush()

    def _forget_before(self, horizon: float) -> None:
        """Forget joins and leaves older than ``horizon``: they are in Redis as well.

        Called between reconciliations only (the watcher runs them), so what pub/sub says
        while one reads stays until it has compared.  The memories are in arrival order, so
        this stops at the first entry it keeps: O(forgotten)."""
        for memory in (self._joined, self._left):
            old = list(itertools.takewhile(lambda item: item[1] < horizon, memory.items()))
            for ref, _ in old:
                del memory[ref]

    # -- redis-py helpers --------------------------------------------------------------------

    async def _gets(self, keys: Sequence[bytes]) -> list[Any]:
        return await self._multi("get", keys)

    async def _multi(self, command: str, keys: Sequence[bytes]) -> list[Any]:
        """One command per key in one pipeline (split per slot by RedisCluster).  An error
        reply (a key of the wrong type) comes back in its place, as an exception: one bad
        key must not hide the others."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            getattr(pipe, command)(key)
        return list(await pipe.execute(raise_on_error=False))

    def _topic(self, raw: object) -> str | None:
        """A topic read from a node's index, or None (reported once) if it cannot be one."""
        try:
            return self.tracker.check_topic(raw.decode("utf-8"))  # type: ignore[attr-defined]
        except (PresenceError, UnicodeDecodeError, AttributeError):
            self._junk("topic in an index", raw)
            return None

    def _member(self, field: object, data: object, live: set[str]) -> tuple[str, bytes] | None:
        """``(key, ref)`` of a member of a live peer read from a topic's hash; None if it is
        some other node's, or (reported once) junk."""
        try:
            key, ref = parse_member_field(field)  # type: ignore[arg-type]
        except (PresenceError, UnicodeDecodeError, AttributeError, TypeError):
            self._junk("member field", field)
            return None
        if _owner(ref) not in live:
            return None
        # The meta must carry the field's ref: one that does not would be added under its
        # own ref and removed under the field's, at every reconciliation.
        if not isinstance(data, bytes) or not data.startswith(_REF_HEAD + ref + b'"'):
            self._junk("member data", field)
            return None
        try:
            self.tracker.check_key(key)
        except PresenceError:
            self._junk("member key", field)
            return None
        return key, ref

    # -- metrics -----------------------------------------------------------------------------

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._inc(REDIS_ERRORS, 1)
        # An error may quote what someone else wrote to Redis: cut short.
        logger.warning("presence peers: %s failed: %s", what, str(exc)[:200])

    def _junk(self, where: str, value: object) -> None:
        """Count and audit something in Redis this sync cannot use, once per item (it is
        read again at every check): anyone who can write to Redis can plant any amount."""
        mark = (where, hash(value))
        if mark in self._junk_seen:
            return
        if len(self._junk_seen) >= _JUNK_MEMORY:
            self._junk_seen.clear()
        self._junk_seen.add(mark)
        self.errors += 1
        self._inc(REDIS_ERRORS, 1)
        audit("peer_redis_junk", where=where, value=_shown(value))

    def _invalid(self, message: dict[str, Any], reason: str, size: int) -> None:
        """Count a sync message that cannot be used, and audit it at a bounded rate: anyone
        who can publish on the channels can send any number of them."""
        self.errors += 1
        self._inc(REDIS_ERRORS, 1)
        channel = message.get("channel")
        name = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else str(channel)
        audit("peer_message_invalid", channel=name[:200], reason=reason, bytes=size)

    def _inc(self, metric: MetricDef, amount: int, labels: tuple[str, ...] = ()) -> None:
        try:
            self.metrics.inc(metric, amount, labels)
        except Exception:
            logger.exception("metrics sink %r failed", self.metrics)

    def _set(self, metric: MetricDef, value: float) -> None:
        try:
            self.metrics.set(metric, value)
        except Exception:
            logger.exception("metrics sink %r failed", self.metrics)


def _main_reason(reasons: set[str]) -> str:
    for reason in ("start", "reconnect", "deaf", "hello", "bye", "recheck", "periodic"):
        if reason in reasons:
            return reason
    return "periodic"


async def _close_pubsub(pubsub: Any) -> None:
    connection = getattr(pubsub, "connection", None)
    try:
        async with asyncio.timeout(_STOP_TIMEOUT):
            await pubsub.aclose()
    except Exception:  # closing a broken subscription may fail (or hang) the same way
        logger.debug("closing a subscription failed", exc_info=True)
        if connection is not None:  # then its socket is dropped without waiting
            try:
                await connection.disconnect(nowait=True)
            except Exception:
                logger.debug("dropping a subscription's socket failed", exc_info=True)
