"""What a type checker sees of the Tracker's async hooks: run by tests/test_typing.py with mypy
--strict.

Never imported or run by pytest (its name does not start with test_): an ``async def`` hook
satisfies `AsyncTransport` / `AsyncRawTransport` and is accepted wherever a hook is, and
`Tracker.wait_flushed` is awaited for an int.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, assert_type

from presence_core import AsyncRawTransport, AsyncTransport, Tracker


async def send(topic: str, event: str, payload: dict[str, Any]) -> None:
    pass


async def send_raw(topic: str, event: str, payload: bytes) -> bool:
    return True


class Socket:
    async def __call__(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        pass


hook: AsyncTransport = send
socket_hook: AsyncTransport = Socket()
raw_hook: AsyncRawTransport = send_raw


async def host(tracker: Tracker) -> None:
    assert_type(tracker.subscribe("room:1", send), Callable[[], None])
    assert_type(tracker.subscribe("room:1", send_raw, raw=True, max_pending=64), Callable[[], None])
    assert_type(tracker.add_transport(Socket(), on_overflow=lambda: None), Callable[[], None])
    tracker.send_state("room:1", socket_hook)
    assert_type(await tracker.wait_flushed(), int)
    assert_type(await tracker.wait_flushed(timeout=1.5), int)
