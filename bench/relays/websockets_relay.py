"""A plain WebSocket relay on `websockets`' asyncio server: an anchor for the server benchmark.

It speaks the Phoenix v2 subset ``presence-core bench`` uses and does no presence work: a
track is relayed to the topic's members as one ``presence_diff``, serialized once and handed to
``websockets.asyncio.server.broadcast`` for every member (the sender included), and the
``presence_state`` a join gets is empty.  The same subset as ``ws_relay.mjs``::

    python bench/relays/websockets_relay.py --port 0 [--host 127.0.0.1]

prints ``listening <port>`` on stdout once it accepts connections.  WebSockets at any path
ending in ``/websocket``; SIGTERM or SIGINT stops it.  Runs on uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response


@dataclass(slots=True)
class Channel:
    """One socket's membership of one topic."""

    key: str
    meta: dict[str, Any] | None = None  # the last meta it tracked


class Relay:
    """Topics and their members; one `handler` call per WebSocket."""

    def __init__(self) -> None:
        self.topics: dict[str, set[ServerConnection]] = {}
        self.refs = itertools.count(1)  # each relayed meta's phx_ref: unique in this process

    def diff(self, topic: str, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        members = self.topics.get(topic)
        if members:
            # Serialized once; broadcast encodes it once and frames it for each member.
            frame = [None, None, topic, "presence_diff", {"joins": joins, "leaves": leaves}]
            broadcast(members, _text(frame))

    def leave(self, ws: ServerConnection, channels: dict[str, Channel], topic: str) -> None:
        """Take the socket out of the topic, then tell the members left if it had tracked."""
        channel = channels.pop(topic, None)
        if channel is None:
            return
        members = self.topics.get(topic)
        if members is not None:
            members.discard(ws)
            if not members:
                del self.topics[topic]
        if channel.meta is not None:
            self.diff(topic, {}, {channel.key: {"metas": [channel.meta]}})

    async def handler(self, ws: ServerConnection) -> None:
        channels: dict[str, Channel] = {}
        try:
            async for text in ws:
                if isinstance(text, str):
                    await self.handle(ws, channels, text)
        except ConnectionClosed:
            pass
        finally:
            for topic in list(channels):
                self.leave(ws, channels, topic)

    async def handle(self, ws: ServerConnection, channels: dict[str, Channel], text: str) -> None:
        try:
            join_ref, ref, topic, event, payload = orjson.loads(text)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return
        payload = payload if isinstance(payload, dict) else {}
        if topic == "phoenix":
            if event == "heartbeat":
                await ws.send(_reply(None, ref, topic))
            return
        if event == "phx_join":
            if topic in channels:  # a rejoin replaces the old membership
                self.leave(ws, channels, topic)
            config = payload.get("config")
            presence = config.get("presence") if isinstance(config, dict) else None
            key = presence.get("key") if isinstance(presence, dict) else None
            channels[topic] = Channel(str(key) if key else f"k{next(self.refs)}")
            self.topics.setdefault(topic, set()).add(ws)
            await ws.send(_reply(ref, ref, topic, {"postgres_changes": []}))
            await ws.send(_text([ref, None, topic, "presence_state", {}]))
            return
        channel = channels.get(topic)
        if channel is None:
            await ws.send(_reply(join_ref, ref, topic, {"reason": "unmatched topic"}, "error"))
            return
        if event == "phx_leave":
            await ws.send(_reply(join_ref, ref, topic))
            await ws.send(_text([join_ref, ref, topic, "phx_close", {}]))
            self.leave(ws, channels, topic)
        elif event == "presence" and payload.get("event") == "track":
            await ws.send(_reply(join_ref, ref, topic))
            meta = payload.get("payload")
            meta = {**(meta if isinstance(meta, dict) else {}), "phx_ref": f"r{next(self.refs)}"}
            channel.meta = meta
            self.diff(topic, {channel.key: {"metas": [meta]}}, {})
        elif event == "presence" and payload.get("event") == "untrack":
            await ws.send(_reply(join_ref, ref, topic))
            old, channel.meta = channel.meta, None
            if old is not None:
                self.diff(topic, {}, {channel.key: {"metas": [old]}})
        else:  # access_token and the like: accepted, nothing to relay
            await ws.send(_reply(join_ref, ref, topic))


def _text(frame: list[Any]) -> str:
    return orjson.dumps(frame).decode()


def _reply(join_ref: Any, ref: Any, topic: str, response: Any = None, status: str = "ok") -> str:
    body = {"status": status, "response": {} if response is None else response}
    return _text([join_ref, ref, topic, "phx_reply", body])


def only_websocket_paths(ws: ServerConnection, request: Request) -> Response | None:
    path = request.path.partition("?")[0].rstrip("/")
    if not path.endswith("/websocket"):
        return ws.respond(HTTPStatus.NOT_FOUND, "")
    return None


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = Relay()
    # Neither compression nor pings: the bench client offers no extension, and the Node relay
    # and our server send no keepalive pings either.
    async with serve(
        relay.handler,
        host,
        port,
        compression=None,
        ping_interval=None,
        process_request=only_websocket_paths,
        backlog=4096,  # as our server: the bench connects 100 clients at a time
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"listening {bound}", flush=True)
        await stop.wait()  # leaving the block closes the listener and any socket still open


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one descriptor per client
    _run(main(args.host, args.port))
    sys.exit(0)
