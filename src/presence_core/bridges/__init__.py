"""Bridges between a `presence_core.Tracker` and other presence systems.

* `presence_core.bridges.supabase`: Supabase Realtime channels, through Supabase's Python
  client (PyPI ``realtime``).
"""

from __future__ import annotations

__all__: list[str] = []
