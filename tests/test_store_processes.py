"""Presence shared by separate OS processes through one real valkey-server.

Each process is `peer_worker.py` (a Tracker and a RedisStore with peers), driven over its
stdin/stdout, and stopped by its PID however the test ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import ValkeyServer, pid_alive, wait_until

from presence_core.store import Layout

WORKER = Path(__file__).with_name("peer_worker.py")
OPTIONS = {"liveness_timeout": 2.0, "probe_interval": 0.5, "reconcile_interval": 2.0}


class Peer:
    def __init__(self, url: str, node: str, options: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
        self.node = node
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), url, node, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert json.loads(self._readline()) == {"ready": True}

    def _readline(self) -> bytes:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.node} exited with {self.proc.wait(5)}")
        return line

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self._readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def peers(valkey: ValkeyServer) -> Iterator[Callable[..., Peer]]:
    started: list[Peer] = []
    valkey.client().flushall()

    def start(node: str, **options: Any) -> Peer:
        peer = Peer(valkey.url, node, {**OPTIONS, **options})
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            peer.close()
        assert not any(pid_alive(p.proc.pid) for p in started)


def members_in_redis(valkey: ValkeyServer) -> set[str]:
    """Every member's ref in Redis, from every topic's hash."""
    client = valkey.client()
    refs = set()
    for key in client.scan_iter(match="presence:{t:*}:m"):
        refs.update(field.split(" ", 1)[0] for field in client.hkeys(key))
    return refs


def refs_of(lists: dict[str, Any]) -> set[str]:
    return {
        meta["phx_ref"]
        for state in lists.values()
        for entry in state.values()
        for meta in entry["metas"]
    }


def normalised(lists: dict[str, Any]) -> dict[str, Any]:
    """Lists with each key's metas in ref order: the order of a key's metas is per process
    (its own presences are appended as they come, its peers' as their diffs arrive)."""
    return {
        topic: {
            key: sorted(entry["metas"], key=lambda meta: meta["phx_ref"])
            for key, entry in state.items()
        }
        for topic, state in lists.items()
    }


def random_ops(peer: Peer, rng: random.Random, n: int) -> None:
    conns = [f"{peer.node}-c{i}" for i in range(8)]
    topics = ["lobby", "room:{1}", "ünï\ncode", "*?[x]"]
    for _ in range(n):
        conn, topic = rng.choice(conns), rng.choice(topics)
        roll = rng.random()
        if roll < 0.55:
            peer.call(
                "track",
                conn=conn,
                topic=topic,
                key=rng.choice(["ann", "bo", "{cy}"]),
                meta={"v": rng.randrange(3)},
            )
        elif roll < 0.8:
            peer.call("untrack", conn=conn, topic=topic)
        else:
            peer.call("disconnect", conn=conn)


@pytest.mark.parametrize("layout", ["hash_ttl", "zset"])
def test_two_processes_converge_on_random_operations(
    peers: Callable[..., Peer], valkey: ValkeyServer, layout: str
) -> None:
    a, b = peers("proc-a", layout=layout), peers("proc-b", layout=layout)
    rng = random.Random(7)
    for _ in range(5):
        random_ops(a, rng, 40)
        random_ops(b, rng, 40)
    a.call("drain")
    b.call("drain")

    def converged() -> bool:
        sa, sb = a.call("state"), b.call("state")
        own = set(sa["own"]) | set(sb["own"])
        own = {json.loads(data)["phx_ref"] for data in own}
        same = normalised(sa["lists"]) == normalised(sb["lists"])
        return same and refs_of(sa["lists"]) == own

    wait_until(converged, 10, "both processes list the same presences")
    state = a.call("state")
    assert refs_of(state["lists"]) == members_in_redis(valkey)
    assert refs_of(state["lists"])  # the run left somebody present


def test_sigkill_leaves_reach_the_other_process_once_within_the_liveness_timeout(
    peers: Callable[..., Peer], valkey: ValkeyServer
) -> None:
    a, b = peers("proc-a"), peers("proc-b")
    refs = [
        a.call("track", conn=f"c{i}", topic=f"t{i % 3}", key=f"u{i}", meta={}) for i in range(30)
    ]
    b.call("track", conn="mine", topic="t0", key="stays", meta={})
    a.call("drain")
    wait_until(lambda: set(refs) <= refs_of(b.call("state")["lists"]), 10, "b sees a's presences")
    a.kill()
    killed = time.monotonic()
    wait_until(lambda: not set(refs) & refs_of(b.call("state")["lists"]), 10, "a's leaves at b")
    elapsed = time.monotonic() - killed
    # Liveness timeout 2 s, a check every 2/9 s; the slack covers the polling above.
    assert elapsed < OPTIONS["liveness_timeout"] + 1.5, elapsed
    wait_until(lambda: not set(refs) & members_in_redis(valkey), 5, "a's members reaped")
    time.sleep(OPTIONS["reconcile_interval"] + 0.5)  # a reconciliation cannot bring them back
    state = b.call("state")
    assert all(state["leaves"].get(ref) == 1 for ref in refs), state["leaves"]
    assert (
        refs_of(state["lists"])
        == members_in_redis(valkey)
        == {json.loads(d)["phx_ref"] for d in state["own"]}
    )
    assert not valkey.client().sismember(Layout().nodes_key, "proc-a")
    # The reaper recorded when a's users were last seen (a could not).
    assert all(valkey.client().get(Layout().last_seen_key(f"u{i}")) for i in range(30))


def test_graceful_stop_leaves_at_once(peers: Callable[..., Peer], valkey: ValkeyServer) -> None:
    a, b = peers("proc-a"), peers("proc-b")
    refs = [a.call("track", conn="c", topic=f"t{i}", key="ann", meta={}) for i in range(5)]
    a.call("drain")
    wait_until(lambda: set(refs) <= refs_of(b.call("state")["lists"]), 10, "b sees a's presences")
    a.call("stop")
    stopped = time.monotonic()
    wait_until(lambda: not set(refs) & refs_of(b.call("state")["lists"]), 5, "a's leaves at b")
    assert time.monotonic() - stopped < 1.0
    assert not members_in_redis(valkey)
    assert all(b.call("state")["leaves"].get(ref) == 1 for ref in refs)
