"""Regression tests for defects an adversarial review of the identity layer found.

Each test fails on the code it was written against and names its defect in its docstring.
Everything runs on loopback against an in-process `PresenceServer` (or calls the CLI's parser
without starting anything), with real HS256 tokens.
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

from presence_core.auth import Access, JwtVerifier
from presence_core.errors import TokenError
from presence_core.server import ServerLimits, cli


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(header: dict[str, Any], claims: dict[str, Any]) -> str:
    head, body = _b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


# -- the verifier --------------------------------------------------------------------------------


def test_the_hmac_fast_path_accepts_nothing_pyjwt_refuses() -> None:
    """Defect: `JwtVerifier._verify_hmac` (the HS* fast path) accepts tokens PyJWT refuses,
    against its docstring ("accepts only a subset of what PyJWT accepts"): a signature
    followed by a run of two or more ``=`` (any length, up to the 16 KiB limit), and a header
    whose ``kid`` is not a string.  One token thus has unboundedly many spellings: a host
    that denylists revoked tokens by their text (in its auth hook) is bypassed with
    ``token + "=="``, the "same token again" short-cut of an ``access_token`` push is
    defeated, and each channel can be made to hold a 16 KiB copy of a 150-byte token."""
    now = time.time()
    claims = {"sub": "alice", "role": "authenticated", "exp": int(now + 600)}
    good = _hs256({"alg": "HS256", "typ": "JWT"}, claims)
    assert VERIFIER.verify(good, now=now).claims["sub"] == "alice"
    variants = [
        good + "==",
        good + "=" * 1000,
        _hs256({"alg": "HS256", "kid": 5}, claims),
    ]
    for variant in variants:
        with pytest.raises(jwt.InvalidTokenError):  # PyJWT's own verdict
            jwt.decode(variant, SECRET, algorithms=["HS256"])
        with pytest.raises(TokenError):
            VERIFIER.verify(variant, now=now)
    # The PyJWT path (taken when an audience is configured) already refuses them.
    strict = JwtVerifier(secret=SECRET, audience="authenticated")
    for variant in variants:
        with pytest.raises(TokenError):
            strict.verify(variant, now=now)


# -- async policies --------------------------------------------------------------------------------


def test_frames_held_while_a_policy_waits_are_bounded() -> None:
    """Defect: while an async policy (or auth hook) is pending, `Connection._message` appends
    every later frame to ``conn.backlog`` with no bound and keeps reading the socket, so one
    client holds up to ``messages_per_second`` x ``max_frame_bytes`` (200 MiB) more memory
    per second of policy latency (measured: 264 MiB in 1.9 s with the defaults).  Reading
    should stop (TCP back-pressure) or the backlog be capped while the policy waits."""
    gate = asyncio.Event()

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        await gate.wait()  # a database that is slow, or down
        return Access.ALL

    frame_bytes = 64 * 1024
    limits = ServerLimits(max_frame_bytes=frame_bytes, messages_per_second=100_000.0)

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy, limits=limits) as s:
            try:
                async with client(s, apikey=token("mallory")) as c:
                    await c.push("p", "phx_join", {"config": {"private": True}})
                    conn = s.core.sessions[max(s.core.sessions)]
                    assert await settle(lambda: conn.backlog is not None)
                    big = json.dumps([None, "1", "p", "heartbeat", {"x": "A" * (60 * 1024)}])

                    async def flood() -> None:
                        for _ in range(400):  # 24 MiB
                            await c.ws.send(big)

                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(flood(), 3.0)
                    await asyncio.sleep(0.3)
                    held = sum(len(data) for data, _ in conn.backlog or [])
                    assert held <= 8 * 1024 * 1024, f"{held / 2**20:.0f} MiB held"
                    gate.set()
            except Exception:
                gate.set()
                raise

    run(main)


def test_a_policy_raising_cancelled_error_refuses_the_join() -> None:
    """Defect: `PresenceServer._defer`'s ``settle`` catches ``Exception`` only, so an async
    policy (or auth hook) that raises `asyncio.CancelledError` (a BaseException: a cancelled
    database call) ends the task without calling back: the join never gets a reply, and
    ``conn.backlog`` stays set, so every later frame of the socket, heartbeats included, is
    held unanswered until the connection's TTL drops it."""

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        raise asyncio.CancelledError

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy) as server:
            async with client(server, apikey=token("bob")) as c:
                answer = await join(c, "p", private=True)
                assert answer["status"] == "error"
                ref = await c.push("phoenix", "heartbeat", {})
                reply = await c.until("phx_reply")
                assert reply["ref"] == ref and reply["payload"]["status"] == "ok"

    run(main)


def test_a_join_whose_token_expires_while_the_policy_waits_is_refused() -> None:
    """Defect: `_identified_join` checks the token's ``exp`` when the join arrives, but
    `_join_allowed` does not check it again once an async policy (or auth hook) answers.  A
    join whose token expired meanwhile is answered ``ok``, its track goes through and the
    other members see it join (measured: a second after its ``exp``), until the next tick
    closes it.  Expected: refused with the expiry reason, and no presence."""

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        if claims.get("sub") == "carol":
            await asyncio.sleep(1.5)
        return Access.ALL

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy) as server:
            async with (
                client(server, apikey=token("carol")) as carol,
                client(server, apikey=token("watcher")) as watcher,
            ):
                assert (await join(watcher, "t", private=True))["status"] == "ok"
                await until_on(watcher, "t", "presence_state")
                short = jwt.encode(
                    {"sub": "carol", "role": "authenticated", "exp": time.time() + 0.5}, SECRET
                )
                ref = await carol.push(
                    "t", "phx_join", {"config": {"private": True}, "access_token": short}
                )
                await carol.push("t", "presence", {"event": "track", "payload": {}}, ref)
                while True:
                    reply = await carol.until("phx_reply", timeout=5)
                    if reply["ref"] == ref:
                        break
                assert reply["payload"]["status"] == "error"
                assert "expired" in reply["payload"]["response"]["reason"]
                seen = []
                with contextlib.suppress(TimeoutError):
                    while True:
                        seen.append(await watcher.recv(timeout=0.5))
                diffs = [m["payload"] for m in seen if m["event"] == "presence_diff"]
                assert [d for d in diffs if d["joins"]] == []

    run(main)


def test_a_refresh_sent_before_exp_keeps_the_channel_while_a_slow_policy_answers() -> None:
    """Defect: an ``access_token`` push on a private channel with a fresh, valid token sent a
    second before the old token's ``exp`` still gets the channel closed as expired when the
    policy takes longer than that second: `_expire_tokens` fires on the old token while
    `_renewed` waits, and `_renewed` then drops the answer (the push gets no reply at all).
    The issue: "A client that refreshes its token in time (``access_token``) stays on"
    (Supabase's channel process handles the refresh before its expiry check)."""
    calls = {"n": 0}

    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        calls["n"] += 1
        if calls["n"] > 1:
            await asyncio.sleep(1.5)
        return Access.ALL

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy) as server:
            async with client(server, apikey=token("bob")) as c:
                exp = time.time() + 2.0
                first = jwt.encode({"sub": "bob", "role": "authenticated", "exp": exp}, SECRET)
                assert (await join(c, "slow", private=True, access_token=first))["status"] == "ok"
                await asyncio.sleep(max(0.0, exp - time.time() - 1.0))
                fresh = token("bob", ttl=3600)
                ref = await c.push("slow", "access_token", {"access_token": fresh}, "1")
                events = []
                with contextlib.suppress(TimeoutError):
                    while True:
                        events.append(await c.recv(timeout=3.0))
                names = [m["event"] for m in events if m["topic"] == "slow"]
                assert "phx_close" not in names, names
                replies = [m for m in events if m["event"] == "phx_reply" and m["ref"] == ref]
                assert replies and replies[0]["payload"]["status"] == "ok"
                assert "slow" in server.core.sessions[max(server.core.sessions)].channels

    run(main)


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_a_port_out_of_range_exits_2(port: str) -> None:
    """Defect: ``--port`` is a bare ``int``: ``serve --port 99999`` silently listens on port
    34463 (99999 - 65536, asyncio wraps it), ``--port 65536`` on a random port, and
    ``--port -1`` fails with exit 1 and "Servname not supported for ai_socktype".  A bad
    option value must exit 2 with argparse's message."""
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["serve", "--port", port], environ={})
    assert info.value.code == 2


def test_a_redis_password_with_an_unparsable_url_exits_2() -> None:
    """Defect: `cli.with_password` calls `urlsplit`, which raises ValueError("Invalid IPv6
    URL") for ``redis://[::1:6379``; `parse_args` does not catch it, so ``serve --redis
    'redis://[::1:6379' --redis-password PW`` (or the same in REDIS_URL and
    PRESENCE_CORE_REDIS_PASSWORD) dies with a traceback and exit 1 instead of exit 2."""
    with pytest.raises(SystemExit) as info:
        cli.parse_args(
            ["serve", "--redis", "redis://[::1:6379", "--redis-password", "pw-12345"], environ={}
        )
    assert info.value.code == 2


def test_a_secret_that_is_not_utf8_does_not_crash_serve() -> None:
    """Defect: a secret whose bytes are not UTF-8 reaches Python as lone surrogates
    (``--jwt-secret $'\\xff\\xfe...'``); `cli.Redactor` calls `urllib.parse.quote` on it,
    which raises UnicodeEncodeError, so ``serve`` dies with a traceback (exit 1) before it
    checks anything.  Expected: exit 2 with a message, or a redactor that copes."""
    secret = "\udcff\udcfeSECRET-abcdef"
    try:
        args = cli.parse_args(["serve", "--jwt-secret", secret], environ={})
    except SystemExit as exc:
        assert exc.code == 2
        return
    redact = cli.Redactor.of(args)
    assert secret not in redact(f"a line with {secret} in it")
