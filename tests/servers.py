"""Real Valkey servers for the tests: a re-export of `presence_core.testing.valkey`.

The machinery lives in the package so that users' own tests get the same servers through the
pytest plugin (`presence_core.testing.plugin`); the project's tests import it from here.
"""

from __future__ import annotations

from presence_core.testing._process import _LIVE, _die_with_parent, _stop_process
from presence_core.testing.valkey import (
    CLUSTER_SLOTS,
    CLUSTER_TIMEOUT,
    HOST,
    MAX_PORT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ValkeyCluster,
    ValkeyServer,
    free_port,
    pid_alive,
    running,
    valkey_server_binary,
    wait_until,
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
    "_LIVE",
    "_die_with_parent",
    "_stop_process",
    "free_port",
    "pid_alive",
    "running",
    "valkey_server_binary",
    "wait_until",
]
