"""Child processes for test fixtures: free loopback ports, and stopping children by PID.

Every process started here is recorded in `_LIVE` until it is stopped, so that anything a fixture
missed is stopped at interpreter exit; on Linux the kernel also kills it when the test process
dies (`_die_with_parent`).  Nothing here needs anything outside the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess

HOST = "127.0.0.1"
# A cluster node also listens on port + 10000 (the cluster bus), which must stay <= 65535.
MAX_PORT = 55535
STOP_TIMEOUT = 5.0


# Ports are picked at random below the usual ephemeral range (32768+) so that they do not collide
# with the client side of connections, and checked free for both the port and its bus port.
def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A port on 127.0.0.1 that is free now (and port + 10000 too when `cluster_bus`)."""
    for _ in range(200):
        port = random.randint(12000, 30000)
        if _port_is_free(port) and (not cluster_bus or _port_is_free(port + 10000)):
            assert port <= MAX_PORT
            return port
    raise RuntimeError("no free loopback port found")


_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL the server when the test
    # process dies, even by SIGKILL, so that a crashed session leaves nothing behind.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    _LIVE.pop(proc.pid, None)


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE.values()):
        _stop_process(proc, timeout=1.0)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a reaped child no longer does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
