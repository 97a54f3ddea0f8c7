"""A Phoenix/Supabase Realtime-compatible WebSocket server in front of a Tracker.

`PresenceServer` speaks the Phoenix channel protocol that phoenix.js, Supabase's realtime-js
and Supabase's Python client (``realtime``) use, unmodified: v1 (JSON objects, the Python
client) and v2 (JSON arrays, the JS clients, plus realtime-js's binary broadcast pushes).  It
serves WebSockets at any path ending in ``/websocket`` and, on the same port, ``GET /health``
and ``GET /metrics``.

The data path: a frame from a client becomes a Tracker call (`track`, `untrack`,
`heartbeat`...); every ``tick`` (10 ms) the Tracker expires silent connections and flushes;
each topic's diff reaches this server once, as the Tracker's JSON bytes, and is written to
every member of the topic with `websockets.broadcast`: the frame is built once per protocol
version, never decoded or re-encoded per subscriber.

Protocol notes (checked against the three clients):

* A join is answered ``ok`` with ``{"postgres_changes": []}`` under the join's ref, then (when
  presence is on) a ``presence_state``, even an empty one: without it both JS clients buffer
  every diff forever.  A second join of the same topic closes the first with ``phx_close``
  under the old join_ref.
* Track and untrack come as ``presence`` events, with or without ``"type"``; one meta per
  socket per topic, so a track again is an update (one diff).  The reply is ``ok {}``.
* ``presence_diff`` frames always have ``joins`` and ``leaves`` and null refs.
* Broadcasts go to the topic's members (the sender only with ``self``); with ``ack`` the push
  is answered ``ok``.  They are relayed as text frames, which every client reads.
* Errors that end a channel (limits, refused topics) are a ``system`` message, then
  ``phx_close``; the socket stays.  Clients are sent away with close code 1011 (they come
  back), never 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import logging
import math
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..errors import PresenceError, ProtocolError, QuotaExceeded, RateLimited
from ..limits import Limits, admit
from ..metrics import Metrics
from ..phoenix import (
    EVENT_CLOSE,
    EVENT_HEARTBEAT,
    EVENT_JOIN,
    EVENT_LEAVE,
    EVENT_PRESENCE,
    EVENT_REPLY,
    PHOENIX_TOPIC,
    Message,
    decode,
    encode,
    parse_client_presence,
    presence_key_from_join,
)
from ..tracker import Tracker
from .config import AuthHook, Refused, ServerLimits

__all__ = ["PresenceServer"]

logger = logging.getLogger("presence_core.server")
audit = logging.getLogger("presence_core.audit")

Version = Literal[1, 2]

_dumps = orjson.dumps
_TICK = 0.01  # seconds between two Tracker ticks (expiry and flush)


def _audit(event: str, **fields: Any) -> None:
    """One audit record: connection and topic ids, never meta contents."""
    audit.info(event, extra={"audit": {"event": event, **fields}})


@dataclass(slots=True)
class _Channel:
    join_ref: str | None
    key: str
    presence: bool
    self_broadcast: bool
    ack_broadcast: bool


@dataclass(slots=True)
class _Client:
    id: int
    ws: ServerConnection
    version: Version
    token: str | None
    channels: dict[str, _Channel] = field(default_factory=dict)
    joins_tat: float = -math.inf  # token buckets (`limits.admit`): theoretical arrival times
    broadcasts_tat: float = -math.inf


def _flag(value: object, default: bool) -> bool:
    """A join config boolean, which clients may send as a string."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


class PresenceServer:
    """Serve a Tracker over WebSockets in the Phoenix/Supabase protocol.

    Args:
        tracker: The presence state; attach a `RedisStore` to it to share presence.
        host, port: Where to listen (port 0: any free port; see `port` once started).
        limits: Per-connection limits (see `ServerLimits`).
        auth: Called with the client's token and each topic it joins (see `AuthHook`).

    ``async with PresenceServer(...) as server`` starts it and stops it: on stop, every
    client is sent away (close 1001) and its presences leave.
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        host: str = "127.0.0.1",
        port: int = 4000,
        limits: ServerLimits | None = None,
        auth: AuthHook | None = None,
    ) -> None:
        self.tracker = tracker
        self.host = host
        self.port = port
        self.limits = limits if limits is not None else ServerLimits()
        self.auth = auth
        # The project's token bucket, a second's worth of burst (see `ServerLimits`).
        joins, casts = self.limits.joins_per_second, self.limits.broadcasts_per_second
        self._join_rate = Limits(rate_per_second=joins, burst=max(1, round(joins)))
        self._broadcast_rate = Limits(rate_per_second=casts, burst=max(1, round(casts)))
        self._clients: dict[int, _Client] = {}
        self._members: dict[str, dict[int, _Client]] = {}  # topic -> members
        self._unsubscribe: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._accepting = False
        self._closing: set[asyncio.Future[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=self.limits.max_frame_bytes,
            compression=None,
            ping_interval=20.0,
            ping_timeout=20.0,
        )
        for sock in self._server.sockets:  # port 0: the port it got
            self.port = sock.getsockname()[1]
            break
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="presence-tick")
        self._accepting = True
        _audit(
            "server_started",
            host=self.host,
            port=self.port,
            node=self.tracker.node,
            limits={k: getattr(self.limits, k) for k in self.limits.__slots__},
        )

    async def stop(self) -> None:
        """Send every client away and remove their presences (they leave for everyone)."""
        self._accepting = False
        server = self._server
        if server is not None:
            server.close(close_connections=False)
        clients = list(self._clients.values())
        for client in clients:
            self._drop(client)  # presences leave now, whatever the closing handshakes do
        closing = [client.ws.close(1001, "server stopping") for client in clients]
        if closing:
            # All at once, and bounded: 20,000 sequential closing handshakes would take long.
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=5.0)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self.tracker.flush()
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> PresenceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to (``ws://host:port/socket/websocket``)."""
        return f"ws://{self.host}:{self.port}/socket/websocket"

    @property
    def connections(self) -> int:
        return len(self._clients)

    async def _tick(self) -> None:
        tracker = self.tracker
        while True:
            await asyncio.sleep(_TICK)
            try:
                expired = tracker.tick()
            except Exception:  # pragma: no cover - tick logs hook failures itself
                logger.exception("tracker tick failed")
                continue
            for conn in expired:
                client = self._clients.get(conn)  # type: ignore[arg-type]
                if client is not None:
                    _audit("disconnected", conn=client.id, reason="silent past its ttl")
                    self._drop(client)
                    task = asyncio.ensure_future(client.ws.close(1011, "no heartbeat"))
                    self._closing.add(task)  # a task nobody holds may be collected mid-way
                    task.add_done_callback(self._closing.discard)

    # -- HTTP: health, metrics, and who may open a WebSocket ---------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/health":
            status = http.HTTPStatus.OK if self._accepting else http.HTTPStatus.SERVICE_UNAVAILABLE
            body = {
                "status": "ok" if self._accepting else "starting",
                "node": self.tracker.node,
                "connections": len(self._clients),
                "presences": self.tracker.totals().presences,
            }
            return _response(status, _dumps(body), "application/json")
        if path == "/metrics":
            metrics = self.tracker.metrics
            if not isinstance(metrics, Metrics):
                return _response(http.HTTPStatus.NOT_FOUND, b"metrics go to a custom sink\n")
            self.tracker.sync_metrics()
            return _response(
                http.HTTPStatus.OK, metrics.to_prometheus(), "text/plain; version=0.0.4"
            )
        if not path.endswith("/websocket"):
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        if len(self._clients) >= self.limits.max_connections:
            _audit("limit_hit", limit="max_connections", value=self.limits.max_connections)
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n")
        return None

    # -- one WebSocket -----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        vsn = (query.get("vsn") or ["1.0.0"])[0]
        version: Version = 2 if vsn.startswith("2") else 1
        tokens = query.get("apikey") or query.get("token")
        token = tokens[0] if tokens else None
        client = _Client(next(self._ids), ws, version, token)
        if self.auth is not None and not await self._allowed(token, None):
            _audit("token_refused", conn=client.id)
            await ws.close(1008, "unauthorized")
            return
        self._clients[client.id] = client
        self.tracker.connect(client.id)
        try:
            async for frame in ws:
                self.tracker.heartbeat(client.id)
                try:
                    await self._frame(client, frame)
                except (ProtocolError, ValueError, TypeError) as exc:
                    # A malformed frame harms nobody: it is logged and dropped.
                    logger.debug("connection %d sent a bad frame: %s", client.id, exc)
        except ConnectionClosed:
            pass
        finally:
            self._drop(client)

    async def _allowed(self, token: str | None, topic: str | None) -> bool:
        assert self.auth is not None
        try:
            verdict = self.auth(token, topic)
            if isinstance(verdict, Awaitable):
                verdict = await verdict
            return bool(verdict)
        except Refused:
            return False

    def _drop(self, client: _Client) -> None:
        if self._clients.pop(client.id, None) is None:
            return
        for topic in list(client.channels):
            self._leave_members(client, topic)
        self.tracker.disconnect(client.id)

    # -- frames --------------------------------------------------------------------------------

    async def _frame(self, client: _Client, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            await self._binary_broadcast(client, frame)
            return
        msg = decode(frame, client.version)
        if msg.topic == PHOENIX_TOPIC:
            if msg.event == EVENT_HEARTBEAT:
                await self._reply(client, msg, "ok", {})
            return
        event = msg.event
        if event == EVENT_JOIN:
            await self._join(client, msg)
        elif msg.topic not in client.channels:
            # Not joined: the clients expect the channel closed (phx_close) on a stray push.
            await self._reply(client, msg, "error", {"reason": "unmatched topic"})
        elif event == EVENT_PRESENCE:
            await self._presence(client, msg)
        elif event == "broadcast":
            payload = msg.payload if isinstance(msg.payload, dict) else {}
            await self._broadcast(client, msg, payload)
        elif event == EVENT_LEAVE:
            await self._reply(client, msg, "ok", {})
            self._leave_members(client, msg.topic)
            self.tracker.untrack(client.id, msg.topic)
            await self._send(client, Message(msg.topic, EVENT_CLOSE, {}, msg.ref, msg.join_ref))
        elif event == "access_token":
            payload = msg.payload if isinstance(msg.payload, dict) else {}
            token = payload.get("access_token")
            client.token = token if isinstance(token, str) else client.token
            await self._reply(client, msg, "ok", {})
        else:
            await self._reply(client, msg, "ok", {})

    async def _join(self, client: _Client, msg: Message) -> None:
        topic = msg.topic
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
        assert config is not None
        try:
            client.joins_tat = admit(self._join_rate, client.joins_tat, time.monotonic(), client.id)
        except RateLimited:
            _audit("limit_hit", conn=client.id, topic=topic, limit="joins_per_second")
            await self._reply(client, msg, "error", {"reason": "join rate limit exceeded"})
            return
        old = client.channels.get(topic)
        if old is None and len(client.channels) >= self.limits.max_topics_per_connection:
            _audit("limit_hit", conn=client.id, topic=topic, limit="max_topics_per_connection")
            await self._reply(
                client, msg, "error", {"reason": "ChannelRateLimitReached: Too many channels"}
            )
            return
        if self.auth is not None:
            token = payload.get("access_token")
            token = token if isinstance(token, str) else client.token
            if not await self._allowed(token, topic):
                _audit("token_refused", conn=client.id, topic=topic)
                await self._reply(client, msg, "error", {"reason": "Unauthorized"})
                return
        presence_cfg = config.get("presence") if isinstance(config.get("presence"), dict) else {}
        broadcast_cfg = config.get("broadcast") if isinstance(config.get("broadcast"), dict) else {}
        assert presence_cfg is not None and broadcast_cfg is not None
        key = presence_key_from_join(payload) or secrets.token_hex(8)
        if old is not None:
            # A second join of a joined topic replaces the first: close it under its join_ref.
            await self._send(client, Message(topic, EVENT_CLOSE, {}, old.join_ref, old.join_ref))
            self._leave_members(client, topic)
            self.tracker.untrack(client.id, topic)
        channel = _Channel(
            join_ref=msg.join_ref if msg.join_ref is not None else msg.ref,
            key=key,
            presence=_flag(presence_cfg.get("enabled"), True),
            self_broadcast=_flag(broadcast_cfg.get("self"), False),
            ack_broadcast=_flag(broadcast_cfg.get("ack"), False),
        )
        client.channels[topic] = channel
        members = self._members.get(topic)
        if members is None:
            members = self._members[topic] = {}
            self._unsubscribe[topic] = self.tracker.subscribe(
                topic, self._fan_out, send_state=False, raw=True
            )
        members[client.id] = client
        # The join's reply carries the join's ref as both ref and join_ref.
        join = Message(topic, msg.event, None, msg.ref, channel.join_ref)
        await self._reply(client, join, "ok", {"postgres_changes": []})
        if channel.presence:
            state = self.tracker.initial_state_json(topic)
            await self._send_raw(client, topic, "presence_state", state, channel.join_ref)

    def _leave_members(self, client: _Client, topic: str) -> None:
        client.channels.pop(topic, None)
        members = self._members.get(topic)
        if members is None:
            return
        members.pop(client.id, None)
        if not members:
            del self._members[topic]
            unsubscribe = self._unsubscribe.pop(topic, None)
            if unsubscribe is not None:
                unsubscribe()

    async def _presence(self, client: _Client, msg: Message) -> None:
        channel = client.channels[msg.topic]
        action = parse_client_presence(msg)
        try:
            if action.kind == "track":
                self.tracker.track(client.id, msg.topic, channel.key, action.meta)
            else:
                self.tracker.untrack(client.id, msg.topic)
        except (QuotaExceeded, RateLimited) as exc:
            _audit("limit_hit", conn=client.id, topic=msg.topic, limit=type(exc).__name__)
            await self._close_channel(client, msg, "Client presence rate limit exceeded")
            return
        except PresenceError as exc:
            await self._reply(client, msg, "error", {"reason": str(exc)})
            return
        await self._reply(client, msg, "ok", {})

    async def _broadcast(self, client: _Client, msg: Message, payload: dict[str, Any]) -> None:
        channel = client.channels[msg.topic]
        try:
            client.broadcasts_tat = admit(
                self._broadcast_rate, client.broadcasts_tat, time.monotonic(), client.id
            )
        except RateLimited:
            _audit("limit_hit", conn=client.id, topic=msg.topic, limit="broadcasts_per_second")
            await self._reply(client, msg, "error", {"reason": "broadcast rate limit exceeded"})
            return
        body = {
            "type": "broadcast",
            "event": payload.get("event"),
            "payload": payload.get("payload"),
        }
        raw = _dumps(body)
        members = self._members.get(msg.topic, {})
        targets = [m for m in members.values() if m is not client or channel.self_broadcast]
        self._write(msg.topic, "broadcast", raw, targets)
        if channel.ack_broadcast:
            await self._reply(client, msg, "ok", {})

    async def _binary_broadcast(self, client: _Client, data: bytes) -> None:
        """realtime-js v2's user broadcast push (kind 3), relayed as a text broadcast."""
        if len(data) < 7 or data[0] != 3:
            raise ProtocolError("unknown binary frame")
        sizes = data[1:6]
        encoding = data[6]
        at = 7
        parts = []
        for size in sizes:
            parts.append(data[at : at + size].decode("utf-8"))
            at += size
        join_ref, ref, topic, event, _metadata = parts
        body = data[at:]
        payload = orjson.loads(body) if encoding == 1 else list(body)
        msg = Message(topic, "broadcast", None, ref or None, join_ref or None)
        if topic not in client.channels:
            await self._reply(client, msg, "error", {"reason": "unmatched topic"})
            return
        await self._broadcast(client, msg, {"event": event, "payload": payload})

    async def _close_channel(self, client: _Client, msg: Message, reason: str) -> None:
        """End one channel the way Supabase does: a ``system`` error, then ``phx_close``."""
        topic = msg.topic
        system = {"message": reason, "status": "error", "extension": "system", "channel": topic}
        await self._send(client, Message(topic, "system", system, None, msg.join_ref))
        join_ref = client.channels[topic].join_ref if topic in client.channels else msg.join_ref
        self._leave_members(client, topic)
        self.tracker.untrack(client.id, topic)
        await self._send(client, Message(topic, EVENT_CLOSE, {}, join_ref, join_ref))

    # -- writing -------------------------------------------------------------------------------

    async def _reply(self, client: _Client, msg: Message, status: str, response: Any) -> None:
        payload = {"status": status, "response": response}
        await self._send(client, Message(msg.topic, EVENT_REPLY, payload, msg.ref, msg.join_ref))

    async def _send(self, client: _Client, msg: Message) -> None:
        with contextlib.suppress(ConnectionClosed):
            await client.ws.send(encode(msg, client.version).decode("utf-8"))

    async def _send_raw(
        self, client: _Client, topic: str, event: str, raw: bytes, join_ref: str | None
    ) -> None:
        with contextlib.suppress(ConnectionClosed):
            await client.ws.send(_frame(client.version, topic, event, raw, join_ref))

    def _fan_out(self, topic: str, event: str, payload: Any) -> None:
        """The Tracker's raw hook: one diff, as JSON bytes, to every member of the topic."""
        members = self._members.get(topic)
        if members:
            targets = [m for m in members.values() if m.channels[topic].presence]
            self._write(topic, event, payload, targets)

    def _write(self, topic: str, event: str, raw: bytes, targets: list[_Client]) -> None:
        """Write one event to many clients, the frame built once per protocol version."""
        v1 = [c.ws for c in targets if c.version == 1]
        v2 = [c.ws for c in targets if c.version == 2]
        if v1:
            broadcast(v1, _frame(1, topic, event, raw, None))
        if v2:
            broadcast(v2, _frame(2, topic, event, raw, None))


def _frame(version: Version, topic: str, event: str, raw: bytes, join_ref: str | None) -> str:
    """A server push as text, around a payload already encoded as JSON."""
    if version == 2:
        head = [b"[", _dumps(join_ref), b",null,", _dumps(topic), b",", _dumps(event), b","]
        return (b"".join(head) + raw + b"]").decode("utf-8")
    head = [b'{"ref":null,"topic":', _dumps(topic), b',"event":', _dumps(event), b',"payload":']
    return (b"".join(head) + raw + b"}").decode("utf-8")


def _response(status: http.HTTPStatus, body: bytes, content_type: str = "text/plain") -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)
