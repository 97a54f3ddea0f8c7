"""Presence over ASGI: the Phoenix/Supabase Realtime protocol as an ASGI 3 application.

`PresenceApp` speaks the same protocol as ``presence-core serve``, through the same core
(`presence_core.protocol.PhoenixCore`), to phoenix.js, realtime-js and Supabase's Python
client, unmodified.  It needs nothing but the ASGI spec, so any ASGI server runs it (uvicorn,
hypercorn, granian) and any ASGI framework mounts it::

    presence = PresenceApp(Tracker())
    app = Starlette(routes=[Mount("/realtime", presence)], lifespan=presence.lifespan)

* WebSockets at any path ending in ``/websocket``; ``GET /health``, ``/health/live``,
  ``/health/ready`` and ``/metrics`` as ``serve`` answers them (paths are taken relative to
  ``root_path``, so a mounted app answers ``/realtime/health``).
* Its lifespan starts and stops the tick (token expiry, the heartbeat TTL, flushes) and the
  `RedisStore`, if one is given.  A mounted app never receives lifespan events (Starlette
  routes only HTTP and WebSockets to mounts), so the host passes `PresenceApp.lifespan` to its
  own ``lifespan=`` (or enters it with ``async with``).
* A host that authenticates sockets itself (a FastAPI dependency, a session cookie) hands each
  socket to `PresenceApp.serve` with the presence ``key`` it chose: every channel of that
  socket tracks under that key, and a join that asks for another is refused.
* Each socket has one writer and a bounded queue (``max_buffered_bytes``): the core never
  awaits a send, and a client that reads slower than its topics change is closed (1013)
  instead of holding ever more memory.
* uvicorn closes every socket with 1012 (service restart) before the lifespan's shutdown.
  Those sockets are a hand-over, not leaves: their presences stay for `handover_seconds` (or
  until shutdown, which then leaves them in Redis to expire on their own), so the peers do not
  see everyone leave at once.  Claiming them on reconnect is the lifecycle work to come.

**Tokens in logs.**  uvicorn logs each accepted socket's path *with its query string* at INFO,
so a token sent as ``?apikey=...`` lands in the access log.  Send it as the ``x-api-key``
header where the client allows, or install `RedactTokens` on uvicorn's loggers (see
`RedactTokens.install`), which blanks ``apikey``, ``token`` and ``access_token`` values.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import orjson

from ._validate import is_loopback
from .audit import audit
from .driver import CoreDriver
from .errors import PresenceValueError, RateLimited
from .limits import Limits, admit
from .protocol import (
    Action,
    AuthHook,
    Close,
    Fanout,
    PhoenixCore,
    Send,
    ServerLimits,
    Session,
)
from .protocol import health as endpoints
from .tracker import Tracker

if TYPE_CHECKING:
    from .auth import JwtVerifier
    from .store import RedisStore
    from .typing import Policy

__all__ = ["PresenceApp", "RedactTokens", "from_environment"]

logger = logging.getLogger("presence_core.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
ASGISend = Callable[[Message], Awaitable[None]]

_SLOW = 1013  # "try again later": the client reads slower than its topics change
_HANDOVER = 5.0  # seconds a socket closed with 1012 keeps its presences
_CLOSE_TIMEOUT = 5.0  # seconds a socket we close may take to end before we stop serving it
_THROTTLED = 1.0  # seconds a socket may stay over its message rate before it is closed
_HELD_BYTES = 64 << 10  # bytes a socket may send while an async hook answers
_JSON = [(b"content-type", b"application/json")]
_RESTART = -1012  # `_read`'s code for the ASGI server's own 1012


class _Socket(Session):
    """One ASGI WebSocket: its Phoenix state, and its queue of messages to send."""

    __slots__ = ("outbox", "queued", "wakeup", "closed", "frames_tat", "throttled", "held")

    def __init__(self, session_id: int) -> None:
        Session.__init__(self, session_id)
        self.outbox: deque[str | tuple[int, str]] = deque()
        self.queued = 0  # characters in the outbox
        self.wakeup = asyncio.Event()  # the writer has something to send
        self.closed = asyncio.Event()  # a close is queued: nothing more goes out
        self.frames_tat = float("-inf")
        self.throttled: float | None = None  # held back by the message rate since then
        self.held = 0  # bytes received while an async hook answers

    @property
    def closing(self) -> bool:
        return self.closed.is_set()


class PresenceApp:
    """An ASGI 3 application serving presence in the Phoenix/Supabase protocol.

    Args:
        tracker: The presence state (a new in-process `Tracker` if None).
        store: A `RedisStore` attached to ``tracker``: the lifespan starts and stops it, and
            ``/health`` reports it.
        limits, auth, verifier, key_claim, policy, private_only, allowed_origins,
            allow_anonymous: As for `presence_core.server.PresenceServer`, enforced by the
            same protocol core.  Without authentication (none of these, and no ``key`` given
            to `serve`), sockets that reach the app on an address other than loopback are
            refused (403) unless ``allow_anonymous``, as ``serve`` refuses to listen there.
            ``max_frame_bytes`` bounds a received message (the ASGI server's own limit, such
            as uvicorn's ``--ws-max-size``, applies first).
        handover_seconds: How long a socket the ASGI server closed with 1012 (a restart)
            keeps its presences (see the module).
    """

    def __init__(
        self,
        tracker: Tracker | None = None,
        *,
        store: RedisStore | None = None,
        limits: ServerLimits | None = None,
        auth: AuthHook | None = None,
        verifier: JwtVerifier | None = None,
        key_claim: str | None = None,
        policy: Policy | None = None,
        private_only: bool = False,
        allowed_origins: Sequence[str] | None = None,
        allow_anonymous: bool = False,
        handover_seconds: float = _HANDOVER,
    ) -> None:
        self.tracker = tracker if tracker is not None else Tracker()
        self.store = store
        self.core = PhoenixCore(
            self.tracker,
            limits=limits,
            auth=auth,
            verifier=verifier,
            key_claim=key_claim,
            policy=policy,
            private_only=private_only,
            allowed_origins=allowed_origins,
            allow_anonymous=allow_anonymous,
        )
        self.limits = self.core.limits
        self.driver = CoreDriver(
            self.core, self._execute, release=self._release, on_tick=self._periodic
        )
        self.handover_seconds = float(handover_seconds)
        frames = self.limits.messages_per_second
        self._frames_rate = Limits(rate_per_second=frames, burst=max(1, round(frames)))
        self._ids = itertools.count(1)
        self._accepting = False
        self._draining = False
        self._per_ip: dict[str, int] = {}
        self._open = 0  # sockets from their accept until `serve` returns
        # Sockets the ASGI server closed with 1012: Tracker connection -> (deadline, address).
        self._handed: dict[int, tuple[float, str | None]] = {}
        self._ran = False
        self._warned_open = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the store (if any) and the tick; sockets are accepted from now on."""
        if self._accepting:
            return
        if self._ran:
            raise PresenceValueError(
                "a PresenceApp runs once (its store and Tracker are spent): make a new one"
            )
        self._ran = True
        if self.store is not None:
            await self.store.start()
        self.driver.start()
        self._accepting = True
        self._draining = False

    async def stop(self) -> None:
        """Close the sockets still open (1001; their presences leave), stop the tick and the
        store.  Presences handed over (1012) are left in Redis to expire on their own."""
        self._accepting = False
        self._draining = True
        for session in list(self.core.sessions.values()):
            self.core.disconnect(session, "shutdown")
            self._queue_close(session, 1001, "server stopping")  # type: ignore[arg-type]
        # Handed-over connections stay in the Tracker, so that the last flush announces no
        # leave for them, and the store leaves them in Redis for the peers to expire.
        handed = bool(self._handed)
        self._handed.clear()
        await self.driver.stop()
        if self.store is not None:
            await self.store.stop(remove_members=not handed)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """``async with presence.lifespan():`` runs the app; pass it as a host's
        ``lifespan=`` (Starlette, FastAPI), which calls it with the host app."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def begin_drain(self) -> None:
        """``/health/ready`` answers 503 from now on, while everyone is still served."""
        self._draining = True

    @property
    def connections(self) -> int:
        """Open sockets."""
        return len(self.core.sessions)

    def _periodic(self, now: float) -> None:
        if self._handed:
            wall = time.time()
            for conn_id, (deadline, address) in list(self._handed.items()):
                if deadline <= wall:
                    del self._handed[conn_id]
                    self.tracker.disconnect(conn_id)
                    self._left(address)

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.serve(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: ASGISend) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    logger.exception("presence startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.stop()
                except Exception as exc:
                    logger.exception("presence shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: ASGISend) -> None:
        path = _route_path(scope)
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            answer: endpoints.Answer = (405, "text/plain", b"method not allowed\n")
        elif path in ("/health", "/health/ready"):
            answer = endpoints.health(
                self.tracker,
                self.store,
                accepting=self._accepting,
                draining=self._draining,
                connections=len(self.core.sessions),
                ready=path == "/health/ready",
            )
        elif path == "/health/live":
            answer = endpoints.live()
        elif path == "/metrics":
            answer = endpoints.metrics(self.tracker)
        else:
            answer = (404, "text/plain", b"not found\n")
        status, content_type, body = answer
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def serve(
        self, scope: Scope, receive: Receive, send: ASGISend, *, key: str | None = None
    ) -> None:
        """Serve one WebSocket (an ASGI ``websocket`` scope) until it ends.

        ``key``: the presence key the host chose for this socket (its own authentication
        decided it); every channel of the socket tracks under it, and a join that asks for
        another is refused.  Raises `PresenceValueError` for a key the Tracker would refuse.
        """
        if key is not None:
            self.tracker.check_key(key)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not _route_path(scope).endswith("/websocket"):
            await self._refuse(scope, send, 404, "not found")
            return
        if key is None and not self.core.auth_enabled and not self.core.allow_anonymous:
            server = scope.get("server")
            if server and not is_loopback(server[0]):
                # As serve refuses to listen beyond loopback without authentication: a door
                # reachable from elsewhere that identifies nobody must be asked for.
                if not self._warned_open:
                    self._warned_open = True
                    logger.error(
                        "refusing sockets on %r: this presence app authenticates nobody; give "
                        "it a verifier, a policy or an auth hook, serve(..., key=) from your "
                        "own authenticated route, or allow_anonymous=True",
                        server[0],
                    )
                self.tracker.record_disconnect("refused_handshake")
                await self._refuse(scope, send, 403, "this server authenticates nobody")
                return
        if not self._accepting:
            if not self.driver.running:
                logger.error(
                    "a socket arrived before the presence app started: run its lifespan, or "
                    "pass presence.lifespan to the host's lifespan= (a mounted app gets none)"
                )
            self.tracker.record_disconnect("refused_handshake")
            await self._refuse(scope, send, 503, "not serving")
            return
        # Sockets count from before their accept (which may yield to other handshakes) until
        # `serve` returns, and handed-over ones until their presences go: a socket we closed
        # but whose client never reads still holds its buffers.
        if self._open + len(self._handed) >= self.limits.max_connections:
            self.core.refuse_handshake("max_connections", self.limits.max_connections)
            await self._refuse(scope, send, 503, "too many connections")
            return
        address = None
        per_ip = self.limits.max_connections_per_ip
        if per_ip is not None:
            client = scope.get("client")
            address = str(client[0]) if client else "?"
            if self._per_ip.get(address, 0) >= per_ip:
                self.core.refuse_handshake("max_connections_per_ip", per_ip)
                await self._refuse(scope, send, 429, "too many connections from one address")
                return
        sock = _Socket(next(self._ids))
        try:
            origin = _header(scope, b"origin")
            api_key = _header(scope, b"x-api-key")
        except ValueError as exc:
            await self._refuse(scope, send, 400, str(exc))
            return
        query = scope.get("query_string", b"").decode("latin-1")
        refused = self.core.authenticate(
            sock, origin=origin, api_key=api_key, query=query, now=time.time()
        )
        if refused is not None:
            await self._refuse(scope, send, refused.status, refused.reason)
            return
        sock.key = key
        self._open += 1
        if address is not None:
            self._per_ip[address] = self._per_ip.get(address, 0) + 1
        handed = False
        try:
            await send({"type": "websocket.accept"})
            handed = await self._run(sock, receive, send)
        finally:
            self._open -= 1
            if not handed:
                self._left(address)
            elif sock.id in self._handed:
                self._handed[sock.id] = (self._handed[sock.id][0], address)

    async def _run(self, sock: _Socket, receive: Receive, send: ASGISend) -> bool:
        """An accepted socket until it ends; True if it was handed over (see the module)."""
        reader = asyncio.ensure_future(self._read(sock, receive))
        writer = asyncio.ensure_future(self._write(sock, send))
        closed = asyncio.ensure_future(sock.closed.wait())
        code = 1006
        try:
            self.core.connect(sock, time.time())
            self.driver.drain()
            await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                # We close it: the close goes out, and the client's answer ends the reader.
                # A client that reads nothing never lets the close out; it is not served
                # past the bound (its buffers are the ASGI server's to drop).
                await asyncio.wait({reader}, timeout=_CLOSE_TIMEOUT)
            if reader.done() and not reader.cancelled() and reader.exception() is None:
                code = reader.result()
        finally:
            for task in (reader, writer, closed):
                task.cancel()
            await asyncio.gather(reader, writer, closed, return_exceptions=True)
            self.driver.ended(sock)
            handed = code == _RESTART and sock.id in self.core.sessions
            if handed:
                # The ASGI server is restarting: a hand-over, not a leave (see the module).
                self.core.disconnect(sock, None, keep_presences=True)
                self._handed[sock.id] = (time.time() + self.handover_seconds, None)
            else:
                self.core.disconnect(sock)
            if self.driver.running:
                self.driver.flush_soon()
        return handed

    def _left(self, address: str | None) -> None:
        if address is not None:
            left = self._per_ip.pop(address, 1) - 1
            if left:
                self._per_ip[address] = left

    async def _read(self, sock: _Socket, receive: Receive) -> int:
        """Hand the socket's messages to the core until it ends; returns its close code
        (`_RESTART` only for the ASGI server's own restart)."""
        max_size = self.limits.max_frame_bytes
        driver = self.driver
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                code = int(message.get("code", 1005))
                # uvicorn's own shutdown disconnect has no reason; a client's close frame
                # always brings one (maybe empty).  A client's 1012 is a plain close: it
                # must not leave presences behind.
                if code == 1012 and "reason" not in message:
                    return _RESTART
                return 1000 if code == 1012 else code
            if kind != "websocket.receive" or sock.closing:
                continue  # what comes after a close is not read (the core dropped it)
            text = message.get("text")
            if text is not None:
                data = text.encode("utf-8")
                binary = False
            else:
                data = message.get("bytes") or b""
                binary = True
            if len(data) > max_size:
                self.core.fail(sock, 1009, "message too big", "limit")
                driver.drain()
                continue
            if not await self._paced(sock):
                self.core.fail(sock, 1008, "message rate limit exceeded", "limit")
                driver.drain()
                continue
            self._deliver(sock, data, binary)

    async def _paced(self, sock: _Socket) -> bool:
        """Spend one message of the socket's rate (`ServerLimits.messages_per_second`),
        waiting for the bucket as serve leaves a flood unread; False once the socket has been
        over its rate for `_THROTTLED` seconds in a row.  The ASGI server reads ahead of us
        (uvicorn up to 256 KiB), so such a client is closed rather than followed through its
        whole backlog, with its close unseen meanwhile."""
        rate = self._frames_rate
        try:
            sock.frames_tat = admit(rate, sock.frames_tat, time.monotonic(), sock.id)
            sock.throttled = None
            return True
        except RateLimited as exc:
            wait = exc.retry_after
        now = time.monotonic()
        if sock.throttled is None:
            sock.throttled = now
        while now - sock.throttled <= _THROTTLED:
            await asyncio.sleep(max(wait, 0.001))
            now = time.monotonic()
            try:
                sock.frames_tat = admit(rate, sock.frames_tat, now, sock.id)
                return True  # still throttled: the next message decides
            except RateLimited as exc:
                wait = exc.retry_after
        return False

    def _deliver(self, sock: _Socket, data: bytes, binary: bool) -> None:
        if sock.waiting is not None:
            # An async hook is answering: the core queues what comes meanwhile; this bounds
            # it, and the socket is still read, so that its close is seen at once.
            sock.held += len(data)
            if sock.held > _HELD_BYTES:
                self.core.fail(sock, 1008, "too much sent while waiting for authorisation", "limit")
                self.driver.drain()
                return
        else:
            sock.held = 0
        self.driver.received(sock, data, binary)

    async def _write(self, sock: _Socket, send: ASGISend) -> None:
        """The socket's one writer: its queue, in order, then its close (if any)."""
        outbox = sock.outbox
        try:
            while True:
                if not outbox:
                    if sock.closing:
                        return
                    sock.wakeup.clear()
                    await sock.wakeup.wait()
                    continue
                item = outbox.popleft()
                if isinstance(item, str):
                    sock.queued -= len(item)
                    await send({"type": "websocket.send", "text": item})
                else:
                    code, reason = item
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                    return
        except (OSError, RuntimeError):
            # The socket is gone: ASGI 2.4 servers raise an OSError for a send after the
            # disconnect; Starlette's WebSocket wrapper raises RuntimeError.
            return

    # -- the core's actions --------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is Send:
                self._push(action.session, action.data.decode("utf-8"))  # type: ignore[arg-type]
            elif type(action) is Fanout:
                # One str per version per fan-out: ASGI frames each send itself.
                texts = (
                    None if action.v1 is None else action.v1.decode("utf-8"),
                    None if action.v2 is None else action.v2.decode("utf-8"),
                )
                skip = action.skip
                for target in action.targets:
                    if target is not skip:
                        text = texts[target.version - 1]
                        if text is not None:
                            self._push(target, text)  # type: ignore[arg-type]
            elif type(action) is Close:
                self._queue_close(action.session, action.code, action.reason)  # type: ignore[arg-type]

    def _push(self, sock: _Socket, text: str) -> None:
        if sock.closing:
            return
        sock.outbox.append(text)
        sock.queued += len(text)
        sock.wakeup.set()
        if sock.queued > self.limits.max_buffered_bytes:
            # It reads slower than its topics change: it would hold ever more memory here.
            audit("disconnected", conn=sock.id, reason="reads too slowly")
            self.core.disconnect(sock, "slow_reader")
            sock.outbox.clear()
            sock.queued = 0
            self._queue_close(sock, _SLOW, "reads too slowly")

    def _queue_close(self, sock: _Socket, code: int, reason: str) -> None:
        if sock.closing:
            return
        sock.outbox.append((code, reason))
        sock.closed.set()
        sock.wakeup.set()

    def _release(self, session: Session) -> None:
        pass  # the socket was read all along (see `_deliver`)

    async def _refuse(self, scope: Scope, send: ASGISend, status: int, reason: str) -> None:
        """Refuse a handshake: HTTP ``status`` with ``{"error": reason}`` where the server
        can send one (the ``websocket.http.response`` extension), else a close before accept
        (which the server answers 403)."""
        if "websocket.http.response" in (scope.get("extensions") or {}):
            body = orjson.dumps({"error": reason})
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": _JSON}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point.  From Starlette 0.35 a mounted app sees the full
    ``path`` and the prefix in ``root_path`` (before, ``path`` was stripped): strip the prefix
    only when ``path`` starts with it."""
    path = str(scope.get("path", "/"))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    """One request header's value (names compared without case); a header sent twice with
    different values raises `ValueError`."""
    found = None
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            text = value.decode("latin-1")
            if found is not None and found != text:
                raise ValueError(f"a repeated header: {name.decode()}")
            found = text
    return found


_SECRET_NAMES = frozenset(("apikey", "token", "access_token"))
# A query parameter: its separator, its name and its value (up to what ends a log's path).
_PARAM = re.compile(r"([?&;])([^=&;\s\"']*)=([^&;\s\"']*)")


class RedactTokens(logging.Filter):
    """A logging filter that blanks ``apikey``, ``token`` and ``access_token`` query values in
    a record's message and arguments (uvicorn logs each socket's path with its query).

    ``RedactTokens.install()`` adds it to uvicorn's loggers (``uvicorn.error``, which logs
    accepted sockets, and ``uvicorn.access``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: _redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True

    @classmethod
    def install(cls, *names: str) -> RedactTokens:
        """Add one filter to each named logger (by default uvicorn's); returns it."""
        instance = cls()
        for name in names or ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).addFilter(instance)
        return instance


def _redact(text: str) -> str:
    if "=" not in text:
        return text

    def blank(match: re.Match[str]) -> str:
        # Names as the server reads them: ``api%6Bey`` is ``apikey`` to parse_qs.
        name = unquote_plus(match[2]).lower()
        if name in _SECRET_NAMES:
            return f"{match[1]}{match[2]}=[redacted]"
        return match[0]

    return _PARAM.sub(blank, text)


def from_environment(
    argv: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> PresenceApp:
    """A `PresenceApp` configured as ``presence-core serve`` would be: from ``serve``'s options
    in ``argv``, the environment (``PRESENCE_CORE_*``, ``REDIS_URL``; see the README) and
    ``--config`` (``PRESENCE_CORE_CONFIG``): the same limits, Tracker, store and
    authentication.  What is about listening (host, port, workers, logs, the dashboard)
    belongs to the ASGI server.  It also installs `RedactTokens` on uvicorn's loggers.  For
    an ASGI server's factory option::

        uvicorn --factory presence_core.asgi:from_environment
    """
    from .server.cli import components, configured

    args, verifier, policy = configured(argv, environ)
    limits, tracker, store = components(args)
    RedactTokens.install()
    return PresenceApp(
        tracker,
        store=store,
        limits=limits,
        verifier=verifier,
        key_claim=args.presence_key_claim,
        policy=policy,
        private_only=args.private_only,
        allowed_origins=args.allowed_origins,
        allow_anonymous=args.allow_anonymous,
    )
