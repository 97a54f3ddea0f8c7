"""presence-core: who is here right now, fast, in the Phoenix Presence model."""

from ._common import TOMBSTONE, Tombstone
from .table import USING_EXTENSION, PresenceTable

__all__ = ["TOMBSTONE", "USING_EXTENSION", "PresenceTable", "Tombstone"]
__version__ = "0.1.0"
