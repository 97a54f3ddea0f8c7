"""``presence-core bench``: a load generator for a `PresenceServer`, with a report.

N WebSocket clients (Phoenix v2 frames, as realtime-js sends them) spread over T topics: each
one connects, joins its topic with its own presence key, tracks a meta, heartbeats every 25 s,
and, once every client has joined, the run starts: for ``--duration`` seconds the clients update
their metas at ``--rate`` updates per second in all, and each client once leaves its topic for
the next one (a channel switch).  The server is one started here (``presence-core serve`` as a
subprocess on a free loopback port, stopped by PID at the end) or the one at ``--url``.

Scale-out: ``--servers N`` with ``--redis URL`` (or ``--redis-cluster URL``) starts N servers
sharing that Redis, each with a node name of its own (the run has a key prefix of its own), and
``--url`` given several times names running ones.  The clients of each topic are spread over
the servers round-robin, so a topic's diffs cross processes through Redis pub/sub; the report
gives each server's CPU and RSS, their total, the latency of the diffs that crossed, and how
busy the machine was: the servers' and the bench workers' CPU against its cores, the busiest
first, "saturated" from 90 %.

What is measured:

* connect (TCP + WebSocket handshake) and connect-to-joined (until both the join's ``ok`` reply
  and the ``presence_state`` arrived) times;
* diff propagation: every meta carries its sender's ``time.time()``; every client records, for
  each join of each ``presence_diff`` it receives, the time since that stamp, and counts the
  updates delivered against those expected (each update times each member of its topic);
* channel switch: from sending ``phx_leave`` (with the new topic's ``phx_join`` right behind it)
  to the new topic's ``presence_state``;
* updates and presence operations per second, heartbeat round trips, errors by kind,
  connections held at the end, and the server's CPU (% of one core) and RSS when its PID is known.

Authentication.  With ``--jwt-secret`` (or ``$PRESENCE_CORE_JWT_SECRET``) each client carries a
token of its own, HS256 with the claims ``sub`` (its presence key), ``role`` ("authenticated")
and ``exp`` (an hour on), sent as the ``apikey`` query parameter as realtime-js sends it; its
join asks for the token's ``sub`` as its key.  The tokens are minted before the clients start
connecting, so minting is not in any measured time.  A server started here then verifies them
(``serve --presence-key-claim sub``, the secret passed in its environment).  The secret is never
printed nor written to the report.

Delivery accounting.  A diff can only be expected by the members of its topic, and members come
and go during the run (the switches).  A client counts as a member for an update when the update
was sent after the client's ``presence_state`` arrived and, if the client left the topic later,
when it also received a diff sent after the update's reply (so the server flushed the update
before the leave).  Updates in flight across a join or a leave are counted only where they were
delivered: ``delivered == expected`` then means that no member missed any diff.  With several
servers "a diff sent after the update's reply" must come from the update's own server: each
server publishes a topic's diffs in order on one Redis channel, while a diff from the member's
own server may overtake one still crossing through Redis (no grace period is needed).

The clients run in ``--processes`` worker processes (``multiprocessing``, spawn), each an
asyncio loop (uvloop if installed) driving `websockets`' client protocol (``ClientProtocol``,
its Sans-I/O core) from an `asyncio.Protocol`: no task per connection, so one process drives
thousands of sockets.  After the handshake the server's frames are parsed here rather than by
websockets' generator-based parser, which cost the workers a quarter of their CPU (they share
the cores with the server, so their cost is in every latency).  Run as
``python -m presence_core.server.bench`` too.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import gc
import heapq
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, cast

import jwt
import orjson
import websockets.version
from websockets.client import ClientProtocol
from websockets.exceptions import ProtocolError
from websockets.frames import Close, CloseCode, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI, parse_uri

from . import bench_plot
from .loop import raise_nofile, uvloop_installed
from .loop import run as run_loop

__all__ = [
    "BenchConfig",
    "BenchError",
    "Membership",
    "Update",
    "account",
    "add_parser",
    "format_report",
    "main",
    "mint_tokens",
    "run",
    "run_bench",
]

_HEARTBEAT = 25.0  # realtime-js's heartbeat interval
_SPACING = 0.3  # seconds between a client's update reply and its switch (no coalescing)
_QUIET = 0.5  # the drain ends after this long without a diff
_DRAIN_CAP = 15.0
# Seconds between the last join and the run: a server may batch diffs during a join storm (ours
# does, for up to a second after it), and the run measures the steady state after it.
_SETTLE = 1.0
_FD_MARGIN = 32  # descriptors a process needs besides its sockets
_PROGRESS_EVERY = 0.25
_LETTERS = {"track": "j", "switch": "s", "update": "u"}  # a meta's "k": why it was tracked
_JWT_ENV = "PRESENCE_CORE_JWT_SECRET"  # --jwt-secret's default, as for serve
_TOKEN_LIFETIME = 3600.0  # a client's token is valid this long (longer for a longer run)
# PyJWT (2.13 and later) warns about an HMAC secret shorter than its hash: the operator's choice,
# not the bench's, and once per token it would flood stderr.
_SHORT_KEY_WARNING: type[Warning] | None = getattr(jwt, "InsecureKeyLengthWarning", None)

# The targets the report checks (``--target NAME=LIMIT``): name -> (path of the value in the
# report, default limit, unit).  A value at or below its limit meets the target.
_TARGETS: dict[str, tuple[tuple[str, ...], float, str]] = {
    "all_joined_s": (("connect", "all_joined_seconds"), 15.0, "s"),
    "connect_to_joined_p95_ms": (("connect", "connect_to_joined_ms", "p95"), 100.0, "ms"),
    "diff_p99_ms": (("diffs", "latency_ms", "p99"), 75.0, "ms"),
    "switch_p95_ms": (("switch", "leave_to_state_ms", "p95"), 50.0, "ms"),
    "server_cpu_percent": (("server", "cpu_percent_run"), 100.0, "%"),
}
TARGET_DEFAULTS: dict[str, float] = {name: limit for name, (_, limit, _) in _TARGETS.items()}

Pipe = multiprocessing.connection.Connection


class BenchError(Exception):
    """A run that cannot start or go on: the message says why, in a user's terms."""


# -- parameters ------------------------------------------------------------------------------------


@dataclass(slots=True)
class BenchConfig:
    """The run's parameters (the report repeats them)."""

    clients: int = 1000
    topics: int = 10
    rate: float | None = None  # updates/s across all clients; None: 1 % of clients per second
    duration: float = 30.0
    processes: int | None = None  # None: one per 5,000 clients, at most the CPU count
    url: str | None = None  # the first (or only) running server; the others are in urls
    redis: str | None = None
    server_pid: int | None = None  # the first server's, when known
    servers: int = 1  # servers started here (several need redis or redis_cluster)
    redis_cluster: str | None = None
    urls: list[str] = field(default_factory=list)  # every running server, in order
    server_pids: list[int] = field(default_factory=list)  # their PIDs, in the same order
    heartbeat: float = _HEARTBEAT
    concurrency: int = 100
    timeout: float = 30.0
    switch: bool = True
    switch_fraction: float = 1.0  # of the clients, each switching once
    seed: int = 0
    progress: bool = True
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGET_DEFAULTS))
    # HS256 secret: each client sends a token of its own (never in a repr or the report)
    jwt_secret: str | None = field(default=None, repr=False)

    def updates_per_second(self) -> float:
        return self.rate if self.rate is not None else self.clients / 100.0

    def running_urls(self) -> list[str]:
        """The running servers to bench (none: start them here)."""
        return list(self.urls) or ([self.url] if self.url else [])

    def running_pids(self) -> list[int]:
        return list(self.server_pids) or ([self.server_pid] if self.server_pid else [])

    def server_count(self) -> int:
        return len(self.running_urls()) or max(1, self.servers)

    def process_count(self) -> int:
        if self.processes is not None:
            return max(1, min(self.processes, self.clients))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        wanted = max(1, math.ceil(self.clients / 5000))
        return max(1, min(wanted, cpus or 1, self.clients))


@dataclass(slots=True)
class _WorkerSpec:
    index: int
    urls: list[str]  # the servers; a client's is _server_of(its index)
    first: int  # global index of its first client
    count: int
    topics: int
    rate: float  # this worker's share of the updates per second
    duration: float
    heartbeat: float
    concurrency: int
    timeout: float
    switch: bool
    switch_fraction: float
    seed: int
    jwt_secret: str | None = field(default=None, repr=False)


def _topic(index: int) -> str:
    return f"realtime:bench-{index}"


def _server_of(gid: int, topics: int, servers: int) -> int:
    """The server of client ``gid``: round-robin over each topic's members (client ``gid`` is
    in topic ``gid % topics`` first), so every topic has members on every server and its diffs
    cross processes; a plain ``gid % servers`` would put a whole topic on one server whenever
    the server count divides the topic count."""
    return (gid // topics) % servers


def _clients_per_server(clients: int, topics: int, servers: int) -> list[int]:
    counts = [0] * servers
    for gid in range(clients):
        counts[_server_of(gid, topics, servers)] += 1
    return counts


def mint_tokens(secret: str, keys: Sequence[str], lifetime: float = _TOKEN_LIFETIME) -> list[str]:
    """An HS256 token per presence key, as a Supabase project's users hold: ``sub`` the key,
    ``role`` "authenticated", ``exp`` ``lifetime`` seconds from now."""
    exp = int(time.time() + lifetime)
    with warnings.catch_warnings():
        if _SHORT_KEY_WARNING is not None:
            warnings.simplefilter("ignore", _SHORT_KEY_WARNING)
        return [
            jwt.encode({"sub": key, "role": "authenticated", "exp": exp}, secret, "HS256")
            for key in keys
        ]


def _with_token(wsuri: WebSocketURI, token: str) -> WebSocketURI:
    """The URI with the token as its ``apikey`` query parameter (where realtime-js puts it)."""
    param = "apikey=" + urllib.parse.quote(token, safe="")
    return dataclasses.replace(wsuri, query=f"{wsuri.query}&{param}" if wsuri.query else param)


# -- descriptors, ports and the server's /proc -----------------------------------------------------


def _port_range() -> int | None:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return high - low + 1


def _pid_nofile(pid: int) -> int | None:
    """The soft descriptor limit of another process (/proc/<pid>/limits), if readable."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (/proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15, counted after the comm
    return ticks / os.sysconf("SC_CLK_TCK")


def _box_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine used, summed over its CPUs (/proc/stat's
    user, nice, system, irq and softirq); None when /proc/stat does not count as many CPUs as
    os.cpu_count() (in some containers it counts the host's)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = lines[0].split()
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        if fields[0] != "cpu" or cpus != os.cpu_count():
            return None
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    except (OSError, IndexError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _memory(pid: int) -> tuple[int | None, int | None]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    rss = peak = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, peak


def _check_limits(cfg: BenchConfig, processes: int, start_server: bool) -> list[str]:
    """Refuse a run the machine cannot hold, with the reason; returns warnings."""
    servers = cfg.server_count()
    per_server = _clients_per_server(cfg.clients, cfg.topics, servers)
    most = max(per_server)
    warnings: list[str] = []
    soft, hard = raise_nofile()
    per_worker = math.ceil(cfg.clients / processes)
    if per_worker + _FD_MARGIN > soft:
        need = math.ceil(cfg.clients / max(1, soft - _FD_MARGIN))
        raise BenchError(
            f"{cfg.clients:,} clients in {processes} process(es) need about "
            f"{per_worker + _FD_MARGIN:,} descriptors per process, but RLIMIT_NOFILE is "
            f"{soft:,} (hard limit {hard:,}): use --processes {need} or more, or raise the "
            "hard limit (ulimit -Hn, as root)"
        )
    if start_server and most + _FD_MARGIN > soft:
        which = "the server" if servers == 1 else "each server"
        raise BenchError(
            f"{which} started here would hold {most:,} sockets and needs about "
            f"{most + _FD_MARGIN:,} descriptors, but RLIMIT_NOFILE's hard limit is "
            f"{hard:,}: at most {max(0, soft - _FD_MARGIN):,} clients per server here; raise "
            "the hard limit (ulimit -Hn, as root), start more --servers, or bench a server "
            "elsewhere with --url"
        )
    for pid, count in zip(cfg.running_pids(), per_server, strict=False):
        limit = _pid_nofile(pid)
        if limit is not None and count + _FD_MARGIN > limit:
            warnings.append(
                f"the server (pid {pid}) may open only {limit:,} descriptors: "
                f"{count:,} clients will not all connect"
            )
    ports = _port_range()
    if ports is not None and most > ports - 100:
        raise BenchError(
            f"{most:,} connections from one address to one server port need as many "
            f"ephemeral ports, but net.ipv4.ip_local_port_range has {ports:,}"
        )
    if start_server and most > 20_000:
        warnings.append("the server is started with --max-connections raised to fit")
    return warnings


# -- statistics ------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of sorted ``values``."""
    if not values:
        return None
    rank = max(0, min(len(values) - 1, math.ceil(q / 100.0 * len(values)) - 1))
    return values[rank]


def _summary(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, Any]:
    """Count, percentiles and max of ``values`` (milliseconds), rounded to the microsecond."""
    ordered = sorted(values)
    out: dict[str, Any] = {"count": len(ordered)}
    for q in qs:
        p = _pct(ordered, q)
        out[f"p{q}"] = None if p is None else round(p, 3)
    out["max"] = round(ordered[-1], 3) if ordered else None
    return out


# -- one client ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Membership:
    """A client's membership of one topic: when its presence_state came, what it received."""

    topic: int
    start: float = math.inf  # wall time the presence_state arrived
    end: float | None = None  # wall time the leave was confirmed (or the socket lost)
    max_stamp: float = -math.inf  # newest stamp among the diffs received in it
    received: array[int] = field(default_factory=lambda: array("q"))
    # with several servers: the newest stamp received from each server's clients
    max_stamp_from: dict[int, float] = field(default_factory=dict)


Update = tuple[int, int, float, float] | tuple[int, int, float, float, int]
"""``(uid, topic, sent, replied)``, and with several servers the sender's server last."""


def account(windows: Sequence[Membership], updates: Sequence[Update]) -> dict[str, int]:
    """Diffs delivered against those expected, over memberships and the run's updates.

    ``updates`` are ``(uid, topic, sent, replied)`` (wall times; ``replied`` 0 when the update
    was not acknowledged), with the sender's server as a fifth item when there are several.
    A member expects an update when it was sent after the member's ``presence_state`` arrived
    and, for a membership that ended (a leave, a lost socket), when the member also received a
    diff sent after the update's reply: the server then flushed the update while the member
    was still in.  Updates in flight across a join or a leave count where they were
    delivered, so ``missing`` counts only diffs a member surely lost.

    With several servers, that later diff must come from a client of the update's own server
    (``Membership.max_stamp_from``): a server publishes its diffs of a topic in order on one
    Redis channel, so a later one received means the update's came before it, whereas a
    diff of the member's own server says nothing of one still crossing through Redis.
    """
    by_topic: dict[int, list[tuple[float, float, int, int]]] = {}
    topic_of: dict[int, int] = {}
    for update in updates:
        uid, topic, sent, replied = update[0], update[1], update[2], update[3]
        topic_of[uid] = topic
        if replied > 0:
            origin = update[4] if len(update) > 4 else 0
            by_topic.setdefault(topic, []).append((sent, replied, uid, origin))
    for ups in by_topic.values():
        ups.sort()
    sends = {t: [u[0] for u in ups] for t, ups in by_topic.items()}
    delivered = expected = missing = duplicates = unexpected = 0
    for w in windows:
        ups = by_topic.get(w.topic, [])
        first = bisect.bisect_right(sends.get(w.topic, []), w.start)
        if w.end is None:
            certain = {uid for _sent, _replied, uid, _origin in ups[first:]}
        elif w.max_stamp_from:
            newest = w.max_stamp_from
            certain = {
                uid
                for _sent, replied, uid, origin in ups[first:]
                if replied < newest.get(origin, -math.inf)
            }
        else:
            limit = w.max_stamp
            certain = {uid for _sent, replied, uid, _origin in ups[first:] if replied < limit}
        got = set(w.received)
        duplicates += len(w.received) - len(got)
        valid = {uid for uid in got if topic_of.get(uid) == w.topic}
        unexpected += len(got) - len(valid)
        missing += len(certain - valid)
        delivered += len(valid)
        expected += len(certain | valid)
    return {
        "delivered": delivered,
        "expected": expected,
        "missing": missing,
        "duplicates": duplicates,
        "unexpected": unexpected,
    }


class _Conn(asyncio.Protocol):
    """One WebSocket client on an asyncio transport: websockets' Sans-I/O protocol does the
    handshake and frames what it sends; the server's frames are parsed here (`_frames`)."""

    def __init__(
        self, worker: _Worker, gid: int, topic: int, server: int = 0, token: str | None = None
    ) -> None:
        self.worker = worker
        self.gid = gid
        self.key = f"c{gid}"  # a token's sub when it carries one
        self.topic = topic
        self.server = server  # which of the servers it talks to
        wsuri = worker.wsuris[server]
        if token is not None:
            wsuri = _with_token(wsuri, token)
        self.ws = ClientProtocol(wsuri, max_size=None)
        self.transport: asyncio.Transport | None = None
        self.refs = 0
        self.join_ref = ""
        self.pending: dict[str, tuple[str, float, int]] = {}  # ref -> (kind, perf, extra)
        self.windows: dict[str, Membership] = {}  # open memberships, by topic name
        self.head = b""  # the handshake's response so far
        self.framing = False  # the handshake is done: server frames are parsed here
        self.discarding = False  # a close frame or a protocol error: the rest is ignored
        self.buffer = bytearray()  # the start of a frame not fully received yet
        self.fragments: list[bytes | bytearray] = []
        self.fragmented = 0  # the opcode of a message whose continuation frames are due
        self.close_code: int | None = None  # from the server's close frame
        self.alive = False
        self.ready = False  # joined and first track acknowledged
        self.join_ok = False
        self.state_ok = False
        self.switching = False
        self.switch_started = 0.0
        self.update_pending = False
        self.last_update = -math.inf
        self.switch_at = math.inf  # when the run's scheduler means it to switch
        self.t_start = 0.0
        self.heartbeat_ref: str | None = None
        self.heartbeat_timer: asyncio.TimerHandle | None = None
        self.joined: asyncio.Future[bool] = worker.loop.create_future()  # False: it failed
        self.lost: asyncio.Future[None] = worker.loop.create_future()

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.alive = True
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.framing:
            if not self.discarding:
                self._frames(data)
            return
        # The handshake: websockets parses the response.  A 101 response has no body, so it is
        # fed up to its blank line and whatever follows is frames, parsed here.
        ws = self.ws
        seen = len(self.head)
        self.head += data
        rest = b""
        end = self.head.find(b"\r\n\r\n")
        if end >= 0 and self.head.startswith(b"HTTP/1.1 101 "):
            cut = end + 4 - seen
            data, rest = data[:cut], data[cut:]
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Response):
                self._handshake(event)
        self._flush()
        if ws.close_expected() and self.transport is not None:
            self.transport.close()
        elif rest and self.framing:
            self._frames(rest)

    def eof_received(self) -> bool | None:
        if not self.framing:
            self.ws.receive_eof()
            self._flush()
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        was_alive = self.alive
        self.alive = False
        self.ready = False
        if self.heartbeat_timer is not None:
            self.heartbeat_timer.cancel()
        now = time.time()
        for window in self.windows.values():
            window.end = now
            self.worker.windows.append(window)
        self.windows.clear()
        if was_alive and not self.worker.closing:
            code = self.close_code
            kind = f"closed_by_server_{code}" if code is not None else "connection_lost"
            self.worker.error(kind)
        if not self.joined.done():
            self.joined.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)

    # writing

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.ws.data_to_send()
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

    def _push(self, topic: str, event: str, payload: Any, kind: str, extra: int = 0) -> str:
        self.refs += 1
        ref = str(self.refs)
        join_ref = None if topic == "phoenix" else self.join_ref
        self.pending[ref] = (kind, time.perf_counter(), extra)
        self.ws.send_text(orjson.dumps([join_ref, ref, topic, event, payload]))
        self._flush()
        return ref

    def _join(self) -> None:
        self.join_ref = str(self.refs + 1)  # the join's own ref, as phoenix.js does
        name = _topic(self.topic)
        self.windows[name] = Membership(self.topic)
        payload = {"config": {"presence": {"key": self.key}, "broadcast": {"self": False}}}
        self._push(name, "phx_join", payload, "join")

    def _track(self, kind: str, extra: int = 0, uid: int = -1) -> float:
        """Track (or update) this client's meta, stamped with the time; returns the stamp."""
        stamp = time.time()
        meta: dict[str, Any] = {"status": "online", "t": stamp, "k": _LETTERS[kind]}
        if uid >= 0:
            meta["u"] = uid
        payload = {"type": "presence", "event": "track", "payload": meta}
        self._push(_topic(self.topic), "presence", payload, kind, extra)
        return stamp

    # reading

    def _frames(self, data: bytes) -> None:
        """Parse the server's frames here rather than in websockets' generator-based parser.

        That parser took a quarter of the workers' CPU at 20,000 clients, and the workers share
        the cores with the server.  A server's frames are never masked and no extension was
        negotiated (none is offered), so a frame is a 2-byte header, a 2- or 8-byte extended
        length when the 7-bit one says 126 or 127, and the payload.  Bytes of a frame not
        fully received wait in ``self.buffer``.
        """
        buffer = self.buffer
        chunk: bytes | bytearray = data
        if buffer:
            buffer += data
            chunk = buffer
        size = len(chunk)
        pos = 0
        while size - pos >= 2:
            first = chunk[pos]
            length = chunk[pos + 1]
            start = pos + 2
            if length >= 126:
                if length == 126:
                    start = pos + 4
                    if start > size:
                        break
                    length = (chunk[pos + 2] << 8) | chunk[pos + 3]
                elif length == 127:
                    start = pos + 10
                    if start > size:
                        break
                    length = int.from_bytes(chunk[pos + 2 : start], "big")
                else:  # the mask bit
                    self._fail("a masked frame from the server")
                    return
            end = start + length
            if end > size:
                break
            payload = chunk[start:end]
            pos = end
            if first == 0x81 and not self.fragmented:  # FIN and text: almost every frame
                self._text(payload)
            elif not self._frame(first, payload):
                return  # closed: the rest is discarded
        if chunk is buffer:
            del buffer[:pos]
        elif pos < size:
            buffer += chunk[pos:]

    def _frame(self, first: int, payload: bytes | bytearray) -> bool:
        """Any frame but a whole text one; returns False once the connection is closing."""
        opcode = first & 0x0F
        fin = first & 0x80
        if first & 0x70:
            return self._fail("reserved bits set")
        if opcode >= 8:
            if not fin or len(payload) > 125:
                return self._fail("a fragmented or long control frame")
            if opcode == Opcode.PING:
                self.ws.send_pong(bytes(payload))  # masked, as a client's frames must be
                self._flush()
            elif opcode == Opcode.CLOSE:
                return self._closed(bytes(payload))
            elif opcode != Opcode.PONG:
                return self._fail(f"opcode {opcode}")
        elif opcode == Opcode.CONT:
            if not self.fragmented:
                return self._fail("an unexpected continuation frame")
            self.fragments.append(payload)
            if fin:
                if self.fragmented == Opcode.TEXT:
                    self._text(b"".join(self.fragments))
                self.fragments = []
                self.fragmented = 0
        elif opcode == Opcode.TEXT or opcode == Opcode.BINARY:
            if self.fragmented:
                return self._fail("a new message before the last one's end")
            if not fin:
                self.fragmented = opcode
                self.fragments = [payload]
            elif opcode == Opcode.TEXT:
                self._text(payload)
        else:
            return self._fail(f"opcode {opcode}")
        return True

    def _closed(self, payload: bytes) -> bool:
        """The server's close frame: answered if this client had not sent one, then TCP closed."""
        ws = self.ws
        try:
            close = Close.parse(payload)
        except (ProtocolError, UnicodeDecodeError) as exc:
            return self._fail(str(exc))
        self.close_code = close.code
        if ws.state is State.OPEN:
            # echo the code, as websockets does (an empty close frame gets an empty one)
            if payload:
                ws.send_close(close.code, close.reason)
            else:
                ws.send_close()
        self._stop_reading()
        return False

    def _fail(self, reason: str) -> bool:
        """A protocol error: close frame 1002 (if none was sent) and the TCP connection closed."""
        if self.ws.state is State.OPEN:
            self.ws.fail(CloseCode.PROTOCOL_ERROR, reason[:120])
        self._stop_reading()
        return False

    def _stop_reading(self) -> None:
        self.discarding = True
        self.buffer.clear()
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _handshake(self, response: Response) -> None:
        if self.ws.handshake_exc is not None:
            self.worker.error(f"handshake_{response.status_code}")
            self.alive = False  # not counted again as lost
            if not self.joined.done():
                self.joined.set_result(False)
            if self.transport is not None:
                self.transport.close()
            return
        self.framing = True
        self.head = b""
        worker = self.worker
        worker.connect_ms.append((time.perf_counter() - self.t_start) * 1000.0)
        self._join()
        self.heartbeat_timer = worker.loop.call_later(worker.spec.heartbeat, self._heartbeat)

    def _heartbeat(self) -> None:
        if not self.alive:
            return
        if self.heartbeat_ref is not None and self.heartbeat_ref in self.pending:
            self.worker.error("heartbeat_timeout")  # realtime-js would reconnect here
            del self.pending[self.heartbeat_ref]
        self.heartbeat_ref = self._push("phoenix", "heartbeat", {}, "heartbeat")
        self.heartbeat_timer = self.worker.loop.call_later(
            self.worker.spec.heartbeat, self._heartbeat
        )

    def _text(self, data: bytes | bytearray) -> None:
        worker = self.worker
        try:
            _join_ref, ref, topic, event, payload = orjson.loads(data)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            worker.error("bad_frame")
            return
        if event == "presence_diff":
            window = self.windows.get(topic)
            if window is None:
                worker.error("diff_for_unjoined_topic")
                return
            now = time.time()
            t0 = worker.t0
            servers = worker.servers
            for key, entry in payload["joins"].items():
                origin = self.server
                if servers > 1:
                    try:  # the server of the client whose presence key this is ("c<gid>")
                        origin = _server_of(int(key[1:]), worker.spec.topics, servers)
                    except ValueError:
                        origin = -1
                for meta in entry["metas"]:
                    stamp = meta.get("t")
                    if stamp is None:
                        continue
                    if stamp > window.max_stamp:
                        window.max_stamp = stamp
                    if servers > 1 and stamp > window.max_stamp_from.get(origin, -math.inf):
                        window.max_stamp_from[origin] = stamp
                    uid = meta.get("u")
                    if uid is not None:
                        window.received.append(uid)
                    if t0 is not None and now >= t0:
                        worker.lat_ms.append((now - stamp) * 1000.0)
                        worker.lat_sec.append(int(now - t0))
                        if origin != self.server:
                            worker.lat_across_ms.append((now - stamp) * 1000.0)
            if t0 is not None:
                worker.diffs += 1
            worker.last_diff = now
        elif event == "phx_reply":
            self._reply(ref, topic, payload)
        elif event == "presence_state":
            self._state(topic)
        elif event == "phx_close":
            if topic == _topic(self.topic) and not self.switching:
                worker.error("channel_closed")
        elif event in ("system", "phx_error"):
            worker.error(
                f"{event}:{payload.get('message', '') if isinstance(payload, dict) else ''}"
            )

    def _state(self, topic: str) -> None:
        window = self.windows.get(topic)
        if window is None or window.start != math.inf:
            self.worker.error("unexpected_presence_state")
            return
        window.start = time.time()
        if self.switching:
            self.worker.switch_ms.append((time.perf_counter() - self.switch_started) * 1000.0)
            self._track("switch")
            return
        self.state_ok = True
        self._joined()

    def _joined(self) -> None:
        if self.join_ok and self.state_ok and not self.joined.done():
            self.worker.joined_ms.append((time.perf_counter() - self.t_start) * 1000.0)
            self.worker.last_joined = time.time()
            self.joined.set_result(True)
            self._track("track")

    def _reply(self, ref: str | None, topic: str, payload: Any) -> None:
        worker = self.worker
        pending = self.pending.pop(ref, None) if ref is not None else None
        if pending is None:
            worker.error("unmatched_reply")
            return
        kind, sent, extra = pending
        ok = isinstance(payload, dict) and payload.get("status") == "ok"
        if ok and worker.measuring:
            worker.ops[kind] += 1
        if not ok:
            reason = payload.get("response", {}) if isinstance(payload, dict) else {}
            reason = reason.get("reason", "") if isinstance(reason, dict) else ""
            worker.error(f"{kind}_error:{reason}")
        if kind == "update":
            self.update_pending = False
            self.last_update = time.time()
            if ok:
                worker.updates[extra][3] = self.last_update
        elif kind == "heartbeat":
            worker.heartbeat_ms.append((time.perf_counter() - sent) * 1000.0)
        elif kind == "join":
            if self.switching:
                return
            if ok:
                self.join_ok = True
                self._joined()
            elif not self.joined.done():
                self.joined.set_result(False)
        elif kind == "leave":
            window = self.windows.pop(topic, None)
            if window is not None:
                window.end = time.time()
                worker.windows.append(window)
        elif kind == "track":
            self.ready = ok
            worker.tracked += 1
        elif kind == "switch":
            self.switching = False
            worker.switched += 1

    # actions of the run

    def can_update(self, now: float) -> bool:
        """Idle, and not about to switch (an update then would delay the switch)."""
        return (
            self.alive
            and self.ready
            and not self.switching
            and not self.update_pending
            and now < self.switch_at - 2 * _SPACING
        )

    def update(self, uid: int) -> None:
        """Update this client's meta; ``uid`` names the update in every diff that carries it."""
        worker = self.worker
        record: list[Any] = [uid, self.topic, 0.0, 0.0]
        if worker.servers > 1:
            record.append(self.server)
        worker.updates.append(record)
        self.update_pending = True
        record[2] = self._track("update", len(worker.updates) - 1, uid)

    def can_switch(self, now: float) -> bool:
        return (
            self.alive
            and self.ready
            and not self.switching
            and not self.update_pending
            and now - self.last_update >= _SPACING
        )

    def switch(self) -> None:
        """Leave this topic and, right behind, join the next one."""
        old = _topic(self.topic)
        self.switch_at = math.inf
        self.switching = True
        self.switch_started = time.perf_counter()
        self._push(old, "phx_leave", {}, "leave")
        self.topic = (self.topic + 1) % self.worker.spec.topics
        self._join()

    def close(self) -> None:
        if self.heartbeat_timer is not None:
            self.heartbeat_timer.cancel()
        if self.alive and self.transport is not None and self.ws.state is State.OPEN:
            self.ws.send_close(1000, "bench done")
            self._flush()
        elif self.transport is not None:
            self.transport.close()


# -- one worker process ----------------------------------------------------------------------------


class _Worker:
    """A share of the clients in one process, driven by the coordinator over a pipe."""

    def __init__(self, spec: _WorkerSpec, pipe: Pipe) -> None:
        self.spec = spec
        self.pipe = pipe
        self.loop = asyncio.get_running_loop()
        self.wsuris = [parse_uri(url) for url in spec.urls]
        self.servers = len(spec.urls)
        self.conns: list[_Conn] = []
        self.errors: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.connect_ms: list[float] = []
        self.joined_ms: list[float] = []
        self.switch_ms: list[float] = []
        self.heartbeat_ms: list[float] = []
        self.lat_ms: array[float] = array("d")
        self.lat_sec: array[int] = array("i")
        self.lat_across_ms: array[float] = array("d")  # of diffs from another server's client
        # [uid, topic, sent (wall), replied (wall) or 0] (+ the sender's server, if several)
        self.updates: list[list[Any]] = []
        self.windows: list[Membership] = []  # closed memberships
        self.t0: float | None = None
        self.measuring = False
        self.closing = False
        self.diffs = 0
        self.last_diff = 0.0
        self.tracked = 0
        self.switched = 0
        self.failed = 0
        self.first_start = math.inf
        self.last_joined = 0.0
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.phases: asyncio.Task[None] | None = None
        self.cpu_percent: float | None = None  # of one core, during the run

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def send(self, *message: Any) -> None:
        # uvloop makes a descriptor it watches non-blocking; a large result would be cut short.
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send(message)

    # control

    def _read_pipe(self) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):  # the coordinator is gone
            message = ("stop",)
            self.loop.remove_reader(self.pipe.fileno())
        if message[0] == "stop" and self.phases is not None:
            self.phases.cancel()
        self.inbox.put_nowait(message)

    async def _expect(self, *kinds: str) -> tuple[Any, ...]:
        message = await self.inbox.get()
        if message[0] == "stop":
            raise _Stopped
        if message[0] not in kinds:
            raise RuntimeError(f"worker {self.spec.index}: {message[0]!r} unexpected")
        return message

    async def main(self) -> None:
        """Every phase in order; the coordinator's ``stop`` (or its death) ends it early."""
        self.phases = self.loop.create_task(self._phases())
        self.loop.add_reader(self.pipe.fileno(), self._read_pipe)
        try:
            await self.phases
        except (_Stopped, asyncio.CancelledError):
            pass
        except Exception as exc:
            with contextlib.suppress(OSError):
                self.send("fatal", f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self.pipe.fileno())
            await self._close_all()

    async def _phases(self) -> None:
        self.send("hello", os.getpid())
        await self._expect("connect")
        await self._connect_all()
        # Thousands of connections live until the end: keep them out of every full
        # collection, whose pauses would show up as diff latency.
        gc.collect()
        gc.freeze()
        self.send("ready", self._progress())
        (_, t0) = await self._expect("go")
        await self._run(t0)
        self.send("sent", [tuple(u) for u in self.updates])
        (_, everything) = await self._expect("finish")
        await self._drain()
        self.send("result", self._result(everything))
        await self._expect("close")

    def _progress(self) -> dict[str, int]:
        return {
            "joined": len(self.joined_ms),
            "failed": self.failed,
            "updates": len(self.updates),
            "diffs": self.diffs,
            "switched": self.switched,
            "errors": sum(self.errors.values()),
        }

    async def _report_progress(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), _PROGRESS_EVERY)
            self.send("progress", self.spec.index, self._progress())

    # the phases

    async def _connect_all(self) -> None:
        spec = self.spec
        gids = range(spec.first, spec.first + spec.count)
        tokens: list[str | None] = [None] * spec.count
        if spec.jwt_secret:  # minted before any clock starts: the client's cost, not the server's
            lifetime = max(_TOKEN_LIFETIME, spec.duration + _TOKEN_LIFETIME / 2)
            tokens[:] = mint_tokens(spec.jwt_secret, [f"c{gid}" for gid in gids], lifetime)
        self.conns = [
            _Conn(self, gid, gid % spec.topics, _server_of(gid, spec.topics, self.servers), token)
            for gid, token in zip(gids, tokens, strict=True)
        ]
        slots = asyncio.Semaphore(max(1, spec.concurrency))
        stop = asyncio.Event()
        reporter = self.loop.create_task(self._report_progress(stop))

        async def one(conn: _Conn) -> None:
            async with slots:
                conn.t_start = time.perf_counter()
                self.first_start = min(self.first_start, time.time())
                try:
                    async with asyncio.timeout(spec.timeout):
                        wsuri = self.wsuris[conn.server]
                        await self.loop.create_connection(lambda: conn, wsuri.host, wsuri.port)
                        if not await conn.joined:
                            self.failed += 1  # the reason was counted where it happened
                except TimeoutError:
                    self.error("join_timeout" if conn.alive else "connect_timeout")
                    self.failed += 1
                    conn.alive = False  # not counted again as lost
                    if conn.transport is not None:
                        conn.transport.abort()
                except OSError as exc:
                    name = (os.strerror(exc.errno) if exc.errno else type(exc).__name__).lower()
                    self.error(f"connect:{name}")
                    self.failed += 1

        try:
            await asyncio.gather(*(one(c) for c in self.conns))
            # every first track acknowledged before the run starts
            deadline = time.monotonic() + spec.timeout
            while time.monotonic() < deadline and self.tracked < len(self.joined_ms):
                if not any(c.alive and not c.ready and c.joined.done() for c in self.conns):
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await reporter

    async def _run(self, t0: float) -> None:
        spec = self.spec
        rng = random.Random(spec.seed * 7919 + spec.index)
        self.t0 = t0
        end = t0 + spec.duration
        order = [c for c in self.conns if c.ready]
        rng.shuffle(order)
        switches: list[tuple[float, int]] = []
        chosen = round(len(order) * max(0.0, min(1.0, spec.switch_fraction)))
        if spec.switch and chosen:
            for rank, i in enumerate(rng.sample(range(len(order)), chosen)):
                at = t0 + spec.duration * (0.05 + 0.9 * (rank + rng.random()) / chosen)
                switches.append((at, i))
                order[i].switch_at = at
            heapq.heapify(switches)
        interval = 1.0 / spec.rate if spec.rate > 0 and order else math.inf
        next_update = t0 + rng.random() * min(interval, 1.0)
        seq = 0
        turn = 0
        stop = asyncio.Event()
        delay = t0 - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.measuring = True
        cpu = time.process_time()
        wall = time.monotonic()
        reporter = self.loop.create_task(self._report_progress(stop))
        try:
            while True:
                now = time.time()
                due = min(now, end)  # a late loop still sends what was due before the end
                while next_update < due:
                    for _ in range(len(order)):
                        conn = order[turn % len(order)]
                        turn += 1
                        if conn.can_update(now):
                            seq += 1
                            conn.update((spec.index << 40) | seq)
                            break
                    else:
                        self.error("update_skipped_no_idle_client")
                    next_update += interval
                while switches and switches[0][0] < due:
                    at, i = heapq.heappop(switches)
                    conn = order[i]
                    if conn.can_switch(now):
                        conn.switch()
                    elif conn.alive and now + _SPACING < end:
                        heapq.heappush(switches, (now + _SPACING, i))
                    else:  # busy with an update until the end
                        self.error("switch_not_done")
                if now >= end:
                    if switches:
                        self.errors["switch_not_done"] += len(switches)
                    break
                wake = min(next_update, switches[0][0] if switches else math.inf, end)
                await asyncio.sleep(max(0.0, wake - time.time()))
            self.measuring = False
            self.cpu_percent = _percent(cpu, time.process_time(), time.monotonic() - wall)
            # the last replies and switches
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and any(
                c.alive and (c.update_pending or c.switching) for c in order
            ):
                await asyncio.sleep(0.02)
            for conn in order:
                if conn.alive and conn.update_pending:
                    self.error("update_timeout")
                if conn.alive and conn.switching:
                    self.error("switch_timeout")
        finally:
            self.measuring = False
            stop.set()
            await reporter

    async def _drain(self) -> None:
        """Wait for the diffs still on their way: until none came for a while."""
        start = time.time()
        while time.time() - start < _DRAIN_CAP:
            now = time.time()
            if now - start >= _QUIET and now - self.last_diff >= _QUIET:
                return
            await asyncio.sleep(0.05)
        self.error("drain_cap_reached")

    def _result(self, everything: list[Update]) -> dict[str, Any]:
        """Accounting of the diffs against every update of the run, and the raw samples."""
        windows = list(self.windows)
        for conn in self.conns:
            windows.extend(conn.windows.values())  # still members: every update is expected
        tally = account(windows, everything)
        delivered, expected, missing = tally["delivered"], tally["expected"], tally["missing"]
        duplicates, unexpected = tally["duplicates"], tally["unexpected"]
        if duplicates:
            self.errors["duplicate_diffs"] += duplicates
        if unexpected:
            self.errors["diffs_of_unknown_updates"] += unexpected
        return {
            "index": self.spec.index,
            "clients": self.spec.count,
            "joined": len(self.joined_ms),
            "failed": self.failed,
            "held": sum(1 for c in self.conns if c.alive),
            "first_start": self.first_start,
            "last_joined": self.last_joined,
            "connect_ms": self.connect_ms,
            "joined_ms": self.joined_ms,
            "switch_ms": self.switch_ms,
            "heartbeat_ms": self.heartbeat_ms,
            "lat_ms": self.lat_ms.tobytes(),
            "lat_sec": self.lat_sec.tobytes(),
            "lat_across_ms": self.lat_across_ms.tobytes(),
            "diff_frames": self.diffs,
            "delivered": delivered,
            "expected": expected,
            "missing": missing,
            "switched": self.switched,
            "cpu_percent": self.cpu_percent,
            "ops": dict(self.ops),
            "errors": dict(self.errors),
        }

    async def _close_all(self) -> None:
        self.closing = True
        open_conns = [c for c in self.conns if c.alive]
        for conn in open_conns:
            conn.close()
        if open_conns:
            await asyncio.wait([c.lost for c in open_conns], timeout=5.0)
        for conn in self.conns:
            if conn.alive and conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)


class _Stopped(Exception):
    """The coordinator said stop."""


def _worker_entry(spec: _WorkerSpec, pipe: Pipe) -> None:
    """A worker process: its descriptors raised, Ctrl-C left to the coordinator."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()

    async def go() -> None:  # the worker is built on the running loop
        await _Worker(spec, pipe).main()

    run_loop(go())
    pipe.close()


# -- the server started here -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class _LocalServer:
    """``presence-core serve`` as a subprocess on a free loopback port, stopped by PID.

    The constructor starts it; `wait_healthy` waits for its ``/health`` (servers start side by
    side, then are waited for in turn).
    """

    def __init__(
        self,
        clients: int,
        redis: str | None,
        *,
        cluster: bool = False,
        node: str | None = None,
        prefix: str | None = None,
        taken: Collection[int] = (),
        jwt_secret: str | None = None,
    ) -> None:
        self.port = _free_port()
        while self.port in taken:  # two servers on one port: the second would not start
            self.port = _free_port()
        self.node = node
        self.log: IO[bytes] = tempfile.TemporaryFile()
        command = [
            sys.executable,
            "-m",
            "presence_core.server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-connections",
            str(max(20_000, clients + 16)),
            "--log-level",
            "warning",
        ]
        if redis:
            command += ["--redis-cluster" if cluster else "--redis", redis]
        if node:
            command += ["--node", node]
        if prefix:
            command += ["--prefix", prefix]
        env = None
        if jwt_secret:  # in its environment, out of ps and of the report's command
            command += ["--presence-key-claim", "sub"]
            env = {**os.environ, _JWT_ENV: jwt_secret}
        self.command = command
        # Its RLIMIT_NOFILE is this process's, raised to the hard limit before it starts.
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            start_new_session=True,  # Ctrl-C is ours to handle: we stop it after the clients
        )

    def wait_healthy(self, deadline: float) -> None:
        """Until ``/health`` answers; `BenchError` (with its log's tail) if it exits first."""
        while not (_healthy(self.port) and self.proc.poll() is None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"presence-core serve did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket/websocket?vsn=2.0.0"

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode("utf-8", "replace")

    def terminate(self) -> None:
        """SIGTERM: a graceful stop begins."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self, deadline: float | None = None) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL after 15 s (or at ``deadline``); returns
        its exit status."""
        self.terminate()
        if deadline is None:
            deadline = time.monotonic() + 15.0
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def _start_servers(cfg: BenchConfig) -> list[_LocalServer]:
    """``cfg.servers`` servers sharing ``cfg.redis`` (or ``cfg.redis_cluster``), healthy.

    With Redis each has a node name of its own and the run a key prefix of its own, so a run
    neither meets an earlier one's leftovers nor touches anyone's presence in that Redis.
    """
    count = cfg.server_count()
    redis = cfg.redis or cfg.redis_cluster
    run_id = f"bench-{os.getpid()}-{secrets.token_hex(2)}"
    per_server = _clients_per_server(cfg.clients, cfg.topics, count)
    servers: list[_LocalServer] = []
    try:
        for index in range(count):
            servers.append(
                _LocalServer(
                    per_server[index],
                    redis,
                    cluster=cfg.redis_cluster is not None,
                    node=f"{run_id}-{index + 1}" if redis else None,
                    prefix=run_id if redis else None,
                    taken=[s.port for s in servers],
                    jwt_secret=cfg.jwt_secret,
                )
            )
        deadline = time.monotonic() + 20.0 + 5.0 * count
        for server in servers:
            server.wait_healthy(deadline)
    except BaseException:
        _stop_servers(servers)
        raise
    return servers


def _stop_servers(servers: Sequence[_LocalServer]) -> None:
    """Every server told to stop at once (each says its goodbyes to Redis), then waited for;
    SIGKILL for any still running after 15 s."""
    for server in servers:
        server.terminate()
    deadline = time.monotonic() + 15.0
    for server in servers:
        server.stop(deadline)


# -- progress on stderr ----------------------------------------------------------------------------


class _Bar:
    """A one-line progress bar on stderr (a line every few seconds when it is not a TTY)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def show(
        self, label: str, done: float, total: float, extra: str = "", force: bool = False
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        frac = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
        width = 30
        fill = int(frac * width)
        line = f"{label:<8} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% {extra}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(100))
            self.shown = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False


# -- the coordinator -------------------------------------------------------------------------------


class _Workers:
    """The worker processes and their pipes."""

    def __init__(self, specs: list[_WorkerSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_entry, args=(spec, theirs), name=f"bench-worker-{spec.index}"
            )
            proc.daemon = True
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def broadcast(self, *message: Any) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(message)

    def gather(
        self, kind: str, on_progress: Callable[[int, dict[str, int]], None], timeout: float
    ) -> list[Any]:
        """Wait for one ``kind`` message from every worker; progress goes to ``on_progress``."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.pipes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"the workers did not all report {kind!r} in {timeout:.0f} s")
            waiting = [p for i, p in enumerate(self.pipes) if i not in got]
            for pipe in multiprocessing.connection.wait(waiting, min(remaining, 0.2)):
                assert isinstance(pipe, multiprocessing.connection.Connection)
                index = self.pipes.index(pipe)
                try:
                    message = pipe.recv()
                except EOFError:
                    code = self.procs[index].exitcode
                    raise BenchError(f"worker {index} died (exit {code})") from None
                if message[0] == "progress":
                    on_progress(message[1], message[2])
                elif message[0] == "fatal":
                    raise BenchError(f"worker {index} failed: {message[1]}")
                elif message[0] == kind:
                    got[index] = message[1] if len(message) > 1 else None
            on_progress(-1, {})
        return [got[i] for i in range(len(self.pipes))]

    def stop(self, graceful: bool) -> None:
        """Ask each worker to close its sockets and exit; terminate, then kill, stragglers."""
        self.broadcast("close" if graceful else "stop")
        deadline = time.monotonic() + 15.0
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(3)
        for pipe in self.pipes:
            pipe.close()


def _split(cfg: BenchConfig, urls: list[str], processes: int) -> list[_WorkerSpec]:
    specs = []
    rate = cfg.updates_per_second()
    first = 0
    concurrency = max(1, math.ceil(cfg.concurrency / processes))
    for index in range(processes):
        count = cfg.clients // processes + (1 if index < cfg.clients % processes else 0)
        specs.append(
            _WorkerSpec(
                index=index,
                urls=urls,
                first=first,
                count=count,
                topics=cfg.topics,
                rate=rate * count / cfg.clients,
                duration=cfg.duration,
                heartbeat=cfg.heartbeat,
                concurrency=concurrency,
                timeout=cfg.timeout,
                switch=cfg.switch and cfg.topics > 1,
                switch_fraction=cfg.switch_fraction,
                seed=cfg.seed,
                jwt_secret=cfg.jwt_secret,
            )
        )
        first += count
    return specs


def _with_vsn(url: str) -> str:
    """The URL a v2 client opens: ``/websocket`` appended if missing, ``vsn=2.0.0`` added."""
    base, _, query = url.partition("?")
    if not base.rstrip("/").endswith("/websocket"):
        base = base.rstrip("/") + "/websocket"
    if "vsn=" not in query:
        query = f"{query}&vsn=2.0.0" if query else "vsn=2.0.0"
    return f"{base}?{query}"


class _Timeline:
    """Connections joined and each server's CPU over the whole run, sampled about once a second
    from the coordinator's progress callbacks (which come at least every 0.2 s while it waits)."""

    def __init__(self, started: float) -> None:
        self.started = started  # Unix time: second 0 of the plot
        self.pids: list[int | None] = []
        self.joined = 0
        self.connections: list[list[float]] = []
        self.cpu: list[list[Any]] = []
        self._last: float | None = None
        self._last_cpu: list[float | None] = []
        self._last_joined = 0.0

    def watch(self, pids: list[int | None]) -> None:
        self.pids = pids
        self._last = time.monotonic()
        self._last_cpu = _cpu_all(pids)
        self.connections.append([self._now(), 0])

    def _now(self) -> float:
        return round(time.time() - self.started, 3)

    def tick(self, joined: int | None = None, force: bool = False) -> None:
        """Record a CPU sample once a second, and the joined count then and (at most four times
        a second) whenever it changes, so a short connect phase still shows its ramp."""
        if self._last is None:
            return
        mono = time.monotonic()
        if joined is not None and joined != self.joined:
            self.joined = joined
            if mono - self._last_joined >= 0.25:
                self.connections.append([self._now(), joined])
                self._last_joined = mono
        if mono - self._last < 1.0 and not force:
            return
        cpu = _cpu_all(self.pids)
        wall = mono - self._last
        t = self._now()
        self.cpu.append(
            [t, [_percent(a, b, wall) for a, b in zip(self._last_cpu, cpu, strict=True)]]
        )
        self.connections.append([t, self.joined])
        self._last, self._last_cpu, self._last_joined = mono, cpu, mono

    def as_dict(self, t0: float, end: float) -> dict[str, Any]:
        return {
            "started_at": self.started,
            "run_from": round(t0 - self.started, 3),
            "run_to": round(end - self.started, 3),
            "connections": self.connections,
            "server_cpu_percent": self.cpu,
        }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark and return the report (the JSON document)."""
    if cfg.clients < 1 or cfg.topics < 1 or cfg.duration <= 0:
        raise BenchError("--clients, --topics and --duration must be positive")
    if not cfg.running_urls() and cfg.servers > 1 and not (cfg.redis or cfg.redis_cluster):
        raise BenchError("several --servers share presence through --redis or --redis-cluster")
    processes = cfg.process_count()
    warnings = _check_limits(cfg, processes, start_server=not cfg.running_urls())
    bar = _Bar(cfg.progress)
    timeline = _Timeline(time.time())
    for warning in warnings:
        print(f"presence-core bench: warning: {warning}", file=sys.stderr)
    started: list[_LocalServer] = []
    workers: _Workers | None = None
    graceful = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pids: list[int | None]
    try:
        if not cfg.running_urls():
            started = _start_servers(cfg)
            urls = [server.url for server in started]
            pids = [server.pid for server in started]
        else:
            urls = [_with_vsn(url) for url in cfg.running_urls()]
            known = cfg.running_pids()
            pids = [known[i] if i < len(known) else None for i in range(len(urls))]
        timeline.watch(pids)
        specs = _split(cfg, urls, processes)
        workers = _Workers(specs)
        worker_pids = workers.gather("hello", lambda i, p: timeline.tick(), 60.0)

        progress: dict[int, dict[str, int]] = {}

        def connecting(index: int, p: dict[str, int]) -> None:
            if index >= 0:
                progress[index] = p
            joined = sum(x["joined"] for x in progress.values())
            failed = sum(x["failed"] for x in progress.values())
            timeline.tick(joined)
            extra = f"{joined:,}/{cfg.clients:,} joined" + (
                f", {failed:,} failed" if failed else ""
            )
            bar.show("connect", joined + failed, cfg.clients, extra)

        cpu_a = _cpu_all(pids)
        wall_a = time.monotonic()
        workers.broadcast("connect")
        workers.gather(
            "ready", connecting, cfg.timeout * (cfg.clients / max(1, cfg.concurrency)) + 120
        )
        connecting(-1, {})
        bar.show("connect", 1, 1, f"{sum(x['joined'] for x in progress.values()):,} joined", True)
        bar.done()
        cpu_b = _cpu_all(pids)
        wall_b = time.monotonic()

        t0 = time.time() + _SETTLE
        end = t0 + cfg.duration
        workers.broadcast("go", t0)
        sampled: dict[str, Any] = {}
        progress.clear()

        def sample() -> None:
            """The servers' and the machine's CPU and the servers' memory, as the run ends."""
            sampled["cpu"] = _cpu_all(pids)
            sampled["box"] = _box_cpu_seconds()
            sampled["wall"] = time.monotonic()
            sampled["memory"] = [_memory(pid) if pid else (None, None) for pid in pids]

        def running(index: int, p: dict[str, int]) -> None:
            if index >= 0:
                progress[index] = p
            now = time.time()
            if now >= end and "cpu" not in sampled:
                sample()
            if progress:
                timeline.tick(sum(x["joined"] for x in progress.values()))
            else:
                timeline.tick()
            ups = sum(x["updates"] for x in progress.values())
            diffs = sum(x["diffs"] for x in progress.values())
            errs = sum(x["errors"] for x in progress.values())
            extra = f"{min(now, end) - t0:5.1f}/{cfg.duration:g} s  updates {ups:,}"
            extra += f"  diff frames {diffs:,}"
            bar.show("run", now - t0, cfg.duration, extra + (f"  errors {errs:,}" if errs else ""))

        cpu_c = _cpu_all(pids)
        box_c = _box_cpu_seconds()
        wall_c = time.monotonic()
        sent = workers.gather("sent", running, cfg.duration + 60.0)
        running(-1, {})
        if "cpu" not in sampled:  # the run ended between two progress reports
            sample()
        bar.show("run", 1, 1, "draining", True)
        bar.done()
        everything = [u for part in sent for u in part]
        workers.broadcast("finish", everything)
        results = workers.gather("result", lambda i, p: timeline.tick(), _DRAIN_CAP + 120.0)
        timeline.tick(force=True)
        graceful = True
        per_server = _clients_per_server(cfg.clients, cfg.topics, len(urls))
        servers: list[dict[str, Any]] = []
        for i, pid in enumerate(pids):
            info: dict[str, Any] = {"pid": pid, "started_here": bool(started)}
            if started:
                info["command"] = started[i].command
            if pid:
                rss, peak = sampled["memory"][i]
                info["rss_bytes"] = rss
                info["rss_peak_bytes"] = peak
                info["cpu_percent_connect"] = _percent(cpu_a[i], cpu_b[i], wall_b - wall_a)
                before, after = cpu_a[i], cpu_b[i]
                info["cpu_seconds_connect"] = (
                    None if before is None or after is None else round(after - before, 3)
                )
                info["cpu_percent_run"] = _percent(
                    cpu_c[i], sampled["cpu"][i], sampled["wall"] - wall_c
                )
            info["url"] = urls[i]
            info["clients"] = per_server[i]
            if started and started[i].node:
                info["node"] = started[i].node
            servers.append(info)
        box = _percent(box_c, sampled["box"], sampled["wall"] - wall_c)
        report = _report(cfg, processes, urls, results, everything, servers, box, warnings)
        report["worker_pids"] = worker_pids
        report["run_started_at"] = t0  # Unix time: "second" 0 of the per-second table
        report["timeline"] = {**timeline.as_dict(t0, end), **report["timeline"]}
        for row in report["timeline"]["diff_latency_ms"]:
            row["t"] = round(t0 - timeline.started + row["second"] + 0.5, 3)
        return report
    except KeyboardInterrupt:
        bar.done()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if workers is not None:
            workers.stop(graceful)
        _stop_servers(started)


def _cpu_all(pids: Sequence[int | None]) -> list[float | None]:
    return [_cpu_seconds(pid) if pid else None for pid in pids]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _percent(before: float | None, after: float | None, wall: float) -> float | None:
    if before is None or after is None or wall <= 0:
        return None
    return round((after - before) / wall * 100.0, 1)


def _report(
    cfg: BenchConfig,
    processes: int,
    urls: list[str],
    results: list[dict[str, Any]],
    updates: list[Update],
    servers: list[dict[str, Any]],
    box: float | None,
    warnings: list[str],
) -> dict[str, Any]:
    lat: array[float] = array("d")
    sec: array[int] = array("i")
    across: array[float] = array("d")
    for r in results:
        lat.frombytes(r["lat_ms"])
        sec.frombytes(r["lat_sec"])
        across.frombytes(r["lat_across_ms"])
    per_second: dict[int, list[float]] = {}
    for s, v in zip(sec, lat, strict=True):
        per_second.setdefault(s, []).append(v)
    errors: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        ops.update(r["ops"])
    joined = sum(r["joined"] for r in results)
    delivered = sum(r["delivered"] for r in results)
    expected = sum(r["expected"] for r in results)
    starts = [r["first_start"] for r in results if r["first_start"] != math.inf]
    ends = [r["last_joined"] for r in results if r["last_joined"]]
    connect_seconds = (max(ends) - min(starts)) if starts and ends else None
    replied = sum(1 for u in updates if u[3] > 0)
    warnings = list(warnings)
    cpus = [r["cpu_percent"] for r in results if r["cpu_percent"] is not None]
    busiest = max(cpus, default=0.0)
    total = _servers_total(servers)
    used = sum(cpus) + (total["cpu_percent_run"] or 0.0)
    available = 100.0 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if busiest >= 90.0:
        warnings.append(
            f"a client process used {busiest:.0f} % of a core: the load generator was "
            "saturated and its own queueing is in the latencies (use more --processes)"
        )
    elif used >= 0.9 * available:
        warnings.append(
            f"clients and server used {used:.0f} % of {available / 100:.0f} cores: the machine "
            "was saturated, so the latencies include waiting for a CPU"
        )
    presence_ops = sum(ops[k] for k in ("update", "switch", "join", "leave", "track"))
    report: dict[str, Any] = {
        "parameters": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("progress", "jwt_secret")},
            "jwt": cfg.jwt_secret is not None,  # whether the clients carried tokens
            "rate": cfg.updates_per_second(),
            "processes": processes,
            "url": urls[0],
            "urls": urls,
            "servers": len(urls),
        },
        "environment": {
            "python": platform.python_version(),
            "websockets": websockets.version.version,
            "cpus": os.cpu_count(),
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "uvloop": uvloop_installed(),
        },
        "warnings": warnings,
        "connect": {
            "clients": cfg.clients,
            "joined": joined,
            "failed": sum(r["failed"] for r in results),
            "all_joined_seconds": None if connect_seconds is None else round(connect_seconds, 3),
            "connect_ms": _summary([v for r in results for v in r["connect_ms"]]),
            "connect_to_joined_ms": _summary([v for r in results for v in r["joined_ms"]]),
        },
        "diffs": {
            "latency_ms": _summary(lat),
            "per_second": [
                {"second": s, **_summary(per_second[s], (50, 99))} for s in sorted(per_second)
            ],
            "frames_received": sum(r["diff_frames"] for r in results),
            "delivered": delivered,
            "expected": expected,
            "missing": sum(r["missing"] for r in results),
            "delivered_percent": round(100.0 * delivered / expected, 4) if expected else None,
        },
        "switch": {
            "clients": cfg.clients if cfg.switch else 0,
            "switched": sum(r["switched"] for r in results),
            "leave_to_state_ms": _summary([v for r in results for v in r["switch_ms"]]),
        },
        "ops": {
            "updates_sent": len(updates),
            "updates_acknowledged": replied,
            "updates_per_second": round(replied / cfg.duration, 2),
            "presence_ops_per_second": round(presence_ops / cfg.duration, 2),
            "by_kind": dict(ops),
        },
        "clients_cpu_percent": [r["cpu_percent"] for r in results],
        "heartbeats": _summary([v for r in results for v in r["heartbeat_ms"]]),
        "errors": {k: v for k, v in sorted(errors.items()) if v},
        "error_count": sum(errors.values()),
        "connections_held": sum(r["held"] for r in results),
        "server": servers[0],
        "servers": servers,
        "servers_total": total,
        "saturation": _saturation(servers, cpus if len(cpus) == len(results) else None, box),
        # Series over time for --plot; run_bench adds connections and server CPU to it.
        "timeline": {
            "diff_latency_ms": [
                {"second": s, **_summary(per_second[s], (50, 95, 99))} for s in sorted(per_second)
            ],
        },
    }
    if len(servers) > 1:
        report["diffs"]["from_other_servers"] = len(across)
        report["diffs"]["latency_from_other_servers_ms"] = _summary(across)
    report["checks"] = checks(report)
    return report


def _target_title(name: str, limit: float, servers: int) -> str:
    if name == "server_cpu_percent":
        cores = limit / 100.0
        title = f"server CPU <= {cores:g} core" + ("" if cores == 1 else "s")
        return title if servers == 1 else f"busiest {title}"
    what = {
        "all_joined_s": "all joined within",
        "connect_to_joined_p95_ms": "connect-to-joined p95 <=",
        "diff_p99_ms": "diff propagation p99 <=",
        "switch_p95_ms": "channel switch p95 <=",
    }[name]
    return f"{what} {limit:g} {_TARGETS[name][2]}"


def checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's pass/fail checks: the targets, then errors, delivery and joins.

    Each is ``{"name", "title", "value", "limit", "unit", "met"}``; ``met`` is None when the
    run did not measure the value (no switch with ``--no-switch``, no CPU without a PID),
    which fails nothing: only a measured miss does.
    """
    limits = {**TARGET_DEFAULTS, **report["parameters"].get("targets", {})}
    servers: list[dict[str, Any]] = report.get("servers", [report["server"]])
    out: list[dict[str, Any]] = []
    for name, (path, _default, unit) in _TARGETS.items():
        value: Any = report
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if name == "server_cpu_percent" and len(servers) > 1:  # every server within it
            known = [s["cpu_percent_run"] for s in servers if s.get("cpu_percent_run") is not None]
            value = max(known, default=None)
        limit = limits[name]
        out.append(
            {
                "name": name,
                "title": _target_title(name, limit, len(servers)),
                "value": value,
                "limit": limit,
                "unit": unit,
                "met": None if value is None else bool(value <= limit),
            }
        )
    c, d = report["connect"], report["diffs"]
    for name, title, met in (
        ("errors", "0 errors", report["error_count"] == 0),
        ("delivered", "100 % of diffs delivered", 0 < d["expected"] == d["delivered"]),
        ("joined", "every client joined", c["joined"] == c["clients"]),
    ):
        out.append(
            {"name": name, "title": title, "value": None, "limit": None, "unit": "", "met": met}
        )
    return out


def _servers_total(servers: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU and memory of the servers in all (None when none is known; partial sums when only
    some are)."""
    out: dict[str, Any] = {}
    for key in ("cpu_percent_run", "cpu_percent_connect", "rss_bytes", "rss_peak_bytes"):
        known = [s[key] for s in servers if s.get(key) is not None]
        if not known:
            out[key] = None
        elif key.startswith("cpu"):
            out[key] = round(sum(known), 1)
        else:
            out[key] = sum(known)
    out["known"] = sum(1 for s in servers if s.get("cpu_percent_run") is not None)
    out["servers"] = len(servers)
    return out


_SATURATED = 0.9  # of the machine's cores


def _saturation(
    servers: list[dict[str, Any]], workers: list[float] | None, box: float | None
) -> dict[str, Any]:
    """The servers' and the bench workers' CPU during the run against the machine's cores.

    ``box`` is what every process used (/proc/stat), so what the others used (Redis, other
    work on the machine) shows too; it counts toward saturation.
    """
    cores = os.cpu_count() or 1
    parts: list[tuple[str, float]] = []
    for i, server in enumerate(servers):
        cpu = server.get("cpu_percent_run")
        if cpu is not None:
            parts.append((f"server {i + 1}" if len(servers) > 1 else "server", cpu))
    if workers is not None:
        parts.append(("bench workers", round(sum(workers), 1)))
    used = round(sum(cpu for _name, cpu in parts), 1)
    other = None if box is None else round(max(0.0, box - used), 1)
    capacity = 100.0 * cores
    return {
        "cpus": cores,
        "capacity_percent": capacity,
        "used_percent": used,
        "other_percent": other,
        "processes": [
            {"name": name, "cpu_percent": cpu} for name, cpu in sorted(parts, key=lambda p: -p[1])
        ],
        "saturated": used + (other or 0.0) >= _SATURATED * capacity,
    }


# -- the text report -------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _stats(s: dict[str, Any], qs: Sequence[str] = ("p50", "p95", "p99", "max")) -> str:
    return "  ".join(f"{q} {_ms(s.get(q))}" for q in qs) + " ms"


def format_report(report: dict[str, Any]) -> str:
    """The report as text."""
    p = report["parameters"]
    c, d, sw, ops, srv = (
        report["connect"],
        report["diffs"],
        report["switch"],
        report["ops"],
        report["server"],
    )
    servers: list[dict[str, Any]] = report.get("servers", [srv])
    shared = (f" redis {p['redis']}" if p.get("redis") else "") + (
        f" redis cluster {p['redis_cluster']}" if p.get("redis_cluster") else ""
    )
    lines = [
        f"presence-core bench: {p['clients']:,} clients, {p['topics']:,} topics, "
        f"{p['rate']:g} updates/s, {p['duration']:g} s, {p['processes']} process(es), "
        f"heartbeat {p['heartbeat']:g} s, switch {'on' if p['switch'] else 'off'}"
        + (", a JWT (HS256, sub = presence key) per client" if p.get("jwt") else ""),
    ]
    if len(servers) == 1:
        lines.append(
            f"server: {p['url']}"
            + (f" (started here, pid {srv['pid']})" if srv.get("started_here") else "")
            + shared
        )
    else:
        lines.append(
            f"servers: {len(servers)}"
            + (" started here" if srv.get("started_here") else " running")
            + (f", sharing{shared}" if shared else "")
            + "; clients spread round-robin over each topic's members"
        )
        for i, server in enumerate(servers):
            lines.append(
                f"  server {i + 1}  {server.get('url', '')}"
                + (f", pid {server['pid']}" if server.get("pid") else "")
                + (f", node {server['node']}" if server.get("node") else "")
                + (f", {server['clients']:,} clients" if "clients" in server else "")
            )
    lines += [
        "",
        f"connect     {c['joined']:,}/{c['clients']:,} joined"
        + (f", {c['failed']:,} failed" if c["failed"] else "")
        + (f" in {c['all_joined_seconds']:.2f} s" if c["all_joined_seconds"] is not None else ""),
        f"  connect            {_stats(c['connect_ms'])}",
        f"  connect-to-joined  {_stats(c['connect_to_joined_ms'])}",
        f"diffs       {d['delivered']:,} delivered / {d['expected']:,} expected"
        + (f" ({d['delivered_percent']:.3f} %)" if d["delivered_percent"] is not None else "")
        + (f", {d['missing']:,} missing" if d["missing"] else "")
        + f"; {d['frames_received']:,} frames",
        f"  propagation        {_stats(d['latency_ms'])}  ({d['latency_ms']['count']:,} joins)",
    ]
    if "latency_from_other_servers_ms" in d:
        across = d["latency_from_other_servers_ms"]
        lines.append(
            f"  from other servers {_stats(across)}  ({across['count']:,} joins)"
            if across["count"]
            else "  from other servers none: no diff crossed between the servers"
        )
    lines += [
        f"channel     {sw['switched']:,}/{sw['clients']:,} switched",
        f"  leave-to-state     {_stats(sw['leave_to_state_ms'])}",
        f"ops         {ops['updates_acknowledged']:,} updates ({ops['updates_per_second']:g}/s), "
        f"{ops['presence_ops_per_second']:g} presence ops/s",
        f"heartbeats  {report['heartbeats']['count']:,}  "
        + _stats(report["heartbeats"], ("p50", "p99")),
        "errors      "
        + (
            ", ".join(f"{k} {v:,}" for k, v in report["errors"].items())
            if report["errors"]
            else "none"
        ),
        f"connections {report['connections_held']:,} held at the end",
        "clients     CPU "
        + ", ".join(_pct_text(v) for v in report["clients_cpu_percent"])
        + " of one core per worker process during the run",
    ]
    for i, server in enumerate(servers):
        label = "server" if len(servers) == 1 else f"server {i + 1}"
        if server.get("pid"):
            rss, peak = server.get("rss_bytes"), server.get("rss_peak_bytes")
            cpu_run, cpu_conn = server.get("cpu_percent_run"), server.get("cpu_percent_connect")
            lines.append(
                f"{label:<11} CPU {_pct_text(cpu_run)} of one core during the run, "
                f"{_pct_text(cpu_conn)} while connecting; RSS {_mib(rss)} (peak {_mib(peak)})"
            )
        else:
            lines.append(f"{label:<11} CPU and RSS unknown (give --server-pid)")
    total = report.get("servers_total")
    if len(servers) > 1 and total and total["known"]:
        some = "" if total["known"] == total["servers"] else f" ({total['known']} known)"
        lines.append(
            f"servers     CPU {_pct_text(total['cpu_percent_run'])} in all during the run, "
            f"{_pct_text(total['cpu_percent_connect'])} while connecting; "
            f"RSS {_mib(total['rss_bytes'])} in all{some}"
        )
    if "saturation" in report:
        lines.append("saturation  " + _saturation_text(report["saturation"]))
    per = d["per_second"]
    if per:
        lines.append("")
        lines.append("second   joins      p50      p99      max (ms)")
        for row in per:
            lines.append(
                f"{row['second']:>6} {row['count']:>7,} {_ms(row['p50']):>8} "
                f"{_ms(row['p99']):>8} {_ms(row['max']):>8}"
            )
    lines.append("")
    lines.append("targets")
    for check in report.get("checks") or checks(report):
        value, met = check["value"], check["met"]
        shown = "" if check["limit"] is None else "-" if value is None else f"{value:.1f}"
        if value is not None:
            shown += f" {check['unit']}"
        verdict = "-" if met is None else "ok" if met else "MISSED"
        lines.append(f"  {check['title']:<34} {shown:>12}  {verdict}")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _saturation_text(sat: dict[str, Any]) -> str:
    """``box: 187 % of 200 % (server 1: 61 %, ...) — saturated``, the busiest first."""
    parts = ", ".join(f"{x['name']}: {x['cpu_percent']:.0f} %" for x in sat["processes"])
    other = sat.get("other_percent")
    return (
        f"box: {sat['used_percent']:.0f} % of {sat['capacity_percent']:.0f} % "
        f"({parts or 'CPU unknown'})"
        + (f" + other processes {other:.0f} %" if other is not None and other >= 5.0 else "")
        + (" — saturated" if sat["saturated"] else " — not saturated")
    )


def _pct_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f} MiB"


# -- the command -----------------------------------------------------------------------------------


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``presence-core`` subcommands (an argparse subparsers object)."""
    bench: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="load a presence server with many WebSocket clients and report what it did",
        description="N clients over T topics join, track, update their metas at a set rate "
        "and switch channels once; reports connect, diff propagation and switch times, "
        "delivered vs expected diffs, errors and the server's CPU and RSS.",
    )
    add_arguments(bench)
    return bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options."""
    parser.add_argument("--clients", type=int, default=1000, help="WebSocket clients (1000)")
    parser.add_argument("--topics", type=int, default=10, help="topics they spread over (10)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="meta updates per second across all clients (1 %% of the clients)",
    )
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds of run after all joined (30)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes (one per 5,000 clients, at most the CPU count)",
    )
    parser.add_argument(
        "--url",
        action="append",
        default=None,
        help="ws:// URL of a running server, once per server: the clients spread over them "
        "(default: start presence-core serve here)",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        help="servers started here, sharing --redis or --redis-cluster (1)",
    )
    shared = parser.add_mutually_exclusive_group()
    shared.add_argument("--redis", metavar="URL", help="the started servers share through Redis")
    shared.add_argument(
        "--redis-cluster", metavar="URL", help="the started servers share through Redis Cluster"
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=None,
        help="PID of the --url server, for CPU and RSS (once per --url, in the same order)",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=_HEARTBEAT, help="heartbeat interval (25 s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="clients connecting at once, in all (100)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds a client may take to join (30)"
    )
    parser.add_argument(
        "--switch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each client switches channel once during the run (on)",
    )
    parser.add_argument(
        "--switch-fraction",
        type=float,
        default=1.0,
        help="the share of the clients that switch, each once (1.0: every client)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        default=None,
        help="each client sends an HS256 token of its own signed with this secret (sub = its "
        "presence key, role authenticated, exp in an hour) as the apikey query parameter; a "
        "server started here verifies them (serve --presence-key-claim sub); prefer "
        f"${_JWT_ENV}, which keeps it out of ps",
    )
    parser.add_argument(
        "--target",
        action="append",
        type=_target,
        default=[],
        metavar="NAME=LIMIT",
        help="change a target the report checks (repeatable); the command exits 1 when a "
        "target or a check is missed.  Names and defaults: "
        + ", ".join(f"{name}={limit:g}" for name, limit in TARGET_DEFAULTS.items()),
    )
    parser.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="draw latency percentiles, connections and server CPU over time "
        '(needs matplotlib: pip install "presence-core[plot]")',
    )


def _target(text: str) -> tuple[str, float]:
    """``NAME=LIMIT`` for ``--target`` (an argparse type)."""
    name, _, limit = text.partition("=")
    name = name.strip()
    if name not in TARGET_DEFAULTS:
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a target; the targets are {', '.join(TARGET_DEFAULTS)}"
        )
    try:
        value = float(limit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=LIMIT (a number)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the limit must be a number >= 0")
    return name, value


def run(args: argparse.Namespace) -> int:
    """``presence-core bench`` with parsed arguments; returns the exit status: 0 when every
    check of the report is met (or could not be measured), 1 when one is missed or the run
    could not be made, 2 for options that do not go together."""
    urls: list[str] = args.url or []
    pids: list[int] = args.server_pid or []
    cfg = BenchConfig(
        clients=args.clients,
        topics=args.topics,
        rate=args.rate,
        duration=args.duration,
        processes=args.processes,
        url=urls[0] if urls else None,
        redis=args.redis,
        server_pid=pids[0] if pids else None,
        servers=args.servers,
        redis_cluster=args.redis_cluster,
        urls=urls,
        server_pids=pids,
        heartbeat=args.heartbeat,
        concurrency=args.concurrency,
        timeout=args.timeout,
        switch=args.switch,
        switch_fraction=args.switch_fraction,
        seed=args.seed,
        progress=not args.no_progress,
        targets={**TARGET_DEFAULTS, **dict(args.target)},
        # an empty value counts as unset, as for serve
        jwt_secret=args.jwt_secret or os.environ.get(_JWT_ENV) or None,
    )
    problem = None
    if urls and (cfg.redis or cfg.redis_cluster):
        problem = "--redis and --redis-cluster apply to the servers started here, not --url"
    elif urls and args.servers != 1:
        problem = "--servers starts servers here; with --url, give --url once per server"
    elif urls and pids and len(pids) != len(urls):
        problem = "give --server-pid once per --url, in the same order"
    elif args.servers < 1:
        problem = "--servers must be positive"
    elif args.servers > 1 and not (cfg.redis or cfg.redis_cluster):
        problem = "several --servers share presence through --redis URL or --redis-cluster URL"
    if problem is None and args.plot and not bench_plot.matplotlib_available():
        problem = bench_plot.MISSING
    if problem is not None:
        print(f"presence-core bench: {problem}", file=sys.stderr)
        return 2
    try:
        report = run_bench(cfg)
    except BenchError as exc:
        print(f"presence-core bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("presence-core bench: interrupted; clients and server stopped", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if args.plot:
        bench_plot.plot_report(report, args.plot)
    missed = [check["title"] for check in report["checks"] if check["met"] is False]
    if missed:
        print(f"presence-core bench: missed: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m presence_core.server.bench [options]``: the same as ``presence-core bench``."""
    parser = argparse.ArgumentParser(prog="presence-core bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
