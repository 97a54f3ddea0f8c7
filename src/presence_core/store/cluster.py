"""The data plane's connection to a Redis Cluster: one pipelined connection per primary.

`ClusterConnection` has the interface of `RedisConnection` (``connect``, ``pipeline``,
``execute``, ``close``, ``is_closed``, ``in_flight``), so the store can write to a cluster
without knowing it is one.  A pipeline is split by the hash slot of each command's key, the
parts go to their primaries concurrently (one `RedisConnection.pipeline` each), and the replies
come back in the caller's order, each error reply in its place with the caller's position.  The
commands of one primary are sent in the caller's order, so a write and a later read of one key
in the same pipeline still see each other.

Routing
-------

The slot map comes from ``CLUSTER SLOTS``: it is answered by every Redis since 3.0 and every
Valkey, replicas included, and over TLS it reports the TLS ports.  Only primaries are written
to; replicas are remembered for discovery, since a replica is what a failover promotes.  The key
of a command is its first argument (``HSETEX key ...``, ``SPUBLISH channel ...``: a shard channel
has a slot as a key does), except for the commands in `_KEY_AT_2` and those with a ``numkeys``
argument (``EVAL``/``EVALSHA``/``FCALL``: the first key after ``numkeys``; none means any primary
will do).  A command spanning several keys is routed by its first key: keys of one pipeline
command must share a slot (hash tags), as Redis Cluster requires anyway.  Keyless commands
(``PING``, ``INFO``, ``COMMAND INFO``, ...) go to one primary, except ``SCRIPT LOAD`` and
``SCRIPT FLUSH``, which go to every primary: each primary has its own script cache, and an
``EVALSHA`` can be routed to any of them.  Scripts loaded through this connection are
remembered and loaded again on every primary it connects to later (a promoted replica starts
with an empty cache).  Transactions and ``SELECT`` are refused: their commands would be spread
over nodes that know nothing of each other's ``MULTI``.

Redirections and failures
-------------------------

All of this happens inside `ClusterConnection.pipeline`, for the commands concerned only:

* ``MOVED slot host:port``: the slot changed owner.  The slot map is refreshed (one refresh at a
  time: concurrent requests share the one in flight, and none is made when the map already
  names the new owner), the slot is pinned to the owner the reply names, and the command is
  resent with the others of its new owner.
* ``ASK slot host:port``: the slot is being migrated and this key is already on the target.
  The command is resent to that node preceded by ``ASKING`` (in one pipeline, so on the same
  connection); the map does not change.
* ``TRYAGAIN``, ``CLUSTERDOWN``, and a primary's connection failing (``StoreConnectionError``: the
  node died, or is being failed over): after a short jittered exponential backoff the map is
  refreshed, asking any node that answers (open connections first, then every primary and
  replica last seen, then the address `connect` was given), and the commands are resent to
  whichever primary owns their slot by then, connecting to it if needed.

Resending is correct because the store's commands are idempotent: ``HSETEX`` of the same values,
``HDEL``, ``HPEXPIRE``, ``SADD``, the reap scripts (a field is removed, and returned, once), and
``SPUBLISH`` of diffs that the subscribers apply idempotently.  A command whose connection broke
may have been applied before it is sent again; a caller that sends commands for which that is
wrong must not use this class.

Everything is bounded.  A command is redirected (``MOVED``/``ASK``) at most ``max_redirects``
times, after which the last redirection is its reply, as an error in its place.  The waits for
the cluster to heal (``TRYAGAIN``, ``CLUSTERDOWN``, connection failures) are bounded by
``retry_timeout`` seconds from the call: past it, a command still failing with an error reply
gets that reply in its place, and a command still failing with a connection error makes the
pipeline raise `StoreConnectionError` (``outcome_unknown`` unless nothing at all could have been
applied), as `RedisConnection.pipeline` does when its connection breaks.  Each attempt is
itself bounded by the options' ``connect_timeout`` and ``reply_timeout``, so a pipeline returns
or raises within about ``retry_timeout + reply_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from presence_core.errors import (
    PresenceValueError,
    StoreCommandError,
    StoreConnectionError,
    StoreError,
)
from presence_core.store.connection import (
    Arg,
    ConnectionOptions,
    RedisConnection,
    Reply,
    _check,
    _command_name,
)

__all__ = ["ClusterConnection"]

DEFAULT_MAX_REDIRECTS: Final = 5
DEFAULT_RETRY_TIMEOUT: Final = 10.0

# Backoff between retries while the cluster heals: from 25 ms, doubling, at most 0.5 s, so that a
# promotion is noticed within half a second and a dead node is not hammered.
_BACKOFF_MIN: Final = 0.025
_BACKOFF_MAX: Final = 0.5

# Commands whose key is their second argument (a subcommand comes first).
_KEY_AT_2: Final = frozenset({"OBJECT", "MEMORY", "XGROUP", "XINFO", "BITOP"})

# Commands with a ``numkeys`` argument, by its index: the first key follows it.
_NUMKEYS_AT: Final = {
    "EVAL": 2,
    "EVALSHA": 2,
    "EVAL_RO": 2,
    "EVALSHA_RO": 2,
    "FCALL": 2,
    "FCALL_RO": 2,
    "ZUNION": 1,
    "ZINTER": 1,
    "ZDIFF": 1,
    "ZINTERCARD": 1,
    "SINTERCARD": 1,
    "LMPOP": 1,
    "ZMPOP": 1,
    "BLMPOP": 2,
    "BZMPOP": 2,
}

# Commands with no key (or none that routes them): sent to one primary.
_KEYLESS: Final = frozenset(
    {
        "ACL",
        "AUTH",
        "CLIENT",
        "CLUSTER",
        "COMMAND",
        "CONFIG",
        "DBSIZE",
        "ECHO",
        "FUNCTION",
        "HELLO",
        "INFO",
        "LASTSAVE",
        "LATENCY",
        "PING",
        "PUBLISH",
        "PUBSUB",
        "RANDOMKEY",
        "ROLE",
        "SCRIPT",
        "SLOWLOG",
        "TIME",
        "WAIT",
    }
)

# Commands that make no sense spread over several nodes.
_REFUSED: Final = frozenset({"MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "SELECT"})

# Subcommands of SCRIPT that every primary must see.
_BROADCAST_SCRIPT: Final = frozenset({b"LOAD", b"FLUSH"})


def _as_bytes(part: Arg) -> bytes:
    """An argument as it goes on the wire (as `hiredis.pack_command` encodes it)."""
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    return str(part).encode()


def _key_of(command: Sequence[Arg], name: str) -> bytes | None:
    """The key that routes `command`, or ``None`` when any primary will do."""
    if name in _KEYLESS:
        return None
    index = 1
    if name in _NUMKEYS_AT:
        at = _NUMKEYS_AT[name]
        try:
            numkeys = int(_as_bytes(command[at]))
        except (IndexError, ValueError):
            return None  # malformed: let a server say so
        if numkeys <= 0:
            return None
        index = at + 1
    elif name in _KEY_AT_2:
        index = 2
    elif name in ("XREAD", "XREADGROUP"):
        upper = [_as_bytes(part).upper() for part in command]
        index = upper.index(b"STREAMS") + 1 if b"STREAMS" in upper else len(command)
    if index >= len(command):
        return None
    return _as_bytes(command[index])


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _node_address(node: Reply, asked_host: str) -> str | None:
    """``host:port`` of one node of a ``CLUSTER SLOTS`` entry, or ``None`` if it is unknown.

    A ``NULL`` or empty host means "the host you asked" (a node behind a load balancer, or a
    node that does not know its own address); ``?`` is a node with no usable endpoint.
    """
    host, port = node[0], int(node[1])
    if host is None or host == b"":
        return f"{asked_host}:{port}"
    if host == b"?" or port <= 0:
        return None
    return f"{host.decode()}:{port}"


@dataclass(slots=True)
class _SlotMap:
    slots: list[str | None]
    primaries: list[str]  # ordered by their first slot
    replicas: list[str]


def _parse_slots(reply: Reply, asked_host: str) -> _SlotMap:
    """The slot map from a ``CLUSTER SLOTS`` reply (`ValueError` when it is malformed)."""
    slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    first_slot: dict[str, int] = {}
    replicas: list[str] = []
    try:
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            if not 0 <= start <= end < REDIS_CLUSTER_HASH_SLOTS or len(entry) < 3:
                raise ValueError(f"bad slot range {entry[:2]!r}")
            primary = _node_address(entry[2], asked_host)
            for node in entry[3:]:
                replica = _node_address(node, asked_host)
                if replica is not None and replica not in replicas:
                    replicas.append(replica)
            if primary is None:
                continue
            slots[start : end + 1] = [primary] * (end - start + 1)
            first_slot[primary] = min(first_slot.get(primary, start), start)
    except (TypeError, IndexError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"unexpected CLUSTER SLOTS reply: {exc}") from None
    primaries = sorted(first_slot, key=first_slot.__getitem__)
    return _SlotMap(slots, primaries, [r for r in replicas if r not in first_slot])


def _parse_redirect(text: str, replied_by: str) -> tuple[int, str] | None:
    """``(slot, host:port)`` from the rest of a MOVED/ASK reply, or ``None`` if malformed."""
    parts = text.split()
    if len(parts) != 2:
        return None
    try:
        slot = int(parts[0])
        host, port = _split_address(parts[1])
    except ValueError:
        return None
    if not 0 <= slot < REDIS_CLUSTER_HASH_SLOTS:
        return None
    if not host:  # an unknown endpoint: the host of the node that answered
        host = _split_address(replied_by)[0]
    return slot, f"{host}:{port}"


def _backoff(attempt: int) -> float:
    ceiling = min(_BACKOFF_MAX, _BACKOFF_MIN * 2.0 ** min(attempt - 1, 20))
    return random.uniform(ceiling / 2, ceiling)


def _consume(task: asyncio.Task[Any]) -> None:
    # A shared task whose waiters all gave up: its exception is still retrieved (no warning).
    if not task.cancelled():
        task.exception()


@dataclass(slots=True, eq=False)
class _Item:
    """One command of a pipeline on its way to a node, with what its attempts so far taught."""

    position: int
    command: Sequence[Arg]
    slot: int | None  # None: keyless, any primary
    copy: int | None = None  # a broadcast's copy number (copy 0 answers for the command)
    target: str | None = None  # a fixed node: an ASK target, or a broadcast's primary
    asking: bool = False
    redirects: int = 0
    failure: StoreError | None = None  # the last retryable failure


Outcome: TypeAlias = list[Reply] | StoreError
"""What one node's pipeline came to: its replies in order, or why it failed as a whole."""


class ClusterConnection:
    """Pipelined connections to every primary of a Redis Cluster (see the module's docstring).

    Open one with ``await ClusterConnection.connect(url_or_options)`` (any one node of the
    cluster); close it with `close()` or ``async with``.  Not thread-safe: use it from its event
    loop only.

    Attributes:
        options: The options `connect` was given; every node is reached with them, its host and
            port changed.
        max_redirects: ``MOVED``/``ASK`` redirections allowed per command and pipeline call.
        retry_timeout: Seconds, from a pipeline call, during which failures that the cluster
            heals (``TRYAGAIN``, ``CLUSTERDOWN``, a lost node) are retried.
        redirects: ``MOVED`` and ``ASK`` replies followed, in total.
        refreshes: Slot map refreshes done since `connect`.
    """

    def __init__(
        self,
        options: ConnectionOptions,
        *,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        if isinstance(max_redirects, bool) or not isinstance(max_redirects, int):
            raise PresenceValueError(f"max_redirects must be an int, not {max_redirects!r}")
        if max_redirects < 0:
            raise PresenceValueError(f"max_redirects must be >= 0, not {max_redirects}")
        if not math.isfinite(retry_timeout) or retry_timeout <= 0:
            raise PresenceValueError(
                f"retry_timeout must be a positive number of seconds, not {retry_timeout!r}"
            )
        self.options = options
        self.max_redirects = max_redirects
        self.retry_timeout = float(retry_timeout)
        self.redirects = 0
        self.refreshes = 0
        self._slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._primaries: list[str] = []
        # Every node to ask for the slot map: the seed (kept: its name may resolve anew), then
        # the primaries and replicas of the last map.
        self._seed = options.address
        self._known: dict[str, ConnectionOptions] = {self._seed: options}
        self._conns: dict[str, RedisConnection] = {}
        self._retired: list[RedisConnection] = []  # no longer primaries, batches still in flight
        self._opening: dict[str, asyncio.Task[RedisConnection]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._scripts: dict[bytes, bytes] = {}  # sha1 hex -> body, loaded on every new primary
        self._closed = False

    @classmethod
    async def connect(
        cls,
        target: str | ConnectionOptions,
        *,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> ClusterConnection:
        """Read the slot map from `target` (any node) and connect to every primary.

        Raises `StoreConnectionError` (outcome known: nothing was applied) when neither the
        target nor any primary can be reached, and `StoreCommandError` when a node refuses the
        handshake (``WRONGPASS``) or the target is not in cluster mode.  A primary that cannot
        be reached while others can is not an error: its commands wait for it, or for its
        replica's promotion, within ``retry_timeout``.
        """
        options = ConnectionOptions.from_url(target) if isinstance(target, str) else target
        self = cls(options, max_redirects=max_redirects, retry_timeout=retry_timeout)
        try:
            await self._refresh_once(count=False)
            # Each connect is bounded by connect_timeout itself; this only backs it up.
            deadline = asyncio.get_running_loop().time() + options.connect_timeout + 1.0
            opened = await asyncio.gather(
                *(self._connection(address, deadline) for address in self._primaries),
                return_exceptions=True,
            )
            for result in opened:
                if isinstance(result, StoreCommandError):
                    raise result
                if isinstance(result, BaseException) and not isinstance(result, StoreError):
                    raise result
            if all(isinstance(result, BaseException) for result in opened):
                raise StoreConnectionError(
                    f"no primary of the cluster at {options.address} could be reached: "
                    f"{opened[0] if opened else 'it has none'}",
                    outcome_unknown=False,
                )
        except BaseException:
            self.close()
            raise
        return self

    # State

    @property
    def is_closed(self) -> bool:
        """Whether `close()` was called, or no primary has a usable connection right now.

        Unlike a `RedisConnection`, a cluster connection that lost its nodes is not closed for
        good: until `close()`, a pipeline reconnects to whichever primaries the map names.
        """
        return self._closed or all(conn.is_closed for conn in self._conns.values())

    @property
    def in_flight(self) -> int:
        """Batches written to any node whose replies have not all arrived."""
        conns = [*self._conns.values(), *self._retired]
        return sum(conn.in_flight for conn in conns)

    @property
    def primaries(self) -> list[str]:
        """The primaries of the slot map (``host:port``), ordered by their first slot."""
        return list(self._primaries)

    @property
    def nodes(self) -> list[ConnectionOptions]:
        """Every node the last slot map named (replicas too) and the seed: where to look for
        the cluster when a primary is gone."""
        return list(self._known.values())

    def node_for(self, key: bytes | str) -> str:
        """The address of the primary that owns `key`'s slot, as the slot map says now."""
        slot = key_slot(_as_bytes(key))
        owner = self._slots[slot]
        if owner is None:
            raise StoreError(f"slot {slot} has no owner in the slot map")
        return owner

    # Slot map

    async def refresh(self) -> None:
        """Read the slot map again now (and reconnect to new primaries as pipelines need them).

        Only one refresh runs at a time: a call while one is in flight waits for that one.
        Raises `StoreConnectionError` when no node answers, `StoreCommandError` when the nodes
        refuse ``CLUSTER SLOTS``; the map is unchanged then.
        """
        if self._closed:
            raise StoreConnectionError(self._closed_message(), outcome_unknown=False)
        task = self._refreshing
        if task is None or task.done():
            task = asyncio.create_task(self._refresh_once())
            task.add_done_callback(_consume)
            self._refreshing = task
        # A caller that gives up (a timeout) must not cancel the refresh others wait for.
        await asyncio.shield(task)

    async def _refresh_once(self, *, count: bool = True) -> None:
        slot_map, asked = await self._fetch_map()
        if self._closed:
            if asked is not None:
                asked[1].close()
            return
        self._apply(slot_map, asked)
        if count:
            self.refreshes += 1

    async def _fetch_map(self) -> tuple[_SlotMap, tuple[str, RedisConnection] | None]:
        """The slot map from the first node that gives one, and the connection opened to it.

        Open connections are asked first (no connect), then every node known.  Each node gets
        ``connect_timeout`` to connect and answer.
        """
        failures: list[StoreError] = []
        tried: set[str] = set()
        for address, conn in list(self._conns.items()):
            if conn.is_closed:
                continue
            tried.add(address)
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    reply = await conn.execute(b"CLUSTER", b"SLOTS")
                return self._checked_map(reply, conn.options), None
            except TimeoutError:
                failures.append(self._slots_timeout(address))
            except StoreError as exc:
                failures.append(exc)
        for address, options in list(self._known.items()):
            if address in tried:
                continue
            # Connecting is bounded by connect_timeout itself, and never cancelled from here: a
            # connect cancelled half-way would leave its socket open.
            try:
                temp = await RedisConnection.connect(options)
            except StoreError as exc:
                failures.append(exc)
                continue
            try:
                async with asyncio.timeout(options.connect_timeout):
                    reply = await temp.execute(b"CLUSTER", b"SLOTS")
                return self._checked_map(reply, options), (address, temp)
            except TimeoutError:
                failures.append(self._slots_timeout(address))
            except StoreCommandError as exc:
                failures.append(_not_a_cluster(exc, address))
            except StoreError as exc:
                failures.append(exc)
            temp.close()
        for failure in failures:
            if isinstance(failure, StoreCommandError):
                raise failure
        raise StoreConnectionError(
            f"no node of the cluster gave its slot map: {failures[-1] if failures else 'none'}",
            outcome_unknown=False,
        )

    def _checked_map(self, reply: Reply, options: ConnectionOptions) -> _SlotMap:
        try:
            slot_map = _parse_slots(reply, options.host)
        except ValueError as exc:
            raise StoreConnectionError(f"{options.address}: {exc}", outcome_unknown=False) from None
        if not slot_map.primaries:
            raise StoreConnectionError(
                f"{options.address} is a cluster node but serves no slot: "
                "the cluster is not set up",
                outcome_unknown=False,
            )
        return slot_map

    def _slots_timeout(self, address: str) -> StoreConnectionError:
        return StoreConnectionError(
            f"{address} did not answer CLUSTER SLOTS within {self.options.connect_timeout} s",
            outcome_unknown=False,
        )

    def _apply(self, slot_map: _SlotMap, asked: tuple[str, RedisConnection] | None) -> None:
        self._slots = slot_map.slots
        self._primaries = slot_map.primaries
        primaries = set(slot_map.primaries)
        known = {self._seed: self.options}
        for address in [*slot_map.primaries, *slot_map.replicas]:
            known.setdefault(address, self._options_for(address))
        self._known = known
        if asked is not None:
            address, conn = asked
            current = self._conns.get(address)
            if address in primaries and (current is None or current.is_closed):
                self._conns[address] = conn
            else:
                conn.close()
        # Connections to nodes that are no longer primaries: closed once idle.
        for address, conn in list(self._conns.items()):
            if address not in primaries:
                del self._conns[address]
                self._retired.append(conn)
        still_busy = []
        for conn in self._retired:
            if conn.in_flight and not conn.is_closed:
                still_busy.append(conn)
            else:
                conn.close()
        self._retired = still_busy

    def _options_for(self, address: str) -> ConnectionOptions:
        known = self._known.get(address)
        if known is not None:
            return known
        host, port = _split_address(address)
        return self.options.with_changes(host=host, port=port, path=None)

    # Connections

    async def _connection(self, address: str, deadline: float) -> RedisConnection:
        """The open connection to `address`, connecting (once for all callers) if needed."""
        conn = self._conns.get(address)
        if conn is not None and not conn.is_closed:
            return conn
        task = self._opening.get(address)
        if task is None:
            task = asyncio.create_task(self._open(address))
            self._opening[address] = task
            task.add_done_callback(functools.partial(self._opened, address))
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await asyncio.shield(task)
        except TimeoutError:
            raise StoreConnectionError(
                f"connecting to {address} did not finish within the retry timeout",
                outcome_unknown=False,
            ) from None

    def _opened(self, address: str, task: asyncio.Task[RedisConnection]) -> None:
        if self._opening.get(address) is task:
            del self._opening[address]
        _consume(task)

    async def _open(self, address: str) -> RedisConnection:
        conn = await RedisConnection.connect(self._options_for(address))
        try:
            if self._scripts:
                loads = [(b"SCRIPT", b"LOAD", body) for body in self._scripts.values()]
                await conn.pipeline(loads, raise_on_error=False)
        except BaseException:
            conn.close()
            raise
        if self._closed:
            conn.close()
            raise StoreConnectionError(self._closed_message(), outcome_unknown=False)
        self._conns[address] = conn
        return conn

    def _forget(self, address: str) -> None:
        conn = self._conns.get(address)
        if conn is not None and conn.is_closed:
            del self._conns[address]

    # Commands

    async def execute(self, *args: Arg) -> Reply:
        """Send one command and return its reply; an error reply raises `StoreCommandError`."""
        return (await self.pipeline((args,)))[0]

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], *, raise_on_error: bool = True
    ) -> list[Reply]:
        """Send `commands`, each to the primary of its key's slot, and return one reply per
        command, in the order of `commands`.

        The nodes' pipelines are sent concurrently; redirections and failovers are followed
        within the bounds described in the module's docstring.

        Args:
            commands: Each a sequence of arguments, its name first: ``("HSET", key, f, v)``.
            raise_on_error: As for `RedisConnection.pipeline`: with ``True`` (the default) the
                first error reply raises `StoreCommandError` once every command is answered,
                carrying all the replies (``.replies``) and errors (``.errors``); with ``False``
                each error is returned in its place.  Positions are indexes in `commands`.

        Raises:
            StoreCommandError: A command got an error reply (see `raise_on_error`), or a node
                refused the handshake.
            StoreConnectionError: The connection was closed (outcome known: nothing sent), or
                some command could not be sent to a working primary within ``retry_timeout``
                (outcome unknown, unless nothing at all could have been applied).
            PresenceValueError: A transaction command or ``SELECT``, which cannot be spread over
                nodes; nothing was sent.
        """
        if not commands:
            return []
        if self._closed:
            raise StoreConnectionError(self._closed_message(), outcome_unknown=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        names = [_command_name(command) for command in commands]
        items = self._plan(commands, names)
        replies: list[Reply] = [None] * len(commands)
        copies: dict[int, dict[int, Reply]] = {}
        maybe_applied = False
        attempt = 0
        while True:
            outcomes = await self._send_round(items, deadline)
            retry: list[_Item] = []
            moved: dict[int, str] = {}
            wait = False
            fatal: StoreCommandError | None = None
            for address, group, outcome in outcomes:
                if isinstance(outcome, StoreCommandError):  # a refused handshake
                    fatal = fatal or outcome
                    continue
                if isinstance(outcome, StoreError):
                    if isinstance(outcome, StoreConnectionError) and outcome.outcome_unknown:
                        maybe_applied = True
                    if address is not None:
                        self._forget(address)
                    for item in group:
                        item.failure = outcome
                        if item.asking:  # ask the owner again: it will say where to go
                            item.target, item.asking = None, False
                        retry.append(item)
                    wait = True
                    continue
                maybe_applied = True
                for item, reply in zip(group, outcome, strict=True):
                    if not isinstance(reply, StoreCommandError):
                        self._settle(item, reply, replies, copies)
                        continue
                    kind, _, rest = reply.reply.partition(" ")
                    if kind in ("MOVED", "ASK"):
                        self.redirects += 1
                        item.redirects += 1
                        assert address is not None
                        redirect = _parse_redirect(rest, address)
                        if redirect is None or item.redirects > self.max_redirects:
                            self._settle(item, hiredis.ReplyError(reply.reply), replies, copies)
                            continue
                        slot, node = redirect
                        if kind == "MOVED":
                            moved[slot] = node
                            item.target, item.asking = None, False
                        else:
                            item.target, item.asking = node, True
                        item.failure = reply
                        retry.append(item)
                    elif kind in ("TRYAGAIN", "CLUSTERDOWN"):
                        item.failure = reply
                        if item.asking:
                            item.target, item.asking = None, False
                        retry.append(item)
                        wait = True
                    else:
                        self._settle(item, hiredis.ReplyError(reply.reply), replies, copies)
            if fatal is not None:
                raise fatal
            if not retry:
                break
            if self._closed or loop.time() >= deadline:
                self._give_up(retry, replies, copies, maybe_applied)
                break
            if wait:
                attempt += 1
                await asyncio.sleep(min(_backoff(attempt), max(0.0, deadline - loop.time())))
            if wait or any(self._slots[slot] != node for slot, node in moved.items()):
                await self._refresh_before(deadline)
            for slot, node in moved.items():
                # The owner's own word is newer than any map a peer gave.
                self._slots[slot] = node
            primaries = set(self._primaries)
            for item in retry:
                if item.copy is not None and item.target not in primaries:
                    item.target = None  # its primary is gone: any primary takes the copy
            retry.sort(key=lambda item: (item.position, item.copy or 0))
            items = retry
        for position, answers in copies.items():
            errors = [answers[copy] for copy in sorted(answers) if _is_error(answers[copy])]
            replies[position] = errors[0] if errors else answers[0]
            self._learn_scripts(commands[position], replies[position])
        return _check(replies, names, raise_on_error)

    def _plan(self, commands: Sequence[Sequence[Arg]], names: list[str]) -> list[_Item]:
        items: list[_Item] = []
        for position, (command, name) in enumerate(zip(commands, names, strict=True)):
            if name in _REFUSED:
                raise PresenceValueError(
                    f"{name} (command #{position}) cannot be sent through a ClusterConnection: "
                    "its pipeline is spread over several nodes; nothing was sent"
                )
            if (
                name == "SCRIPT"
                and len(command) > 1
                and _as_bytes(command[1]).upper() in _BROADCAST_SCRIPT
            ):
                targets: list[str | None] = list(self._primaries) or [None]
                for copy, address in enumerate(targets):
                    items.append(_Item(position, command, None, copy=copy, target=address))
                continue
            key = _key_of(command, name)
            items.append(_Item(position, command, None if key is None else key_slot(key)))
        return items

    def _route(self, item: _Item) -> str | None:
        if item.target is not None:
            return item.target
        if item.slot is not None:
            owner = self._slots[item.slot]
            if owner is not None:
                return owner
        # Keyless, or a slot the map has no owner for (that primary will redirect or refuse).
        for address in self._primaries:
            conn = self._conns.get(address)
            if conn is not None and not conn.is_closed:
                return address
        return self._primaries[0] if self._primaries else None

    async def _send_round(
        self, items: list[_Item], deadline: float
    ) -> list[tuple[str | None, list[_Item], Outcome]]:
        """Send every item to its node, one pipeline per node, concurrently."""
        groups: dict[str, list[_Item]] = {}
        outcomes: list[tuple[str | None, list[_Item], Outcome]] = []
        unroutable: list[_Item] = []
        for item in items:
            address = self._route(item)
            if address is None:
                unroutable.append(item)
            else:
                groups.setdefault(address, []).append(item)
        if unroutable:
            error = StoreConnectionError("the slot map names no primary", outcome_unknown=False)
            outcomes.append((None, unroutable, error))
        if len(groups) == 1:
            [(address, group)] = groups.items()
            outcomes.append((address, group, await self._send(address, group, deadline)))
        elif groups:
            results = await asyncio.gather(
                *(self._send(address, group, deadline) for address, group in groups.items())
            )
            outcomes.extend(
                (address, group, result)
                for (address, group), result in zip(groups.items(), results, strict=True)
            )
        return outcomes

    async def _send(self, address: str, items: list[_Item], deadline: float) -> Outcome:
        """One node's pipeline: its replies (``ASKING``'s left out), or why it failed."""
        batch: list[Sequence[Arg]] = []
        for item in items:
            if item.asking:
                batch.append((b"ASKING",))
            batch.append(item.command)
        try:
            conn = await self._connection(address, deadline)
            node_replies = await conn.pipeline(batch, raise_on_error=False)
        except StoreError as exc:
            return exc
        if len(batch) == len(items):
            return node_replies
        replies: list[Reply] = []
        index = 0
        for item in items:
            if item.asking:
                index += 1  # ASKING's own reply: a failed ASKING shows in the command's reply
            replies.append(node_replies[index])
            index += 1
        return replies

    def _settle(
        self, item: _Item, reply: Reply, replies: list[Reply], copies: dict[int, dict[int, Reply]]
    ) -> None:
        if isinstance(reply, StoreCommandError):
            reply = hiredis.ReplyError(reply.reply)
        if item.copy is None:
            replies[item.position] = reply
        else:
            copies.setdefault(item.position, {})[item.copy] = reply

    def _give_up(
        self,
        items: list[_Item],
        replies: list[Reply],
        copies: dict[int, dict[int, Reply]],
        maybe_applied: bool,
    ) -> None:
        """Out of time: error replies go in place; a connection failure fails the pipeline."""
        lost = [item for item in items if isinstance(item.failure, StoreConnectionError)]
        if lost:
            why = "the connection was closed" if self._closed else f"{self.retry_timeout} s passed"
            raise StoreConnectionError(
                f"{len(lost)} of the commands could not be sent to a working primary before "
                f"{why}; last failure: {lost[-1].failure}; the outcome of the pipeline is "
                + ("unknown" if maybe_applied else "that nothing was applied"),
                outcome_unknown=maybe_applied,
            )
        for item in items:
            failure = item.failure
            assert isinstance(failure, StoreCommandError)
            self._settle(item, hiredis.ReplyError(failure.reply), replies, copies)

    def _learn_scripts(self, command: Sequence[Arg], reply: Reply) -> None:
        """Remember scripts loaded (forget them on a flush) to load them on new primaries."""
        if _is_error(reply):
            return
        if _as_bytes(command[1]).upper() == b"FLUSH":
            self._scripts.clear()
        elif len(command) > 2:
            body = _as_bytes(command[2])
            self._scripts[hashlib.sha1(body).hexdigest().encode("ascii")] = body

    async def _refresh_before(self, deadline: float) -> None:
        """Refresh the map if it can be done before `deadline`; a failure keeps the old map."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return
        try:
            async with asyncio.timeout(remaining):
                await self.refresh()
        except (TimeoutError, StoreError):
            pass

    # Closing

    def _closed_message(self) -> str:
        return f"cluster connection via {self._seed} is closed; nothing was sent"

    def close(self) -> None:
        """Close every node's connection; batches still in flight fail with
        `StoreConnectionError`, and pipelines waiting to retry stop retrying."""
        self._closed = True
        for conn in [*self._conns.values(), *self._retired]:
            conn.close()
        self._conns.clear()
        self._retired.clear()

    async def __aenter__(self) -> ClusterConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<ClusterConnection via {self._seed}, {len(self._primaries)} primaries, {state}>"


def _not_a_cluster(error: StoreCommandError, address: str) -> StoreCommandError:
    """``CLUSTER SLOTS`` refused: say plainly when it is because the node is not clustered."""
    if "cluster support disabled" not in error.reply.lower():
        return error
    return StoreCommandError(
        f"{error.reply} ({address} is a standalone server, not a cluster node: "
        "use RedisConnection for it)",
        command="CLUSTER",
    )


def _is_error(reply: Reply) -> bool:
    return type(reply) is hiredis.ReplyError
