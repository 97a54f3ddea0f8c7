"""The argument checks every layer shares, raising presence_core's own errors.

One function per kind of argument, so a message reads the same wherever a value is refused and
the "an int, but not a bool" rule is written once.  Each check returns the value in its canonical
form (an int, a float) or raises `PresenceTypeError` / `PresenceValueError`, which are also
`TypeError` / `ValueError`: callers that catch the built-ins keep working.

These run on hot paths only after a cheap inline test of the common case has failed, so they
favour clear messages over speed.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Final

from .errors import PresenceTypeError, PresenceValueError

__all__ = [
    "MAX_CONNECTION_ID_LENGTH",
    "check_callable",
    "check_conn_id",
    "check_finite",
    "check_int",
    "check_node",
    "check_seconds",
    "check_text",
    "check_time",
    "is_conn_id",
    "is_int",
    "is_number",
    "type_name",
]


def type_name(value: object) -> str:
    """The name of ``value``'s type, for messages."""
    return type(value).__name__


def is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool (True is a bug in the caller, not a count)."""
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def is_number(value: object) -> bool:
    """Whether ``value`` is an int or a float, and not a bool."""
    return (
        type(value) is float
        or type(value) is int
        or (isinstance(value, (int, float)) and not isinstance(value, bool))
    )


def _as_float(value: int | float, what: str) -> float:
    try:
        return float(value)
    except OverflowError:
        # An int beyond float range is a value out of range, not a crash of the checker.
        raise PresenceValueError(
            f"{what} is out of float range, got an int of {int(value).bit_length()} bits"
        ) from None


def check_int(value: object, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]`` (either bound optional)."""
    if not is_int(value):
        raise PresenceTypeError(f"{what} must be an int, not {type_name(value)}")
    number: int = value  # type: ignore[assignment]
    if (low is not None and number < low) or (high is not None and number > high):
        # A huge int cannot even be printed (Python refuses past 4,300 digits).
        got = number if number.bit_length() <= 64 else f"an int of {number.bit_length()} bits"
        if high is None:
            raise PresenceValueError(f"{what} must be >= {low}, got {got}")
        if low is None:
            raise PresenceValueError(f"{what} must be <= {high}, got {got}")
        raise PresenceValueError(f"{what} must be between {low} and {high}, got {got}")
    return number


_SECONDS: Final = "a number of seconds (int or float)"


def check_seconds(value: object, what: str) -> float:
    """``value`` as a float of seconds that is positive and finite (a TTL, an interval)."""
    if not is_number(value):
        raise PresenceTypeError(f"{what} must be {_SECONDS}, not {type_name(value)}")
    seconds = _as_float(value, what)  # type: ignore[arg-type]
    if not (seconds > 0.0) or seconds == math.inf:
        raise PresenceValueError(f"{what} must be positive and finite, got {value!r}")
    return seconds


def check_finite(value: object, what: str, *, kind: str = "a number") -> float:
    """``value`` (an int or float, not a bool) as a finite float; ``kind`` names it in errors."""
    if not is_number(value):
        raise PresenceTypeError(f"{what} must be {kind}, not {type_name(value)}")
    number = _as_float(value, what)  # type: ignore[arg-type]
    if number - number != 0.0:  # inf or nan
        raise PresenceValueError(f"{what} must be finite, got {value!r}")
    return number


def check_time(value: object, what: str = "now") -> float:
    """``value`` as a finite float of seconds (a reading of a clock; may be negative)."""
    return check_finite(value, what, kind=_SECONDS)


def check_text(value: object, what: str, limit: int) -> str:
    """``value`` as a non-empty str of at most ``limit`` characters that encodes as UTF-8."""
    if not isinstance(value, str):
        raise PresenceTypeError(f"{what} must be a str, not {type_name(value)}")
    size = len(value)
    if size == 0:
        raise PresenceValueError(f"{what} must not be empty")
    if size > limit:
        raise PresenceValueError(f"{what} is {size} characters long, over the limit of {limit}")
    if not value.isascii():
        # Lone surrogates cannot be encoded as JSON or sent to Redis; refuse them at the door,
        # not in the middle of a flush to thousands of subscribers.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PresenceValueError(f"{what} is not valid Unicode text: {value!r}") from None
    return value


def check_callable(value: object, what: str) -> Callable[..., object]:
    """``value`` if it is callable."""
    if not callable(value):
        raise PresenceTypeError(f"{what} must be callable, not {type_name(value)}")
    return value


MAX_CONNECTION_ID_LENGTH: Final = 256
"""Connection ids are the host's own (a socket id, a UUID); longer str ids are refused."""

_MIN_INT_ID: Final = -(2**63)
_MAX_INT_ID: Final = 2**63 - 1


def is_conn_id(conn: object) -> bool:
    """Whether ``conn`` has a type a connection id can have (str, or int but not bool)."""
    return isinstance(conn, (str, int)) and not isinstance(conn, bool)


def check_conn_id(conn: object) -> str | int:
    """``conn`` if it is a valid connection id: a str as `check_text` allows, or a 64-bit int."""
    if isinstance(conn, str):
        return check_text(conn, "connection id", MAX_CONNECTION_ID_LENGTH)
    if is_int(conn):
        if not _MIN_INT_ID <= conn <= _MAX_INT_ID:  # type: ignore[operator]
            # Ids are socket ids or counters; a bigger int cannot even go in an error message.
            raise PresenceValueError(
                f"an int connection id must fit in 64 bits, got one of {conn.bit_length()} bits"  # type: ignore[attr-defined]
            )
        return conn  # type: ignore[return-value]
    raise PresenceTypeError(f"connection id must be a str or an int, not {type_name(conn)}")


_NODE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")


def check_node(node: object) -> str:
    """``node`` if it can prefix refs and name a process in Redis: ``[A-Za-z0-9_-]{1,32}``."""
    if not isinstance(node, str) or _NODE.fullmatch(node) is None:
        raise PresenceValueError(f"node must match [A-Za-z0-9_-]{{1,32}}, got {node!r}")
    return node


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
