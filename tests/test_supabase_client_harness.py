"""What Supabase's Python client does with presence payloads, pinned down through the harness.

Later compatibility tests rely on these facts; if a new `realtime` release changes one of them,
the failure here says which.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError
from realtime._async.presence import AsyncRealtimePresence
from supabase_client import (
    LEAVE_QUIRK_FIXED_IN,
    REALTIME_VERSION,
    SupabasePresenceClient,
    installed_client_stops_at_unknown_leave,
)

from presence_core.phoenix import encode, presence_diff_message, presence_state_message


def metas(*refs_and_fields: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"metas": [{**fields, "phx_ref": ref} for ref, fields in refs_and_fields]}


def diff(joins: dict[str, Any] | None = None, leaves: dict[str, Any] | None = None) -> Any:
    return {"joins": joins or {}, "leaves": leaves or {}}


# --- (a) a state, then diffs ------------------------------------------------------------------


def test_state_then_diffs() -> None:
    client = SupabasePresenceClient()
    client.apply_state(
        {
            "alice": metas(("A1", {"device": "phone"})),
            "bob": metas(("B1", {"device": "laptop"})),
        }
    )
    assert client.state() == {
        "alice": metas(("A1", {"device": "phone"})),
        "bob": metas(("B1", {"device": "laptop"})),
    }

    # A second connection for alice, a new user carol.
    client.apply_diff(
        diff(joins={"alice": metas(("A2", {"device": "web"})), "carol": metas(("C1", {}))})
    )
    # An update of bob: new ref joins (carrying phx_ref_prev), old ref leaves.
    client.apply_diff(
        diff(
            joins={"bob": {"metas": [{"device": "tablet", "phx_ref": "B2", "phx_ref_prev": "B1"}]}},
            leaves={"bob": metas(("B1", {"device": "laptop"}))},
        )
    )
    # alice's phone leaves; carol's last connection leaves, so carol is gone.
    client.apply_diff(
        diff(leaves={"alice": metas(("A1", {"device": "phone"})), "carol": metas(("C1", {}))})
    )

    assert client.state() == {
        "alice": metas(("A2", {"device": "web"})),
        "bob": metas(("B2", {"device": "tablet"})),  # phx_ref_prev did not survive
    }


def test_a_new_state_replaces_the_view() -> None:
    client = SupabasePresenceClient()
    client.apply_state({"alice": metas(("A1", {})), "bob": metas(("B1", {}))})
    client.apply_state({"bob": metas(("B1", {}), ("B2", {})), "dave": metas(("D1", {}))})
    assert client.state() == {"bob": metas(("B1", {}), ("B2", {})), "dave": metas(("D1", {}))}


def test_frames_we_encode_are_applied_through_the_clients_parser() -> None:
    client = SupabasePresenceClient()
    client.apply_frame(encode(presence_state_message("realtime:room", {"a": metas(("1", {}))}), 1))
    client.apply_frame(
        encode(presence_diff_message("realtime:room", diff(joins={"b": metas(("2", {}))})), 1)
    )
    assert client.state() == {"a": metas(("1", {})), "b": metas(("2", {}))}


@pytest.mark.parametrize(
    "frame",
    [
        b'[null, null, "realtime:room", "presence_state", {}]',  # v2 array
        b'{"topic": "realtime:room", "event": "presence_state", "payload": {}}',  # no ref
        b'{"topic": "t", "event": "presence_state", "payload": {}, "ref": "1"}',  # string ref
        b'{"topic": "t", "event": "presence_diff", "payload": {"joins": {}}, "ref": null}',
        b'{"topic": "t", "event": "presence_state", "payload": {"a": {}}, "ref": null}',
        b'{"topic": "t", "event": "presence_state", '
        b'"payload": {"a": {"metas": [{"phx_ref": 1}]}}, "ref": null}',
    ],
    ids=["v2", "no ref", "string ref", "no leaves", "no metas", "int phx_ref"],
)
def test_frames_the_client_drops(frame: bytes) -> None:
    with pytest.raises(ValidationError):
        SupabasePresenceClient().apply_frame(frame)


# --- (b) the leave quirk ----------------------------------------------------------------------

QUIRK_DIFF = diff(leaves={"ghost": metas(("G1", {})), "alice": metas(("A1", {}))})


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3])


def test_installed_client_quirk_matches_its_version() -> None:
    expected = _version_tuple(REALTIME_VERSION) < LEAVE_QUIRK_FIXED_IN
    assert installed_client_stops_at_unknown_leave() is expected


def test_leave_for_unheld_key_hides_later_leaves_in_old_clients() -> None:
    # realtime < 2.32.0 stopped at "ghost" and never removed alice.
    old = SupabasePresenceClient(emulate_leave_quirk=True)
    old.apply_state({"alice": metas(("A1", {})), "bob": metas(("B1", {}))})
    old.apply_diff(QUIRK_DIFF)
    assert "alice" in old.state()

    # The installed client (>= 2.32.0) skips "ghost" and goes on.
    new = SupabasePresenceClient()
    new.apply_state({"alice": metas(("A1", {})), "bob": metas(("B1", {}))})
    new.apply_diff(QUIRK_DIFF)
    assert new.state() == {"bob": metas(("B1", {}))}


def test_quirk_depends_on_leave_order_and_counts_keys_joined_in_the_same_diff() -> None:
    client = SupabasePresenceClient(emulate_leave_quirk=True)
    client.apply_state({"alice": metas(("A1", {})), "bob": metas(("B1", {}))})
    # Leaves before the unheld key are applied; "carol" is held because she joins in this diff.
    client.apply_diff(
        diff(
            joins={"carol": metas(("C1", {}))},
            leaves={
                "alice": metas(("A1", {})),
                "carol": metas(("C1", {})),
                "ghost": metas(("G1", {})),
                "bob": metas(("B1", {})),
            },
        )
    )
    assert client.state() == {"bob": metas(("B1", {}))}


# --- (c) mutation of the payload dicts --------------------------------------------------------


def test_client_mutates_the_metas_it_is_given() -> None:
    device = {"kind": "phone"}
    meta = {"device": device, "phx_ref": "A2", "phx_ref_prev": "A1"}
    entry = {"metas": [meta]}
    payload = {"alice": entry}

    presence = AsyncRealtimePresence()
    presence._on_state_event(payload)  # type: ignore[arg-type]

    # The meta dict lost phx_ref and phx_ref_prev in place; the structure around it is intact.
    assert payload == {"alice": {"metas": [{"device": {"kind": "phone"}}]}}
    assert payload["alice"] is entry and entry["metas"][0] is meta
    # The client keeps a new dict, with the ref renamed, and shares nested values.
    kept = presence.state["alice"][0]
    assert kept == {"presence_ref": "A2", "device": {"kind": "phone"}}
    assert kept is not meta and kept["device"] is device  # type: ignore[typeddict-item]


def test_client_mutates_diff_joins_and_leaves_too() -> None:
    payload = diff(joins={"a": metas(("2", {"x": 1}))}, leaves={"a": metas(("1", {"x": 0}))})
    AsyncRealtimePresence()._on_diff_event(payload)
    assert payload == diff(joins={"a": {"metas": [{"x": 1}]}}, leaves={"a": {"metas": [{"x": 0}]}})


def test_harness_never_mutates_the_callers_payload() -> None:
    state = {"alice": {"metas": [{"phx_ref": "A2", "phx_ref_prev": "A1", "d": {"k": 1}}]}}
    changes = diff(joins={"bob": metas(("B1", {}))}, leaves={"alice": metas(("A2", {}))})
    state_before, changes_before = copy.deepcopy(state), copy.deepcopy(changes)
    client = SupabasePresenceClient(emulate_leave_quirk=True)
    client.apply_state(state)
    client.apply_diff(changes)
    assert state == state_before and changes == changes_before
    # Nor can a caller reach into the client through state().
    view = client.state()
    view["bob"]["metas"][0]["phx_ref"] = "changed"
    assert client.state() == {"bob": metas(("B1", {}))}


# --- meta order, refs, and other facts a server must respect ----------------------------------


def test_join_for_held_key_appends_after_surviving_metas() -> None:
    client = SupabasePresenceClient()
    client.apply_state({"a": metas(("1", {"n": 1}), ("2", {"n": 2}), ("3", {"n": 3}))})
    # "2" is joined again (same ref, new meta): it replaces the held one and moves to the end,
    # after the survivors "1" and "3"; the new "4" keeps its payload position among joiners.
    client.apply_diff(diff(joins={"a": metas(("4", {"n": 4}), ("2", {"n": 22}))}))
    assert client.state() == {
        "a": metas(("1", {"n": 1}), ("3", {"n": 3}), ("4", {"n": 4}), ("2", {"n": 22}))
    }


def test_state_resync_matches_by_ref_only() -> None:
    client = SupabasePresenceClient()
    client.apply_state({"a": metas(("1", {"status": "online"}))})
    # Same ref, different meta: the client keeps what it had.  New refs come after survivors.
    client.apply_state({"a": metas(("0", {"status": "new"}), ("1", {"status": "away"}))})
    assert client.state() == {"a": metas(("1", {"status": "online"}), ("0", {"status": "new"}))}


def test_joins_apply_before_leaves_within_one_diff() -> None:
    client = SupabasePresenceClient()
    client.apply_diff(diff(joins={"a": metas(("1", {}))}, leaves={"a": metas(("1", {}))}))
    assert client.state() == {}


def test_meta_field_named_presence_ref_overwrites_the_ref() -> None:
    client = SupabasePresenceClient()
    client.apply_state({"a": {"metas": [{"phx_ref": "1", "presence_ref": "user-data"}]}})
    assert client.presence.state == {"a": [{"presence_ref": "user-data"}]}


def test_meta_without_phx_ref_crashes_the_client() -> None:
    with pytest.raises(KeyError, match="phx_ref"):
        SupabasePresenceClient().apply_state({"a": {"metas": [{"status": "online"}]}})


def test_leave_with_unknown_ref_for_held_key_changes_nothing() -> None:
    client = SupabasePresenceClient()
    client.apply_state({"a": metas(("1", {}))})
    client.apply_diff(diff(leaves={"a": metas(("9", {}))}))
    assert client.state() == {"a": metas(("1", {}))}
