"""Drive the running dashboard in a real browser (headless Debian chromium through Playwright).

Shared by the end-to-end test and bench/dashboard.py: start `tf dashboard` on a free loopback port,
open a page and wait until its content shows, run an edit and wait for its result. No browser is
downloaded: Playwright launches the system chromium.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# What "the page shows its content" means: a selector that appears only once the page's data is drawn.
TITLES = {"runs": "Runs", "trajectories": "Trajectory viewer", "hierarchy": "Hierarchy browser",
          "edit": "Edit playground"}
CONTENT = {"runs": '[data-testid="stDataFrame"]',
           "trajectories": '[data-testid="stImage"]:has-text("level 0 decoded") img',
           "hierarchy": '[data-testid="stImage"]:has-text("teacher L0") img', "edit": ".st-key-edit_run button"}
TOKEN_GRID = ".st-key-edit_token_grid"   # the edit playground's token grid (dashboards/token_grid.py)
EDIT_DONE = '[data-testid="stImageCaption"]:has-text("edited (final image)")'
TREND = '[data-testid="stVegaLiteChart"]'   # the runs page's first chart: the metric trends


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    from flows.local_server import wait_answers

    wait_answers(f"{url}/_stcore/health", process, "the dashboard", timeout, poll_s=0.2)


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextmanager
def dashboard_server(root: Path, log: Path, port: int | None = None):
    """`tf dashboard --root root` on a free loopback port; yields its URL and PID; stopped by that PID afterwards."""
    port = port or free_port()
    tf = Path(sys.executable).with_name("tf")
    command = [str(tf), "dashboard", "--root", str(root), "--port", str(port)] if tf.exists() else \
        [sys.executable, "-m", "flows.cli", "dashboard", "--root", str(root), "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield Server(url, process.pid)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)   # `tf dashboard` execs the server: this PID is the server
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(context, url: str, page: str, timeout_s: float = 60.0):
    """A new tab on ?page=<page>; returns (tab, seconds until the page's content was visible)."""
    tab = context.new_page()
    tab.set_default_timeout(timeout_s * 1000)
    started = time.perf_counter()
    tab.goto(f"{url}/?page={page}")
    tab.locator(CONTENT[page]).first.wait_for(state="visible")
    return tab, time.perf_counter() - started


def switch_page(tab, page: str) -> float:
    """Seconds from clicking the page in the sidebar to its title and content being visible."""
    started = time.perf_counter()
    tab.get_by_test_id("stRadioGroup").get_by_text(TITLES[page], exact=True).click()
    tab.get_by_role("heading", name=TITLES[page]).first.wait_for(state="visible")
    tab.locator(CONTENT[page]).first.wait_for(state="visible")
    return time.perf_counter() - started


def wait_idle(tab) -> None:
    """Until the script run that a click started has finished (the status widget disappears)."""
    tab.wait_for_timeout(100)
    tab.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")


def token(cell: str, selected: bool = False) -> str:
    """Selector of the token grid's button for cell "cell_<row>_<column>" (inside the grid component's shadow
    root, which Playwright's CSS selectors pierce); with selected, only once it is drawn as selected."""
    return f'{TOKEN_GRID} button{".selected" if selected else ""}[data-cell="{cell.removeprefix("cell_")}"]'


def run_edit(tab, cell: str | None = "cell_0_0") -> float:
    """Click a token (selects its region; None: keep the selected one), then Run edit; seconds from the click
    to the shown result."""
    if cell is not None:
        tab.locator(token(cell)).click()
        # the rerun is back when the clicked token is drawn as selected; only then is the region set in the browser
        tab.locator(token(cell, selected=True)).wait_for(state="visible")
    wait_idle(tab)
    from playwright.sync_api import expect

    caption = tab.locator(EDIT_DONE).first
    previous = caption.inner_text() if caption.count() else None
    started = time.perf_counter()
    tab.locator(".st-key-edit_run button").click()
    # The edited picture is drawn after the numbers and its caption names the new edit id.
    if previous is None:
        caption.wait_for(state="visible")
    else:
        expect(caption).not_to_have_text(previous, timeout=60_000)
    tab.locator('[data-testid="stImage"]').filter(has_text="edited (final image)").locator("img").first.wait_for()
    return time.perf_counter() - started
