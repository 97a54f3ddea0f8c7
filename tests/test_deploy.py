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


# --- Dockerfile and .dockerignore -----------------------------------------------------------

ROOT = DEPLOY.parent


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation"
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The build stages: each a list of instructions, starting with its FROM."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            out.append([])
        assert out, f"{keyword} before the first FROM"
        out[-1].append((keyword, rest))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    return stages((DEPLOY / "Dockerfile").read_text(encoding="utf-8"))


def test_the_image_is_built_in_two_stages_and_ships_no_compiler() -> None:
    build, final = dockerfile_stages()  # exactly two
    build_from = build[0][1].split()
    assert build_from[0] == "python:3.11-slim" and build_from[1].upper() == "AS"
    name = build_from[2]
    assert final[0][1] == "python:3.11-slim"

    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert "build-essential" in build_runs  # the compiler is in the builder...
    assert ("ENV", "PRESENCE_CORE_REQUIRE_EXTENSION=1") in build  # ...and must be used
    wheel = re.search(r"pip wheel .*--wheel-dir (\S+) \"\.\[redis\]\"", build_runs)
    assert wheel, build_runs
    wheels = wheel.group(1)

    # The final stage installs those wheels, offline, and builds nothing.
    final_text = " ".join(rest for _, rest in final)
    for tool in ("build-essential", "gcc", "g++", "clang", "make ", "apt-get install"):
        assert tool not in final_text, tool
    assert not any(keyword in ("COPY", "ADD") and "--from" not in rest for keyword, rest in final)
    installs = [rest for keyword, rest in final if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1, installs
    install = installs[0]
    mount = re.search(r"--mount=(\S+)", install)
    assert mount, install
    options = dict(part.split("=", 1) for part in mount.group(1).split(","))
    assert options["from"] == name and options["source"] == wheels
    assert f"--no-index --find-links {options['target']}" in install
    assert '"presence-core[redis]"' in install


def test_the_image_runs_as_a_user_other_than_root() -> None:
    final = dockerfile_stages()[-1]
    keywords = [keyword for keyword, _ in final]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets no USER: the server would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), users[-1]
    # Set after the last RUN (which may need root), and before what the container runs.
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:]
    assert keywords.index("CMD") > last_user
    # The user exists with that UID.
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert f"useradd --system --uid {user}" in runs


def test_the_image_checks_its_liveness_with_python() -> None:
    final = dockerfile_stages()[-1]
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    options, _, command = checks[0].partition("CMD")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)  # the exec form: no shell needed
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "curl" not in checks[0] and "wget" not in checks[0]
    (url,) = re.findall(r"'(http://[^']+)'", argv[2])
    assert url == "http://127.0.0.1:4000/health/live"
    # The port is the one the container serves on.
    cmd = json.loads(next(rest for keyword, rest in final if keyword == "CMD"))
    assert cmd[:2] == ["presence-core", "serve"]
    assert cmd[cmd.index("--port") + 1] == "4000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert ("EXPOSE", "4000") in final
    compile(argv[2], "<healthcheck>", "exec")  # valid Python


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern that matches
    the path or one of its parent directories decides; ``!`` patterns bring a path back."""
    verdict = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif body.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif body[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif body[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif body[i] == "[":
                end = body.index("]", i)
                regex, i = regex + body[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(body[i]), i + 1
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            verdict = not negate
    return verdict


def test_ignored_follows_docker_rules() -> None:
    patterns = ["**/__pycache__", "src/**/*.html", "!src/static/*.html", "build"]
    assert ignored("a/b/__pycache__/x.pyc", patterns) and ignored("__pycache__/x", patterns)
    assert ignored("src/a/b.html", patterns) and not ignored("src/static/page.html", patterns)
    assert ignored("build/lib/x.py", patterns) and not ignored("src/build.py", patterns)


def test_dockerignore_sends_the_sources_and_nothing_built_or_private() -> None:
    patterns = dockerignore()
    left_out = [
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/js/node_modules/phoenix/index.js",
        "node_modules/x/index.js",
        "src/presence_core/__pycache__/metrics.cpython-311.pyc",
        "src/presence_core/metrics.pyc",
        "src/presence_core/table/_fast.c",
        "src/presence_core/table/_fast.html",
        "src/presence_core/table/_fast.cpython-311-x86_64-linux-gnu.so",
        "src/presence_core.egg-info/PKG-INFO",
        "build/lib/presence_core/__init__.py",
        "dist/presence_core-0.1.0.tar.gz",
        "docs/dashboard.png",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/x",
        "tests/test_deploy.py",
    ]
    for path in left_out:
        assert ignored(path, patterns), f"{path} would be sent to the build"
    needed = ["pyproject.toml", "setup.py", "README.md", "LICENSE"]
    package = ROOT / "src" / "presence_core"
    for file in package.rglob("*"):
        if file.is_file() and (
            file.suffix in (".py", ".pyx", ".pyi", ".css", ".js", ".typed")
            or file.parent.name == "static"
        ):
            needed.append(file.relative_to(ROOT).as_posix())
    assert "src/presence_core/server/static/dashboard.html" in needed
    assert "src/presence_core/table/_fast.pyx" in needed
    for path in needed:
        if "__pycache__" not in path:
            assert not ignored(path, patterns), f"{path} is needed to build the wheel"


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
