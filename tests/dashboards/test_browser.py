"""End to end in a real browser: `tf dashboard` over a tiny-pipeline root, every page, one edit, screenshots."""
import os
import shutil
from pathlib import Path

import pytest

from dashboards import browser, data

pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
if not Path(browser.CHROMIUM).exists():
    pytest.skip(f"{browser.CHROMIUM} missing (make test installs Debian's chromium or fails saying how, unless "
                "TF_SKIP_BROWSER=1: dashboards/ensure_chromium.sh)", allow_module_level=True)


CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


def test_every_page_and_an_edit_in_chromium(tiny_root, tmp_path):
    from flows.stages import encode_flow
    from storage.config import load_config

    shots = tmp_path / "screenshots"
    shots.mkdir()
    log = tmp_path / "dashboard.log"
    root = Path(shutil.copytree(tiny_root, tmp_path / "root"))
    with pytest.raises(RuntimeError):   # a failed run: encode of images no run ingested
        encode_flow(config=load_config(CONFIG, ["source.seed=7"]), root=str(root), run_id="broken")
    before = len(data.load_edits(root))
    with browser.dashboard_server(root, log) as server, browser.browser() as chromium:
        url = server.url
        assert listening_addresses(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}   # loopback by default
        context = chromium.new_context(viewport={"width": 1400, "height": 2000})
        for page in ("runs", "trajectories", "hierarchy"):
            tab, seconds = browser.open_page(context, url, page)
            assert tab.get_by_role("heading", name=browser.TITLES[page]).first.is_visible()
            if page == "runs":   # the newest run, the failed one, in detail: where it failed and why
                failed = tab.locator('[data-testid="stAlert"]').filter(has_text="Failed at encode: RuntimeError")
                assert failed.first.is_visible()
                tab.locator(browser.TREND).first.wait_for(state="visible")   # drawn with the second script run
            assert "Traceback" not in tab.content()
            tab.screenshot(path=str(shots / f"{page}.png"))
            tab.close()
        tab, _ = browser.open_page(context, url, "edit")
        seconds = browser.run_edit(tab, "cell_1_1")
        region = tab.locator(browser.token("cell_1_1")).inner_text().strip()
        assert f"region {region};" in tab.locator('[data-testid="stCaptionContainer"]:has-text("new tokens")').first.inner_text()
        tab.locator('[data-testid="stMetric"]:has-text("locality, pixels")').first.wait_for(state="visible")
        assert tab.locator('[data-testid="stMetric"]:has-text("PSNR outside (dB)")').count() == 1
        value = tab.locator('[data-testid="stMetric"]:has-text("locality, pixels") [data-testid="stMetricValue"]')
        float(value.first.inner_text())   # a number, not an error text
        edited = tab.locator('[data-testid="stImage"]').filter(has_text="edited (final image)").locator("img").first
        assert edited.evaluate("img => img.complete && img.naturalWidth") > 0
        box = edited.bounding_box()   # the result is in view: above the fold of a laptop screen, no scrolling
        assert box["y"] + box["height"] <= 900, box
        tab.screenshot(path=str(shots / "edit.png"))
        assert seconds > 0
    with pytest.raises(ProcessLookupError):   # stopped by its PID
        os.kill(server.pid, 0)
    assert "Traceback" not in log.read_text()
    assert len(data.load_edits(root)) == before + 1
    for name in ("runs", "trajectories", "hierarchy", "edit"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
