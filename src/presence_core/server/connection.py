"""One client socket: websockets' Sans-I/O protocol driven by an asyncio transport.

`websockets`' asyncio server gives every connection a task, a keepalive task, a message
assembler and futures per message: about a hundred objects that every full garbage collection
walks, and a task switch per frame.  Here a connection is one `asyncio.Protocol` around a
`websockets.server.ServerProtocol`, which parses the handshake and the frames, answers pings and
runs the closing handshake.  Frames to the client are written straight to the transport, built
once for all the members of a topic (server frames are not masked, so every member gets the same
bytes).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Literal, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from .server import Channel, PresenceServer

__all__ = ["Connection", "text_frame"]

OPEN_TIMEOUT = 10.0  # seconds from TCP accept to a complete handshake
CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take before the socket is cut


def text_frame(data: bytes) -> bytes:
    """A complete, unmasked text frame around ``data`` (UTF-8 JSON), ready for any client."""
    return Frame(Opcode.TEXT, data).serialize(mask=False)


class Connection(asyncio.Protocol):
    """A WebSocket client of a `PresenceServer`, with its Phoenix state.

    The transport calls `data_received`; complete messages go to the server's ``_received``,
    the handshake to its ``_handshake``, and the end of the socket to its ``_closed``.
    """

    __slots__ = (
        "server",
        "id",
        "ws",
        "transport",
        "open",
        "version",
        "token",
        "channels",
        "joins_tat",
        "broadcasts_tat",
        "fragments",
        "fragments_binary",
        "backlog",
        "timer",
    )

    def __init__(self, server: PresenceServer, conn_id: int, max_size: int) -> None:
        self.server = server
        self.id = conn_id
        self.ws = ServerProtocol(max_size=max_size)
        self.transport: asyncio.Transport | None = None
        self.open = False  # handshake done and no close frame sent or received
        self.version: Literal[1, 2] = 1
        self.token: str | None = None
        self.channels: dict[str, Channel] = {}
        self.joins_tat = -math.inf  # token buckets (`limits.admit`): theoretical arrival times
        self.broadcasts_tat = -math.inf
        self.fragments: list[bytes] | None = None  # a fragmented message being received
        self.fragments_binary = False
        self.backlog: list[tuple[bytes, bool]] | None = None  # held while an auth hook runs
        self.timer: asyncio.TimerHandle | None = None

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._handshake(event)
        self._flush()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server._closed(self)

    def pause_writing(self) -> None:
        # The client reads slower than its topics change: it would hold ever more memory here.
        # (Before the handshake this is a large HTTP answer, /metrics say: it drains, then ends.)
        if self.open:
            self.server._slow(self)

    # -- reading ------------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        response = self.server._handshake(self, request)
        self.ws.send_response(response)
        if response.status_code == 101:
            assert self.timer is not None
            self.timer.cancel()
            self.timer = None
            self.open = True
            self.server._opened(self)

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
        elif opcode is Opcode.CLOSE:
            self.open = False  # the protocol has answered it; the client closes the socket

    def _message(self, data: bytes, binary: bool) -> None:
        if not self.open:
            return
        if self.backlog is not None:
            self.backlog.append((data, binary))
            return
        self.server._received(self, data, binary)

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
        if self.ws.state is State.OPEN:
            self.open = False
            self.ws.send_close(code, reason)
            self._flush()
        elif self.ws.state is State.CONNECTING:
            transport.close()
            return
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

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
