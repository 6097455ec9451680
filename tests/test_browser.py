"""The app in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py`.

Uploads a generated PNG in the Explorer and waits for the comparison, submits a tiny run in the
Tuning Lab and sees it finish, then sees the new module in the Explorer. Screenshots go to
.test-artifacts/browser/. Runs on the fixture backbone (random weights) unless
TOAST_LAB_BROWSER_BACKBONE=embedded. Skipped when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from benchmarks.app_latency import (
    CHROMIUM,
    LabServer,
    compared,
    full_screenshot,
    launch_chromium,
    png_bytes,
    settle,
    upload_on_explorer,
    wait_text,
)

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".test-artifacts" / "browser"
BACKBONE = os.environ.get("TOAST_LAB_BROWSER_BACKBONE", "fixture")
SLOW = 300  # seconds for anything that waits on the server (the test machine is shared)


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.is_file():
        pytest.skip("No /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    runs = tmp_path_factory.mktemp("browser_runs")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW * 1000)
        server = LabServer(runs, BACKBONE, ARTIFACTS / "server.log").start()
        try:
            server.wait_ready(SLOW)
            yield page, server
        finally:
            server.stop()
            browser.close()


def shot(page, name: str) -> Path:
    settle(page, timeout_s=SLOW)
    return full_screenshot(page, ARTIFACTS / f"{name}.png")


def test_upload_compare_tune_and_see_the_new_module(browser_page) -> None:
    page, server = browser_page
    # a first visitor who opens a page URL on a fresh server gets the app's navigation, not the
    # pages/ folder's file names (Streamlit's old-style page folder)
    page.goto(f"{server.url}/explorer")
    wait_text(page, compared(1, "stars/test/0"), SLOW)
    nav = page.locator("[data-testid='stSidebarNav']")
    assert nav.get_by_text("Attention Explorer", exact=True).count() == 1
    assert nav.get_by_text("explorer", exact=True).count() == 0

    page.goto(server.url)
    page.get_by_role("heading", name="Attention Steering Lab").wait_for()
    if BACKBONE == "fixture":  # the label renders after the heading: wait for it rather than race it
        page.get_by_text("random weights").first.wait_for(state="visible", timeout=SLOW * 1000)
    shot(page, "home")

    # Explorer: a generated PNG is decoded, resized and compared
    page.goto(f"{server.url}/explorer")
    wait_text(page, compared(1, "stars/test/0"), SLOW)
    upload_on_explorer(page, "probe.png", png_bytes(7), SLOW)
    wait_text(page, compared(1, "probe.png"), SLOW)
    # the image and one overlay; the caption can render before the images do on a loaded machine
    page.locator("[data-testid='stImage']").nth(1).wait_for(state="visible", timeout=SLOW * 1000)
    assert page.locator("[data-testid='stImage']").count() >= 2
    assert page.get_by_text(re.compile("Traceback")).count() == 0
    shot(page, "explorer_upload")

    # Focus: a box dragged on the image becomes the focus region (160-px upload, no mask)
    page.get_by_role("tab", name="Focus").click()
    plot_area = page.locator(".st-key-ex_box_fig .nsewdrag").first
    plot_area.wait_for()
    settle(page, timeout_s=SLOW)
    box = plot_area.bounding_box()
    page.mouse.move(box["x"] + 0.10 * box["width"], box["y"] + 0.20 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.50 * box["width"], box["y"] + 0.60 * box["height"], steps=8)
    page.mouse.up()
    settle(page, timeout_s=SLOW)
    typed = {k: int(page.get_by_label(k, exact=True).input_value()) for k in ("x0", "y0", "x1", "y1")}
    want = {"x0": 16, "y0": 32, "x1": 80, "y1": 96}
    assert all(abs(typed[k] - want[k]) <= 1 for k in want), typed
    wait_text(page, f"Box ({typed['x0']}, {typed['y0']})–({typed['x1']}, {typed['y1']})", SLOW)
    shot(page, "explorer_focus_box")

    # Export: the PNG is built when the button is clicked, and it is a real PNG
    page.get_by_role("tab", name="Export").click()
    with page.expect_download(timeout=SLOW * 1000) as download:
        page.get_by_role("button", name="Download PNG").click()
    assert download.value.suggested_filename == "comparison_cls.png"
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Tuning Lab: a tiny run is queued, trains in the background and finishes
    page.goto(f"{server.url}/tuning_lab")
    page.get_by_role("button", name="Submit run").wait_for()
    for label, value in (("Steps", "4"), ("Batch size", "4"), ("Training images per class", "2"),
                         ("Validation images per class", "1")):
        field = page.get_by_label(label, exact=True)
        field.fill(value)
        field.press("Enter")
        settle(page, timeout_s=SLOW)
    page.get_by_role("button", name="Submit run").click()
    wait_text(page, "Submitted run", SLOW)
    wait_text(page, re.compile(r"Done: 4 steps"), SLOW)
    wait_text(page, "attention at step 4 (final module)", SLOW)  # the finished run's own snapshot
    shot(page, "tuning_lab_done")

    # the finished module is offered everywhere: the Explorer now compares two modules
    page.goto(f"{server.url}/explorer")
    wait_text(page, compared(2, "stars/test/0"), SLOW)
    assert page.get_by_text(re.compile(r"lora on stars")).count() >= 1
    shot(page, "explorer_two_modules")
