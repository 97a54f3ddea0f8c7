"""What a front door allows each connection (`ServerLimits`), and the host's auth hook."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

from .._validate import check_int, check_seconds

__all__ = ["AuthHook", "Refused", "ServerLimits"]


class Refused(Exception):
    """Raised by an `AuthHook` to refuse a connection or a topic; the message goes to the
    client in its error shape (never to other clients or the logs' meta fields)."""


AuthHook: TypeAlias = Callable[[str | None, str | None], Awaitable[bool] | bool]
"""``hook(token, topic)``: the ``apikey`` / ``access_token`` the client sent (or None) and the
topic it joins (None for the connection itself).  Return True to allow; False or `Refused`
refuses: a refused connection is closed with code 1008, a refused topic gets the error reply
``{"reason": "Unauthorized"}``.  It may be a coroutine function: the connection's later frames
wait for its verdict, in order; a hook that raises anything else refuses (and is logged)."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-connection and per-process limits, with Supabase Realtime's defaults where it has
    them.  A rate allows a burst of one second's worth.

    Attributes:
        max_frame_bytes: Largest frame a client may send (bigger closes with 1009).
        max_connections: Open WebSockets per process; beyond it the handshake gets HTTP 503.
        max_topics_per_connection: Channels one socket may join ("Too many channels").
        joins_per_second: Joins per connection per second.
        broadcasts_per_second: Broadcasts per connection per second.
        max_buffered_bytes: Bytes written to a connection that its client has not read yet;
            beyond it the client reads slower than its topics change and is disconnected
            (its presences leave, and it reconnects and gets the state afresh).
        max_connections_per_ip: Open WebSockets one client address may hold (None: no such
            limit).  Off by default: behind a proxy or a NAT every client has the same
            address.  Beyond it the handshake gets HTTP 429.
        messages_per_second: Frames a socket may send a second (a second's worth of burst).
            A socket that sends faster is not read until its rate allows again, so a flood is
            pushed back on its sender's TCP window instead of stalling everyone else.
        max_fragments: Frames one fragmented message may span (more closes with 1009): empty
            continuation frames would otherwise grow a message's fragment list unanswered.

    Presence calls (their rate, burst and meta size) are the Tracker's to limit: see
    `presence_core.Limits`, which `presence-core serve` sets from its own options.
    """

    max_frame_bytes: int = 1 << 20
    max_connections: int = 20_000
    max_topics_per_connection: int = 100
    joins_per_second: float = 10.0
    broadcasts_per_second: float = 100.0
    max_buffered_bytes: int = 16 << 20
    max_connections_per_ip: int | None = None
    messages_per_second: float = 200.0
    max_fragments: int = 64

    def __post_init__(self) -> None:
        check_int(self.max_frame_bytes, "max_frame_bytes", low=64)
        check_int(self.max_connections, "max_connections", low=1)
        check_int(self.max_topics_per_connection, "max_topics_per_connection", low=1)
        check_seconds(self.joins_per_second, "joins_per_second")
        check_seconds(self.broadcasts_per_second, "broadcasts_per_second")
        check_int(self.max_buffered_bytes, "max_buffered_bytes", low=1 << 16)
        if self.max_connections_per_ip is not None:
            check_int(self.max_connections_per_ip, "max_connections_per_ip", low=1)
        check_seconds(self.messages_per_second, "messages_per_second")
        check_int(self.max_fragments, "max_fragments", low=1)
