"""The live dashboard in a real browser: headless Chromium, driven by Selenium, against a real
``presence-core serve`` with real WebSocket clients.

What it checks is what an operator sees: the page loads without a script error; its figures
equal what ``/metrics`` reports at the same moment; they follow presence up and down; the diff
chart draws points; the topic browser lists topics largest first, filters them, and pages a
topic's members by cursor (120 keys, three pages); a refused connection shows as a limit hit;
the scaler's decisions show; and the page says "offline" once the server is gone.  The test
saves a screenshot of the page under its tmp_path, and also at $PRESENCE_CORE_SCREENSHOT when
that is set (docs/dashboard.png is made that way).

The page is read through its test hooks: every figure has an ``id`` and its raw number in
``data-value``; rows carry ``data-topic``/``data-keys``, ``data-key``, ``data-limit``/
``data-total`` and ``data-action``.

Needs Debian's ``chromium`` and ``chromium-driver``; without them the test skips, saying how to
install them, except under CI (``CI=true``) where it fails.  Every wait is bounded; the server
is stopped by PID and the browser quit however the test ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from presence_core.testing.plugin import ServerProcess

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WAIT = 15.0  # seconds, the bound on every wait

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps reaching for Google's services, which this network lacks.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]

OP_KINDS = ("track", "update", "untrack", "heartbeat", "disconnect")
BIG_KEYS = 120  # members of the big topic: three pages of 50, 50 and 20
SMALL_TOPIC = "realtime:room-a"
BIG_TOPIC = "realtime:room-big"
# alice and bob in room-a, one socket per key in room-big: the server takes exactly these.
MAX_CONNECTIONS = 2 + BIG_KEYS

# A meta value the page must show as text, never as markup (an <img> here would run its onerror).
MARKUP = "<img src=x onerror=\"window.__errors.push('markup ran')\">"

# Collects uncaught errors and rejections from the first script on, for the end of the test.
ERROR_COLLECTOR = """
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__errors.push(String(e.reason)));
"""


def _browser_binaries() -> tuple[str, str]:
    """Chromium and its driver, or skip (fail under CI) saying how to install them."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [path for path in (chromium, chromedriver) if not os.access(path, os.X_OK)]
    if missing:
        message = (
            f"the dashboard's browser test needs Chromium and chromedriver ({', '.join(missing)} "
            "not found): apt-get install chromium chromium-driver"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return chromium, chromedriver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, its console log kept; quit however the test ends."""
    chromium, chromedriver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_COLLECTOR})
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """``presence-core serve`` taking MAX_CONNECTIONS sockets, with a scaler consulted every
    second on connections (more replicas above 100 a replica)."""
    args = [
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--scale",
        "connections=10:100",
        "--scale-interval",
        "1",
        "--scale-max-replicas",
        "4",
    ]
    with ServerProcess(args=args, log_path=tmp_path / "serve.log") as running:
        yield running


class Socket:
    """A raw Phoenix v2 client: one WebSocket, JSON arrays, joins and tracks without waiting.

    Nothing reads its replies; ``max_queue=None`` lets them pile up in the client rather than
    stop it reading, which the server would cut as a slow client.
    """

    def __init__(self, url: str) -> None:
        self.ws: ClientConnection = connect(url, max_queue=None, open_timeout=5, close_timeout=2)
        self.ref = 0

    def send(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        self.ref += 1
        self.ws.send(json.dumps(["1", str(self.ref), topic, event, payload]))

    def join_and_track(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        self.send(topic, "phx_join", {"config": {"presence": {"key": key}}})
        self.send(topic, "presence", {"type": "presence", "event": "track", "payload": meta})

    def untrack(self, topic: str) -> None:
        self.send(topic, "presence", {"type": "presence", "event": "untrack"})

    def close(self) -> None:
        self.ws.close()


# --- what /metrics says and what the page shows ---------------------------------------------

METRIC_LINE = re.compile(r"^([A-Za-z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$")


def scrape(server: ServerProcess) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}."""
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match and not line.startswith("#"):
            samples[match[1]] = float(match[2])
    return samples


def expected_figures(metrics: dict[str, float]) -> dict[str, float]:
    """The page's figures as /metrics has them, by element id."""
    figures = {
        "connections": metrics["presence_connections"],
        "presences": metrics["presence_presences"],
        "topics": metrics["presence_topics"],
        "pending_changes": metrics["presence_pending_changes"],
        "expiries": metrics["presence_expiries_total"],
        "hook_errors": metrics["presence_hook_errors_total"],
    }
    for kind in OP_KINDS:
        figures[f"ops-{kind}-total"] = metrics.get(f'presence_ops_total{{kind="{kind}"}}', 0.0)
    return figures


def page_figures(driver: WebDriver, ids: list[str]) -> dict[str, float | None]:
    """The data-value of each element, as a number (None when missing or empty)."""
    raw = driver.execute_script(
        "return Object.fromEntries(arguments[0].map((id) => "
        "[id, document.getElementById(id)?.getAttribute('data-value') ?? null]));",
        ids,
    )
    return {key: float(value) if value else None for key, value in raw.items()}


def rows(driver: WebDriver, selector: str, *attributes: str) -> list[tuple[str, ...]]:
    """The given attributes of every row matching the CSS selector, in page order."""
    return [
        tuple(row.get_attribute(name) or "" for name in attributes)
        for row in driver.find_elements(By.CSS_SELECTOR, selector)
    ]


def wait(driver: WebDriver, what: str, probe: Callable[[], tuple[bool, object]]) -> None:
    """Wait up to WAIT s for ``probe()`` to answer (True, _); fail with its last detail."""
    seen: dict[str, object] = {}

    def check(_: WebDriver) -> bool:
        ok, seen["detail"] = probe()
        return ok

    try:
        WebDriverWait(
            driver, WAIT, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
        ).until(check)
    except TimeoutException:
        pytest.fail(f"after {WAIT} s still waiting for {what}; last seen: {seen.get('detail')}")


def wait_agreement(driver: WebDriver, server: ServerProcess, **want: float) -> None:
    """Wait until the page's figures equal a fresh scrape of /metrics, and those hold `want`."""

    def probe() -> tuple[bool, object]:
        expected = expected_figures(scrape(server))
        shown = page_figures(driver, list(expected))
        ok = shown == expected and all(expected[k] == v for k, v in want.items())
        return ok, {"page": shown, "/metrics": expected, "want": want}

    wait(driver, f"the page to agree with /metrics at {want}", probe)


def test_dashboard_shows_live_presence_in_a_real_browser(
    browser: WebDriver, server: ServerProcess, tmp_path: Path
) -> None:
    driver = browser
    sockets: list[Socket] = []
    try:
        # (1) the page loads, and draws the overview
        driver.get(f"{server.http}/")
        wait(driver, "the title", lambda: ("presence-core" in driver.title, driver.title))
        updated = driver.find_element(By.ID, "updated")
        wait(driver, "a first answer", lambda: (bool(updated.get_attribute("data-now")), None))
        link = driver.find_element(By.ID, "link")
        assert link.get_attribute("data-state") == "live"
        assert driver.find_element(By.ID, "accepting").text == "accepting"
        assert driver.find_element(By.ID, "redis-body").text == "in-process state, no Redis"
        assert driver.find_element(By.ID, "redis").get_attribute("data-connected") == ""

        # (2) figures equal /metrics: alice and bob in room-a
        for key in ("alice", "bob"):
            socket = Socket(server.url)
            sockets.append(socket)
            socket.join_and_track(SMALL_TOPIC, key, {"status": "online", "name": key})
        wait_agreement(driver, server, connections=2, presences=2, topics=1)

        # (3) the page follows presence up: one socket per key of the big topic, in three steps
        for i in range(BIG_KEYS):
            socket = Socket(server.url)
            sockets.append(socket)
            meta = {"status": "online", "n": i, "note": MARKUP}
            socket.join_and_track(BIG_TOPIC, f"user-{i:03d}", meta)
            if (i + 1) % (BIG_KEYS // 3) == 0:
                wait_agreement(driver, server, connections=3 + i, presences=3 + i)
        chart = driver.find_element(By.ID, "diff-chart")
        points = lambda: int(chart.get_attribute("data-points") or 0)  # noqa: E731
        wait(driver, "points on the diff chart", lambda: (points() > 0, points()))

        # (4) the topic browser: largest first, the filter, then a topic's members by page
        topics = "#topic-list tbody tr[data-topic]"
        wait(
            driver,
            "both topics listed, largest first, with their key counts",
            lambda: (
                (found := rows(driver, topics, "data-topic", "data-keys"))
                == [(BIG_TOPIC, str(BIG_KEYS)), (SMALL_TOPIC, "2")],
                found,
            ),
        )
        search = driver.find_element(By.ID, "topic-filter")
        search.send_keys("room-a")
        wait(
            driver,
            "the filter to leave room-a alone",
            lambda: ((found := rows(driver, topics, "data-topic")) == [(SMALL_TOPIC,)], found),
        )
        search.clear()
        search.send_keys(" ")  # clear() fires no input event; a space and a backspace do
        search.send_keys("\b")
        wait(driver, "both topics again", lambda: (len(rows(driver, topics, "data-topic")) == 2, 0))

        driver.find_element(By.CSS_SELECTOR, f'tr[data-topic="{BIG_TOPIC}"]').click()
        members = "#member-list tbody tr[data-key]"

        def page_of(first: int, count: int) -> Callable[[], tuple[bool, object]]:
            keys = [(f"user-{i:03d}",) for i in range(first, first + count)]
            return lambda: ((found := rows(driver, members, "data-key")) == keys, found)

        wait(driver, "the first 50 members", page_of(0, 50))
        driver.find_element(By.ID, "members-next").click()
        wait(driver, "members 50-99", page_of(50, 50))
        driver.find_element(By.ID, "members-next").click()
        wait(driver, "the last 20 members", page_of(100, 20))
        assert not driver.find_element(By.ID, "members-next").is_enabled()
        driver.find_element(By.ID, "members-prev").click()
        wait(driver, "members 50-99 again", page_of(50, 50))
        driver.find_element(By.ID, "members-prev").click()
        wait(driver, "the first page again", page_of(0, 50))
        meta = json.loads(driver.find_element(By.CSS_SELECTOR, f"{members} code").text)
        assert meta["status"] == "online" and meta["note"] == MARKUP and "phx_ref" in meta
        assert driver.find_elements(By.CSS_SELECTOR, "#member-list img") == []

        # (5) one socket too many is refused, and shows as a limit hit equal to /metrics
        with pytest.raises(InvalidStatus):
            Socket(server.url)

        def limit_hits() -> tuple[bool, object]:
            metric = scrape(server).get('presence_limit_hits_total{limit="max_connections"}')
            shown = rows(driver, '#limits tr[data-limit="max_connections"]', "data-total")
            return metric is not None and metric >= 1 and shown == [(str(int(metric)),)], shown

        wait(driver, "the max_connections hit", limit_hits)

        # the scaler, consulted every second, asks for more replicas above 100 connections
        wait(
            driver,
            "a scale_up decision",
            lambda: (
                ("scale_up",) in (found := rows(driver, "#scaler-decisions tr", "data-action")),
                found,
            ),
        )

        # (3, down) bob untracks, then 60 sockets of the big topic leave, in three steps
        sockets[1].untrack(SMALL_TOPIC)
        wait_agreement(driver, server, connections=2 + BIG_KEYS, presences=1 + BIG_KEYS)
        for step in range(3):
            leaving, sockets[2:] = sockets[2 : 2 + BIG_KEYS // 6], sockets[2 + BIG_KEYS // 6 :]
            for socket in leaving:
                socket.close()
            left = (step + 1) * (BIG_KEYS // 6)
            wait_agreement(
                driver, server, connections=2 + BIG_KEYS - left, presences=1 + BIG_KEYS - left
            )
        figures = page_figures(driver, ["ops-untrack-total", "ops-disconnect-total"])
        assert figures["ops-untrack-total"] == 1
        assert figures["ops-disconnect-total"] == BIG_KEYS // 2

        # (1, end) no script error and nothing failed to load, all along
        errors = driver.execute_script("return window.__errors;")
        assert errors == [], errors
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe

        # (6) a screenshot of the whole page, with the members of the big topic shown
        height = driver.execute_script(
            "window.scrollTo(0, 0); return document.documentElement.scrollHeight;"
        )
        metrics = {"width": 1280, "height": min(int(height), 2000), "deviceScaleFactor": 1}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": False})
        wait(driver, "a redraw after the resize", lambda: (points() > 0, points()))
        shots = [tmp_path / "dashboard.png"]
        if os.environ.get("PRESENCE_CORE_SCREENSHOT"):
            shots.append(Path(os.environ["PRESENCE_CORE_SCREENSHOT"]))
        for shot in shots:
            assert driver.save_screenshot(str(shot)), f"no screenshot at {shot}"
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        # (7) the server goes away: the page says so
        server.stop()
        wait(
            driver,
            "the page to turn offline",
            lambda: (link.get_attribute("data-state") == "offline", link.text),
        )
    finally:
        for socket in sockets:
            socket.close()


def test_a_dashboard_token_is_sent_by_the_page_and_required_of_everyone_else(
    browser: WebDriver, tmp_path: Path
) -> None:
    args = ["--dashboard-token", "s3cret token"]
    with ServerProcess(args=args, log_path=tmp_path / "serve.log") as running:
        browser.get(f"{running.http}/?token=s3cret%20token")
        wait(
            browser,
            "the page to get data with its token",
            lambda: (browser.find_element(By.ID, "link").get_attribute("data-state") == "live", 0),
        )
        browser.get(f"{running.http}/")  # no token: the page says why it has no data
        link = browser.find_element(By.ID, "link")
        wait(
            browser,
            "the page to say it is unauthorized",
            lambda: ("unauthorized" in (link.get_attribute("title") or ""), link.text),
        )
        assert link.get_attribute("data-state") == "offline"
