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
    "PhoenixProtocolError",
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


class PhoenixProtocolError(ValueError):
    """A frame or payload that does not follow the Phoenix / Supabase presence protocol."""


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


def _describe(value: object) -> str:
    return type(value).__name__


def _check_fields(topic: object, event: object, ref: object, join_ref: object) -> None:
    # The same checks guard both directions so that whatever decode accepts, encode writes back.
    if not isinstance(topic, str):
        raise PhoenixProtocolError(f"topic must be a string, got {_describe(topic)}")
    if not isinstance(event, str):
        raise PhoenixProtocolError(f"event must be a string, got {_describe(event)}")
    if ref is not None and not isinstance(ref, str):
        raise PhoenixProtocolError(f"ref must be a string or null, got {_describe(ref)}")
    if join_ref is not None and not isinstance(join_ref, str):
        raise PhoenixProtocolError(f"join_ref must be a string or null, got {_describe(join_ref)}")


def encode(msg: Message, version: Literal[1, 2] = 2) -> bytes:
    """Serialise `msg` as a v2 array (default) or a v1 object, UTF-8 JSON bytes.

    A v1 object always has ``ref`` (``null`` when unset), because Supabase's Python client
    rejects server pushes without it, and has ``join_ref`` only when it is set, as Phoenix's v1
    serializer does.  Raises `PhoenixProtocolError` if a field has the wrong type or the
    payload is not JSON-serialisable.
    """
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
    else:
        raise PhoenixProtocolError(f"unknown protocol version {version!r}, expected 1 or 2")
    try:
        return orjson.dumps(frame)
    except orjson.JSONEncodeError as exc:
        raise PhoenixProtocolError(f"payload is not JSON-serialisable: {exc}") from exc


def decode(
    data: bytes | bytearray | memoryview | str, version: Literal[1, 2] | None = None
) -> Message:
    """Parse one text frame into a `Message`.

    With ``version=None`` a JSON array is read as v2 and a JSON object as v1.  A v1 object must
    have ``topic``, ``event``, ``payload`` and ``ref`` (which may be null); ``join_ref`` may be
    missing and unknown keys are ignored, as Phoenix does.  A v2 array must have exactly five
    elements.  Anything else raises `PhoenixProtocolError`.
    """
    if version not in (None, 1, 2):
        raise PhoenixProtocolError(f"unknown protocol version {version!r}, expected 1 or 2")
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise PhoenixProtocolError(f"a frame must be bytes or str, got {_describe(data)}")
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PhoenixProtocolError(f"frame is not valid JSON: {exc}") from exc

    if isinstance(frame, list):
        if version == 1:
            raise PhoenixProtocolError("expected a v1 frame (JSON object), got a JSON array")
        if len(frame) != _V2_ARITY:
            raise PhoenixProtocolError(
                f"a v2 frame is [join_ref, ref, topic, event, payload], got {len(frame)} elements"
            )
        join_ref, ref, topic, event, payload = frame
    elif isinstance(frame, dict):
        if version == 2:
            raise PhoenixProtocolError("expected a v2 frame (JSON array), got a JSON object")
        missing = [name for name in ("topic", "event", "payload", "ref") if name not in frame]
        if missing:
            raise PhoenixProtocolError(f"v1 frame is missing {', '.join(missing)}")
        join_ref = frame.get("join_ref")
        ref = frame["ref"]
        topic = frame["topic"]
        event = frame["event"]
        payload = frame["payload"]
    else:
        raise PhoenixProtocolError(
            f"a frame must be a JSON array (v2) or object (v1), got {_describe(frame)}"
        )
    _check_fields(topic, event, ref, join_ref)
    return Message(topic=topic, event=event, payload=payload, ref=ref, join_ref=join_ref)


def presence_state_message(topic: str, state: Mapping[str, Any]) -> Message:
    """The ``presence_state`` push: ``state`` is ``{key: {"metas": [{..., "phx_ref": ref}]}}``.

    The payload is `state` itself, not a copy.
    """
    return Message(topic=topic, event=EVENT_PRESENCE_STATE, payload=state)


def presence_diff_message(topic: str, diff: Mapping[str, Any]) -> Message:
    """The ``presence_diff`` push: ``diff`` is ``{"joins": state, "leaves": state}``.

    Both keys are required, even when empty, because Supabase's clients index them directly.
    The payload is `diff` itself, not a copy.
    """
    if "joins" not in diff or "leaves" not in diff:
        raise PhoenixProtocolError("a presence diff needs both 'joins' and 'leaves'")
    return Message(topic=topic, event=EVENT_PRESENCE_DIFF, payload=diff)


def parse_client_presence(msg: Message) -> ClientPresence:
    """Read a client's ``presence`` event as a track (with its meta) or an untrack.

    Accepts the JS client's ``{"type": "presence", "event": ..., "payload": ...}`` and the
    Python client's form without ``"type"``.  A track needs an object payload (the meta); an
    untrack may carry an object payload, which is ignored.
    """
    if msg.event != EVENT_PRESENCE:
        raise PhoenixProtocolError(f"expected event {EVENT_PRESENCE!r}, got {msg.event!r}")
    body = msg.payload
    if not isinstance(body, dict):
        raise PhoenixProtocolError(f"presence payload must be an object, got {_describe(body)}")
    if "type" in body and body["type"] != EVENT_PRESENCE:
        raise PhoenixProtocolError(f"presence payload has type {body['type']!r}, not 'presence'")
    kind = body.get("event")
    if kind == "track":
        if "payload" not in body:
            raise PhoenixProtocolError("a presence track needs a 'payload' (the meta)")
        meta = body["payload"]
        if not isinstance(meta, dict):
            raise PhoenixProtocolError(f"presence meta must be an object, got {_describe(meta)}")
        return ClientPresence("track", meta)
    if kind == "untrack":
        extra = body.get("payload", {})
        if not isinstance(extra, dict):
            raise PhoenixProtocolError(
                f"untrack payload must be an object if present, got {_describe(extra)}"
            )
        return ClientPresence("untrack", {})
    raise PhoenixProtocolError(f"presence event must be 'track' or 'untrack', got {kind!r}")


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
    """
    if kind == "track":
        if meta is None:
            raise PhoenixProtocolError("a presence track needs a meta")
        body: dict[str, Any] = {"event": "track", "payload": dict(meta)}
    elif kind == "untrack":
        if meta:
            raise PhoenixProtocolError("an untrack carries no meta")
        body = {"event": "untrack", "payload": {}}
    else:
        raise PhoenixProtocolError(f"presence kind must be 'track' or 'untrack', got {kind!r}")
    if with_type:
        body = {"type": EVENT_PRESENCE, **body}
    return Message(topic=topic, event=EVENT_PRESENCE, payload=body, ref=ref, join_ref=join_ref)


def presence_key_from_join(payload: object) -> str | None:
    """The presence key a ``phx_join`` payload asks for, or ``None`` if it asks for none.

    The key lives at ``payload["config"]["presence"]["key"]``.  Any level may be missing or
    null, and an empty key means the same as none (the server then picks one).  A level of the
    wrong type raises `PhoenixProtocolError`.
    """
    if not isinstance(payload, dict):
        raise PhoenixProtocolError(f"join payload must be an object, got {_describe(payload)}")
    config = payload.get("config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise PhoenixProtocolError(f"join config must be an object, got {_describe(config)}")
    presence = config.get("presence")
    if presence is None:
        return None
    if not isinstance(presence, dict):
        raise PhoenixProtocolError(
            f"join presence config must be an object, got {_describe(presence)}"
        )
    key = presence.get("key")
    if key is None or key == "":
        return None
    if not isinstance(key, str):
        raise PhoenixProtocolError(f"presence key must be a string, got {_describe(key)}")
    return key
