"""The Tracker and what it hands out: statuses, counts and the change feed's batches.

The package follows the data path: `tracker` (the facade every call enters), `state` (topics,
presences, users), `feed` (coalesced changes), `delivery` (feed readers, subscribers and
transports), `async_hooks` (the queue and task that await an async subscriber or transport),
`users` (status derivation) and `encoding` (presences as stored and the JSON payloads built
from them).
"""

from .encoding import Presence
from .feed import TopicChanges
from .tracker import FeedReader, Totals, Tracker
from .users import AWAY, BUSY, OFFLINE, ONLINE, STATUS_ORDER, UserStatus

__all__ = [
    "AWAY",
    "BUSY",
    "OFFLINE",
    "ONLINE",
    "STATUS_ORDER",
    "FeedReader",
    "Presence",
    "Totals",
    "TopicChanges",
    "Tracker",
    "UserStatus",
]
