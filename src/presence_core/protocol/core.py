"""The Phoenix channel protocol as a core without I/O, for any front door.

`PhoenixCore` holds everything about the Phoenix channel: sockets' identities (their tokens,
verified at the handshake, at a join and when refreshed), their channels, join and leave,
presence through the `Tracker`, broadcasts, the heartbeat, the limits, private channels and
their policies, presence keys bound to a claim, and token expiry.  It reads no clock, opens no
socket and never awaits:

* **Inputs** are calls: `authenticate` (a handshake's origin, token and query), `connect` (the
  socket is open), `receive` (one complete WebSocket message, text or binary), `settle` (the
  answer of an async auth hook or policy), `disconnect`, `handle_timer` and `flush`.  Each takes
  ``now``, Unix seconds, from the door's clock.
* **Outputs are pulled**: every input appends actions to `actions` (`take_actions` empties it),
  in the order they must happen: `Send` one text message to a socket, `Fanout` one message to
  many (the door frames it once per protocol version), `Close` a socket, `Defer` (await this
  for that socket, then `settle`).
* **Timers** are asked of the core: `next_deadline` is when `handle_timer` is next due (a
  token's expiry, the heartbeat TTL check, the reconnect-storm window); `flush_at` is when the
  next `flush` may start.  The Tracker the core drives keeps its own clock (injectable; see
  `Tracker`), because its timestamps are also the store's.
* **Peer faults** never raise: a frame that is not a Phoenix message closes its socket with
  1007 (a `Close` with ``fail=True``); a refused join, track or broadcast gets an error reply
  with the reason; an expired token closes its channel with a ``system`` error.  Misuse by the
  door (an unknown session) is ignored or raises `PresenceError`.

A door drives one core per process (`presence_core.server.PresenceServer` over asyncio sockets,
`presence_core.asgi.PresenceApp` over ASGI), subclasses `Session` for its sockets, and drains
`actions` after every call: nothing else reaches the wire.

Protocol notes (checked against phoenix.js, realtime-js and Supabase's Python client):

* A join is answered ``ok`` with ``{"postgres_changes": []}`` under the join's ref, then (when
  presence is on) a ``presence_state``, even an empty one: without it both JS clients buffer
  every diff forever.  A second join of the same topic closes the first with ``phx_close``
  under the old join_ref.
* Track and untrack come as ``presence`` events, with or without ``"type"``; one meta per
  socket per topic, so a track again is an update (one diff).  The reply is ``ok {}``.
* ``presence_diff`` pushes always have ``joins`` and ``leaves`` and null refs.
* Broadcasts go to the topic's members (the sender only with ``self``); with ``ack`` the push
  is answered ``ok``.  They are relayed as text, which every client reads; a v2 text push's
  payload is relayed as the bytes that came.
* Errors that end a channel (limits, an expired token) are a ``system`` message, then
  ``phx_close``; the socket stays.  A refused join gets an error reply with the reason.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias
from urllib.parse import parse_qs

import orjson

from .._validate import check_text
from ..audit import audit
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
from .config import AuthHook, Refused, ServerLimits
from .wire import binary_push, push, v2_payload

if TYPE_CHECKING:
    from ..tracker import Tracker
    from ..typing import Policy

__all__ = [
    "PRIVATE_PREFIX",
    "Action",
    "Channel",
    "Close",
    "Defer",
    "Fanout",
    "PhoenixCore",
    "Refusal",
    "Send",
    "Session",
]

logger = logging.getLogger("presence_core.protocol")

_dumps = orjson.dumps
_EXPIRE_EVERY = 0.01  # seconds between two looks for connections silent past their TTL
_STORM_SOCKETS = 200.0  # new sockets a second that make a reconnect storm...
_STORM_SHARE = 0.01  # ...if they are also at least this share of the connections a second
_STORM_WINDOW = 0.25  # seconds over which new sockets are counted: a storm ends this soon
_STORM_INTERVAL = 0.5  # seconds between two flushes during a storm
_CLOSE_REASON = 120  # bytes of a close reason (a close frame's payload is at most 125)
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


# -- what the core hands its door ------------------------------------------------------------


class Send(NamedTuple):
    """Send one text message (JSON) to one socket."""

    session: Session
    data: bytes


class Fanout(NamedTuple):
    """Send one message to many sockets: ``v1`` to those that speak v1, ``v2`` to the others
    (None where no target needs it), skipping ``skip``.  The door frames each version once."""

    targets: tuple[Session, ...]
    v1: bytes | None
    v2: bytes | None
    skip: Session | None


class Close(NamedTuple):
    """Close a socket with ``code`` and ``reason``.  ``fail``: it broke the protocol or a limit,
    so nothing more is read from it (else the door runs the closing handshake).  The core has
    already dropped the session."""

    session: Session
    code: int
    reason: str
    fail: bool


class Defer(NamedTuple):
    """Await ``awaitable`` (an async auth hook or policy) for ``session``, then hand the
    result, or the exception it raised, to `PhoenixCore.settle`.  Until then the core queues
    that socket's messages: the door should stop reading it (see `Session.waiting`)."""

    session: Session
    awaitable: Awaitable[Any]


class Refusal(NamedTuple):
    """A refused handshake: answer HTTP ``status`` with ``{"error": reason}``."""

    status: int
    reason: str


Action: TypeAlias = Send | Fanout | Close | Defer


@dataclass(slots=True)
class Channel:
    """One topic a socket has joined."""

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


class Session:
    """One socket's Phoenix state.  A door subclasses it (with ``__slots__``) to add its I/O;
    the core reads and writes only these fields.

    ``id`` must be unique among the process's open sockets: it is the socket's connection id
    in the Tracker.
    """

    __slots__ = (
        "id",
        "version",
        "token",
        "verified",
        "channels",
        "joins_tat",
        "broadcasts_tat",
        "joined",
        "waiting",
        "backlog",
        "key",
    )

    def __init__(self, session_id: int) -> None:
        self.id = session_id
        self.version: Literal[1, 2] = 1
        self.token: str | None = None  # the handshake's token
        self.verified: Verified | None = None  # that token, once verified
        self.channels: dict[str, Channel] = {}
        self.joins_tat = float("-inf")  # token buckets (`limits.admit`)
        self.broadcasts_tat = float("-inf")
        self.joined = False  # has joined a topic (what a reconnect storm counts)
        # An async auth hook or policy this socket waits for: (what to do with its answer,
        # the answer if it fails).  Meanwhile its messages wait in `backlog`, in order.
        self.waiting: tuple[Callable[[Any, float], None], Any] | None = None
        self.backlog: list[tuple[bytes, bool]] | None = None
        # The presence key the host chose for this socket (its own authentication decided
        # it): every channel tracks under it, and a join that asks for another is refused.
        self.key: str | None = None


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


class Topic:
    """The sockets in one topic: all of them, those that read broadcasts, and those that get
    presence, by protocol version (diffs), so a fan-out walks a ready list."""

    __slots__ = ("wire", "members", "readers", "listeners", "unsubscribe")

    def __init__(self, wire: str, unsubscribe: Callable[[], None]) -> None:
        self.wire = wire  # the topic clients know it by
        self.members: dict[int, Session] = {}
        self.readers: dict[int, Session] = {}  # members a policy lets read broadcasts
        self.listeners: tuple[dict[int, Session], dict[int, Session]] = ({}, {})
        self.unsubscribe = unsubscribe


def _flag(value: object, default: bool) -> bool:
    """A join config boolean, which clients may send as a string."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _claim_text(value: object) -> str | None:
    """A claim as a presence key: a non-empty str, or an int (not a bool) as its digits."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _origin(text: str) -> str:
    return text.strip().rstrip("/").lower()


def _access(answer: object) -> Access:
    """A policy's answer: an `Access`, else (a bug in the policy) nothing is allowed."""
    if isinstance(answer, Access):
        return answer
    logger.error("the policy returned %s, not an Access; refusing", type(answer).__name__)
    return Access.NONE


class PhoenixCore:
    """The Phoenix/Supabase Realtime channel protocol over a Tracker, without I/O.

    Args:
        tracker: The presence state (attach a `RedisStore` to it to share presence).
        limits: Per-socket limits (see `ServerLimits`); the core enforces the channel's
            (frame size of what it relays, topics per socket, join and broadcast rates), the
            door the socket's (frame size, messages a second, buffered bytes, connections).
        auth: The host's hook, asked for each socket and each join (see `AuthHook`); it may
            take ``claims=`` (the verified token's claims).
        verifier: Verify every token (see `JwtVerifier`): the handshake's, and a join's or a
            refresh's ``access_token``; a channel closes when its token expires.
        key_claim: With a verifier, the presence key is this claim of the channel's token.
        policy: Decides what a private channel allows (see `presence_core.typing.Policy`).
        private_only: Refuse public channels.
        allowed_origins: Browser origins whose handshakes are accepted (None: any).
        allow_anonymous: With a verifier, let in a handshake without a token (public
            channels only).
        wake: Called each time a `Fanout` is queued.  A door that writes synchronously
            drains `actions` there, so that a `flush` with a budget spends its budget writing
            (as it would if the core wrote); a door with queues leaves it None.

    The arguments are documented in full on `presence_core.server.PresenceServer`.
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        limits: ServerLimits | None = None,
        auth: AuthHook | None = None,
        verifier: JwtVerifier | None = None,
        key_claim: str | None = None,
        policy: Policy | None = None,
        private_only: bool = False,
        allowed_origins: Sequence[str] | None = None,
        allow_anonymous: bool = False,
        wake: Callable[[], None] | None = None,
    ) -> None:
        if key_claim is not None:
            check_text(key_claim, "key_claim", 256)
            if verifier is None:
                raise PresenceValueError("key_claim needs a verifier: it names a token's claim")
        if policy is not None and not callable(policy):
            raise PresenceValueError("policy must be callable (see presence_core.typing.Policy)")
        if auth is not None and not callable(auth):
            raise PresenceValueError("auth must be callable (see presence_core.server.AuthHook)")
        if isinstance(allowed_origins, str):
            raise PresenceValueError("allowed_origins must be a sequence of origins, not a str")
        self.tracker = tracker
        self.limits = limits if limits is not None else ServerLimits()
        self.auth = auth
        self.verifier = verifier
        self.key_claim = key_claim
        self.policy = policy
        self.private_only = bool(private_only)
        self.allowed_origins = (
            None if allowed_origins is None else frozenset(_origin(o) for o in allowed_origins)
        )
        self.allow_anonymous = bool(allow_anonymous)
        self._wake = wake
        self._hook_claims = False  # whether the auth hook takes the claims
        if auth is not None:
            try:
                params = inspect.signature(auth).parameters.values()
            except (TypeError, ValueError):
                params = ()  # type: ignore[assignment]
            self._hook_claims = any(
                p.name == "claims" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
            )
        #: Open sockets, by id (read-only for doors).
        self.sessions: dict[int, Session] = {}
        #: Joined topics, by Tracker topic (read-only for doors).
        self.topics: dict[str, Topic] = {}
        #: What the door must do, in order; see `take_actions`.
        self.actions: list[Action] = []
        #: A reconnect storm is under way: flushes are `_STORM_INTERVAL` apart.
        self.storm = False
        # The project's token buckets, a second's worth of burst (see `ServerLimits`).
        joins, casts = self.limits.joins_per_second, self.limits.broadcasts_per_second
        self._join_rate = Limits(rate_per_second=joins, burst=max(1, round(joins)))
        self._broadcast_rate = Limits(rate_per_second=casts, burst=max(1, round(casts)))
        # Channel token deadlines: (unix time, serial, session id, topic), a heap.
        self._deadlines: list[tuple[float, int, int, str]] = []
        self._deadlines_limit = 1024  # the heap is rebuilt without stale entries past this
        self._serials = itertools.count(1)
        self._expired_at = 0.0  # the last look for silent connections
        self._flush_started = 0.0
        self._window_start = 0.0
        # Ids of the sockets that joined in this storm window and in the one before.
        self._window_joined: list[int] = []
        self._window_before: list[int] = []

    @property
    def auth_enabled(self) -> bool:
        """Whether clients are authenticated: a verifier, a policy or an auth hook is set."""
        return self.verifier is not None or self.policy is not None or self.auth is not None

    def take_actions(self) -> list[Action]:
        """What the door must do now, in order; the list is the caller's."""
        actions = self.actions
        if actions:
            self.actions = []
        return actions

    # -- sockets -------------------------------------------------------------------------------

    def authenticate(
        self,
        session: Session,
        *,
        origin: str | None,
        api_key: str | None,
        query: str,
        now: float,
    ) -> Refusal | None:
        """Check a WebSocket handshake: its ``Origin`` header, its token (the ``x-api-key``
        header, else the ``apikey`` or ``token`` query parameter, where Supabase Realtime and
        phoenix.js's ``params`` put it) and its protocol version (``vsn``).  Returns the
        refusal to answer (counted as a refused handshake), or None to accept (then `connect`
        once the socket is open)."""
        refusal = self._identify(session, origin, api_key, query, now)
        if refusal is not None:
            self.tracker.record_disconnect("refused_handshake")
        return refusal

    def _identify(
        self, session: Session, origin: str | None, api_key: str | None, query: str, now: float
    ) -> Refusal | None:
        allowed = self.allowed_origins
        if allowed is not None and origin is not None and _origin(origin) not in allowed:
            audit("origin_refused", conn=session.id, origin=origin[:200])
            return Refusal(403, "this origin is not allowed")
        params = parse_qs(query)
        vsn = (params.get("vsn") or ["1.0.0"])[0]
        session.version = 2 if vsn.startswith("2") else 1
        token = api_key
        if not token:
            tokens = params.get("apikey") or params.get("token")
            token = tokens[0] if tokens else None
        session.token = token or None
        if self.verifier is None:
            return None
        if session.token is None:
            if self.allow_anonymous:
                return None
            audit("token_refused", conn=session.id, reason="missing")
            return Refusal(401, _NO_TOKEN)
        try:
            session.verified = self._verify(session.token, now)
        except TokenError as exc:
            audit("token_refused", conn=session.id, reason=exc.reason)
            session.token = None
            return Refusal(401, exc.reason)
        return None

    def connect(self, session: Session, now: float) -> None:
        """The socket is open: it is a connection of the Tracker, and the auth hook (if any)
        is asked about it."""
        if session.id in self.sessions:
            raise PresenceValueError(f"session {session.id} is already connected")
        self.sessions[session.id] = session
        self.tracker.connect(session.id)
        if self.auth is not None:
            verdict = self._verdict(session.token, None, session.verified)
            if isinstance(verdict, bool):
                self._authenticated(session, verdict, now)
            else:
                self._defer(session, verdict, lambda ok, now: self._authenticated(session, ok))

    def _authenticated(self, session: Session, ok: object, now: float = 0.0) -> None:
        if not ok:
            audit("token_refused", conn=session.id)
            self.disconnect(session, "refused_handshake")
            self.actions.append(Close(session, 1008, "unauthorized", False))

    def disconnect(
        self, session: Session, reason: str | None = None, *, keep_presences: bool = False
    ) -> bool:
        """The socket ended (or is being closed): its channels end and its presences leave
        now.  ``reason`` is counted in ``disconnects{reason}``.  False if it was not open.

        ``keep_presences``: a hand-over (the server restarts): the channels end, but the
        Tracker connection and its presences stay until the door disconnects it there."""
        session.waiting = None
        session.backlog = None
        if self.sessions.pop(session.id, None) is None:
            return False
        if reason is not None:
            self.tracker.record_disconnect(reason)
        for topic in list(session.channels):
            self._leave_members(session, topic)
        if not keep_presences:
            self.tracker.disconnect(session.id)
        return True

    def fail(self, session: Session, code: int, reason: str, why: str) -> None:
        """End a socket that broke the protocol or a limit (``why`` is counted)."""
        if session.id in self.sessions:
            audit("disconnected", conn=session.id, reason=why)
            self.disconnect(session, why)
        self.actions.append(Close(session, code, reason, True))

    # -- time ----------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When `handle_timer` is next due (Unix seconds)."""
        at = min(self._expired_at + _EXPIRE_EVERY, self._window_start + _STORM_WINDOW)
        if self._deadlines:
            at = min(at, self._deadlines[0][0])
        return at

    def handle_timer(self, now: float) -> None:
        """Whatever is due at ``now``: expired tokens close their channels, connections silent
        past the Tracker's TTL are closed (1011), and the reconnect storm is re-judged."""
        if now - self._window_start >= _STORM_WINDOW:
            self._judge_storm(now)
        if self._deadlines and self._deadlines[0][0] <= now:
            self._expire_tokens(now)
        if now - self._expired_at >= _EXPIRE_EVERY:
            self._expired_at = now
            sessions = self.sessions
            for conn_id in self.tracker.expire():
                session = sessions.get(conn_id)  # type: ignore[arg-type]  # our ids are ints
                if session is not None:
                    audit("disconnected", conn=session.id, reason="silent past its ttl")
                    self.disconnect(session, "ttl")
                    self.actions.append(Close(session, 1011, "no heartbeat", False))

    def _judge_storm(self, now: float) -> None:
        # A socket counts once it has stayed a whole window after its join: a client that
        # joins and leaves at once, over and over, would otherwise hold everyone's diffs at
        # the storm's pace.  A real storm is seen a window later.
        joined = self._window_before
        self._window_before, self._window_joined = self._window_joined, []
        self._window_start = now
        stayed = sum(1 for conn_id in joined if conn_id in self.sessions)
        rate = stayed / _STORM_WINDOW
        storm = rate >= max(_STORM_SOCKETS, _STORM_SHARE * len(self.sessions))
        if storm != self.storm:
            self.storm = storm
            logger.info("reconnect storm %s", "begins" if storm else "is over")

    def flush_at(self) -> float:
        """When the next `flush` may start: at once (0.0), or during a reconnect storm half a
        second after the last one began, so that a topic's diff carries every join of that
        half second rather than each join going to every member on its own."""
        return self._flush_started + _STORM_INTERVAL if self.storm else 0.0

    def flush(self, now: float, *, budget: float | None = None, more: bool = False) -> int:
        """Deliver the Tracker's diffs (`Fanout` actions); returns how many topics went out.
        ``budget`` bounds the time spent (see `Tracker.flush`); ``more`` continues a flush
        that ran out of budget."""
        if not more:
            self._flush_started = now
        try:
            return self.tracker.flush(budget=budget)
        except Exception:  # pragma: no cover - flush logs hook failures itself
            logger.exception("tracker flush failed")
            return 0

    # -- messages ------------------------------------------------------------------------------

    def receive(self, session: Session, data: bytes, binary: bool, now: float) -> None:
        """One complete message from a socket.  One that is not a Phoenix message ends the
        socket with 1007, as Phoenix's serializer does; only a Phoenix message counts as a
        heartbeat.  While the socket waits for an async hook (`Session.waiting`) it is queued."""
        if session.id not in self.sessions:  # cut, or refused, while its frames were read
            return
        if session.waiting is not None:
            assert session.backlog is not None
            session.backlog.append((data, binary))
            return
        try:
            if binary:
                msg, event, body, encoding = binary_push(data)
                self.tracker.heartbeat(session.id)
                self._binary_broadcast(session, msg, event, body, encoding, now)
            else:
                msg = decode(data, session.version)
                self.tracker.heartbeat(session.id)
                self._message(session, msg, data, now)
        except (ProtocolError, ValueError, TypeError) as exc:
            reason = f"not a Phoenix message: {exc}".encode()[:_CLOSE_REASON]
            self.fail(session, 1007, reason.decode("utf-8", "ignore"), "protocol_error")
        except Exception:
            # A bug here costs this socket (1011, no details: they may be sensitive), never
            # the door's loop or the other sockets.
            logger.exception("handling a message failed; closing its socket")
            self.fail(session, 1011, "internal error", "internal_error")

    def settle(
        self,
        session: Session,
        answer: Any = None,
        error: BaseException | None = None,
        *,
        now: float,
    ) -> None:
        """The answer to a `Defer` (or the exception it raised: `Refused`, or a failure, which
        refuses and is logged).  The socket's queued messages are handled after it, in order,
        until one waits again."""
        waiting = session.waiting
        if waiting is None:
            return
        then, refused = waiting
        session.waiting = None
        backlog, session.backlog = session.backlog or [], None
        if error is not None:
            if isinstance(error, Exception) and not isinstance(error, Refused):
                logger.error("the auth hook or policy failed; refusing", exc_info=error)
            elif not isinstance(error, Refused):
                logger.error("the auth hook or policy was cancelled; refusing")
            answer = refused
        if session.id not in self.sessions:
            return
        then(answer, now)
        for at, (data, binary) in enumerate(backlog):
            if session.id not in self.sessions:
                break
            if session.waiting is not None:  # waiting for the hook again
                assert session.backlog is not None
                session.backlog.extend(backlog[at:])
                break
            self.receive(session, data, binary, now)

    def _message(self, session: Session, msg: Message, data: bytes, now: float) -> None:
        event = msg.event
        if msg.topic == PHOENIX_TOPIC:
            if event == EVENT_HEARTBEAT:
                self._reply(session, msg, "ok", {})
            else:
                self._reply(session, msg, "error", {"reason": f"{PHOENIX_TOPIC} is reserved"})
            return
        if event == EVENT_JOIN:
            self._join(session, msg, now)
        elif msg.topic not in session.channels:
            # Not joined: the clients expect the channel closed (phx_close) on a stray push.
            self._reply(session, msg, "error", {"reason": "unmatched topic"})
        elif event == EVENT_PRESENCE:
            self._presence(session, msg)
        elif event == "broadcast":
            self._text_broadcast(session, msg, data, now)
        elif event == EVENT_LEAVE:
            self._reply(session, msg, "ok", {})
            self._leave(session, msg.topic)
            self._send(session, Message(msg.topic, EVENT_CLOSE, {}, msg.ref, msg.join_ref))
        elif event == "access_token":
            self._access_token(session, msg, now)
        else:
            self._reply(session, msg, "error", {"reason": "unknown event"})

    # -- auth ----------------------------------------------------------------------------------

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
        except Exception:
            logger.exception("the auth hook failed; refusing")
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
        session: Session,
        awaitable: Awaitable[Any],
        then: Callable[[Any, float], None],
        refused: Any = False,
    ) -> None:
        """Wait for an async auth hook or policy; the socket's later messages wait, in order.
        ``then`` gets its answer (or ``refused`` if it raised) and the time."""
        session.waiting = (then, refused)
        session.backlog = []
        self.actions.append(Defer(session, awaitable))

    def _verify(self, token: str, now: float) -> Verified:
        """Verify a client's token.  Expiry is strict here, whatever the verifier's leeway
        (which is for clocks that differ): a channel is closed at ``exp``, so a join just
        after it must not be let in only to be closed at the next timer."""
        assert self.verifier is not None
        verified = self.verifier.verify(token, now=now)
        if verified.expires_at <= now:
            raise TokenError(expired_reason(now, verified.expires_at))
        return verified

    def _unbound_reason(self) -> str:
        return (
            f"Unauthorized: tracking needs a token with a `{self.key_claim}` claim (the "
            "presence key is bound to it)"
        )

    def _access_token(self, session: Session, msg: Message, now: float) -> None:
        """A new token for one channel (realtime-js's ``setAuth``).  With a verifier it is
        verified as at a join: a bad one closes the channel the way an expired one does; a
        good one keeps it open until its own ``exp``.  A private channel asks its policy
        again, and a token for another identity than the bound key closes the channel."""
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        token = payload.get("access_token")
        topic = msg.topic
        channel = session.channels[topic]
        if self.verifier is None:
            if isinstance(token, str):
                session.token = token  # what the auth hook sees at the next join
            self._reply(session, msg, "ok", {})
            return
        if not isinstance(token, str) or not token:
            self._reply(session, msg, "error", {"reason": "access_token must be a JWT"})
            return
        if channel.verified is not None and channel.verified.token == token:
            self._reply(session, msg, "ok", {})  # the same token again: nothing changes
            return
        try:
            verified = self._verify(token, now)
        except TokenError as exc:
            audit("token_refused", conn=session.id, topic=topic, reason=exc.reason)
            self._close_channel(session, msg, exc.reason)
            return
        if self.key_claim is not None:
            bound = _claim_text(verified.claims.get(self.key_claim))
            if channel.key is not None and bound != channel.key:
                audit("token_refused", conn=session.id, topic=topic, reason="identity_changed")
                reason = f"Unauthorized: the token's `{self.key_claim}` claim is not this channel's"
                self._close_channel(session, msg, reason)
                return
            if channel.key is None and bound is not None:
                try:
                    self.tracker.check_key(bound)
                except PresenceError as exc:
                    self._close_channel(session, msg, str(exc))
                    return
                channel.key = bound
                self.tracker.bind_key(session.id, bound, topic=channel.tracked)
        if not channel.private:
            self._renewed(session, msg, channel, verified, channel.access, now)
            return
        channel.renewing = verified
        answer = self._ask_policy(verified.claims, topic)
        if isinstance(answer, Access):
            self._renewed(session, msg, channel, verified, answer, now)
        else:
            self._defer(
                session,
                answer,
                lambda a, now: self._renewed(session, msg, channel, verified, _access(a), now),
                Access.NONE,
            )

    def _renewed(
        self,
        session: Session,
        msg: Message,
        channel: Channel,
        verified: Verified,
        access: Access,
        now: float,
    ) -> None:
        topic = msg.topic
        if channel.renewing is verified:
            channel.renewing = None
        if session.channels.get(topic) is not channel or session.id not in self.sessions:
            return  # left, rejoined or cut while the policy was asked
        if not access.any_read:
            self._close_channel(session, msg, _NO_READ + topic)
            return
        channel.verified = verified
        channel.access = access
        t = self.topics.get(channel.tracked)
        if t is not None:
            self._place(session, t, channel)
        if not access.presence_write:
            self.tracker.untrack(session.id, channel.tracked)  # what it may no longer write
        self._schedule(session, topic, channel, now)
        self._reply(session, msg, "ok", {})

    # -- join and leave ------------------------------------------------------------------------

    def _join(self, session: Session, msg: Message, now: float) -> None:
        topic = msg.topic
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        try:
            session.joins_tat = admit(self._join_rate, session.joins_tat, now, session.id)
        except RateLimited:
            self._limit_hit("joins_per_second", conn=session.id, topic=topic)
            self._reply(session, msg, "error", {"reason": "join rate limit exceeded"})
            return
        try:
            # What the Tracker would refuse at the first track, refused before anything is
            # made: a topic or key over its length limit, empty, or not text.
            self.tracker.check_topic(topic)
            key = presence_key_from_join(payload)
            if key is not None:
                self.tracker.check_key(key)
        except PresenceError as exc:
            audit("join_refused", conn=session.id, reason=type(exc).__name__)
            self._reply(session, msg, "error", {"reason": str(exc)})
            return
        if topic not in session.channels and (
            len(session.channels) >= self.limits.max_topics_per_connection
        ):
            self._limit_hit("max_topics_per_connection", conn=session.id, topic=topic)
            reason = "ChannelRateLimitReached: Too many channels"
            self._reply(session, msg, "error", {"reason": reason})
            return
        config = payload.get("config")
        private = _flag(config.get("private"), False) if isinstance(config, dict) else False
        if self.private_only and not private:
            audit("join_refused", conn=session.id, reason="private_only")
            self._reply(session, msg, "error", {"reason": _PRIVATE_ONLY})
            return
        if private and self.policy is None:
            audit("join_refused", conn=session.id, reason="no_policy")
            self._reply(session, msg, "error", {"reason": _NO_POLICY})
            return
        if topic.startswith("\x00"):
            self._reply(session, msg, "error", {"reason": "a topic must not start with NUL"})
            return
        tracked = PRIVATE_PREFIX + topic if private else topic
        if private:
            try:
                self.tracker.check_topic(tracked)
            except PresenceError as exc:
                self._reply(session, msg, "error", {"reason": f"private topic: {exc}"})
                return
        join = self._identified_join(session, msg, payload, key, private, tracked, now)
        if join is None:
            return
        if self.auth is None:
            self._join_authorised(session, join, True, now)
            return
        verdict = self._verdict(join.token, topic, join.verified)
        if isinstance(verdict, bool):
            self._join_authorised(session, join, verdict, now)
        else:
            self._defer(
                session, verdict, lambda ok, now: self._join_authorised(session, join, ok, now)
            )

    def _identified_join(
        self,
        session: Session,
        msg: Message,
        payload: dict[str, Any],
        key: str | None,
        private: bool,
        tracked: str,
        now: float,
    ) -> _Join | None:
        """A join's token verified and its presence key chosen, or None once refused.

        The join's ``access_token`` replaces the socket's token for this channel, as in
        Supabase Realtime.  With ``key_claim`` the key is the token's claim: a join that asks
        for another is refused.
        """
        given = payload.get("access_token")
        token = given if isinstance(given, str) and given else session.token
        verified = None
        if self.verifier is not None and token is not None:
            socket = session.verified
            if socket is not None and socket.token == token and socket.expires_at > now:
                verified = socket  # verified at the handshake, and still valid
            else:
                try:
                    verified = self._verify(token, now)
                except TokenError as exc:
                    audit("token_refused", conn=session.id, topic=msg.topic, reason=exc.reason)
                    self._reply(session, msg, "error", {"reason": exc.reason})
                    return None
        if session.key is not None:
            if key and key != session.key:
                audit("join_refused", conn=session.id, topic=msg.topic, reason="key_not_bound")
                reason = (
                    "Unauthorized: the server chose this socket's presence key; this join asks "
                    "for another"
                )
                self._reply(session, msg, "error", {"reason": reason})
                return None
            key = session.key
        elif self.key_claim is not None:
            bound = None if verified is None else _claim_text(verified.claims.get(self.key_claim))
            if key and key != bound:
                audit("join_refused", conn=session.id, topic=msg.topic, reason="key_not_bound")
                reason = (
                    f"Unauthorized: the presence key is the token's `{self.key_claim}` claim; "
                    "this join asks for another"
                )
                self._reply(session, msg, "error", {"reason": reason})
                return None
            if bound is not None:
                try:
                    self.tracker.check_key(bound)
                except PresenceError as exc:
                    self._reply(session, msg, "error", {"reason": str(exc)})
                    return None
            key = bound
        else:
            key = key or secrets.token_hex(8)
        return _Join(msg, payload, key, private, tracked, verified, token)

    def _join_authorised(self, session: Session, join: _Join, ok: object, now: float) -> None:
        if not ok:
            audit("token_refused", conn=session.id, topic=join.msg.topic)
            self._reply(session, join.msg, "error", {"reason": "Unauthorized"})
            return
        if not join.private:
            self._join_allowed(session, join, Access.ALL, now)
            return
        if session.id not in self.sessions:  # cut while the hook ran
            return
        if self.verifier is not None and join.verified is None:
            audit("join_refused", conn=session.id, topic=join.msg.topic, reason="anonymous")
            reason = "Unauthorized: a private channel needs a token"
            self._reply(session, join.msg, "error", {"reason": reason})
            return
        claims = join.verified.claims if join.verified is not None else {}
        answer = self._ask_policy(claims, join.msg.topic)
        if isinstance(answer, Access):
            self._join_allowed(session, join, answer, now)
        else:
            self._defer(
                session,
                answer,
                lambda a, now: self._join_allowed(session, join, _access(a), now),
                Access.NONE,
            )

    def _join_allowed(self, session: Session, join: _Join, access: Access, now: float) -> None:
        if session.id not in self.sessions:  # cut while the join waited
            return
        msg, payload, key = join.msg, join.payload, join.key
        topic = msg.topic
        if join.verified is not None and join.verified.expires_at <= now:
            # It expired while the auth hook or the policy was asked.
            reason = expired_reason(now, join.verified.expires_at)
            self._reply(session, msg, "error", {"reason": reason})
            return
        if not access.any_read:
            audit("join_refused", conn=session.id, topic=topic, reason="policy")
            self._reply(session, msg, "error", {"reason": _NO_READ + topic})
            return
        config = payload.get("config")
        config = config if isinstance(config, dict) else {}
        presence_cfg = config.get("presence")
        presence_cfg = presence_cfg if isinstance(presence_cfg, dict) else {}
        broadcast_cfg = config.get("broadcast")
        broadcast_cfg = broadcast_cfg if isinstance(broadcast_cfg, dict) else {}
        old = session.channels.get(topic)
        if old is not None:
            # A second join of a joined topic replaces the first: close it under its join_ref.
            self._send(session, Message(topic, EVENT_CLOSE, {}, old.join_ref, old.join_ref))
            self._leave(session, topic)
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
        session.channels[topic] = channel
        if key is not None and (self.key_claim is not None or session.key is not None):
            # The Tracker refuses any other key too, so a bug here cannot let one through.
            self.tracker.bind_key(session.id, key, topic=tracked)
        if not session.joined:  # a reconnect storm counts sockets that join, not handshakes
            session.joined = True
            self._window_joined.append(session.id)
        t = self.topics.get(tracked)
        if t is None:
            unsubscribe = self.tracker.subscribe(tracked, self._fan_out, send_state=False, raw=True)
            t = self.topics[tracked] = Topic(topic, unsubscribe)
        t.members[session.id] = session
        self._place(session, t, channel)
        self._schedule(session, topic, channel, now)
        # The join's reply carries the join's ref as both ref and join_ref.
        reply = Message(topic, msg.event, None, msg.ref, channel.join_ref)
        self._reply(session, reply, "ok", {"postgres_changes": []})
        if channel.presence and access.presence_read:
            state = self.tracker.initial_state_json(tracked)
            self._send_raw(session, topic, "presence_state", state, channel.join_ref)

    def _place(self, session: Session, t: Topic, channel: Channel) -> None:
        """Put a member where its access lets it read: broadcasts, presence diffs."""
        if channel.access.broadcast_read:
            t.readers[session.id] = session
        else:
            t.readers.pop(session.id, None)
        listeners = t.listeners[session.version - 1]
        if channel.presence and channel.access.presence_read:
            listeners[session.id] = session
        else:
            listeners.pop(session.id, None)

    def _leave(self, session: Session, topic: str) -> None:
        """The channel ends: out of the topic's members, and its presence leaves."""
        tracked = self._leave_members(session, topic)
        if tracked is not None:
            self.tracker.untrack(session.id, tracked)

    def _leave_members(self, session: Session, topic: str) -> str | None:
        """Take the channel out of the topic's members; returns its Tracker topic."""
        channel = session.channels.pop(topic, None)
        if channel is None:
            return None
        tracked = channel.tracked
        if self.key_claim is not None or session.key is not None:
            self.tracker.unbind_key(session.id, topic=tracked)
        t = self.topics.get(tracked)
        if t is None:
            return tracked
        t.members.pop(session.id, None)
        t.readers.pop(session.id, None)
        t.listeners[session.version - 1].pop(session.id, None)
        if not t.members:
            del self.topics[tracked]
            t.unsubscribe()
        return tracked

    # -- token expiry --------------------------------------------------------------------------

    def _schedule(self, session: Session, topic: str, channel: Channel, now: float) -> None:
        """Look at the channel's token again when it expires, and at least every hour."""
        verified = channel.verified
        if verified is None:
            return
        channel.serial = next(self._serials)
        at = min(verified.expires_at, now + _TOKEN_RECHECK)
        deadlines = self._deadlines
        heapq.heappush(deadlines, (at, channel.serial, session.id, topic))
        if len(deadlines) > self._deadlines_limit:
            # Channels that left keep their entries until due: drop them now and then, so
            # churn under long-lived tokens cannot grow the heap without bound.
            live = [entry for entry in deadlines if self._timer_live(entry)]
            heapq.heapify(live)
            self._deadlines = live
            self._deadlines_limit = max(1024, 2 * len(live))

    def _timer_live(self, entry: tuple[float, int, int, str]) -> Channel | None:
        _, serial, conn_id, topic = entry
        session = self.sessions.get(conn_id)
        channel = None if session is None else session.channels.get(topic)
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
            session = self.sessions[entry[2]]
            expires_at = channel.verified.expires_at
            if expires_at > now:  # the hourly look: still valid
                self._schedule(session, entry[3], channel, now)
                deadlines = self._deadlines  # a reschedule may have rebuilt it
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
            audit("token_expired", conn=session.id, topic=entry[3])
            message = Message(entry[3], "access_token", None, None, channel.join_ref)
            self._close_channel(session, message, reason)
            deadlines = self._deadlines

    # -- presence and broadcast ----------------------------------------------------------------

    def _presence(self, session: Session, msg: Message) -> None:
        channel = session.channels[msg.topic]
        action = parse_client_presence(msg)
        if not channel.access.presence_write:
            reason = (
                "Unauthorized: You do not have permissions to write presence to this Channel topic"
            )
            self._reply(session, msg, "error", {"reason": reason})
            return
        try:
            if action.kind == "track":
                if channel.key is None:
                    self._reply(session, msg, "error", {"reason": self._unbound_reason()})
                    return
                self.tracker.track(session.id, channel.tracked, channel.key, action.meta)
            else:
                self.tracker.untrack(session.id, channel.tracked)
        except RateLimited as exc:
            audit("limit_hit", conn=session.id, topic=msg.topic, limit=exc.limit)
            self._close_channel(session, msg, "Client presence rate limit exceeded")
            return
        except QuotaExceeded as exc:
            audit("limit_hit", conn=session.id, topic=msg.topic, limit=exc.limit)
            self._close_channel(session, msg, f"Presence limit {exc.limit} reached ({exc.value})")
            return
        except PresenceError as exc:
            self._reply(session, msg, "error", {"reason": str(exc)})
            return
        self._reply(session, msg, "ok", {})

    def _text_broadcast(self, session: Session, msg: Message, data: bytes, now: float) -> None:
        """A ``broadcast`` push in a text frame.  Its payload is relayed as the client wrote
        it when it is a v2 array whose payload holds just ``type``, ``event`` and
        ``payload``; otherwise it is re-encoded."""
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        event = payload.get("event")
        if not isinstance(event, str):
            # realtime-js matches listeners with event.toLocaleLowerCase(): another type
            # would break every such member of the topic.
            self._reply(session, msg, "error", {"reason": "a broadcast's event must be a string"})
            return
        if not self._admit_broadcast(session, msg, now):
            return
        raw = None
        if (
            session.version == 2
            and payload.get("type") == "broadcast"
            and payload.keys() <= _BROADCAST_KEYS
        ):
            raw = v2_payload(data)
        if raw is None:
            raw = _dumps({"type": "broadcast", "event": event, "payload": payload.get("payload")})
        self._broadcast(session, msg, raw)

    def _binary_broadcast(
        self, session: Session, msg: Message, event: str, body: bytes, encoding: int, now: float
    ) -> None:
        """A kind-3 push, relayed as a text broadcast, which every client reads (phoenix.js
        reads no binary broadcast, and a socket does not say which client it is).  A JSON
        payload goes out as the bytes that came; a binary one as an array of byte values.
        Membership, rate and size are checked before the payload is read or converted."""
        if msg.topic not in session.channels:
            self._reply(session, msg, "error", {"reason": "unmatched topic"})
            return
        if not self._admit_broadcast(session, msg, now):
            return
        if encoding == 1:
            orjson.loads(body)  # relayed as JSON text, so it must be JSON (else: 1007)
            payload = body
        else:
            # Up to 4 bytes a value ("255,"): refuse what cannot fit before building it.
            if len(body) * 4 > self.limits.max_frame_bytes:
                self._too_large(session, msg, len(body) * 4)
                return
            payload = _dumps(list(body))
        raw = b"".join(
            (b'{"type":"broadcast","event":', _dumps(event), b',"payload":', payload, b"}")
        )
        self._broadcast(session, msg, raw)

    def _admit_broadcast(self, session: Session, msg: Message, now: float) -> bool:
        """Check the channel may broadcast, and spend one broadcast from the socket's
        bucket; or answer why not."""
        if not session.channels[msg.topic].access.broadcast_write:
            reason = "Unauthorized: You do not have permissions to write to this Channel topic"
            self._reply(session, msg, "error", {"reason": reason})
            return False
        try:
            session.broadcasts_tat = admit(
                self._broadcast_rate, session.broadcasts_tat, now, session.id
            )
        except RateLimited:
            self._limit_hit("broadcasts_per_second", conn=session.id, topic=msg.topic)
            self._reply(session, msg, "error", {"reason": "broadcast rate limit exceeded"})
            return False
        return True

    def _too_large(self, session: Session, msg: Message, size: int) -> None:
        limit = self.limits.max_frame_bytes
        self._limit_hit("max_frame_bytes", conn=session.id, topic=msg.topic)
        reason = f"broadcast too large: {size} bytes relayed, over the limit of {limit}"
        self._reply(session, msg, "error", {"reason": reason})

    def _broadcast(self, session: Session, msg: Message, raw: bytes) -> None:
        """Relay one admitted broadcast, ``raw`` its JSON payload, to the topic's members."""
        channel = session.channels[msg.topic]
        v1 = push(1, msg.topic, "broadcast", raw, None)
        v2 = push(2, msg.topic, "broadcast", raw, None)
        # What we relay must be what we would accept ourselves: clients with the same
        # 1 MiB limit would disconnect on a larger frame.
        size = max(len(v1), len(v2))
        if size > self.limits.max_frame_bytes:
            self._too_large(session, msg, size)
            return
        t = self.topics.get(channel.tracked)
        if t is not None and t.readers:
            skip = None if channel.self_broadcast else session
            self.actions.append(Fanout(tuple(t.readers.values()), v1, v2, skip))
            if self._wake is not None:
                self._wake()
        if channel.ack_broadcast:
            self._reply(session, msg, "ok", {})

    def _close_channel(self, session: Session, msg: Message, reason: str) -> None:
        """End one channel the way Supabase does: a ``system`` error, then ``phx_close``."""
        topic = msg.topic
        system = {"message": reason, "status": "error", "extension": "system", "channel": topic}
        self._send(session, Message(topic, "system", system, None, msg.join_ref))
        channel = session.channels.get(topic)
        join_ref = channel.join_ref if channel is not None else msg.join_ref
        self._leave(session, topic)
        self._send(session, Message(topic, EVENT_CLOSE, {}, join_ref, join_ref))

    def _fan_out(self, topic: str, event: str, payload: Any) -> None:
        """The Tracker's raw hook: one diff, as JSON bytes, to every member of the topic that
        reads presence, one `Fanout` per protocol version."""
        t = self.topics.get(topic)
        if t is None:
            return
        v1, v2 = t.listeners
        if v1:
            data = push(1, t.wire, event, payload, None)
            self.actions.append(Fanout(tuple(v1.values()), data, None, None))
        if v2:
            data = push(2, t.wire, event, payload, None)
            self.actions.append(Fanout(tuple(v2.values()), None, data, None))
        if self._wake is not None:
            self._wake()

    # -- writing -------------------------------------------------------------------------------

    def _limit_hit(self, limit: str, **fields: Any) -> None:
        """A limit refused something: audited, and counted in ``limit_hits``."""
        audit("limit_hit", limit=limit, **fields)
        self.tracker.record_limit_hit(limit)

    def refuse_handshake(self, limit: str, value: int) -> None:
        """A door's connection limit (``max_connections``, ``max_connections_per_ip``)
        refused a socket: audited, counted as a limit hit and as a refused handshake."""
        self._limit_hit(limit, value=value)
        self.tracker.record_disconnect("refused_handshake")

    def _reply(self, session: Session, msg: Message, status: str, response: Any) -> None:
        payload = {"status": status, "response": response}
        self._send(session, Message(msg.topic, EVENT_REPLY, payload, msg.ref, msg.join_ref))

    def _send(self, session: Session, msg: Message) -> None:
        self.actions.append(Send(session, encode(msg, session.version)))

    def _send_raw(
        self, session: Session, topic: str, event: str, raw: bytes, join_ref: str | None
    ) -> None:
        self.actions.append(Send(session, push(session.version, topic, event, raw, join_ref)))
