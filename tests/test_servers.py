"""The test servers themselves (tests/servers.py): they start, answer, fail over and go away."""

from __future__ import annotations

import time

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from servers import CLUSTER_SLOTS, MAX_PORT, ValkeyCluster, ValkeyServer, pid_alive, running


def test_server_starts_answers_and_is_gone_after_stop() -> None:
    server = ValkeyServer()
    with running(server):
        pid = server.pid
        assert pid_alive(pid)
        assert server.port <= MAX_PORT
        with server.client() as client:
            assert client.ping()
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("save")["save"] == ""
            assert client.config_get("appendonly")["appendonly"] == "no"
            version = client.info("server")["valkey_version"]
            assert tuple(int(part) for part in version.split(".")[:2]) >= (9, 1)
    assert not pid_alive(pid)
    assert not server.dir.exists()


def test_server_is_stopped_when_the_block_fails() -> None:
    server = ValkeyServer()
    with pytest.raises(ZeroDivisionError), running(server):
        pid = server.pid
        1 / 0  # noqa: B018
    assert not pid_alive(pid)


def test_kill_and_restart_empty_on_the_same_port(valkey: ValkeyServer) -> None:
    with valkey.client() as client:
        client.set("servers:restart", "1")
    port, old_pid = valkey.port, valkey.pid
    try:
        valkey.kill()
        assert not pid_alive(old_pid)
        with pytest.raises(redis.ConnectionError), valkey.client() as client:
            client.ping()
    finally:
        valkey.restart()
    assert valkey.port == port and valkey.pid != old_pid
    with valkey.client() as client:
        assert client.get("servers:restart") is None


def test_password(valkey_factory: object) -> None:
    assert callable(valkey_factory)
    server = valkey_factory(password="s3cret")
    with server.client(password=None) as client, pytest.raises(redis.AuthenticationError):
        client.ping()
    with redis.Redis.from_url(server.url) as client:
        assert client.ping()


def test_cluster_is_healthy_and_survives_a_master_kill(valkey_cluster: ValkeyCluster) -> None:
    cluster = valkey_cluster
    assert len(cluster.masters()) == 3
    assert len(cluster.replicas()) == 3
    info = cluster.nodes[0].client().execute_command("CLUSTER", "INFO")
    assert "cluster_state:ok" in info
    assert "cluster_slots_assigned:16384" in info
    assert "cluster_slots_ok:16384" in info

    nodes = [ClusterNode(host, port) for host, port in cluster.startup_nodes]
    client = RedisCluster(startup_nodes=nodes, decode_responses=True, protocol=2)
    try:
        covered = sum(end - start + 1 for start, end in _slot_ranges(client))
        assert covered == CLUSTER_SLOTS
        keys = [f"servers:{{t{i}}}" for i in range(200)]
        for key in keys:
            client.set(key, key)
        # Every master has passed its writes to its replica before the kill.
        for master in cluster.masters():
            with master.client() as direct:
                assert direct.execute_command("WAIT", 1, 2000) == 1

        killed, replica = cluster.kill_master()
        assert not pid_alive(killed.pid)
        started = time.monotonic()
        cluster.wait_promotion(replica)
        failover = time.monotonic() - started
        assert failover < 10, failover
        assert replica in cluster.masters()
        assert len(cluster.masters()) == 3
    finally:
        client.close()

    # A new client sees the new map, every slot is served and nothing written was lost.
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes],
        decode_responses=True,
        protocol=2,
    )
    try:
        client.set("servers:after", "1")
        assert client.get("servers:after") == "1"
        assert [client.get(key) for key in keys] == keys
        assert sum(end - start + 1 for start, end in _slot_ranges(client)) == CLUSTER_SLOTS
    finally:
        client.close()


def _slot_ranges(client: RedisCluster) -> list[tuple[int, int]]:
    slots = client.execute_command("CLUSTER SLOTS", target_nodes=RedisCluster.RANDOM)
    return [(int(entry[0]), int(entry[1])) for entry in slots]
