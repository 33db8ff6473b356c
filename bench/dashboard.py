"""Dashboard responsiveness in a real browser (headless Debian chromium through Playwright), on CPU.

    .venv/bin/python bench/dashboard.py [--root data] [--config configs/scenes.yaml] [--screenshots docs]
                                        [--second-run hierarchy.cuts=[0.65,0.3]]

The root (default ./data, what `make run` writes; built with --config when missing) is copied to a
temporary folder first, so the edits the bench makes never land in it. `tf dashboard` is started on a
free loopback port and each page is opened in a fresh browser context (a new session) several times.

Figures (bench/results/dashboard.json), each page's content being: the runs table, the first image
(trajectory viewer, hierarchy browser), the Run edit button (edit playground):
  page_first_content_s     slowest page's median time from opening it in a new tab to its content being
                           visible (a new Streamlit session; the browser has loaded the dashboard before)
  page_cold_browser_s      the same in a fresh browser context (empty HTTP cache: the JS bundle is fetched too)
  page_sidebar_switch_s    slowest median time from a click in the sidebar to the page's content
  server_first_page_s      the very first page after the server started (imports, first script run)
  edit_round_trip_s        median time from clicking Run edit to the new edited image (after its numbers)
  edit_first_round_trip_s  the first edit after the page opened
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")   # first start migrates a database

from bench.results_io import write_result  # noqa: E402
from dashboards import browser  # noqa: E402

PAGES = ("runs", "trajectories", "hierarchy", "edit")
CELLS = ("cell_2_3", "cell_3_4", "cell_4_4", "cell_1_2", "cell_3_3")


def ensure_root(root: Path, config: str) -> None:
    if (root / "tables" / "runs").exists():
        return
    from flows.stages import pipeline_flow
    from storage.config import load_config

    print(f"no runs under {root}: running the pipeline with {config} first", flush=True)
    pipeline_flow(config=load_config(config), root=str(root), run_id=None)


def root_source(root: Path) -> dict:
    """What the measured root holds (the image source config of its image store)."""
    from storage.zarr_store import store_attrs

    stores = sorted(root.glob("images-*"))
    return store_attrs(stores[0]).get("source", {}) if stores else {}


def screenshot(tab, path: Path) -> None:
    """The page down to the end of its content (Streamlit scrolls inside the page, so full_page would not)."""
    tab.wait_for_timeout(1500)   # charts and images finish drawing
    box = tab.locator('[data-testid="stMainBlockContainer"]').bounding_box()
    height = min(tab.viewport_size["height"], box["y"] + box["height"] + 16)
    tab.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": tab.viewport_size["width"], "height": height})


def screenshot_pages(context, url: str, folder: Path) -> None:
    """The docs' pictures: each page as a user first sees it (the viewer with region overlays on); the runs
    page's top (the runs, the newest run in detail) and its metric trends apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for page in ("runs", "trajectories", "hierarchy"):
        tab, _ = browser.open_page(context, url, page)
        if page == "trajectories":
            tab.get_by_text("Region overlays").click()
            browser.wait_idle(tab)
        if page == "runs":
            trend = tab.locator(browser.TREND).first
            trend.wait_for(state="visible")
            tab.wait_for_timeout(1500)
            trend.scroll_into_view_if_needed()
            trend.screenshot(path=str(folder / "dashboard-runs-trends.png"))
            tab.evaluate("window.scrollTo(0, 0)")
            tab.locator('[data-testid="stMain"]').evaluate("main => main.scrollTo(0, 0)")
        screenshot(tab, folder / f"dashboard-{page}.png")
        tab.close()


def failed_run(root: Path, config: str) -> None:
    """A run that fails as one does (encode of a source no run ingested), so the runs page shows a failure."""
    from flows.stages import encode_flow
    from storage.config import load_config

    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    try:
        encode_flow(config=load_config(config, ["source.seed=99"]), root=str(root), run_id="encode-unseen-source")
    except RuntimeError as error:
        print(f"the failed run: {error}", flush=True)


def second_run(root: Path, config: str, overrides: list[str]) -> None:
    """A second run on the copy (e.g. another hierarchy cut), so the runs page has two runs to compare."""
    from flows.stages import pipeline_flow
    from storage.config import load_config

    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    pipeline_flow(config=load_config(config, overrides), root=str(root), run_id=None)


def take_screenshots(root: Path, work: Path, folder: Path) -> None:
    """The pictures alone, at a laptop's viewport width: one edit (its result in view), then every page."""
    with browser.dashboard_server(root, work / "dashboard.log") as server, browser.browser() as chromium:
        context = chromium.new_context(viewport={"width": 1400, "height": 2400})
        tab, _ = browser.open_page(context, server.url, "edit")
        browser.run_edit(tab, None)   # the default region: the object's largest part
        folder.mkdir(parents=True, exist_ok=True)
        screenshot(tab, folder / "dashboard-edit.png")
        screenshot_pages(context, server.url, folder)
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="data")
    parser.add_argument("--config", default="configs/scenes.yaml", help="used only to build a missing root")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshots", default=None, help="folder for the README's page screenshots")
    parser.add_argument("--second-run", action="append", default=[], metavar="KEY=VALUE",
                        help="before measuring, run the pipeline again on the copy with this override (repeatable)")
    parser.add_argument("--also-run", action="append", default=[], metavar="KEY=VALUE",
                        help="after --second-run, one more pipeline run per value, with that override")
    parser.add_argument("--failed-run", action="store_true", help="then leave a failed run on the copy")
    parser.add_argument("--screenshots-only", action="store_true",
                        help="only the screenshots (with one edit): no timings, bench/results/dashboard.json untouched")
    args = parser.parse_args()
    source = Path(args.root)
    ensure_root(source, args.config)
    work = Path(tempfile.mkdtemp(prefix="tf-dashboard-bench-"))
    root = work / "root"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns(".prefect", "dashboard-edits"))
    if args.second_run:
        second_run(root, args.config, args.second_run)
    for override in args.also_run:
        second_run(root, args.config, [override])
    if args.failed_run:
        failed_run(root, args.config)
    viewport = {"width": 1400, "height": 2400}
    modes = ("new_tab", "cold_browser", "sidebar")
    times: dict[str, dict[str, list[float]]] = {mode: {page: [] for page in PAGES} for mode in modes}
    edits: list[float] = []
    if args.screenshots_only:
        try:
            take_screenshots(root, work, Path(args.screenshots or "docs"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        with browser.dashboard_server(root, work / "dashboard.log") as server, browser.browser() as chromium:
            context = chromium.new_context(viewport=viewport)
            tab, server_first = browser.open_page(context, server.url, "runs")
            tab.close()
            for _ in range(args.repeats):
                for page in PAGES:
                    fresh = chromium.new_context(viewport=viewport)   # empty HTTP cache, new session
                    tab, seconds = browser.open_page(fresh, server.url, page)
                    times["cold_browser"][page].append(seconds)
                    fresh.close()
                    tab, seconds = browser.open_page(context, server.url, page)   # new tab, new session
                    times["new_tab"][page].append(seconds)
                    for other in PAGES:   # switch pages inside the app, as a user does
                        if other != page:
                            times["sidebar"][other].append(browser.switch_page(tab, other))
                    tab.close()
            tab, _ = browser.open_page(context, server.url, "edit")
            for cell in CELLS[:max(2, args.repeats + 1)]:
                edits.append(browser.run_edit(tab, cell))
            if args.screenshots:
                Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                screenshot(tab, Path(args.screenshots) / "dashboard-edit.png")
                screenshot_pages(context, server.url, Path(args.screenshots))
            context.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {mode: {page: statistics.median(v) for page, v in pages.items()} for mode, pages in times.items()}
    slowest = {mode: round(max(m.values()), 3) for mode, m in medians.items()}
    figures = {"page_first_content_s": (slowest["new_tab"], "s"),
               "page_cold_browser_s": (slowest["cold_browser"], "s"),
               "page_sidebar_switch_s": (slowest["sidebar"], "s"),
               "server_first_page_s": (round(server_first, 3), "s"),
               "edit_round_trip_s": (round(statistics.median(edits[1:]), 3), "s"),
               "edit_first_round_trip_s": (round(edits[0], 3), "s")}
    extra = {"root": str(source), "root_source": root_source(source), "second_run": args.second_run,
             "also_run": args.also_run, "failed_run": args.failed_run,
             "browser": "Debian chromium, headless, Playwright",
             "page_median_s": {mode: {p: round(v, 3) for p, v in m.items()} for mode, m in medians.items()},
             "edit_runs_s": [round(v, 3) for v in edits], "load_average_1m": round(os.getloadavg()[0], 2)}
    path = write_result("dashboard", figures, extra)
    print(path.read_text())


if __name__ == "__main__":
    main()
