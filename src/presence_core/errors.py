"""The exceptions presence_core raises.

Every one derives from `PresenceError`, so a host can catch them all in one clause.  Bad input
also derives from the built-in exception a Python programmer would expect (`TypeError` for a value
of the wrong type, `ValueError` for a value of the right type that is out of range), so code that
already catches those keeps working.

Three families sit under the root:

* bad arguments from the host: `PresenceTypeError` and `PresenceValueError` (and their
  subclasses `InvalidMeta`, `MetaTooLarge`, `UnknownPlan`), plus `NotTracked` for an update of a
  presence that does not exist;
* refusals that depend on load: `LimitExceeded` (`QuotaExceeded`, `RateLimited`);
* what comes from outside the process: `ProtocolError` for a frame or payload from the wire
  that does not follow the Phoenix / Supabase protocol, `TokenError` for a client's token that
  does not verify, and `StoreError` for a shared store (Redis) that failed or could not be
  reached;
* `KeyMismatch`, a track under a presence key other than the one the connection is bound to
  (an impersonation attempt, see `Tracker.bind_key`).

A refused call never changes anything: the Tracker checks every argument, quota and rate limit
before it touches its state.
"""

from __future__ import annotations

__all__ = [
    "InvalidMeta",
    "KeyMismatch",
    "LimitExceeded",
    "MetaTooLarge",
    "NotTracked",
    "PresenceError",
    "PresenceTypeError",
    "PresenceValueError",
    "ProtocolError",
    "QuotaExceeded",
    "RateLimited",
    "StoreCommandError",
    "StoreConnectionError",
    "StoreError",
    "TokenError",
    "UnknownPlan",
]


class PresenceError(Exception):
    """Base class of every error presence_core raises on purpose."""


class PresenceTypeError(PresenceError, TypeError):
    """An argument has the wrong type (a topic that is not a str, a meta that is not a dict)."""


class PresenceValueError(PresenceError, ValueError):
    """An argument has the right type but a value that is not allowed (empty, too long...)."""


class InvalidMeta(PresenceTypeError):
    """A meta is not a dict with str keys that orjson can serialise."""


class MetaTooLarge(PresenceValueError):
    """A meta's orjson encoding is longer than the plan's ``max_meta_bytes``.

    Attributes:
        size: The encoded size in bytes.
        limit: The limit that was exceeded.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"meta is {size} bytes as JSON, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit

    # Errors with their own __init__ say how to rebuild themselves, so that they survive pickling
    # (a ProcessPoolExecutor, multiprocessing) instead of failing to unpickle.
    def __reduce__(self) -> tuple[type[MetaTooLarge], tuple[int, int]]:
        return type(self), (self.size, self.limit)


class UnknownPlan(PresenceValueError):
    """A connection was registered with a plan name the Tracker was not configured with."""


class NotTracked(PresenceError, LookupError):
    """`Tracker.update` was called for a (connection, topic, key) that has no presence."""


class LimitExceeded(PresenceError):
    """Base class of the refusals that depend on load rather than on the arguments themselves.

    Attributes:
        conn: The connection whose limit was hit.
        limit: The name of the `presence_core.limits.Limits` field that refused the call.
    """

    def __init__(self, message: str, conn: str | int, limit: str) -> None:
        super().__init__(message)
        self.conn = conn
        self.limit = limit

    def __reduce__(self) -> tuple[type[LimitExceeded], tuple[object, ...]]:
        return type(self), (str(self), self.conn, self.limit)


class QuotaExceeded(LimitExceeded):
    """A track would exceed a quota: presences or topics per connection, metas per key.

    Attributes:
        value: The configured maximum.
    """

    def __init__(self, conn: str | int, limit: str, value: int) -> None:
        super().__init__(f"connection {conn!r} reached its {limit} quota of {value}", conn, limit)
        self.value = value

    def __reduce__(self) -> tuple[type[QuotaExceeded], tuple[object, ...]]:
        return type(self), (self.conn, self.limit, self.value)


class RateLimited(LimitExceeded):
    """A connection sent writes faster than its plan's token bucket allows.

    Attributes:
        retry_after: Seconds until the same call would be accepted.
    """

    def __init__(self, conn: str | int, retry_after: float) -> None:
        super().__init__(
            f"connection {conn!r} is rate limited; retry after {retry_after:.3f} s",
            conn,
            "rate_per_second",
        )
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[RateLimited], tuple[object, ...]]:
        return type(self), (self.conn, self.retry_after)


class ProtocolError(PresenceError, ValueError):
    """A frame or payload that does not follow the Phoenix / Supabase protocol.

    Raised by `presence_core.phoenix` for what arrives from the wire (a frame that is not JSON,
    a v2 array of the wrong length, a presence event without a meta) and for a message that
    cannot be written to it.  Arguments of the wrong type or value from the host are
    `PresenceTypeError` / `PresenceValueError` instead.
    """


class TokenError(PresenceError):
    """A client's token was refused: missing, malformed, wrongly signed, expired, without a
    required claim, or for another audience or issuer.

    ``reason`` is the text sent to the client, in Supabase Realtime's words where it has them
    (``"InvalidJWTToken: Token has expired 3 seconds ago"``, ``"Failed to validate JWT
    signature"``).  It never contains the token or a key.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[TokenError], tuple[object, ...]]:
        return type(self), (self.reason,)


class KeyMismatch(PresenceValueError):
    """A connection bound to one presence key (`Tracker.bind_key`, or the server's
    ``key_claim``) tried to track or update as another."""


class StoreError(PresenceError):
    """Base class of the errors of a shared presence store (Redis): a command failed, or the
    store could not be reached.

    Attributes:
        command: The name of the store command that failed (``"EVALSHA"``, ``"HSET"``...), or
            ``None`` when the failure is not tied to one command (a lost connection).
    """

    def __init__(self, message: str, *, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command

    def __reduce__(self) -> tuple[object, ...]:
        return _store_error, (type(self), str(self), self.command)


def _store_error(cls: type[StoreError], message: str, command: str | None) -> StoreError:
    # Unpickles a StoreError (or a subclass taking the same arguments): ``command`` is
    # keyword-only, which __reduce__'s positional arguments cannot pass directly.
    return cls(message, command=command)


class StoreCommandError(StoreError):
    """Redis answered a command with an error reply (``WRONGTYPE ...``, ``NOPERM ...``).

    Attributes:
        command: The command's name (``"HSETEX"``).
        position: The command's index in its batch (0 for a single command).
        reply: The error reply as Redis sent it.
        replies: When raised by a batch, all its replies in order, each error in its place as a
            `StoreCommandError`; ``None`` otherwise.
        errors: When raised by a batch, every error of the batch (this one first).
    """

    def __init__(self, reply: str, *, command: str | None, position: int = 0) -> None:
        super().__init__(f"{command or 'command'} (#{position}) failed: {reply}", command=command)
        self.reply = reply
        self.position = position
        self.replies: list[object] | None = None
        self.errors: list[StoreCommandError] = [self]

    def __reduce__(self) -> tuple[object, ...]:
        return _command_error, (self.reply, self.command, self.position)


def _command_error(reply: str, command: str | None, position: int) -> StoreCommandError:
    return StoreCommandError(reply, command=command, position=position)


class StoreConnectionError(StoreError):
    """The connection failed, broke or timed out.

    Attributes:
        outcome_unknown: ``True`` when the failed batch was written (at least in part) before the
            failure, so some of its commands may have been applied and others not: the caller
            must treat its effect as unknown and write state back idempotently.  ``False`` when
            it certainly was not applied (the connection could not be opened, or was already
            closed when the batch was submitted).
    """

    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        super().__init__(message, command=None)
        self.outcome_unknown = outcome_unknown

    def __reduce__(self) -> tuple[object, ...]:
        return _connection_error, (str(self), self.outcome_unknown)


def _connection_error(message: str, outcome_unknown: bool) -> StoreConnectionError:
    return StoreConnectionError(message, outcome_unknown=outcome_unknown)
