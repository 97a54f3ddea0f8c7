"""Presences as the Tracker stores them, and the JSON payloads built from them.

A presence is a plain tuple ``(topic, key, data, conn)``:

* ``data`` is the meta already encoded as JSON with its ref first:
  ``b'{"phx_ref":"<ref>",...meta fields}'``.  The meta must be encoded anyway (to check it is
  JSON and to measure it against the byte limit); the bytes are a third of the size of the dict;
  every read needs a fresh copy (callers and client libraries mutate what they get), which
  ``orjson.loads`` makes at C speed; a ``presence_diff`` is spliced together from these bytes
  with no decode; and the Redis store writes exactly these bytes.  The ref sits first so it can
  be sliced out without parsing.
* ``conn`` is the id of the connection that holds the presence (a str or an int), or ``None``
  for a presence held by another process and mirrored here (the *remote view*, see
  `Tracker.apply_remote`): its owner is the node its ref starts with.

A plain tuple, not a class or a NamedTuple: a tuple whose items are all str, bytes and int is
untracked by the garbage collector after its first collection, so a million presences add
nothing to the cost of every full collection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias

import orjson

from ..errors import InvalidMeta, MetaTooLarge, PresenceValueError
from ..limits import Limits
from ..typing import ConnId

__all__ = [
    "CONN",
    "DATA",
    "KEY",
    "TOPIC",
    "Presence",
    "diff_json",
    "encode_meta",
    "ref_of",
    "same_meta",
    "state_json",
    "stored",
    "with_prev",
]

Presence: TypeAlias = tuple[str, str, bytes, ConnId | None]
"""``(topic, key, data, conn)``: see the module docstring."""

TOPIC: Final = 0
KEY: Final = 1
DATA: Final = 2
CONN: Final = 3

RESERVED: Final = ("phx_ref", "phx_ref_prev", "presence_ref")
"""Meta fields the Tracker sets itself (Phoenix's refs; Supabase's Python client's rename)."""

_REF_HEAD: Final = b'{"phx_ref":"'
_REF_START: Final = len(_REF_HEAD)

_dumps = orjson.dumps
_loads = orjson.loads


def encode_meta(meta: object, limits: Limits) -> bytes:
    """``meta`` as JSON, or raise: it must be a dict orjson can write, within the byte limit."""
    if not isinstance(meta, dict):
        raise InvalidMeta(f"meta must be a dict, not {type(meta).__name__}")
    # dict's own lookup: a subclass may answer `in` otherwise, but orjson writes what it holds.
    has = dict.__contains__
    for name in RESERVED:
        if has(meta, name):
            raise PresenceValueError(
                f"meta must not contain {name!r}: the Tracker sets refs itself "
                f"(reserved: {', '.join(RESERVED)})"
            )
    try:
        blob = _dumps(meta)
    except orjson.JSONEncodeError as exc:
        raise InvalidMeta(f"meta is not JSON-serialisable: {exc}") from None
    if len(blob) > limits.max_meta_bytes:
        raise MetaTooLarge(len(blob), limits.max_meta_bytes)
    return blob


def stored(ref: bytes, blob: bytes) -> bytes:
    """The stored form of a meta encoded as ``blob``: its JSON with ``"phx_ref"`` first."""
    if len(blob) == 2:  # b"{}"
        return _REF_HEAD + ref + b'"}'
    return _REF_HEAD + ref + b'",' + blob[1:]


def same_meta(data: bytes, ref: bytes, blob: bytes) -> bool:
    """Whether stored ``data`` holds the meta encoded as ``blob``."""
    candidate = stored(ref, blob)
    if candidate == data:
        return True
    # Equal dicts built in another key order encode to other bytes of the same length; only
    # then is it worth parsing both.  They are compared as JSON with sorted keys, not as
    # Python values, where True == 1 and 1.0 == 1 would hide a real change.
    return len(candidate) == len(data) and _canonical(candidate) == _canonical(data)


def _canonical(data: bytes) -> bytes:
    return _dumps(_loads(data), option=orjson.OPT_SORT_KEYS)


def ref_of(data: bytes) -> bytes:
    """The ref of stored ``data``, sliced out without parsing."""
    return data[_REF_START : data.index(b'"', _REF_START)]


def with_prev(data: bytes, prev: bytes) -> bytes:
    """Stored ``data`` with ``"phx_ref_prev": prev`` after its ref, for an update's join."""
    end = data.index(b'"', _REF_START)
    return data[:end] + b'","phx_ref_prev":"' + prev + data[end:]


def state_json(groups: Iterable[tuple[str, Sequence[bytes]]]) -> bytes:
    """``{key: {"metas": [data, ...]}}`` as JSON, from already encoded metas."""
    return (
        b"{"
        + b",".join(
            _dumps(key) + b':{"metas":[' + b",".join(datas) + b"]}" for key, datas in groups
        )
        + b"}"
    )


def diff_json(joins: dict[Presence, bytes | None], leaves: dict[Presence, None]) -> bytes:
    """A ``presence_diff`` payload as JSON: joins (with ``phx_ref_prev`` where they replace)."""
    joined: dict[str, list[bytes]] = {}
    for p, prev in joins.items():
        data = p[DATA] if prev is None else with_prev(p[DATA], prev)
        datas = joined.get(p[KEY])
        if datas is None:
            joined[p[KEY]] = [data]
        else:
            datas.append(data)
    left: dict[str, list[bytes]] = {}
    for p in leaves:
        datas = left.get(p[KEY])
        if datas is None:
            left[p[KEY]] = [p[DATA]]
        else:
            datas.append(p[DATA])
    return (
        b'{"joins":' + state_json(joined.items()) + b',"leaves":' + state_json(left.items()) + b"}"
    )
