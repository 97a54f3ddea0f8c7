"""The table benchmarks' data: the keys, the workload's random orders and the containers.

Kept out of `conftest.py` so that benchmark files import it by a name of its own: a
`from conftest import ...` finds whichever `conftest` module was imported first, which is
`tests/conftest.py` when pytest collects `tests` before `bench`.
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Callable
from typing import Any

from cachetools import TTLCache
from lru import LRU

import presence_core
from presence_core.table._py import PresenceTable as PurePresenceTable

__all__ = [
    "AGING_ORDER",
    "BUILDERS",
    "BUILD_NOW",
    "N",
    "NOW",
    "OURS",
    "OURS_PURE",
    "SEED",
    "TTL",
    "TTLCACHE_TTL",
    "VALUE",
    "Prebuilt",
    "PurePresenceTable",
    "Workload",
    "age",
    "make_keys",
]


N = int(os.environ.get("PRESENCE_BENCH_N", "1000000"))
SEED = 20_240_611

# One value object shared by every entry of every container, so that memory measurements
# count the containers and nothing else.  It looks like a presence meta.
VALUE: Any = {"status": "online", "device": "web"}

# Times are explicit so that runs repeat: containers are built at BUILD_NOW with TTL and the
# timed calls use NOW, which moves deadlines later (the heartbeat path).  Nothing calls
# expire() on a shared container, so nothing expires behind a benchmark's back.
BUILD_NOW = 0.0
NOW = 10.0
TTL = 60.0
TTLCACHE_TTL = 3600.0  # TTLCache reads time.monotonic itself; an hour outlasts any run

# Implementation names used in test ids, extra_info and the summary.
OURS = "ours"  # presence_core.PresenceTable: the compiled table when USING_EXTENSION
OURS_PURE = "ours_pure"  # presence_core.table._py.PresenceTable, the pure-Python twin


def make_keys(n: int, seed: int = SEED) -> list[str]:
    """`n` distinct random strings of 16 to 24 URL-safe characters, the same for every seed."""
    rng = random.Random(seed)
    # One big random text cut into pieces is ~20x faster than building each key on its own.
    text = base64.urlsafe_b64encode(rng.randbytes(n * 24)).decode()
    lengths = rng.randbytes(n)
    keys = [text[i * 32 : i * 32 + 16 + lengths[i] % 9] for i in range(n)]
    if len(set(keys)) != n:  # 64**16 possibilities: a collision means a broken generator
        raise AssertionError("duplicate benchmark keys")
    return keys


class Workload:
    """The keys, and random orders of them cut into batches."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.keys = make_keys(n)
        self._next_order = 0

    def order(self, index: int) -> list[str]:
        """Random permutation number `index` of the keys (the same in every run)."""
        order = list(self.keys)
        random.Random(SEED + 1 + index).shuffle(order)
        return order

    def fresh_batches(self, size: int) -> list[list[str]]:
        """Consecutive batches of `size` keys from a permutation no earlier caller got."""
        self._next_order += 1
        order = self.order(self._next_order)
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]


# -- containers -----------------------------------------------------------------------------


def build_ours(keys: list[str], cls: Any = presence_core.PresenceTable) -> Any:
    """A table of capacity len(keys) holding every key, its change log drained (steady state)."""
    table = cls(len(keys))
    upsert = table.upsert
    for key in keys:
        upsert(key, VALUE, TTL, now=BUILD_NOW)
    table.drain_dirty()
    return table


def build_ours_pure(keys: list[str]) -> Any:
    """The pure twin, NOT drained: its drain_dirty() is quadratic at this size (see README)."""
    table = PurePresenceTable(len(keys))
    upsert = table.upsert
    for key in keys:
        upsert(key, VALUE, TTL, now=BUILD_NOW)
    return table


def build_dict(keys: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {}
    for key in keys:
        container[key] = VALUE
    return container


def build_lru_dict(keys: list[str]) -> Any:
    container = LRU(len(keys))
    for key in keys:
        container[key] = VALUE
    return container


def build_ttlcache(keys: list[str]) -> TTLCache[str, Any]:
    container: TTLCache[str, Any] = TTLCache(maxsize=len(keys), ttl=TTLCACHE_TTL)
    for key in keys:
        container[key] = VALUE
    return container


BUILDERS: dict[str, Callable[[list[str]], Any]] = {
    OURS: build_ours,
    OURS_PURE: build_ours_pure,
    "dict": build_dict,
    "lru_dict": build_lru_dict,
    "ttlcache": build_ttlcache,
}


def age(container: Any, order: list[str]) -> None:
    """One heartbeat per key, in `order`: recency order stops following memory order."""
    if isinstance(container, (presence_core.PresenceTable, PurePresenceTable)):
        touch = container.touch
        for key in order:
            touch(key, now=BUILD_NOW)
    else:  # re-setting is the heartbeat of dict, lru-dict and TTLCache
        for key in order:
            container[key] = VALUE


AGING_ORDER = 0  # Workload.order index of the aging sweep; fresh_batches starts at 1


class Prebuilt:
    """Aged containers at N entries, one per implementation, built when first asked for."""

    def __init__(self, workload: Workload) -> None:
        self._workload = workload
        self._built: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self._built:
            container = BUILDERS[name](self._workload.keys)
            age(container, self._workload.order(AGING_ORDER))
            self._built[name] = container
        return self._built[name]
