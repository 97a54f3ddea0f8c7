"""Shared data for the table benchmarks, and the summary printed after them.

Every implementation is measured on the same key objects: one list of random string keys is
made once per session, and containers at N entries are built from it once per implementation,
on first use, then shared by the tests that leave them as they found them (touch, get, and
insert, which takes a batch out before each round and puts it back in the round).

Two things keep a freshly built container from looking better than a long-running one:

* **Aging.**  Built in key order, a container's recency list follows memory order, so
  unlinking an entry finds its neighbours in the same or the next cache line.  In a real
  table heartbeats arrive in random order.  So each container gets one heartbeat sweep over
  every key in a random order before it is measured; its recency neighbours are then random.
* **A fresh random order for every use.**  Touching a batch leaves its entries adjacent in
  recency order; if the next test touched the same batch in the same order, each unlink would
  find its neighbour already in cache.  So every benchmark draws the batches of a new random
  permutation of the keys: statistically the same workload for every implementation, never
  one another test has just laid out.

`PRESENCE_BENCH_N` shrinks N for a quick look (default 1,000,000; the targets are for 1M).

The garbage collector stays on during timed calls, for every contender, as users run them
(`_gc_back_on` turns it back on after any test that switched it off, whatever happens).

After the run, `pytest_terminal_summary` reads what pytest-benchmark collected, turns it into
ns per operation and prints each target (stated in `TARGETS` below) with PASS or MISS.  It
asserts nothing: a benchmark informs, it does not gate.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from table_workload import (
    OURS,
    OURS_PURE,
    SEED,
    N,
    Prebuilt,
    Workload,
)

import presence_core


@pytest.fixture(autouse=True)
def _gc_back_on() -> Iterator[None]:
    # Some benchmarks (the tracker's) switch the collector off for a while; a failing one
    # would leave it off for every test after it.  Turn it back on whatever happens.
    yield
    gc.enable()


@pytest.fixture(scope="session")
def workload() -> Workload:
    return Workload(N)


@pytest.fixture(scope="session")
def prebuilt(workload: Workload) -> Prebuilt:
    return Prebuilt(workload)


# Bytes per entry, filled by test_bytes_per_entry and printed by the summary.
MEMORY = pytest.StashKey[dict[str, dict[str, float]]]()


@pytest.fixture(scope="session")
def memory_results(request: pytest.FixtureRequest) -> dict[str, dict[str, float]]:
    return request.config.stash.setdefault(MEMORY, {})


# -- header ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_report_header(config: pytest.Config) -> list[str]:
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"presence_core.USING_EXTENSION={presence_core.USING_EXTENSION} "
        f"(PresenceTable from {presence_core.PresenceTable.__module__})",
        f"python {platform.python_implementation()} {sys.version.split()[0]}; "
        f"machine {platform.machine()} {_cpu_model()}, {os.cpu_count()} cpus, "
        f"{platform.system()} {platform.release()}; load average {load}",
        f"bench: N={N:,} random string keys (seed {SEED}); GC on during timed calls",
    ]


# -- summary --------------------------------------------------------------------------------

# The targets, one row each: label, group, our variant, anchor (group, variant), target ratio
# of our median to the anchor's, both measured in this run at N = 1M with the collector on:
#   touch one key <= 1.0 x lru-dict re-set; insert <= 1.2 x lru-dict; get <= 1.2 x dict.get;
#   touch_many (batch of 10k) <= 0.5 x a dict re-set loop, per key;
#   expire all N <= 0.2 x TTLCache.expire() of N; drain_dirty all N <= 0.2 x TTLCache.expire().
TARGETS = [
    ("heartbeat: touch(k, now=)", "1-touch", "ours-now", ("1-touch", "lru_dict"), 1.0),
    ("heartbeat: touch(k), clock", "1-touch", "ours-clock", ("1-touch", "lru_dict"), 1.0),
    ("insert new key", "2-insert", OURS, ("2-insert", "lru_dict"), 1.2),
    ("get", "3-get", OURS, ("3-get", "dict-get"), 1.2),
    ("touch_many, per key", "4-touch_many", "ours-touch_many", ("4-touch_many", "dict"), 0.5),
    ("expire all", "5-expire_all", OURS, ("5-expire_all", "ttlcache"), 0.2),
    ("drain_dirty all", "6-drain_all", OURS, ("5-expire_all", "ttlcache"), 0.2),
]
# Ratios worth seeing that have no target.
INFO = [
    ("get vs dict[k]", "3-get", OURS, "dict-subscript"),
    ("touch_many vs touch loop", "4-touch_many", "ours-touch_many", "ours-touch"),
    ("expire all vs dict scan", "5-expire_all", OURS, "dict-scan"),
]
BYTES_TARGET = 80.0
REFERENCE = {"1-touch": "ours-now", "4-touch_many": "ours-touch_many"}  # else OURS


def _collect(config: pytest.Config) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, variant) -> medians per round and per operation, from pytest-benchmark."""
    session = getattr(config, "_benchmarksession", None)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for bench in getattr(session, "benchmarks", None) or []:
        info = bench.extra_info
        if not bench.stats or "impl" not in info or bench.has_error:
            continue
        data = bench.stats.data
        out[(bench.group, info["impl"])] = {
            "median_s": statistics.median(data),
            "ns_per_op": statistics.median(data) / info["ops"] * 1e9,
            "spread": (max(data) - min(data)) / statistics.median(data),
            "ops": info["ops"],
            "rounds": len(data),
            "paired": info.get("paired"),
        }
    return out


def _fmt_ns(ns: float) -> str:
    return f"{ns:,.0f} ns" if ns < 100_000 else f"{ns / 1e6:,.1f} ms"


def _fmt_time(r: dict[str, Any]) -> str:
    """Per operation, or per call for the calls that handle all N entries at once."""
    return _fmt_ns(r["median_s"] * 1e9 if r["ops"] == N else r["ns_per_op"])


def _write_groups(tr: Any, results: dict[tuple[str, str], dict[str, Any]]) -> None:
    for group in sorted({group for group, _ in results}):
        rows = sorted(
            ((variant, r) for (g, variant), r in results.items() if g == group),
            key=lambda item: item[1]["ns_per_op"],
        )
        ref = results.get((group, REFERENCE.get(group, OURS)))
        tr.write_line("")
        tr.write_line(f"{group}  ({rows[0][1]['ops']:,} operations per round)")
        for variant, r in rows:
            rel = f"{r['ns_per_op'] / ref['ns_per_op']:6.2f}x ours" if ref else ""
            bulk = r["ops"] == N
            per_round = f"{r['median_s'] * 1e3:9.1f} ms/round" if bulk else ""
            tr.write_line(
                f"  {variant:<21} {r['ns_per_op']:>7,.0f} ns/op {rel}{per_round}"
                f"   {r['rounds']:>2} rounds, spread {r['spread']:4.0%}"
            )


def _write_targets(
    tr: Any, results: dict[tuple[str, str], dict[str, Any]], ours_mem: dict[str, float] | None
) -> None:
    header = (
        f"{'target (GC on)':<27} {'ours':>9}  {'anchor':<18} {'anchor':>9}  "
        f"{'seq.':>6} {'paired':>6}  {'target':>7}  verdict"
    )
    tr.write_line(header)
    tr.write_line("-" * len(header))
    for label, group, mine, (anchor_group, anchor), target in TARGETS:
        a, b = results.get((group, mine)), results.get((anchor_group, anchor))
        if not a or not b:
            tr.write_line(f"{label:<27} {'not run':>9}")
            continue
        ratio = a["ns_per_op"] / b["ns_per_op"]
        paired = a["paired"]["ratio"] if a["paired"] else None
        verdict = "PASS" if (paired if paired is not None else ratio) <= target else "MISS"
        paired_txt = f"{paired:5.2f}x" if paired is not None else f"{'-':>6}"
        anchor_name = f"{anchor}.expire" if anchor_group == "5-expire_all" else anchor
        tr.write_line(
            f"{label:<27} {_fmt_time(a):>9}  {anchor_name:<18} "
            f"{_fmt_time(b):>9}  {ratio:5.2f}x {paired_txt}  <={target:4.2f}x  {verdict}"
        )
    if ours_mem:
        per_entry = ours_mem["bytes"]
        verdict = "PASS" if per_entry <= BYTES_TARGET else "MISS"
        tr.write_line(
            f"{'bytes / entry':<27} {per_entry:>7.1f} B  {'(absolute)':<18} {'':>9}  "
            f"{'':>6} {'':>6}  {'<=' + format(BYTES_TARGET, '.0f') + ' B':>7}  {verdict}"
        )
    for label, group, mine, anchor in INFO:
        a, b = results.get((group, mine)), results.get((group, anchor))
        if a and b:
            tr.write_line(
                f"{'  ' + label:<27} {_fmt_time(a):>9}  {anchor:<18} "
                f"{_fmt_time(b):>9}  {a['ns_per_op'] / b['ns_per_op']:5.2f}x"
            )


def _write_memory(tr: Any, memory: dict[str, dict[str, float]]) -> None:
    tr.write_line("")
    tr.write_line("bytes per entry at N (tracemalloc: memory the build allocated / N; the keys")
    tr.write_line("and the one shared value object existed before, so they are not counted):")
    ours = memory.get(OURS)
    for impl, m in sorted(memory.items(), key=lambda item: item[1]["bytes"]):
        rel = f"{m['bytes'] / ours['bytes']:5.2f}x ours" if ours else ""
        note = ""
        if impl == OURS:
            note += (
                f"   before drain_dirty(): {m['before_drain']:.1f}; sys.getsizeof: "
                f"{m['getsizeof'] / N:.1f}; stats()['memory_bytes']: {m['memory_bytes'] / N:.1f}"
            )
        elif impl == OURS_PURE:
            note += "   (not drained)"
        tr.write_line(f"  {impl:<10} {m['bytes']:6.1f} B {rel}{note}")


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = _collect(config)
    memory = config.stash.get(MEMORY, {})
    if not results and not memory:
        return
    tr = terminalreporter
    tr.write_sep("=", "presence_core vs anchors: medians, ns per operation")
    tr.write_line(
        f"N={N:,}  USING_EXTENSION={presence_core.USING_EXTENSION}  "
        f"python {sys.version.split()[0]}  {_cpu_model()} x{os.cpu_count()}"
    )
    if not presence_core.USING_EXTENSION:
        tr.write_line("WARNING: the compiled table is not live; 'ours' is the pure twin")
    if N != 1_000_000:
        tr.write_line("WARNING: the targets are for N=1,000,000; this run is not comparable")
    _write_groups(tr, results)
    tr.write_line("")
    tr.write_line(
        "seq. = ratio of the medians above; paired = median of per-round ratios, the anchor "
        "timed just before each of our rounds (robust to a noisy machine; it decides)."
    )
    _write_targets(tr, results, memory.get(OURS))
    if memory:
        _write_memory(tr, memory)
