"""The Phoenix/Supabase Realtime channel protocol as a core without I/O.

`PhoenixCore` takes decoded inputs (a handshake's identity, a socket's messages, the time) and
hands out actions (`Send`, `Fanout`, `Close`, `Defer`); front doors move the bytes:
`presence_core.server.PresenceServer` over asyncio sockets and `presence_core.asgi.PresenceApp`
over ASGI.  Nothing here imports a door.
"""

from .config import AuthHook, Refused, ServerLimits
from .core import (
    PRIVATE_PREFIX,
    Action,
    Channel,
    Close,
    Defer,
    Fanout,
    PhoenixCore,
    Refusal,
    Send,
    Session,
)

__all__ = [
    "PRIVATE_PREFIX",
    "Action",
    "AuthHook",
    "Channel",
    "Close",
    "Defer",
    "Fanout",
    "PhoenixCore",
    "Refusal",
    "Refused",
    "Send",
    "ServerLimits",
    "Session",
]
