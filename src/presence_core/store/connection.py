"""The data plane's connection to Redis: one socket, pipelined, every reply checked.

redis-py is the control plane (discovery, pub/sub, reconciling reads); this module is the hot
write path.  A batch of commands is written to the socket in one go and its replies are parsed by
`hiredis.Reader` as they arrive, in order.  Redis answers every command exactly once and in the
order it was sent, so the n-th reply of a batch belongs to its n-th command: an error reply is
never raised by the reader (hiredis returns it as a value), it is tied to its command's name and
position, and the batch fails with `StoreCommandError` only once all its replies have been read.
The stream therefore stays in step with the commands whatever the replies are.

Several batches may be in flight at once on one connection (they are answered first in, first
out).  A batch whose caller is cancelled keeps its place, so that its replies are still consumed
and never handed to the next batch.

Commands are encoded to RESP in one of two ways:

* `CommandTemplate`: a command of a fixed shape (``HSETEX <key> PX <ms> FIELDS 1 <field>
  <value>``) whose constant parts are encoded once.  Encoding one is a single ``bytes %`` over the
  variable parts, about 0.33 µs for that 8-argument command against 0.74 µs for
  `hiredis.pack_command` and 1.2 µs for a loop in Python (measured on the 2-core development
  machine).  This is what the write-behind flusher uses.
* `encode_command`: any command, through `hiredis.pack_command`; for the rare and the ad hoc.

The connection speaks RESP2, where no reply is the value ``False``; the reader is given a sentinel
for "not enough data" all the same, so that nothing changes if RESP3 (which has booleans) is ever
spoken here.  It uses the running event loop, so it runs on uvloop when the application installed
it.

Failure is explicit.  A connection that breaks, or a batch whose replies do not arrive within
``reply_timeout``, fails every batch in flight with `StoreConnectionError`; its
``outcome_unknown`` says whether some of the batch may have been applied (it was at least partly
written) or certainly was not (it was never written).  A connection that failed stays closed: the
caller connects again, with its own backoff.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from ssl import SSLContext
from typing import Any, TypeAlias, cast

import hiredis
from redis import connection as _redis_connection

from presence_core.errors import (
    PresenceValueError,
    StoreCommandError,
    StoreConnectionError,
)

__all__ = [
    "CommandTemplate",
    "ConnectionOptions",
    "RedisConnection",
    "Reply",
    "StoreCommandError",
    "StoreConnectionError",
    "encode_command",
]

Arg: TypeAlias = bytes | str | int | float
"""One argument of a command: ``str`` is sent as UTF-8, numbers in decimal."""

Reply: TypeAlias = Any
"""One decoded reply: ``bytes``, ``int``, ``None``, a ``list`` of replies, or (with
``raise_on_error=False``) a `StoreCommandError` in the place of an error reply."""

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_REPLY_TIMEOUT = 10.0


# redis-py's URL parser has no annotations.
_parse_url = cast(Callable[[str], dict[str, Any]], _redis_connection.parse_url)

# hiredis.pyi types pack_command's argument as a 1-tuple; it takes any tuple of arguments.
_pack_command = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


def encode_command(args: Sequence[Arg]) -> bytes:
    """The RESP encoding of one command, e.g. ``encode_command(("HGET", key, field))``."""
    return _pack_command(tuple(args))


def _command_name(args: Sequence[Arg]) -> str:
    name = args[0]
    if isinstance(name, bytes):
        return name.decode("ascii", "replace").upper()
    return str(name).upper()


def _bulk(part: Arg) -> bytes:
    if isinstance(part, str):
        data = part.encode()
    elif isinstance(part, bytes):
        data = part
    else:
        data = str(part).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


class CommandTemplate:
    """A command of fixed shape, its constant parts encoded once.

    ``None`` marks a variable part::

        HSETEX = CommandTemplate("HSETEX", None, "PX", None, "FIELDS", "1", None, None)
        HSETEX.encode(key, b"60000", member, meta)   # bytes only, in the order of the Nones

    `encode` takes the variable parts as ``bytes`` (no conversion on the hot path) and returns the
    command's RESP.  It is one ``bytes %`` over a precompiled format, through a function made for
    this arity so that no tuple is built argument by argument.

    Attributes:
        name: The command's name, for error reports (``"HSETEX"``).
        arity: The number of variable parts `encode` takes.
        encode: ``(*parts: bytes) -> bytes``.
    """

    __slots__ = ("arity", "encode", "name")

    def __init__(self, *parts: Arg | None) -> None:
        if not parts or parts[0] is None:
            raise PresenceValueError("a command template starts with the command's name")
        self.name = _command_name([parts[0]])
        pieces = [b"*%d\r\n" % len(parts)]
        for part in parts:
            # A literal % in a constant part must survive the % formatting below.
            pieces.append(b"$%d\r\n%b\r\n" if part is None else _bulk(part).replace(b"%", b"%%"))
        self.arity = sum(part is None for part in parts)
        names = [f"a{i}" for i in range(self.arity)]
        values = "".join(f"len({n}), {n}, " for n in names)
        # Only generated identifiers go into the source; the format travels in the namespace.
        source = f"def encode({', '.join(names)}):\n    return _format % ({values})\n"
        namespace: dict[str, Any] = {"_format": b"".join(pieces)}
        exec(source, namespace)
        self.encode: Callable[..., bytes] = namespace["encode"]

    def __repr__(self) -> str:
        return f"<CommandTemplate {self.name} with {self.arity} variable parts>"


# Query arguments of a URL that the connection understands (redis-py's names).
_URL_OPTIONS = {
    "db",
    "username",
    "password",
    "host",
    "port",
    "path",
    "connection_class",
    "socket_connect_timeout",
    "socket_timeout",
    "client_name",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_check_hostname",
}


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Where and how to connect; `from_url` builds one from a ``redis://`` URL.

    Attributes:
        host, port: The server's TCP address (ignored when `path` is set).
        path: A Unix socket path (``unix://`` URLs), or ``None``.
        username, password: For ``AUTH`` (ACL user, or the password alone).
        db: The database to ``SELECT`` (0: none sent).
        ssl: A TLS context (``rediss://``), or ``None`` for plain TCP.
        connect_timeout: Bound in seconds on connecting, TLS, AUTH and SELECT together.
        reply_timeout: Bound in seconds on waiting for the last reply of a batch.
        client_name: Sent with ``CLIENT SETNAME`` when set.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    ssl: SSLContext | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    client_name: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ssl_context: SSLContext | None = None,
        connect_timeout: float | None = None,
        reply_timeout: float | None = None,
        client_name: str | None = None,
    ) -> ConnectionOptions:
        """Options from ``redis://[user:password@]host[:port][/db]``, ``rediss://`` or
        ``unix://path?db=N``, parsed by redis-py's `parse_url`.

        For ``rediss://`` the TLS context is `ssl_context`, else `ssl.create_default_context()`
        adjusted by the URL's ``ssl_cert_reqs``, ``ssl_ca_certs`` and ``ssl_check_hostname``.
        Query arguments ``socket_connect_timeout``, ``socket_timeout`` and ``client_name`` set
        the timeouts and name unless given here.  Any other query argument is refused.
        """
        try:
            parsed = _parse_url(url)
        except ValueError:
            parsed = None
        if parsed is None:
            # Raised out here, with a fixed message: the parser quotes what it could not read,
            # which may be a piece of the password (an unencoded '/', '#' or '?' in it, or a
            # missing '@', moves where the URL splits).
            raise PresenceValueError(
                "not a Redis URL: expected redis[s]://[[user]:password@]host[:port][/db] or "
                "unix://path[?db=N], with any '/', '#', '?' or '@' in the user or password "
                "percent-encoded"
            )
        unknown = sorted(set(parsed) - _URL_OPTIONS)
        if unknown:
            raise PresenceValueError(f"unsupported Redis URL options: {', '.join(unknown)}")
        tls = url.startswith("rediss://")
        context = ssl_context
        if tls and context is None:
            context = _ssl_context(parsed)
        if connect_timeout is None:
            connect_timeout = float(parsed.get("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        if reply_timeout is None:
            reply_timeout = float(parsed.get("socket_timeout", DEFAULT_REPLY_TIMEOUT))
        return cls(
            host=parsed.get("host", "127.0.0.1"),
            port=int(parsed.get("port", 6379)),
            path=parsed.get("path"),
            username=parsed.get("username"),
            password=parsed.get("password"),
            db=int(parsed.get("db", 0)),
            ssl=context if tls else None,
            connect_timeout=connect_timeout,
            reply_timeout=reply_timeout,
            client_name=client_name if client_name is not None else parsed.get("client_name"),
        )

    def with_changes(self, **changes: Any) -> ConnectionOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def address(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def _ssl_context(parsed: dict[str, Any]) -> SSLContext:
    context = ssl.create_default_context(cafile=parsed.get("ssl_ca_certs"))
    reqs = parsed.get("ssl_cert_reqs")
    check_hostname = parsed.get("ssl_check_hostname")
    if isinstance(check_hostname, str):
        check_hostname = check_hostname.lower() in ("1", "true", "yes")
    if check_hostname is not None:
        context.check_hostname = bool(check_hostname)
    if reqs is not None:
        modes = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}
        modes["required"] = ssl.CERT_REQUIRED
        mode = modes.get(str(reqs).lower())
        if mode is None:
            raise PresenceValueError(f"ssl_cert_reqs must be none, optional or required: {reqs}")
        if mode == ssl.CERT_NONE:
            context.check_hostname = False
        context.verify_mode = mode
    return context


class _Batch:
    """One batch in flight: its replies, in order, as they arrive."""

    __slots__ = ("count", "future", "names", "replies")

    def __init__(self, future: asyncio.Future[list[Reply]], names: Sequence[str]) -> None:
        self.future = future
        self.names = names
        self.count = len(names)
        self.replies: list[Reply] = []


# hiredis answers "no complete reply yet" with this object rather than False (a RESP3 boolean).
_NOT_ENOUGH_DATA = object()


class _RespProtocol(asyncio.Protocol):
    """Feeds what the socket receives into a hiredis Reader and hands replies to batches."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH_DATA)
        self.batches: collections.deque[_Batch] = collections.deque()
        self.lost: StoreConnectionError | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        batches = self.batches
        try:
            while batches:
                batch = batches[0]
                replies = batch.replies
                while len(replies) < batch.count:
                    reply = reader.gets()
                    if reply is _NOT_ENOUGH_DATA:
                        return
                    replies.append(reply)
                batches.popleft()
                if not batch.future.done():  # its caller may have been cancelled
                    batch.future.set_result(replies)
            if reader.gets() is not _NOT_ENOUGH_DATA:
                self.fail(f"unexpected reply from {self.address} with no command waiting")
        except hiredis.ProtocolError as exc:
            self.fail(f"invalid RESP from {self.address}: {exc}")

    def fail(self, message: str) -> None:
        """Break the connection: every batch in flight fails, outcome unknown."""
        if self.lost is None:
            self.lost = StoreConnectionError(
                f"{message}; the outcome of the commands in flight is unknown",
                outcome_unknown=True,
            )
        while self.batches:
            batch = self.batches.popleft()
            if not batch.future.done():
                batch.future.set_exception(self.lost)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(self.lost)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self.fail(f"connection to {self.address} lost{reason}")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if not self._paused:
            return
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drain)


class RedisConnection:
    """One pipelined connection to one Redis server (see the module's docstring).

    Open one with ``await RedisConnection.connect(url_or_options)``; close it with `close()` or
    ``async with``.  Not thread-safe: use it from its event loop only.
    """

    def __init__(self, options: ConnectionOptions, protocol: _RespProtocol) -> None:
        self.options = options
        self._protocol = protocol

    @classmethod
    async def connect(cls, target: str | ConnectionOptions) -> RedisConnection:
        """Connect, then AUTH, SELECT and CLIENT SETNAME as the options say.

        All of it is bounded by ``connect_timeout``.  Raises `StoreConnectionError` (outcome
        known: nothing was applied) when the server cannot be reached, and `StoreCommandError`
        when it refuses the handshake (``WRONGPASS``, a bad db).
        """
        options = ConnectionOptions.from_url(target) if isinstance(target, str) else target
        loop = asyncio.get_running_loop()
        connection: RedisConnection | None = None
        try:
            async with asyncio.timeout(options.connect_timeout):
                if options.path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _RespProtocol(options.address), options.path, ssl=options.ssl
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _RespProtocol(options.address),
                        options.host,
                        options.port,
                        ssl=options.ssl,
                    )
                connection = cls(options, protocol)
                handshake = connection._handshake()
                if handshake:
                    await connection.pipeline(handshake)
        except (OSError, TimeoutError, StoreConnectionError) as exc:
            if connection is not None:
                connection.close()
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            raise StoreConnectionError(
                f"connecting to {options.address} {what}", outcome_unknown=False
            ) from exc
        except BaseException:
            # A refused handshake, or a caller cancelled half-way: no socket may stay open.
            if connection is not None:
                connection.close()
            raise
        return connection

    def _handshake(self) -> list[tuple[Arg, ...]]:
        options = self.options
        commands: list[tuple[Arg, ...]] = []
        if options.password is not None:
            if options.username is not None:
                commands.append(("AUTH", options.username, options.password))
            else:
                commands.append(("AUTH", options.password))
        if options.db:
            commands.append(("SELECT", options.db))
        if options.client_name:
            commands.append(("CLIENT", "SETNAME", options.client_name))
        return commands

    @property
    def is_closed(self) -> bool:
        """Whether the connection is closed or broken; a closed connection stays closed."""
        transport = self._protocol.transport
        return self._protocol.lost is not None or transport is None or transport.is_closing()

    @property
    def in_flight(self) -> int:
        """Batches written whose replies have not all arrived."""
        return len(self._protocol.batches)

    async def execute(self, *args: Arg) -> Reply:
        """Send one command and return its reply; an error reply raises `StoreCommandError`."""
        return (await self.pipeline((args,)))[0]

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], *, raise_on_error: bool = True
    ) -> list[Reply]:
        """Send `commands` in one write and return one reply per command, in order.

        Each command is a sequence of arguments, its name first: ``("HSET", key, field, value)``.
        See `pipeline_encoded` for errors and timeouts.
        """
        payload = b"".join([_pack_command(tuple(command)) for command in commands])
        return await self.pipeline_encoded(
            payload, [_command_name(command) for command in commands], raise_on_error=raise_on_error
        )

    async def pipeline_encoded(
        self,
        payload: bytes | Sequence[bytes],
        names: Sequence[str],
        *,
        raise_on_error: bool = True,
    ) -> list[Reply]:
        """Send commands already encoded as RESP and return one reply per command, in order.

        Args:
            payload: The commands' RESP, as one ``bytes`` or a sequence of pieces written in
                order (pieces need not align with commands).
            names: One name per command, in order (``["HSETEX"] * n``): how many replies to
                read, and what to call a command whose reply is an error.
            raise_on_error: With ``True`` (the default), once every reply has been read, the
                first error reply raises `StoreCommandError`, which carries all the replies
                (``.replies``) and all the errors (``.errors``).  With ``False`` the replies are
                returned with each error in its place as a `StoreCommandError`.

        Raises:
            StoreCommandError: A command got an error reply (see `raise_on_error`).
            StoreConnectionError: The connection was closed before the write (outcome known: not
                applied), or broke or timed out (``reply_timeout``) after it (outcome unknown);
                the connection is closed from then on.
        """
        protocol = self._protocol
        if not names:
            return []
        if protocol.lost is not None or protocol.transport is None or self.is_closed:
            raise StoreConnectionError(
                f"connection to {self.options.address} is closed; nothing was sent",
                outcome_unknown=False,
            )
        transport = protocol.transport
        future: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
        protocol.batches.append(_Batch(future, names))
        if isinstance(payload, bytes):
            transport.write(payload)
        else:
            transport.writelines(payload)
        try:
            async with asyncio.timeout(self.options.reply_timeout):
                await protocol.drain()
                replies = await future
        except TimeoutError:
            protocol.fail(
                f"no complete reply from {self.options.address} within "
                f"{self.options.reply_timeout} s"
            )
            assert protocol.lost is not None
            raise protocol.lost from None
        except StoreConnectionError:
            # The drain failed with the connection: the batch failed with it, the same error.
            if future.done() and not future.cancelled():
                future.exception()
            raise
        return _check(replies, names, raise_on_error)

    def close(self) -> None:
        """Close the connection; batches still in flight fail with `StoreConnectionError`."""
        protocol = self._protocol
        if protocol.lost is None:
            protocol.fail(f"connection to {protocol.address} closed by the client")
        elif protocol.transport is not None:
            protocol.transport.abort()

    async def __aenter__(self) -> RedisConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<RedisConnection {self.options.address} {state}>"


def _check(replies: list[Reply], names: Sequence[str], raise_on_error: bool) -> list[Reply]:
    """Replace each error reply by a `StoreCommandError` naming its command and position."""
    errors: list[StoreCommandError] | None = None
    for position, reply in enumerate(replies):
        if type(reply) is hiredis.ReplyError:
            error = StoreCommandError(str(reply), command=names[position], position=position)
            replies[position] = error
            if errors is None:
                errors = []
            errors.append(error)
    if errors is None or not raise_on_error:
        return replies
    first = errors[0]
    first.replies = replies
    first.errors = errors
    if len(errors) > 1:
        first.args = (f"{first.args[0]} (and {len(errors) - 1} more errors in the batch)",)
    raise first
