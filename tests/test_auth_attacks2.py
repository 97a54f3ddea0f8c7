"""Regression tests for defects a second adversarial review of the identity layer found.

Each test fails on the code it was written against and names its defect in its docstring.
Everything runs on loopback against an in-process `PresenceServer` (or calls the verifier
directly), with real HS256 tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from test_server import run, serving
from test_server_auth import SECRET, VERIFIER, client, join, settle, token, until_on
from websockets.asyncio.client import connect

from presence_core.auth import Access
from presence_core.errors import TokenError
from presence_core.server import connection as connection_module


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header_segment: str, payload_segment: str) -> str:
    """A token whose segments are these texts, signed with the test secret over them."""
    signing = f"{header_segment}.{payload_segment}"
    mac = hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(mac)}"


# -- the verifier's HS* fast path --------------------------------------------------------------


@pytest.mark.parametrize("value", [2**64 + 1, -(2**63) - 1, 10**30 + 7])
def test_the_fast_path_reads_integer_claims_beyond_64_bits_as_pyjwt_does(value: int) -> None:
    """Defect: `auth._loads` assumes orjson *refuses* an integer beyond 64 bits (its docstring
    says so, and falls back to `json` only on an error), but orjson 3.13 reads one as a
    float.  So the HS* fast path returns ``org: 1.8446744073709552e+19`` where PyJWT (and the
    same verifier with an audience configured) returns ``18446744073709551617``: a verified
    claim changes type and value, two distinct ids (2**64 and 2**64 + 1) compare equal in a
    policy, and a ``--presence-key-claim`` of that claim binds no key at all (`_claim_text`
    takes only a str or an int)."""
    now = time.time()
    claims = {"sub": "alice", "role": "authenticated", "exp": int(now + 600), "org": value}
    tok = jwt.encode(claims, SECRET, algorithm="HS256")
    expected = jwt.decode(tok, SECRET, algorithms=["HS256"])["org"]
    got = VERIFIER.verify(tok, now=now).claims["org"]
    assert type(got) is type(expected) and got == expected, (got, expected)


def test_the_fast_path_refuses_segments_pyjwt_refuses() -> None:
    """Defect: `JwtVerifier._verify_hmac` decodes the header and payload segments with
    `urlsafe_b64decode`, which takes ``+``, ``/`` and non-zero trailing bits; the PyJWT it
    claims to mirror ("the same base64url and JSON decoding ... accepts only a subset of
    what PyJWT accepts") refuses them (``Invalid payload padding``, PyJWT 2.15's strict
    segment check).  A token PyJWT refuses is accepted, and whether it is depends on whether
    an audience or issuer is configured (which turns the fast path off)."""
    now = time.time()
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    raw = json.dumps({"sub": "ab", "role": "authenticated", "exp": int(now + 600)}).encode()
    while len(_b64(raw)) % 4 not in (2, 3):
        raw += b" "
    payload = _b64(raw)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The same bytes, spelled with non-zero bits after the last byte.
    trailing = payload[:-1] + alphabet[alphabet.index(payload[-1]) + 1]
    assert base64.urlsafe_b64decode(trailing + "=" * (-len(trailing) % 4)) == raw
    tok = _signed(header, trailing)
    with pytest.raises(jwt.DecodeError):  # PyJWT's own verdict
        jwt.decode(tok, SECRET, algorithms=["HS256"])
    with pytest.raises(TokenError):
        VERIFIER.verify(tok, now=now)


# -- a socket held while a policy answers --------------------------------------------------------


def test_a_client_that_leaves_while_a_policy_waits_leaves_at_once() -> None:
    """Defect: while an async policy (or auth hook) answers, `Connection._message` calls
    ``transport.pause_reading()``, so the server no longer sees the socket end: a client
    that closes (close frame and FIN, or a reset) stays connected until the policy answers
    or its ``connection_ttl`` runs out (60 s by default; measured: its presences in its other
    channels leave only at the TTL).  Before the fix the close was read at once.  A held
    socket should still notice its end (keep reading a bounded amount, or watch for EOF),
    and its presences should leave then."""
    gate = asyncio.Event()

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        if topic == "slow":
            await gate.wait()  # a database that is slow, or down
        return Access.ALL

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy, ttl=30.0) as s:
            try:
                async with client(s, apikey=token("watcher")) as watcher:
                    assert (await join(watcher, "room", private=True))["status"] == "ok"
                    await until_on(watcher, "room", "presence_state")
                    url = f"ws://127.0.0.1:{s.port}/socket/websocket?vsn=2.0.0"
                    url += f"&apikey={token('ghost')}"
                    async with connect(url, close_timeout=0.2) as ws:

                        async def push(*frame: Any) -> None:
                            await ws.send(json.dumps(list(frame)))

                        await push("1", "1", "room", "phx_join", {"config": {"private": True}})
                        await push("1", "2", "room", "presence", {"event": "track", "payload": {}})
                        diff = await until_on(watcher, "room", "presence_diff")
                        assert "ghost" in diff["payload"]["joins"]
                        await push("3", "3", "slow", "phx_join", {"config": {"private": True}})
                        await push(None, "4", "phoenix", "heartbeat", {})  # held
                        conn = s.core.sessions[max(s.core.sessions)]
                        assert await settle(lambda: conn.held)
                    closed = time.monotonic()
                    left = False
                    with contextlib.suppress(TimeoutError):
                        while not left:
                            diff = await until_on(watcher, "room", "presence_diff", timeout=2.0)
                            left = "ghost" in diff["payload"]["leaves"]
                    assert left, "the closed client's presence is still there"
                    assert time.monotonic() - closed < 2.0
            finally:
                gate.set()

    run(main)


def test_stop_does_not_wait_out_the_close_timeout_for_a_held_socket() -> None:
    """Defect: `PresenceServer.stop` cancels the pending policy task, whose ``settle``
    re-raises without `Connection.release`, so a socket held for a policy (reading paused)
    never reads the client's answer to its 1001 close frame: every stop with such a socket
    waits `CLOSE_TIMEOUT` (5 s) and then aborts it (measured: 5.01 s, against 0.01 s for the
    same socket when no policy is pending).  Closing a held socket should resume its
    reading (its frames are dropped, it is no longer open)."""
    gate = asyncio.Event()

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        await gate.wait()
        return Access.ALL

    async def main() -> None:
        cm = serving(verifier=VERIFIER, key_claim="sub", policy=policy)
        server = await cm.__aenter__()
        stopped = False
        try:
            async with client(server, apikey=token("a")) as c:
                await c.push("p", "phx_join", {"config": {"private": True}})
                await c.push("phoenix", "heartbeat", {})  # held
                conn = server.core.sessions[max(server.core.sessions)]
                assert await settle(lambda: conn.held)
                started = time.monotonic()
                await cm.__aexit__(None, None, None)
                stopped = True
                took = time.monotonic() - started
                assert took < 2.0, f"stop took {took:.2f} s"
        finally:
            gate.set()
            if not stopped:
                await cm.__aexit__(None, None, None)

    run(main)


def test_a_socket_that_ended_while_a_policy_waits_holds_no_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect: when a socket held for a pending policy (or auth hook) ends (here: cut at its
    TTL), nothing cancels the policy's task or clears ``conn.backlog``: the task keeps the
    `Connection` and the frame it held (up to ``max_frame_bytes``, 1 MiB) until the policy
    answers.  With a policy that hangs, a client that opens sockets, sends a private join and
    one large frame, and goes, grows the server's memory by about 1 MiB a socket, past
    ``max_connections`` (measured: 0.9 MiB retained per closed socket)."""
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.3)

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy, ttl=0.5) as s:
            url = f"ws://127.0.0.1:{s.port}/socket/websocket?vsn=2.0.0&apikey={token('m')}"
            big = json.dumps([None, "2", "phoenix", "heartbeat", {"x": "A" * (256 * 1024)}])
            async with connect(url, close_timeout=0.2, max_size=None) as ws:
                await ws.send(
                    json.dumps([None, "1", "p", "phx_join", {"config": {"private": True}}])
                )
                await ws.send(big)
                conn = s.core.sessions[max(s.core.sessions)]
                assert await settle(lambda: conn.held)
                assert await settle(lambda: conn not in s._sockets, timeout=5.0)
            held = sum(len(data) for data, _ in conn.backlog or [])
            assert held == 0, f"{held} bytes still held by an ended socket"

    run(main)
