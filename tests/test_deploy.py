"""deploy/: the docker-compose example, its Prometheus config and the Grafana dashboard.

Docker is not run here.  The files are parsed and checked against each other, and every metric
the dashboard queries is checked against the metric declarations and against a real ``/metrics``
scrape of a `PresenceServer` sharing presence through a real Valkey, so a renamed metric breaks
this test rather than a panel nobody looks at.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("redis")

from servers import ValkeyServer  # noqa: E402

from presence_core import Tracker  # noqa: E402
from presence_core.metrics import CATALOGUE, MetricDef, Metrics  # noqa: E402
from presence_core.server import PresenceServer  # noqa: E402
from presence_core.store import RedisStore  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "presence-core.json"
NAMESPACE = "presence"

# The sample names a family of each kind shows in a scrape.
_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}

# Words in a PromQL expression that are neither functions (followed by "(") nor metric names.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan"}
)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        board: dict[str, Any] = json.load(f)
    return board


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    panels: list[dict[str, Any]] = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, legend text
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    # The lookbehind skips the unit of a number, as in "offset 5m".
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or following.startswith("("):
            continue  # a keyword or a function call
        names.add(word)
    return names


def queried_metrics(board: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for panel in all_panels(board):
        for target in panel.get("targets", []):
            names |= metric_names(target["expr"])
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        # label_values(metric, label): the metric is the first argument.
        found = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,.*\)\s*", text)
        if found:
            names.add(found.group(1))
    return names


def declared_samples(catalogue: tuple[MetricDef, ...]) -> dict[str, MetricDef]:
    """Every sample name the declarations export, mapped to its declaration."""
    return {
        f"{NAMESPACE}_{metric.name}{suffix}": metric
        for metric in catalogue
        for suffix in _SAMPLE_SUFFIXES[metric.kind]
    }


# --- docker-compose.yml and prometheus.yml -------------------------------------------------


def test_compose_runs_two_serve_processes_on_valkey_with_prometheus_and_grafana() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services: dict[str, Any] = compose["services"]
    assert {"valkey", "prometheus", "grafana"} <= set(services)
    image = services["valkey"]["image"]
    assert image.startswith(("valkey/valkey:", "redis:")), image

    serve = {
        name: shlex.split(service["command"])
        for name, service in services.items()
        if "presence-core" in str(service.get("command", ""))
    }
    assert len(serve) == 2, serve
    nodes = set()
    for name, argv in serve.items():
        assert argv[:2] == ["presence-core", "serve"], argv
        options = dict(zip(argv[2::2], argv[3::2], strict=True))
        assert options["--redis"].startswith("redis://valkey:6379"), argv
        assert options["--host"] == "0.0.0.0" and options["--port"] == "4000", argv
        nodes.add(options["--node"])
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        ).resolve()
        assert "valkey" in services[name]["depends_on"]
    assert len(nodes) == 2, "each serve process needs its own --node"

    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert 'pip install --no-cache-dir ".[redis]"' in dockerfile

    # Prometheus scrapes both serve processes at :4000/metrics.
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    prometheus = load_yaml(DEPLOY / "prometheus.yml")
    targets = set()
    for job in prometheus["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            targets |= set(static["targets"])
    assert targets == {f"{name}:4000" for name in serve}


def test_grafana_provisioning_loads_the_dashboard_from_prometheus() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    mounts = dict(
        volume.removesuffix(":ro").split(":", 1)
        for volume in compose["services"]["grafana"]["volumes"]
    )
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    uids = {source["uid"] for source in datasources if source["type"] == "prometheus"}
    assert any(source["url"] == "http://prometheus:9090" for source in datasources)

    providers = load_yaml(provisioning / "dashboards" / "presence-core.yml")["providers"]
    paths = {provider["options"]["path"] for provider in providers}
    dashboard_mount = mounts["./grafana/presence-core.json"]
    assert str(Path(dashboard_mount).parent) in paths

    board = dashboard()
    used = {panel["datasource"]["uid"] for panel in all_panels(board)}
    used |= {var["datasource"]["uid"] for var in board["templating"]["list"] if "datasource" in var}
    assert used <= uids, f"the dashboard uses datasource uids {used}, provisioned: {uids}"


# --- The dashboard -------------------------------------------------------------------------


def test_dashboard_panels_are_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert board["schemaVersion"] >= 36
    panels = all_panels(board)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in panels:
        assert panel.get("title"), panel
        assert panel.get("datasource"), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            # Every query is narrowed to the instances picked in the template variable.
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    variables = {var["name"] for var in board["templating"]["list"]}
    assert "instance" in variables


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(presence_diff_propagation_seconds_bucket"
        '{instance=~"$instance", job="x"}[1m]))) + on (instance) presence_peers offset 5m'
    )
    assert metric_names(expr) == {"presence_diff_propagation_seconds_bucket", "presence_peers"}


def runtime_samples() -> set[str]:
    """The sample names of prometheus-client's process and GC collectors in a real scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    text = Metrics().to_prometheus().decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        if family.name.startswith(("process_", "python_gc_"))
        for sample in family.samples
    }


def test_every_queried_metric_is_declared() -> None:
    board = dashboard()
    queried = queried_metrics(board)
    declared = declared_samples(CATALOGUE)
    runtime = runtime_samples()
    assert queried, "the dashboard queries no metric"
    missing = sorted(queried - set(declared) - runtime)
    assert not missing, f"the dashboard queries undeclared metrics: {missing}"
    assert {"process_resident_memory_bytes", "python_gc_collections_total"} <= queried
    # The board covers the figures the issue asks for.
    families = {declared[name].name for name in queried - runtime}
    for wanted in (
        "connections",
        "presences",
        "topics",
        "ops",
        "diff_propagation_seconds",
        "pending_changes",
        "redis_flush_lag_seconds",
        "redis_errors",
        "peers",
        "limit_hits",
        "disconnects",
    ):
        assert wanted in families, wanted


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5.0) as response:
        text: str = response.read().decode()
    return text


def test_every_queried_metric_is_in_a_real_scrape(valkey: ValkeyServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    tracker = Tracker(metrics=metrics)

    async def main() -> str:
        store = RedisStore(tracker, valkey.url, prefix="deploy-test")
        await store.start()
        try:
            async with PresenceServer(tracker, host="127.0.0.1", port=0) as server:
                tracker.track("c1", "room:deploy", "alice", {"status": "online"})
                tracker.track("c2", "room:deploy", "bob", {})
                tracker.flush()
                await store.drain(5.0)
                url = f"http://127.0.0.1:{server.port}/metrics"
                return await asyncio.wait_for(asyncio.to_thread(scrape, url), 10.0)
        finally:
            await asyncio.wait_for(store.stop(), 10.0)

    text = asyncio.run(main())
    scraped: set[str] = set()
    for family in text_string_to_metric_families(text):
        # A labelled family with no series yet still shows its HELP and TYPE lines, which is
        # what Prometheus needs to know the name.
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)):
            scraped.add(family.name + suffix)
        scraped |= {sample.name for sample in family.samples}
    missing = sorted(queried_metrics(dashboard()) - scraped)
    assert not missing, f"the dashboard queries metrics /metrics does not serve: {missing}"
    # The store was attached: its metrics are live, not just declared.
    assert "presence_peers" in scraped and "presence_redis_flush_lag_seconds" in scraped
    assert 'presence_ops_total{kind="track"} 2.0' in text
