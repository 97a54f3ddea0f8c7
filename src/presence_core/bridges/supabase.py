"""Attach a `Tracker` to Supabase Realtime channels through Supabase's Python client.

`SupabaseBridge` joins one channel per bridged topic on an ``AsyncRealtimeClient`` and moves
presence both ways:

* **In (the mirror).**  Every presence in the channel is mirrored into the Tracker as a *remote*
  presence (`Tracker.apply_remote`), so `Tracker.list`, `count`, `user`, diffs, metrics and a
  Redis store's peers see it like presence the Tracker holds.  The mirror is incremental: the
  client reports each key whose presences changed (its join and leave callbacks, which it also
  calls for every difference a full ``presence_state`` brings), and at the presence sync that
  follows the bridge re-reads those keys only, so a diff costs the keys it touched, whatever
  the size of the channel.  A resync after a reconnect thus replaces the mirrored set: whoever
  is no longer in the channel leaves, whoever joined while the socket was down joins.  While
  the socket is down the mirror keeps the last state the client knew.  Each
  channel's mirrored presences belong to their own node, `SupabaseBridge.node_of`
  (``sb-<16 hex>``), so `Tracker.remote_nodes` tells them apart and `stop` drops them.
* **Out (the published presence).**  A channel holds one presence per client socket, so the
  bridge publishes exactly one: under the presence key ``key`` (default
  ``presence-core-<tracker node>``), the meta ``{"presence_core_bridge": <bridge id>, "keys":
  {key: [meta, ...]}}`` listing every *local* presence the Tracker holds in that topic, metas
  without their refs.  A local join, leave or update re-tracks it (``channel.track``, an
  update on the channel); when the topic has no local presence left, the bridge untracks.
  After every (re)join of the channel (the client's ``SUBSCRIBED`` state, which it reports
  again after a reconnect) the bridge tracks again, because the server forgot it.
* **No echo.**  Only local presences are published (remote ones, including the mirror, are
  never sent back), and a meta carrying this bridge's id is never mirrored.  A meta from
  *another* bridge is mirrored as the presences it lists (each ``keys`` entry a presence under
  its own key), so two bridged Trackers on one channel see each other's users, not each
  other's bridges.

The bridge sees local changes through a feed reader (`Tracker.add_feed_reader`), so local
presence is published after a `Tracker.flush` (which ``presence-core serve`` runs on its own).
It flushes the Tracker itself after each mirror change, unless ``flush=False``.  Everything runs
on the event loop of `start`: call the Tracker from that loop's thread.

The bridge does not own the client: `stop` leaves its channels but does not close the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import PresenceError, PresenceTypeError, PresenceValueError

if TYPE_CHECKING:
    from types import TracebackType

    from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

    from ..tracker import Tracker
    from ..tracker.feed import TopicChanges

__all__ = ["BRIDGE_FIELD", "BridgeError", "SupabaseBridge"]

logger = logging.getLogger(__name__)

BRIDGE_FIELD = "presence_core_bridge"
"""The meta field that marks a presence published by a bridge (its value: the bridge id)."""

_DROPPED_FIELDS = frozenset(("presence_ref", "phx_ref", "phx_ref_prev"))


class BridgeError(PresenceError):
    """The bridge could not join a channel, or was used in the wrong state."""


class _Channel:
    """One bridged topic: its channel, its mirror and its published meta."""

    __slots__ = (
        "channel",
        "dirty",
        "mirror",
        "name",
        "next_ref",
        "node",
        "published",
        "publisher",
        "sources",
        "topic",
        "touched",
    )

    def __init__(self, name: str, topic: str, node: str) -> None:
        self.name = name  # the channel name given to client.channel()
        self.topic = topic  # the Tracker topic
        self.node = node
        self.channel: AsyncRealtimeChannel | None = None
        # channel presence id -> (ref in the Tracker, key, meta)
        self.mirror: dict[str, tuple[bytes, str, dict[str, Any]]] = {}
        # channel presence key -> the ids mirrored from it (one per meta, or per listed
        # presence of another bridge)
        self.sources: dict[str, set[str]] = {}
        self.touched: set[str] = set()  # channel keys changed since the last sync
        self.next_ref = 0
        self.published: dict[str, Any] | None = None  # what the channel holds from us
        self.dirty = asyncio.Event()
        self.publisher: asyncio.Task[None] | None = None


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise PresenceTypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise PresenceValueError(f"{what} must not be empty")
    return name


class SupabaseBridge:
    """Mirror Supabase Realtime channels into ``tracker`` and publish its local presence there.

    Args:
        tracker: The Tracker to attach.
        client: A Supabase ``realtime.AsyncRealtimeClient`` (connected or not; the bridge
            connects it if needed).  Keep ``auto_reconnect`` on for the bridge to follow
            reconnects.
        topics: The channels to bridge, by the name given to ``client.channel`` (``"room"``
            joins ``realtime:room``), each mirrored into the Tracker topic of the same name;
            or a mapping ``{channel name: Tracker topic}``.
        key: The presence key the bridge publishes under (default
            ``presence-core-<tracker.node>``).
        bridge_id: Marks the bridge's published meta so it is never mirrored back (default:
            16 random hex characters; give each bridge its own).
        private: Join the channels as private channels.
        flush: Flush the Tracker after each mirror change, so subscribers get it at once.
        timeout: Seconds `start` waits for each channel's join.

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
        self._started = False

    # -- public ---------------------------------------------------------------------------

    def node_of(self, topic: str) -> str:
        """The Tracker node that owns the presences mirrored from ``topic``'s channel."""
        digest = hashlib.blake2b(f"{self.bridge_id}\0{topic}".encode(), digest_size=8)
        return "sb-" + digest.hexdigest()

    @property
    def topics(self) -> list[str]:
        """The bridged Tracker topics."""
        return list(self._channels)

    def channel(self, topic: str) -> AsyncRealtimeChannel | None:
        """The client channel bridged to Tracker topic ``topic`` (None before `start`)."""
        return self._channels[topic].channel

    async def start(self) -> None:
        """Join every channel, mirror its presence and publish the local presence.

        Raises:
            BridgeError: already started, or a channel's join was refused or timed out (the
                bridge is stopped again then).
        """
        if self._started:
            raise BridgeError("the bridge is already started")
        self._started = True
        self._remove_reader = self.tracker.add_feed_reader(self._on_feed)
        try:
            for ch in self._channels.values():
                await self._join(ch)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Leave the channels (untracking the published presence) and drop the mirror.

        Idempotent.  The client stays open: it belongs to the caller.
        """
        if not self._started:
            return
        self._started = False
        if self._remove_reader is not None:
            self._remove_reader()
            self._remove_reader = None
        for ch in self._channels.values():
            task, ch.publisher = ch.publisher, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            channel, ch.channel = ch.channel, None
            if channel is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.client.remove_channel(channel), self.timeout)
            ch.published = None
            ch.mirror.clear()
            ch.sources.clear()
            ch.touched.clear()
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
        return f"<SupabaseBridge {self.bridge_id} topics={self.topics!r} started={self._started}>"

    # -- joining --------------------------------------------------------------------------

    async def _join(self, ch: _Channel) -> None:
        params: Any = {
            "config": {
                "broadcast": {"ack": False, "self": False},
                "presence": {"key": self.key, "enabled": True},
                "private": self.private,
            }
        }
        channel = self.client.channel(ch.name, params)
        ch.channel = channel
        channel.on_presence_join(lambda key, *_: ch.touched.add(key))
        channel.on_presence_leave(lambda key, *_: ch.touched.add(key))
        channel.on_presence_sync(lambda: self._mirror(ch))

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            self._on_subscribe_state(ch, state, error)

        ch.publisher = asyncio.get_running_loop().create_task(self._publish_loop(ch))
        try:
            await asyncio.wait_for(channel.subscribe(on_state), self.timeout)
        except TimeoutError as exc:
            raise BridgeError(f"joining {channel.topic} timed out") from exc
        if not channel.is_joined:
            raise BridgeError(f"the server did not let the bridge join {channel.topic}")

    def _on_subscribe_state(
        self, ch: _Channel, state: RealtimeSubscribeStates, error: Exception | None
    ) -> None:
        if state == "SUBSCRIBED":
            # A (re)join: the server holds nothing of ours on this channel any more.
            ch.published = None
            ch.dirty.set()
        else:
            logger.info("bridge channel %s: %s (%s)", ch.name, state, error)
            ch.published = None

    # -- in: the mirror -------------------------------------------------------------------

    def _wanted(self, key: str, metas: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, Any]]:
        """What channel key ``key`` holding ``metas`` mirrors, by a stable id: ``{id: (key,
        meta)}``; a key of another bridge mirrors the presences it lists."""
        wanted: dict[str, tuple[str, Any]] = {}
        for i, raw in enumerate(metas):
            meta = {k: v for k, v in raw.items() if k not in _DROPPED_FIELDS}
            pid = str(raw.get("presence_ref") or f"{key}#{i}")
            owner = meta.get(BRIDGE_FIELD)
            if owner is None:
                wanted[pid] = (key, meta)
            elif owner != self.bridge_id:
                listed = meta.get("keys")
                if isinstance(listed, dict):
                    for k, ms in listed.items():
                        if isinstance(ms, list):
                            for j, m in enumerate(ms):
                                if isinstance(m, dict):
                                    wanted[f"{pid}/{j}/{k}"] = (str(k), m)
        return wanted

    def _mirror(self, ch: _Channel) -> None:
        """Bring the mirror of the keys touched since the last sync up to the channel's
        presence now (a sync callback)."""
        channel = ch.channel
        if not self._started or channel is None or not ch.touched:
            return
        touched, ch.touched = ch.touched, set()
        state = channel.presence_state()
        mirror, sources = ch.mirror, ch.sources
        leaves: list[bytes] = []
        joins: list[tuple[str, bytes, bytes | None]] = []
        pending: list[tuple[str, str, bytes, str, dict[str, Any]]] = []
        for source in touched:
            wanted = self._wanted(source, state.get(source, ()))
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
                ch.next_ref += 1
                ref = f"{ch.node}.{ch.next_ref:x}".encode()
                data = orjson.dumps({"phx_ref": ref.decode(), **meta})
                joins.append((key, data, None))
                pending.append((source, pid, ref, key, meta))
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
                except PresenceError as exc:
                    logger.warning("bridge %s: not mirroring %r: %s", ch.name, item[3], exc)
                    continue
                accepted.append(item)
        for source, pid, ref, key, meta in accepted:
            mirror[pid] = (ref, key, meta)
            sources.setdefault(source, set()).add(pid)
        if self.flush:
            tracker.flush()

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
        return {BRIDGE_FIELD: self.bridge_id, "keys": dict(sorted(keys.items()))}

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
