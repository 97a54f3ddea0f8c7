"""Differential test: the compiled table, its pure twin and a trivial model, step by step.

The two implementations must agree exactly, including the order of every list they return.
The model is the contract written the slowest way possible (a dict, an OrderedDict for
recency, a scan for expiry); it agrees with them exactly except for the order of `expire()`
results, which the wheel decides and the model does not try to copy.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from impls import impl as _impl

from presence_core import TOMBSTONE

# 1 and 1.0 are the same key (equal, same hash), as in a dict; they exercise __eq__.
KEYS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1.0, "a", "b", ("t", 1), ("t", 2)])
TTLS = st.one_of(
    st.sampled_from([0.001, 0.005, 0.01, 0.011, 0.5, 2.56, 3.0, 655.36, 700.0, 1e5, 5e7, 1e9]),
    st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False),
)
# Steps back, small and large: under 16 ticks the wheel stays where it is, beyond that the next
# expire() moves it back and places every entry again.
STEPS = st.sampled_from(
    [0.0, 0.0, 0.001, 0.004, 0.01, 0.3, 1.0, 2.56, 10.0, 700.0, 1e5, 5e7]
    + [-0.004, -0.016, -0.5, -3.0, -100.0, -1e5, -5e7]
)


class Model:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.live: dict[Any, list[Any]] = {}  # key -> [value, deadline, ttl]
        self.recency: OrderedDict[Any, None] = OrderedDict()
        self.dirty: dict[Any, None] = {}
        self.evicted: list[tuple[Any, Any]] = []

    def _remove(self, key: Any) -> list[Any]:
        del self.recency[key]
        self.dirty.setdefault(key)
        return self.live.pop(key)

    def upsert(self, key: Any, value: Any, ttl: float, now: float) -> bool:
        new = key not in self.live
        if new and len(self.live) >= self.capacity:
            oldest = next(iter(self.recency))
            self.evicted.append((oldest, self._remove(oldest)[0]))
        self.live[key] = [value, now + ttl, ttl]
        self.recency[key] = None
        self.recency.move_to_end(key)
        self.dirty.setdefault(key)
        return new

    def touch(self, key: Any, ttl: float | None, now: float) -> bool:
        if key not in self.live:
            return False
        entry = self.live[key]
        if ttl is not None:
            entry[2] = ttl
        entry[1] = now + entry[2]
        self.recency.move_to_end(key)
        return True

    def pop(self, key: Any) -> Any:
        return self._remove(key)[0] if key in self.live else None

    def expire(self, now: float, order: list[Any]) -> dict[Any, Any]:
        # Which entries expire is the model's to say; in what order is the wheel's, and it
        # matters afterwards (the dirty list keeps the order of removal), so follow it.
        gone = {k for k, (_, deadline, _) in self.live.items() if deadline <= now}
        assert gone == set(order), (gone, order)
        return {k: self._remove(k)[0] for k in order}

    def drain_dirty(self, limit: int | None) -> list[tuple[Any, Any]]:
        keys = list(self.dirty)[: len(self.dirty) if limit is None else limit]
        for k in keys:
            del self.dirty[k]
        return [(k, self.live[k][0] if k in self.live else TOMBSTONE) for k in keys]


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.counter = 0

    @initialize(
        capacity=st.integers(min_value=1, max_value=8),
        tick=st.sampled_from([0.001, 0.01, 0.05, 1.0]),
        start=st.sampled_from([0.0, 1000.0, -50.0, 1.7e9]),
    )
    def setup(self, capacity: int, tick: float, start: float) -> None:
        self.now = start
        self.c = _impl("c")(capacity, tick=tick)
        self.py = _impl("py")(capacity, tick=tick)
        self.model = Model(capacity)

    def both(self, method: str, *args: Any, **kwargs: Any) -> Any:
        got_c = getattr(self.c, method)(*args, **kwargs)
        got_py = getattr(self.py, method)(*args, **kwargs)
        assert got_c == got_py, (method, args, kwargs)
        return got_c

    def value(self) -> int:
        self.counter += 1
        return self.counter

    @rule(step=STEPS)
    def advance(self, step: float) -> None:
        self.now += step

    @rule(key=KEYS, ttl=TTLS)
    def upsert(self, key: Any, ttl: float) -> None:
        value = self.value()
        got = self.both("upsert", key, value, ttl, now=self.now)
        assert got == self.model.upsert(key, value, ttl, self.now)

    @rule(keys=st.lists(KEYS, max_size=6), ttl=TTLS)
    def upsert_many(self, keys: list[Any], ttl: float) -> None:
        items = [(k, self.value()) for k in keys]
        got = self.both("upsert_many", items, ttl, now=self.now)
        assert got == sum(self.model.upsert(k, v, ttl, self.now) for k, v in items)

    @rule(key=KEYS, ttl=st.one_of(st.none(), TTLS))
    def touch(self, key: Any, ttl: float | None) -> None:
        got = self.both("touch", key, ttl, now=self.now)
        assert got == self.model.touch(key, ttl, self.now)

    @rule(keys=st.lists(KEYS, max_size=6), ttl=st.one_of(st.none(), TTLS))
    def touch_many(self, keys: list[Any], ttl: float | None) -> None:
        got = self.both("touch_many", keys, ttl, now=self.now)
        assert got == sum(self.model.touch(k, ttl, self.now) for k in keys)

    @rule(key=KEYS)
    def pop(self, key: Any) -> None:
        assert self.both("pop", key) == self.model.pop(key)

    @rule(key=KEYS)
    def read(self, key: Any) -> None:
        entry = self.model.live.get(key)
        assert self.both("get", key) == (entry[0] if entry else None)
        assert self.both("deadline", key) == (entry[1] if entry else None)
        assert self.both("__contains__", key) == (entry is not None)

    @rule()
    def expire(self) -> None:
        got = self.both("expire", now=self.now)
        assert len({k for k, _ in got}) == len(got)
        assert dict(got) == self.model.expire(self.now, [k for k, _ in got])

    @rule(limit=st.one_of(st.none(), st.integers(min_value=0, max_value=4)))
    def drain_dirty(self, limit: int | None) -> None:
        assert self.both("drain_dirty", limit) == self.model.drain_dirty(limit)

    @rule()
    def drain_evicted(self) -> None:
        assert self.both("drain_evicted") == self.model.evicted
        self.model.evicted = []

    @precondition(lambda self: hasattr(self, "c"))
    @invariant()
    def agree(self) -> None:
        assert list(self.c) == list(self.py) == list(reversed(self.model.recency))
        assert len(self.c) == len(self.py) == len(self.model.live)
        stats_c, stats_py = self.c.stats(), self.py.stats()
        for stats in (stats_c, stats_py):
            del stats["implementation"], stats["memory_bytes"]
        assert stats_c == stats_py
        assert stats_c["dirty"] == len(self.model.dirty)
        self.c.check_invariants()
        self.py.check_invariants()


TableMachine.TestCase.settings = TableMachine.TestCase.settings  # profile from conftest
test_table_machine = TableMachine.TestCase


@pytest.mark.parametrize("seed", range(3))
def test_long_random_run_agrees(seed: int) -> None:
    """A long seeded run at larger scale than hypothesis explores: 20k operations."""
    import random

    rng = random.Random(seed)
    c, py = _impl("c")(200, tick=0.01), _impl("py")(200, tick=0.01)
    now = 0.0
    for _ in range(20_000):
        op = rng.random()
        key = rng.randrange(400)
        if op < 0.4:
            args: tuple[Any, ...] = (
                "upsert",
                key,
                rng.random(),
                rng.choice([0.05, 1.0, 30.0, 900.0]),
            )
        elif op < 0.7:
            args = ("touch", key)
        elif op < 0.75:
            args = ("pop", key)
        elif op < 0.85:
            now += rng.choice([0.0, 0.01, 0.3, 5.0, 400.0, -0.2])
            args = ("expire",)
        elif op < 0.9:
            args = ("drain_dirty", rng.choice([None, 3]))
        elif op < 0.95:
            args = ("drain_evicted",)
        else:
            args = ("touch_many", [rng.randrange(400) for _ in range(20)])
        method, *rest = args
        kwargs = {} if method.startswith("drain") or method == "pop" else {"now": now}
        assert getattr(c, method)(*rest, **kwargs) == getattr(py, method)(*rest, **kwargs)
    assert list(c) == list(py)
    c.check_invariants()
