"""What a type checker sees of PresenceTable: run by tests/test_typing.py with mypy --strict.

Never imported or run by pytest (its name does not start with test_); every line is a claim
about an inferred type, checked statically by `typing.assert_type`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import assert_type

from presence_core import TOMBSTONE, PresenceTable, Tombstone
from presence_core.table import _fast

Meta = dict[str, str]

table = PresenceTable[str, Meta](10)
assert_type(table, PresenceTable[str, Meta])

assert_type(table.upsert("a", {"status": "online"}, 30.0), bool)
assert_type(table.upsert("a", {"status": "online"}, 30, now=1.0), bool)
assert_type(table.upsert_many([("a", {"status": "away"})], 30.0, now=2.0), int)
assert_type(table.touch("a"), bool)
assert_type(table.touch("a", 10.0, now=3.0), bool)
assert_type(table.touch_many(["a", "b"], now=3.0), int)

assert_type(table.get("a"), Meta | None)
assert_type(table.get("a", 0), Meta | int)
assert_type(table.get("a", {}), Meta)
assert_type(table.pop("a"), Meta | None)
assert_type(table.pop("a", "gone"), Meta | str)
assert_type(table.deadline("a"), float | None)
assert_type(table.deadline("a", -1), float | int)

assert_type(table.expire(), list[tuple[str, Meta]])
assert_type(table.expire(now=100.0), list[tuple[str, Meta]])
assert_type(table.drain_evicted(), list[tuple[str, Meta]])
assert_type(table.drain_dirty(), list[tuple[str, Meta | Tombstone]])
assert_type(table.drain_dirty(limit=5), list[tuple[str, Meta | Tombstone]])

assert_type(iter(table), Iterator[str])
for key in table:
    assert_type(key, str)
assert_type(list(table), list[str])
assert_type(len(table), int)
assert_type("a" in table, bool)
assert_type(table.capacity, int)
assert_type(table.tick, float)

for changed, value in table.drain_dirty():
    assert_type(changed, str)
    if value is TOMBSTONE:
        continue
    assert_type(value, Meta | Tombstone)
    if isinstance(value, Tombstone):
        continue
    assert_type(value, Meta)

# The constructor's keywords.
clocked = PresenceTable[int, bytes](5, tick=0.05, clock=lambda: 0.0, track_dirty=False)
assert_type(clocked.get(1), bytes | None)

# The stub of the compiled table says the same.
fast = _fast.PresenceTable[str, Meta](10, tick=0.01)
assert_type(fast.get("a"), Meta | None)
assert_type(fast.get("a", 0), Meta | int)
assert_type(fast.pop("a", "gone"), Meta | str)
assert_type(fast.deadline("a"), float | None)
assert_type(fast.expire(), list[tuple[str, Meta]])
assert_type(fast.drain_evicted(), list[tuple[str, Meta]])
assert_type(fast.drain_dirty(), list[tuple[str, Meta | Tombstone]])
assert_type(iter(fast), Iterator[str])
assert_type(fast.upsert_many([("a", {})], 1.0), int)
