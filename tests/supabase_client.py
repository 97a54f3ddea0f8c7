"""A test harness around the presence logic of Supabase's real Python client.

`SupabasePresenceClient` feeds Phoenix ``presence_state`` / ``presence_diff`` payloads to
``realtime._async.presence.AsyncRealtimePresence`` (PyPI ``realtime``) -- the very object an
``AsyncRealtimeChannel`` hands those events to -- and reads its view back in our shape, so
compatibility tests can check that what we emit is applied the way we mean it.  The sync
``SyncRealtimePresence`` in the same package is an empty stub (its ``__init__`` does nothing),
so the async class is the only presence logic there is.

What the client does with a payload (read from ``realtime`` 2.34.1, pinned down by
``tests/test_supabase_client_harness.py``):

* ``_transform_state`` turns ``{key: {"metas": [meta, ...]}}`` into ``{key: [presence, ...]}``.
  For each meta dict it **mutates the dict it was given**: ``del meta["phx_ref_prev"]`` (if
  present) and ``meta.pop("phx_ref")``.  The presence it keeps is a new dict
  ``{"presence_ref": <phx_ref>, **rest_of_meta}``; nested values are shared, not copied.  The
  outer dicts and the ``metas`` lists are not changed.  So after the call the caller's metas
  have lost ``phx_ref`` and ``phx_ref_prev``.  This harness therefore hands the client deep
  copies.
* Because the rest of the meta is applied after ``presence_ref``, a meta that has its own
  ``"presence_ref"`` key overwrites the ref.  A meta without ``phx_ref`` raises ``KeyError``
  inside the client (in a live client it escapes the socket's listen loop, which catches only
  connection-closed errors).  ``phx_ref_prev`` never
  survives: the client's state cannot tell an update from a leave plus a join.
* A diff is applied joins first, then leaves, each in payload (dict) order.  A join for a key
  the client already holds becomes ``[held metas whose ref is not among the joining refs] +
  [joining metas in payload order]``: survivors keep their order and come first, joiners are
  appended, and a joining meta whose ref is already held replaces it and moves to the end.
  A leave removes metas by ref and drops the key when none remain.
* A ``presence_state`` is turned into a diff against the current view by ref only: refs the
  client already holds are kept as they are even if their meta changed in the new state, new
  refs are appended after the survivors, refs and keys absent from the new state leave.  So a
  changed meta must always come with a new ref (as Phoenix's update does).
* The leave quirk: up to ``realtime`` 2.31.0 the leave loop did ``break`` when it met a key the
  client did not hold, silently skipping every later leave in the same diff; 2.32.0 changed it
  to ``continue`` (checked in the published wheels of 2.30.1, 2.31.0 and 2.32.0).  Clients
  built on the old versions are still around, so a diff we send must never name in ``leaves``
  a key the subscriber does not hold.  `installed_client_stops_at_unknown_leave` probes the
  installed version; ``emulate_leave_quirk=True`` reproduces the old behaviour on top of the
  installed client so tests can check our diffs against it either way.

On the wire (``apply_frame``), the real client also rejects frames before presence logic sees
them: it parses v1 JSON objects only, needs ``"ref": null`` present on presence pushes, needs
both ``joins`` and ``leaves`` in a diff, ``metas`` in every entry and string ``phx_ref`` values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, cast

from realtime._async.presence import AsyncRealtimePresence
from realtime.message import PresenceDiffMessage, PresenceStateMessage, ServerMessageAdapter
from realtime.types import RawPresenceDiff
from realtime.version import __version__ as REALTIME_VERSION

__all__ = [
    "LEAVE_QUIRK_FIXED_IN",
    "REALTIME_VERSION",
    "SupabasePresenceClient",
    "installed_client_stops_at_unknown_leave",
    "normalise",
]

#: First ``realtime`` release whose presence skips, rather than stops at, an unknown leave.
LEAVE_QUIRK_FIXED_IN = (2, 32, 0)

PresenceState = dict[str, dict[str, list[dict[str, Any]]]]


def installed_client_stops_at_unknown_leave() -> bool:
    """Whether the installed client drops the leaves that follow a leave for an unknown key."""
    probe = AsyncRealtimePresence()
    probe._on_state_event({"held": {"metas": [{"phx_ref": "r1"}]}})
    probe._on_diff_event(
        {
            "joins": {},
            "leaves": {
                "not-held": {"metas": [{"phx_ref": "r0"}]},
                "held": {"metas": [{"phx_ref": "r1"}]},
            },
        }
    )
    return "held" in probe.state


def normalise(client_state: Mapping[str, Sequence[Mapping[str, Any]]]) -> PresenceState:
    """The client's ``{key: [{"presence_ref": ref, ...}]}`` view in Phoenix's shape.

    Metas keep the client's order; ``presence_ref`` becomes ``phx_ref`` again.  The result is a
    deep copy, so tests cannot disturb the client through it.
    """
    result: PresenceState = {}
    for key, presences in client_state.items():
        metas = []
        for presence in presences:
            meta = {name: value for name, value in presence.items() if name != "presence_ref"}
            meta["phx_ref"] = presence["presence_ref"]
            metas.append(copy.deepcopy(meta))
        result[key] = {"metas": metas}
    return result


class SupabasePresenceClient:
    """One subscriber's view of a topic, maintained by Supabase's own presence code.

    Payloads are deep-copied before the client sees them, so the caller's dicts are never
    mutated.  With ``emulate_leave_quirk=True`` a diff's leaves are cut at the first key the
    client does not hold (after the diff's joins), which is what ``realtime`` < 2.32.0 did.
    """

    def __init__(self, *, emulate_leave_quirk: bool = False) -> None:
        self.presence = AsyncRealtimePresence()
        self.emulate_leave_quirk = emulate_leave_quirk

    def apply_state(self, payload: dict[str, Any]) -> None:
        """Apply a ``presence_state`` payload ``{key: {"metas": [...]}}``."""
        self.presence._on_state_event(copy.deepcopy(payload))

    def apply_diff(self, payload: dict[str, Any]) -> None:
        """Apply a ``presence_diff`` payload ``{"joins": state, "leaves": state}``."""
        diff = copy.deepcopy(payload)
        if self.emulate_leave_quirk:
            diff["leaves"] = self._leaves_before_first_unheld(diff)
        self.presence._on_diff_event(cast(RawPresenceDiff, diff))

    def apply_frame(self, data: str | bytes) -> None:
        """Parse a whole server frame the way the client's socket does, then apply it.

        Raises ``pydantic.ValidationError`` where the real client would log and drop the frame,
        and ``ValueError`` for a valid frame that is not a presence push.
        """
        message = ServerMessageAdapter.validate_json(data)
        if isinstance(message, PresenceStateMessage):
            self.apply_state(dict(message.payload))
        elif isinstance(message, PresenceDiffMessage):
            self.apply_diff(dict(message.payload))
        else:
            raise ValueError(f"not a presence push: {type(message).__name__}")

    def state(self) -> PresenceState:
        """The client's current view as ``{key: {"metas": [{..., "phx_ref": ref}]}}``.

        ``phx_ref_prev`` is absent because the client throws it away.
        """
        return normalise(self.presence.state)

    def _leaves_before_first_unheld(self, diff: dict[str, Any]) -> dict[str, Any]:
        # The old client checked "held" after applying the diff's joins, and a key counts as
        # held when its list is non-empty; a join with metas makes it so.
        held = self.presence.state
        joins = diff["joins"]
        kept: dict[str, Any] = {}
        for key, entry in diff["leaves"].items():
            if not held.get(key) and not (key in joins and joins[key]["metas"]):
                break
            kept[key] = entry
        return kept
