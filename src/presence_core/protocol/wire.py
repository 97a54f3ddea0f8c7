"""Server pushes as JSON text, around payloads that are already JSON.

The Tracker hands every diff over once, as JSON bytes; these helpers put the Phoenix envelope
around such bytes for each protocol version without decoding them, so a fan-out costs one
envelope per version, not one encoding per member.  WebSocket framing is the door's business.
"""

from __future__ import annotations

import re

import orjson

from ..errors import ProtocolError
from ..phoenix import Message

__all__ = ["binary_push", "push", "v2_payload"]

_dumps = orjson.dumps

# A v2 push up to its payload: join_ref, ref (string or null), topic, event (strings).  `decode`
# has checked the frame is such an array, so what follows is the payload and the closing ']'.
_STR = rb'"(?:[^"\\]|\\.)*"'
_V2_HEAD = re.compile(
    rb"\s*\[\s*(?:null|%s)\s*,\s*(?:null|%s)\s*,\s*%s\s*,\s*%s\s*," % (_STR, _STR, _STR, _STR),
    re.DOTALL,
)


def push(version: int, topic: str, event: str, raw: bytes, join_ref: str | None) -> bytes:
    """A server push (``ref`` null) as JSON text, ``raw`` its payload's JSON."""
    if version == 2:
        head = [b"[", _dumps(join_ref), b",null,", _dumps(topic), b",", _dumps(event), b","]
        return b"".join(head) + raw + b"]"
    head = [b'{"ref":null,"topic":', _dumps(topic), b',"event":', _dumps(event), b',"payload":']
    return b"".join(head) + raw + b"}"


def v2_payload(data: bytes) -> bytes | None:
    """The payload of a v2 array push exactly as the client wrote it (numbers such as ``1e9``
    unchanged), or None if ``data`` is not laid out as one."""
    head = _V2_HEAD.match(data)
    tail = data.rstrip()
    if head is None or not tail.endswith(b"]"):
        return None
    return tail[head.end() : -1].strip()


def binary_push(data: bytes) -> tuple[Message, str, bytes, int]:
    """realtime-js v2's user broadcast push (kind 3): the message, its event, its payload bytes
    and their encoding (1: JSON, 0: binary).  The payload is not looked at here.  Raises
    `ProtocolError` (or `UnicodeDecodeError`) for anything else."""
    if len(data) < 7 or data[0] != 3:
        raise ProtocolError("unknown binary frame")
    sizes = data[1:6]
    encoding = data[6]
    if encoding not in (0, 1):
        raise ProtocolError(f"unknown binary payload encoding {encoding}")
    at = 7
    parts = []
    for size in sizes:
        if at + size > len(data):
            raise ProtocolError("binary frame shorter than its header says")
        parts.append(data[at : at + size].decode("utf-8"))
        at += size
    join_ref, ref, topic, event, _metadata = parts
    msg = Message(topic, "broadcast", None, ref or None, join_ref or None)
    return msg, event, data[at:], encoding
