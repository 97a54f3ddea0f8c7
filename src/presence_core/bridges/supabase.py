"""Attach a `Tracker` to Supabase Realtime channels through Supabase's Python client.

`SupabaseBridge` joins one channel per bridged topic on an ``AsyncRealtimeClient`` and moves
presence both ways:

* **In (the mirror).**  Every presence in the channel is mirrored into the Tracker as a *remote*
  presence (`Tracker.apply_remote`), so `Tracker.list`, `count`, `user`, diffs, metrics and a
  Redis store's peers see it like presence the Tracker holds.  The mirror is incremental: the
  client reports each key whose presences changed (its join and leave callbacks), and at the
  presence sync that follows the bridge re-reads those keys only, so a diff costs the keys it
  touched, whatever the size of the channel.  After every (re)join the first sync re-reads
  the whole channel instead, so whoever is no longer in the channel leaves the mirror and
  whoever joined while the socket was down joins it.  Each channel's mirrored presences
  belong to their own node, `SupabaseBridge.node_of` (``sb-<16 hex>``), with refs the bridge
  makes itself (never one read from a meta), so `Tracker.remote_nodes` tells them apart and
  `stop` drops them.
* **Out (the published presence).**  A channel holds one presence per client socket, so the
  bridge publishes exactly one: under the presence key ``key`` (default
  ``presence-core-<tracker node>``), the meta ``{"presence_core_bridge": <bridge id>, "keys":
  {key: [meta, ...]}}`` listing every *local* presence the Tracker holds in that topic, metas
  without their refs, plus ``"sig"`` when the bridge has a ``secret`` (below).  A local join,
  leave or update re-tracks it (``channel.track``, an update on the channel); when the topic
  has no local presence left, the bridge untracks.  After every (re)join of the channel (the
  client's ``SUBSCRIBED`` state) the bridge tracks again, because the server forgot it.
* **No echo, no forgery.**  Only local presences are published (remote ones, including the
  mirror, are never sent back), and the bridge's own published meta is never mirrored.  Any
  member of a channel can track a meta that *looks* like a bridge's, so a bridge meta is
  expanded into the presences it lists only when it carries a valid ``"sig"``: HMAC-SHA256,
  under the ``secret`` the bridges share, over a canonical encoding of the channel, the bridge
  id and the listed presences (`SIGNATURE_FIELD`), checked in constant time.  Any other meta
  (unsigned, a wrong signature, or no ``secret`` here) is mirrored as the one plain presence it
  is, under its own key.  So bridges given the same ``secret`` see each other's users, not each
  other's bridges; without one they see each other's bridge presence only.  A signature binds
  a meta to its channel and bridge, not to a socket or a time (a known limit): a member that
  copies a signed meta it saw in the channel makes its users show twice, and keeps them present
  after they left, until the member leaves.  Who may join the channel (a private channel,
  under Realtime's RLS policies) is the real control.
* **Hostile metas.**  Members choose their metas, including a ``presence_ref`` field that the
  client lets stand for the server's ref, so the bridge never takes it as unique: mirror ids
  are scoped by channel key and de-duplicated.  A meta that cannot be mirrored (an integer
  beyond 64 bits, which Supabase relays and orjson cannot write; a key the Tracker refuses) is
  skipped and counted (`SupabaseBridge.skipped`).  The client runs the bridge's callbacks in
  the task that reads its socket, so no exception may leave them: one that does is logged
  (type and place only, at most once a minute per channel), and the topic's mirror goes stale
  and is rebuilt from the channel's state.

**Outages.**  The bridge reconnects for as long as it runs, whatever the client's own
``max_retries`` and ``auto_reconnect``: a supervisor task makes one connection attempt at a
time (jittered exponential backoff, 0.5 s doubling to 5 s) while the socket is down, and
re-creates a channel that stays unjoined on a connected socket.  A socket that is open but of
no use counts as down and is dropped: one whose client no longer reads it (its listener task
ended), or one that answered none of the bridge's WebSocket pings for ``heartbeat_timeout``
seconds (a hung server).  From the moment it sees a channel's socket or join drop until the
channel is joined again and its state re-read, the topic's mirror is *stale*:
`SupabaseBridge.stale` and `SupabaseBridge.stale_since` say so, ``on_stale(topic, stale)`` is
called and a WARNING (stale) then INFO (fresh) is logged.  The mirror keeps the last state it
knew for ``drop_after`` seconds of staleness, then drops it
(its presences leave the Tracker, with diffs) until the channel is back.

The bridge sees local changes through a feed reader (`Tracker.add_feed_reader`), so local
presence is published after a `Tracker.flush` (which ``presence-core serve`` runs on its own).
It flushes the Tracker itself after each mirror change, unless ``flush=False``.  Everything runs
on the event loop of `start`: call the Tracker from that loop's thread.

The bridge does not own the client: `stop` leaves its channels but does not close the client
(the client closes itself when its last channel is removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import random
import secrets
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import PresenceError, PresenceTypeError, PresenceValueError

if TYPE_CHECKING:
    from types import TracebackType

    from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

    from ..tracker import Tracker
    from ..tracker.feed import TopicChanges

__all__ = ["BRIDGE_FIELD", "SIGNATURE_FIELD", "BridgeError", "SupabaseBridge"]

logger = logging.getLogger(__name__)

BRIDGE_FIELD = "presence_core_bridge"
"""The meta field that marks a presence published by a bridge (its value: the bridge id)."""

SIGNATURE_FIELD = "sig"
"""The field of a bridge's published meta that holds its signature (64 hex characters):
HMAC-SHA256 under the bridges' shared secret of the JSON array ``["presence-core-bridge/1",
<channel name>, <bridge id>, <keys>]`` encoded by orjson with sorted keys."""

_SIGNED_DOMAIN = "presence-core-bridge/1"
_DROPPED_FIELDS = frozenset(("presence_ref", "phx_ref", "phx_ref_prev"))

# Reconnection: quick first retries so a short blip costs little, capped low so the bridge is
# back within seconds of the server, jittered so many bridges do not reconnect in lockstep.
_RETRY_FIRST = 0.5
_RETRY_CAP = 5.0
_POLL = 0.5  # how often a healthy bridge looks at its socket and channels
# A channel still unjoined this long after the socket came back is re-created (the client
# rejoins by itself within a round trip, unless it lost track of the channel).
_REJOIN_GRACE = 5.0
_REJOIN_CAP = 30.0
_FAILURE_LOG_EVERY = 60.0  # a meta that breaks every sync must not flood the log

# A mirror id: the channel key first, so members (who choose their own "presence_ref": the
# client lets a meta's field override the server's ref) cannot collide across keys.
_Id = tuple[object, ...]


class BridgeError(PresenceError):
    """The bridge could not join a channel, or was used in the wrong state."""


class _Channel:
    """One bridged topic: its channel, its mirror, its published meta and its health."""

    __slots__ = (
        "announced",
        "broken",
        "channel",
        "mirror",
        "name",
        "next_ref",
        "node",
        "published",
        "publisher",
        "rejoin_wait",
        "resync",
        "sources",
        "stale_since",
        "synced",
        "topic",
        "touched",
        "unjoined_since",
        "dirty",
        "failures",
        "failures_logged_at",
    )

    def __init__(self, name: str, topic: str, node: str) -> None:
        self.name = name  # the channel name given to client.channel()
        self.topic = topic  # the Tracker topic
        self.node = node
        self.channel: AsyncRealtimeChannel | None = None
        # mirror id (`SupabaseBridge._wanted`) -> (ref in the Tracker, key, meta)
        self.mirror: dict[_Id, tuple[bytes, str, dict[str, Any]]] = {}
        # channel presence key -> the ids mirrored from it (one per meta, or per listed
        # presence of another bridge)
        self.sources: dict[str, set[_Id]] = {}
        self.touched: set[str] = set()  # channel keys changed since the last sync
        self.next_ref = 0
        self.published: dict[str, Any] | None = None  # what the channel holds from us
        self.dirty = asyncio.Event()
        self.publisher: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()  # set at the first full read after `start`
        self.failures = 0  # callbacks that raised since the last one logged
        self.failures_logged_at = -math.inf
        self.reset()

    def reset(self) -> None:
        """Back to the state before `start` (not joined, nothing mirrored)."""
        self.channel = None
        self.mirror.clear()
        self.sources.clear()
        self.touched.clear()
        self.published = None
        self.synced.clear()
        self.resync = True  # the next sync of a joined channel re-reads all of it
        self.stale_since: float | None = None
        self.announced = False  # whether going stale was reported (so is coming back)
        self.unjoined_since: float | None = None  # socket up, channel not synced, since
        self.rejoin_wait = _REJOIN_GRACE
        # A callback raised midway, so the mirror and the Tracker may disagree: the next full
        # read rebuilds the mirror from nothing.
        self.broken = False


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise PresenceTypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise PresenceValueError(f"{what} must not be empty")
    return name


class _Secret:
    """The shared key, kept out of reprs and attribute dumps."""

    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        self.key = key

    def __repr__(self) -> str:
        return "<secret>"


def _check_secret(secret: object) -> _Secret | None:
    # The messages name the type only: a secret must never reach an exception.
    if secret is None:
        return None
    if isinstance(secret, str):
        try:
            secret = secret.encode("utf-8")
        except UnicodeEncodeError:
            raise PresenceValueError("secret is not valid Unicode text") from None
    elif isinstance(secret, (bytes, bytearray, memoryview)):
        secret = bytes(secret)
    else:
        raise PresenceTypeError(f"secret must be bytes or str, not {type(secret).__name__}")
    if not secret:
        raise PresenceValueError("secret must not be empty")
    return _Secret(secret)


def _check_seconds(value: object, what: str, *, infinite: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PresenceTypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not value > 0 or (math.isinf(value) and not infinite):
        raise PresenceValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _strip(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _DROPPED_FIELDS}


class SupabaseBridge:
    """Mirror Supabase Realtime channels into ``tracker`` and publish its local presence there.

    Args:
        tracker: The Tracker to attach.
        client: A Supabase ``realtime.AsyncRealtimeClient`` (connected or not; the bridge
            connects it if needed, and reconnects it for as long as the bridge runs).
        topics: The channels to bridge, by the name given to ``client.channel`` (``"room"``
            joins ``realtime:room``), each mirrored into the Tracker topic of the same name;
            or a mapping ``{channel name: Tracker topic}``.
        key: The presence key the bridge publishes under (default
            ``presence-core-<tracker.node>``).
        bridge_id: Marks the bridge's published meta so it is never mirrored back (default:
            16 random hex characters; give each bridge its own).
        secret: Shared by the bridges that should see each other's users: the bridge signs
            its published meta with it and expands another bridge's meta into the presences
            it lists only if its signature is valid.  Without it every other bridge's meta is
            mirrored as one plain presence.  Never logged or shown.
        drop_after: Seconds a topic's mirror may stay stale (socket or channel down) before
            the bridge drops it: its presences leave the Tracker until the channel is back.
            ``math.inf`` keeps it for ever.
        on_stale: Called as ``on_stale(topic, stale)`` on the event loop when a topic's mirror
            goes stale (True) and when it is fresh again (False).  Errors are logged.
        heartbeat_timeout: Seconds the socket may go without answering the bridge's
            WebSocket pings (sent after a third of that without an answer) before the bridge
            takes it for dead: the mirrors go stale and the bridge reconnects.  ``math.inf``
            turns the check off.
        private: Join the channels as private channels.  The mirror goes to the Tracker topic
            the host names; to keep it apart from a public channel of that name on a
            `presence_core.server.PresenceServer`, name it ``PRIVATE_PREFIX + topic``.
        flush: Flush the Tracker after each mirror change, so subscribers get it at once.
        timeout: Seconds `start` waits for each channel's join and first presence state.

    Raises:
        PresenceTypeError, PresenceValueError: bad arguments.
    """

    def __init__(
        self,
        tracker: Tracker,
        client: AsyncRealtimeClient,
        topics: Sequence[str] | Mapping[str, str],
        *,
        key: str | None = None,
        bridge_id: str | None = None,
        secret: bytes | str | None = None,
        drop_after: float = 30.0,
        on_stale: Callable[[str, bool], object] | None = None,
        heartbeat_timeout: float = 10.0,
        private: bool = False,
        flush: bool = True,
        timeout: float = 10.0,
    ) -> None:
        from ..tracker import Tracker

        if not isinstance(tracker, Tracker):
            raise PresenceTypeError(f"tracker must be a Tracker, not {type(tracker).__name__}")
        if client is None or not callable(getattr(client, "channel", None)):
            raise PresenceTypeError("client must be a realtime.AsyncRealtimeClient")
        if isinstance(topics, str):
            raise PresenceTypeError("topics must be a list of channel names, not one str")
        pairs: Iterable[tuple[object, object]]
        if isinstance(topics, Mapping):
            pairs = topics.items()
        elif isinstance(topics, Iterable):
            pairs = ((name, name) for name in topics)
        else:
            raise PresenceTypeError(
                f"topics must be a list or mapping, not {type(topics).__name__}"
            )
        self.tracker = tracker
        self.client = client
        self.bridge_id = (
            secrets.token_hex(8) if bridge_id is None else _check_name(bridge_id, "bridge_id")
        )
        self.key = f"presence-core-{tracker.node}" if key is None else _check_name(key, "key")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise PresenceValueError(f"timeout must be a positive number, got {timeout!r}")
        self._secret = _check_secret(secret)
        self.drop_after = _check_seconds(drop_after, "drop_after", infinite=True)
        if on_stale is not None and not callable(on_stale):
            raise PresenceTypeError(f"on_stale must be callable, not {type(on_stale).__name__}")
        self._on_stale = on_stale
        self.heartbeat_timeout = _check_seconds(
            heartbeat_timeout, "heartbeat_timeout", infinite=True
        )
        self.skipped = 0
        """Channel metas not mirrored because they cannot be encoded (an integer beyond 64
        bits...) or the Tracker refused them, counted at each sync that met one."""
        self._skips_logged_at = -math.inf
        self.private = bool(private)
        self.flush = bool(flush)
        self.timeout = float(timeout)
        self._channels: dict[str, _Channel] = {}  # by Tracker topic
        for name, topic in pairs:
            _check_name(name, "a channel name")
            _check_name(topic, "a Tracker topic")
            assert isinstance(name, str) and isinstance(topic, str)
            if topic in self._channels or any(c.name == name for c in self._channels.values()):
                raise PresenceValueError(f"channel {name!r} / topic {topic!r} is bridged twice")
            self._channels[topic] = _Channel(name, topic, self.node_of(topic))
        if not self._channels:
            raise PresenceValueError("topics must name at least one channel")
        self._remove_reader: Any = None
        self._supervisor: asyncio.Task[None] | None = None
        self._retry_delay = _RETRY_FIRST
        self._started = False
        # Liveness of the client's socket: the one `_watch` pings, when it last answered (or
        # was first seen).
        self._probed: object = None
        self._alive_at = 0.0
        self._watcher: asyncio.Task[None] | None = None

    # -- public ---------------------------------------------------------------------------

    def node_of(self, topic: str) -> str:
        """The Tracker node that owns the presences mirrored from ``topic``'s channel."""
        digest = hashlib.blake2b(f"{self.bridge_id}\0{topic}".encode(), digest_size=8)
        return "sb-" + digest.hexdigest()

    @property
    def topics(self) -> list[str]:
        """The bridged Tracker topics."""
        return list(self._channels)

    @property
    def signed(self) -> bool:
        """Whether the bridge has a secret (signs its meta, expands signed ones)."""
        return self._secret is not None

    @property
    def stale(self) -> bool:
        """Whether any bridged topic's mirror is stale now (see `stale_since`)."""
        return any(ch.stale_since is not None for ch in self._channels.values())

    def stale_since(self, topic: str) -> float | None:
        """Since when (`time.monotonic`) ``topic``'s mirror has been stale, or None if it is not.

        A mirror is stale from the moment the bridge sees its channel's socket or join drop
        until the channel is joined again and its whole presence state re-read: meanwhile it
        holds the last state the bridge knew (or nothing, after ``drop_after``).  None
        before `start` and after `stop`; set while `start` waits for the first state.

        Raises:
            KeyError: ``topic`` is not bridged.
        """
        return self._channels[topic].stale_since

    def channel(self, topic: str) -> AsyncRealtimeChannel | None:
        """The client channel bridged to Tracker topic ``topic`` (None before `start`)."""
        return self._channels[topic].channel

    async def start(self) -> None:
        """Join every channel, mirror its presence and publish the local presence.

        Returns once every channel is joined and its presence state mirrored.

        Raises:
            BridgeError: already started, or a channel's join was refused or timed out, or
                its presence state did not come (the bridge is stopped again then).
        """
        if self._started:
            raise BridgeError("the bridge is already started")
        self._started = True
        self._remove_reader = self.tracker.add_feed_reader(self._on_feed)
        loop = asyncio.get_running_loop()
        try:
            for ch in self._channels.values():
                ch.stale_since = time.monotonic()  # until its first state, unannounced
                ch.publisher = loop.create_task(self._publish_loop(ch))
                await self._join(ch)
            self._retry_delay = _RETRY_FIRST
            self._supervisor = loop.create_task(self._supervise())
            if math.isfinite(self.heartbeat_timeout):
                self._watcher = loop.create_task(self._watch())
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Leave the channels (untracking the published presence) and drop the mirror.

        Idempotent.  The bridge does not close the client, which belongs to the caller
        (Supabase's client closes itself when its last channel is removed).
        """
        if not self._started:
            return
        self._started = False
        if self._remove_reader is not None:
            self._remove_reader()
            self._remove_reader = None
        tasks = [self._supervisor, self._watcher]
        tasks += [ch.publisher for ch in self._channels.values()]
        self._supervisor = self._watcher = None
        self._probed = None
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for ch in self._channels.values():
            ch.publisher = None
            channel = ch.channel
            ch.reset()
            if channel is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.remove_channel(channel), self.timeout)
            self.tracker.drop_remote(ch.node)
        if self.flush:
            self.tracker.flush()

    async def __aenter__(self) -> SupabaseBridge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return (
            f"<SupabaseBridge {self.bridge_id} topics={self.topics!r} "
            f"started={self._started} stale={self.stale}>"
        )

    # -- joining --------------------------------------------------------------------------

    async def _open(self, ch: _Channel) -> AsyncRealtimeChannel:
        """A new client channel for ``ch``, subscribed (or given up on after ``timeout``)."""
        params: Any = {
            "config": {
                "broadcast": {"ack": False, "self": False},
                "presence": {"key": self.key, "enabled": True},
                "private": self.private,
            }
        }
        channel = self.client.channel(ch.name, params)
        ch.channel = channel
        # Callbacks of a channel the bridge has replaced are ignored, not unregistered (the
        # client cannot unregister them).
        channel.on_presence_join(lambda key, *_: self._guarded(ch, channel, ch.touched.add, key))
        channel.on_presence_leave(lambda key, *_: self._guarded(ch, channel, ch.touched.add, key))
        channel.on_presence_sync(lambda: self._guarded(ch, channel, self._mirror, ch))

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            self._guarded(ch, channel, self._on_subscribe_state, ch, channel, state, error)

        ch.resync = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.subscribe(on_state), self.timeout)
        return channel

    async def _join(self, ch: _Channel) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            channel = await self._open(ch)
        except Exception as exc:  # the client could not connect (the cause says why)
            raise BridgeError(f"joining realtime:{ch.name} failed: {type(exc).__name__}") from exc
        if not channel.is_joined:
            raise BridgeError(f"joining {channel.topic} was refused or timed out")
        try:
            await asyncio.wait_for(ch.synced.wait(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise BridgeError(f"no presence state came for {channel.topic}") from None

    def _on_subscribe_state(
        self,
        ch: _Channel,
        channel: AsyncRealtimeChannel,
        state: RealtimeSubscribeStates,
        error: Exception | None,
    ) -> None:
        if not self._started or ch.channel is not channel:
            return
        # The server holds nothing of ours on this channel any more, whichever the state.
        ch.published = None
        ch.resync = True
        if state == "SUBSCRIBED":
            ch.dirty.set()  # publish again
        else:
            logger.info("bridge channel %s: %s (%s)", ch.name, state, error)
        self._go_stale(ch)

    # -- health ---------------------------------------------------------------------------

    def _notify(self, ch: _Channel, stale: bool) -> None:
        if self._on_stale is None:
            return
        try:
            self._on_stale(ch.topic, stale)
        except Exception:
            logger.exception("bridge channel %s: on_stale raised", ch.name)

    def _go_stale(self, ch: _Channel) -> None:
        if ch.stale_since is not None:
            return
        ch.stale_since = time.monotonic()
        ch.announced = True
        logger.warning(
            "bridge channel %s: socket or channel down, the mirror of %r is stale",
            ch.name,
            ch.topic,
        )
        self._notify(ch, True)

    def _go_fresh(self, ch: _Channel) -> None:
        since, ch.stale_since = ch.stale_since, None
        ch.unjoined_since = None
        ch.rejoin_wait = _REJOIN_GRACE
        if since is not None and ch.announced:
            ch.announced = False
            logger.info(
                "bridge channel %s: back after %.1f s, the mirror of %r is fresh",
                ch.name,
                time.monotonic() - since,
                ch.topic,
            )
            self._notify(ch, False)

    def _clear(self, ch: _Channel) -> int:
        """Empty ``ch``'s mirror, in the Tracker too; the number of presences dropped."""
        dropped = self.tracker.drop_remote(ch.node)
        ch.mirror.clear()
        ch.sources.clear()
        ch.touched.clear()
        ch.resync = True
        return dropped

    def _drop(self, ch: _Channel) -> None:
        dropped = self._clear(ch)
        logger.warning(
            "bridge channel %s: stale for %.0f s, dropped the %d mirrored presences of %r",
            ch.name,
            self.drop_after,
            dropped,
            ch.topic,
        )
        if self.flush:
            self.tracker.flush()

    async def _connect_once(self) -> bool:
        """One connection attempt of the client; whether it is connected now."""
        client = self.client
        # The client's own loop gives up after max_retries and sleeps up to a minute between
        # attempts: the bridge paces its attempts itself, so each call tries exactly once.
        saved = client.max_retries
        client.max_retries = 1
        try:
            await asyncio.wait_for(client.connect(), self.timeout + float(client.timeout))
        except Exception as exc:  # refused, timed out...: try again later
            logger.debug("bridge: reconnecting failed (%s)", type(exc).__name__)
        finally:
            client.max_retries = saved
        return client.is_connected

    def _socket_dead(self, now: float) -> str | None:
        """Why the client's open socket is of no use any more, or None if it may still be.

        Reads the client's private ``_ws_connection`` and ``_listen_task`` (realtime 2.34):
        it has no public way to tell a dead listener or a silent server.
        """
        client = self.client
        ws = getattr(client, "_ws_connection", None)
        listener = getattr(client, "_listen_task", None)
        if ws is None:
            return None
        if isinstance(listener, asyncio.Task) and listener.done():
            return "the client stopped reading its socket"
        if ws is not self._probed:
            self._probed = ws
            self._alive_at = now
        silent = now - self._alive_at
        if silent >= self.heartbeat_timeout:
            return f"the server answered no ping for {silent:.1f} s"
        return None

    async def _watch(self) -> None:
        """Ping the client's socket every third of ``heartbeat_timeout``; `_alive_at` says
        when it last answered.  The client's own heartbeat replies reach no callback (they
        are addressed to no channel), so the bridge cannot listen for those.  A task of its
        own, so that a supervisor round that waits (a connection attempt) is no silence."""
        interval = self.heartbeat_timeout / 3
        while True:
            ws = getattr(self.client, "_ws_connection", None)
            if ws is not None:
                if ws is not self._probed:
                    self._probed = ws
                    self._alive_at = time.monotonic()
                # Closed, or no answer in time: the next round tries again, the supervisor
                # judges.
                with contextlib.suppress(Exception):
                    pong = await asyncio.wait_for(ws.ping(), interval)
                    await asyncio.wait_for(pong, interval)
                    if self._probed is ws:
                        self._alive_at = time.monotonic()
            await asyncio.sleep(interval)

    def _sever(self, why: str) -> None:
        """Drop the client's socket as a network failure would, so the channels rejoin on
        the next one (`close` would leave them looking joined, never to be rejoined)."""
        client = self.client
        ws = client._ws_connection
        logger.warning("bridge: %s, reconnecting", why)
        client._ws_connection = None
        self._probed = None
        for task in (client._listen_task, client._heartbeat_task):
            if task is not None:
                task.cancel()
        client._listen_task = client._heartbeat_task = None
        # CHANNEL_ERROR to each joined channel (the bridge marks it stale), queued to rejoin.
        client._set_channels_errored(ConnectionError(why))
        transport = getattr(ws, "transport", None)
        if transport is not None:
            transport.abort()  # a hung server would hold a polite close for its timeout

    async def _reopen(self, ch: _Channel) -> None:
        """Replace ``ch``'s client channel by a new one (the client lost track of it)."""
        old = ch.channel
        ch.channel = None
        logger.info("bridge channel %s: not joined on a connected socket, rejoining", ch.name)
        if old is not None:
            # Leaving first frees the name: client.channel() would hand the old one back.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.unsubscribe(), self.timeout)
        await self._open(ch)

    async def _supervise(self) -> None:
        while True:
            try:
                pause = await self._supervise_once()
            except Exception:  # the supervisor must outlive anything one round meets
                logger.exception("bridge: supervising the channels failed")
                pause = _RETRY_CAP
            await asyncio.sleep(pause)

    async def _supervise_once(self) -> float:
        """One round of `_supervise` (mark stale, drop, reconnect, rejoin); returns the
        seconds until the next."""
        now = time.monotonic()
        channels = list(self._channels.values())
        connected = self.client.is_connected
        if connected:
            dead = self._socket_dead(now)
            if dead is not None:
                self._sever(dead)
                connected = False
        for ch in channels:
            channel = ch.channel
            if not connected or channel is None or not channel.is_joined:
                self._go_stale(ch)
            elif ch.broken:
                self._guarded(ch, channel, self._mirror, ch)
            since = ch.stale_since
            if since is not None and ch.mirror and now - since >= self.drop_after:
                self._drop(ch)
        if not connected:
            for ch in channels:
                ch.unjoined_since = None
            if await self._connect_once():
                pause = 0.0  # see to the channels at once
            else:
                pause = self._retry_delay * (0.5 + random.random() / 2)
                self._retry_delay = min(self._retry_delay * 2, _RETRY_CAP)
        else:
            if not self.stale:
                # Only a full recovery resets the backoff: a server that accepts sockets and
                # drops them at once is not retried in a tight loop.
                self._retry_delay = _RETRY_FIRST
            for ch in channels:
                if ch.stale_since is None:
                    continue
                if ch.unjoined_since is None:
                    ch.unjoined_since = now
                elif now - ch.unjoined_since >= ch.rejoin_wait:
                    ch.unjoined_since = now
                    ch.rejoin_wait = min(ch.rejoin_wait * 2, _REJOIN_CAP)
                    await self._reopen(ch)
            pause = _POLL
        # Wake in time to drop a mirror that reaches drop_after.
        for ch in channels:
            if ch.stale_since is not None and ch.mirror:
                due = ch.stale_since + self.drop_after - time.monotonic()
                pause = min(pause, max(due, 0.0))
        return pause

    # -- in: the mirror -------------------------------------------------------------------

    def _signature(self, ch: _Channel, bridge_id: str, keys: object) -> str | None:
        assert self._secret is not None
        try:
            body = orjson.dumps(
                [_SIGNED_DOMAIN, ch.name, bridge_id, keys], option=orjson.OPT_SORT_KEYS
            )
        except (orjson.JSONEncodeError, TypeError):
            return None
        return hmac.new(self._secret.key, body, hashlib.sha256).hexdigest()

    def _signed(self, ch: _Channel, meta: Mapping[str, Any]) -> bool:
        """Whether bridge meta ``meta`` carries a valid signature under this bridge's secret."""
        owner, sig = meta.get(BRIDGE_FIELD), meta.get(SIGNATURE_FIELD)
        if self._secret is None or not isinstance(owner, str) or not isinstance(sig, str):
            return False
        want = self._signature(ch, owner, meta.get("keys"))
        if want is None:
            return False
        try:
            return hmac.compare_digest(sig.encode(), want.encode())
        except UnicodeEncodeError:  # a lone surrogate
            return False

    def _guarded(
        self,
        ch: _Channel,
        channel: AsyncRealtimeChannel,
        callback: Callable[..., object],
        *args: Any,
    ) -> None:
        """Run ``callback(*args)`` for an event of ``channel``.

        The client runs its callbacks in the task that reads the socket, outside any ``try``:
        an exception escaping here would end that task and leave the socket open but unread
        for good, the bridge deaf while its channels still look joined.
        """
        if ch.channel is not channel:
            return
        try:
            callback(*args)
        except Exception as exc:
            self._failed(ch, exc)

    def _failed(self, ch: _Channel, exc: Exception) -> None:
        ch.broken = True
        ch.resync = True
        ch.failures += 1
        with contextlib.suppress(Exception):  # a failing on_stale or log handler, again
            self._go_stale(ch)
        with contextlib.suppress(Exception):
            now = time.monotonic()
            if now - ch.failures_logged_at >= _FAILURE_LOG_EVERY:
                # The type and the place only: the message may quote a member's meta.
                where = traceback.extract_tb(exc.__traceback__)[-1]
                logger.error(
                    "bridge channel %s: %s at %s:%s (%d in the last %.0f s), rebuilding the "
                    "mirror of %r",
                    ch.name,
                    type(exc).__name__,
                    where.name,
                    where.lineno,
                    ch.failures,
                    _FAILURE_LOG_EVERY,
                    ch.topic,
                )
                ch.failures = 0
                ch.failures_logged_at = now

    def _wanted(
        self, ch: _Channel, key: str, metas: Iterable[Mapping[str, Any]]
    ) -> dict[_Id, tuple[str, Any]]:
        """What channel key ``key`` holding ``metas`` mirrors, by an id stable across syncs
        and unique in the channel: ``{id: (key, meta)}``; a signed meta of another bridge
        mirrors the presences it lists."""
        wanted: dict[_Id, tuple[str, Any]] = {}
        seen: dict[_Id, int] = {}

        def want(base: _Id, item: tuple[str, Any]) -> None:
            # A member sets its own presence_ref: the same one twice in a key is two presences.
            n = seen.get(base, 0)
            seen[base] = n + 1
            wanted[(key, *base, n)] = item

        for i, raw in enumerate(metas):
            meta = _strip(raw)
            pid = raw.get("presence_ref")
            if not isinstance(pid, str) or not pid:
                pid = f"#{i}"
            owner = meta.get(BRIDGE_FIELD)
            if owner is None:
                want(("m", pid), (key, meta))
                continue
            signed = self._signed(ch, meta)
            if owner == self.bridge_id and key == self.key:
                if signed or self._secret is None:
                    continue  # our own presence, back through the channel
            elif signed and owner != self.bridge_id:
                listed = meta.get("keys")
                if isinstance(listed, dict):
                    for k, ms in listed.items():
                        if isinstance(ms, list):
                            for j, m in enumerate(ms):
                                if isinstance(m, dict):
                                    want(("l", pid, str(k), j), (str(k), _strip(m)))
                    continue
            # Not provably a bridge's: the one presence it is (its listed users are data).
            want(("m", pid), (key, meta))
        return wanted

    def _mirror(self, ch: _Channel) -> None:
        """Bring the mirror of the keys touched since the last sync (of every key, after a
        join) up to the channel's presence now (a sync callback of ``ch.channel``)."""
        channel = ch.channel
        if not self._started or channel is None:
            return
        full = ch.resync and channel.is_joined
        if ch.broken:
            if not full:
                return
            # Whatever the failed sync left half done, the Tracker forgets all of it.
            ch.broken = False
            self._clear(ch)
        elif not full and not ch.touched:
            return
        state = channel.presence_state()
        touched, ch.touched = ch.touched, set()
        if full:
            ch.resync = False
            touched.update(state)
            touched.update(ch.sources)
        self._apply(ch, state, touched)
        if full:
            ch.synced.set()
            self._go_fresh(ch)

    def _apply(self, ch: _Channel, state: Mapping[str, Any], touched: Iterable[str]) -> None:
        mirror, sources = ch.mirror, ch.sources
        leaves: list[bytes] = []
        joins: list[tuple[str, bytes, bytes | None]] = []
        pending: list[tuple[str, _Id, bytes, str, dict[str, Any]]] = []
        unencodable = 0
        for source in touched:
            wanted = self._wanted(ch, source, state.get(source, ()))
            had = sources.get(source)
            if had:
                for pid in list(had):
                    _, key, meta = mirror[pid]
                    if wanted.get(pid) != (key, meta):
                        leaves.append(mirror.pop(pid)[0])
                        had.discard(pid)
                if not had:
                    del sources[source]
            for pid, (key, meta) in wanted.items():
                if pid in mirror:
                    continue
                ref = f"{ch.node}.{ch.next_ref + 1:x}".encode()
                # The ref comes first and is ours: metas are stripped of refs, never trusted.
                try:
                    data = orjson.dumps({"phx_ref": ref.decode()} | meta)
                except (TypeError, ValueError):
                    # A value JSON from another client may hold but orjson cannot write (an
                    # integer beyond 64 bits): that meta only stays out, tried again when its
                    # key changes.
                    unencodable += 1
                    continue
                ch.next_ref += 1
                joins.append((key, data, None))
                pending.append((source, pid, ref, key, meta))
        if unencodable:
            self._skip(ch, unencodable, "a value JSON cannot encode")
        if not joins and not leaves:
            return
        tracker = self.tracker
        try:
            tracker.apply_remote(ch.topic, joins, leaves)
            accepted = pending
        except PresenceError:
            # One presence the Tracker refuses (a key too long, '__proto__'...) must not
            # keep the rest out: apply one by one and skip the refused (it is tried again
            # when its key changes).
            accepted = []
            tracker.apply_remote(ch.topic, (), leaves)
            for item, join in zip(pending, joins, strict=True):
                try:
                    tracker.apply_remote(ch.topic, (join,))
                except PresenceError:
                    self._skip(ch, 1, "the Tracker refused it")
                    continue
                accepted.append(item)
        for source, pid, ref, key, meta in accepted:
            mirror[pid] = (ref, key, meta)
            sources.setdefault(source, set()).add(pid)
        if self.flush:
            tracker.flush()

    def _skip(self, ch: _Channel, count: int, why: str) -> None:
        self.skipped += count
        now = time.monotonic()
        if now - self._skips_logged_at >= _FAILURE_LOG_EVERY:
            self._skips_logged_at = now
            # Neither key nor meta: both are a member's to choose.
            logger.warning(
                "bridge channel %s: not mirroring %d meta(s): %s (%d skipped in all)",
                ch.name,
                count,
                why,
                self.skipped,
            )

    # -- out: the published presence ------------------------------------------------------

    def _on_feed(self, batch: Sequence[TopicChanges]) -> None:
        channels = self._channels
        for changes in batch:
            ch = channels.get(changes.topic)
            if ch is None:
                continue
            # Only local presences (conn not None) are published: the mirror never echoes.
            if any(p[3] is not None for p in changes.joins) or any(
                p[3] is not None for p in changes.leaves
            ):
                ch.dirty.set()

    def _local_meta(self, ch: _Channel) -> dict[str, Any] | None:
        keys: dict[str, list[Any]] = {}
        for _, key, data, _ in self.tracker.presences(ch.topic):
            meta = orjson.loads(data)
            for field in ("phx_ref", "phx_ref_prev"):
                meta.pop(field, None)
            keys.setdefault(key, []).append(meta)
        if not keys:
            return None
        keys = dict(sorted(keys.items()))
        meta = {BRIDGE_FIELD: self.bridge_id, "keys": keys}
        if self._secret is not None:
            meta[SIGNATURE_FIELD] = self._signature(ch, self.bridge_id, keys)
        return meta

    async def _publish_loop(self, ch: _Channel) -> None:
        while True:
            await ch.dirty.wait()
            ch.dirty.clear()
            channel = ch.channel
            if channel is None or not channel.is_joined:
                continue  # the SUBSCRIBED of the next join sets dirty again
            meta = self._local_meta(ch)
            if meta == ch.published:
                continue
            try:
                if meta is None:
                    await channel.untrack()
                else:
                    await channel.track(meta)
            except Exception as exc:  # a socket that just dropped: the rejoin re-tracks
                logger.warning("bridge %s: publishing failed: %s", ch.name, exc)
                continue
            ch.published = meta
