"""One presence process for the multi-process tests: a Tracker and a RedisStore with peers.

Run as ``python peer_worker.py URL NODE OPTIONS_JSON``.  It reads one JSON command per line on
stdin and answers each with one JSON line on stdout; it flushes its Tracker every 5 ms, as a
host's tick would.  Every diff its Tracker delivers is recorded, to count leaves.

Commands (``{"op": ...}``): ``track`` / ``update`` (conn, topic, key, meta) -> ref;
``untrack`` (conn, topic); ``disconnect`` (conn); ``drain`` (flush, then wait until Redis has
it all); ``state`` -> every topic's list, this process's own refs, and the leaves seen per ref;
``stop`` (graceful: own members removed) -> then the process exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from presence_core import Tracker
from presence_core.store import RedisStore


class Worker:
    def __init__(self, url: str, node: str, options: dict[str, Any]) -> None:
        self.tracker = Tracker(node=node, clock=time.time)
        self.tracker.add_transport(self.record)
        self.store = RedisStore(self.tracker, url, **options)
        self.leaves: Counter[str] = Counter()

    def record(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        if event == "presence_diff":
            for entry in payload["leaves"].values():
                for meta in entry["metas"]:
                    self.leaves[meta["phx_ref"]] += 1

    async def tick(self) -> None:
        while True:
            self.tracker.tick()
            await asyncio.sleep(0.005)

    async def handle(self, command: dict[str, Any]) -> Any:
        op = command["op"]
        t = self.tracker
        if op == "track":
            return t.track(command["conn"], command["topic"], command["key"], command["meta"])
        if op == "update":
            return t.update(command["conn"], command["topic"], command["key"], command["meta"])
        if op == "untrack":
            return t.untrack(command["conn"], command["topic"])
        if op == "disconnect":
            return t.disconnect(command["conn"])
        if op == "drain":
            t.flush()
            await self.store.drain(timeout=10)
            return True
        if op == "state":
            return {
                "lists": {topic: t.list(topic) for topic in t.topics()},
                "own": sorted(p[2].decode() for topic in t.topics() for p in t.presences(topic)),
                "leaves": dict(self.leaves),
            }
        if op == "stop":
            await self.store.stop()
            return True
        raise ValueError(f"unknown op {op!r}")

    async def run(self) -> None:
        await self.store.start()
        ticker = asyncio.get_running_loop().create_task(self.tick())
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            try:
                result = {"ok": await self.handle(command)}
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(result), flush=True)
            if command["op"] == "stop":
                break
        ticker.cancel()


if __name__ == "__main__":
    asyncio.run(Worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])).run())
