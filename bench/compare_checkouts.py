"""Compare the Tracker's hot paths between two checkouts of presence_core, round by round.

    python bench/compare_checkouts.py OLD_SRC NEW_SRC [--conns 250000] [--rounds 5]

``OLD_SRC`` and ``NEW_SRC`` are ``src`` folders with their extension built in place (for an
old commit: ``git worktree add /tmp/old COMMIT`` then build it, e.g. ``cythonize -i`` on its
``.pyx`` with the same flags as ``setup.py``).  Each round runs one fresh process per checkout,
alternating which goes first, with the garbage collector on as users run; the table prints,
per measurement, the median time of each and the median of the per-round ratios NEW / OLD.
A ratio above 1 means NEW is slower.  Nothing here asserts: this is for the person changing
the code, and for the numbers in a change's note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc, json, random, sys, time
    from presence_core.tracker import Tracker

    conns = int(sys.argv[1])
    rng = random.Random(7)
    ids = [f"conn-{rng.getrandbits(64):016x}" for _ in range(conns)]
    keys = [f"user-{rng.getrandbits(64):016x}" for _ in range(conns)]
    topics = ("room:1", "room:2", "room:3", "room:4")
    out = {}

    def timed(name, ops, fn, *args):
        start = time.perf_counter()
        fn(*args)
        out[name] = (time.perf_counter() - start) / ops * 1e9

    def track_all(tracker, pairs):
        track = tracker.track
        for conn, key in pairs:
            for topic in topics:
                track(conn, topic, key, {"status": "online", "device": "ios", "online_at": 1})

    tracker = Tracker(connection_ttl=3600.0, max_connections=1_000_000)
    timed("track (new presence)", conns * len(topics), track_all, tracker, list(zip(ids, keys)))
    tracker.flush()
    batch = rng.sample(ids, min(100_000, conns))

    def beat(batch):
        heartbeat = tracker.heartbeat
        for conn in batch:
            heartbeat(conn)

    timed("heartbeat", len(batch), beat, batch)
    chunks = [batch[i : i + 10_000] for i in range(0, len(batch), 10_000)]

    def beat_many(chunks):
        for chunk in chunks:
            tracker.heartbeat_many(chunk)

    timed("heartbeat_many (per conn)", len(batch), beat_many, chunks)
    some = rng.sample(range(conns), min(20_000, conns))

    def update(indexes):
        for i in indexes:
            tracker.update(ids[i], "room:1", keys[i], {"status": "away", "device": "ios"})

    timed("update", len(some), update, some)
    timed("flush after updates (per change)", len(some), tracker.flush)

    def untrack(indexes):
        for i in indexes:
            tracker.untrack(ids[i], "room:2")

    timed("untrack", len(some), untrack, some)
    tracker.flush()

    def disconnect(indexes):
        for i in indexes:
            tracker.disconnect(ids[i])

    timed("disconnect", len(some), disconnect, some)
    tracker.flush()
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    out["full gc.collect(), ms"] = (time.perf_counter() - start) * 1e3

    diff = Tracker(connection_ttl=3600.0)
    for i in range(100):
        diff.track(f"m{i}", "big", f"k{i}", {"s": 1})
    diff.flush()
    stamps = []
    def stamp(topic, event, payload):
        stamps.append(time.perf_counter())

    for i in range(2_000):
        diff.subscribe("big", (lambda t, e, p: None) if i < 1_999 else stamp, raw=True)
    samples = []
    for i in range(300):
        start = time.perf_counter()
        diff.track(f"j{i}", "big", f"j{i}", {"s": 1})
        diff.flush()
        samples.append(stamps[-1] - start)
    samples.sort()
    out["diff to 2,000 raw subscribers, p50"] = samples[150] * 1e9
    out["diff to 2,000 raw subscribers, p99"] = samples[296] * 1e9
    print(json.dumps(out))
    """
)


def run(src: str, conns: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=src, PRESENCE_CORE_REQUIRE_EXTENSION="1")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(conns)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--conns", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    old: list[dict[str, float]] = []
    new: list[dict[str, float]] = []
    for i in range(args.rounds):
        order = [(args.old, old), (args.new, new)]
        for src, results in order if i % 2 == 0 else reversed(order):
            results.append(run(src, args.conns))
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{args.conns:,} connections x 4 topics, {args.rounds} rounds, GC on; ns per op")
    print(f"{'measurement':<40} {'old':>12} {'new':>12} {'new/old':>8}")
    for name in old[0]:
        ratios = [n[name] / o[name] for o, n in zip(old, new, strict=True)]
        o_med = statistics.median(r[name] for r in old)
        n_med = statistics.median(r[name] for r in new)
        print(f"{name:<40} {o_med:>12,.1f} {n_med:>12,.1f} {statistics.median(ratios):>8.2f}")


if __name__ == "__main__":
    main()
