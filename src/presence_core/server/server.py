"""A Phoenix/Supabase Realtime-compatible WebSocket server in front of a Tracker.

`PresenceServer` speaks the Phoenix channel protocol that phoenix.js, Supabase's realtime-js
and Supabase's Python client (``realtime``) use, unmodified: v1 (JSON objects, the Python
client) and v2 (JSON arrays, the JS clients, plus realtime-js's binary broadcast pushes).  It
serves WebSockets at any path ending in ``/websocket`` and, on the same port, ``GET /health``,
``GET /metrics`` and the live dashboard (``GET /``, its script under ``/static/`` and its one
JSON endpoint ``GET /api/dashboard``; see `presence_core.server.dashboard`).

The data path: a frame from a client (see `Connection`) goes to the protocol core, which makes
it a Tracker call (`track`, `untrack`, `heartbeat`...); every tick the Tracker expires silent
connections and flushes; each topic's diff reaches this server once, as the Tracker's JSON
bytes, is wrapped once per protocol version into a complete WebSocket frame and written as is
to every member's socket: never decoded, re-encoded or re-framed per subscriber. The flush runs
at the end of the event-loop iteration that read a change, so the changes of every frame read
in one iteration coalesce (a busier loop has longer iterations, hence larger diffs), and a tick
every 10 ms expires silent connections and flushes what came from elsewhere (peers through
Redis).

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

The protocol itself (join, leave, presence, broadcast, the heartbeat, the limits, tokens,
policies and bound keys) is `presence_core.protocol.PhoenixCore`'s, the same core the ASGI app
(`presence_core.asgi`) drives; this module is its asyncio door: sockets, HTTP answers, the
dashboard and the frames.  A frame over ``max_frame_bytes``, or a message of more than
``max_fragments`` frames, ends its socket with 1009.

Hostile clients: a slow reader is cut after the fan-out that found it, never during it, so the
others get every frame; a socket's frames are read at most ``messages_per_second`` (and 64 per
loop iteration), the rest wait unread in its own TCP window; audit records are rate limited
(`presence_core.audit`); ``max_connections_per_ip`` bounds one address.  ``GET /health``
(``ok``, ``degraded`` while Redis is down), ``/health/live`` and ``/health/ready`` (503 while
starting, draining or without Redis) tell orchestrators the truth.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import itertools
import logging
import time
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from .._validate import check_seconds, check_text, is_loopback
from ..audit import audit, flush_suppressed
from ..auth import JwtVerifier
from ..driver import CoreDriver
from ..errors import PresenceError, PresenceValueError
from ..limits import Limits
from ..metrics import Metrics
from ..protocol import (
    PRIVATE_PREFIX,
    Action,
    AuthHook,
    Close,
    Fanout,
    PhoenixCore,
    Send,
    ServerLimits,
    Session,
)
from ..protocol.health import health, live, metrics, redis_health
from ..scaling import ThresholdScaler
from ..tracker import Tracker
from .connection import CLOSE_TIMEOUT, Connection, text_frame
from .dashboard import Dashboard

if TYPE_CHECKING:
    from ..store import RedisStore
    from ..typing import Policy

__all__ = ["PRIVATE_PREFIX", "PresenceServer", "is_loopback"]

logger = logging.getLogger("presence_core.server")

_dumps = orjson.dumps
_BACKLOG = 4096  # pending TCP accepts: a reconnect storm arrives all at once
_SAMPLE_EVERY = 1.0  # seconds between two dashboard samples
_AUDIT_SUMMARY_EVERY = 5.0  # seconds between two reports of suppressed audit records
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


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
        # The protocol core checks the identity arguments (and raises for bad ones).
        self.core = PhoenixCore(
            tracker,
            limits=limits,
            auth=auth,
            verifier=verifier,
            key_claim=key_claim,
            policy=policy,
            private_only=private_only,
            allowed_origins=allowed_origins,
            allow_anonymous=allow_anonymous,
            wake=self._wake,
        )
        self.driver = CoreDriver(
            self.core, self._execute, release=self._release, on_tick=self._periodic
        )
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
        self.limits = self.core.limits
        self.auth = auth
        self.allow_anonymous = self.core.allow_anonymous
        self._sockets: set[Connection] = set()  # every socket past its handshake, until it ends
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._next_sample = self._next_scale = self._next_summary = 0.0
        self._accepting = False
        self._draining = False
        self._per_ip: dict[str, int] = {}  # sockets by client address (when limited)
        self._accepted = 0  # sockets from TCP accept to their end, handshake or not
        frames = self.limits.messages_per_second
        self._frames_rate = Limits(rate_per_second=frames, burst=max(1, round(frames)))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        """Whether clients are authenticated: a verifier, a policy or an auth hook is set."""
        return self.core.auth_enabled

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
        now = loop.time()
        self._next_sample = now + _SAMPLE_EVERY
        self._next_scale = now + self.scale_interval
        self._next_summary = now + _AUDIT_SUMMARY_EVERY
        self.driver.start()
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
        return self._accepting and not self._draining and redis_health(self.store) != "down"

    async def stop(self) -> None:
        """Send every client away and remove their presences (they leave for everyone)."""
        self._accepting = False
        self._draining = True
        if self._server is not None:
            self._server.close()
        conns: list[Any] = list(self.core.sessions.values())
        for conn in conns:
            self.core.disconnect(conn, "shutdown")  # presences leave now, whatever the
        self.core.actions = []  # closing handshakes do; nothing else goes out
        for conn in conns:
            conn.close(1001, "server stopping")
        # Each socket is cut CLOSE_TIMEOUT after its close frame at the latest.
        deadline = time.monotonic() + CLOSE_TIMEOUT + 0.5
        while self._sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._sockets):
            conn.abort()
        await self.driver.stop()
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
        return len(self.core.sessions)

    def _periodic(self, now: float) -> None:
        """The server's own periodic work, every tick (``now``: the loop's time)."""
        if now >= self._next_summary:
            self._next_summary = now + _AUDIT_SUMMARY_EVERY
            flush_suppressed()
        if now >= self._next_sample:
            self._next_sample = now + _SAMPLE_EVERY
            if self._dashboard is not None:
                self._dashboard.sample()
        if now >= self._next_scale:
            self._next_scale = now + self.scale_interval
            if self.tracker.scalers:
                self._run_scalers()

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

    def flush_soon(self) -> None:
        """Flush once this loop iteration's frames are read (see `CoreDriver`)."""
        self.driver.flush_soon()

    # -- sockets (called by `Connection`, as its `Owner`) -------------------------------------

    def answer(self, conn: Connection, request: Request) -> Response:
        """The answer to an HTTP request: health, metrics, or a WebSocket upgrade."""
        try:
            return self._answer(conn, request)
        except MultipleValuesError as exc:
            return _response(http.HTTPStatus(400), f"a repeated header: {exc}\n".encode())
        except Exception:  # a bug here must cost one answer, never the server's loop
            logger.exception("answering an HTTP request failed")
            return _response(http.HTTPStatus(500), b"internal error\n")

    def _endpoint(self, answer: tuple[int, str, bytes]) -> Response:
        code, content_type, body = answer
        return _response(http.HTTPStatus(code), body, content_type)

    def _answer(self, conn: Connection, request: Request) -> Response:
        url = urlsplit(request.path)
        path = url.path
        if path in ("/health", "/health/ready"):
            return self._endpoint(
                health(
                    self.tracker,
                    self.store,
                    accepting=self._accepting,
                    draining=self._draining,
                    connections=len(self.core.sessions),
                    ready=path == "/health/ready",
                )
            )
        if path == "/health/live":
            return self._endpoint(live())
        if self._dashboard is not None and (path == "/" or path.startswith(("/static/", "/api/"))):
            return self._dashboard_response(path, url.query, request.headers)
        if path == "/metrics":
            return self._endpoint(metrics(self.tracker))
        if not path.endswith("/websocket"):
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        if not self._accepting:
            self.tracker.record_disconnect("refused_handshake")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"stopping\n")
        if len(self.core.sessions) >= self.limits.max_connections:
            self.core.refuse_handshake("max_connections", self.limits.max_connections)
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n")
        per_ip = self.limits.max_connections_per_ip
        if per_ip is not None and conn.peer is not None and self._per_ip[conn.peer] > per_ip:
            self.core.refuse_handshake("max_connections_per_ip", per_ip)
            return _response(
                http.HTTPStatus.TOO_MANY_REQUESTS, b"too many connections from one address\n"
            )
        refused = self.core.authenticate(
            conn,
            origin=request.headers.get("Origin"),
            api_key=request.headers.get("x-api-key"),
            query=url.query,
            now=time.time(),
        )
        if refused is not None:
            return _error(http.HTTPStatus(refused.status), refused.reason)
        response = conn.ws.accept(request)
        if response.status_code != 101:
            conn.token = conn.verified = None
            self.tracker.record_disconnect("refused_handshake")
        return response

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

    def opened(self, conn: Connection) -> None:
        assert conn.transport is not None
        # A client that reads slower than its topics change is sent away (see `slow`).
        conn.transport.set_write_buffer_limits(high=self.limits.max_buffered_bytes)
        self._sockets.add(conn)
        self.core.connect(conn, time.time())
        self.driver.drain()

    def accept_socket(self, conn: Connection) -> bool:
        """A new TCP connection, before its handshake: False to cut it at once.

        Sockets that have not finished their handshake are bounded too, or idle ones would
        hold every file descriptor: in all, ``max_connections`` plus a backlog's worth; from
        one address (with ``max_connections_per_ip``), twice its limit, which leaves room for
        the handshakes that will be answered 429.
        """
        if self._accepted >= self.limits.max_connections + _BACKLOG:
            self.core.refuse_handshake("max_connections", self.limits.max_connections)
            return False
        per_ip = self.limits.max_connections_per_ip
        if per_ip is not None:
            assert conn.transport is not None
            peer = conn.transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            held = self._per_ip.get(address, 0)
            if held >= 2 * per_ip:
                self.core.refuse_handshake("max_connections_per_ip", per_ip)
                return False
            self._per_ip[address] = held + 1
            conn.peer = address  # counted until `closed`
        self._accepted += 1
        return True

    def closed(self, conn: Connection) -> None:
        """The end of a socket that `accept_socket` let in."""
        self._accepted -= 1
        self._sockets.discard(conn)
        self.driver.ended(conn)
        self.core.disconnect(conn)
        if conn.peer is not None:
            left = self._per_ip.pop(conn.peer, 1) - 1
            if left:
                self._per_ip[conn.peer] = left
            conn.peer = None
        if self._accepting:
            self.flush_soon()

    def slow(self, conn: Connection) -> None:
        """Cut a client that reads slower than its topics change (called soon after
        `Connection.pause_writing`, never inside a fan-out)."""
        if conn.id in self.core.sessions:
            audit(
                "disconnected", conn=conn.id, reason="reads too slowly", limit="max_buffered_bytes"
            )
            self.core.disconnect(conn, "slow_reader")
        conn.abort()

    def dropped(self, conn: Connection, why: str | None) -> None:
        """A socket is ending: a close frame (``why`` None) or a protocol or limit fault."""
        if why is not None and conn.id in self.core.sessions:
            audit("disconnected", conn=conn.id, reason=why)
        self.core.disconnect(conn, why)

    # -- driving the protocol core -------------------------------------------------------------

    def received(self, conn: Connection, data: bytes, binary: bool) -> None:
        """One message from a client, to the protocol core."""
        self.driver.received(conn, data, binary)

    def _wake(self) -> None:
        self.driver.drain()

    def _release(self, session: Session) -> None:
        conn: Any = session
        conn.release()

    def _execute(self, actions: list[Action]) -> None:
        """Do the protocol core's actions, in order (see `presence_core.protocol`)."""
        for action in actions:
            if type(action) is Send:
                conn: Any = action.session  # ours: a Connection
                conn.send(action.data)
            elif type(action) is Fanout:
                self._fan_out(action)
            elif type(action) is Close:
                conn = action.session
                if action.fail:
                    conn.fail(action.code, action.reason, None)
                else:
                    conn.close(action.code, action.reason)

    def _fan_out(self, fanout: Fanout) -> None:
        """One message to many sockets, framed once per protocol version.

        A write never changes who is in a topic: a slow reader found by a write is cut after
        this walk (`Connection.pause_writing`).
        """
        targets, v1, v2, skip = fanout
        conns: Any = targets
        if v1 is None or v2 is None:  # a diff: its listeners all speak one version
            frame = text_frame(v1 if v2 is None else v2)  # type: ignore[arg-type]
            if skip is None:
                for conn in conns:
                    conn.write(frame)
            else:
                for conn in conns:
                    if conn is not skip:
                        conn.write(frame)
            return
        framed: list[bytes | None] = [None, None]
        for conn in conns:
            if conn is skip:
                continue
            frame = framed[conn.version - 1]
            if frame is None:
                frame = framed[conn.version - 1] = text_frame(v1 if conn.version == 1 else v2)
            conn.write(frame)


def _error(status: http.HTTPStatus, reason: str) -> Response:
    """A refused HTTP request, in the shape Supabase's clients read: ``{"error": reason}``."""
    return _response(status, _dumps({"error": reason}), "application/json")


def _response(status: http.HTTPStatus, body: bytes, content_type: str = "text/plain") -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)
