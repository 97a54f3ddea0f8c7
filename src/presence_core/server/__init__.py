"""The WebSocket server: Phoenix/Supabase Realtime clients in front of a Tracker.

`presence_core.server.server.PresenceServer` serves the protocol; `presence_core.server.cli`
is the ``presence-core`` command (``serve``).
"""

from presence_core.server.config import AuthHook, Refused, ServerLimits
from presence_core.server.server import PRIVATE_PREFIX, PresenceServer

__all__ = ["PRIVATE_PREFIX", "AuthHook", "PresenceServer", "Refused", "ServerLimits"]
