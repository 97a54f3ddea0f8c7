"""Per-user status across topics and connections, derived from the user's presences."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

import orjson

from .encoding import DATA, TOPIC, Presence
from .state import ref_number

__all__ = ["AWAY", "BUSY", "OFFLINE", "ONLINE", "STATUS_ORDER", "UserStatus", "derive_status"]

ONLINE: Final = "online"
AWAY: Final = "away"
BUSY: Final = "busy"
OFFLINE: Final = "offline"

STATUS_ORDER: Final = (ONLINE, AWAY, BUSY)
"""Statuses a presence can report, most available first; a user's status is the first of these
that any of the user's presences reports, and `OFFLINE` when there is none."""

_STATUS_RANK: Final = {status: rank for rank, status in enumerate(STATUS_ORDER)}


class UserStatus(NamedTuple):
    """One user's presence across every topic and connection of this Tracker.

    An immutable named tuple: a bulk read (`Tracker.users`, `RedisStore.users`) builds one per
    user, and a tuple costs a third of a frozen dataclass to build.

    How it is derived (the rule, in full):

    * Each presence reports the status in its meta's ``"status"`` field if that is one of
      ``"online"``, ``"away"``, ``"busy"``; any other value, or none, counts as ``"online"``
      (being present at all means online unless the client says otherwise).
    * The user's `status` is the most available status any presence reports, in the order
      online > away > busy: one active device is enough to be reachable, and "busy" (do not
      disturb) is the least available way of being there.  With no presence it is ``"offline"``.
    * `custom_status` is the ``"custom_status"`` str of the most recently tracked or updated
      presence that has one.
    * `devices` are the distinct ``"device"`` strs of the presences, oldest presence first.
    * `last_active` is the last time (Tracker clock) any of the user's connections tracked,
      updated or heartbeated; `last_seen` is the same while the user is online, and after the
      user went offline the time that happened (kept in a bounded LRU table).

    Attributes:
        key: The user's key.
        status: ``"online"``, ``"away"``, ``"busy"`` or ``"offline"``.
        custom_status: Free text the user set, or None.
        devices: Devices the user is present on.
        topics: Topics the user is present in, sorted.
        connections: Live connections with at least one presence of the user, counting each
            other process that holds one (see `Tracker.apply_remote`) as one connection.
        presences: Presences of the user, all topics together.
        last_active: See above; None when offline.
        last_seen: See above; None for a user never seen (or forgotten by the LRU table).
    """

    key: str
    status: str
    custom_status: str | None = None
    devices: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    connections: int = 0
    presences: int = 0
    last_active: float | None = None
    last_seen: float | None = None

    @property
    def online(self) -> bool:
        """Whether the user has at least one presence."""
        return self.status != OFFLINE


def derive_status(
    key: str, presences: Iterable[Presence], connections: int, last_active: float
) -> UserStatus:
    """The status of a user who holds ``presences`` (any order) on ``connections`` connections."""
    ordered = sorted(presences, key=_created)
    rank = len(STATUS_ORDER)
    custom: str | None = None
    devices: dict[str, None] = {}
    for p in ordered:
        meta = orjson.loads(p[DATA])
        status = meta.get("status")
        rank = min(rank, _STATUS_RANK.get(status, 0) if isinstance(status, str) else 0)
        device = meta.get("device")
        if isinstance(device, str):
            devices[device] = None
        text = meta.get("custom_status")
        if isinstance(text, str):
            custom = text  # later presences are newer
    return UserStatus(
        key,
        STATUS_ORDER[rank],
        custom,
        tuple(devices),
        tuple(sorted({p[TOPIC] for p in ordered})),
        connections,
        len(ordered),
        last_active,
        last_active,
    )


def _created(p: Presence) -> int:
    return ref_number(p[DATA])
