"""Running a coroutine on the fastest event loop installed, with descriptors for every socket."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["raise_nofile", "run", "uvloop_installed"]

T = TypeVar("T")


def uvloop_installed() -> bool:
    """Whether `run` uses uvloop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop when it is installed (the ``serve`` extra; it is never
    required), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns (soft, hard).

    Every socket is a descriptor, and the usual soft limit (1,024) is far below what a server
    or a load generator holds, while the hard limit, which an unprivileged process may raise
    its soft limit to, is usually much higher.  A failure leaves the limit as it was: the
    caller reads the result and says what it means.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        # An unlimited hard limit still has a kernel ceiling (fs.nr_open, 2**20 by default).
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
