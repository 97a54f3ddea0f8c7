"""A shared presence store in Redis (see `presence_core.store.connection` for the data plane)."""

from presence_core.store.connection import (
    CommandTemplate,
    ConnectionOptions,
    RedisConnection,
    StoreCommandError,
    StoreConnectionError,
    encode_command,
)

__all__ = [
    "CommandTemplate",
    "ConnectionOptions",
    "RedisConnection",
    "StoreCommandError",
    "StoreConnectionError",
    "encode_command",
]
