"""A shared presence store in Redis.

`presence_core.store.connection` is the data plane (a pipelined RESP connection whose replies
are parsed by hiredis); `presence_core.store.layout` names every key and builds the commands
that write them.  `presence_core.store.store.RedisStore` reads the Tracker's change feed and
writes it behind the Tracker's back with these; `presence_core.store.peers.PeerSync` mirrors
the other processes' presences into the Tracker's remote view.
"""

from presence_core.errors import StoreCommandError, StoreConnectionError, StoreError
from presence_core.store.cluster import ClusterConnection
from presence_core.store.connection import (
    CommandTemplate,
    ConnectionOptions,
    RedisConnection,
    encode_command,
)
from presence_core.store.layout import HashTTLCommands, Layout, ZSetCommands
from presence_core.store.peers import PeerSync
from presence_core.store.store import LayoutName, RedisStore

__all__ = [
    "ClusterConnection",
    "CommandTemplate",
    "ConnectionOptions",
    "HashTTLCommands",
    "Layout",
    "LayoutName",
    "PeerSync",
    "RedisConnection",
    "RedisStore",
    "StoreCommandError",
    "StoreConnectionError",
    "StoreError",
    "ZSetCommands",
    "encode_command",
]
