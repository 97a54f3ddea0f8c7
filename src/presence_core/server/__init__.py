"""The WebSocket server: Phoenix/Supabase Realtime clients in front of a Tracker.

`presence_core.server.server.PresenceServer` is the asyncio front door of the protocol core
(`presence_core.protocol`); `presence_core.server.cli` is the ``presence-core`` command
(``serve``).
"""

from presence_core.protocol import PRIVATE_PREFIX
from presence_core.protocol.config import AuthHook, Refused, ServerLimits
from presence_core.server.server import PresenceServer

__all__ = ["PRIVATE_PREFIX", "AuthHook", "PresenceServer", "Refused", "ServerLimits"]
