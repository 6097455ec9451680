"""The hostile set in a real browser: Debian's Chromium (Playwright) against `streamlit run app.py`.

Every hostile image handed to the Explorer's uploader ends in the page's error naming the file and
the cause, every odd picture in a comparison; every hostile zip handed to the Tuning Lab ends in the
importer's reason. The server log has one line per refusal and no traceback, and the page shows none.
Skipped when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import re

import pytest
from hostile_inputs import decodable_images, hostile_zips, refused_images

from benchmarks.app_latency import CHROMIUM, LabServer, compared, launch_chromium, settle, wait_text

pytestmark = pytest.mark.browser
SLOW = 300  # seconds for anything that waits on the server (the test machine is shared)


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.is_file():
        pytest.skip("No /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    tmp = tmp_path_factory.mktemp("browser_hostile")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW * 1000)
        server = LabServer(tmp / "runs", "fixture", tmp / "server.log").start()
        try:
            server.wait_ready(SLOW)
            yield page, server
        finally:
            server.stop()
            browser.close()


def _hand_over(page, name: str, data: bytes, mime: str) -> None:
    settle(page, timeout_s=SLOW)
    page.locator("input[type=file]").first.set_input_files(files=[{"name": name, "mimeType": mime, "buffer": data}])


def _refusal(prefix: str, name: str | None, cause: str) -> re.Pattern[str]:
    named = re.escape(f"'{name}'") + ".*" if name else ""
    return re.compile(re.escape(prefix) + ".*" + named + re.escape(cause))


def test_hostile_uploads_in_the_browser_get_the_librarys_messages(browser_page) -> None:
    page, server = browser_page
    page.goto(f"{server.url}/explorer")
    wait_text(page, compared(1, "stars/test/0"), SLOW)
    page.get_by_text("Upload an image", exact=True).click()
    page.locator("input[type=file]").first.wait_for(state="attached")
    for upload in refused_images():
        _hand_over(page, upload.name, upload.data, "image/png")
        wait_text(page, _refusal("This upload cannot be used:", upload.name, upload.refusal), SLOW)
    for upload in decodable_images():
        _hand_over(page, upload.name, upload.data, "image/png")
        wait_text(page, compared(1, upload.name), SLOW)
    assert page.get_by_text("Traceback").count() == 0

    page.goto(f"{server.url}/tuning_lab")
    page.get_by_role("button", name="Submit run").wait_for()
    page.get_by_text("Uploaded zip of class folders", exact=True).click()
    page.locator("input[type=file]").first.wait_for(state="attached")
    for z in hostile_zips():
        _hand_over(page, z.name, z.data, "application/zip")
        wait_text(page, _refusal("This zip cannot be used:", None, z.dataset_refusal), SLOW)
    assert page.get_by_text("Traceback").count() == 0

    settle(page, timeout_s=SLOW)
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    image_lines = [line for line in log.splitlines() if "image upload" in line and "refused" in line]
    zip_lines = [line for line in log.splitlines() if "zip upload" in line and "refused" in line]
    # one line per refusal (a rerun of the page logs its refusal again)
    for upload in refused_images():
        assert any(f"'{upload.name}'" in line and upload.refusal in line for line in image_lines), upload.key
    for z in hostile_zips():
        assert any(f"'{z.name}'" in line and z.dataset_refusal in line for line in zip_lines), z.key
