"""Identity on the server: JWT verification, the presence key bound to a claim, private
channels and their policy, token expiry and refresh, origins and the secure defaults.

Everything runs on loopback against an in-process `PresenceServer`, with real HS256 tokens
signed by PyJWT and a `websockets` client speaking the Phoenix v2 protocol.  The three real
clients (phoenix.js, realtime-js, Supabase's Python client) carrying tokens are tested in
``tests/test_auth_clients.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
from test_server import Client, run, serving
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from presence_core import Tracker
from presence_core.auth import Access, JwtVerifier
from presence_core.errors import KeyMismatch, PresenceValueError
from presence_core.metrics import Metrics
from presence_core.server import PresenceServer
from presence_core.server import server as server_module

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"
VERIFIER = JwtVerifier(secret=SECRET)


def token(sub: str | None = "alice", ttl: float = 3600.0, **claims: Any) -> str:
    body: dict[str, Any] = {"role": "authenticated", "exp": int(time.time() + ttl), **claims}
    if sub is not None:
        body["sub"] = sub
    return jwt.encode(body, SECRET, algorithm="HS256")


@asynccontextmanager
async def client(
    server: PresenceServer,
    apikey: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Client]:
    url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0"
    if apikey is not None:
        url += f"&apikey={apikey}"
    async with connect(url, additional_headers=dict(headers or {})) as ws:
        yield Client(ws, 2)


async def join(
    c: Client, topic: str, key: str = "", access_token: str | None = None, **config: Any
) -> dict[str, Any]:
    """Join ``topic``; returns the reply's payload (``status`` and ``response``)."""
    payload: dict[str, Any] = {"config": {"presence": {"key": key}, **config}}
    if access_token is not None:
        payload["access_token"] = access_token
    ref = await c.push(topic, "phx_join", payload)
    while True:
        msg = await c.until("phx_reply")
        if msg["ref"] == ref:
            return msg["payload"]  # type: ignore[no-any-return]


async def until_on(c: Client, topic: str, event: str, timeout: float = 3.0) -> dict[str, Any]:
    """The next ``event`` on ``topic`` (what comes on other topics is skipped)."""
    while True:
        msg = await c.until(event, timeout)
        if msg["topic"] == topic:
            return msg


async def reply(c: Client, topic: str, event: str, payload: Any) -> dict[str, Any]:
    ref = await c.push(topic, event, payload, join_ref="1")
    while True:
        msg = await c.until("phx_reply")
        if msg["ref"] == ref:
            return msg["payload"]  # type: ignore[no-any-return]


async def refused_status(
    server: PresenceServer, query: str = "", **headers: str
) -> tuple[int, Any]:
    url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0{query}"
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)


# -- the handshake -------------------------------------------------------------------------------


def test_the_handshake_refuses_a_missing_bad_or_expired_token_in_supabase_shape() -> None:
    async def main() -> None:
        async with serving(verifier=VERIFIER) as server:
            assert await refused_status(server) == (
                401,
                {
                    "error": "a token is required: send it as the apikey query parameter or the "
                    "x-api-key header"
                },
            )
            wrong = jwt.encode(
                {"role": "x", "exp": time.time() + 60}, "another-secret-long-enough-32b!!"
            )
            assert await refused_status(server, f"&apikey={wrong}") == (
                401,
                {"error": "Failed to validate JWT signature"},
            )
            status, body = await refused_status(server, f"&apikey={token(ttl=-30)}")
            assert status == 401 and body["error"].startswith("InvalidJWTToken: Token has expired")
            no_role = jwt.encode({"exp": time.time() + 60}, SECRET)
            assert await refused_status(server, f"&apikey={no_role}") == (
                401,
                {"error": "Fields `role` and `exp` are required in JWT"},
            )
            # The x-api-key header first, then the apikey query parameter, as Supabase reads them.
            async with client(server, headers={"x-api-key": token()}) as c:
                assert (await join(c, "room"))["status"] == "ok"
            async with client(server, apikey=token()) as c:
                assert (await join(c, "room"))["status"] == "ok"
            assert server.connections == 0 or await settle(lambda: server.connections == 0)

    run(main)


async def settle(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_browser_origins_outside_the_allow_list_get_403() -> None:
    async def main() -> None:
        async with serving(allowed_origins=["https://app.example.com/"]) as server:
            assert await refused_status(server, Origin="https://evil.example.com") == (
                403,
                {"error": "this origin is not allowed"},
            )
            async with client(server, headers={"Origin": "https://APP.example.com"}) as c:
                assert (await join(c, "room"))["status"] == "ok"
            async with client(server) as c:  # not a browser: no Origin header
                assert (await join(c, "room"))["status"] == "ok"

    run(main)


# -- the presence key bound to a claim -------------------------------------------------------------


def test_the_presence_key_is_the_tokens_sub_and_impersonation_changes_nothing() -> None:
    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub") as server:
            anon = token(sub=None, role="anon")
            async with client(server, apikey=anon) as alice, client(server, apikey=anon) as mallory:
                # The join's access_token replaces the socket's for the channel.
                assert (await join(alice, "room", access_token=token("alice")))["status"] == "ok"
                refused = await join(mallory, "room", key="alice", access_token=token("mallory"))
                assert refused == {
                    "status": "error",
                    "response": {
                        "reason": "Unauthorized: the presence key is the token's `sub` claim; "
                        "this join asks for another"
                    },
                }
                assert (
                    await reply(alice, "room", "presence", {"event": "track", "payload": {"a": 1}})
                )["status"] == "ok"
                await settle(lambda: server.tracker.list("room"))
                assert set(server.tracker.list("room")) == {"alice"}
                # mallory joins under her own key (an empty key gets the claim)...
                assert (await join(mallory, "room", access_token=token("mallory")))[
                    "status"
                ] == "ok"
                await reply(mallory, "room", "presence", {"event": "track", "payload": {"m": 1}})
                assert await settle(
                    lambda: set(server.tracker.list("room")) == {"alice", "mallory"}
                )
                # ...and a socket with a token that has no sub cannot track at all.
                assert (await join(mallory, "lobby"))["status"] == "ok"
                answer = await reply(
                    mallory, "lobby", "presence", {"event": "track", "payload": {}}
                )
                assert answer["status"] == "error"
                assert "`sub` claim" in answer["response"]["reason"]
                assert server.tracker.list("lobby") == {}

    run(main)


def test_the_tracker_refuses_another_key_once_bound() -> None:
    tracker = Tracker()
    tracker.bind_key("c", "alice")
    tracker.bind_key("c", "alice-bot", topic="bots")
    tracker.track("c", "room", "alice", {})
    tracker.track("c", "bots", "alice-bot", {})
    before = tracker.list("room")
    with pytest.raises(KeyMismatch):
        tracker.track("c", "room", "bob", {})
    with pytest.raises(KeyMismatch):
        tracker.track("c", "bots", "alice", {})
    assert tracker.list("room") == before and tracker.bound_key("c", "other") == "alice"
    tracker.disconnect("c")
    assert tracker.bound_key("c", "room") is None
    tracker.track("c", "room", "bob", {})  # a new connection of that id is free again


# -- expiry and refresh ----------------------------------------------------------------------------


def test_an_expiring_token_closes_the_channel_within_a_second_and_the_presence_leaves() -> None:
    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub") as server:
            async with (
                client(server, apikey=token("watcher")) as watcher,
                client(server, apikey=token("alice")) as alice,
            ):
                assert (await join(watcher, "room"))["status"] == "ok"
                exp = int(time.time()) + 2
                assert (
                    await join(
                        alice,
                        "room",
                        access_token=jwt.encode(
                            {"sub": "alice", "role": "authenticated", "exp": exp}, SECRET
                        ),
                    )
                )["status"] == "ok"
                await reply(alice, "room", "presence", {"event": "track", "payload": {}})
                assert await settle(lambda: "alice" in server.tracker.list("room"))
                system = await alice.until("system", timeout=5)
                closed_at = time.time()
                assert exp <= closed_at < exp + 1.0
                assert system["payload"]["status"] == "error"
                assert system["payload"]["message"].startswith("InvalidJWTToken: Token has expired")
                await alice.until("phx_close")
                diff = await watcher.until("presence_diff")
                while "alice" not in diff["payload"]["leaves"]:
                    diff = await watcher.until("presence_diff")
                assert "alice" not in server.tracker.list("room")

    run(main)


def test_a_refreshed_token_keeps_the_channel_and_a_bad_or_foreign_one_closes_it() -> None:
    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub") as server:
            async with client(server, apikey=token("alice", ttl=2)) as alice:
                assert (await join(alice, "room"))["status"] == "ok"
                assert (await join(alice, "hall"))["status"] == "ok"
                await reply(alice, "room", "presence", {"event": "track", "payload": {}})
                # Refreshed in time: the channel outlives the first token.
                answer = await reply(
                    alice, "room", "access_token", {"access_token": token("alice")}
                )
                assert answer["status"] == "ok"
                await asyncio.sleep(3.2)
                assert "alice" in server.tracker.list("room")
                # hall kept the first token: it was closed at its exp.
                assert "hall" not in server.core.sessions[max(server.core.sessions)].channels
                # A token for someone else closes the channel; so does a wrongly signed one.
                await alice.push("room", "access_token", {"access_token": token("bob")}, "1")
                system = await until_on(alice, "room", "system")
                assert "`sub` claim is not this channel's" in system["payload"]["message"]
                await until_on(alice, "room", "phx_close")
                assert await settle(lambda: "alice" not in server.tracker.list("room"))
                assert (await join(alice, "room"))["status"] == "error"  # socket token expired
                assert (await join(alice, "room", access_token=token("alice")))["status"] == "ok"
                forged = jwt.encode(
                    {"sub": "alice", "role": "x", "exp": time.time() + 60}, "x" * 40
                )
                await alice.push("room", "access_token", {"access_token": forged}, "1")
                system = await until_on(alice, "room", "system")
                assert system["payload"]["message"] == "Failed to validate JWT signature"
                await until_on(alice, "room", "phx_close")

    run(main)


# -- private channels and policies -----------------------------------------------------------------


def test_private_channels_need_a_policy_and_private_only_refuses_public_ones() -> None:
    async def main() -> None:
        async with serving(verifier=VERIFIER) as server, client(server, apikey=token()) as c:
            answer = await join(c, "secret", private=True)
            assert answer["status"] == "error"
            assert "need a policy" in answer["response"]["reason"]
        calls: list[tuple[dict[str, Any], str]] = []

        def policy(claims: Mapping[str, Any], topic: str) -> Access:
            calls.append((dict(claims), topic))
            return Access.ALL if claims.get("sub") == "alice" else Access.NONE

        async with serving(verifier=VERIFIER, policy=policy, private_only=True) as server:
            async with (
                client(server, apikey=token("alice")) as c,
                client(server, apikey=token("eve")) as eve,
            ):
                answer = await join(c, "public")
                assert answer["response"] == {
                    "reason": "PrivateOnly: This project only allows private channels"
                }
                assert (await join(c, "secret", private=True))["status"] == "ok"
                refused = await join(eve, "secret", private=True)
                assert refused["response"]["reason"] == (
                    "Unauthorized: You do not have permissions to read from this Channel "
                    "topic: secret"
                )
                # Cached per channel and token: messages do not ask the policy again...
                for _ in range(3):
                    await reply(c, "secret", "presence", {"event": "track", "payload": {"n": 1}})
                assert [topic for _, topic in calls] == ["secret", "secret"]
                # ...a new token does.
                await reply(c, "secret", "access_token", {"access_token": token("alice", ttl=99)})
                assert len(calls) == 3 and calls[-1][0]["sub"] == "alice"

    run(main)


def test_a_policy_grants_read_and_write_separately_for_presence_and_broadcast() -> None:
    async def policy(claims: Mapping[str, Any], topic: str) -> Access:
        await asyncio.sleep(0.01)  # an async policy: the frames that follow wait, in order
        if claims["sub"] == "reader":
            return Access(presence_read=True, broadcast_read=True)
        if claims["sub"] == "writer":
            return Access(
                presence_write=True, broadcast_write=True, broadcast_read=False, presence_read=False
            )
        return Access.ALL

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy) as server:
            async with (
                client(server, apikey=token("reader")) as reader,
                client(server, apikey=token("writer")) as writer,
                client(server, apikey=token("admin")) as admin,
            ):
                # A write-only member has no read: the join itself is refused.
                assert (await join(writer, "t", private=True))["status"] == "error"
                assert (await join(reader, "t", private=True, broadcast={"self": True}))[
                    "status"
                ] == "ok"
                assert (await join(admin, "t", private=True))["status"] == "ok"
                answer = await reply(reader, "t", "presence", {"event": "track", "payload": {}})
                assert answer["response"]["reason"].startswith(
                    "Unauthorized: You do not have permissions to write presence"
                )
                answer = await reply(
                    reader, "t", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}
                )
                assert answer["response"]["reason"].startswith("Unauthorized")
                await admin.push(
                    "t", "broadcast", {"type": "broadcast", "event": "hi", "payload": {"x": 1}}, "1"
                )
                got = await reader.until("broadcast")
                assert got["payload"]["event"] == "hi"
                assert server.tracker.list("t") == {}

    run(main)


# -- secure defaults -----------------------------------------------------------------------------


def test_no_auth_refuses_an_address_other_than_loopback_unless_anonymous_is_allowed() -> None:
    async def main() -> None:
        server = PresenceServer(Tracker(), host="0.0.0.0", port=0)
        with pytest.raises(PresenceValueError, match="without authentication"):
            await server.start()
        server = PresenceServer(Tracker(), host="0.0.0.0", port=0, allow_anonymous=True)
        await server.start()
        await server.stop()
        server = PresenceServer(Tracker(), host="0.0.0.0", port=0, verifier=VERIFIER)
        await server.start()
        await server.stop()

    run(main)


def test_the_dashboard_json_needs_its_token_once_auth_is_on() -> None:
    from test_server_hardening import get as http_get

    async def main() -> None:
        tracker = Tracker(metrics=Metrics())
        async with serving(tracker=tracker, verifier=VERIFIER) as server:
            status, body = await http_get(server.port, "/api/dashboard")
            assert status == 403 and b"dashboard token" in body
        tracker = Tracker(metrics=Metrics())
        async with serving(tracker=tracker, verifier=VERIFIER, dashboard_token="d" * 24) as server:
            status, _ = await http_get(server.port, "/api/dashboard?token=" + "d" * 24)
            assert status == 200
        tracker = Tracker(metrics=Metrics())
        async with serving(tracker=tracker) as server:  # loopback, no auth: open as before
            status, _ = await http_get(server.port, "/api/dashboard")
            assert status == 200

    run(main)


def test_the_auth_hook_gets_the_verified_claims_and_anonymous_sockets_when_allowed() -> None:
    seen: list[tuple[str | None, str | None, dict[str, Any]]] = []

    def hook(token_: str | None, topic: str | None, claims: Mapping[str, Any]) -> bool:
        seen.append((token_, topic, dict(claims)))
        return True

    async def main() -> None:
        async with serving(
            verifier=VERIFIER, auth=hook, allow_anonymous=True, key_claim="sub"
        ) as server:
            good = token("alice")
            async with client(server, apikey=good) as c:
                assert (await join(c, "room"))["status"] == "ok"
            async with client(server) as anonymous:
                assert (await join(anonymous, "room"))["status"] == "ok"
                answer = await reply(
                    anonymous, "room", "presence", {"event": "track", "payload": {}}
                )
                assert answer["status"] == "error"
                assert (await join(anonymous, "p", private=True))["status"] == "error"
        assert seen[0] == (
            good,
            None,
            {"sub": "alice", "role": "authenticated", "exp": seen[0][2]["exp"]},
        )
        assert seen[1][1] == "room" and seen[1][2]["sub"] == "alice"
        assert seen[2] == (None, None, {})

    run(main)


def test_a_public_channel_of_a_private_ones_name_sees_none_of_it() -> None:
    """Private and public channels of one name are two channels, as in Supabase Realtime: a
    public member must not read a private channel's presences or broadcasts (it would get
    round the policy by knowing the name)."""

    def policy(claims: Mapping[str, Any], topic: str) -> Access:
        return Access.ALL if claims.get("sub") == "alice" else Access.NONE

    async def main() -> None:
        async with serving(verifier=VERIFIER, key_claim="sub", policy=policy) as server:
            async with (
                client(server, apikey=token("alice")) as alice,
                client(server, apikey=token("eve")) as eve,
            ):
                assert (await join(alice, "secret", private=True))["status"] == "ok"
                await reply(alice, "secret", "presence", {"event": "track", "payload": {"x": 1}})
                assert (await join(eve, "secret", broadcast={"self": True}))["status"] == "ok"
                state = await until_on(eve, "secret", "presence_state")
                assert state["payload"] == {}
                await reply(eve, "secret", "presence", {"event": "track", "payload": {}})
                await alice.push(
                    "secret",
                    "broadcast",
                    {"type": "broadcast", "event": "psst", "payload": {}},
                    "1",
                )
                await eve.push(
                    "secret", "broadcast", {"type": "broadcast", "event": "own", "payload": {}}, "1"
                )
                # eve's own broadcast arrives; alice's private one never does, nor her presence.
                seen = []
                with contextlib.suppress(TimeoutError):
                    while True:
                        seen.append(await eve.recv(timeout=0.5))
                events = [(m["event"], m["payload"]) for m in seen if m["topic"] == "secret"]
                broadcasts = [p["event"] for e, p in events if e == "broadcast"]
                joins = [set(p["joins"]) for e, p in events if e == "presence_diff"]
                assert broadcasts == ["own"] and joins == [{"eve"}], events
                assert set(server.tracker.list("secret")) == {"eve"}
                # A client cannot reach the private channel's Tracker topic by its name.
                answer = await join(eve, server_module.PRIVATE_PREFIX + "secret")
                assert answer["status"] == "error"

    run(main)
