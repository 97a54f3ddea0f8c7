"""One client socket: websockets' Sans-I/O protocol driven by an asyncio transport.

`websockets`' asyncio server gives every connection a task, a keepalive task, a message
assembler and futures per message: about a hundred objects that every full garbage collection
walks, and a task switch per frame.  Here a connection is one `asyncio.Protocol` around a
`websockets.server.ServerProtocol`, which parses the handshake and the frames, answers pings and
runs the closing handshake.  Frames to the client are written straight to the transport, built
once for all the members of a topic (server frames are not masked, so every member gets the same
bytes).

Reading is bounded, so that no client can hold the loop: a socket's bytes go to the parser at
most `READ_SLICE` at a time, at most `MESSAGES_PER_ITERATION` of its messages are handled per
loop iteration, and its frames are admitted by a token bucket (`ServerLimits.messages_per_second`).
When a socket is over any of these, it is not read again until it may go on: its flood waits in
its own kernel buffers and TCP window, never in the loop or in memory here.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol, cast

from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..errors import RateLimited
from ..limits import Limits, admit
from ..protocol import Session

__all__ = ["Connection", "Owner", "text_frame"]

OPEN_TIMEOUT = 10.0  # seconds from TCP accept to a complete handshake
CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take before the socket is cut
READ_SLICE = 16 << 10  # bytes handed to the parser at once (a slice of tiny frames is bounded)
MESSAGES_PER_ITERATION = 64  # frames of one socket handled before the loop reads the others
HELD_BYTES = 64 << 10  # unparsed bytes kept while an auth hook or policy answers


def text_frame(data: bytes) -> bytes:
    """A complete, unmasked text frame around ``data`` (UTF-8 JSON), ready for any client."""
    return Frame(Opcode.TEXT, data).serialize(mask=False)


class Owner(Protocol):
    """What a `Connection` tells the server that accepted it (`PresenceServer`)."""

    def accept_socket(self, conn: Connection) -> bool:
        """A new TCP connection: False to cut it at once."""

    def answer(self, conn: Connection, request: Request) -> Response:
        """The answer to the socket's HTTP request (101 to open it as a WebSocket)."""

    def opened(self, conn: Connection) -> None:
        """The WebSocket handshake is done."""

    def received(self, conn: Connection, data: bytes, binary: bool) -> None:
        """One complete message."""

    def dropped(self, conn: Connection, why: str | None) -> None:
        """The socket is ending (a close frame, a protocol or limit fault counted as ``why``):
        its presences leave now, whatever the closing handshake does."""

    def slow(self, conn: Connection) -> None:
        """The client reads slower than its topics change (called soon after, never inside,
        the fan-out that found it)."""

    def closed(self, conn: Connection) -> None:
        """The socket has ended (only for one `accept_socket` let in)."""

    def flush_soon(self) -> None:
        """What this socket changed should go out."""


class Connection(Session, asyncio.Protocol):
    """A WebSocket client, with its Phoenix state (`Session`, the protocol core's).

    The transport calls `data_received`; the handshake, complete messages and the end of the
    socket go to its `Owner`.
    """

    __slots__ = (
        "owner",
        "ws",
        "transport",
        "open",
        "peer",
        "frames_tat",
        "frames_rate",
        "fragments",
        "fragments_binary",
        "max_fragments",
        "held",
        "timer",
        "unread",
        "events",
        "resume",
        "accepted",
    )

    def __init__(
        self,
        owner: Owner,
        conn_id: int,
        max_size: int,
        *,
        frames_rate: Limits | None = None,
        max_fragments: int = 64,
    ) -> None:
        Session.__init__(self, conn_id)
        self.owner = owner
        self.ws = ServerProtocol(max_size=max_size)
        self.transport: asyncio.Transport | None = None
        self.open = False  # handshake done and no close frame sent or received
        self.peer: str | None = None  # the client's address, when counted per address
        self.frames_tat = -math.inf  # a token bucket (`limits.admit`)
        self.frames_rate = frames_rate  # None: frames are not rate limited
        self.fragments: list[bytes] | None = None  # a fragmented message being received
        self.fragments_binary = False
        self.max_fragments = max_fragments
        # Frames wait, unparsed, until an auth hook or policy answers (`_message`, `release`).
        self.held = False
        self.timer: asyncio.TimerHandle | None = None
        self.unread = b""  # received, not yet given to the parser (reading is paused)
        self.events: list[Request | Response | Frame] = []  # parsed, not yet handled
        self.resume: asyncio.Handle | None = None  # when reading goes on, while paused
        self.accepted = True  # let in by its owner's `accept_socket` (False: cut at once)

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self.owner.accept_socket(self):
            self.accepted = False
            self.transport.abort()
            return
        self.timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.held:
            # Still read, so that a close or an EOF is seen and the client's presences leave
            # at once; past HELD_BYTES the rest waits in the client's TCP window.
            self.unread += data
            if len(self.unread) > HELD_BYTES and self.transport is not None:
                self.transport.pause_reading()
            return
        if self.resume is not None:  # paused, yet a read was already under way
            self.unread += data
            return
        if len(data) > READ_SLICE:
            data, self.unread = data[:READ_SLICE], data[READ_SLICE:]
        self.ws.receive_data(data)
        self.events = self.ws.events_received()
        self._handle()

    def eof_received(self) -> bool | None:
        if self.resume is None and not self.held and not self.unread:
            self.ws.receive_eof()
            self._flush()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.held = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        self.unread = b""
        self.events = []
        # The parser is a generator whose frame holds the protocol: a reference cycle that
        # only a full collection would free, and never once `gc.freeze` has moved it out of
        # the collector's reach (serve freezes settled connections).  Closing it breaks the
        # cycle, so a closed connection is freed by reference counting alone.
        self.ws.parser.close()
        if self.accepted:
            self.owner.closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than its topics change: it would hold ever more memory here.
        # (Before the handshake this is a large HTTP answer, /metrics say: it drains, then ends.)
        # The cut waits for the end of this callback's caller, which may be a fan-out walking
        # the topic's members: writes to this socket stop now, its members leave after.
        if self.open:
            self.open = False
            asyncio.get_running_loop().call_soon(self.owner.slow, self)

    # -- reading ------------------------------------------------------------------------------

    def _handle(self) -> None:
        """Handle parsed events and feed the parser more, within this iteration's share."""
        handled = 0
        while True:
            events, at = self.events, 0
            while at < len(events):
                if handled >= MESSAGES_PER_ITERATION:
                    del events[:at]
                    self._pause(0.0)
                    return
                event = events[at]
                if isinstance(event, Frame):
                    rate = self.frames_rate
                    if rate is not None:
                        now = asyncio.get_running_loop().time()
                        try:
                            self.frames_tat = admit(rate, self.frames_tat, now, self.id)
                        except RateLimited as exc:
                            del events[:at]
                            self._pause(exc.retry_after)
                            return
                    at += 1
                    handled += 1
                    self._frame(event)
                    if self.held:  # the rest waits, unread, for the hook's answer
                        del events[:at]
                        self._flush()
                        return
                else:
                    at += 1
                    if isinstance(event, Request):
                        self._handshake(event)
                if self.events is not events:  # failed: what is left is dropped
                    break
            self.events = []
            if not self.unread or self.transport is None or self.transport.is_closing():
                break
            data, self.unread = self.unread[:READ_SLICE], self.unread[READ_SLICE:]
            self.ws.receive_data(data)
            self.events = self.ws.events_received()
        self._ended_by_parser()
        self._flush()

    def _ended_by_parser(self) -> None:
        """Count a socket that websockets' parser failed (too big, not WebSocket, bad UTF-8)."""
        exc = self.ws.parser_exc
        if exc is not None and self.open:
            self.open = False
            self.owner.dropped(
                self, "limit" if isinstance(exc, PayloadTooBig) else "protocol_error"
            )

    def _pause(self, delay: float) -> None:
        self._flush()
        transport = self.transport
        if transport is None or transport.is_closing() or self.resume is not None:
            return
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        self.resume = (
            loop.call_later(delay, self._resume) if delay else loop.call_soon(self._resume)
        )

    def _resume(self) -> None:
        self.resume = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._handle()
        if self.resume is None and not self.held:
            transport.resume_reading()
            self.owner.flush_soon()

    def _handshake(self, request: Request) -> None:
        if self.ws.parser_exc is not None:
            # Bytes after the request that are no WebSocket frames: a second, pipelined
            # request.  One request per connection here; say so rather than guess.
            response = self.ws.reject(400, "one request per connection\n")
        else:
            response = self.owner.answer(self, request)
        if response.status_code != 101:
            # An HTTP answer ends the connection: written here, not through the protocol,
            # whose parser may already have failed on what followed the request.
            transport = self.transport
            if transport is not None and not transport.is_closing():
                response.headers["Connection"] = "close"
                transport.write(response.serialize())
                transport.close()
            return
        self.ws.send_response(response)
        # The 101 goes out before any reply to a frame that came in the same segment.
        self._flush()
        assert self.timer is not None
        self.timer.cancel()
        self.timer = None
        self.open = True
        self.owner.opened(self)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(bytes(frame.data), opcode is Opcode.BINARY)
            else:
                self.fragments = [bytes(frame.data)]
                self.fragments_binary = opcode is Opcode.BINARY
        elif opcode is Opcode.CONT and self.fragments is not None:
            self.fragments.append(bytes(frame.data))
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._message(data, self.fragments_binary)
            elif len(self.fragments) >= self.max_fragments:
                self.fragments = None
                self.fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments", "limit")
        elif opcode is Opcode.CLOSE:
            # The protocol has answered it, and the client will close the socket; its
            # presences leave now, not when (or if) it does.
            self.open = False
            self.owner.dropped(self, None)

    def _message(self, data: bytes, binary: bool) -> None:
        if not self.open:
            return
        self.owner.received(self, data, binary)
        if self.waiting is not None:
            # An auth hook or policy is under way: what follows waits unparsed (see
            # `data_received`) for its answer, so a flood waits in the client's TCP window,
            # not in our memory.
            self.held = True

    def release(self) -> None:
        """Read again after an auth hook or policy answered (see `_message`)."""
        if not self.held:
            return
        self.held = False
        if self.resume is None:
            self.resume = asyncio.get_running_loop().call_soon(self._resume)

    # -- writing ------------------------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        """Write a frame built by `text_frame` (nothing once closing)."""
        if self.open:
            self.transport.write(frame)  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        """Send one text message (UTF-8 JSON)."""
        if self.open:
            self.transport.write(text_frame(data))  # type: ignore[union-attr]

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the socket is cut if it has not ended within 5 s."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.release()  # the client's close frame must be read
        if self.ws.state is State.OPEN:
            self.open = False
            self.ws.send_close(code, reason)
            self._flush()
        elif self.ws.state is State.CONNECTING:
            transport.close()
            return
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def fail(self, code: int, reason: str, why: str | None) -> None:
        """End the socket for breaking a rule of the protocol or a limit: a close frame with
        ``code`` and ``reason``, then the TCP connection ends; nothing it sends is read after.
        ``why`` is counted in ``disconnects{reason}`` (None: the protocol core has counted
        it)."""
        if self.open:
            self.open = False
            if why is not None:
                self.owner.dropped(self, why)
        if self.ws.state is State.OPEN:
            self.ws.fail(code, reason)
        self.events = []
        self.unread = b""
        self.held = False
        self._flush()

    def abort(self) -> None:
        """Cut the socket now, without a closing handshake."""
        self.open = False
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        transport = self.transport
        ws = self.ws
        if transport is None or transport.is_closing():
            ws.data_to_send()
            return
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()
        if ws.state is not State.OPEN:
            self.open = False
        if ws.close_expected() and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def __repr__(self) -> str:
        return f"<Connection {self.id} {'open' if self.open else 'closed'}>"
