"""What both table implementations share: the tombstone, argument checks and their messages.

Both twins call these same functions, so a bad argument raises the same exception with the
same text whichever implementation is live.  The checks run before any state is touched.
"""

from __future__ import annotations

import math
from typing import Final, final

__all__ = [
    "TOMBSTONE",
    "Tombstone",
    "check_capacity",
    "check_limit",
    "check_now",
    "check_tick",
    "check_ttl",
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


def _is_number(value: object) -> bool:
    # bool is an int, but True seconds is a bug in the caller, not a duration.
    return (type(value) is float or type(value) is int) or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
    )


def check_ttl(ttl: object) -> float:
    """Return `ttl` as a float of seconds, or raise if it is not positive and finite."""
    if not _is_number(ttl):
        raise TypeError(f"ttl must be a number of seconds (int or float), not {type(ttl).__name__}")
    value = float(ttl)  # type: ignore[arg-type]
    if not (value > 0.0) or value == math.inf:
        raise ValueError(f"ttl must be positive and finite, got {ttl!r}")
    return value


def check_now(now: object) -> float:
    """Return `now` as a float, or raise if it is not a finite number."""
    if not _is_number(now):
        raise TypeError(f"now must be a number of seconds (int or float), not {type(now).__name__}")
    value = float(now)  # type: ignore[arg-type]
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"now must be finite, got {now!r}")
    return value


def check_capacity(capacity: object) -> int:
    """Return `capacity` if it is an int between 1 and 2**31 - 2**16, else raise."""
    if type(capacity) is not int and not (
        isinstance(capacity, int) and not isinstance(capacity, bool)
    ):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY}, got {capacity!r}")
    return int(capacity)


def check_tick(tick: object) -> float:
    """Return `tick` as a float of seconds, or raise if it is not in [1 ms, 60 s]."""
    if not _is_number(tick):
        raise TypeError(
            f"tick must be a number of seconds (int or float), not {type(tick).__name__}"
        )
    value = float(tick)  # type: ignore[arg-type]
    if not (MIN_TICK <= value <= MAX_TICK_SECONDS):
        raise ValueError(
            f"tick must be between {MIN_TICK} and {MAX_TICK_SECONDS} seconds, got {tick!r}"
        )
    return value


def check_limit(limit: object) -> int:
    """Return `limit` for `drain_dirty` if it is a non-negative int, else raise."""
    if type(limit) is not int and not (isinstance(limit, int) and not isinstance(limit, bool)):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    return int(limit)


def time_to_tick(seconds: float, tick: float) -> int:
    """The wheel tick that contains `seconds`: floor(seconds / tick), clamped to +-MAX_TICK."""
    ticks = math.floor(max(-MAX_TICK_F, min(MAX_TICK_F, seconds / tick)))
    return int(ticks)


# Slot numbers are 32-bit in the native table and a few thousand are reserved for list heads.
MAX_CAPACITY: Final = (1 << 31) - (1 << 16)
MIN_TICK: Final = 0.001
MAX_TICK_SECONDS: Final = 60.0
MAX_TICK_F: Final = float(MAX_TICK)
