"""The ``presence-core`` command: ``presence-core serve`` (and ``bench``, see `.bench`).

``serve`` runs a `PresenceServer` (in-process presence by default; ``--redis URL`` or
``--redis-cluster URL`` to share it between processes) until SIGTERM or SIGINT, then stops
gracefully: every client is sent away, and the process's presences leave for everyone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import PresenceError
from ..limits import Limits
from ..scaling import LOAD_SIGNALS, Threshold, ThresholdScaler
from ..tracker import Tracker
from . import bench
from .config import ServerLimits
from .loop import raise_nofile, run
from .server import PresenceServer

__all__ = ["main"]

logger = logging.getLogger("presence_core.server")

_FD_MARGIN = 32  # descriptors besides the clients': listening sockets, Redis, logs, imports


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the audit fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="presence-core", description="presence-core")
    parser.add_argument("--version", action="version", version=f"presence-core {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve presence to Phoenix / Supabase Realtime clients over WebSockets",
        description="Serve presence to phoenix.js, realtime-js and Supabase's Python client. "
        "WebSockets at any path ending in /websocket; GET /health, GET /metrics and the "
        "live dashboard at GET /.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=4000, help="port to listen on (4000)")
    serve.add_argument(
        "--connection-ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a connection that sends nothing for this long leaves (60)",
    )
    serve.add_argument("--node", default=None, help="this process's node name (random)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--redis",
        metavar="URL",
        # Empty counts as unset, so a compose file can pass the variable through unconditionally.
        default=os.environ.get("PRESENCE_CORE_REDIS_URL") or None,
        help="share presence through this Redis; default: $PRESENCE_CORE_REDIS_URL, which "
        "keeps a password in the URL out of ps",
    )
    where.add_argument(
        "--redis-cluster", metavar="URL", help="share presence through this Redis Cluster"
    )
    serve.add_argument("--prefix", default="presence", help="Redis key prefix (presence)")
    serve.add_argument(
        "--liveness-timeout",
        type=float,
        default=9.0,
        metavar="SECONDS",
        help="with Redis: a process not heard of for this long is dead, and its presences "
        "leave everywhere within about this plus a ninth of it (9)",
    )
    defaults = ServerLimits()
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections)
    serve.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=defaults.max_connections_per_ip,
        metavar="N",
        help="open WebSockets one client address may hold (default: no limit, since behind a "
        "proxy or load balancer every client has the proxy's address)",
    )
    serve.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes)
    serve.add_argument("--max-topics", type=int, default=defaults.max_topics_per_connection)
    serve.add_argument("--joins-per-second", type=float, default=defaults.joins_per_second)
    serve.add_argument(
        "--broadcasts-per-second", type=float, default=defaults.broadcasts_per_second
    )
    serve.add_argument(
        "--messages-per-second",
        type=float,
        default=defaults.messages_per_second,
        help="frames a socket may send a second, of any kind; past them the server stops "
        f"reading it for a while ({defaults.messages_per_second:g})",
    )
    serve.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=defaults.max_buffered_bytes,
        help="unread bytes a client may have waiting before it is cut as too slow",
    )
    plan = Limits()
    serve.add_argument(
        "--presence-rate", type=float, default=plan.rate_per_second, help="tracks/s per socket"
    )
    serve.add_argument("--presence-burst", type=int, default=plan.burst)
    serve.add_argument("--max-meta-bytes", type=int, default=plan.max_meta_bytes)
    serve.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not serve the live dashboard at / (see --dashboard-token to keep it)",
    )
    serve.add_argument(
        "--dashboard-token",
        # Empty counts as unset (TOKEN= in an env file); an explicit empty option is refused.
        default=os.environ.get("PRESENCE_CORE_DASHBOARD_TOKEN") or None,
        metavar="TOKEN",
        help="the dashboard's JSON answers only requests carrying this token (open the page "
        "as /?token=TOKEN); default: $PRESENCE_CORE_DASHBOARD_TOKEN, which keeps it out of ps",
    )
    serve.add_argument(
        "--scale",
        action="append",
        type=_threshold,
        default=[],
        metavar="SIGNAL=DOWN:UP",
        help="consult a threshold scaler on this signal (repeatable): ask for more replicas "
        "above UP, allow fewer below DOWN; e.g. connections=5000:20000 or diff_p99_ms=20:75. "
        f"Signals: {', '.join(LOAD_SIGNALS)}.  Decisions are logged and shown on the "
        "dashboard, never acted on",
    )
    serve.add_argument(
        "--scale-max-replicas", type=int, default=10, help="the scaler's ceiling (10)"
    )
    serve.add_argument("--scale-min-replicas", type=int, default=1, help="its floor (1)")
    serve.add_argument(
        "--scale-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between two scaler consultations (15)",
    )
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, answer /health/ready with 503 for this long while still serving "
        "everyone, so a load balancer stops sending new clients first (0; a second SIGTERM "
        "or SIGINT stops at once)",
    )
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    serve.add_argument("--log-level", default="info", help="debug, info, warning... (info)")
    bench.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return bench.run(args)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    # One line per health check or refused handshake is noise; the audit log has what matters.
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
    _raise_open_files(args.max_connections)
    try:
        return run(_serve(args))
    except PresenceError as exc:  # a bad option value, found when the parts are built
        print(f"presence-core serve: error: {exc}", file=sys.stderr)
        return 2


def _raise_open_files(max_connections: int) -> None:
    """Raise the open-files soft limit to the hard one: each client is a descriptor, and the
    usual soft limit of 1,024 would refuse connections long before --max-connections."""
    soft, hard = raise_nofile()
    if soft != resource.RLIM_INFINITY and soft < max_connections + _FD_MARGIN:
        logger.warning(
            "open files limited to %d (hard limit %d): fewer than --max-connections %d "
            "clients can connect; raise the hard limit (ulimit -Hn, LimitNOFILE=, "
            "docker run --ulimit nofile=)",
            soft,
            hard,
            max_connections,
        )


def redis_target(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The Redis URL ``serve`` shares presence through, and whether it is a cluster's.

    --redis-cluster wins: --redis may hold $PRESENCE_CORE_REDIS_URL, a default the mutually
    exclusive group does not see.
    """
    if args.redis_cluster:
        return args.redis_cluster, True
    return args.redis, False


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs.

    redis-py's URL parser, which the store uses, takes the password from the user part
    (``redis://user:pw@host``) or from a ``password`` query argument, so both are redacted.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:  # unparsable, yet it may hold a secret: show the scheme alone
        return url.partition(":")[0] + "://***"
    netloc, query = parts.netloc, parts.query
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(name == "password" for name, _ in pairs):
        redacted = [(name, "***" if name == "password" else value) for name, value in pairs]
        query = urllib.parse.urlencode(redacted, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # Built by hand: urlunsplit would write unix:///path as unix:/path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _threshold(text: str) -> Threshold:
    """``SIGNAL=DOWN:UP`` as a `Threshold` (an argparse type)."""
    signal_name, _, bounds = text.partition("=")
    down, _, up = bounds.partition(":")
    try:
        return Threshold(signal_name.strip(), float(up), float(down))
    except (ValueError, PresenceError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not SIGNAL=DOWN:UP ({exc})") from None


async def _freeze_connections(server: PresenceServer) -> None:
    """Keep settled connections out of full garbage collections.

    Each connection is about 22 objects that the collector tracks, so at 20,000 connections a
    full collection walks some 440,000 objects and stops the loop for 0.2 s (measured), which
    every diff then waits for.  A connection holds no reference cycle (checked: a closed one
    is freed by reference counting alone, frozen or not), so once connections have grown by
    a tenth, a young collection clears the cyclic garbage of the moment and `gc.freeze` moves
    what is left out of the collector's walk.  The cost: cyclic garbage that forms later among
    frozen objects stays until the process ends, which a connection does not produce.
    """
    frozen_at = 0
    while True:
        await asyncio.sleep(1.0)
        count = server.connections
        frozen_at = min(frozen_at, count)  # those that left are freed, frozen or not
        if count > frozen_at * 1.1 + 100:
            gc.collect(1)
            gc.freeze()
            frozen_at = count


async def _serve(args: argparse.Namespace) -> int:
    limits = ServerLimits(
        max_frame_bytes=args.max_frame_bytes,
        max_connections=args.max_connections,
        max_topics_per_connection=args.max_topics,
        joins_per_second=args.joins_per_second,
        broadcasts_per_second=args.broadcasts_per_second,
        max_buffered_bytes=args.max_buffered_bytes,
        max_connections_per_ip=args.max_connections_per_ip,
        messages_per_second=args.messages_per_second,
    )
    plan = Limits(
        rate_per_second=args.presence_rate,
        burst=args.presence_burst,
        max_meta_bytes=args.max_meta_bytes,
        max_topics_per_connection=args.max_topics,
    )
    scalers = []
    if args.scale:
        scalers.append(
            ThresholdScaler(
                args.scale,
                max_replicas=args.scale_max_replicas,
                min_replicas=args.scale_min_replicas,
            )
        )
    tracker = Tracker(
        scalers=scalers,
        connection_ttl=args.connection_ttl,
        node=args.node,
        clock=time.time,  # last-seen times shared through Redis are Unix time
        plans={"default": plan},
        max_connections=max(args.max_connections, 1),
    )
    store = None
    url, cluster = redis_target(args)
    if url:
        from ..store import RedisStore

        store = RedisStore(
            tracker,
            url,
            prefix=args.prefix,
            cluster=cluster,
            liveness_timeout=args.liveness_timeout,
        )
        await store.start()
    server = PresenceServer(
        tracker,
        host=args.host,
        port=args.port,
        limits=limits,
        store=store,
        dashboard=not args.no_dashboard,
        dashboard_token=args.dashboard_token,
        scale_interval=args.scale_interval,
    )
    await server.start()
    # Everything imported and built so far lives as long as the process: keep it out of every
    # full collection (they would walk some 40,000 objects for nothing).
    gc.collect()
    gc.freeze()
    freezer = asyncio.get_running_loop().create_task(_freeze_connections(server))
    logger.info(
        "presence-core serving %s (node %s, %s)",
        server.url,
        tracker.node,
        f"redis {redact_url(url)}" if url else "in-process",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    if args.drain_seconds > 0:
        logger.info("presence-core draining for %.1f s", args.drain_seconds)
        server.begin_drain()
        stop.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.drain_seconds)
    logger.info("presence-core stopping")
    freezer.cancel()
    await server.stop()
    if store is not None:
        await store.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
