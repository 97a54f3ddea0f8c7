"""What both table implementations share: the tombstone, argument checks and their messages.

Both twins call these same functions, so a bad argument raises the same exception with the
same text whichever implementation is live.  The checks run before any state is touched, and
raise presence_core's own `PresenceTypeError` / `PresenceValueError` (also `TypeError` /
`ValueError`), so the Tracker passes them on as they are.
"""

from __future__ import annotations

import math
from typing import Final, final

from .._validate import check_int, check_seconds, check_time, is_int, is_number, type_name
from ..errors import PresenceTypeError, PresenceValueError

__all__ = [
    "TOMBSTONE",
    "Tombstone",
    "check_capacity",
    "check_limit",
    "check_now",
    "check_tick",
    "check_ttl",
    "describe",
]

# The wheel has four levels of 256 buckets; with the default tick of 10 ms it spans about
# 497 days before an entry needs rescheduling from the top level (which is handled lazily).
WHEEL_BITS: Final = 8
WHEEL_SIZE: Final = 1 << WHEEL_BITS
WHEEL_LEVELS: Final = 4
DEFAULT_TICK: Final = 0.01

# Ticks are kept in a signed 64-bit integer in the native table.  Times are clamped into this
# range before they become ticks so that absurd but finite values (1e300 seconds) stay exact
# in ordering and never overflow.  2**53 keeps the float -> int conversion exact.
MAX_TICK: Final = 1 << 53

# How far `expire(now)` may find `now` behind the wheel's current tick before it moves the
# wheel back to `now` (see "Time going backwards" in `_py.py`).  A smaller step back is left
# alone: only entries due within it wait on the pending list, and they expire soon.
REBASE_TICKS: Final = 16


@final
class Tombstone:
    """The value `drain_dirty()` reports for a key that was removed since the last drain."""

    __slots__ = ()
    _instance: Tombstone | None = None

    def __new__(cls) -> Tombstone:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "TOMBSTONE"

    def __reduce__(self) -> str:
        return "TOMBSTONE"

    def __bool__(self) -> bool:
        return False


TOMBSTONE: Final = Tombstone()


def check_ttl(ttl: object) -> float:
    """Return `ttl` as a float of seconds, or raise if it is not positive and finite."""
    return check_seconds(ttl, "ttl")


def check_now(now: object) -> float:
    """Return `now` as a float, or raise if it is not a finite number."""
    return check_time(now, "now")


def _shown(value: object) -> str:
    """`repr(value)` for a message; an int too long to print usefully is given by its size."""
    if is_int(value) and not (-(1 << 64) < value < (1 << 64)):  # type: ignore[operator]
        return f"an int of {int(value).bit_length()} bits"  # type: ignore[call-overload]
    return repr(value)


def check_capacity(capacity: object) -> int:
    """Return `capacity` if it is an int between 1 and 2**31 - 2**16, else raise."""
    if is_int(capacity) and not (1 <= capacity <= MAX_CAPACITY):  # type: ignore[operator]
        # Not check_int's message: it prints the number, which fails beyond 4,300 digits.
        raise PresenceValueError(
            f"capacity must be between 1 and {MAX_CAPACITY}, got {_shown(capacity)}"
        )
    return check_int(capacity, "capacity", low=1, high=MAX_CAPACITY)


def check_tick(tick: object) -> float:
    """Return `tick` as a float of seconds, or raise if it is not in [1 ms, 60 s]."""
    if not is_number(tick):
        raise PresenceTypeError(
            f"tick must be a number of seconds (int or float), not {type_name(tick)}"
        )
    try:
        value = float(tick)  # type: ignore[arg-type]
    except OverflowError:
        value = math.inf
    if not (MIN_TICK <= value <= MAX_TICK_SECONDS):
        raise PresenceValueError(
            f"tick must be between {MIN_TICK} and {MAX_TICK_SECONDS} seconds, got {_shown(tick)}"
        )
    return value


def check_limit(limit: object) -> int:
    """Return `limit` for `drain_dirty` if it is a non-negative int, else raise."""
    if not is_int(limit):
        raise PresenceTypeError(f"limit must be an int or None, not {type_name(limit)}")
    if limit < 0:  # type: ignore[operator]
        raise PresenceValueError(f"limit must be >= 0, got {_shown(limit)}")
    return check_int(limit, "limit", low=0)


def describe(item: object) -> str:
    """What a bad item of a batch call is, for its error message."""
    if isinstance(item, tuple):
        return f"a tuple of length {len(item)}"
    return type_name(item)


def time_to_tick(seconds: float, tick: float) -> int:
    """The wheel tick that contains `seconds`: floor(seconds / tick), clamped to +-MAX_TICK."""
    ticks = math.floor(max(-MAX_TICK_F, min(MAX_TICK_F, seconds / tick)))
    return int(ticks)


# Slot numbers are 32-bit in the native table and a few thousand are reserved for list heads.
MAX_CAPACITY: Final = (1 << 31) - (1 << 16)
MIN_TICK: Final = 0.001
MAX_TICK_SECONDS: Final = 60.0
MAX_TICK_F: Final = float(MAX_TICK)
