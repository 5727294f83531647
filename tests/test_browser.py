"""End to end in a real browser: start the app, visit every page in headless Chromium, screenshot each.

Needs Debian's chromium (`apt-get install -y chromium`); skipped with that advice where it is missing.
Screenshots land in screenshots/ (gitignored), one per page, named after the page file.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "screenshots"
CHART = ".vega-embed canvas, .vega-embed svg"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_S = 420  # a cold page on 2 shared cores: model load, activations, divergence tables
CHARTLESS = {"pages/1_Home.py"}  # the home page is text, metrics and tables by design

pytestmark = pytest.mark.browser


def app_pages() -> list[tuple[str, str]]:
    """(file, title) of every page listed in app.py that exists, read from its PAGES literal."""
    tree = ast.parse((ROOT / "app.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PAGES" for t in node.targets):
            return [(f, t) for f, t, _ in ast.literal_eval(node.value) if (ROOT / f).exists()]
    raise AssertionError("app.py has no PAGES list")


def url_path(file: str) -> str:
    # Streamlit infers a page's URL from its file name without the leading number: 6_Divergence.py -> Divergence.
    return re.sub(r"^\d+[_-]", "", Path(file).stem)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium is missing: install it with `apt-get install -y chromium` (as root)")
    port = free_port()
    SHOTS.mkdir(exist_ok=True)
    log = open(SHOTS / "streamlit.log", "w")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read().strip() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"streamlit did not come up on {url}; see screenshots/streamlit.log")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _wait_idle(page, timeout_s: float) -> None:
    """Until the script has finished: Streamlit shows its status widget while a run is in progress."""
    deadline = time.time() + timeout_s
    quiet_since = None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        quiet_since = None if running else (quiet_since or time.time())
        if quiet_since and time.time() - quiet_since > 2.0:
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"the page was still running after {timeout_s:.0f} s")


def test_every_page_renders_in_chromium(server):
    from playwright.sync_api import sync_playwright

    report = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        # Streamlit scrolls inside its own container, so a tall viewport is what shows a whole page.
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        for i, (file, title) in enumerate(app_pages()):
            page.goto(server if i == 0 else f"{server}/{url_path(file)}", wait_until="domcontentloaded")
            page.wait_for_selector('[data-testid="stApp"]', timeout=60_000)
            start = time.time()
            if file not in CHARTLESS:
                # The chart, an exception box, or the page's documented empty state ends the wait.
                # Visible ones only: an alert inside a collapsed expander is in the DOM but hidden.
                page.locator(f'{CHART}, [data-testid="stException"], [data-testid="stAlert"]').filter(
                    visible=True).first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
            _wait_idle(page, PAGE_TIMEOUT_S)
            shot = SHOTS / f"{Path(file).stem}.png"
            page.screenshot(path=str(shot), full_page=True)
            errors = page.locator('[data-testid="stException"]')
            assert errors.count() == 0, f"{title}: {errors.first.inner_text()[:2000]} (screenshot {shot})"
            charts = page.locator(CHART).count()
            alerts = " ".join(page.locator('[data-testid="stAlert"]').all_inner_texts())
            if file not in CHARTLESS and charts == 0:
                # Without runs a page shows its empty state (what to do next) instead of a chart.
                assert alerts.strip(), f"{title}: no chart and no empty-state message (screenshot {shot})"
            assert page.get_by_text(title).count() > 0, f"{title}: the page title is not on screen"
            state = f"{charts} chart element(s)" if charts else f"empty state: {alerts[:80]!r}"
            report.append(f"{title}: {state}, {time.time() - start:.0f} s, {shot.name}")
        browser.close()
    print("\n".join(report))
