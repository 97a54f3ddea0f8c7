"""Every table test runs against both implementations: `c` (compiled) and `py` (the twin).

In CI (`CI=true`) or with `PRESENCE_CORE_REQUIRE_EXTENSION=1`, a missing compiled module is
an error, never a skip: a broken build must not pass as a green run of the twin alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from impls import _FAST_ERROR, REQUIRE_EXTENSION, _fast, impl
from servers import ValkeyCluster, ValkeyServer

settings.register_profile(
    "default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if REQUIRE_EXTENSION else "default")


def pytest_report_header(config: pytest.Config) -> str:
    import presence_core

    state = "compiled" if _fast is not None else f"NOT BUILT ({_FAST_ERROR})"
    return (
        f"presence_core: extension {state}; "
        f"USING_EXTENSION={presence_core.USING_EXTENSION}; require={REQUIRE_EXTENSION}"
    )


@pytest.fixture(autouse=True)
def _refs_from_one(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refs count from 1 in tests (``<node>.1``, ``<node>.2``...), as a seeded random number
    would, so expected payloads can be written out; a test marked ``random_refs`` gets the
    random start every process has (see ``tracker._ref_origin``)."""
    if request.node.get_closest_marker("random_refs") is None:
        monkeypatch.setattr("presence_core.tracker.tracker._ref_origin", lambda: 1)


@pytest.fixture(params=["c", "py"])
def Table(request: pytest.FixtureRequest) -> Any:
    """The PresenceTable class of one implementation."""
    return impl(request.param)


@pytest.fixture
def both() -> tuple[Any, Any]:
    """Both implementations, for tests that compare them directly."""
    return impl("c"), impl("py")


# Real Valkey servers: the same fixtures as users get from the plugin
# (presence_core.testing.plugin, loaded through its pytest11 entry point).  Each fixture stops
# its servers by PID however the test ends.


@pytest.fixture(scope="session")
def valkey(presence_valkey: ValkeyServer) -> ValkeyServer:
    """The plugin's `presence_valkey`: one valkey-server for the whole session.

    Tests share it: use keys of your own.  A test that calls `kill()` must `restart()` it (empty,
    on the same port) before it ends.
    """
    return presence_valkey


@pytest.fixture
def valkey_factory() -> Iterator[Callable[..., ValkeyServer]]:
    """Start extra servers with their own options (``password=...``, ``args=[...]``)."""
    servers: list[ValkeyServer] = []

    def start(**kwargs: Any) -> ValkeyServer:
        server = ValkeyServer(**kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def valkey_cluster(presence_valkey_cluster: ValkeyCluster) -> ValkeyCluster:
    """The plugin's `presence_valkey_cluster`: a fresh 3-master, 3-replica cluster, healthy."""
    return presence_valkey_cluster
