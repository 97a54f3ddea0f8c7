"""The Phoenix channel wire format, as far as presence needs it.

Two frame layouts exist on the wire:

* **v1** (``vsn=1.0.0``) -- a JSON object ``{"join_ref"?, "ref", "topic", "event", "payload"}``.
  Phoenix's own v1 serializer never writes ``join_ref``; Supabase's Python client does.
* **v2** (``vsn=2.0.0``) -- a JSON array ``[join_ref, ref, topic, event, payload]``.

`decode` accepts either (and tells them apart by the top-level JSON type when no version is
given); `encode` writes either.  Binary v2 frames (pushes and broadcasts carrying raw bytes) are
not presence traffic and are not handled here.

On top of the codec sit the presence-specific pieces: the server's ``presence_state`` and
``presence_diff`` messages, the client's ``presence`` track/untrack event and the presence key a
client asks for when it joins.

This module is the one place that names the events (``EVENT_PRESENCE_STATE`` ...); the rest of
presence_core imports them from here.

Errors follow one rule.  What does not follow the protocol -- a frame or payload read from the
wire, or a message or payload that could not be written as a valid frame -- raises
`presence_core.errors.ProtocolError` (a `ValueError`).  An argument of the wrong Python type (a
str where a mapping is expected, ``True`` where a version number is expected) raises
`presence_core.errors.PresenceTypeError`, and an unknown option (version 3, kind ``"join"``)
raises `presence_core.errors.PresenceValueError`: those are bugs in the calling code, not bad
traffic.  Nothing here raises a bare ``TypeError``, ``KeyError`` or ``AttributeError``.

Facts checked against the installed Supabase Python client (PyPI ``realtime`` 2.34.1, modules
``realtime._async.channel``, ``realtime._async.push``, ``realtime._async.client``,
``realtime._async.presence``, ``realtime.message``, ``realtime.types``):

* It connects with ``vsn=1.0.0`` and only ever speaks v1 objects: outgoing frames are a pydantic
  ``Message(event, payload, topic, ref, join_ref)`` dumped with every field present, so ``ref``
  and ``join_ref`` are always there (strings such as ``"3"``, or ``null``).  Refs come from a
  per-socket counter rendered as decimal strings; ``join_ref`` is the ref of the channel's join.
* Incoming frames are validated against pydantic models before anything else: a v2 array is
  rejected, and ``presence_state`` / ``presence_diff`` frames must carry ``"ref": null``
  explicitly (a missing ``ref`` or a string ref fails validation and the frame is dropped with
  a log line).  Extra keys such as ``join_ref`` are ignored.  A diff payload needs both
  ``joins`` and ``leaves``; every state entry needs ``metas``; a ``phx_ref`` that is present
  must be a string.
* ``channel.track(meta)`` pushes event ``"presence"`` with payload
  ``{"event": "track", "payload": meta}`` and ``channel.untrack()`` pushes
  ``{"event": "untrack", "payload": {}}`` -- no ``"type"`` key.  Supabase's JS client adds
  ``"type": "presence"``; `parse_client_presence` accepts both.
* The join (event ``"phx_join"``) payload is
  ``{"config": {"broadcast": ..., "presence": {"key": str, "enabled": bool}, "private": bool,
  "postgres_changes": [...]}, "access_token"?: str}``.  The key defaults to ``""``.  Supabase
  Realtime's server uses the key only if it is a non-empty string and otherwise picks a UUID;
  `presence_key_from_join` returns ``None`` for a missing or empty key and rejects a key of
  another type rather than silently replacing it.
* How that client applies presence payloads (meta order, ``phx_ref`` renaming, mutation of the
  dicts it is given, the old stop-at-unknown-leave bug) is documented and tested in
  ``tests/supabase_client.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from ._validate import is_int, type_name
from .errors import PresenceTypeError, PresenceValueError, ProtocolError

__all__ = [
    "EVENT_CLOSE",
    "EVENT_ERROR",
    "EVENT_HEARTBEAT",
    "EVENT_JOIN",
    "EVENT_LEAVE",
    "EVENT_PRESENCE",
    "EVENT_PRESENCE_DIFF",
    "EVENT_PRESENCE_STATE",
    "EVENT_REPLY",
    "PHOENIX_TOPIC",
    "ClientPresence",
    "Message",
    "ProtocolError",  # defined in presence_core.errors; re-exported for the codec's users
    "client_presence_message",
    "decode",
    "encode",
    "parse_client_presence",
    "presence_diff_message",
    "presence_key_from_join",
    "presence_state_message",
]

EVENT_JOIN: Final = "phx_join"
EVENT_LEAVE: Final = "phx_leave"
EVENT_REPLY: Final = "phx_reply"
EVENT_CLOSE: Final = "phx_close"
EVENT_ERROR: Final = "phx_error"
EVENT_HEARTBEAT: Final = "heartbeat"
EVENT_PRESENCE: Final = "presence"
EVENT_PRESENCE_STATE: Final = "presence_state"
EVENT_PRESENCE_DIFF: Final = "presence_diff"

#: The topic Phoenix sockets use for heartbeats.
PHOENIX_TOPIC: Final = "phoenix"

_V2_ARITY: Final = 5


@dataclass(frozen=True, slots=True)
class Message:
    """One Phoenix frame, independent of the protocol version it travels in.

    ``payload`` is any JSON value (in practice an object).  ``ref`` and ``join_ref`` are the
    client-chosen strings that pair replies with requests; server pushes such as
    ``presence_diff`` carry neither.
    """

    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None


@dataclass(frozen=True, slots=True)
class ClientPresence:
    """A client's ``presence`` event: start tracking itself with ``meta``, or stop.

    For ``"untrack"`` the meta is always empty.  The meta dict is the one found in the message
    (not a copy): whoever stores it should validate and copy it.
    """

    kind: Literal["track", "untrack"]
    meta: dict[str, Any]


def _check_fields(topic: object, event: object, ref: object, join_ref: object) -> None:
    # The same checks guard both directions so that whatever decode accepts, encode writes back.
    if not isinstance(topic, str):
        raise ProtocolError(f"topic must be a string, got {type_name(topic)}")
    if not isinstance(event, str):
        raise ProtocolError(f"event must be a string, got {type_name(event)}")
    if ref is not None and not isinstance(ref, str):
        raise ProtocolError(f"ref must be a string or null, got {type_name(ref)}")
    if join_ref is not None and not isinstance(join_ref, str):
        raise ProtocolError(f"join_ref must be a string or null, got {type_name(join_ref)}")


def _check_version(version: object, *, optional: bool) -> None:
    # bool is an int, but ``True`` is a bug in the caller, not protocol version 1.
    if version is None and optional:
        return
    if not is_int(version):
        allowed = "1, 2 or None" if optional else "1 or 2"
        raise PresenceTypeError(f"version must be {allowed}, not {type_name(version)}")
    if version not in (1, 2):
        raise PresenceValueError(f"unknown protocol version {version!r}, expected 1 or 2")


def _check_topic(topic: object) -> None:
    if not isinstance(topic, str):
        raise PresenceTypeError(f"topic must be a str, not {type_name(topic)}")


def _check_state(state: object, what: str) -> None:
    """``state`` must be ``{key: {"metas": [{"phx_ref": str, ...}, ...]}}`` (``what`` names it)."""
    if not isinstance(state, Mapping):
        raise ProtocolError(f"{what} must be an object of presences, got {type_name(state)}")
    for key, entry in state.items():
        if not isinstance(key, str):
            raise ProtocolError(f"{what}: a presence key must be a string, got {type_name(key)}")
        if not isinstance(entry, Mapping):
            raise ProtocolError(f"{what}[{key!r}] must be an object, got {type_name(entry)}")
        if "metas" not in entry:
            raise ProtocolError(f"{what}[{key!r}] has no 'metas'")
        metas = entry["metas"]
        if not isinstance(metas, (list, tuple)):
            raise ProtocolError(f"{what}[{key!r}]['metas'] must be a list, got {type_name(metas)}")
        for meta in metas:
            if not isinstance(meta, Mapping):
                raise ProtocolError(
                    f"{what}[{key!r}]: a meta must be an object, got {type_name(meta)}"
                )
            # Clients match metas by ref: phoenix.js and Supabase's clients need it as a string.
            ref = meta.get("phx_ref")
            if not isinstance(ref, str):
                raise ProtocolError(
                    f"{what}[{key!r}]: every meta needs a 'phx_ref' string, got {type_name(ref)}"
                )
            prev = meta.get("phx_ref_prev")
            if prev is not None and not isinstance(prev, str):
                raise ProtocolError(
                    f"{what}[{key!r}]: 'phx_ref_prev' must be a string, got {type_name(prev)}"
                )


def encode(msg: Message, version: Literal[1, 2] = 2) -> bytes:
    """Serialise `msg` as a v2 array (default) or a v1 object, UTF-8 JSON bytes.

    A v1 object always has ``ref`` (``null`` when unset), because Supabase's Python client
    rejects server pushes without it, and has ``join_ref`` only when it is set, as Phoenix's v1
    serializer does.  Raises `ProtocolError` if a field of the message has the wrong type or the
    payload is not JSON-serialisable, `PresenceTypeError` if ``msg`` is not a `Message` or
    ``version`` is not an int, `PresenceValueError` for a version other than 1 or 2.
    """
    if not isinstance(msg, Message):
        raise PresenceTypeError(f"msg must be a Message, not {type_name(msg)}")
    _check_version(version, optional=False)
    _check_fields(msg.topic, msg.event, msg.ref, msg.join_ref)
    frame: object
    if version == 2:
        frame = [msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload]
    elif version == 1:
        if msg.join_ref is None:
            frame = {"ref": msg.ref, "topic": msg.topic, "event": msg.event, "payload": msg.payload}
        else:
            frame = {
                "join_ref": msg.join_ref,
                "ref": msg.ref,
                "topic": msg.topic,
                "event": msg.event,
                "payload": msg.payload,
            }
    else:  # pragma: no cover - _check_version allows only 1 and 2
        raise AssertionError(version)
    try:
        return orjson.dumps(frame)
    except orjson.JSONEncodeError as exc:
        raise ProtocolError(f"payload is not JSON-serialisable: {exc}") from exc


def decode(
    data: bytes | bytearray | memoryview | str, version: Literal[1, 2] | None = None
) -> Message:
    """Parse one text frame into a `Message`.

    With ``version=None`` a JSON array is read as v2 and a JSON object as v1.  A v1 object must
    have ``topic``, ``event``, ``payload`` and ``ref`` (which may be null); ``join_ref`` may be
    missing and unknown keys are ignored, as Phoenix does.  A v2 array must have exactly five
    elements.  Anything else raises `ProtocolError`.  ``data`` that is not bytes or str, or a
    ``version`` that is not None, 1 or 2, is a bug in the caller: `PresenceTypeError` /
    `PresenceValueError`.
    """
    _check_version(version, optional=True)
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise PresenceTypeError(f"a frame must be bytes or str, not {type_name(data)}")
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from exc

    if isinstance(frame, list):
        if version == 1:
            raise ProtocolError("expected a v1 frame (JSON object), got a JSON array")
        if len(frame) != _V2_ARITY:
            raise ProtocolError(
                f"a v2 frame is [join_ref, ref, topic, event, payload], got {len(frame)} elements"
            )
        join_ref, ref, topic, event, payload = frame
    elif isinstance(frame, dict):
        if version == 2:
            raise ProtocolError("expected a v2 frame (JSON array), got a JSON object")
        missing = [name for name in ("topic", "event", "payload", "ref") if name not in frame]
        if missing:
            raise ProtocolError(f"v1 frame is missing {', '.join(missing)}")
        join_ref = frame.get("join_ref")
        ref = frame["ref"]
        topic = frame["topic"]
        event = frame["event"]
        payload = frame["payload"]
    else:
        raise ProtocolError(
            f"a frame must be a JSON array (v2) or object (v1), got {type_name(frame)}"
        )
    _check_fields(topic, event, ref, join_ref)
    return Message(topic=topic, event=event, payload=payload, ref=ref, join_ref=join_ref)


def presence_state_message(topic: str, state: Mapping[str, Any]) -> Message:
    """The ``presence_state`` push: ``state`` is ``{key: {"metas": [{..., "phx_ref": ref}]}}``.

    The payload is `state` itself, not a copy.  ``topic`` must be a str and ``state`` a mapping
    (`PresenceTypeError`); a state whose entries lack ``metas``, or whose metas are not objects
    with a ``phx_ref`` string, raises `ProtocolError`: clients could not apply it.
    """
    _check_topic(topic)
    if not isinstance(state, Mapping):
        raise PresenceTypeError(f"state must be a mapping, not {type_name(state)}")
    _check_state(state, "state")
    return Message(topic=topic, event=EVENT_PRESENCE_STATE, payload=state)


def presence_diff_message(topic: str, diff: Mapping[str, Any]) -> Message:
    """The ``presence_diff`` push: ``diff`` is ``{"joins": state, "leaves": state}``.

    Both keys are required, even when empty, because Supabase's clients index them directly;
    each is a state as `presence_state_message` takes it.  The payload is `diff` itself, not a
    copy.  ``topic`` must be a str and ``diff`` a mapping (a str or bytes is not one):
    `PresenceTypeError`; a diff without both keys, or with a malformed state under either,
    raises `ProtocolError`.
    """
    _check_topic(topic)
    if not isinstance(diff, Mapping):
        raise PresenceTypeError(f"diff must be a mapping, not {type_name(diff)}")
    if "joins" not in diff or "leaves" not in diff:
        raise ProtocolError("a presence diff needs both 'joins' and 'leaves'")
    _check_state(diff["joins"], "joins")
    _check_state(diff["leaves"], "leaves")
    return Message(topic=topic, event=EVENT_PRESENCE_DIFF, payload=diff)


def parse_client_presence(msg: Message) -> ClientPresence:
    """Read a client's ``presence`` event as a track (with its meta) or an untrack.

    Accepts the JS client's ``{"type": "presence", "event": ..., "payload": ...}`` and the
    Python client's form without ``"type"``.  A track needs an object payload (the meta); an
    untrack may carry an object payload, which is ignored.  ``msg`` comes from the wire, so
    anything else raises `ProtocolError`; a ``msg`` that is not a `Message` at all raises
    `PresenceTypeError`.
    """
    if not isinstance(msg, Message):
        raise PresenceTypeError(f"msg must be a Message, not {type_name(msg)}")
    if msg.event != EVENT_PRESENCE:
        raise ProtocolError(f"expected event {EVENT_PRESENCE!r}, got {msg.event!r}")
    body = msg.payload
    if not isinstance(body, dict):
        raise ProtocolError(f"presence payload must be an object, got {type_name(body)}")
    if "type" in body and body["type"] != EVENT_PRESENCE:
        raise ProtocolError(f"presence payload has type {body['type']!r}, not 'presence'")
    kind = body.get("event")
    if kind == "track":
        if "payload" not in body:
            raise ProtocolError("a presence track needs a 'payload' (the meta)")
        meta = body["payload"]
        if not isinstance(meta, dict):
            raise ProtocolError(f"presence meta must be an object, got {type_name(meta)}")
        return ClientPresence("track", meta)
    if kind == "untrack":
        extra = body.get("payload", {})
        if not isinstance(extra, dict):
            raise ProtocolError(
                f"untrack payload must be an object if present, got {type_name(extra)}"
            )
        return ClientPresence("untrack", {})
    raise ProtocolError(f"presence event must be 'track' or 'untrack', got {kind!r}")


def client_presence_message(
    topic: str,
    kind: Literal["track", "untrack"],
    meta: Mapping[str, Any] | None = None,
    *,
    ref: str | None = None,
    join_ref: str | None = None,
    with_type: bool = True,
) -> Message:
    """Build the ``presence`` event a client sends, for tests and client implementations.

    ``with_type=True`` gives the JS client's shape, ``False`` the Python client's.  An untrack
    carries ``{}`` as its payload, as the Python client sends it.

    Every argument comes from the calling code, so a wrong one raises `PresenceTypeError` (a
    meta that is not a mapping, a track without a meta, a topic or ref that is not a str, a
    ``with_type`` that is not a bool) or `PresenceValueError` (an unknown kind, an untrack with
    a non-empty meta).  The meta is copied one level deep; whether it serialises is `encode`'s
    business.
    """
    _check_topic(topic)
    for name, value in (("ref", ref), ("join_ref", join_ref)):
        if value is not None and not isinstance(value, str):
            raise PresenceTypeError(f"{name} must be a str or None, not {type_name(value)}")
    if not isinstance(with_type, bool):
        raise PresenceTypeError(f"with_type must be a bool, not {type_name(with_type)}")
    if meta is not None and not isinstance(meta, Mapping):
        raise PresenceTypeError(f"meta must be a mapping or None, not {type_name(meta)}")
    if kind == "track":
        if meta is None:
            raise PresenceTypeError("a presence track needs a meta (a mapping), got None")
        body: dict[str, Any] = {"event": "track", "payload": dict(meta)}
    elif kind == "untrack":
        if meta:
            raise PresenceValueError("an untrack carries no meta")
        body = {"event": "untrack", "payload": {}}
    elif isinstance(kind, str):
        raise PresenceValueError(f"presence kind must be 'track' or 'untrack', got {kind!r}")
    else:
        raise PresenceTypeError(f"presence kind must be a str, not {type_name(kind)}")
    if with_type:
        body = {"type": EVENT_PRESENCE, **body}
    return Message(topic=topic, event=EVENT_PRESENCE, payload=body, ref=ref, join_ref=join_ref)


def presence_key_from_join(payload: object) -> str | None:
    """The presence key a ``phx_join`` payload asks for, or ``None`` if it asks for none.

    The key lives at ``payload["config"]["presence"]["key"]``.  Any level may be missing or
    null, and an empty key means the same as none (the server then picks one).  A level of the
    wrong type raises `ProtocolError`.
    """
    if not isinstance(payload, dict):
        raise ProtocolError(f"join payload must be an object, got {type_name(payload)}")
    config = payload.get("config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ProtocolError(f"join config must be an object, got {type_name(config)}")
    presence = config.get("presence")
    if presence is None:
        return None
    if not isinstance(presence, dict):
        raise ProtocolError(f"join presence config must be an object, got {type_name(presence)}")
    key = presence.get("key")
    if key is None or key == "":
        return None
    if not isinstance(key, str):
        raise ProtocolError(f"presence key must be a string, got {type_name(key)}")
    return key
