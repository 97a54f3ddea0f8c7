"""The README's FastAPI example, served by uvicorn, with phoenix.js, realtime-js and Supabase's
Python client: each gets presence under the key the host's own dependency chose, and none can
ask for another.

The example is read from README.md (the block under "Embedding: the ASGI app"), written out
as a module and run as ``uvicorn module:app`` in a child process, stopped by PID.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import _die_with_parent, free_port, pid_alive, wait_until
from test_auth_clients import AuthNode, PyClient, converge
from test_auth_clients import node as node  # noqa: F401  (a fixture, which asks for `door`)
from test_readme import PYTHON_BLOCKS
from test_server_clients import Client, health

from presence_core.asgi import PresenceApp

# The door is the same code over either table: .ci/run runs it once, with the compiled one.
pytestmark = pytest.mark.asgi_door

HEADING = "Embedding: the ASGI app (presence_core.asgi)"
TOPIC = "realtime:room"


@pytest.fixture
def door() -> str:
    return "asgi"  # test_auth_clients' node fixture asks for one


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    """The README's FastAPI service under uvicorn; yields its ws:// base."""
    (block,) = [b for b in PYTHON_BLOCKS if b.heading == HEADING]
    code = [line for line in block.code.splitlines() if line.strip()]
    assert len(code) <= 15, f"the README promises at most 15 lines; the example has {len(code)}"
    (tmp_path / "service.py").write_text(block.code, encoding="utf-8")
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service:app", "--port", str(port)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    try:
        wait_until(lambda: health(port) is not None, 15.0, "the README's service")
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        assert not pid_alive(proc.pid)
        text = (tmp_path / "uvicorn.log").read_text(errors="replace")
        assert "secret" not in text, "a token reached uvicorn's log"


def test_the_readme_fastapi_service_gives_three_clients_presence_keyed_by_the_host(
    service: str,
    node: AuthNode,  # noqa: F811
) -> None:
    import asyncio

    async def main() -> None:
        alice, bob = node.client("alice"), node.client("bob")
        carol = PyClient(service, "carol", "carol-secret")
        mallory = PyClient(service, "mallory", "bob-secret")  # bob's socket asking for "alice"
        try:
            await alice.open_phoenix(service, "alice-secret")  # phoenix.js: ?token=
            await bob.open_realtime(service, apikey="bob-secret")  # realtime-js: ?apikey=
            assert (await alice.join(TOPIC, key=""))[0] == "ok"
            assert (await bob.join(TOPIC, key="bob"))[0] == "ok"
            assert await carol.join(TOPIC, key="") == ("SUBSCRIBED", None)
            assert await alice.track({"n": "a"}) == "ok"
            assert await bob.track({"n": "b"}) == "ok"
            await carol.channel.track({"n": "c"})
            members: list[Client] = [alice, bob, carol]
            expected = {"alice": [{"n": "a"}], "bob": [{"n": "b"}], "carol": [{"n": "c"}]}
            await converge(members, expected)
            # A client cannot choose another key than the host's.
            status, detail = await mallory.join(TOPIC, key="alice")
            assert status == "CHANNEL_ERROR"
            assert "chose this socket's presence key" in detail["reason"]
            # Nor connect at all without the host's authentication.
            stranger = node.client("stranger")
            await stranger.open_phoenix(service, "wrong")
            await asyncio.sleep(0.5)
            assert all(c.state() == expected for c in members)
        finally:
            for client in (carol, mallory):
                await client.close()
            await node.aclose()

    asyncio.run(main())
    assert PresenceApp  # the example's import is the package's
