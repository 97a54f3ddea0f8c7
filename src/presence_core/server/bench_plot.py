"""``presence-core bench --plot FILE.png``: the report's timeline as one picture.

Three panels share the time axis (seconds since the bench started): diff propagation
p50/p95/p99, the connections joined, and each server's CPU. matplotlib is an optional extra
(``pip install "presence-core[plot]"``), imported only here and only when a plot is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MISSING", "matplotlib_available", "plot_report"]

MISSING = 'matplotlib is needed for --plot: pip install "presence-core[plot]"'


def matplotlib_available() -> bool:
    """True when matplotlib imports (checked before a run, so a missing one fails fast)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def plot_report(report: dict[str, Any], path: str, dpi: int = 100) -> None:
    """Draw ``report["timeline"]`` into the PNG file ``path``."""
    import matplotlib  # noqa: PLC0415 - the optional extra, imported only for a plot

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    timeline = report["timeline"]
    p = report["parameters"]
    fig, (lat_ax, conn_ax, cpu_ax) = plt.subplots(
        3, 1, sharex=True, figsize=(9, 7.5), height_ratios=(3, 2, 2), layout="constrained"
    )
    fig.suptitle(
        f"presence-core bench: {p['clients']:,} clients, {p['topics']:,} topics, "
        f"{p['rate']:g} updates/s, {p['duration']:g} s run"
    )
    run_from, run_to = timeline["run_from"], timeline["run_to"]
    for ax in (lat_ax, conn_ax, cpu_ax):
        ax.axvspan(run_from, run_to, color="0.93", zorder=0)
        ax.grid(True, alpha=0.3)

    rows = [r for r in timeline["diff_latency_ms"] if r["count"]]
    times = [r["t"] for r in rows]
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        lat_ax.plot(times, [r[q] for r in rows], style, marker=".", label=q)
    lat_ax.set_ylabel("diff propagation (ms)")
    if rows:
        lat_ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")  # 2, 5, 10 rather than 2x10^0
        lat_ax.yaxis.set_major_formatter(plain)
        lat_ax.yaxis.set_minor_formatter(plain)
        lat_ax.legend(loc="upper right", fontsize="small")

    conn = timeline["connections"]
    conn_ax.step([c[0] for c in conn], [c[1] for c in conn], where="post")
    conn_ax.set_ylabel("connections joined")
    conn_ax.set_ylim(bottom=0)

    cpu = timeline["server_cpu_percent"]
    servers = len(report["servers"])
    for i in range(servers):
        points = [(c[0], c[1][i]) for c in cpu if i < len(c[1]) and c[1][i] is not None]
        if points:
            label = f"server {i}" if servers > 1 else "server"
            cpu_ax.plot([t for t, _ in points], [v for _, v in points], label=label)
    cpu_ax.set_ylabel("server CPU (% of a core)")
    cpu_ax.set_ylim(bottom=0)
    if servers > 1:
        cpu_ax.legend(loc="upper right", fontsize="small")
    cpu_ax.set_xlabel("seconds since the bench started (shaded: the measured run)")
    cpu_ax.set_xlim(left=0)

    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
