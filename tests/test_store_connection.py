"""The data plane's pipelined connection (presence_core.store.connection) against a real server."""

from __future__ import annotations

import asyncio
import pickle
import shutil
import ssl
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from servers import ValkeyServer, free_port

from presence_core.errors import PresenceValueError, StoreError
from presence_core.store import (
    CommandTemplate,
    ConnectionOptions,
    RedisConnection,
    StoreCommandError,
    StoreConnectionError,
    encode_command,
)

T = TypeVar("T")
Factory = Callable[..., ValkeyServer]

HSETEX = CommandTemplate("HSETEX", None, "PX", None, "FIELDS", "1", None, None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


# Encoding


def test_template_encodes_as_pack_command_does() -> None:
    assert HSETEX.name == "HSETEX" and HSETEX.arity == 4
    parts = (b"p:{room}:m", b"60000", "üser".encode(), b'{"a": "100%"}')
    expected = encode_command(["HSETEX", parts[0], "PX", parts[1], "FIELDS", 1, *parts[2:]])
    assert HSETEX.encode(*parts) == expected
    # A % in a constant part is not a format directive.
    template = CommandTemplate("SET", None, "100%d")
    assert template.encode(b"k") == encode_command(["SET", "k", "100%d"])
    assert CommandTemplate("PING").encode() == b"*1\r\n$4\r\nPING\r\n"
    with pytest.raises(PresenceValueError):
        CommandTemplate(None, "x")


# Options


def test_options_from_url() -> None:
    options = ConnectionOptions.from_url("redis://alice:p%40ss@example.org:7000/4")
    assert (options.host, options.port, options.db) == ("example.org", 7000, 4)
    assert (options.username, options.password, options.ssl) == ("alice", "p@ss", None)
    assert "p@ss" not in repr(options)

    options = ConnectionOptions.from_url("redis://:pw@localhost")
    assert (options.username, options.password, options.port, options.db) == (
        None,
        "pw",
        6379,
        0,
    )

    options = ConnectionOptions.from_url(
        "rediss://h:6380?ssl_cert_reqs=none&socket_timeout=2.5&socket_connect_timeout=1"
        "&client_name=worker-1"
    )
    assert isinstance(options.ssl, ssl.SSLContext)
    assert options.ssl.verify_mode == ssl.CERT_NONE and not options.ssl.check_hostname
    assert (options.reply_timeout, options.connect_timeout) == (2.5, 1.0)
    assert options.client_name == "worker-1"

    default_tls = ConnectionOptions.from_url("rediss://h")
    assert default_tls.ssl is not None and default_tls.ssl.verify_mode == ssl.CERT_REQUIRED
    mine = ssl.create_default_context()
    assert ConnectionOptions.from_url("rediss://h", ssl_context=mine).ssl is mine

    unix = ConnectionOptions.from_url("unix:///tmp/redis.sock?db=2")
    assert (unix.path, unix.db, unix.address) == ("/tmp/redis.sock", 2, "/tmp/redis.sock")

    with pytest.raises(PresenceValueError, match="unsupported"):
        ConnectionOptions.from_url("redis://h?protocol=3")
    with pytest.raises(PresenceValueError):
        ConnectionOptions.from_url("http://h")


# Pipelines


def test_pipeline_of_thousands_of_commands(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with await RedisConnection.connect(valkey.url) as conn:
            n = 5000
            sets = [("SET", f"conn:many:{i}", i) for i in range(n)]
            assert await conn.pipeline(sets) == [b"OK"] * n
            gets = [("GET", f"conn:many:{i}") for i in range(n)]
            assert await conn.pipeline(gets) == [str(i).encode() for i in range(n)]
            assert await conn.execute("DEL", *(f"conn:many:{i}" for i in range(n))) == n
            assert await conn.pipeline([]) == []

    run(main())


def test_template_pipeline_sets_field_ttls(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with await RedisConnection.connect(valkey.url) as conn:
            key = b"conn:{topic}:members"
            n = 20_000
            payload = [HSETEX.encode(key, b"60000", b"m%d" % i, b"{}") for i in range(n)]
            assert await conn.pipeline_encoded(payload, ["HSETEX"] * n) == [1] * n
            assert await conn.execute("HLEN", key) == n
            ttl = await conn.execute("HPTTL", key, "FIELDS", 1, "m7")
            assert 59_000 < ttl[0] <= 60_000
            # One payload may also be a single bytes, pieces need not align with commands.
            joined = b"".join(payload[:3])
            assert await conn.pipeline_encoded([joined[:5], joined[5:]], ["HSETEX"] * 3) == [1] * 3
            await conn.execute("DEL", key)

    run(main())


def test_an_error_is_tied_to_its_command_and_the_stream_stays_in_step(
    valkey: ValkeyServer,
) -> None:
    async def main() -> None:
        async with await RedisConnection.connect(valkey.url) as conn:
            await conn.execute("SET", "conn:str", "x")
            commands: list[tuple[Any, ...]] = [("SET", f"conn:e:{i}", i) for i in range(1000)]
            commands[500] = ("HSET", "conn:str", "f", "v")  # WRONGTYPE
            commands[700] = ("NOSUCHCOMMAND",)
            with pytest.raises(StoreCommandError) as caught:
                await conn.pipeline(commands)
            error = caught.value
            assert isinstance(error, StoreError)
            assert (error.command, error.position) == ("HSET", 500)
            assert error.reply.startswith("WRONGTYPE")
            assert "HSET (#500)" in str(error) and "1 more error" in str(error)
            assert [(e.command, e.position) for e in error.errors] == [
                ("HSET", 500),
                ("NOSUCHCOMMAND", 700),
            ]
            assert error.replies is not None and len(error.replies) == 1000
            assert error.replies[499] == b"OK" and error.replies[501] == b"OK"
            assert error.replies[500] is error
            # Every other command was applied, and the next batch gets its own replies.
            assert await conn.execute("GET", "conn:e:999") == b"999"
            assert await conn.pipeline([("ECHO", "a"), ("ECHO", "b")]) == [b"a", b"b"]

            replies = await conn.pipeline(commands, raise_on_error=False)
            assert isinstance(replies[500], StoreCommandError)
            assert replies[500].command == "HSET" and replies[500].position == 500
            assert replies[:500] == [b"OK"] * 500

            # The name given for an encoded command is the one reported.
            with pytest.raises(StoreCommandError) as caught:
                await conn.pipeline_encoded(
                    HSETEX.encode(b"conn:str", b"1000", b"f", b"v"), ["HSETEX"]
                )
            assert caught.value.command == "HSETEX" and caught.value.position == 0
            await conn.execute("DEL", "conn:str", *(f"conn:e:{i}" for i in range(1000)))

    run(main())


def test_concurrent_batches_each_get_their_own_replies(valkey: ValkeyServer) -> None:
    async def batch(conn: RedisConnection, b: int) -> None:
        replies = await conn.pipeline([("ECHO", f"{b}:{i}") for i in range(300)])
        assert replies == [f"{b}:{i}".encode() for i in range(300)]

    async def main() -> None:
        async with await RedisConnection.connect(valkey.url) as conn:
            await asyncio.gather(*(batch(conn, b) for b in range(40)))
            # A cancelled caller's replies are still consumed, not handed to the next batch.
            task = asyncio.create_task(conn.pipeline([("ECHO", "lost")] * 1000))
            await asyncio.sleep(0)
            task.cancel()
            assert await conn.execute("ECHO", "mine") == b"mine"
            assert task.cancelled() and conn.in_flight == 0

    run(main())


def test_command_errors_pickle() -> None:
    error = StoreCommandError("WRONGTYPE x", command="HSET", position=3)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.command, copy.position, copy.reply, str(copy)) == (
        StoreCommandError,
        "HSET",
        3,
        "WRONGTYPE x",
        str(error),
    )
    lost = pickle.loads(pickle.dumps(StoreConnectionError("gone", outcome_unknown=True)))
    assert type(lost) is StoreConnectionError and lost.outcome_unknown and lost.command is None


# Handshake: AUTH, SELECT


def test_password_and_acl_user(valkey_factory: Factory) -> None:
    server = valkey_factory(password="s3cret")
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "presence", "on", ">pw", "~conn:*", "+@all")
    base = f"{server.host}:{server.port}"

    async def main() -> None:
        async with await RedisConnection.connect(f"redis://:s3cret@{base}") as conn:
            assert await conn.execute("PING") == b"PONG"
        async with await RedisConnection.connect(f"redis://presence:pw@{base}") as conn:
            assert await conn.execute("ACL", "WHOAMI") == b"presence"
            with pytest.raises(StoreCommandError, match="NOPERM"):
                await conn.execute("SET", "other:key", 1)
        with pytest.raises(StoreCommandError) as caught:
            await RedisConnection.connect(f"redis://presence:wrong@{base}")
        assert caught.value.command == "AUTH" and "WRONGPASS" in caught.value.reply
        async with await RedisConnection.connect(f"redis://{base}") as conn:
            with pytest.raises(StoreCommandError, match="NOAUTH"):
                await conn.execute("PING")

    run(main())


def test_db_select_and_client_name(valkey: ValkeyServer) -> None:
    async def main() -> None:
        options = ConnectionOptions.from_url(valkey.url).with_changes(db=5, client_name="flush-1")
        async with await RedisConnection.connect(options) as conn:
            await conn.execute("SET", "conn:db", "five")
            assert await conn.execute("CLIENT", "GETNAME") == b"flush-1"
        with pytest.raises(StoreCommandError) as caught:
            await RedisConnection.connect(valkey.url.rsplit("/", 1)[0] + "/99")
        assert caught.value.command == "SELECT"

    run(main())
    with valkey.client(db=5) as client:
        assert client.get("conn:db") == "five"
        client.delete("conn:db")
    with valkey.client() as client:
        assert client.get("conn:db") is None


# Failures


def test_connect_refused_and_tls_to_a_plain_server(valkey: ValkeyServer) -> None:
    async def main() -> None:
        with pytest.raises(StoreConnectionError) as caught:
            await RedisConnection.connect(f"redis://127.0.0.1:{free_port()}")
        assert caught.value.outcome_unknown is False
        # TLS is negotiated: a plain server fails the handshake, within the connect timeout.
        url = f"rediss://{valkey.host}:{valkey.port}?ssl_cert_reqs=none&socket_connect_timeout=0.3"
        with pytest.raises(StoreConnectionError) as caught:
            await RedisConnection.connect(url)
        assert caught.value.outcome_unknown is False

    run(main())


def test_server_killed_mid_pipeline_then_reconnect_after_restart(
    valkey_factory: Factory,
) -> None:
    server = valkey_factory()

    async def main() -> None:
        options = ConnectionOptions.from_url(server.url)
        conn = await RedisConnection.connect(options)
        # BLPOP holds the batch mid-way on the server: the kill lands while it is in flight.
        batch = [("SET", "conn:a", 1), ("BLPOP", "conn:nothing", 5), ("SET", "conn:b", 1)]
        task = asyncio.create_task(conn.pipeline(batch))
        await asyncio.sleep(0.05)
        assert conn.in_flight == 1
        server.kill()
        with pytest.raises(StoreConnectionError) as caught:
            await task
        assert caught.value.outcome_unknown is True
        assert "unknown" in str(caught.value)
        assert conn.is_closed
        # Once broken, a connection stays closed and says nothing was sent.
        with pytest.raises(StoreConnectionError) as caught:
            await conn.execute("PING")
        assert caught.value.outcome_unknown is False
        with pytest.raises(StoreConnectionError):
            await RedisConnection.connect(options)

        server.restart()
        async with await RedisConnection.connect(options) as again:
            assert await again.execute("GET", "conn:a") is None  # restarted empty
            assert await again.execute("SET", "conn:a", 2) == b"OK"

        # A heavy pipeline broken by a kill also fails as unknown.
        async with await RedisConnection.connect(options) as conn:
            big = [("SET", f"conn:big:{i}", "x" * 100) for i in range(200_000)]
            big.append(("BLPOP", "conn:nothing", 5))  # still in flight however fast the rest
            task = asyncio.create_task(conn.pipeline(big))
            await asyncio.sleep(0.02)
            server.kill()
            with pytest.raises(StoreConnectionError) as caught:
                await task
            assert caught.value.outcome_unknown is True
        server.restart()

    run(main())


def test_reply_timeout_breaks_the_connection(valkey: ValkeyServer) -> None:
    async def main() -> None:
        options = ConnectionOptions.from_url(valkey.url, reply_timeout=0.2)
        conn = await RedisConnection.connect(options)
        with pytest.raises(StoreConnectionError, match="within 0.2 s") as caught:
            await conn.pipeline([("BLPOP", "conn:never", 2)])
        assert caught.value.outcome_unknown is True
        assert conn.is_closed

    run(main())


def test_close_fails_batches_in_flight(valkey: ValkeyServer) -> None:
    async def main() -> None:
        conn = await RedisConnection.connect(valkey.url)
        task = asyncio.create_task(conn.pipeline([("BLPOP", "conn:never", 2)]))
        await asyncio.sleep(0.02)
        conn.close()
        with pytest.raises(StoreConnectionError) as caught:
            await task
        assert caught.value.outcome_unknown is True
        assert conn.is_closed and "closed" in repr(conn)

    run(main())


def test_tls_end_to_end(valkey: ValkeyServer, tmp_path: Path) -> None:
    # The bundled valkey-server is built without TLS, so a TLS-terminating proxy in front of it
    # stands in for a rediss:// server; the client checks the proxy's certificate against a CA.
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(valkey.host, valkey.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main() -> None:
        proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
        port = proxy.sockets[0].getsockname()[1]
        try:
            url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
            async with await RedisConnection.connect(url) as conn:
                assert conn.options.ssl is not None
                assert await conn.pipeline([("ECHO", "over tls")] * 100) == [b"over tls"] * 100
            # Without the CA the certificate is refused.
            with pytest.raises(StoreConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await RedisConnection.connect(f"rediss://127.0.0.1:{port}")
        finally:
            proxy.close()
            await proxy.wait_closed()

    run(main())
