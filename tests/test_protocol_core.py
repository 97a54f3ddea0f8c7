"""The protocol core (`presence_core.protocol.PhoenixCore`) without sockets or an event loop:
messages in, actions out, time passed in (virtual: a test jumps it), as websockets', h11's and
aioquic's cores are tested.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from presence_core import Access, JwtVerifier, Tracker
from presence_core.protocol import (
    Close,
    Defer,
    Fanout,
    PhoenixCore,
    Refused,
    Send,
    ServerLimits,
    Session,
)

SECRET = "core-test-secret-of-thirty-two-bytes!!"
T0 = 1_800_000_000.0  # the tests' virtual Unix time


def token(sub: str, exp: float, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(exp), "role": "authenticated", **claims}, SECRET)


def core(**kwargs: Any) -> PhoenixCore:
    return PhoenixCore(Tracker(connection_ttl=60.0), **kwargs)


def opened(c: PhoenixCore, sid: int, query: str = "vsn=2.0.0", **kw: Any) -> Session:
    s = Session(sid)
    assert c.authenticate(s, origin=None, api_key=None, query=query, now=T0, **kw) is None
    c.connect(s, T0)
    return s


def push(s: Session, topic: str, event: str, payload: Any, ref: str = "1") -> bytes:
    return json.dumps(["1", ref, topic, event, payload]).encode()


def sent(actions: list[Any], to: Session | None = None) -> list[list[Any]]:
    """The messages `Send` actions carry (to one session), decoded."""
    return [
        json.loads(a.data) for a in actions if type(a) is Send and (to is None or a.session is to)
    ]


def join(
    c: PhoenixCore, s: Session, topic: str, key: str = "", now: float = T0, **cfg: Any
) -> list[Any]:
    payload: dict[str, Any] = {"config": {"presence": {"key": key}, **cfg}}
    c.receive(s, push(s, topic, "phx_join", payload), False, now)
    return c.take_actions()


def test_a_join_is_answered_then_the_state_follows_in_order() -> None:
    c = core()
    s = opened(c, 1)
    out = sent(join(c, s, "room", "alice"))
    assert [m[3] for m in out] == ["phx_reply", "presence_state"]
    assert out[0][4] == {"status": "ok", "response": {"postgres_changes": []}}
    assert c.take_actions() == []  # pulled once


def test_a_track_reaches_other_members_as_one_fanout_per_version_at_the_flush() -> None:
    c = core()
    a, b, v1 = opened(c, 1), opened(c, 2), opened(c, 3, query="vsn=1.0.0")
    for s, key in ((a, "a"), (b, "b")):
        join(c, s, "room", key)
    c.receive(
        v1,
        json.dumps(
            {
                "topic": "room",
                "event": "phx_join",
                "ref": "1",
                "payload": {"config": {"presence": {"key": "c"}}},
            }
        ).encode(),
        False,
        T0,
    )
    c.take_actions()
    track = {"type": "presence", "event": "track", "payload": {"s": 1}}
    c.receive(a, push(a, "room", "presence", track, "2"), False, T0)
    assert [m[4]["status"] for m in sent(c.take_actions(), a)] == ["ok"]
    assert c.flush(T0) == 1
    fanouts = [x for x in c.take_actions() if type(x) is Fanout]
    assert {(x.v1 is None, x.v2 is None) for x in fanouts} == {(False, True), (True, False)}
    v2 = next(x for x in fanouts if x.v2 is not None)
    assert set(v2.targets) == {a, b} and json.loads(v2.v2)[3] == "presence_diff"


def test_a_message_that_is_not_phoenix_closes_with_1007_and_leaves() -> None:
    c = core()
    s = opened(c, 1)
    join(c, s, "room", "a")
    c.receive(s, b"not json", False, T0)
    (close,) = c.take_actions()
    assert type(close) is Close and close.code == 1007 and close.fail
    assert close.reason.startswith("not a Phoenix message")
    assert 1 not in c.sessions and "room" not in c.topics
    c.receive(s, push(s, "room", "phx_join", {}), False, T0)  # nothing after the close
    assert c.take_actions() == []


def test_a_bug_closes_only_its_socket_with_1011_and_no_details(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = core()
    s, _other = opened(c, 1), opened(c, 2)

    def broken(*args: Any) -> None:
        raise KeyError("secret detail")

    monkeypatch.setattr(c, "_join", broken)
    c.receive(s, push(s, "room", "phx_join", {}), False, T0)
    (close,) = c.take_actions()
    assert (close.code, close.reason) == (1011, "internal error")
    assert 2 in c.sessions and 1 not in c.sessions
    assert "handling a message failed" in caplog.text


def test_every_byte_split_of_a_binary_push_is_refused_or_relayed_never_raised() -> None:
    """Binary pushes are peer input: any prefix of a valid one closes the socket with 1007."""
    c = core()
    topic = b"room"
    body = b'{"x":1}'
    frame = bytes([3, 1, 1, len(topic), 2, 0, 1]) + b"11" + topic + b"hi" + body
    for cut in range(len(frame)):
        s = opened(c, 100 + cut)
        join(c, s, "room", f"k{cut}")
        c.receive(s, frame[:cut], True, T0)
        actions = c.take_actions()
        assert all(type(a) in (Send, Fanout, Close) for a in actions)
        if cut < 7 + 2 + len(topic) + 2:
            assert [type(a) for a in actions] == [Close] and actions[0].code == 1007


def test_timers_are_asked_of_the_core_and_a_token_closes_its_channel_at_exp() -> None:
    verifier = JwtVerifier(secret=SECRET)
    c = core(verifier=verifier, key_claim="sub")
    s = Session(1)
    tok = token("alice", T0 + 30)
    assert c.authenticate(s, origin=None, api_key=tok, query="vsn=2.0.0", now=T0) is None
    c.connect(s, T0)
    assert sent(join(c, s, "room"))[0][4]["status"] == "ok"
    assert c.next_deadline() <= T0 + 30
    c.handle_timer(T0 + 29.9)
    assert "room" in s.channels
    c.handle_timer(T0 + 30.0)
    out = sent(c.take_actions(), s)
    assert [m[3] for m in out] == ["system", "phx_close"]
    assert out[0][4]["message"].startswith("InvalidJWTToken: Token has expired")
    assert "room" not in s.channels and 1 in c.sessions  # the socket stays


def test_a_silent_connection_is_closed_with_1011_when_the_tracker_expires_it() -> None:
    now = [0.0]
    c = PhoenixCore(Tracker(connection_ttl=5.0, clock=lambda: now[0]))
    s = opened(c, 1)
    join(c, s, "room", "a")
    now[0] = 6.0
    c.handle_timer(T0 + 6.0)
    (close,) = c.take_actions()
    assert type(close) is Close and (close.code, close.reason) == (1011, "no heartbeat")
    assert 1 not in c.sessions


def test_an_async_hook_defers_and_later_messages_wait_in_order() -> None:
    c = core(auth=lambda tok, topic: True if topic is None else _pending())
    s = opened(c, 1)
    c.receive(s, push(s, "room", "phx_join", {}, "1"), False, T0)
    (defer,) = c.take_actions()
    assert type(defer) is Defer and s.waiting is not None
    defer.awaitable.close()  # type: ignore[attr-defined]  # the door would await it
    c.receive(s, push(s, "phoenix", "heartbeat", {}, "2"), False, T0)  # waits, in order
    assert c.take_actions() == []
    c.settle(s, True, now=T0 + 1)
    out = sent(c.take_actions(), s)
    assert [(m[1], m[3]) for m in out] == [
        ("1", "phx_reply"),
        (None, "presence_state"),
        ("2", "phx_reply"),
    ]
    assert s.waiting is None and s.backlog is None


def test_a_hook_that_fails_refuses_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    c = core(auth=lambda tok, topic: True if topic is None else _pending())
    s = opened(c, 1)
    c.receive(s, push(s, "room", "phx_join", {}), False, T0)
    (defer,) = c.take_actions()
    defer.awaitable.close()  # type: ignore[attr-defined]
    c.settle(s, error=RuntimeError("boom"), now=T0)
    (m,) = sent(c.take_actions(), s)
    assert m[4] == {"status": "error", "response": {"reason": "Unauthorized"}}
    assert "failed; refusing" in caplog.text
    c2 = core(auth=lambda tok, topic: True if topic is None else _pending())
    s2 = opened(c2, 1)
    c2.receive(s2, push(s2, "room", "phx_join", {}), False, T0)
    c2.take_actions()[0].awaitable.close()  # type: ignore[union-attr]
    c2.settle(s2, error=Refused("no"), now=T0)
    assert sent(c2.take_actions(), s2)[0][4]["status"] == "error"


async def _wait() -> bool:
    return True


def _pending() -> Any:
    return _wait()


def test_a_host_chosen_key_binds_every_channel_of_the_socket() -> None:
    c = core()
    s = Session(1)
    c.authenticate(s, origin=None, api_key=None, query="vsn=2.0.0", now=T0)
    s.key = "alice"
    c.connect(s, T0)
    out = sent(join(c, s, "room", "mallory"))
    assert out[0][4]["status"] == "error"
    assert "chose this socket's presence key" in out[0][4]["response"]["reason"]
    assert sent(join(c, s, "room", ""))[0][4]["status"] == "ok"
    track = {"type": "presence", "event": "track", "payload": {}}
    c.receive(s, push(s, "room", "presence", track, "2"), False, T0)
    c.take_actions()
    assert list(c.tracker.list("room")) == ["alice"]


def test_the_handshake_refusals_are_data() -> None:
    c = core(verifier=JwtVerifier(secret=SECRET), allowed_origins=["https://app.example"])
    s = Session(1)
    refusal = c.authenticate(s, origin="https://evil.example", api_key=None, query="", now=T0)
    assert refusal is not None and refusal.status == 403
    refusal = c.authenticate(s, origin=None, api_key=None, query="", now=T0)
    assert refusal is not None and refusal.status == 401
    refusal = c.authenticate(s, origin=None, api_key="x.y.z", query="", now=T0)
    assert refusal is not None and refusal.status == 401 and s.token is None
    ok = token("bob", T0 + 60)
    assert (
        c.authenticate(
            s, origin="https://app.example/", api_key=None, query=f"apikey={ok}&vsn=2.0.0", now=T0
        )
        is None
    )
    assert s.version == 2 and s.verified is not None and s.verified.claims["sub"] == "bob"


def test_a_private_channel_asks_the_policy_with_the_claims() -> None:
    seen: list[tuple[Any, str]] = []

    def policy(claims: Any, topic: str) -> Access:
        seen.append((claims.get("sub"), topic))
        return Access(
            presence_read=True, presence_write=False, broadcast_read=True, broadcast_write=False
        )

    c = core(verifier=JwtVerifier(secret=SECRET), key_claim="sub", policy=policy)
    s = Session(1)
    c.authenticate(s, origin=None, api_key=token("eve", T0 + 60), query="vsn=2.0.0", now=T0)
    c.connect(s, T0)
    assert sent(join(c, s, "vault", private=True))[0][4]["status"] == "ok"
    assert seen == [("eve", "vault")]
    track = {"type": "presence", "event": "track", "payload": {}}
    c.receive(s, push(s, "vault", "presence", track, "2"), False, T0)
    (m,) = sent(c.take_actions(), s)
    assert m[4]["status"] == "error"  # read-only


def test_limits_are_the_cores() -> None:
    c = core(limits=ServerLimits(max_topics_per_connection=2, joins_per_second=100))
    s = opened(c, 1)
    for topic in ("a", "b"):
        assert sent(join(c, s, topic))[0][4]["status"] == "ok"
    reason = sent(join(c, s, "c"))[0][4]["response"]["reason"]
    assert reason == "ChannelRateLimitReached: Too many channels"


def test_the_storm_paces_flushes_in_virtual_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from presence_core.protocol import core as core_module

    monkeypatch.setattr(core_module, "_STORM_SOCKETS", 4.0)  # 1 socket in 0.25 s
    c = core(limits=ServerLimits(joins_per_second=1000))
    assert c.flush_at() == 0.0
    c.handle_timer(T0)  # the first window starts
    for i in range(10):
        join(c, opened(c, 10 + i), "room", f"k{i}")
    c.handle_timer(T0 + 0.25)  # they joined in this window...
    assert not c.storm
    c.handle_timer(T0 + 0.5)  # ...and stayed a window: a storm
    assert c.storm
    c.flush(T0 + 0.5)
    assert c.flush_at() == T0 + 1.0
    c.handle_timer(T0 + 0.75)
    c.handle_timer(T0 + 1.0)
    assert not c.storm and c.flush_at() == 0.0
