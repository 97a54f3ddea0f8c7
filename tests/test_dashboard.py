"""The dashboard's server side: ``GET /api/dashboard`` and the static page, on a real server.

The page itself runs in a real Chromium in test_dashboard_browser.py; these tests pin the JSON
it draws from, against ``/metrics`` and the Tracker, with real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from servers import ValkeyServer
from test_server import Client, run, serving
from test_store_peers import pair, until

from presence_core import Limits, Tracker
from presence_core.errors import MetaTooLarge, PresenceTypeError, PresenceValueError
from presence_core.metrics import (
    DIFF_PROPAGATION_SECONDS,
    LIMIT_HITS,
    OPS,
    SCALER_DECISIONS,
    SCALER_DESIRED_REPLICAS,
    Histogram,
    Metrics,
)
from presence_core.scaling import ScaleDecision, Threshold, ThresholdScaler
from presence_core.server import PresenceServer, ServerLimits
from presence_core.server.dashboard import Dashboard


def get(port: int, path: str) -> tuple[int, bytes, str]:
    """Status, body and content type of ``GET path``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


async def dashboard(server: PresenceServer, query: str = "") -> dict[str, Any]:
    status, body, kind = await asyncio.to_thread(get, server.port, "/api/dashboard" + query)
    assert status == 200 and kind == "application/json", body
    return json.loads(body)  # type: ignore[no-any-return]


async def scrape(server: PresenceServer) -> dict[str, float]:
    """``/metrics`` as ``{sample name with labels: value}``."""
    _, body, _ = await asyncio.to_thread(get, server.port, "/metrics")
    samples = {}
    for line in body.decode().splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        if match and not line.startswith("#"):
            samples[match[1]] = float(match[2])
    return samples


def test_the_answer_agrees_with_metrics_and_follows_presence() -> None:
    async def main() -> None:
        async with serving() as server:
            async with Client.open(server) as a, Client.open(server) as b:
                for client, key in ((a, "ann"), (b, "bo")):
                    jr = await client.join("room:1", key)
                    await client.push("room:1", "presence", {"event": "track", "payload": {}}, jr)
                    await client.until("presence_state")
                await a.until("presence_diff")
                await b.until("presence_diff")
                server._dashboard.sample()  # type: ignore[union-attr]  # as the tick does
                body = await dashboard(server)
                metrics = await scrape(server)
                totals = body["totals"]
                assert totals["connections"] == metrics["presence_connections"] == 2
                assert totals["presences"] == metrics["presence_presences"] == 2
                assert totals["topics"] == metrics["presence_topics"] == 1
                for kind, op in body["ops"].items():
                    assert op["total"] == metrics.get(f'presence_ops_total{{kind="{kind}"}}', 0)
                assert body["ops"]["track"]["total"] == 2
                assert body["diff"]["count"] >= 2 and body["diff"]["p99_ms"] > 0
                history = body["history"]
                assert len(history["t"]) >= 1
                assert all(len(series) == len(history["t"]) for series in history.values())
                assert history["connections"][-1] == 2
                assert body["node"] == server.tracker.node and body["accepting"] is True
                assert body["redis"] is None and body["peers"] == [] and body["scaler"] is None
                assert body["limits"] == []
                assert "topics" not in body and "members" not in body
            await until(lambda: server.connections == 0, 2.0, "both clients gone")
            server.tracker.flush()
            body = await dashboard(server)
            assert body["totals"]["connections"] == body["totals"]["presences"] == 0
            assert body["ops"]["disconnect"]["total"] == 2

    run(main)


def test_the_page_and_its_script_are_served_and_nothing_else() -> None:
    async def main() -> None:
        async with serving() as server:
            status, body, kind = await asyncio.to_thread(get, server.port, "/")
            assert status == 200 and kind.startswith("text/html")
            assert b"/static/dashboard.js" in body
            status, script, kind = await asyncio.to_thread(get, server.port, "/static/dashboard.js")
            assert status == 200 and kind.startswith("text/javascript")
            assert b"/api/dashboard" in script
            assert b"http://" not in script and b"https://" not in script  # offline: no CDN
            for path in ("/static/../server.py", "/static/nope.js", "/static/x", "/api/other"):
                status, _, _ = await asyncio.to_thread(get, server.port, path)
                assert status == 404, path
            for offset in ("-1", "x", "1e3", "%C2%B2", "%D9%A1", "1234567890"):
                status, body, _ = await asyncio.to_thread(
                    get, server.port, f"/api/dashboard?topics=&topics_offset={offset}"
                )
                assert status == 400 and b"topics_offset" in body, offset

        async with serving(dashboard=False) as server:
            for path in ("/", "/api/dashboard", "/static/dashboard.js"):
                status, _, _ = await asyncio.to_thread(get, server.port, path)
                assert status == 404, path

    run(main)


def test_topic_browser_lists_largest_first_and_pages_members() -> None:
    async def main() -> None:
        tracker = Tracker()
        for i in range(120):  # a big topic, from the Tracker directly: 120 sockets are not needed
            tracker.track(f"c{i}", "big", f"user-{i:03}", {"n": i})
        for i in range(3):
            tracker.track(f"c{i}", "small", f"user-{i:03}", {})
        for i in range(60):
            tracker.track(f"d{i}", f"other:{i}", "x", {})
        tracker.flush()
        async with serving(tracker=tracker) as server:
            body = await dashboard(server, "?topics=")
            topics = body["topics"]
            assert topics["total"] == 62 and topics["offset"] == 0 and topics["limit"] == 50
            items = topics["items"]
            assert len(items) == 50
            assert items[0] == {"topic": "big", "keys": 120, "metas": 120}
            assert items[1] == {"topic": "small", "keys": 3, "metas": 3}
            second = (await dashboard(server, "?topics=&topics_offset=50"))["topics"]["items"]
            assert len(second) == 12
            names = [t["topic"] for t in items + second]
            assert len(set(names)) == 62
            only = (await dashboard(server, "?topics=sma"))["topics"]
            assert only["total"] == 1 and only["items"][0]["topic"] == "small"

            seen: list[str] = []
            cursor = ""
            while True:
                query = f"?topic=big&cursor={cursor}" if cursor else "?topic=big"
                members = (await dashboard(server, query))["members"]
                assert members["topic"] == "big" and members["keys"] == 120
                assert len(members["items"]) <= 50
                seen += [m["key"] for m in members["items"]]
                first = members["items"][0]
                assert first["metas"][0]["n"] == int(first["key"][-3:])
                assert "phx_ref" in first["metas"][0]
                if members["next"] is None:
                    break
                cursor = members["next"]
            assert seen == [f"user-{i:03}" for i in range(120)]
            empty = (await dashboard(server, "?topic=nowhere"))["members"]
            assert empty["items"] == [] and empty["next"] is None and empty["keys"] == 0

    run(main)


def test_limit_hits_are_counted_and_shown() -> None:
    async def main() -> None:
        limits = ServerLimits(max_connections=1, max_topics_per_connection=1)
        async with serving(limits=limits) as server, Client.open(server) as a:
            await a.join("one", "ann")
            refused = await a.push("two", "phx_join", {"config": {}})
            reply = await a.until("phx_reply")
            assert reply["ref"] == refused and reply["payload"]["status"] == "error"
            status, _, _ = await asyncio.to_thread(get, server.port, "/socket/websocket")
            assert status == 503  # the second socket: max_connections
            server._dashboard.sample()  # type: ignore[union-attr]
            body = await dashboard(server)
            hits = {row["limit"]: row for row in body["limits"]}
            assert set(hits) == {"max_connections", "max_topics_per_connection"}
            metrics = await scrape(server)
            for limit, row in hits.items():
                assert row["total"] == 1 == row["last_minute"]
                assert row["last_at"] == pytest.approx(time.time(), abs=5)
                assert metrics[f'presence_limit_hits_total{{limit="{limit}"}}'] == 1

    run(main)


def test_scaler_decisions_are_consulted_logged_counted_and_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        scaler = ThresholdScaler([Threshold("connections", 1, 0.5)], max_replicas=4)
        tracker = Tracker(scalers=[scaler])
        assert tracker.scalers == (scaler,)
        async with serving(tracker=tracker, scale_interval=0.05) as server:
            async with Client.open(server), Client.open(server):
                await until(lambda: len(tracker.decisions()) >= 3, 5.0, "three decisions")
                body = await dashboard(server)
        scaling = body["scaler"]
        assert scaling["interval_s"] == 0.05
        decisions = scaling["decisions"]
        assert 3 <= len(decisions) <= 20
        assert [d["at"] for d in decisions] == sorted((d["at"] for d in decisions), reverse=True)
        up = [d for d in decisions if d["action"] == "scale_up"]
        assert up and up[-1]["desired"] == 2 and up[-1]["current"] == 1
        assert "connections 2/replica > scale_up_above 1" in up[-1]["reason"]
        assert "scaler asks for 2 replicas (now 1)" in caplog.text
        metrics = tracker.metrics
        assert isinstance(metrics, Metrics)
        actions = {labels[0]: n for labels, n in metrics.series(SCALER_DECISIONS).items()}
        assert actions["scale_up"] == 1 and sum(actions.values()) == len(tracker.decisions())
        assert metrics.gauge(SCALER_DESIRED_REPLICAS) >= 1

    caplog.set_level("INFO", logger="presence_core.server")
    run(main)


def test_redis_health_and_peers(valkey: ValkeyServer) -> None:
    async def main() -> None:
        async with (
            pair(valkey) as (here, store_here, there, _),
            serving(tracker=here, store=store_here) as server,
        ):
            there.track("c1", "room", "ann", {})
            there.track("c2", "room", "bo", {})
            there.flush()
            await until(lambda: here.remote_nodes().get("node-b") == 2, 5.0, "peer presences")
            body = await dashboard(server)
            redis = body["redis"]
            assert redis["connected"] is True and redis["cluster"] is False
            assert redis["url"] == f"redis://127.0.0.1:{valkey.port}/0"
            assert redis["layout"] in ("hash_ttl", "zset")
            assert redis["errors"] == 0 and redis["flush_lag_s"] >= 0
            assert body["peers"] == [{"node": "node-b", "live": True, "presences": 2}]

    run(main)


def test_histogram_windows_and_metric_reads() -> None:
    metrics = Metrics()
    metrics.observe(DIFF_PROPAGATION_SECONDS, 0.001)
    before = metrics.histogram(DIFF_PROPAGATION_SECONDS)
    for _ in range(99):
        metrics.observe(DIFF_PROPAGATION_SECONDS, 0.1)
    after = metrics.histogram(DIFF_PROPAGATION_SECONDS)
    assert before.count == 1 and after.count == 100  # copies: the first did not move
    window = after.since(before)
    assert window.count == 99 and window.sum == pytest.approx(9.9)
    assert window.quantile(0.01) == pytest.approx(0.1, rel=0.2)
    assert Histogram().since(Histogram()).count == 0
    with pytest.raises(PresenceTypeError):
        after.since([0])  # type: ignore[arg-type]
    metrics.inc(OPS, 3, ("track",))
    assert metrics.series(OPS) == {("track",): 3}
    with pytest.raises(PresenceTypeError, match="histogram"):
        metrics.series(DIFF_PROPAGATION_SECONDS)


def test_serve_options_for_the_scaler_and_the_dashboard(capsys: pytest.CaptureFixture[str]) -> None:
    from presence_core.server.cli import _parser

    args = _parser().parse_args(
        ["serve", "--scale", "connections=5000:20000", "--scale", "diff_p99_ms=20:75"]
    )
    assert [(t.signal, t.scale_down_below, t.scale_up_above) for t in args.scale] == [
        ("connections", 5000.0, 20000.0),
        ("diff_p99_ms", 20.0, 75.0),
    ]
    assert args.no_dashboard is False and args.scale_interval == 15.0
    assert args.dashboard_token is None  # PRESENCE_CORE_DASHBOARD_TOKEN is unset here
    for bad in ("nope=1:2", "connections=1:x", "connections=5:1", "connections"):
        with pytest.raises(SystemExit) as exit_info:
            _parser().parse_args(["serve", "--scale", bad])
        assert exit_info.value.code == 2
        assert "is not SIGNAL=DOWN:UP" in capsys.readouterr().err


def test_a_failing_answer_costs_one_500_not_the_server(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, Any]:
        raise RuntimeError("a bug")

    async def main() -> None:
        async with serving() as server:
            monkeypatch.setattr(server._dashboard, "answer", broken)
            status, body, _ = await asyncio.to_thread(get, server.port, "/api/dashboard")
            assert status == 500 and body == b"dashboard failed\n"
            status, _, _ = await asyncio.to_thread(get, server.port, "/health")
            assert status == 200

    run(main)
    assert "dashboard answer failed" in caplog.text


def test_hostile_requests_get_an_answer_and_nothing_breaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def raw(port: int, path: bytes) -> bytes:
        """The status line for a request path sent as raw bytes (no client would encode it)."""
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(200).split(b"\r\n")[0]

    async def main() -> None:
        async with serving() as server:
            for path, status in (
                (b"/api/dashboard?topics=\xff", b"200"),
                (b"/api/dashboard?topics=&topic=room&cursor=\xff", b"200"),
                (b"/api/dashboard?topic=\xff", b"400"),
                (b"/static/x\x00.js", b"404"),
            ):
                line = await asyncio.to_thread(raw, server.port, path)
                assert line.startswith(b"HTTP/1.1 " + status), (path, line)
            status, _, _ = await asyncio.to_thread(get, server.port, "/health")
            assert status == 200

    run(main)
    assert "Traceback" not in caplog.text and "failed" not in caplog.text


def test_a_scaler_reason_that_json_cannot_carry_is_shown_repaired() -> None:
    def scaler(sample: object) -> ScaleDecision:
        return ScaleDecision("hold", 1, 1, "lone surrogate \udcff here")

    async def main() -> None:
        async with serving(tracker=Tracker(scalers=[scaler]), scale_interval=0.02) as server:
            await until(lambda: bool(server.tracker.decisions()), 2.0, "a decision")
            body = await dashboard(server)
            assert body["scaler"]["decisions"][0]["reason"] == "lone surrogate ? here"

    run(main)


def test_rates_survive_a_wall_clock_step_and_a_shrunk_topic_list_clamps_the_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracker = Tracker()
    for i in range(60):
        tracker.track("c", f"t{i}", "k", {})
    tracker.flush()
    board = Dashboard(tracker)
    for _ in range(10):
        tracker.heartbeat("c")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 30.0)  # NTP steps the clock back
    board.sample()
    answer = board.answer({})
    assert answer["ops"]["heartbeat"]["per_s"] == 10  # 10 heartbeats, over a second at least
    assert answer["history"]["ops_per_s"][-1] == 10
    assert board.answer({"topics": [""], "topics_offset": ["50"]})["topics"]["offset"] == 50
    clamped = board.answer({"topics": [""], "topics_offset": ["500"]})["topics"]
    assert clamped["offset"] == 50 and len(clamped["items"]) == 10
    empty = board.answer({"topics": ["nothing"], "topics_offset": ["50"]})["topics"]
    assert empty["offset"] == 0 and empty["items"] == [] and empty["total"] == 0


def test_a_meta_over_max_meta_bytes_counts_as_a_limit_hit() -> None:
    tracker = Tracker(plans={"default": Limits(max_meta_bytes=64)})
    with pytest.raises(MetaTooLarge):
        tracker.track("c", "room", "k", {"blob": "x" * 100})
    tracker.flush()
    metrics = tracker.metrics
    assert isinstance(metrics, Metrics)
    assert metrics.counter(LIMIT_HITS, "max_meta_bytes") == 1
    assert tracker.totals().presences == 0
    tracker.record_limit_hit("max_connections")  # a host's own limit, counted beside them
    tracker.flush()
    assert metrics.counter(LIMIT_HITS, "max_connections") == 1
    with pytest.raises(PresenceValueError):
        tracker.record_limit_hit("")


def test_a_dashboard_token_guards_the_json_not_the_page() -> None:
    def with_header(port: int, path: str, authorization: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", headers={"Authorization": authorization}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    async def main() -> None:
        async with serving(dashboard_token="s3cret") as server:
            for path in ("/api/dashboard", "/api/dashboard?token=wrong", "/api/dashboard?token="):
                status, body, _ = await asyncio.to_thread(get, server.port, path)
                assert status == 401 and b"token" in body, path
            status, _, _ = await asyncio.to_thread(get, server.port, "/api/dashboard?token=s3cret")
            assert status == 200
            for authorization, want in (("Bearer s3cret", 200), ("Bearer nope", 401)):
                status = await asyncio.to_thread(
                    with_header, server.port, "/api/dashboard", authorization
                )
                assert status == want, authorization
            for path in ("/", "/static/dashboard.js", "/metrics", "/health"):
                status, _, _ = await asyncio.to_thread(get, server.port, path)
                assert status == 200, path  # no member data there

    run(main)
    with pytest.raises(PresenceValueError):
        PresenceServer(Tracker(), dashboard_token="")
