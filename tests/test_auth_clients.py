"""The three real clients carrying real JWTs against a server that verifies them.

The server is an in-process `PresenceServer` with ``verifier=JwtVerifier(secret=SECRET)`` and
``key_claim="sub"``; tokens are HS256, signed by PyJWT (`test_server_auth.token`).  The clients
are the unmodified packages:

* realtime-js (``@supabase/realtime-js``, pinned in ``tests/js/package.json``) with
  ``params: {apikey}`` -- an anon key: a JWT with ``role: anon`` and no ``sub`` -- and the
  user's token through ``setAuth``, which it sends as the join's ``access_token`` and, on a
  later ``setAuth``, as an ``access_token`` push;
* phoenix.js with ``params: {token}`` (the socket's token: the server reads the ``token``
  query parameter as it reads ``apikey``);
* Supabase's Python client ``realtime`` (``AsyncRealtimeClient(url, token=anon_key)``, then
  ``set_auth(user_token)``).

All the JavaScript clients of a test live in one ``node tests/js/auth_client.mjs`` process,
each opened by name; the Python clients run in the test's event loop, next to the server.

What each client shows when it is refused, read from the installed packages (Node 20.20):

* A handshake answered 401: Node's WebSocket (undici) fires ``error`` ("Received network error
  or non-101 status code.") and never ``close``; the HTTP status and JSON body are not exposed.
  So phoenix.js reports it through ``Socket.onError`` and, with no ``close``, never schedules a
  reconnect; realtime-js calls the subscribe callback with ``CHANNEL_ERROR`` and
  ``Error("channel error: transport failure")``.  The Python client raises ``websockets``'
  ``InvalidStatus`` from ``connect()``, which carries the 401 and the ``{"error": reason}`` body.
* realtime-js refuses to be built without an apikey (``Error: API key is required to connect
  to Realtime``): a missing token never reaches the server from it.
* A join refused with ``{"reason": ...}``: realtime-js's callback gets ``CHANNEL_ERROR`` with
  an ``Error`` whose message is the reason; phoenix.js's join push ``receive("error")`` gets the
  response object; the Python client's callback gets ``CHANNEL_ERROR`` with
  ``Exception(json.dumps(response))``.  realtime-js and phoenix.js then rejoin by themselves
  (phoenix's ``rejoinAfterMs``), and are refused again each time; so does the Python client
  (1, 2, 5, 10 s) while its socket is open.
* A channel closed on expiry (``system`` with status ``error``, then ``phx_close``):
  realtime-js hands the ``system`` payload to ``on("system")`` listeners and calls the
  subscribe callback with ``CLOSED``; phoenix.js fires its channel's ``onClose``; the Python
  client reports the ``system`` error as ``CHANNEL_ERROR`` (its ``SystemMessage`` model takes
  it) and ``phx_close`` as ``CLOSED``.

Without ``node`` or ``tests/js/node_modules`` these tests skip; with ``CI=true`` they fail
instead: run ``npm ci --prefix tests/js`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import jwt
import pytest
from realtime import AsyncRealtimeClient
from servers import pid_alive
from test_asgi import asgi_serving
from test_server import serving
from test_server_auth import VERIFIER, token
from test_server_clients import (
    JS_DIR,
    NPM_HINT,
    STOP_TIMEOUT,
    WAIT,
    NodeClient,
    State,
    _js_unavailable,
    _strip,
    eventually,
)
from websockets.exceptions import InvalidStatus

from presence_core.auth import Access
from presence_core.server import PresenceServer
from presence_core.server.server import PRIVATE_PREFIX

AUTH_CLIENT = JS_DIR / "auth_client.mjs"
TOPIC = "realtime:room"
OTHER_SECRET = "another-secret-that-is-also-long-enough!!"
IMPERSONATION = (
    "Unauthorized: the presence key is the token's `sub` claim; this join asks for another"
)


def anon_key() -> str:
    """A Supabase-style anon key: valid, ``role: anon``, no ``sub`` (no presence key)."""
    return token(sub=None, role="anon")


def forged(sub: str = "alice") -> str:
    """A well-formed token signed with a secret the server does not know."""
    body = {"sub": sub, "role": "authenticated", "exp": int(time.time() + 3600)}
    return jwt.encode(body, OTHER_SECRET, algorithm="HS256")


def expired(sub: str = "alice") -> str:
    return token(sub, ttl=-60)


# -- availability ----------------------------------------------------------------------------


@pytest.fixture(params=("serve", pytest.param("asgi", marks=pytest.mark.asgi_door)))
def door(request: pytest.FixtureRequest) -> str:
    """The front door every server of the test is: ``PresenceServer``, or the ASGI app under
    uvicorn (the same protocol core)."""
    return str(request.param)


@pytest.fixture
def node(door: str) -> Iterator[AuthNode]:
    """One ``node auth_client.mjs`` process for the test, stopped by PID however it ends."""
    reason = _js_unavailable()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # as test_js_clients.py
            pytest.fail(
                f"the auth client tests cannot run: {reason}; {NPM_HINT} before pytest",
                pytrace=False,
            )
        pytest.skip(f"JavaScript clients unavailable: {reason} ({NPM_HINT} to run these tests)")
    made = AuthNode(door)
    try:
        yield made
    finally:
        made.close()  # a no-op when the test closed it
        assert not pid_alive(made.proc.pid)


# -- the JavaScript clients ------------------------------------------------------------------


class AuthNode(NodeClient):
    """``node auth_client.mjs``: any number of phoenix.js and realtime-js clients, by name.

    `NodeClient` with another script: its reader thread, event log, ``ask``, ``command`` and
    ``close`` (by PID).
    """

    def __init__(self, door: str = "serve") -> None:
        super().__init__("auth_client.mjs", "", argv=[str(AUTH_CLIENT)])
        self.door = door  # the front door of the test's servers (see `door`)

    def client(self, name: str) -> JsClient:
        return JsClient(self, name)

    async def aclose(self) -> None:
        """Ask the script to close its clients and exit, without blocking the event loop (the
        in-process server must answer their closes); killed by PID past a bound."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b'{"cmd": "exit"}\n')
                self.proc.stdin.flush()
            with contextlib.suppress(AssertionError):
                await eventually(lambda: self.proc.poll() is not None, "node to exit", timeout=5)
        self.close()


class JsClient:
    """One named client in an `AuthNode`."""

    def __init__(self, node: AuthNode, name: str) -> None:
        self.node = node
        self.name = name

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.node._of(kind) if e.get("name") == self.name]

    def state(self) -> State:
        syncs = self.events("sync")
        return syncs[-1]["state"] if syncs else {}

    def diagnosis(self) -> str:
        return self.node.diagnosis()

    async def open_realtime(self, base: str, apikey: str | None, user: str | None = None) -> None:
        """A realtime-js client with ``params: {apikey}``, then ``setAuth(user)``."""
        fields: dict[str, Any] = {"kind": "realtime", "base": base}
        if apikey is not None:
            fields["apikey"] = apikey
        await self.node.command("open", name=self.name, **fields)
        if user is not None:
            await self.node.command("auth", name=self.name, token=user)

    async def open_phoenix(self, base: str, token_: str | None) -> None:
        """A phoenix.js socket with ``params: {token}`` (no params without one), connecting."""
        fields: dict[str, Any] = {"kind": "phoenix", "base": base}
        if token_ is not None:
            fields["token"] = token_
        await self.node.command("open", name=self.name, **fields)

    async def set_auth(self, token_: str) -> None:
        await self.node.command("auth", name=self.name, token=token_)

    async def join(
        self, topic: str = TOPIC, key: str = "", private: bool = False
    ) -> tuple[str, Any]:
        """The client's first answer to its join: ``("ok", ...)`` or its error shape."""
        answer = await self.node.ask("join", name=self.name, topic=topic, key=key, private=private)
        return answer["status"], answer.get("response")

    async def track(self, meta: dict[str, Any]) -> str:
        return str((await self.node.ask("track", name=self.name, meta=meta))["status"])

    async def channel_state(self) -> str | None:
        answer = await self.node.command("state", name=self.name)
        return answer["channel_state"]  # type: ignore[no-any-return]

    async def leave(self) -> None:
        await self.node.ask("leave", name=self.name)


# -- the Python client -----------------------------------------------------------------------


class PyClient:
    """Supabase's Python client: ``AsyncRealtimeClient(url, token=apikey)`` and one channel at
    a time, recording every subscribe callback with its wall-clock time."""

    def __init__(self, base: str, name: str, apikey: str | None) -> None:
        self.name = name
        # No reconnects: a refused or closed connection must show, not quietly come back.
        self.client = AsyncRealtimeClient(f"{base}/realtime/v1", token=apikey, auto_reconnect=False)
        self.channel: Any = None
        self.channels: list[Any] = []
        #: (time, status, error payload): the error's JSON decoded when it is JSON.
        self.statuses: list[tuple[float, str, Any]] = []

    def _on_status(self, status: Any, error: Exception | None) -> None:
        detail: Any = None
        if error is not None:
            try:
                detail = json.loads(str(error))
            except ValueError:
                detail = str(error)
        self.statuses.append((time.time(), str(status.value), detail))

    async def join(
        self, topic: str = TOPIC, key: str = "", private: bool = False
    ) -> tuple[str, Any]:
        config = {
            "broadcast": {"self": False, "ack": False},
            "presence": {"key": key, "enabled": True},
            "private": private,
        }
        channel = self.client.channel(topic.removeprefix("realtime:"), {"config": config})
        assert channel.topic == topic
        channel.on_presence_sync(lambda: None)  # presence is on only with a callback
        self.channel = channel
        self.channels.append(channel)
        seen = len(self.statuses)
        await asyncio.wait_for(channel.subscribe(self._on_status), WAIT)
        _, status, detail = self.statuses[seen]
        return status, detail

    def of(self, status: str) -> list[tuple[float, str, Any]]:
        return [entry for entry in self.statuses if entry[1] == status]

    def state(self) -> State:
        return {} if self.channel is None else _strip(dict(self.channel.presence_state()))

    def diagnosis(self) -> str:
        return f"{self.name}: connected={self.client.is_connected}, statuses={self.statuses}"

    async def close(self) -> None:
        for channel in self.channels:  # refused channels keep a rejoin timer
            channel.rejoin_timer.reset()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), STOP_TIMEOUT)


Client = JsClient | PyClient


async def converge(members: list[Client], expected: State) -> None:
    await eventually(
        lambda: all(c.state() == expected for c in members),
        f"every client to hold {expected}",
        *members,
    )


class Scene:
    """What one test starts: in-process servers and Python clients, next to its node process."""

    def __init__(self, node: AuthNode) -> None:
        self.node = node
        self.door = node.door
        self.pythons: list[PyClient] = []
        self.stack = contextlib.AsyncExitStack()

    async def server(self, **kwargs: Any) -> PresenceServer:
        opened = serving(**kwargs) if self.door == "serve" else asgi_serving(**kwargs)
        server: PresenceServer = await self.stack.enter_async_context(opened)
        return server

    def python(self, server: PresenceServer, name: str, apikey: str | None) -> PyClient:
        client = PyClient(base_of(server), name, apikey)
        self.pythons.append(client)
        return client


def run(node: AuthNode, scenario: Callable[[Scene], Awaitable[None]]) -> None:
    """Run a scenario; however it ends, its Python clients and node process are closed (in
    the loop, while the servers still answer), then its servers are stopped."""

    async def main() -> None:
        scene = Scene(node)
        try:
            await scenario(scene)
        finally:
            try:
                for client in scene.pythons:
                    await client.close()
                await node.aclose()
            finally:
                await scene.stack.aclose()
        assert not node.errors(), f"auth_client.mjs reported errors: {node.errors()}"

    asyncio.run(main())


def base_of(server: PresenceServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


# -- 1 and 2: see each other, keyed by sub; impersonation refused ------------------------------


def test_three_clients_join_keyed_by_their_sub_and_mallory_cannot_be_alice(
    node: AuthNode,
) -> None:
    async def scenario(scene: Scene) -> None:
        server = await scene.server(verifier=VERIFIER, key_claim="sub")
        base = base_of(server)
        alice, bob = node.client("alice"), node.client("bob")
        await alice.open_realtime(base, apikey=anon_key(), user=token("alice"))
        await bob.open_phoenix(base, token("bob"))
        carol = scene.python(server, "carol", apikey=anon_key())
        await carol.client.set_auth(token("carol"))

        # An empty key gets the sub; a key equal to the sub is accepted as asked.
        assert await alice.join(key="") == ("ok", None)
        assert (await bob.join(key="bob"))[0] == "ok"
        assert await carol.join(key="") == ("SUBSCRIBED", None)
        assert await alice.track({"name": "alice"}) == "ok"
        assert await bob.track({"name": "bob"}) == "ok"
        await carol.channel.track({"name": "carol"})
        members: list[Client] = [alice, bob, carol]
        three = {name: [{"name": name}] for name in ("alice", "bob", "carol")}
        await converge(members, three)

        # mallory, holding a valid token of her own, asks for the key "alice": each client
        # surfaces the refusal in its own shape.
        mallory_js, mallory_phx = node.client("mallory-js"), node.client("mallory-phx")
        await mallory_js.open_realtime(base, apikey=anon_key(), user=token("mallory"))
        await mallory_phx.open_phoenix(base, token("mallory"))
        mallory_py = scene.python(server, "mallory-py", apikey=anon_key())
        await mallory_py.client.set_auth(token("mallory"))
        assert await mallory_js.join(key="alice") == ("CHANNEL_ERROR", IMPERSONATION)
        assert await mallory_phx.join(key="alice") == ("error", {"reason": IMPERSONATION})
        assert await mallory_py.join(key="alice") == ("CHANNEL_ERROR", {"reason": IMPERSONATION})
        # realtime-js rejoins by itself (after 1 s) and is refused again, never joined.
        await eventually(
            lambda: len(mallory_js.events("channel")) >= 2, "mallory-js to rejoin", mallory_js
        )
        await mallory_js.leave()
        statuses = [(e["status"], e["error"]) for e in mallory_js.events("channel")]
        assert statuses[:2] == [("CHANNEL_ERROR", IMPERSONATION)] * 2, statuses
        assert "SUBSCRIBED" not in [status for status, _ in statuses]

        # Joined under her own key (empty: the sub), mallory is mallory, whatever she tracks.
        assert (await mallory_phx.join(key=""))[0] == "ok"
        assert await mallory_phx.track({"name": "alice", "really": "mallory"}) == "ok"
        four = {**three, "mallory": [{"name": "alice", "really": "mallory"}]}
        await converge([*members, mallory_phx], four)
        held = server.tracker.list(TOPIC)
        assert sorted(held) == ["alice", "bob", "carol", "mallory"]
        assert [meta["name"] for meta in held["alice"]["metas"]] == ["alice"]
        assert mallory_py.of("SUBSCRIBED") == []

    run(node, scenario)


# -- 3: missing, wrongly signed and expired tokens ---------------------------------------------


def test_missing_forged_and_expired_tokens_are_refused_in_each_clients_shape(
    node: AuthNode,
) -> None:
    async def scenario(scene: Scene) -> None:
        server = await scene.server(verifier=VERIFIER, key_claim="sub")
        base = base_of(server)
        started = time.monotonic()

        # phoenix.js: the 401 is a failed connection, reported through Socket.onError.
        cases = {"phx-missing": None, "phx-forged": forged(), "phx-expired": expired()}
        phx = {name: node.client(name) for name in cases}
        for name, sent in cases.items():
            await phx[name].open_phoenix(base, sent)
        await eventually(
            lambda: all(c.events("socket") for c in phx.values()),
            "phoenix.js to report the refused handshakes",
            *phx.values(),
        )
        for client in phx.values():
            socket = client.events("socket")
            assert socket[0]["status"] == "error", socket
            assert socket[0]["message"] == "Received network error or non-101 status code."
            assert "open" not in [e["status"] for e in socket], socket

        # realtime-js: no apikey is refused by the client itself; a forged or expired apikey
        # fails the connection, and the channel reports CHANNEL_ERROR.
        missing = await node.ask("open", name="sb-missing", kind="realtime", base=base)
        assert missing["status"] == "error"
        assert missing["error"] == "Error: API key is required to connect to Realtime"
        for name, apikey in (("sb-forged", forged()), ("sb-expired", expired())):
            client = node.client(name)
            await client.open_realtime(base, apikey=apikey)
            assert await client.join() == ("CHANNEL_ERROR", "channel error: transport failure")
            assert client.events("sync") == []
        # A valid apikey with a forged or expired user token (setAuth): the join's
        # access_token is refused with Supabase's reason.
        sb_forged_user, sb_expired_user = node.client("sb-f"), node.client("sb-e")
        await sb_forged_user.open_realtime(base, apikey=anon_key(), user=forged())
        await sb_expired_user.open_realtime(base, apikey=anon_key(), user=expired())
        assert await sb_forged_user.join() == ("CHANNEL_ERROR", "Failed to validate JWT signature")
        status, reason = await sb_expired_user.join()
        assert status == "CHANNEL_ERROR"
        assert reason.startswith("InvalidJWTToken: Token has expired")
        await sb_forged_user.leave()
        await sb_expired_user.leave()

        # The Python client raises from connect(): websockets' InvalidStatus, which carries
        # the 401 and the JSON body.
        reasons = {}
        for name, apikey in (("missing", None), ("forged", forged()), ("expired", expired())):
            py = scene.python(server, f"py-{name}", apikey=apikey)
            with pytest.raises(InvalidStatus) as info:
                await asyncio.wait_for(py.client.connect(), WAIT)
            assert info.value.response.status_code == 401
            reasons[name] = json.loads(info.value.response.body)["error"]
            assert not py.client.is_connected
        assert reasons["missing"].startswith("a token is required")
        assert reasons["forged"] == "Failed to validate JWT signature"
        assert reasons["expired"].startswith("InvalidJWTToken: Token has expired")
        # ...and with a valid apikey, set_auth with a bad token: the join is refused.
        py = scene.python(server, "py-forged-user", apikey=anon_key())
        await py.client.set_auth(forged())
        assert await py.join() == ("CHANNEL_ERROR", {"reason": "Failed to validate JWT signature"})
        py = scene.python(server, "py-expired-user", apikey=anon_key())
        await py.client.set_auth(expired())
        status, detail = await py.join()
        assert status == "CHANNEL_ERROR"
        assert detail["reason"].startswith("InvalidJWTToken: Token has expired")

        # Nobody got in, and every case was answered at once (no client waited it out).
        assert server.tracker.list(TOPIC) == {}
        assert time.monotonic() - started < WAIT

    run(node, scenario)


# -- 4: a token expiring mid-session; a refreshed one ------------------------------------------


def test_an_expiring_token_closes_the_channel_within_a_second_and_a_refreshed_one_stays(
    node: AuthNode,
) -> None:
    async def scenario(scene: Scene) -> None:
        server = await scene.server(verifier=VERIFIER, key_claim="sub")
        base = base_of(server)
        watcher = node.client("watcher")  # phoenix.js, a long-lived token
        alice, bob = node.client("alice"), node.client("bob")  # realtime-js
        erin = node.client("erin")  # phoenix.js, a short socket token
        await watcher.open_phoenix(base, token("watcher"))
        await alice.open_realtime(base, apikey=anon_key())
        await bob.open_realtime(base, apikey=anon_key())
        carol = scene.python(server, "carol", apikey=anon_key())  # expires
        dave = scene.python(server, "dave", apikey=anon_key())  # refreshes

        # Tokens that expire 2.5 to 3.5 s from now (exp is whole seconds).
        exp = math.ceil(time.time() + 2.5)

        def short(sub: str) -> str:
            return token(sub, exp=exp)

        await alice.set_auth(short("alice"))
        await bob.set_auth(short("bob"))
        await erin.open_phoenix(base, short("erin"))
        await carol.client.set_auth(short("carol"))
        await dave.client.set_auth(short("dave"))

        assert (await watcher.join())[0] == "ok"
        for js in (alice, bob, erin):
            assert (await js.join())[0] == "ok"
            assert await js.track({"name": js.name}) == "ok"
        for py in (carol, dave):
            assert (await py.join())[0] == "SUBSCRIBED"
            await py.channel.track({"name": py.name})
        everyone = ("alice", "bob", "carol", "dave", "erin")
        await converge([watcher, dave], {n: [{"name": n}] for n in everyone})

        # bob and dave refresh in time: realtime-js pushes access_token on setAuth, the
        # Python client on set_auth.
        assert time.time() < exp - 0.5, "the setup took too long for the token's lifetime"
        await bob.set_auth(token("bob"))
        await dave.client.set_auth(token("dave"))

        # At exp: a system error, then phx_close, within a second, for each expiring one.
        survivors = {n: [{"name": n}] for n in ("bob", "dave")}
        await eventually(
            lambda: watcher.state() == survivors and dave.state() == survivors,
            "alice, carol and erin to leave",
            watcher,
            dave,
            timeout=exp - time.time() + 3,
        )
        for js in (alice, erin):
            (system,) = js.events("system")
            assert system["payload"]["status"] == "error"
            assert system["payload"]["message"].startswith("InvalidJWTToken: Token has expired")
            closed = [e for e in js.events("channel") if e["status"] in ("CLOSED", "close")]
            assert len(closed) == 1, js.events("channel")
            assert exp <= system["t"] <= closed[0]["t"] < exp + 1.0, (exp, system, closed)
        ((errored_at, _, detail),) = carol.of("CHANNEL_ERROR")
        ((closed_at, _, _),) = carol.of("CLOSED")
        assert detail["status"] == "error" and detail["extension"] == "system"
        assert detail["message"].startswith("InvalidJWTToken: Token has expired")
        assert exp <= errored_at <= closed_at < exp + 1.0, (exp, carol.statuses)
        assert not carol.channel.is_joined

        # The refreshed ones are still on past the old exp (and past the server's tick).
        await asyncio.sleep(max(0.0, exp + 1.2 - time.time()))
        assert await bob.channel_state() == "joined"
        assert [e["status"] for e in bob.events("channel")] == ["SUBSCRIBED"]
        assert bob.events("system") == []
        assert dave.channel.is_joined and dave.of("CLOSED") == []
        assert dave.of("CHANNEL_ERROR") == []
        assert sorted(server.tracker.list(TOPIC)) == ["bob", "dave"]
        assert watcher.state() == survivors and bob.state() == survivors

    run(node, scenario)


# -- 5: private channels ---------------------------------------------------------------------


def alice_only(claims: Mapping[str, Any], topic: str) -> Access:
    """The policy: everything for alice, nothing for anyone else."""
    return Access.ALL if claims.get("sub") == "alice" else Access.NONE


def test_private_channels_are_refused_without_a_policy_and_follow_one(node: AuthNode) -> None:
    async def scenario(scene: Scene) -> None:
        bare = await scene.server(verifier=VERIFIER, key_claim="sub")
        guarded = await scene.server(verifier=VERIFIER, key_claim="sub", policy=alice_only)

        # Without a policy: refused, with the reason the client shows.
        js = node.client("alice-bare")
        await js.open_realtime(base_of(bare), apikey=anon_key(), user=token("alice"))
        status, reason = await js.join(private=True)
        assert status == "CHANNEL_ERROR" and "need a policy" in reason, reason
        await js.leave()
        py = scene.python(bare, "alice-bare-py", apikey=anon_key())
        await py.client.set_auth(token("alice"))
        status, detail = await py.join(private=True)
        assert status == "CHANNEL_ERROR" and "need a policy" in detail["reason"], detail
        assert bare.tracker.list(TOPIC) == {}

        # With the policy: alice in (through both clients), eve refused.
        base = base_of(guarded)
        alice_js, eve_js = node.client("alice"), node.client("eve")
        await alice_js.open_realtime(base, apikey=anon_key(), user=token("alice"))
        await eve_js.open_realtime(base, apikey=anon_key(), user=token("eve"))
        alice_py = scene.python(guarded, "alice-py", apikey=anon_key())
        eve_py = scene.python(guarded, "eve-py", apikey=anon_key())
        await alice_py.client.set_auth(token("alice"))
        await eve_py.client.set_auth(token("eve"))

        denied = "Unauthorized: You do not have permissions to read from this Channel topic: "
        assert await alice_js.join(private=True) == ("ok", None)
        assert await alice_py.join(private=True) == ("SUBSCRIBED", None)
        status, reason = await eve_js.join(private=True)
        assert status == "CHANNEL_ERROR" and reason.startswith(denied), reason
        status, detail = await eve_py.join(private=True)
        assert status == "CHANNEL_ERROR" and detail["reason"].startswith(denied), detail
        await eve_js.leave()

        assert await alice_js.track({"via": "realtime-js"}) == "ok"
        await alice_py.channel.track({"via": "python"})

        def vias(client: Client) -> list[str]:
            return sorted(meta["via"] for meta in client.state().get("alice", []))

        await eventually(
            lambda: all(vias(c) == ["python", "realtime-js"] for c in (alice_js, alice_py)),
            "both alices to see both",
            alice_js,
            alice_py,
        )
        # A private channel's presences live apart from the public channel of its name.
        assert list(guarded.tracker.list(PRIVATE_PREFIX + TOPIC)) == ["alice"]
        assert guarded.tracker.list(TOPIC) == {}
        assert eve_js.events("sync") == [] and eve_py.state() == {}

    run(node, scenario)
