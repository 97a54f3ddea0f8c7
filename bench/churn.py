"""RSS of ``presence-core serve`` over connect/close churn, with serve's own GC policy on.

    python bench/churn.py [--cycles 20000] [--wave 1000] [--src SRC]

A real ``presence-core serve`` process (its ``gc.freeze`` policy included: see
``_freeze_connections`` in ``server/cli.py``) gets waves of ``--wave`` WebSocket clients that
each connect, join a topic, track, and close; each wave opens all of its clients before closing
them, so the connection count grows by a wave and falls back every time, which is when serve
freezes what it holds.  ``--cycles`` connect/close cycles in all.  The RSS of the server (from
``/proc/<pid>/status``) is read after the first tenth of the cycles (the baseline: allocator
pools and caches have grown by then) and after every wave; the table prints each reading and
the ratio of the last to the baseline.  ``--src`` runs another checkout's ``src`` folder (an
old commit, to compare; its pure-Python table is used unless its extension is built in place).

Nothing here asserts: the ratio is for the change's note (target: within 1.00 +- 0.05).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

from presence_core.server.loop import raise_nofile
from presence_core.testing._process import _die_with_parent, _stop_process, free_port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def start_server(src: str | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    code = "import sys; from presence_core.server.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    _stop_process(proc)
    raise RuntimeError("serve did not start")


async def one(url: str, n: int, opened: asyncio.Event, release: asyncio.Event) -> None:
    async with connect(url, ping_interval=None, open_timeout=30) as ws:
        # The same users come back wave after wave, as on a real service: new keys would grow
        # the last-seen table, which is bounded and meant to hold them.
        topic, key = f"room:{n % 50}", f"u{n % 1000}"
        await ws.send(
            f'["1","1","{topic}","phx_join",{{"config":{{"presence":{{"key":"{key}"}}}}}}]'
        )
        await ws.send(f'["1","2","{topic}","presence",{{"event":"track","payload":{{"n":{n}}}}}]')
        await ws.recv()
        opened.set()
        await release.wait()


async def wave(url: str, size: int, first: int) -> None:
    release = asyncio.Event()
    events = [asyncio.Event() for _ in range(size)]
    tasks = []
    for i in range(size):
        tasks.append(asyncio.create_task(one(url, first + i, events[i], release)))
        if i % 100 == 99:
            await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    await asyncio.sleep(1.2)  # serve's freezer looks once a second: let it see the wave
    release.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.5)


async def churn(port: int, pid: int, cycles: int, size: int) -> list[tuple[int, int]]:
    url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"
    readings = []
    done = 0
    while done < cycles:
        await wave(url, size, done)
        done += size
        readings.append((done, rss_kib(pid)))
        print(f"  {done:>7,} cycles  RSS {readings[-1][1] / 1024:8.1f} MiB", flush=True)
    return readings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--wave", type=int, default=1_000)
    parser.add_argument("--src", default=None, help="another checkout's src folder")
    args = parser.parse_args()
    raise_nofile()
    proc, port = start_server(args.src)
    try:
        print(f"serve pid {proc.pid} on port {port} ({args.src or 'this checkout'})")
        readings = asyncio.run(churn(port, proc.pid, args.cycles, args.wave))
    finally:
        _stop_process(proc)
    base_at = max(args.cycles // 10, args.wave)
    base = next(rss for done, rss in readings if done >= base_at)
    last = readings[-1][1]
    print(
        f"RSS after {base_at:,} cycles {base / 1024:.1f} MiB, after {readings[-1][0]:,} "
        f"{last / 1024:.1f} MiB: ratio {last / base:.3f} (target 1.00 +- 0.05)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
