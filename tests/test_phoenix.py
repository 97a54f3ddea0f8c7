"""The Phoenix codec: round trips, malformed frames, and frames made by Supabase's real client."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient
from realtime.message import PresenceDiffMessage, PresenceStateMessage, ServerMessageAdapter

from presence_core import errors
from presence_core.errors import PresenceError, PresenceTypeError, PresenceValueError
from presence_core.phoenix import (
    EVENT_JOIN,
    EVENT_PRESENCE,
    EVENT_PRESENCE_DIFF,
    EVENT_PRESENCE_STATE,
    ClientPresence,
    Message,
    ProtocolError,
    client_presence_message,
    decode,
    encode,
    parse_client_presence,
    presence_diff_message,
    presence_key_from_join,
    presence_state_message,
)

FULL = Message(
    topic="realtime:room",
    event="presence_diff",
    payload={"joins": {"u1": {"metas": [{"phx_ref": "F1", "x": [1, 2.5, None]}]}}, "leaves": {}},
    ref="7",
    join_ref="3",
)
BARE = Message(topic="realtime:room", event="presence_state", payload={})


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("msg", [FULL, BARE], ids=["full", "bare"])
def test_round_trip(msg: Message, version: Any) -> None:
    data = encode(msg, version)
    assert isinstance(data, bytes)
    assert decode(data, version) == msg
    assert decode(data) == msg  # auto-detected
    assert decode(data.decode()) == msg  # str input


def test_v2_layout() -> None:
    assert orjson.loads(encode(FULL)) == ["3", "7", FULL.topic, FULL.event, FULL.payload]
    assert orjson.loads(encode(BARE, 2)) == [None, None, BARE.topic, BARE.event, {}]


def test_v1_layout_always_has_ref_and_join_ref_only_when_set() -> None:
    assert orjson.loads(encode(FULL, 1)) == {
        "join_ref": "3",
        "ref": "7",
        "topic": FULL.topic,
        "event": FULL.event,
        "payload": FULL.payload,
    }
    assert orjson.loads(encode(BARE, 1)) == {
        "ref": None,
        "topic": BARE.topic,
        "event": BARE.event,
        "payload": {},
    }


def test_autodetect_and_input_types() -> None:
    v1 = b' {"topic": "t", "event": "e", "payload": {}, "ref": null} '
    v2 = b'\n["1", "2", "t", "e", {"a": 1}]'
    assert decode(v1) == Message("t", "e", {})
    assert decode(v2) == Message("t", "e", {"a": 1}, ref="2", join_ref="1")
    assert decode(bytearray(v2)) == decode(memoryview(v2)) == decode(v2)


def test_v1_join_ref_optional_and_unknown_keys_ignored() -> None:
    frame = {"topic": "t", "event": "e", "payload": [], "ref": "1", "extra": 5}
    assert decode(orjson.dumps(frame)) == Message("t", "e", [], ref="1")
    frame["join_ref"] = "9"
    assert decode(orjson.dumps(frame)).join_ref == "9"


def test_message_is_frozen_with_slots() -> None:
    with pytest.raises(AttributeError):
        FULL.topic = "other"  # type: ignore[misc]
    assert not hasattr(FULL, "__dict__")


# --- malformed input --------------------------------------------------------------------------

V1_OK: dict[str, Any] = {"join_ref": None, "ref": None, "topic": "t", "event": "e", "payload": {}}

MALFORMED = {
    "empty": b"",
    "truncated": b'{"topic": "t"',
    "not json": b"hello",
    "invalid utf-8": b"\xff\xfe",
    "trailing garbage": b'[null, null, "t", "e", {}] x',
    "number": b"1",
    "string": b'"frame"',
    "null": b"null",
    "bool": b"true",
    "v2 empty": b"[]",
    "v2 four": b'[null, null, "t", "e"]',
    "v2 six": b'[null, null, "t", "e", {}, 1]',
    "v2 topic int": b'[null, null, 1, "e", {}]',
    "v2 topic null": b'[null, null, null, "e", {}]',
    "v2 event list": b'[null, null, "t", [], {}]',
    "v2 ref int": b'[null, 1, "t", "e", {}]',
    "v2 ref bool": b'[null, true, "t", "e", {}]',
    "v2 join_ref object": b'[{}, null, "t", "e", {}]',
    **{
        f"v1 missing {name}": orjson.dumps({k: v for k, v in V1_OK.items() if k != name})
        for name in ("topic", "event", "payload", "ref")
    },
    "v1 topic int": orjson.dumps({**V1_OK, "topic": 5}),
    "v1 event null": orjson.dumps({**V1_OK, "event": None}),
    "v1 ref int": orjson.dumps({**V1_OK, "ref": 12}),
    "v1 join_ref float": orjson.dumps({**V1_OK, "join_ref": 1.5}),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise_protocol_error(data: bytes) -> None:
    versions: tuple[Literal[1, 2] | None, ...] = (None, 1, 2)
    for version in versions:
        with pytest.raises(ProtocolError):
            decode(data, version)


def test_protocol_error_is_a_presence_error_and_a_value_error() -> None:
    assert issubclass(ProtocolError, PresenceError)
    assert issubclass(ProtocolError, ValueError)
    assert ProtocolError is errors.ProtocolError  # one class, re-exported here


def test_store_error_is_a_presence_error_with_an_optional_command() -> None:
    assert issubclass(errors.StoreError, PresenceError)
    assert not issubclass(errors.StoreError, ValueError)
    failed = errors.StoreError("NOSCRIPT No matching script", command="EVALSHA")
    assert (str(failed), failed.command) == ("NOSCRIPT No matching script", "EVALSHA")
    assert errors.StoreError("connection refused").command is None
    assert {"ProtocolError", "StoreError"} <= set(errors.__all__)


@pytest.mark.parametrize(
    "error",
    [
        ProtocolError("bad frame"),
        errors.StoreError("boom", command="HSET"),
        errors.MetaTooLarge(5000, 4096),
        errors.QuotaExceeded("c1", "max_topics", 3),
        errors.RateLimited(7, 0.25),
        errors.LimitExceeded("slow down", "c1", "burst"),
        errors.PresenceTypeError("topic must be a str"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_survive_pickling(error: PresenceError) -> None:
    # A worker process's error reaches the parent pickled; one that cannot be rebuilt turns
    # into an unpickling failure there.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_version_mismatch_and_unknown_version() -> None:
    v1, v2 = encode(FULL, 1), encode(FULL, 2)
    with pytest.raises(ProtocolError, match="expected a v1 frame"):
        decode(v2, 1)
    with pytest.raises(ProtocolError, match="expected a v2 frame"):
        decode(v1, 2)
    # An unknown version is the caller's bug, not bad traffic.
    with pytest.raises(PresenceValueError, match="unknown protocol version"):
        decode(v1, 3)  # type: ignore[arg-type]
    with pytest.raises(PresenceValueError, match="unknown protocol version"):
        encode(FULL, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [True, False, 1.0, 2.0, "2", b"1"])
def test_a_version_must_be_an_int_not_a_bool(version: Any) -> None:
    # True == 1 and 2.0 == 2 in Python; neither is a protocol version.
    with pytest.raises(PresenceTypeError, match="version must be"):
        encode(FULL, version)
    with pytest.raises(PresenceTypeError, match="version must be"):
        decode(encode(FULL, 1), version)


@pytest.mark.parametrize("data", [None, 5, ["t"], {"topic": "t"}])
def test_decode_rejects_non_text_input(data: Any) -> None:
    with pytest.raises(PresenceTypeError, match="bytes or str"):
        decode(data)


@pytest.mark.parametrize("msg", [None, {"topic": "t"}, ("t", "e", {}), "frame"])
def test_encode_and_parse_need_a_message(msg: Any) -> None:
    with pytest.raises(PresenceTypeError, match="must be a Message"):
        encode(msg)
    with pytest.raises(PresenceTypeError, match="must be a Message"):
        parse_client_presence(msg)


@pytest.mark.parametrize(
    "msg",
    [
        Message("t", "e", object()),
        Message("t", "e", {1: "non-string key"}),
        Message("t", "e", {"s": {1, 2}}),
        Message("t", "e", "\ud800"),
        Message(1, "e", {}),  # type: ignore[arg-type]
        Message("t", None, {}),  # type: ignore[arg-type]
        Message("t", "e", {}, ref=1),  # type: ignore[arg-type]
        Message("t", "e", {}, join_ref=b"1"),  # type: ignore[arg-type]
    ],
    ids=["object", "int key", "set", "surrogate", "topic", "event", "ref", "join_ref"],
)
@pytest.mark.parametrize("version", [1, 2])
def test_encode_rejects_what_cannot_go_on_the_wire(msg: Message, version: Any) -> None:
    with pytest.raises(ProtocolError):
        encode(msg, version)


# --- hypothesis -------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_messages = st.builds(
    Message,
    topic=_text,
    event=_text,
    payload=_json,
    ref=st.none() | _text,
    join_ref=st.none() | _text,
)


@given(msg=_messages, version=st.sampled_from([1, 2]))
def test_round_trip_property(msg: Message, version: Any) -> None:
    data = encode(msg, version)
    assert decode(data) == msg
    assert decode(data, version) == msg


@given(value=_json)
def test_any_json_decodes_or_raises_protocol_error(value: Any) -> None:
    try:
        decode(orjson.dumps(value))
    except ProtocolError:
        pass


@given(data=st.binary(max_size=64))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


# --- presence pushes --------------------------------------------------------------------------

STATE = {"alice": {"metas": [{"phx_ref": "F1", "status": "online"}]}}
DIFF = {
    "joins": {"bob": {"metas": [{"phx_ref": "F3", "phx_ref_prev": "F2", "status": "away"}]}},
    "leaves": {"bob": {"metas": [{"phx_ref": "F2", "status": "online"}]}},
}


def test_presence_push_messages() -> None:
    state = presence_state_message("realtime:room", STATE)
    diff = presence_diff_message("realtime:room", DIFF)
    assert (state.event, state.payload, state.ref, state.join_ref) == (
        EVENT_PRESENCE_STATE,
        STATE,
        None,
        None,
    )
    assert (diff.event, diff.payload, diff.ref, diff.join_ref) == (
        EVENT_PRESENCE_DIFF,
        DIFF,
        None,
        None,
    )


@pytest.mark.parametrize("diff", [{}, {"joins": {}}, {"leaves": {}}])
def test_presence_diff_needs_joins_and_leaves(diff: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="joins"):
        presence_diff_message("t", diff)


@pytest.mark.parametrize(
    "diff",
    ["joinsleaves", b"joinsleaves", bytearray(b"joins leaves"), ["joins", "leaves"], None, 5],
    ids=["str", "bytes", "bytearray", "list", "None", "int"],
)
def test_presence_diff_must_be_a_mapping(diff: Any) -> None:
    # "joins" in "joinsleaves" is True: a str used to pass the check; bytes raised a bare
    # TypeError from the `in` test.
    with pytest.raises(PresenceTypeError, match="diff must be a mapping"):
        presence_diff_message("t", diff)


@pytest.mark.parametrize("state", ["alice", b"{}", [STATE], None, 1])
def test_presence_state_must_be_a_mapping(state: Any) -> None:
    with pytest.raises(PresenceTypeError, match="state must be a mapping"):
        presence_state_message("t", state)


BAD_STATES: dict[str, Any] = {
    "entry not an object": {"alice": "metas"},
    "entry without metas": {"alice": {}},
    "metas not a list": {"alice": {"metas": {"phx_ref": "1"}}},
    "metas a str": {"alice": {"metas": "phx_ref"}},
    "meta not an object": {"alice": {"metas": ["1"]}},
    "meta without phx_ref": {"alice": {"metas": [{"status": "online"}]}},
    "phx_ref not a string": {"alice": {"metas": [{"phx_ref": 1}]}},
    "phx_ref_prev not a string": {"alice": {"metas": [{"phx_ref": "2", "phx_ref_prev": 1}]}},
    "key not a string": {1: {"metas": [{"phx_ref": "1"}]}},
}


@pytest.mark.parametrize("state", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_presence_pushes_refuse_states_clients_cannot_apply(state: Any) -> None:
    with pytest.raises(ProtocolError):
        presence_state_message("t", state)
    with pytest.raises(ProtocolError):
        presence_diff_message("t", {"joins": state, "leaves": {}})
    with pytest.raises(ProtocolError):
        presence_diff_message("t", {"joins": {}, "leaves": state})


@pytest.mark.parametrize("part", ["", "joins", b"", [], None])
def test_presence_diff_parts_must_be_states(part: Any) -> None:
    with pytest.raises(ProtocolError, match="joins"):
        presence_diff_message("t", {"joins": part, "leaves": {}})
    with pytest.raises(ProtocolError, match="leaves"):
        presence_diff_message("t", {"joins": {}, "leaves": part})


@pytest.mark.parametrize("topic", [None, 1, b"t"])
def test_presence_pushes_need_a_str_topic(topic: Any) -> None:
    with pytest.raises(PresenceTypeError, match="topic must be a str"):
        presence_state_message(topic, {})
    with pytest.raises(PresenceTypeError, match="topic must be a str"):
        presence_diff_message(topic, {"joins": {}, "leaves": {}})
    with pytest.raises(PresenceTypeError, match="topic must be a str"):
        client_presence_message(topic, "untrack")


def test_presence_pushes_accept_empty_and_tuple_metas() -> None:
    assert presence_state_message("t", {}).payload == {}
    assert presence_diff_message("t", {"joins": {}, "leaves": {}}).event == EVENT_PRESENCE_DIFF
    state = {"alice": {"metas": ({"phx_ref": "1"},)}}
    assert orjson.loads(encode(presence_state_message("t", state)))[4] == {
        "alice": {"metas": [{"phx_ref": "1"}]}
    }


def test_v1_presence_pushes_pass_the_real_clients_validation() -> None:
    state = ServerMessageAdapter.validate_json(encode(presence_state_message("t", STATE), 1))
    diff = ServerMessageAdapter.validate_json(encode(presence_diff_message("t", DIFF), 1))
    assert isinstance(state, PresenceStateMessage) and state.payload == STATE
    assert isinstance(diff, PresenceDiffMessage) and diff.payload == DIFF


# --- frames built by Supabase's real Python client --------------------------------------------


class _RecordingSocket:
    """Stands in for the websocket connection; the client only calls `send(str)` on it."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, data: str) -> None:
        self.sent.append(data)


def _client_frames(
    key: str | None,
    action: Callable[[AsyncRealtimeChannel], Awaitable[None]],
) -> list[Message]:
    """Join a channel with the real client, run `action`, and decode every frame it sent."""

    async def run() -> list[str]:
        client = AsyncRealtimeClient("ws://localhost:4000", auto_reconnect=False)
        recorder = _RecordingSocket()
        # Marks the client connected without a network; send() then writes to the recorder.
        client._ws_connection = recorder  # type: ignore[assignment]
        params: Any = None
        if key is not None:
            params = {"config": {"presence": {"key": key, "enabled": True}, "private": False}}
        channel = client.channel("room", params)
        channel._prepare_join(None)
        await channel.join_push.send()
        await action(channel)
        # Every push armed a timeout task; cancel them so the loop closes cleanly.
        channel.join_push.destroy()
        for push in list(channel.messages_waiting_for_ack.values()):
            push.destroy()
        await asyncio.sleep(0)
        return recorder.sent

    return [decode(frame) for frame in asyncio.run(run())]


async def _track_then_untrack(channel: AsyncRealtimeChannel) -> None:
    await channel.track({"status": "online", "device": {"kind": "phone"}})
    await channel.untrack()


def test_real_client_join_track_untrack() -> None:
    join, track, untrack = _client_frames("alice", _track_then_untrack)

    assert join.topic == "realtime:room" and join.event == EVENT_JOIN
    assert join.ref is not None and join.join_ref == join.ref
    assert join.payload["config"]["presence"] == {"key": "alice", "enabled": True}
    assert presence_key_from_join(join.payload) == "alice"

    for push in (track, untrack):
        assert push.topic == "realtime:room" and push.event == EVENT_PRESENCE
        assert push.join_ref == join.ref and push.ref not in (None, join.ref)

    assert track.payload == {
        "event": "track",
        "payload": {"status": "online", "device": {"kind": "phone"}},
    }
    assert untrack.payload == {"event": "untrack", "payload": {}}
    assert parse_client_presence(track) == ClientPresence(
        "track", {"status": "online", "device": {"kind": "phone"}}
    )
    assert parse_client_presence(untrack) == ClientPresence("untrack", {})

    # Our encoder without "type" builds exactly what the Python client sends.
    ours = client_presence_message(
        "realtime:room",
        "track",
        {"status": "online", "device": {"kind": "phone"}},
        ref=track.ref,
        join_ref=track.join_ref,
        with_type=False,
    )
    assert ours == track
    assert (
        client_presence_message(
            "realtime:room", "untrack", ref=untrack.ref, join_ref=untrack.join_ref, with_type=False
        )
        == untrack
    )


async def _nothing(channel: AsyncRealtimeChannel) -> None:
    return None


def test_real_client_default_join_has_no_presence_key() -> None:
    (join,) = _client_frames(None, _nothing)
    assert join.payload["config"]["presence"] == {"key": "", "enabled": False}
    assert presence_key_from_join(join.payload) is None


# --- client presence events -------------------------------------------------------------------


@pytest.mark.parametrize("with_type", [True, False])
def test_client_presence_round_trip(with_type: bool) -> None:
    track = client_presence_message("t", "track", {"s": 1}, ref="5", with_type=with_type)
    untrack = client_presence_message("t", "untrack", with_type=with_type)
    assert ("type" in track.payload) is with_type
    for version in (1, 2):
        assert parse_client_presence(decode(encode(track, version))) == ClientPresence(
            "track", {"s": 1}
        )
        assert parse_client_presence(decode(encode(untrack, version))) == ClientPresence(
            "untrack", {}
        )


def test_untrack_without_payload_as_js_client_sends_it() -> None:
    msg = Message("t", EVENT_PRESENCE, {"type": "presence", "event": "untrack"})
    assert parse_client_presence(msg) == ClientPresence("untrack", {})


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("broadcast", {"event": "track", "payload": {}}),
        (EVENT_PRESENCE, None),
        (EVENT_PRESENCE, ["track", {}]),
        (EVENT_PRESENCE, {"type": "broadcast", "event": "track", "payload": {}}),
        (EVENT_PRESENCE, {"payload": {}}),
        (EVENT_PRESENCE, {"event": "update", "payload": {}}),
        (EVENT_PRESENCE, {"event": None, "payload": {}}),
        (EVENT_PRESENCE, {"event": "track"}),
        (EVENT_PRESENCE, {"event": "track", "payload": None}),
        (EVENT_PRESENCE, {"event": "track", "payload": [1]}),
        (EVENT_PRESENCE, {"event": "untrack", "payload": "x"}),
    ],
)
def test_bad_client_presence(event: str, payload: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_client_presence(Message("t", event, payload))


def test_client_presence_message_argument_checks() -> None:
    with pytest.raises(PresenceTypeError, match="needs a meta"):
        client_presence_message("t", "track")
    with pytest.raises(PresenceValueError, match="carries no meta"):
        client_presence_message("t", "untrack", {"s": 1})
    with pytest.raises(PresenceValueError, match="'track' or 'untrack'"):
        client_presence_message("t", "join", {})  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError, match="kind must be a str"):
        client_presence_message("t", None, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["track", "untrack"])
@pytest.mark.parametrize("meta", [5, 0, "status", "", b"", [("s", 1)], [], True, 0.0], ids=repr)
def test_client_presence_meta_must_be_a_mapping(kind: Any, meta: Any) -> None:
    # meta=5 used to escape as a bare TypeError from dict(5); an untrack with a falsy non-mapping
    # (0, "", []) used to be accepted.
    with pytest.raises(PresenceTypeError, match="meta must be a mapping"):
        client_presence_message("t", kind, meta)


@pytest.mark.parametrize(
    "kwargs",
    [{"ref": 1}, {"join_ref": b"1"}, {"with_type": 1}, {"with_type": "yes"}, {"with_type": None}],
    ids=repr,
)
def test_client_presence_message_checks_refs_and_flags(kwargs: dict[str, Any]) -> None:
    with pytest.raises(PresenceTypeError):
        client_presence_message("t", "track", {}, **kwargs)


def test_client_presence_message_accepts_any_mapping_and_copies_it() -> None:
    from types import MappingProxyType

    meta = {"s": 1}
    msg = client_presence_message("t", "track", MappingProxyType(meta))
    meta["s"] = 2
    assert msg.payload["payload"] == {"s": 1}
    assert client_presence_message("t", "untrack", MappingProxyType({})).payload["payload"] == {}


# --- join config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"config": {"presence": {"key": "u1", "enabled": True}}}, "u1"),
        ({"config": {"presence": {"key": "u1"}, "broadcast": None}}, "u1"),
        ({"config": {"presence": {"key": "", "enabled": False}}}, None),
        ({"config": {"presence": {"enabled": True}}}, None),
        ({"config": {"presence": {"key": None}}}, None),
        ({"config": {"presence": None}}, None),
        ({"config": {"broadcast": {"self": True}}}, None),
        ({"config": None}, None),
        ({}, None),
        ({"access_token": "x"}, None),
    ],
)
def test_presence_key_from_join(payload: dict[str, Any], key: str | None) -> None:
    assert presence_key_from_join(payload) == key


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        {"config": []},
        {"config": "presence"},
        {"config": {"presence": True}},
        {"config": {"presence": {"key": 5}}},
        {"config": {"presence": {"key": ["u1"]}}},
    ],
)
def test_presence_key_from_bad_join(payload: Any) -> None:
    with pytest.raises(ProtocolError):
        presence_key_from_join(payload)


# --- whatever the arguments, only presence_core's errors --------------------------------------

_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["joins", "leaves", "metas", "phx_ref", "track", "untrack", "presence"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(
            st.text(max_size=8)
            | st.integers()
            | st.sampled_from(["joins", "leaves", "metas", "phx_ref"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@given(topic=_junk | _text, state=_junk, diff=_junk, meta=_junk, kind=_junk, version=_junk)
def test_any_arguments_give_a_message_or_a_presence_error(
    topic: Any, state: Any, diff: Any, meta: Any, kind: Any, version: Any
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: presence_state_message(topic, state),
        lambda: presence_diff_message(topic, diff),
        lambda: presence_diff_message(topic, {"joins": state, "leaves": diff}),
        lambda: client_presence_message(topic, kind, meta),
        lambda: client_presence_message(topic, "track", meta),
        lambda: client_presence_message(topic, "untrack", meta),
        lambda: parse_client_presence(Message("t", EVENT_PRESENCE, meta)),
        lambda: presence_key_from_join(state),
        lambda: encode(Message("t", "e", state), version),
        lambda: decode(encode(Message("t", "e", {})), version),
        lambda: decode(meta),
    ]
    for call in calls:
        try:
            result = call()
            if isinstance(result, Message):
                encode(result)  # a meta's values may still not serialise: ProtocolError
        except PresenceError:
            pass
