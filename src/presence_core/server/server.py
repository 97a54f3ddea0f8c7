"""A Phoenix/Supabase Realtime-compatible WebSocket server in front of a Tracker.

`PresenceServer` speaks the Phoenix channel protocol that phoenix.js, Supabase's realtime-js
and Supabase's Python client (``realtime``) use, unmodified: v1 (JSON objects, the Python
client) and v2 (JSON arrays, the JS clients, plus realtime-js's binary broadcast pushes).  It
serves WebSockets at any path ending in ``/websocket`` and, on the same port, ``GET /health``,
``GET /metrics`` and the live dashboard (``GET /``, its script under ``/static/`` and its one
JSON endpoint ``GET /api/dashboard``; see `presence_core.server.dashboard`).

The data path: a frame from a client (see `Connection`) becomes a Tracker call (`track`,
`untrack`, `heartbeat`...); every tick the Tracker expires silent connections and flushes;
each topic's diff reaches this server once, as the Tracker's JSON bytes, is wrapped once per
protocol version into a complete WebSocket frame and written as is to every member's socket:
never decoded, re-encoded or re-framed per subscriber.  The flush runs at the end of the
event-loop iteration that read a change, so the changes of every frame read in one iteration
coalesce (a busier loop has longer iterations, hence larger diffs), and a tick every 10 ms
expires silent connections and flushes what came from elsewhere (peers through Redis).

A reconnect storm is the exception.  Each join goes to every member of its topic, so 20,000
clients arriving at once in topics of 200 cost about two million frame writes, some 10 µs of
kernel time each on loopback: the joins would queue behind their own fan-out for half a
minute.  While sockets join their first topic faster than 200 a second and 1 % of the
connections a second (counted over 0.25 s, each socket once it has stayed a window after its
join; handshakes, and sockets that leave at once, do not count, so no client can switch storm
mode on by opening and closing sockets), flushes are 0.5 s apart, so a topic's
diff carries every join of that half second; the storm ends, and diffs go out every iteration
again, within half a second of the last burst.  Replies and ``presence_state`` are never held
back.  A flush writes for at most 20 ms before the loop reads its sockets again
(`Tracker.flush`'s ``budget``): the topics left go out in the next iterations, in order, and a
client joining one of them meanwhile gets the state before its diff, then the diff.

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
* Errors that end a channel (limits) are a ``system`` message, then ``phx_close``; the socket
  stays.  A join the server refuses (a topic or presence key the Tracker would refuse, a rate
  or channel limit, the auth hook) and an unknown event get an error reply with the reason.
  Clients are sent away with close code 1011 (they come back), never 1000.
* A frame that is not a Phoenix message ends its socket with 1007 and a reason, as Phoenix's
  serializer does (and an audit record); only Phoenix messages count as heartbeats.  A frame
  over ``max_frame_bytes``, or a message of more than ``max_fragments`` frames, ends it with
  1009.  Broadcasts relay their payload's bytes as they came where the frame allows it (a v2
  text push, a kind-3 JSON push), and never a frame larger than the server itself accepts.

Hostile clients: a slow reader is cut after the fan-out that found it, never during it, so the
others get every frame; a socket's frames are read at most ``messages_per_second`` (and 64 per
loop iteration), the rest wait unread in its own TCP window; audit records are rate limited
(`presence_core.audit`); ``max_connections_per_ip`` bounds one address.  ``GET /health``
(``ok``, ``degraded`` while Redis is down), ``/health/live`` and ``/health/ready`` (503 while
starting, draining or without Redis) tell orchestrators the truth.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import http
import inspect
import ipaddress
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from .._validate import check_seconds, check_text
from ..audit import audit, flush_suppressed
from ..auth import Access, JwtVerifier, Verified, expired_reason
from ..errors import (
    PresenceError,
    PresenceValueError,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    TokenError,
)
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
from ..scaling import ThresholdScaler
from ..tracker import Tracker
from .config import AuthHook, Refused, ServerLimits
from .connection import CLOSE_TIMEOUT, Connection, text_frame
from .dashboard import Dashboard

if TYPE_CHECKING:
    from ..store import RedisStore
    from ..typing import Policy

__all__ = ["PresenceServer"]

logger = logging.getLogger("presence_core.server")

_dumps = orjson.dumps
_TICK = 0.01  # seconds between two Tracker ticks (expiry and flush)
_STORM_SOCKETS = 200.0  # new sockets a second that make a reconnect storm...
_STORM_SHARE = 0.01  # ...if they are also at least this share of the connections a second
_STORM_WINDOW = 0.25  # seconds over which new sockets are counted: a storm ends this soon
_STORM_INTERVAL = 0.5  # seconds between two flushes during a storm
_FLUSH_SLICE = 0.02  # seconds of fan-out before the loop reads its sockets again
_BACKLOG = 4096  # pending TCP accepts: a reconnect storm arrives all at once
_SAMPLE_EVERY = 1.0  # seconds between two dashboard samples
_AUDIT_SUMMARY_EVERY = 5.0  # seconds between two reports of suppressed audit records
_CLOSE_REASON = 120  # bytes of a close reason (a close frame's payload is at most 125)
# A v2 push up to its payload: join_ref, ref (string or null), topic, event (strings).  `decode`
# has checked the frame is such an array, so what follows is the payload and the closing ']'.
_STR = rb'"(?:[^"\\]|\\.)*"'
_V2_HEAD = re.compile(
    rb"\s*\[\s*(?:null|%s)\s*,\s*(?:null|%s)\s*,\s*%s\s*,\s*%s\s*," % (_STR, _STR, _STR, _STR),
    re.DOTALL,
)
_BROADCAST_KEYS = frozenset(("type", "event", "payload"))
# Supabase Realtime's words, where it has them, so its clients show what users expect.
_NO_TOKEN = "a token is required: send it as the apikey query parameter or the x-api-key header"
_PRIVATE_ONLY = "PrivateOnly: This project only allows private channels"
_NO_POLICY = "Unauthorized: private channels need a policy on the server, and none is configured"
_NO_READ = "Unauthorized: You do not have permissions to read from this Channel topic: "
# A private channel's presence lives in the Tracker under this prefix and its topic: a public
# channel of the same name is another channel, as in Supabase Realtime, so a public member never
# sees a private channel's presences or broadcasts.  Clients cannot name a topic that starts
# with NUL (a public join of one is refused), so nothing else can reach these.
PRIVATE_PREFIX = "\x00private:"
_TOKEN_RECHECK = 3600.0  # seconds: a channel's token is looked at again at least this often
_RENEW_GRACE = 5.0  # seconds past exp a channel waits for the policy to judge its new token
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(slots=True)
class Channel:
    """One topic a connection has joined."""

    join_ref: str | None
    key: str | None  # None: bound to a claim the token lacks, so tracks are refused
    tracked: str  # the Tracker's topic: the topic itself, or PRIVATE_PREFIX and the topic
    presence: bool
    self_broadcast: bool
    ack_broadcast: bool
    private: bool = False
    access: Access = Access.ALL  # the policy's answer, cached until the token changes
    verified: Verified | None = None  # the channel's token, once verified
    serial: int = 0  # names the channel's expiry timer: an older timer is ignored
    renewing: Verified | None = None  # a refresh waiting for the policy: no expiry meanwhile


@dataclass(slots=True)
class _Join:
    """A join on its way through the checks that may wait (the auth hook, the policy)."""

    msg: Message
    payload: dict[str, Any]
    key: str | None
    private: bool
    tracked: str
    verified: Verified | None
    token: str | None


class _Topic:
    """The connections in one topic: all of them (broadcasts), and those that get presence,
    by protocol version (diffs), so a fan-out walks a ready list."""

    __slots__ = ("wire", "members", "readers", "listeners", "unsubscribe")

    def __init__(self, wire: str, unsubscribe: Callable[[], None]) -> None:
        self.wire = wire  # the topic clients know it by
        self.members: dict[int, Connection] = {}
        self.readers: dict[int, Connection] = {}  # members a policy lets read broadcasts
        self.listeners: tuple[dict[int, Connection], dict[int, Connection]] = ({}, {})
        self.unsubscribe = unsubscribe


def _flag(value: object, default: bool) -> bool:
    """A join config boolean, which clients may send as a string."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def is_loopback(host: object) -> bool:
    """Whether listening on ``host`` reaches this machine only."""
    if not isinstance(host, str) or not host:
        return False  # None or "": every interface
    host = host.strip().lower()
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _claim_text(value: object) -> str | None:
    """A claim as a presence key: a non-empty str, or an int (not a bool) as its digits."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _origin(text: str) -> str:
    return text.strip().rstrip("/").lower()


class PresenceServer:
    """Serve a Tracker over WebSockets in the Phoenix/Supabase protocol.

    Args:
        tracker: The presence state; attach a `RedisStore` to it to share presence.
        host, port: Where to listen (port 0: any free port; see `port` once started).
        limits: Per-connection limits (see `ServerLimits`).
        auth: Called with the client's token and each topic it joins (see `AuthHook`).
        store: The `RedisStore` attached to ``tracker``, if any: the dashboard shows its health
            and the peers, and a `ThresholdScaler` is told the replica count (this process and
            its live peers) before each consultation.
        dashboard: Serve the live dashboard at ``/`` (it needs the built-in `Metrics` sink).
            Its JSON shows members' metas.
        dashboard_token: If set, ``/api/dashboard`` answers only requests that carry it
            (``Authorization: Bearer <token>`` or ``?token=<token>``; the page, opened as
            ``/?token=<token>``, sends it).  Without one, anyone who reaches the port reads the
            dashboard, as they read ``/metrics``.
        scale_interval: Seconds between two `Tracker.run_scalers` calls, when the Tracker has
            scalers.  Decisions other than hold are logged; the server never acts on them.
        verifier: Verify every client's JWT (see `presence_core.JwtVerifier`): the token at
            the handshake (the ``x-api-key`` header, else the ``apikey`` or ``token`` query
            parameter; a bad one is answered HTTP 401 with ``{"error": reason}``) and a join's
            ``access_token``, which replaces it for that channel (a bad one gets an error reply
            with the reason).  A channel whose token expires gets a ``system`` error and
            ``phx_close`` within a tick of ``exp``; an ``access_token`` push with a fresh token
            keeps it open.  The verified claims go to the auth hook (if it takes a ``claims``
            parameter) and to the policy.
        key_claim: With a verifier: the presence key is this claim of the channel's token
            (``"sub"``), never the client's choice.  A join with an empty key gets it; a join
            that asks for another key is refused (see `Tracker.bind_key`).
        policy: Decides what a *private* channel (``config.private: true``) allows, with the
            claims (see `presence_core.typing.Policy`); asked once per channel and token.
            Without one, private joins are refused.
        private_only: Refuse public channels.
        allowed_origins: Browser origins (``https://app.example.com``) whose handshakes are
            accepted; another ``Origin`` is answered 403.  None: any.  A handshake without an
            ``Origin`` header (not a browser) is never refused for it.
        allow_anonymous: Serve without authentication on an address other than loopback (by
            default `start` refuses to), and, with a verifier, let in a handshake that carries
            no token (its channels are public ones only, and it cannot track a bound key).
            Without a verifier, a policy is asked with empty claims.

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
        store: RedisStore | None = None,
        dashboard: bool = True,
        dashboard_token: str | None = None,
        scale_interval: float = 15.0,
        verifier: JwtVerifier | None = None,
        key_claim: str | None = None,
        policy: Policy | None = None,
        private_only: bool = False,
        allowed_origins: Sequence[str] | None = None,
        allow_anonymous: bool = False,
    ) -> None:
        if key_claim is not None:
            check_text(key_claim, "key_claim", 256)
            if verifier is None:
                raise PresenceValueError("key_claim needs a verifier: it names a token's claim")
        if policy is not None and not callable(policy):
            raise PresenceValueError("policy must be callable (see presence_core.typing.Policy)")
        if isinstance(allowed_origins, str):
            raise PresenceValueError("allowed_origins must be a sequence of origins, not a str")
        self.verifier = verifier
        self.key_claim = key_claim
        self.policy = policy
        self.private_only = bool(private_only)
        self.allowed_origins = (
            None if allowed_origins is None else frozenset(_origin(o) for o in allowed_origins)
        )
        self.allow_anonymous = bool(allow_anonymous)
        self._hook_claims = False  # whether the auth hook takes the claims
        if auth is not None:
            try:
                params = inspect.signature(auth).parameters.values()
            except (TypeError, ValueError):
                params = ()  # type: ignore[assignment]
            self._hook_claims = any(
                p.name == "claims" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
            )
        # Channel token deadlines: (unix time, serial, connection id, topic), a heap.
        self._deadlines: list[tuple[float, int, int, str]] = []
        self._deadlines_limit = 1024  # the heap is rebuilt without stale entries past this
        self._serials = itertools.count(1)
        self.tracker = tracker
        self.store = store
        self.scale_interval = check_seconds(scale_interval, "scale_interval")
        self._dashboard: Dashboard | None = None
        self._dashboard_wanted = bool(dashboard) and isinstance(tracker.metrics, Metrics)
        self._static: dict[str, bytes] = {}
        if dashboard_token is not None:
            check_text(dashboard_token, "dashboard_token", 1024)
        self._dashboard_token = dashboard_token
        # Members' metas are personal data: with auth on, or reachable from elsewhere, the
        # dashboard's JSON is served only with a token.
        self._dashboard_locked = dashboard_token is None and (
            verifier is not None or policy is not None or auth is not None or not is_loopback(host)
        )
        self.host = host
        self.port = port
        self.limits = limits if limits is not None else ServerLimits()
        self.auth = auth
        # The project's token bucket, a second's worth of burst (see `ServerLimits`).
        joins, casts = self.limits.joins_per_second, self.limits.broadcasts_per_second
        self._join_rate = Limits(rate_per_second=joins, burst=max(1, round(joins)))
        self._broadcast_rate = Limits(rate_per_second=casts, burst=max(1, round(casts)))
        self._conns: dict[int, Connection] = {}  # open and registered with the Tracker
        self._sockets: set[Connection] = set()  # every socket past its handshake, until it ends
        self._topics: dict[str, _Topic] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._flush_started = 0.0  # loop time
        self._storm = False  # many new sockets: flushes stretched (see the module)
        self._window_start = 0.0
        self._tasks: set[asyncio.Task[None]] = set()  # auth hooks under way
        self._accepting = False
        self._draining = False
        self._per_ip: dict[str, int] = {}  # sockets by client address (when limited)
        self._accepted = 0  # sockets from TCP accept to their end, handshake or not
        # Ids of the sockets that joined in this storm window and in the one before.
        self._window_joined: list[int] = []
        self._window_before: list[int] = []
        frames = self.limits.messages_per_second
        self._frames_rate = Limits(rate_per_second=frames, burst=max(1, round(frames)))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        """Whether clients are authenticated: a verifier, a policy or an auth hook is set."""
        return self.verifier is not None or self.policy is not None or self.auth is not None

    async def start(self) -> None:
        """Listen.  Raises `PresenceValueError` for an address other than loopback without
        authentication, unless ``allow_anonymous``."""
        if not self.auth_enabled and not self.allow_anonymous and not is_loopback(self.host):
            raise PresenceValueError(
                f"refusing to listen on {self.host!r} without authentication: set a verifier "
                "(JWT), a policy or an auth hook, or allow_anonymous=True to serve anyone who "
                "can reach the port"
            )
        loop = asyncio.get_running_loop()
        max_size = self.limits.max_frame_bytes
        frames_rate, max_fragments = self._frames_rate, self.limits.max_fragments
        self._server = await loop.create_server(
            lambda: Connection(
                self,
                next(self._ids),
                max_size,
                frames_rate=frames_rate,
                max_fragments=max_fragments,
            ),
            self.host,
            self.port,
            backlog=_BACKLOG,
        )
        for sock in self._server.sockets:  # port 0: the port it got
            self.port = sock.getsockname()[1]
            break
        if self._dashboard_wanted:
            self._dashboard = Dashboard(
                self.tracker,
                store=self.store,
                scale_interval=self.scale_interval,
            )
        self._ticker = loop.create_task(self._tick(), name="presence-tick")
        self._accepting = True
        self._draining = False
        audit(
            "server_started",
            host=self.host,
            port=self.port,
            node=self.tracker.node,
            limits={k: getattr(self.limits, k) for k in self.limits.__slots__},
        )

    def begin_drain(self) -> None:
        """Stop being ready (``/health/ready`` answers 503) while still serving everyone.

        Call it on SIGTERM, wait for the load balancer to notice (its readiness period), then
        `stop`; ``presence-core serve`` does so (``--drain-seconds``).
        """
        self._draining = True

    @property
    def ready(self) -> bool:
        """Whether ``/health/ready`` answers 200: serving, not draining, and Redis (when a
        store is attached) reachable."""
        return self._accepting and not self._draining and self._redis_health() != "down"

    def _redis_health(self) -> str | None:
        """``"ok"`` or ``"down"`` with a store attached, else None."""
        if self.store is None:
            return None
        return "ok" if self.store.connected else "down"

    async def stop(self) -> None:
        """Send every client away and remove their presences (they leave for everyone)."""
        self._accepting = False
        self._draining = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        conns = list(self._conns.values())
        for conn in conns:
            self.tracker.record_disconnect("shutdown")
            self._drop(conn)  # presences leave now, whatever the closing handshakes do
        for conn in conns:
            conn.close(1001, "server stopping")
        # Each socket is cut CLOSE_TIMEOUT after its close frame at the latest.
        deadline = time.monotonic() + CLOSE_TIMEOUT + 0.5
        while self._sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._sockets):
            conn.abort()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        self.tracker.flush()
        if self._server is not None:
            await self._server.wait_closed()

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
        return len(self._conns)

    async def _tick(self) -> None:
        tracker = self.tracker
        loop = asyncio.get_running_loop()
        next_sample = loop.time() + _SAMPLE_EVERY
        next_scale = loop.time() + self.scale_interval
        next_summary = loop.time() + _AUDIT_SUMMARY_EVERY
        while True:
            await asyncio.sleep(_TICK)
            now = loop.time()
            if now >= next_summary:
                next_summary = now + _AUDIT_SUMMARY_EVERY
                flush_suppressed()
            if now >= next_sample:
                next_sample = now + _SAMPLE_EVERY
                if self._dashboard is not None:
                    self._dashboard.sample()
            if now >= next_scale:
                next_scale = now + self.scale_interval
                if tracker.scalers:
                    self._run_scalers()
            if now - self._window_start >= _STORM_WINDOW:
                # A socket counts once it has stayed a whole window after its join: a client
                # that joins and leaves at once, over and over, would otherwise hold
                # everyone's diffs at the storm's pace.  A real storm is seen a window later.
                joined = self._window_before
                self._window_before, self._window_joined = self._window_joined, []
                self._window_start = now
                stayed = sum(1 for conn_id in joined if conn_id in self._conns)
                rate = stayed / _STORM_WINDOW
                storm = rate >= max(_STORM_SOCKETS, _STORM_SHARE * len(self._conns))
                if storm != self._storm:
                    self._storm = storm
                    logger.info("reconnect storm %s", "begins" if storm else "is over")
                    if not storm and self._flush_handle is not None:
                        self._flush_handle.cancel()  # due now, not at the storm's pace
                        self._flush_handle = None
            if self._deadlines:
                self._expire_tokens(time.time())
            for conn_id in tracker.expire():
                conn = self._conns.get(conn_id)  # type: ignore[arg-type]  # our ids are ints
                if conn is not None:
                    audit("disconnected", conn=conn.id, reason="silent past its ttl")
                    self.tracker.record_disconnect("ttl")
                    self._drop(conn)
                    conn.close(1011, "no heartbeat")
            self._flush_soon()  # what expired, and what came from peers

    def _run_scalers(self) -> None:
        peers = self.store.peers if self.store is not None else None
        if peers is not None:
            replicas = 1 + len(peers.live_peers)
            for scaler in self.tracker.scalers:
                if isinstance(scaler, ThresholdScaler):
                    scaler.set_current(replicas)
        for decision in self.tracker.run_scalers():
            if decision.action != "hold":
                logger.info(
                    "scaler asks for %d replicas (now %d): %s",
                    decision.desired,
                    decision.current,
                    decision.reason,
                )

    def _refuse_handshake(self, limit: str, value: int) -> None:
        """A socket refused by a connection limit: a limit hit and a refused handshake."""
        self._limit_hit(limit, value=value)
        self.tracker.record_disconnect("refused_handshake")

    def _limit_hit(self, limit: str, **fields: Any) -> None:
        """A server limit refused something: audited, and counted in ``limit_hits``."""
        audit("limit_hit", limit=limit, **fields)
        self.tracker.record_limit_hit(limit)

    def _flush_soon(self) -> None:
        """Flush once this loop iteration's frames are read (see the module's docstring)."""
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            at = self._flush_started + _STORM_INTERVAL if self._storm else 0.0
            if at <= loop.time():
                self._flush_handle = loop.call_soon(self._flush)
            else:
                self._flush_handle = loop.call_at(at, self._flush)

    def _flush(self, more: bool = False) -> None:
        self._flush_handle = None
        loop = asyncio.get_running_loop()
        if not more:
            self._flush_started = loop.time()
        started = time.perf_counter()
        try:
            self.tracker.flush(budget=_FLUSH_SLICE)
        except Exception:  # pragma: no cover - flush logs hook failures itself
            logger.exception("tracker flush failed")
        if time.perf_counter() - started >= _FLUSH_SLICE:
            # Topics may be left: the next slice after this iteration's reads.
            self._flush_handle = loop.call_soon(self._flush, True)
        elif more:
            self._flush_soon()  # the batch is out; what changed meanwhile is next

    # -- connections (called by `Connection`) -----------------------------------------------

    def _handshake(self, conn: Connection, request: Request) -> Response:
        """The answer to an HTTP request: health, metrics, or a WebSocket upgrade."""
        try:
            return self._answer(conn, request)
        except MultipleValuesError as exc:
            return self._plain(400, f"a repeated header: {exc}\n".encode())
        except Exception:  # a bug here must cost one answer, never the server's loop
            logger.exception("answering an HTTP request failed")
            return self._plain(500, b"internal error\n")

    def _plain(self, status: int, body: bytes) -> Response:
        return _response(http.HTTPStatus(status), body)

    def _health(self) -> tuple[http.HTTPStatus, dict[str, Any]]:
        redis = self._redis_health()
        if not self._accepting:
            status = "starting" if not self._draining else "stopping"
        elif self._draining:
            status = "draining"
        else:
            status = "degraded" if redis == "down" else "ok"
        code = http.HTTPStatus.OK if self._accepting else http.HTTPStatus.SERVICE_UNAVAILABLE
        body = {
            "status": status,
            "redis": redis,
            "node": self.tracker.node,
            "connections": len(self._conns),
            "presences": self.tracker.totals().presences,
        }
        return code, body

    def _answer(self, conn: Connection, request: Request) -> Response:
        url = urlsplit(request.path)
        path = url.path
        if path == "/health":
            code, body = self._health()
            return _response(code, _dumps(body), "application/json")
        if path == "/health/live":
            return _response(http.HTTPStatus.OK, b'{"status":"live"}', "application/json")
        if path == "/health/ready":
            code, body = self._health()
            if not self.ready:
                code = http.HTTPStatus.SERVICE_UNAVAILABLE
            return _response(code, _dumps(body), "application/json")
        if self._dashboard is not None and (path == "/" or path.startswith(("/static/", "/api/"))):
            return self._dashboard_response(path, url.query, request.headers)
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
        if not self._accepting:
            self.tracker.record_disconnect("refused_handshake")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"stopping\n")
        if len(self._conns) >= self.limits.max_connections:
            self._refuse_handshake("max_connections", self.limits.max_connections)
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n")
        per_ip = self.limits.max_connections_per_ip
        if per_ip is not None and conn.peer is not None and self._per_ip[conn.peer] > per_ip:
            self._refuse_handshake("max_connections_per_ip", per_ip)
            return _response(
                http.HTTPStatus.TOO_MANY_REQUESTS, b"too many connections from one address\n"
            )
        refused = self._identify(conn, request, url.query)
        if refused is not None:
            self.tracker.record_disconnect("refused_handshake")
            return refused
        response = conn.ws.accept(request)
        if response.status_code == 101:
            query = parse_qs(url.query)
            vsn = (query.get("vsn") or ["1.0.0"])[0]
            conn.version = 2 if vsn.startswith("2") else 1
        else:
            conn.token = conn.verified = None
            self.tracker.record_disconnect("refused_handshake")
        return response

    def _identify(self, conn: Connection, request: Request, query: str) -> Response | None:
        """Check a handshake's origin and token, where Supabase Realtime reads it (the
        ``x-api-key`` header, else the ``apikey`` query parameter; phoenix.js's ``params``
        arrive as ``token``).  Returns the refusal, or None to go on."""
        allowed = self.allowed_origins
        if allowed is not None:
            origin = request.headers.get("Origin")
            if origin is not None and _origin(origin) not in allowed:
                audit("origin_refused", conn=conn.id, origin=origin[:200])
                return _error(http.HTTPStatus.FORBIDDEN, "this origin is not allowed")
        token = request.headers.get("x-api-key")
        if not token:
            params = parse_qs(query)
            tokens = params.get("apikey") or params.get("token")
            token = tokens[0] if tokens else None
        conn.token = token or None
        if self.verifier is None:
            return None
        if conn.token is None:
            if self.allow_anonymous:
                return None
            audit("token_refused", conn=conn.id, reason="missing")
            return _error(http.HTTPStatus.UNAUTHORIZED, _NO_TOKEN)
        try:
            conn.verified = self._verify(conn.token)
        except TokenError as exc:
            audit("token_refused", conn=conn.id, reason=exc.reason)
            return _error(http.HTTPStatus.UNAUTHORIZED, exc.reason)
        return None

    def _dashboard_response(self, path: str, query: str, headers: Headers) -> Response:
        assert self._dashboard is not None
        if path == "/api/dashboard":
            if self._dashboard_locked:
                return _error(
                    http.HTTPStatus.FORBIDDEN,
                    "the dashboard shows members' metas: with authentication on, or on an "
                    "address other than loopback, it needs a dashboard token "
                    "(--dashboard-token)",
                )
            params = parse_qs(query, keep_blank_values=True)
            if not self._dashboard_allowed(params, headers):
                return _response(
                    http.HTTPStatus.UNAUTHORIZED,
                    _dumps({"error": "the dashboard token is missing or wrong"}),
                    "application/json",
                )
            try:
                body = _dumps(self._dashboard.answer(params, accepting=self._accepting))
            except PresenceError as exc:
                return _response(
                    http.HTTPStatus.BAD_REQUEST, _dumps({"error": str(exc)}), "application/json"
                )
            except Exception:  # a bug here must cost one answer, never the server's loop
                logger.exception("dashboard answer failed")
                return _response(http.HTTPStatus.INTERNAL_SERVER_ERROR, b"dashboard failed\n")
            response = _response(http.HTTPStatus.OK, body, "application/json")
            response.headers["Cache-Control"] = "no-store"
            return response
        name = "dashboard.html" if path == "/" else path.removeprefix("/static/")
        content_type = _STATIC_TYPES.get(name[name.rfind(".") :]) if "." in name else None
        if content_type is None or "/" in name or "\0" in name or name.startswith("."):
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        data = self._static.get(name)
        if data is None:
            try:
                data = resources.files(__package__).joinpath("static", name).read_bytes()
            except (OSError, ValueError):
                return _response(http.HTTPStatus.NOT_FOUND, b"not found\n")
            self._static[name] = data
        return _response(http.HTTPStatus.OK, data, content_type)

    def _dashboard_allowed(self, params: dict[str, list[str]], headers: Headers) -> bool:
        token = self._dashboard_token
        if token is None:
            return True
        given = params.get("token", [""])[0].encode("utf-8", "surrogateescape")
        scheme, _, credentials = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            # Back to the bytes the client sent (a UTF-8 client sent UTF-8): websockets reads
            # a header's non-ASCII bytes as surrogate escapes; other parsers read Latin-1.
            credentials = credentials.strip()
            try:
                given = credentials.encode("latin-1")
            except UnicodeEncodeError:
                given = credentials.encode("utf-8", "surrogateescape")
        # Bytes: compare_digest refuses str with non-ASCII characters.
        return hmac.compare_digest(given, token.encode())

    def _opened(self, conn: Connection) -> None:
        assert conn.transport is not None
        # A client that reads slower than its topics change is sent away (see `_slow`).
        conn.transport.set_write_buffer_limits(high=self.limits.max_buffered_bytes)
        self._sockets.add(conn)
        self._conns[conn.id] = conn
        self.tracker.connect(conn.id)
        if self.auth is not None:
            verdict = self._verdict(conn.token, None, conn.verified)
            if isinstance(verdict, bool):
                self._authenticated(conn, verdict)
            else:
                self._defer(conn, verdict, lambda ok: self._authenticated(conn, bool(ok)))

    def _authenticated(self, conn: Connection, ok: bool) -> None:
        if not ok:
            audit("token_refused", conn=conn.id)
            self.tracker.record_disconnect("refused_handshake")
            self._drop(conn)
            conn.close(1008, "unauthorized")

    def _accept(self, conn: Connection) -> bool:
        """A new TCP connection, before its handshake: False to cut it at once.

        Sockets that have not finished their handshake are bounded too, or idle ones would
        hold every file descriptor: in all, ``max_connections`` plus a backlog's worth; from
        one address (with ``max_connections_per_ip``), twice its limit, which leaves room for
        the handshakes that will be answered 429.
        """
        if self._accepted >= self.limits.max_connections + _BACKLOG:
            self._refuse_handshake("max_connections", self.limits.max_connections)
            return False
        per_ip = self.limits.max_connections_per_ip
        if per_ip is not None:
            assert conn.transport is not None
            peer = conn.transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            held = self._per_ip.get(address, 0)
            if held >= 2 * per_ip:
                self._refuse_handshake("max_connections_per_ip", per_ip)
                return False
            self._per_ip[address] = held + 1
            conn.peer = address  # counted until `_closed`
        self._accepted += 1
        return True

    def _closed(self, conn: Connection) -> None:
        """The end of a socket that `_accept` let in."""
        self._accepted -= 1
        self._sockets.discard(conn)
        self._drop(conn)
        if conn.peer is not None:
            left = self._per_ip.pop(conn.peer, 1) - 1
            if left:
                self._per_ip[conn.peer] = left
            conn.peer = None
        if self._accepting:
            self._flush_soon()

    def _slow(self, conn: Connection) -> None:
        """Cut a client that reads slower than its topics change (called soon after
        `Connection.pause_writing`, never inside a fan-out)."""
        if conn.id in self._conns:
            audit(
                "disconnected", conn=conn.id, reason="reads too slowly", limit="max_buffered_bytes"
            )
            self.tracker.record_disconnect("slow_reader")
            self._drop(conn)
        conn.abort()

    def _failed(self, conn: Connection, why: str) -> None:
        """A socket ended for breaking the protocol or a limit (see `Connection.fail`)."""
        audit("disconnected", conn=conn.id, reason=why)
        self.tracker.record_disconnect(why)
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        for topic in list(conn.channels):
            self._leave_members(conn, topic)
        self.tracker.disconnect(conn.id)

    # -- auth --------------------------------------------------------------------------------

    def _verdict(
        self, token: str | None, topic: str | None, verified: Verified | None
    ) -> bool | Awaitable[Any]:
        assert self.auth is not None
        try:
            if self._hook_claims:
                claims: Mapping[str, Any] = verified.claims if verified is not None else {}
                verdict = self.auth(token, topic, claims=claims)  # type: ignore[call-arg]
            else:
                verdict = self.auth(token, topic)
        except Refused:
            return False
        if isinstance(verdict, Awaitable):
            return verdict
        return bool(verdict)

    def _ask_policy(self, claims: Mapping[str, Any], topic: str) -> Access | Awaitable[Any]:
        """The policy's answer for one private channel; one that raises refuses."""
        assert self.policy is not None
        try:
            answer = self.policy(claims, topic)
        except Refused:
            return Access.NONE
        except Exception:
            logger.exception("the policy failed; refusing")
            return Access.NONE
        if isinstance(answer, Awaitable):
            return answer
        return _access(answer)

    def _defer(
        self,
        conn: Connection,
        verdict: Awaitable[Any],
        then: Callable[[Any], None],
        refused: Any = False,
    ) -> None:
        """Wait for an async auth hook or policy; the connection's later frames wait, in
        order.  ``then`` gets its answer, or ``refused`` if it raised."""
        conn.backlog = []

        async def settle() -> None:
            try:
                ok = await verdict
            except Refused:
                ok = refused
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this wait was cancelled: the server is stopping
                ok = refused  # the hook's own cancellation (a timeout in it): a refusal
                logger.error("the auth hook or policy was cancelled; refusing")
            except Exception:
                logger.exception("the auth hook or policy failed; refusing")
                ok = refused
            if conn.waiting is asyncio.current_task():
                conn.waiting = None
            backlog, conn.backlog = conn.backlog or [], None
            if conn.open:
                then(ok)
            for at, (data, binary) in enumerate(backlog):
                if not conn.open:
                    break
                if conn.backlog is not None:  # waiting for the hook again
                    conn.backlog.extend(backlog[at:])
                    break
                self._received(conn, data, binary)
            if conn.backlog is None:
                conn.release()

        task = asyncio.ensure_future(settle())
        self._tasks.add(task)  # a task nobody holds may be collected mid-way
        task.add_done_callback(self._tasks.discard)
        conn.waiting = task  # cancelled if the socket ends first (`Connection.connection_lost`)

    # -- frames --------------------------------------------------------------------------------

    def _received(self, conn: Connection, data: bytes, binary: bool) -> None:
        """One message from a client.  One that is not a Phoenix message ends the socket with
        1007, as Phoenix's serializer does; only a Phoenix message counts as a heartbeat."""
        if conn.id not in self._conns:  # cut, or refused, while its frames were read
            return
        try:
            if binary:
                push = self._binary_push(conn, data)
                self.tracker.heartbeat(conn.id)
                self._binary_broadcast(conn, *push)
            else:
                msg = decode(data, conn.version)
                self.tracker.heartbeat(conn.id)
                self._message(conn, msg, data)
        except (ProtocolError, ValueError, TypeError) as exc:
            reason = f"not a Phoenix message: {exc}".encode()[:_CLOSE_REASON]
            conn.fail(1007, reason.decode("utf-8", "ignore"), "protocol_error")
        self._flush_soon()

    def _message(self, conn: Connection, msg: Message, data: bytes) -> None:
        event = msg.event
        if msg.topic == PHOENIX_TOPIC:
            if event == EVENT_HEARTBEAT:
                self._reply(conn, msg, "ok", {})
            else:
                self._reply(conn, msg, "error", {"reason": f"{PHOENIX_TOPIC} is reserved"})
            return
        if event == EVENT_JOIN:
            self._join(conn, msg)
        elif msg.topic not in conn.channels:
            # Not joined: the clients expect the channel closed (phx_close) on a stray push.
            self._reply(conn, msg, "error", {"reason": "unmatched topic"})
        elif event == EVENT_PRESENCE:
            self._presence(conn, msg)
        elif event == "broadcast":
            self._text_broadcast(conn, msg, data)
        elif event == EVENT_LEAVE:
            self._reply(conn, msg, "ok", {})
            self._leave(conn, msg.topic)
            self._send(conn, Message(msg.topic, EVENT_CLOSE, {}, msg.ref, msg.join_ref))
        elif event == "access_token":
            self._access_token(conn, msg)
        else:
            self._reply(conn, msg, "error", {"reason": "unknown event"})

    def _verify(self, token: str, now: float | None = None) -> Verified:
        """Verify a client's token.  Expiry is strict here, whatever the verifier's leeway
        (which is for clocks that differ): a channel is closed at ``exp``, so a join just
        after it must not be let in only to be closed at the next tick."""
        assert self.verifier is not None
        now = time.time() if now is None else now
        verified = self.verifier.verify(token, now=now)
        if verified.expires_at <= now:
            raise TokenError(expired_reason(now, verified.expires_at))
        return verified

    def _unbound_reason(self) -> str:
        return (
            f"Unauthorized: tracking needs a token with a `{self.key_claim}` claim (the "
            "presence key is bound to it)"
        )

    def _access_token(self, conn: Connection, msg: Message) -> None:
        """A new token for one channel (realtime-js's ``setAuth``).  With a verifier it is
        verified as at a join: a bad one closes the channel the way an expired one does; a
        good one keeps it open until its own ``exp``.  A private channel asks its policy
        again, and a token for another identity than the bound key closes the channel."""
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        token = payload.get("access_token")
        topic = msg.topic
        channel = conn.channels[topic]
        if self.verifier is None:
            if isinstance(token, str):
                conn.token = token  # what the auth hook sees at the next join
            self._reply(conn, msg, "ok", {})
            return
        if not isinstance(token, str) or not token:
            self._reply(conn, msg, "error", {"reason": "access_token must be a JWT"})
            return
        if channel.verified is not None and channel.verified.token == token:
            self._reply(conn, msg, "ok", {})  # the same token again: nothing changes
            return
        try:
            verified = self._verify(token)
        except TokenError as exc:
            audit("token_refused", conn=conn.id, topic=topic, reason=exc.reason)
            self._close_channel(conn, msg, exc.reason)
            return
        if self.key_claim is not None:
            bound = _claim_text(verified.claims.get(self.key_claim))
            if channel.key is not None and bound != channel.key:
                audit("token_refused", conn=conn.id, topic=topic, reason="identity_changed")
                reason = f"Unauthorized: the token's `{self.key_claim}` claim is not this channel's"
                self._close_channel(conn, msg, reason)
                return
            if channel.key is None and bound is not None:
                try:
                    self.tracker.check_key(bound)
                except PresenceError as exc:
                    self._close_channel(conn, msg, str(exc))
                    return
                channel.key = bound
                self.tracker.bind_key(conn.id, bound, topic=channel.tracked)
        if not channel.private:
            self._renewed(conn, msg, channel, verified, channel.access)
            return
        channel.renewing = verified
        answer = self._ask_policy(verified.claims, topic)
        if isinstance(answer, Access):
            self._renewed(conn, msg, channel, verified, answer)
        else:
            self._defer(
                conn,
                answer,
                lambda a: self._renewed(conn, msg, channel, verified, _access(a)),
                Access.NONE,
            )

    def _renewed(
        self, conn: Connection, msg: Message, channel: Channel, verified: Verified, access: Access
    ) -> None:
        topic = msg.topic
        if channel.renewing is verified:
            channel.renewing = None
        if conn.channels.get(topic) is not channel or conn.id not in self._conns:
            return  # left, rejoined or cut while the policy was asked
        if not access.any_read:
            reason = _NO_READ + topic
            self._close_channel(conn, msg, reason)
            return
        channel.verified = verified
        channel.access = access
        t = self._topics.get(channel.tracked)
        if t is not None:
            self._place(conn, t, channel)
        if not access.presence_write:
            self.tracker.untrack(conn.id, channel.tracked)  # what it may no longer write leaves
        self._schedule(conn, topic, channel)
        self._reply(conn, msg, "ok", {})

    def _join(self, conn: Connection, msg: Message) -> None:
        topic = msg.topic
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        try:
            conn.joins_tat = admit(self._join_rate, conn.joins_tat, time.monotonic(), conn.id)
        except RateLimited:
            self._limit_hit("joins_per_second", conn=conn.id, topic=topic)
            self._reply(conn, msg, "error", {"reason": "join rate limit exceeded"})
            return
        try:
            # What the Tracker would refuse at the first track, refused before anything is
            # made: a topic or key over its length limit, empty, or not text.
            self.tracker.check_topic(topic)
            key = presence_key_from_join(payload)
            if key is not None:
                self.tracker.check_key(key)
        except PresenceError as exc:
            audit("join_refused", conn=conn.id, reason=type(exc).__name__)
            self._reply(conn, msg, "error", {"reason": str(exc)})
            return
        if topic not in conn.channels and (
            len(conn.channels) >= self.limits.max_topics_per_connection
        ):
            self._limit_hit("max_topics_per_connection", conn=conn.id, topic=topic)
            reason = "ChannelRateLimitReached: Too many channels"
            self._reply(conn, msg, "error", {"reason": reason})
            return
        config = payload.get("config")
        private = _flag(config.get("private"), False) if isinstance(config, dict) else False
        if self.private_only and not private:
            audit("join_refused", conn=conn.id, reason="private_only")
            self._reply(conn, msg, "error", {"reason": _PRIVATE_ONLY})
            return
        if private and self.policy is None:
            audit("join_refused", conn=conn.id, reason="no_policy")
            self._reply(conn, msg, "error", {"reason": _NO_POLICY})
            return
        if topic.startswith("\x00"):
            self._reply(conn, msg, "error", {"reason": "a topic must not start with NUL"})
            return
        tracked = PRIVATE_PREFIX + topic if private else topic
        if private:
            try:
                self.tracker.check_topic(tracked)
            except PresenceError as exc:
                self._reply(conn, msg, "error", {"reason": f"private topic: {exc}"})
                return
        join = self._identified_join(conn, msg, payload, key, private, tracked)
        if join is None:
            return
        if self.auth is None:
            self._join_authorised(conn, join, True)
            return
        verdict = self._verdict(join.token, topic, join.verified)
        if isinstance(verdict, bool):
            self._join_authorised(conn, join, verdict)
        else:
            self._defer(conn, verdict, lambda ok: self._join_authorised(conn, join, bool(ok)))

    def _identified_join(
        self,
        conn: Connection,
        msg: Message,
        payload: dict[str, Any],
        key: str | None,
        private: bool,
        tracked: str,
    ) -> _Join | None:
        """A join's token verified and its presence key chosen, or None once refused.

        The join's ``access_token`` replaces the socket's token for this channel, as in
        Supabase Realtime.  With ``key_claim`` the key is the token's claim: a join that asks
        for another is refused.
        """
        given = payload.get("access_token")
        token = given if isinstance(given, str) and given else conn.token
        verified = None
        if self.verifier is not None and token is not None:
            now = time.time()
            socket = conn.verified
            if socket is not None and socket.token == token and socket.expires_at > now:
                verified = socket  # verified at the handshake, and still valid
            else:
                try:
                    verified = self._verify(token, now)
                except TokenError as exc:
                    audit("token_refused", conn=conn.id, topic=msg.topic, reason=exc.reason)
                    self._reply(conn, msg, "error", {"reason": exc.reason})
                    return None
        if self.key_claim is not None:
            bound = None if verified is None else _claim_text(verified.claims.get(self.key_claim))
            if key and key != bound:
                audit("join_refused", conn=conn.id, topic=msg.topic, reason="key_not_bound")
                reason = (
                    f"Unauthorized: the presence key is the token's `{self.key_claim}` claim; "
                    "this join asks for another"
                )
                self._reply(conn, msg, "error", {"reason": reason})
                return None
            if bound is not None:
                try:
                    self.tracker.check_key(bound)
                except PresenceError as exc:
                    self._reply(conn, msg, "error", {"reason": str(exc)})
                    return None
            key = bound
        else:
            key = key or secrets.token_hex(8)
        return _Join(msg, payload, key, private, tracked, verified, token)

    def _join_authorised(self, conn: Connection, join: _Join, ok: bool) -> None:
        if not ok:
            audit("token_refused", conn=conn.id, topic=join.msg.topic)
            self._reply(conn, join.msg, "error", {"reason": "Unauthorized"})
            return
        if not join.private:
            self._join_allowed(conn, join, Access.ALL)
            return
        if conn.id not in self._conns or not conn.open:  # cut while the hook ran
            return
        if self.verifier is not None and join.verified is None:
            audit("join_refused", conn=conn.id, topic=join.msg.topic, reason="anonymous")
            reason = "Unauthorized: a private channel needs a token"
            self._reply(conn, join.msg, "error", {"reason": reason})
            return
        claims = join.verified.claims if join.verified is not None else {}
        answer = self._ask_policy(claims, join.msg.topic)
        if isinstance(answer, Access):
            self._join_allowed(conn, join, answer)
        else:
            self._defer(
                conn, answer, lambda a: self._join_allowed(conn, join, _access(a)), Access.NONE
            )

    def _join_allowed(self, conn: Connection, join: _Join, access: Access) -> None:
        if conn.id not in self._conns or not conn.open:  # cut while the join waited
            return
        msg, payload, key = join.msg, join.payload, join.key
        topic = msg.topic
        if join.verified is not None:
            now = time.time()
            if join.verified.expires_at <= now:
                # It expired while the auth hook or the policy was asked.
                reason = expired_reason(now, join.verified.expires_at)
                self._reply(conn, msg, "error", {"reason": reason})
                return
        if not access.any_read:
            audit("join_refused", conn=conn.id, topic=topic, reason="policy")
            reason = _NO_READ + topic
            self._reply(conn, msg, "error", {"reason": reason})
            return
        config = payload.get("config")
        config = config if isinstance(config, dict) else {}
        presence_cfg = config.get("presence")
        presence_cfg = presence_cfg if isinstance(presence_cfg, dict) else {}
        broadcast_cfg = config.get("broadcast")
        broadcast_cfg = broadcast_cfg if isinstance(broadcast_cfg, dict) else {}
        old = conn.channels.get(topic)
        if old is not None:
            # A second join of a joined topic replaces the first: close it under its join_ref.
            self._send(conn, Message(topic, EVENT_CLOSE, {}, old.join_ref, old.join_ref))
            self._leave(conn, topic)
        tracked = join.tracked
        channel = Channel(
            join_ref=msg.join_ref if msg.join_ref is not None else msg.ref,
            key=key,
            tracked=tracked,
            presence=_flag(presence_cfg.get("enabled"), True),
            self_broadcast=_flag(broadcast_cfg.get("self"), False),
            ack_broadcast=_flag(broadcast_cfg.get("ack"), False),
            private=join.private,
            access=access,
            verified=join.verified,
        )
        conn.channels[topic] = channel
        if self.key_claim is not None and key is not None:
            # The Tracker refuses any other key too, so a bug here cannot let one through.
            self.tracker.bind_key(conn.id, key, topic=tracked)
        if not conn.joined:  # a reconnect storm counts sockets that join, not handshakes
            conn.joined = True
            self._window_joined.append(conn.id)
        t = self._topics.get(tracked)
        if t is None:
            unsubscribe = self.tracker.subscribe(tracked, self._fan_out, send_state=False, raw=True)
            t = self._topics[tracked] = _Topic(topic, unsubscribe)
        t.members[conn.id] = conn
        self._place(conn, t, channel)
        self._schedule(conn, topic, channel)
        # The join's reply carries the join's ref as both ref and join_ref.
        reply = Message(topic, msg.event, None, msg.ref, channel.join_ref)
        self._reply(conn, reply, "ok", {"postgres_changes": []})
        if channel.presence and access.presence_read:
            state = self.tracker.initial_state_json(tracked)
            self._send_raw(conn, topic, "presence_state", state, channel.join_ref)

    def _place(self, conn: Connection, t: _Topic, channel: Channel) -> None:
        """Put a member where its access lets it read: broadcasts, presence diffs."""
        if channel.access.broadcast_read:
            t.readers[conn.id] = conn
        else:
            t.readers.pop(conn.id, None)
        listeners = t.listeners[conn.version - 1]
        if channel.presence and channel.access.presence_read:
            listeners[conn.id] = conn
        else:
            listeners.pop(conn.id, None)

    # -- token expiry --------------------------------------------------------------------------

    def _schedule(self, conn: Connection, topic: str, channel: Channel) -> None:
        """Look at the channel's token again when it expires, and at least every hour."""
        verified = channel.verified
        if verified is None:
            return
        channel.serial = next(self._serials)
        at = min(verified.expires_at, time.time() + _TOKEN_RECHECK)
        deadlines = self._deadlines
        heapq.heappush(deadlines, (at, channel.serial, conn.id, topic))
        if len(deadlines) > self._deadlines_limit:
            # Channels that left keep their entries until due: drop them now and then, so
            # churn under long-lived tokens cannot grow the heap without bound.
            live = [entry for entry in deadlines if self._timer_live(entry)]
            heapq.heapify(live)
            self._deadlines = live
            self._deadlines_limit = max(1024, 2 * len(live))

    def _timer_live(self, entry: tuple[float, int, int, str]) -> Channel | None:
        _, serial, conn_id, topic = entry
        conn = self._conns.get(conn_id)
        channel = None if conn is None else conn.channels.get(topic)
        return channel if channel is not None and channel.serial == serial else None

    def _expire_tokens(self, now: float) -> None:
        """Close every channel whose token has expired (a ``system`` error, then
        ``phx_close``), as Supabase Realtime does; the others are rescheduled."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            entry = heapq.heappop(deadlines)
            channel = self._timer_live(entry)
            if channel is None or channel.verified is None:
                continue
            conn = self._conns[entry[2]]
            expires_at = channel.verified.expires_at
            if expires_at > now:  # the hourly look: still valid
                self._schedule(conn, entry[3], channel)
                continue
            renewing = channel.renewing
            if (
                renewing is not None
                and renewing.expires_at > now
                and now - expires_at < _RENEW_GRACE  # a policy that hangs fails closed
            ):
                # Refreshed in time; the policy has yet to answer for the new token.
                heapq.heappush(deadlines, (now + 0.25, entry[1], entry[2], entry[3]))
                continue
            reason = expired_reason(now, expires_at)
            audit("token_expired", conn=conn.id, topic=entry[3])
            message = Message(entry[3], "access_token", None, None, channel.join_ref)
            self._close_channel(conn, message, reason)
            deadlines = self._deadlines  # a reschedule may have rebuilt it

    def _leave(self, conn: Connection, topic: str) -> None:
        """The channel ends: out of the topic's members, and its presence leaves."""
        tracked = self._leave_members(conn, topic)
        if tracked is not None:
            self.tracker.untrack(conn.id, tracked)

    def _leave_members(self, conn: Connection, topic: str) -> str | None:
        """Take the channel out of the topic's members; returns its Tracker topic."""
        channel = conn.channels.pop(topic, None)
        if channel is None:
            return None
        tracked = channel.tracked
        if self.key_claim is not None:
            self.tracker.unbind_key(conn.id, topic=tracked)
        t = self._topics.get(tracked)
        if t is None:
            return tracked
        t.members.pop(conn.id, None)
        t.readers.pop(conn.id, None)
        t.listeners[conn.version - 1].pop(conn.id, None)
        if not t.members:
            del self._topics[tracked]
            t.unsubscribe()
        return tracked

    def _presence(self, conn: Connection, msg: Message) -> None:
        channel = conn.channels[msg.topic]
        action = parse_client_presence(msg)
        if not channel.access.presence_write:
            reason = (
                "Unauthorized: You do not have permissions to write presence to this Channel topic"
            )
            self._reply(conn, msg, "error", {"reason": reason})
            return
        try:
            if action.kind == "track":
                if channel.key is None:
                    self._reply(conn, msg, "error", {"reason": self._unbound_reason()})
                    return
                self.tracker.track(conn.id, channel.tracked, channel.key, action.meta)
            else:
                self.tracker.untrack(conn.id, channel.tracked)
        except RateLimited as exc:
            audit("limit_hit", conn=conn.id, topic=msg.topic, limit=exc.limit)
            self._close_channel(conn, msg, "Client presence rate limit exceeded")
            return
        except QuotaExceeded as exc:
            audit("limit_hit", conn=conn.id, topic=msg.topic, limit=exc.limit)
            self._close_channel(conn, msg, f"Presence limit {exc.limit} reached ({exc.value})")
            return
        except PresenceError as exc:
            self._reply(conn, msg, "error", {"reason": str(exc)})
            return
        self._reply(conn, msg, "ok", {})

    def _text_broadcast(self, conn: Connection, msg: Message, data: bytes) -> None:
        """A ``broadcast`` push in a text frame.  Its payload is relayed as the client wrote
        it (numbers such as ``1e9`` unchanged) when it is a v2 array whose payload holds just
        ``type``, ``event`` and ``payload``; otherwise it is re-encoded."""
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        event = payload.get("event")
        if not isinstance(event, str):
            # realtime-js matches listeners with event.toLocaleLowerCase(): another type
            # would break every such member of the topic.
            self._reply(conn, msg, "error", {"reason": "a broadcast's event must be a string"})
            return
        if not self._admit_broadcast(conn, msg):
            return
        raw = None
        if (
            conn.version == 2
            and payload.get("type") == "broadcast"
            and payload.keys() <= _BROADCAST_KEYS
        ):
            head = _V2_HEAD.match(data)
            tail = data.rstrip()
            if head is not None and tail.endswith(b"]"):
                raw = tail[head.end() : -1].strip()
        if raw is None:
            raw = _dumps({"type": "broadcast", "event": event, "payload": payload.get("payload")})
        self._broadcast(conn, msg, raw)

    def _binary_push(self, conn: Connection, data: bytes) -> tuple[Message, str, bytes, int]:
        """realtime-js v2's user broadcast push (kind 3): the message, its event, its payload
        bytes and their encoding (1: JSON, 0: binary).  The payload is not looked at here."""
        if len(data) < 7 or data[0] != 3:
            raise ProtocolError("unknown binary frame")
        sizes = data[1:6]
        encoding = data[6]
        if encoding not in (0, 1):
            raise ProtocolError(f"unknown binary payload encoding {encoding}")
        at = 7
        parts = []
        for size in sizes:
            if at + size > len(data):
                raise ProtocolError("binary frame shorter than its header says")
            parts.append(data[at : at + size].decode("utf-8"))
            at += size
        join_ref, ref, topic, event, _metadata = parts
        msg = Message(topic, "broadcast", None, ref or None, join_ref or None)
        return msg, event, data[at:], encoding

    def _binary_broadcast(
        self, conn: Connection, msg: Message, event: str, body: bytes, encoding: int
    ) -> None:
        """A kind-3 push, relayed as a text broadcast, which every client reads (phoenix.js
        reads no binary broadcast, and a socket does not say which client it is).  A JSON
        payload goes out as the bytes that came; a binary one as an array of byte values.
        Membership, rate and size are checked before the payload is read or converted."""
        if msg.topic not in conn.channels:
            self._reply(conn, msg, "error", {"reason": "unmatched topic"})
            return
        if not self._admit_broadcast(conn, msg):
            return
        if encoding == 1:
            orjson.loads(body)  # relayed as JSON text, so it must be JSON (else: 1007)
            payload = body
        else:
            # Up to 4 bytes a value ("255,"): refuse what cannot fit before building it.
            if len(body) * 4 > self.limits.max_frame_bytes:
                self._too_large(conn, msg, len(body) * 4)
                return
            payload = _dumps(list(body))
        raw = b"".join(
            (b'{"type":"broadcast","event":', _dumps(event), b',"payload":', payload, b"}")
        )
        self._broadcast(conn, msg, raw)

    def _admit_broadcast(self, conn: Connection, msg: Message) -> bool:
        """Check the channel may broadcast, and spend one broadcast from the socket's
        bucket; or answer why not."""
        if not conn.channels[msg.topic].access.broadcast_write:
            reason = "Unauthorized: You do not have permissions to write to this Channel topic"
            self._reply(conn, msg, "error", {"reason": reason})
            return False
        try:
            conn.broadcasts_tat = admit(
                self._broadcast_rate, conn.broadcasts_tat, time.monotonic(), conn.id
            )
        except RateLimited:
            self._limit_hit("broadcasts_per_second", conn=conn.id, topic=msg.topic)
            self._reply(conn, msg, "error", {"reason": "broadcast rate limit exceeded"})
            return False
        return True

    def _too_large(self, conn: Connection, msg: Message, size: int) -> None:
        limit = self.limits.max_frame_bytes
        self._limit_hit("max_frame_bytes", conn=conn.id, topic=msg.topic)
        reason = f"broadcast too large: {size} bytes relayed, over the limit of {limit}"
        self._reply(conn, msg, "error", {"reason": reason})

    def _broadcast(self, conn: Connection, msg: Message, raw: bytes) -> None:
        """Relay one admitted broadcast, ``raw`` its JSON payload, to the topic's members."""
        channel = conn.channels[msg.topic]
        frames = [
            _wire(1, msg.topic, "broadcast", raw, None),
            _wire(2, msg.topic, "broadcast", raw, None),
        ]
        # What we relay must be what we would accept ourselves: clients with the same
        # 1 MiB limit would disconnect on a larger frame.
        size = max(len(frames[0]), len(frames[1]))
        if size > self.limits.max_frame_bytes:
            self._too_large(conn, msg, size)
            return
        t = self._topics.get(channel.tracked)
        if t is not None:
            framed: list[bytes | None] = [None, None]
            for member in t.readers.values():
                if member is conn and not channel.self_broadcast:
                    continue
                frame = framed[member.version - 1]
                if frame is None:
                    frame = framed[member.version - 1] = text_frame(frames[member.version - 1])
                member.write(frame)
        if channel.ack_broadcast:
            self._reply(conn, msg, "ok", {})

    def _close_channel(self, conn: Connection, msg: Message, reason: str) -> None:
        """End one channel the way Supabase does: a ``system`` error, then ``phx_close``."""
        topic = msg.topic
        system = {"message": reason, "status": "error", "extension": "system", "channel": topic}
        self._send(conn, Message(topic, "system", system, None, msg.join_ref))
        join_ref = conn.channels[topic].join_ref if topic in conn.channels else msg.join_ref
        self._leave(conn, topic)
        self._send(conn, Message(topic, EVENT_CLOSE, {}, join_ref, join_ref))

    # -- writing -------------------------------------------------------------------------------

    def _reply(self, conn: Connection, msg: Message, status: str, response: Any) -> None:
        payload = {"status": status, "response": response}
        self._send(conn, Message(msg.topic, EVENT_REPLY, payload, msg.ref, msg.join_ref))

    def _send(self, conn: Connection, msg: Message) -> None:
        conn.send(encode(msg, conn.version))

    def _send_raw(
        self, conn: Connection, topic: str, event: str, raw: bytes, join_ref: str | None
    ) -> None:
        conn.send(_wire(conn.version, topic, event, raw, join_ref))

    def _fan_out(self, topic: str, event: str, payload: Any) -> None:
        """The Tracker's raw hook: one diff, as JSON bytes, to every member of the topic.

        A write never changes who is in a topic: a slow reader found by a write is cut after
        this walk (`Connection.pause_writing`), so the walk needs no copy of the members.
        """
        t = self._topics.get(topic)
        if t is None:
            return
        v1, v2 = t.listeners
        if v1:
            frame = text_frame(_wire(1, t.wire, event, payload, None))
            for conn in v1.values():
                conn.write(frame)
        if v2:
            frame = text_frame(_wire(2, t.wire, event, payload, None))
            for conn in v2.values():
                conn.write(frame)


def _access(answer: object) -> Access:
    """A policy's answer: an `Access`, else (a bug in the policy) nothing is allowed."""
    if isinstance(answer, Access):
        return answer
    logger.error("the policy returned %s, not an Access; refusing", type(answer).__name__)
    return Access.NONE


def _wire(version: int, topic: str, event: str, raw: bytes, join_ref: str | None) -> bytes:
    """A server push as JSON, around a payload already encoded as JSON."""
    if version == 2:
        head = [b"[", _dumps(join_ref), b",null,", _dumps(topic), b",", _dumps(event), b","]
        return b"".join(head) + raw + b"]"
    head = [b'{"ref":null,"topic":', _dumps(topic), b',"event":', _dumps(event), b',"payload":']
    return b"".join(head) + raw + b"}"


def _error(status: http.HTTPStatus, reason: str) -> Response:
    """A refused HTTP request, in the shape Supabase's clients read: ``{"error": reason}``."""
    return _response(status, _dumps({"error": reason}), "application/json")


def _response(status: http.HTTPStatus, body: bytes, content_type: str = "text/plain") -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)
