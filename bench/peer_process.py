"""One process of the cross-process propagation benchmark (`test_bench_peers.py` starts two).

    python bench/peer_process.py send URL OUT [options]
    python bench/peer_process.py receive URL OUT [options]

Each role runs a `Tracker` with a `RedisStore` (``peers=True``) on ``URL`` and ticks the Tracker
every ``--tick`` seconds (``tracker.tick()``: expire then flush), as a host does.  It prints
``ready`` on stdout once its store has started, and writes its results to ``OUT`` as JSON.

* ``send``: holds ``--per-topic`` presences in each of ``--topics`` measured topics (one
  connection each), and makes ``--rate`` meta updates a second over them, round robin, for
  ``--warmup`` then ``--seconds`` seconds, then drains its store and exits.  The updates run on
  a schedule: update ``i`` is due at ``start + i / rate``, and each tick makes every update due
  by then, then flushes.  Every meta carries two wall-clock stamps (``time.time()``): ``a``,
  the time the update was due (it "arrived"), and ``m``, the time the update call was made
  (just before the tick's flush); ``n`` is its sequence number, negative during the warmup.
  With ``--load N`` it also holds N presences in ``--load-topics`` other topics (tracked at
  once after ``ready``, during the warmup) and updates them at ``--load-rate`` a second on the
  same schedule: the background load, which the receiver mirrors but does not listen to.
* ``receive``: subscribes to the measured topics and, for every join in every
  ``presence_diff`` it is handed, records ``time.time()`` minus the meta's stamps.  It runs
  until a line arrives on stdin (or stdin closes), then writes what it measured.

Both also report, over the measured window, their CPU share, how late their ticks ran (how long
the event loop was held by other work) and their GC pauses by generation.  ``--gc off``
disables the collector, ``--gc freeze`` calls ``gc.freeze()`` once set up (data points; the
default is the collector on, as users run it).

Both processes run on one machine, so their wall clocks are the same clock.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import threading
import time
from typing import Any

import orjson

from presence_core import Tracker
from presence_core.store import RedisStore


def measured_topic(i: int) -> str:
    return f"room-{i}"


def load_topic(i: int) -> str:
    return f"load-{i}"


def _stdin_closed(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Set ``event`` (on ``loop``) once stdin gives a line or closes."""

    def wait() -> None:
        try:
            sys.stdin.readline()
        finally:
            loop.call_soon_threadsafe(event.set)

    threading.Thread(target=wait, daemon=True).start()


def _gc_setup_done(mode: str) -> None:
    """``--gc freeze``: move everything made so far out of the collector's sight."""
    if mode == "freeze":
        gc.collect()
        gc.freeze()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


class LoopStats:
    """What the process did in the measured window: CPU, how late its ticks ran, GC pauses.

    The window runs from `begin` to the last `mark` (or to `end`): the receiver marks each
    measured update it is handed, so what it does after the sender is gone (its peer's
    ``bye`` drops every remote presence at once) stays out.
    """

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0
        self._cpu0 = self._wall0 = self._last = 0.0
        self.lateness: list[tuple[float, float]] = []  # (when, seconds late)
        self.pauses: list[tuple[float, int, float]] = []  # (when, generation, seconds)
        self._gc_start = 0.0
        self._window = False
        self.started = False

    def begin(self) -> None:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        self._window = self.started = True
        gc.callbacks.append(self._on_gc)

    def mark(self) -> None:
        """The window ends here unless something is marked later."""
        if self._window:
            self._last = time.perf_counter()
            self.cpu = time.process_time() - self._cpu0
            self.wall = self._last - self._wall0

    def end(self, *, at_mark: bool = False) -> None:
        if self._window:
            if not at_mark:
                self.mark()
            self._window = False
            gc.callbacks.remove(self._on_gc)

    def late(self, seconds: float) -> None:
        if self._window:
            self.lateness.append((time.perf_counter(), seconds))

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._gc_start = now
        else:
            self.pauses.append((now, info["generation"], now - self._gc_start))

    def result(self) -> dict[str, Any]:
        late = sorted(s for when, s in self.lateness if when <= self._last)
        pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for when, generation, seconds in self.pauses:
            if when <= self._last:
                pauses[generation].append(seconds)
        return {
            "cpu_seconds": self.cpu,
            "wall_seconds": self.wall,
            "ticks": len(late),
            "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1e3 if late else 0.0,
            "late_max_ms": late[-1] * 1e3 if late else 0.0,
            "gc": {
                str(gen): {"n": len(p), "max_ms": max(p, default=0.0) * 1e3, "ms": sum(p) * 1e3}
                for gen, p in pauses.items()
            },
            "gc_enabled": gc.isenabled(),
            "gc_frozen": gc.get_freeze_count(),
        }


async def _ticker(tracker: Tracker, tick: float, stop: asyncio.Event, stats: LoopStats) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        next_at += tick
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        now = loop.time()
        stats.late(max(0.0, now - next_at))
        next_at = max(next_at, now - tick)  # a late tick does not make the next ones hurry
        tracker.tick()


async def send(args: argparse.Namespace) -> dict[str, Any]:
    tracker = Tracker(node=args.node, clock=time.time, connection_ttl=120.0)
    store = RedisStore(tracker, args.url)
    await store.start()
    # The measured presences: one connection each, `per_topic` in each measured topic.
    slots = [
        (f"c-{t}-{k}", measured_topic(t), f"u-{t}-{k}")
        for k in range(args.per_topic)
        for t in range(args.topics)
    ]
    now = time.time()
    for conn, topic, key in slots:
        tracker.track(conn, topic, key, {"a": now, "m": now, "n": -1})
    load = [(f"l-{i}", load_topic(i % args.load_topics), f"v-{i}") for i in range(args.load)]
    tracker.flush()
    _ready()
    for conn, topic, key in load:
        tracker.track(conn, topic, key, {"s": 0})
    tracker.flush()
    _gc_setup_done(args.gc)

    loop = asyncio.get_running_loop()
    stats = LoopStats()
    rate, tick = args.rate, args.tick
    first_measured = int(args.warmup * rate)
    end = args.warmup + args.seconds
    start_wall = time.time()
    start = next_at = loop.time()
    done = measured = coalesced = load_done = 0
    this_tick: set[int] = set()  # measured slots updated since the last flush
    update = tracker.update
    n_slots, n_load = len(slots), len(load)
    while True:
        elapsed = loop.time() - start
        if elapsed >= end:
            break
        if done >= first_measured and not stats.started:
            stats.begin()
        # Every update due by now, stamped with the time it was due and the time it is made.
        due = int(elapsed * rate)
        while done < due:
            seq = done - first_measured
            slot = done % n_slots
            conn, topic, key = slots[slot]
            update(conn, topic, key, {"a": start_wall + done / rate, "m": time.time(), "n": seq})
            if seq >= 0:
                measured += 1
                # A second update of a presence before a flush replaces the first in the diff.
                if slot in this_tick:
                    coalesced += 1
                this_tick.add(slot)
            done += 1
        if n_load:
            load_due = int(elapsed * args.load_rate)
            while load_done < load_due:
                conn, topic, key = load[load_done % n_load]
                update(conn, topic, key, {"s": load_done + 1})
                load_done += 1
        tracker.tick()
        this_tick.clear()
        next_at += tick
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        now = loop.time()
        stats.late(max(0.0, now - next_at))
        next_at = max(next_at, now - tick)
    stats.end()
    tracker.flush()
    await store.drain(timeout=30.0)
    result = {
        "updates": done,
        "measured": measured,
        "coalesced": coalesced,
        "load_updates": load_done,
        "load_presences": n_load,
        "presences": n_slots,
        "store_errors": store.errors,
        **stats.result(),
    }
    await store.stop()
    return result


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    tracker = Tracker(node=args.node, clock=time.time, connection_ttl=120.0)
    store = RedisStore(tracker, args.url)
    await store.start()
    stats = LoopStats()
    from_made: list[float] = []
    from_arrival: list[float] = []
    diffs = 0

    def on_diff(topic: str, event: str, payload: Any) -> None:
        nonlocal diffs
        if event != "presence_diff":
            return
        now = time.time()
        diffs += 1
        for entry in payload["joins"].values():
            for meta in entry["metas"]:
                if meta.get("n", -1) >= 0:
                    if not from_made:
                        stats.begin()  # the window: first to last measured update received
                    from_made.append(now - meta["m"])
                    from_arrival.append(now - meta["a"])
                    stats.mark()

    for t in range(args.topics):
        tracker.subscribe(measured_topic(t), on_diff)
    stop = asyncio.Event()
    _stdin_closed(asyncio.get_running_loop(), stop)
    ticker = asyncio.create_task(_ticker(tracker, args.tick, stop, stats))
    _gc_setup_done(args.gc)
    _ready()
    await stop.wait()
    stats.end(at_mark=True)
    await ticker
    peers = store.peers
    result = {
        "from_made": from_made,
        "from_arrival": from_arrival,
        "diffs": diffs,
        "remote_presences": len(tracker.remote_presences()),
        "peer_messages": peers.messages if peers else 0,
        "peer_resyncs": peers.resyncs if peers else 0,
        "peer_errors": peers.errors if peers else 0,
        "store_errors": store.errors,
        **stats.result(),
    }
    await store.stop()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("role", choices=["send", "receive"])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--node", default=None)
    parser.add_argument("--topics", type=int, default=50)
    parser.add_argument("--per-topic", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--tick", type=float, default=0.005)
    parser.add_argument("--load", type=int, default=0)
    parser.add_argument("--load-topics", type=int, default=500)
    parser.add_argument("--load-rate", type=float, default=0.0)
    parser.add_argument("--gc", choices=["on", "off", "freeze"], default="on")
    args = parser.parse_args(argv)
    if args.gc == "off":
        gc.disable()
    if args.node is None:
        args.node = "bench-" + args.role
    run = send if args.role == "send" else receive
    result = asyncio.run(run(args))
    with open(args.out, "wb") as out:
        out.write(orjson.dumps(result))


if __name__ == "__main__":
    main()
