"""The cluster-aware connection (presence_core.store.cluster) against a real Valkey cluster.

Each cluster test gets a fresh 3-master, 3-replica cluster (`valkey_cluster`, about 2 s to
build), moves slots and kills nodes with the server's own commands, and checks what the
connection sent with plain per-node redis-py clients: a key read from its owner directly is
where the connection put it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from redis.crc import key_slot
from servers import ValkeyCluster, ValkeyServer, free_port

from presence_core.errors import PresenceValueError
from presence_core.store import (
    ClusterConnection,
    StoreCommandError,
    StoreConnectionError,
)

T = TypeVar("T")

GET_SCRIPT = "return redis.call('GET', KEYS[1])"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 45))


def node_at(cluster: ValkeyCluster, address: str) -> ValkeyServer:
    port = int(address.rpartition(":")[2])
    return next(node for node in cluster.nodes if node.port == port)


def keys_owned_by(conn: ClusterConnection, address: str, count: int, kind: str = "k") -> list[str]:
    """`count` keys, each in its own slot, whose slots belong to `address`."""

    def candidates() -> Iterator[str]:
        i = 0
        while True:
            yield f"{{{kind}{i}}}:v"
            i += 1

    found: list[str] = []
    for key in candidates():
        if conn.node_for(key.encode()) == address:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


def node_id(cluster: ValkeyCluster, node: ValkeyServer) -> str:
    return cluster.node_ids[node.port]


def start_migration(
    cluster: ValkeyCluster, slot: int, source: ValkeyServer, dest: ValkeyServer
) -> None:
    """Put `slot` in importing state on `dest`, then migrating state on `source`."""
    with dest.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(cluster, source))
    with source.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(cluster, dest))


def migrate_keys(source: ValkeyServer, dest: ValkeyServer, keys: list[str]) -> None:
    with source.client() as client:
        client.execute_command("MIGRATE", dest.host, dest.port, "", 0, 5000, "KEYS", *keys)


def finish_migration(cluster: ValkeyCluster, slot: int, dest: ValkeyServer) -> None:
    """``SETSLOT NODE`` on the new owner first, then on every other master."""
    masters = cluster.masters()
    for node in [dest, *(m for m in masters if m.port != dest.port)]:
        with node.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(cluster, dest))


# Routing


def test_pipeline_spans_every_primary_and_keeps_the_callers_order(
    valkey_cluster: ValkeyCluster,
) -> None:
    async def main() -> dict[str, str]:
        async with await ClusterConnection.connect(valkey_cluster.url) as conn:
            assert len(conn.primaries) == 3 and not conn.is_closed
            assert "3 primaries, open" in repr(conn)
            keys = [f"{{tag{i}}}:key" for i in range(200)]
            assert {conn.node_for(key.encode()) for key in keys} == set(conn.primaries)
            # Writes and reads interleaved: a read after a write of the same key sees it.
            commands: list[tuple[Any, ...]] = []
            for i, key in enumerate(keys):
                commands += [("SET", key, f"value-{i}"), ("GET", key)]
            replies = await conn.pipeline(commands)
            assert replies[0::2] == [b"OK"] * 200
            assert replies[1::2] == [f"value-{i}".encode() for i in range(200)]
            # Keyless commands go to one primary; bytes, str and int arguments route alike.
            assert await conn.pipeline([("PING",), (b"GET", keys[7].encode()), ("ECHO", 5)]) == [
                b"PONG",
                b"value-7",
                b"5",
            ]
            info = await conn.execute(b"COMMAND", b"INFO", b"HSETEX")
            assert info[0] is not None
            assert conn.in_flight == 0 and conn.redirects == 0 and conn.refreshes == 0

            # The nodes' pipelines run concurrently: one 0.5 s BLPOP per primary takes ~0.5 s,
            # not 1.5 s.
            blocking = [keys_owned_by(conn, address, 1, "block")[0] for address in conn.primaries]
            started = time.monotonic()
            assert await conn.pipeline([("BLPOP", key, 0.5) for key in blocking]) == [None] * 3
            assert time.monotonic() - started < 1.2

            return {key: conn.node_for(key.encode()) for key in keys}

    owners = run(main())
    # Each key is on the primary that owns its slot: read there without any redirection.
    for key, address in owners.items():
        with node_at(valkey_cluster, address).client() as client:
            assert client.get(key) == f"value-{key[4:-5]}"


def test_error_replies_keep_the_callers_positions(valkey_cluster: ValkeyCluster) -> None:
    async def main() -> None:
        async with await ClusterConnection.connect(valkey_cluster.url) as conn:
            first, second = (keys_owned_by(conn, a, 1, "str")[0] for a in conn.primaries[:2])
            await conn.pipeline([("SET", first, "x"), ("SET", second, "y")])
            commands: list[tuple[Any, ...]] = [("SET", f"{{e{i}}}", i) for i in range(60)]
            commands[17] = ("HSET", first, "f", "v")  # WRONGTYPE on one primary
            commands[41] = ("LPUSH", second, "v")  # WRONGTYPE on another
            with pytest.raises(StoreCommandError) as caught:
                await conn.pipeline(commands)
            error = caught.value
            assert (error.command, error.position) == ("HSET", 17)
            assert error.reply.startswith("WRONGTYPE") and "1 more error" in str(error)
            assert [(e.command, e.position) for e in error.errors] == [
                ("HSET", 17),
                ("LPUSH", 41),
            ]
            assert error.replies is not None and error.replies[17] is error
            assert error.replies[16] == b"OK" and error.replies[40] == b"OK"

            replies = await conn.pipeline(commands, raise_on_error=False)
            assert isinstance(replies[41], StoreCommandError) and replies[41].position == 41
            assert [r for i, r in enumerate(replies) if i not in (17, 41)] == [b"OK"] * 58
            with pytest.raises(StoreCommandError, match="WRONGTYPE") as caught:
                await conn.execute("HGETALL", first)
            assert caught.value.position == 0

            # Transactions cannot be spread over nodes: refused before anything is sent.
            with pytest.raises(PresenceValueError, match="MULTI"):
                await conn.pipeline([("SET", "{never}", 1), ("MULTI",)])
            assert await conn.execute("EXISTS", "{never}") == 0

    run(main())


def test_connect_errors(valkey: ValkeyServer, valkey_factory: Callable[..., ValkeyServer]) -> None:
    guarded = valkey_factory(password="s3cret")

    async def main() -> None:
        with pytest.raises(StoreConnectionError) as caught:
            await ClusterConnection.connect(f"redis://127.0.0.1:{free_port()}")
        assert caught.value.outcome_unknown is False
        with pytest.raises(StoreCommandError, match="not a cluster node"):
            await ClusterConnection.connect(valkey.url)
        with pytest.raises(StoreCommandError) as refused:
            await ClusterConnection.connect(f"redis://:wrong@{guarded.host}:{guarded.port}")
        assert refused.value.command == "AUTH" and "WRONGPASS" in refused.value.reply
        with pytest.raises(PresenceValueError):
            await ClusterConnection.connect(valkey.url, max_redirects=-1)
        with pytest.raises(PresenceValueError):
            await ClusterConnection.connect(valkey.url, retry_timeout=0)

    run(main())


def test_script_load_reaches_every_primary_and_evalsha_routes_by_first_key(
    valkey_cluster: ValkeyCluster,
) -> None:
    async def main() -> str:
        async with await ClusterConnection.connect(valkey_cluster.url) as conn:
            sha = await conn.execute("SCRIPT", "LOAD", GET_SCRIPT)
            keys = [key for address in conn.primaries for key in keys_owned_by(conn, address, 5)]
            await conn.pipeline([("SET", key, key) for key in keys])
            replies = await conn.pipeline(
                [("EVALSHA", sha, 1, key) for key in keys] + [("EVAL", "return ARGV[1]", 0, "z")]
            )
            # No NOSCRIPT anywhere, and every key read on its own primary (no CROSSSLOT/MOVED).
            assert replies == [key.encode() for key in keys] + [b"z"]
            assert conn.redirects == 0
            return str(sha.decode())

    sha = run(main())
    for master in valkey_cluster.masters():
        with master.client() as client:
            assert client.execute_command("SCRIPT", "EXISTS", sha) == [1]


# Redirections


def test_moved_after_a_slot_migration_refreshes_the_map(valkey_cluster: ValkeyCluster) -> None:
    async def main() -> None:
        async with await ClusterConnection.connect(valkey_cluster.url) as conn:
            source, dest = conn.primaries[0], conn.primaries[1]
            moving = keys_owned_by(conn, source, 3, "mv")
            staying = [keys_owned_by(conn, address, 3, "st") for address in conn.primaries]
            await conn.pipeline([("SET", key, key) for key in moving])
            slot = key_slot(moving[0].encode())

            src_node, dest_node = node_at(valkey_cluster, source), node_at(valkey_cluster, dest)
            start_migration(valkey_cluster, slot, src_node, dest_node)
            migrate_keys(src_node, dest_node, [moving[0]])
            finish_migration(valkey_cluster, slot, dest_node)

            # The connection's map still says `source`: it learns from MOVED, mid-pipeline.
            assert conn.node_for(moving[0].encode()) == source
            others = [key for group in staying for key in group]
            commands = [("GET", moving[0]), *(("SET", key, 1) for key in others)]
            commands.append(("SET", moving[0], "new"))
            replies = await conn.pipeline(commands)
            assert replies == [moving[0].encode(), *([b"OK"] * len(others)), b"OK"]
            assert conn.redirects == 2 and conn.refreshes == 1
            assert conn.node_for(moving[0].encode()) == dest
            # Untouched slots never moved, so no further redirection.
            assert await conn.execute("GET", moving[1]) == moving[1].encode()
            assert conn.redirects == 2

    run(main())


def test_ask_during_a_migration_and_the_redirect_bound(valkey_cluster: ValkeyCluster) -> None:
    async def main() -> None:
        async with await ClusterConnection.connect(valkey_cluster.url, max_redirects=3) as conn:
            source, dest = conn.primaries[0], conn.primaries[2]
            src_node, dest_node = node_at(valkey_cluster, source), node_at(valkey_cluster, dest)
            tag = keys_owned_by(conn, source, 1, "ask")[0].split("}")[0] + "}"
            moved_key, kept_key, new_key = f"{tag}:a", f"{tag}:b", f"{tag}:c"
            await conn.pipeline([("SET", moved_key, "a"), ("SET", kept_key, "b")])
            slot = key_slot(moved_key.encode())
            start_migration(valkey_cluster, slot, src_node, dest_node)
            migrate_keys(src_node, dest_node, [moved_key])

            replies = await conn.pipeline(
                [("GET", moved_key), ("GET", kept_key), ("SET", new_key, "c"), ("GET", new_key)]
            )
            assert replies == [b"a", b"b", b"OK", b"c"]
            # The moved key, and the new key twice: ASK, never a map refresh.
            assert conn.redirects == 3 and conn.refreshes == 0
            assert conn.node_for(moved_key.encode()) == source
            with dest_node.client() as client:  # the target holds both, behind ASKING
                pipe = client.pipeline(transaction=False)
                pipe.execute_command("ASKING").get(moved_key)
                pipe.execute_command("ASKING").get(new_key)
                assert pipe.execute() == [True, "a", True, "c"]
            with src_node.client() as client:
                # Only the key that was not migrated is left on the source.
                assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
                assert client.get(kept_key) == "b"

            # A slot migrating on one side only: the source says ASK, the target (not
            # importing) says MOVED back.  The loop stops after max_redirects + 1 redirections,
            # the last redirection in the command's place; the other commands are answered.
            other = keys_owned_by(conn, source, 1, "loop")[0]
            loop_slot = key_slot(other.encode())
            with src_node.client() as client:
                client.execute_command(
                    "CLUSTER", "SETSLOT", loop_slot, "MIGRATING", node_id(valkey_cluster, dest_node)
                )
            before = conn.redirects
            replies = await conn.pipeline([("GET", other), ("GET", kept_key)], raise_on_error=False)
            assert isinstance(replies[0], StoreCommandError)
            assert replies[0].reply.split()[0] in ("ASK", "MOVED") and replies[0].position == 0
            assert replies[1] == b"b"
            assert conn.redirects - before == 4

    run(main())


# Failures


def test_failover_writes_succeed_on_the_promoted_replica(valkey_cluster: ValkeyCluster) -> None:
    async def main() -> None:
        async with await ClusterConnection.connect(valkey_cluster.url, retry_timeout=15) as conn:
            sha = await conn.execute("SCRIPT", "LOAD", GET_SCRIPT)
            victim = node_at(valkey_cluster, conn.primaries[0])
            by_primary = {a: keys_owned_by(conn, a, 10, "fo") for a in conn.primaries}
            keys = [key for group in by_primary.values() for key in group]
            await conn.pipeline([("SET", key, "before") for key in keys])

            killed, replica = valkey_cluster.kill_master(victim)
            started = time.monotonic()
            replies = await conn.pipeline([("SET", key, "after") for key in keys])
            elapsed = time.monotonic() - started
            assert replies == [b"OK"] * len(keys)
            assert elapsed < 15
            assert conn.refreshes >= 1
            lost = by_primary[f"{killed.host}:{killed.port}"]
            assert conn.node_for(lost[0].encode()) == f"{replica.host}:{replica.port}"
            assert killed.port not in {int(a.rpartition(":")[2]) for a in conn.primaries}

            assert await conn.pipeline([("GET", key) for key in keys]) == [b"after"] * len(keys)
            # The promoted replica had no script cache: the connection loaded what it knew.
            evals = await conn.pipeline([("EVALSHA", sha, 1, key) for key in lost])
            assert evals == [b"after"] * len(lost)
            print(f"failover absorbed in {elapsed:.2f} s, {conn.refreshes} refreshes")

            with replica.client() as client:
                assert client.execute_command("ROLE")[0] == "master"
                assert [client.get(key) for key in lost] == ["after"] * len(lost)

    run(main())


def test_every_node_dead_raises_within_retry_timeout(valkey_cluster: ValkeyCluster) -> None:
    async def main() -> None:
        conn = await ClusterConnection.connect(valkey_cluster.url, retry_timeout=1.0)
        keys = [f"{{dead{i}}}" for i in range(30)]
        assert await conn.pipeline([("SET", key, 1) for key in keys]) == [b"OK"] * 30
        for node in valkey_cluster.nodes:
            node.kill()
        await asyncio.sleep(0.1)  # the connections see their sockets close
        assert conn.is_closed  # no primary can be used, though close() was not called
        started = time.monotonic()
        with pytest.raises(StoreConnectionError) as caught:
            await conn.pipeline([("SET", key, 2) for key in keys])
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 2.5, elapsed
        # Every attempt failed before writing anything: nothing can have been applied.
        assert caught.value.outcome_unknown is False
        assert "1.0 s passed" in str(caught.value)

        conn.close()
        started = time.monotonic()
        with pytest.raises(StoreConnectionError, match="closed") as caught:
            await conn.execute("PING")
        assert caught.value.outcome_unknown is False and time.monotonic() - started < 0.1
        assert "closed" in repr(conn)

    run(main())
