"""Whoever can publish on the sync channels cannot flood the log.

Every unusable sync message is counted (``redis_errors``) and audited through
`presence_core.audit`, which writes a bounded number of records and counts the rest; no record
quotes the message.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

pytest.importorskip("redis")

from servers import ValkeyServer  # noqa: E402
from test_store import run  # noqa: E402
from test_store_peers import pair, until  # noqa: E402

import presence_core.audit as audit_log  # noqa: E402
from presence_core import PresenceValueError  # noqa: E402
from presence_core.store.peers import decode_message  # noqa: E402

MARK = b"SECRET-MARK"
FLOOD = 10_000
GARBAGE = [
    b"not a peer message " + MARK,
    b'[2,"node-x","d",[]]\n' + MARK,  # an unknown version
    b'[1,"node-x","d",[["room",[["' + MARK + b'",null,99]],[]]]]\n',  # metas do not add up
    b'[1,"node-x","d",[["room",[],["' + MARK + b'"]]]]\n',  # a leave that is no ref
    b'[1,"../' + MARK + b'","b",""]\n',  # a bye from no valid node
    b'[1,"node-x","d",[["room",[["k",null,5]],[]]]]\n' + MARK[:5],  # a meta that is no meta
]


def test_a_flood_of_unusable_sync_messages_writes_a_bounded_log(
    valkey: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    audit_log.reset()
    channels: list[bytes] = []

    async def main() -> None:
        async with pair(valkey) as (a, sa, b, sb):
            assert sa.peers is not None and sb.peers is not None
            channel = sa.layout.channel("room")
            channels.append(channel)
            with valkey.client(decode_responses=False) as client:
                for start in range(0, FLOOD, 1000):
                    pipe = client.pipeline(transaction=False)
                    for i in range(start, start + 1000):
                        pipe.execute_command("SPUBLISH", channel, GARBAGE[i % len(GARBAGE)])
                    pipe.execute()
                    await asyncio.sleep(0)  # let the subscribers read
            await until(
                lambda: (
                    sa.peers is not None
                    and sb.peers is not None
                    and sa.peers.errors >= FLOOD
                    and sb.peers.errors >= FLOOD
                ),
                60,
                "both processes to count the flood",
            )
            # The store still works: a valid diff published after the flood applies.
            a.track("c1", "room", "alice", {})
            a.flush()
            await until(lambda: "alice" in b.list("room"), 5, "b to hear of alice")

    try:
        run(main)
        records = [r for r in caplog.records if r.name.startswith("presence_core")]
        assert len(records) <= 60, [r.getMessage() for r in records[:80]]
        audited = [r for r in records if r.name == "presence_core.audit"]
        assert audited, "the flood was not audited"
        fields = audited[0].audit  # type: ignore[attr-defined]
        assert fields["event"] == "peer_message_invalid"
        assert fields["channel"] == channels[0].decode()
        assert isinstance(fields["bytes"], int) and fields["reason"]
        assert {r.audit["reason"] for r in audited} >= {  # type: ignore[attr-defined]
            "not a peer message",
            "unknown version",
            "malformed peer diff: its metas do not add up",
            "a bye from no valid node",
            "diff refused by the tracker (PresenceValueError)",
        }
        for record in records:
            text = record.getMessage() + repr(getattr(record, "audit", ""))
            assert MARK.decode() not in text and "SECRET" not in text
    finally:
        audit_log.reset()


@pytest.mark.parametrize("message", GARBAGE[:3])
def test_decode_errors_never_quote_the_message(message: bytes) -> None:
    with pytest.raises(PresenceValueError) as caught:
        decode_message(message)
    assert b"SECRET" not in str(caught.value).encode()
